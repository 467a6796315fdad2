"""The demo's outputs open in QGIS as valid layers (a tiny run of the demo's command line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from detect_testutils import TINY_ARGS, crop_sample  # noqa: E402


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory) -> Path:
    from kdmsi_engine.cli import main
    from scripts.demo import demo_arguments

    sample = crop_sample(tmp_path_factory.mktemp("sample"), Window(150, 200, 96, 96))
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    command = demo_arguments(out, sample_dir=sample["before"].parent, fast=True, progress="none")
    assert main(command + TINY_ARGS) == 0
    return out


def test_demo_outputs_are_valid_qgis_layers(qgis_app, demo_outputs):
    from qgis.core import QgsRasterLayer, QgsVectorLayer

    record = json.loads((demo_outputs / "run.json").read_text())
    extents = set()
    for name in (
        "change.tif",
        "change_probability.tif",
        "msi_probability.tif",
        "pseudo_labels.tif",
    ):
        layer = QgsRasterLayer(str(demo_outputs / name), name)
        assert layer.isValid(), name
        assert layer.crs().authid() == "EPSG:32651"
        assert (layer.width(), layer.height()) == (96, 96)
        extents.add(layer.extent().toString(2))
    assert len(extents) == 1
    change = QgsRasterLayer(str(demo_outputs / "change.tif"), "change")
    assert change.dataProvider().sourceNoDataValue(1) == 255
    assert len(change.dataProvider().colorTable(1)) > 0
    vector = QgsVectorLayer(f"{demo_outputs / 'changes.gpkg'}|layername=changes", "changes", "ogr")
    assert vector.isValid()
    assert vector.crs().authid() == "EPSG:32651"
    assert vector.featureCount() == record["polygons"]
    names = {f.name() for f in vector.fields()}
    assert {"area_m2", "mean_prob", "max_prob", "scene"} <= names
    for feature in vector.getFeatures():
        assert feature.geometry().isGeosValid()
        assert feature["area_m2"] == pytest.approx(feature.geometry().area())


def test_quicklook_png(demo_outputs, tmp_path):
    from PIL import Image

    from scripts.quicklook import make_quicklook

    sample = Path(json.loads((demo_outputs / "run.json").read_text())["inputs"]["before"]).parent
    png = make_quicklook(
        sample / "taizhou_2000.tif", sample / "taizhou_2003.tif", demo_outputs / "change.tif",
        tmp_path / "q.png", truth=sample / "taizhou_truth.tif", title="test",
    )  # fmt: skip
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 3 * 96
