"""Every algorithm through ``processing.run`` on the real Taizhou pair (tiny configuration):
outputs load as valid layers in the scene's CRS, with plausible values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qgis_env import run_algorithm as run

CRS = "EPSG:32651"  # the Taizhou pair's UTM zone
TINY = {"BACKBONE": 1, "WEIGHTS": 1, "EPOCHS": 1, "BATCH_SIZE": 4, "TILE_SIZE": 64, "DEVICE": "cpu"}


def raster(path: str):
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(path, Path(path).stem, "gdal")
    assert layer.isValid(), path
    assert layer.crs().authid() == CRS
    return layer


def vector(path: str):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(path, Path(path).stem, "ogr")
    assert layer.isValid(), path
    assert layer.crs().authid() == CRS
    return layer


def unique_values(layer) -> set[int]:
    from osgeo import gdal

    data = gdal.Open(layer.source()).ReadAsArray()
    return {int(v) for v in set(data.ravel().tolist())}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("algorithms")


@pytest.fixture(scope="module")
def model(plugin, taizhou, weak_labels, workdir) -> str:
    """Train KD-MSI from a memory layer of weak labels (exported to a GeoPackage on the way)."""
    result = run(
        "trainmodel",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "LABELS": weak_labels["memory"],
            "LABEL_FIELD": "change",
            **TINY,
            "OUTPUT": str(workdir / "model.kdmsi"),
        },
    )
    assert Path(result["OUTPUT"]).is_file()
    return result["OUTPUT"]


@pytest.fixture(scope="module")
def probability(model, taizhou, workdir) -> str:
    result = run(
        "changeprobability",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "MODEL": model,
            "METHOD": 0,  # msi
            "SCALES": "0.5,1",
            "DEVICE": "cpu",
            "OUTPUT": str(workdir / "probability.tif"),
        },
    )
    return result["OUTPUT"]


@pytest.fixture(scope="module")
def pseudo(probability, weak_labels, workdir) -> str:
    result = run(
        "pseudolabels",
        {
            "PROBABILITY": probability,
            "LABELS": weak_labels["file"],
            "LABEL_FIELD": "change",
            "THRESHOLD": 0.3,
            "OUTPUT": str(workdir / "pseudo.tif"),
        },
    )
    return result["OUTPUT"]


@pytest.fixture(scope="module")
def detector(pseudo, taizhou, workdir) -> str:
    result = run(
        "traindetector",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "PSEUDO": pseudo,
            **TINY,
            "OUTPUT": str(workdir / "detector.kdmsi"),
        },
    )
    assert Path(result["OUTPUT"]).is_file()
    return result["OUTPUT"]


@pytest.fixture(scope="module")
def detection(detector, taizhou, workdir) -> dict:
    return run(
        "detectchanges",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "MODEL": detector,
            "DEVICE": "cpu",
            "OUTPUT_FOLDER": str(workdir / "detection"),
        },
    )


def test_labelling_grid(grid_gpkg: str) -> None:
    layer = vector(grid_gpkg)
    assert "change" in layer.fields().names()
    assert layer.featureCount() == 9  # 192 px / 64 px tiles
    values = [f["change"] for f in layer.getFeatures()]
    assert all(v is None or (hasattr(v, "isNull") and v.isNull()) for v in values)


def test_change_probability_map(probability: str) -> None:
    layer = raster(probability)
    stats = layer.dataProvider().bandStatistics(1)
    assert 0.0 <= stats.minimumValue <= stats.maximumValue <= 1.0
    assert layer.width() == layer.height() == 192


def test_pseudo_labels(pseudo: str) -> None:
    layer = raster(pseudo)
    assert unique_values(layer) <= {0, 1, 255}
    assert 0 in unique_values(layer)


def test_detect_changes(detection: dict) -> None:
    folder = Path(detection["OUTPUT_FOLDER"])
    raster(detection["PROBABILITY"])
    change = raster(detection["CHANGE"])
    assert unique_values(change) <= {0, 1, 255}
    polygons = vector(detection["CHANGES"])
    assert polygons.featureCount() == 0 or "area_m2" in polygons.fields().names()
    assert (folder / "run.json").is_file()
    json.loads((folder / "run.json").read_text())


def test_vectorize(detection: dict, workdir: Path) -> None:
    result = run(
        "vectorize",
        {
            "CHANGE": detection["CHANGE"],
            "PROBABILITY": detection["PROBABILITY"],
            "MIN_AREA": 0.0,
            "SIMPLIFY": 0.0,
            "OUTPUT": str(workdir / "polygons.gpkg"),
        },
    )
    layer = vector(result["OUTPUT"])
    assert "area_m2" in layer.fields().names()


def test_evaluate(probability: str, taizhou, workdir: Path) -> None:
    result = run(
        "evaluate",
        {
            "PREDICTION": probability,
            "REFERENCE": taizhou["label"],
            "SWEEP": True,
            "OUTPUT": str(workdir / "metrics.json"),
        },
    )
    from osgeo import gdal

    metrics = json.loads(Path(result["OUTPUT"]).read_text())
    reference = gdal.Open(taizhou["label"]).ReadAsArray()
    assert metrics["pixels"] == int((reference != 255).sum()) > 0  # 255 (unlabelled) is nodata
    for key in ("IOU", "F1", "OA", "MIOU", "BEST_IOU", "BEST_THRESHOLD"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["BEST_IOU"] >= result["IOU"] - 1e-9


@pytest.mark.slow
def test_run_whole_chain(plugin, taizhou, weak_labels, workdir: Path) -> None:
    result = run(
        "runchain",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "LABELS": weak_labels["file"],
            "LABEL_FIELD": "change",
            "BACKBONE": 1,
            "WEIGHTS": 1,
            "EPOCHS": 1,
            "DETECTOR_EPOCHS": 1,
            "TILE_SIZE": 64,
            "SCALES": "1",
            "DEVICE": "cpu",
            "OUTPUT_FOLDER": str(workdir / "chain"),
        },
    )
    raster(result["PROBABILITY"])
    assert unique_values(raster(result["CHANGE"])) <= {0, 1, 255}
    vector(result["CHANGES"])


def test_bad_input_is_a_processing_exception(plugin, taizhou, shared_data, workdir) -> None:
    from qgis.core import QgsProcessingException

    output = workdir / "nogrid.gpkg"
    with pytest.raises(QgsProcessingException) as caught:
        run(
            "labellinggrid",
            {
                "BEFORE": taizhou["before"],
                "AFTER": str(shared_data / "rasterio-rgb-byte" / "RGB.byte.tif"),
                "TILE_SIZE": 64,
                "OUTPUT": str(output),
            },
        )
    message = str(caught.value)
    assert "\n" not in message and ("overlap" in message or "intersect" in message)
    assert not output.exists()


def test_labels_without_the_field_are_refused(plugin, taizhou, weak_labels, workdir) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="field"):
        run(
            "trainmodel",
            {
                "BEFORE": taizhou["before"],
                "AFTER": taizhou["after"],
                "LABELS": weak_labels["file"],
                "LABEL_FIELD": "nosuchfield",
                **TINY,
                "OUTPUT": str(workdir / "never.kdmsi"),
            },
        )
    assert not (workdir / "never.kdmsi").exists()


def test_engine_errors_name_the_dialogs_field(plugin, taizhou, weak_labels, workdir) -> None:
    """The engine names the parameter it refuses (``bands``); the dialog names its field."""
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="out of range") as caught:
        run(
            "trainmodel",
            {
                "BEFORE": taizhou["before"],
                "AFTER": taizhou["after"],
                "LABELS": weak_labels["file"],
                "LABEL_FIELD": "change",
                **TINY,
                "BANDS": "1,2,42",
                "OUTPUT": str(workdir / "never.kdmsi"),
            },
        )
    assert "(see: Bands" in str(caught.value) and "--bands" not in str(caught.value)
    assert not (workdir / "never.kdmsi").exists()


def test_dialog_style_run_loads_styled_output_into_the_group(plugin, taizhou, workdir) -> None:
    """As from the toolbox: the output is loaded, styled from resources/styles, in our group."""
    import processing
    from qgis.core import QgsProject

    result = processing.runAndLoadResults(
        "kdmsi:labellinggrid",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "TILE_SIZE": 64,
            "OUTPUT": str(workdir / "loaded_grid.gpkg"),
        },
    )
    project = QgsProject.instance()
    group = project.layerTreeRoot().findGroup("KD-MSI")
    assert group is not None
    (node,) = [n for n in group.findLayers() if n.layer().source().startswith(result["OUTPUT"])]
    layer = node.layer()
    assert layer.isValid() and layer.crs().authid() == CRS
    assert layer.renderer().type() == "categorizedSymbol"
    project.removeMapLayer(layer.id())
    project.layerTreeRoot().removeChildNode(group)
