"""The dock widget driven from code: set layers, run steps, results appear in the project."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from qgis_env import wait_for


@pytest.fixture(scope="module")
def project_layers(plugin, taizhou, weak_labels):
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

    project = QgsProject.instance()
    before = QgsRasterLayer(taizhou["before"], "taizhou 2000", "gdal")
    after = QgsRasterLayer(taizhou["after"], "taizhou 2003", "gdal")
    labels = QgsVectorLayer(weak_labels["file"], "weak labels", "ogr")
    assert before.isValid() and after.isValid() and labels.isValid()
    project.addMapLayers([before, after, labels])
    yield {"before": before, "after": after, "labels": labels}
    project.removeAllMapLayers()
    project.layerTreeRoot().removeAllChildren()


@pytest.fixture(scope="module")
def dock(plugin, project_layers, tmp_path_factory):
    dock = plugin.ensure_dock()
    dock.before_combo.setLayer(project_layers["before"])
    dock.after_combo.setLayer(project_layers["after"])
    dock.labels_combo.setLayer(project_layers["labels"])
    dock.field_combo.setField("change")
    dock.output_widget.setFilePath(str(tmp_path_factory.mktemp("dock")))
    dock.tile_spin.setValue(64)
    dock.backbone_combo.setCurrentText("resnet18")
    dock.weights_combo.setCurrentText("none")
    dock.epochs_spin.setValue(1)
    dock.detector_epochs_spin.setValue(1)
    dock.device_combo.setCurrentText("cpu")
    dock.scales_edit.setText("1")
    return dock


def group_layers(name: str) -> dict[str, object]:
    from qgis.core import QgsProject

    group = QgsProject.instance().layerTreeRoot().findGroup(name)
    assert group is not None, f"no layer group {name}"
    return {node.layer().name(): node.layer() for node in group.findLayers()}


def run_step(dock, button, timeout: float = 240.0):
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        button.click()
        assert dock.is_running()
        assert not button.isEnabled() and dock.cancel_button.isEnabled()
        wait_for(lambda: bool(finished), timeout)
    finally:
        dock.jobFinished.disconnect(finished.append)
    return finished[0]


def test_dock_is_in_the_main_window(dock, iface) -> None:
    assert dock in iface.docks
    assert dock.field_combo.currentField() == "change"
    assert dock.labels_combo.currentLayer().name() == "weak labels"


def test_dock_creates_the_labelling_grid_without_blocking(dock, project_layers) -> None:
    from qgis.core import QgsApplication

    ticks = []
    started = time.monotonic()
    dock.grid_button.click()
    # the interface keeps running while the worker works
    while dock.is_running():
        QgsApplication.processEvents()
        ticks.append(time.monotonic())
        time.sleep(0.02)
        assert time.monotonic() - started < 120
    result = dock.last_result
    assert result.success, result.error
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 1.0
    layers = group_layers("KD-MSI: taizhou 2000")
    grid = layers["Labelling grid"]
    assert grid.isValid() and grid.crs().authid() == "EPSG:32651"
    assert grid.renderer().type() == "categorizedSymbol"  # styled from resources/styles
    assert dock.progress_bar.value() == 100
    # the analyst labels the new grid next: the dock offers it as the weak-label layer
    assert dock.labels_combo.currentLayer().id() == grid.id()


def test_dock_reports_bad_input_in_the_log(dock) -> None:
    previous = dock.output_widget.filePath()
    dock.output_widget.setFilePath("")
    try:
        dock.grid_button.click()
        assert not dock.is_running()
        assert "output folder" in dock.log_view.toPlainText().splitlines()[-1]
    finally:
        dock.output_widget.setFilePath(previous)


def test_menu_action_checks_the_environment(dock, iface) -> None:
    (action,) = [
        a for acts in iface.menus.values() for a in acts if a.text() == "Check environment"
    ]
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        action.trigger()
        assert dock.is_running() and not dock.env_button.isEnabled()
        wait_for(lambda: bool(finished), 120)
    finally:
        dock.jobFinished.disconnect(finished.append)
    result = finished[0]
    assert result.success, result.error
    report = result.result
    assert report["python"] == sys.executable and report["ok"], report
    assert report["torch"].startswith("2.") and report["device"] == "cpu"
    assert report["rasterio"] and report["gdal"].startswith("3.")
    text = dock.log_view.toPlainText()
    assert "torch: 2." in text and "Device: cpu" in text and "GPU:" in text


def test_dock_cancel_stops_training(dock) -> None:
    finished: list = []
    dock.jobFinished.connect(finished.append)
    dock.epochs_spin.setValue(500)
    try:
        dock.train_button.click()
        wait_for(lambda: dock.stage_label.text().split(":")[0] not in ("Train", ""), 120)
        dock.cancel_button.click()
        cancelled_at = time.monotonic()
        wait_for(lambda: bool(finished), 30)
        assert time.monotonic() - cancelled_at < 10
    finally:
        dock.jobFinished.disconnect(finished.append)
        dock.epochs_spin.setValue(1)
    result = finished[0]
    assert result.cancelled and not result.success
    folder = Path(dock.output_widget.filePath()) / "training"
    assert not (folder / "student.kdmsi").exists()
    assert [p.name for p in folder.iterdir() if "ckpt" not in p.name] == []
    assert dock.train_button.isEnabled()


@pytest.mark.slow
def test_dock_run_all_puts_styled_results_in_one_group(dock, project_layers) -> None:
    dock.labels_combo.setLayer(project_layers["labels"])
    dock.field_combo.setField("change")
    result = run_step(dock, dock.run_button, 400)
    assert result.success, result.error
    layers = group_layers("KD-MSI: taizhou 2000")
    for name in ("Change probability", "Change", "Change polygons"):
        assert name in layers, name
        assert layers[name].isValid() and layers[name].crs().authid() == "EPSG:32651"
    assert layers["Change probability"].renderer().type() == "singlebandpseudocolor"
    assert layers["Change"].renderer().type() == "paletted"
    assert "MSI change probability (KD-MSI)" in layers and "Pseudo labels" in layers
    assert "Calibrated change vector analysis" in layers
    # the trust report: agreement with the weak labels, in the log
    assert "agrees with" in dock.log_view.toPlainText()
    assert 0 <= result.result["trust"]["tile_agreement"] <= 1
    names = [n.layer().name() for n in _group("KD-MSI: taizhou 2000").findLayers()]
    assert (
        names.index("Change polygons") < names.index("Change") < names.index("Change probability")
    )


def test_dock_detects_with_the_detector_of_the_run(dock) -> None:
    model = Path(dock.model_widget.filePath())
    assert model.name == "detector.kdmsi" and model.is_file()  # set by Run all
    result = run_step(dock, dock.detect_button, 200)
    assert result.success, result.error
    assert Path(result.result["change"]).parent.name == "detection"
    layers = group_layers("KD-MSI: taizhou 2000")
    assert Path(layers["Change"].source()).parent.name == "detection"  # replaced, not doubled
    names = [n.layer().name() for n in _group("KD-MSI: taizhou 2000").findLayers()]
    assert names.count("Change") == 1


def _group(name: str):
    from qgis.core import QgsProject

    return QgsProject.instance().layerTreeRoot().findGroup(name)
