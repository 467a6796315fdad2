"""Fixtures of the plugin tests: real QGIS (headless), the plugin installed from the packaged
zip into a clean plugins folder, and the real Landsat Taizhou pair with weak labels."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qgis_env import SLOT_ERRORS, StubIface, start_qgis  # noqa: E402

#: The worker runs the engine with the test's interpreter (it has torch).
os.environ["KDMSI_PYTHON"] = sys.executable
#: One thread per worker: on a shared 2-core machine, OpenMP threads waiting on each other
#: made a tiny training 3x slower than one thread.
os.environ["OMP_NUM_THREADS"] = "1"

TILE = 64
CROP = 192


@pytest.fixture(autouse=True)
def _no_errors_in_qt_slots():
    """An exception in a Qt slot would abort QGIS: fail the test that caused it."""
    SLOT_ERRORS.clear()
    yield
    assert not SLOT_ERRORS, SLOT_ERRORS[0]


@pytest.fixture(scope="session")
def qgis_app():
    return start_qgis()


@pytest.fixture(scope="session")
def plugin_zip(tmp_path_factory, repo_root: Path) -> Path:
    from scripts.package import build_zip

    return build_zip(tmp_path_factory.mktemp("dist") / "kdmsi_qgis.zip")


@pytest.fixture(scope="session")
def plugins_dir(tmp_path_factory, plugin_zip: Path) -> Path:
    """A clean plugins folder with the zip unpacked, as 'Install from ZIP' does."""
    folder = tmp_path_factory.mktemp("profile") / "python" / "plugins"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def iface(qgis_app):
    return StubIface()


@pytest.fixture(scope="session")
def plugin(qgis_app, plugins_dir: Path, iface):
    """The plugin loaded by qgis.utils from the unpacked zip, with initGui run."""
    import qgis.utils

    for name in [m for m in sys.modules if m == "kdmsi_qgis" or m.startswith("kdmsi_qgis.")]:
        del sys.modules[name]
    sys.path.insert(0, str(plugins_dir))
    qgis.utils.plugin_paths = [str(plugins_dir)]
    qgis.utils.iface = iface
    qgis.utils.updateAvailablePlugins()
    assert "kdmsi_qgis" in qgis.utils.available_plugins
    assert qgis.utils.loadPlugin("kdmsi_qgis")
    assert qgis.utils.startPlugin("kdmsi_qgis")
    instance = qgis.utils.plugins["kdmsi_qgis"]
    yield instance
    qgis.utils.unloadPlugin("kdmsi_qgis")


@pytest.fixture(scope="session")
def taizhou(shared_data: Path, tmp_path_factory) -> dict[str, str]:
    """The real Landsat Taizhou pair (EPSG:32651, 6 bands, 30 m) and its sparse reference,
    cut to the top-left 192 x 192 pixels (9 tiles of 64 px, both classes) so that training in
    the tests takes seconds; the pixels are the original ones (a lossless window copy)."""
    from osgeo import gdal

    root = shared_data / "landsat-taizhou-nanjing"
    folder = tmp_path_factory.mktemp("taizhou")
    paths = {}
    for key, sub in (("before", "A"), ("after", "B"), ("label", "label")):
        target = folder / f"{key}.tif"
        gdal.Translate(str(target), str(root / sub / "taizhou.tif"), srcWin=[0, 0, CROP, CROP])
        paths[key] = str(target)
    return paths


@pytest.fixture(scope="session")
def grid_gpkg(plugin, taizhou, tmp_path_factory) -> str:
    """The labelling grid made by the plugin's own algorithm (64 px tiles)."""
    import processing

    output = str(tmp_path_factory.mktemp("grid") / "grid.gpkg")
    result = processing.run(
        "kdmsi:labellinggrid",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "TILE_SIZE": TILE,
            "OUTPUT": output,
        },
    )
    return result["OUTPUT"]


@pytest.fixture(scope="session")
def weak_labels(grid_gpkg: str, taizhou, tmp_path_factory):
    """The analyst's work: the grid with `change` filled, as a file and as a memory layer."""
    from qgis_env import make_weak_labels

    path = str(tmp_path_factory.mktemp("labels") / "weak_labels.gpkg")
    memory = make_weak_labels(grid_gpkg, taizhou["label"], path, TILE)
    assert {f["change"] for f in memory.getFeatures()} == {0, 1}
    return {"memory": memory, "file": path}
