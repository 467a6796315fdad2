"""The plugin reads the engine's defaults (one source): the Processing algorithms' parameters
and the dock's fields start at the values ``kdmsi run`` uses; and the quick change preview
(change vector analysis, no training) runs from the toolbox and from the dock."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from qgis_env import run_algorithm, wait_for


def _default(algorithm, name: str):
    return algorithm.parameterDefinition(name).defaultValue()


def test_plugin_loads_the_engines_defaults(plugin) -> None:
    from kdmsi_engine import defaults
    from kdmsi_qgis.contract import D

    names = [n for n in dir(defaults) if n.isupper()]
    assert names and all(getattr(D, n) == getattr(defaults, n) for n in names)


def test_algorithms_start_at_the_engines_defaults(plugin) -> None:
    from qgis.core import QgsApplication

    from kdmsi_engine import defaults as d

    registry = QgsApplication.processingRegistry()
    chain = registry.algorithmById("kdmsi:runchain")
    assert _default(chain, "EPOCHS") == d.KD_EPOCHS
    assert _default(chain, "DETECTOR_EPOCHS") == d.DETECTOR_EPOCHS
    assert _default(chain, "TILE_SIZE") == d.TILE_SIZE
    assert _default(chain, "SCALES") == d.MSI_SCALES_TEXT
    assert _default(chain, "THRESHOLD") == d.PSEUDO_THRESHOLD
    assert _default(chain, "KEEP_LABELS_OUT") is d.KEEP_UNCHANGED_OUT
    backbones = chain.parameterDefinition("BACKBONE").options()
    assert backbones[_default(chain, "BACKBONE")] == d.BACKBONE
    sources = chain.parameterDefinition("PSEUDO_SOURCE").options()
    assert sources[_default(chain, "PSEUDO_SOURCE")] == d.PSEUDO_SOURCE
    weights = chain.parameterDefinition("WEIGHTS").options()
    assert weights[_default(chain, "WEIGHTS")] == d.WEIGHTS_DEFAULT
    train = registry.algorithmById("kdmsi:trainmodel")
    assert (_default(train, "EPOCHS"), _default(train, "LEARNING_RATE")) == (d.KD_EPOCHS, d.KD_LR)
    detector = registry.algorithmById("kdmsi:traindetector")
    assert _default(detector, "EPOCHS") == d.DETECTOR_EPOCHS
    assert _default(detector, "LEARNING_RATE") == d.DETECTOR_LR
    pseudo = registry.algorithmById("kdmsi:pseudolabels")
    assert _default(pseudo, "THRESHOLD") == d.PSEUDO_THRESHOLD
    preview = registry.algorithmById("kdmsi:quickpreview")
    assert _default(preview, "THRESHOLD") == d.CVA_THRESHOLD


def test_a_new_dock_starts_at_the_engines_defaults(plugin) -> None:
    from kdmsi_engine import defaults as d
    from kdmsi_qgis.dock import KdmsiDock

    dock = KdmsiDock()
    try:
        assert dock.backbone_combo.currentText() == d.BACKBONE
        assert dock.weights_combo.currentText() == d.WEIGHTS_DEFAULT
        assert dock.epochs_spin.value() == d.KD_EPOCHS
        assert dock.detector_epochs_spin.value() == d.DETECTOR_EPOCHS
        assert dock.tile_spin.value() == d.TILE_SIZE
        assert dock.scales_edit.text() == d.MSI_SCALES_TEXT
        assert dock.source_combo.currentText() == d.PSEUDO_SOURCE
        assert dock.threshold_combo.currentText() == d.PSEUDO_THRESHOLD
    finally:
        dock.deleteLater()


def test_quick_preview_algorithm(plugin, taizhou, tmp_path: Path) -> None:
    from osgeo import gdal

    result = run_algorithm(
        "quickpreview",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "OUTPUT": str(tmp_path / "cva.tif"),
            "CHANGE": str(tmp_path / "cva_change.tif"),
        },
    )
    magnitude = gdal.Open(result["OUTPUT"]).ReadAsArray()
    change = gdal.Open(result["CHANGE"]).ReadAsArray()
    assert 0 <= magnitude.min() and magnitude.max() <= 1
    assert 0 < result["THRESHOLD_USED"] < 1
    np.testing.assert_array_equal(change, (magnitude > result["THRESHOLD_USED"]).astype(np.uint8))


def test_dock_quick_preview_shows_both_layers(plugin, taizhou, tmp_path: Path) -> None:
    from qgis.core import QgsProject, QgsRasterLayer

    project = QgsProject.instance()
    before = QgsRasterLayer(taizhou["before"], "preview before", "gdal")
    after = QgsRasterLayer(taizhou["after"], "preview after", "gdal")
    project.addMapLayers([before, after])
    dock = plugin.ensure_dock()
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        dock.before_combo.setLayer(before)
        dock.after_combo.setLayer(after)
        dock.output_widget.setFilePath(str(tmp_path))
        dock.preview_button.click()
        wait_for(lambda: bool(finished), 120)
        assert finished[0].success, finished[0].error
        group = project.layerTreeRoot().findGroup("KD-MSI: preview before")
        names = {node.layer().name() for node in group.findLayers()}
        assert {
            "Quick change preview (CVA, no training)",
            "Quick change preview: change (Otsu)",
        } <= names
        assert (tmp_path / "preview" / "cva_change.tif").is_file()
    finally:
        dock.jobFinished.disconnect(finished.append)
        group = project.layerTreeRoot().findGroup("KD-MSI: preview before")
        if group is not None:
            project.removeMapLayers([node.layerId() for node in group.findLayers()])
            project.layerTreeRoot().removeChildNode(group)
        project.removeMapLayers([before.id(), after.id()])


def test_a_new_dock_fits_the_images_of_the_project(plugin, repo_root, shared_data, tmp_path):
    """A first session on the sample: before and after on the two dates (not the same layer),
    64 px tiles for 30 m Landsat (the engine's 256 px would give four tiles, all touching a
    change), and small tiles for a 256 px aerial chip; a tile size the user set stays."""
    from qgis.core import QgsProject, QgsRasterLayer

    from kdmsi_engine import defaults as d
    from kdmsi_qgis.dock import KdmsiDock, suggested_tile_size

    sample = tmp_path / "sample"  # a copy: QGIS writes .aux.xml statistics beside rasters
    shutil.copytree(repo_root / "resources" / "sample", sample)
    project = QgsProject.instance()
    after = QgsRasterLayer(str(sample / "taizhou_2003.tif"), "taizhou_2003", "gdal")
    before = QgsRasterLayer(str(sample / "taizhou_2000.tif"), "taizhou_2000", "gdal")
    project.addMapLayers([after, before])
    dock = KdmsiDock()
    try:
        assert dock.before_combo.currentLayer().id() == before.id()
        assert dock.after_combo.currentLayer().id() == after.id()
        assert dock.tile_spin.value() == d.COARSE_TILE_SIZE == 64
        assert dock.backbone_combo.currentText() == d.BACKBONE == "auto"
        dock.tile_spin.setValue(128)
        dock.before_combo.setLayer(after)
        dock.before_combo.setLayer(before)
        assert dock.tile_spin.value() == 128
    finally:
        dock.shutdown()
        dock.deleteLater()
        project.removeMapLayers([before.id(), after.id()])
    chip = QgsRasterLayer(
        str(shared_data / "levir-cd-samples" / "A" / "test_2_0000_0000.png"), "chip"
    )
    assert chip.isValid() and chip.width() == 256
    assert suggested_tile_size(chip) == 64  # 256 px would be one tile, 128 px two a side
