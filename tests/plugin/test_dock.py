"""The dock widget driven from code: it runs the Processing algorithms of the toolbox in
Processing's task runner, results appear in the project, and a first session does not trip."""

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
    project.addMapLayers([after, before, labels])  # not in date order on purpose
    yield {"before": before, "after": after, "labels": labels}
    project.removeAllMapLayers()
    project.layerTreeRoot().removeAllChildren()


@pytest.fixture(scope="module")
def dock(plugin, project_layers, tmp_path_factory):
    dock = plugin.ensure_dock()
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


def visible(layer) -> bool:
    from qgis.core import QgsProject

    return QgsProject.instance().layerTreeRoot().findLayer(layer.id()).isVisible()


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


def last_log_line(dock) -> str:
    return dock.log_view.toPlainText().splitlines()[-1]


def test_dock_starts_on_two_dates_in_order(dock, iface, project_layers) -> None:
    assert dock in iface.docks
    # added after, before: the dock still offers 2000 as before and 2003 as after
    assert dock.before_combo.currentLayer().id() == project_layers["before"].id()
    assert dock.after_combo.currentLayer().id() == project_layers["after"].id()
    assert dock.field_combo.currentField() == "change"
    assert dock.labels_combo.currentLayer().name() == "weak labels"


def test_run_chain_dialog_starts_on_two_dates(dock, project_layers) -> None:
    from qgis.core import QgsApplication

    chain = QgsApplication.processingRegistry().createAlgorithmById("kdmsi:runchain")
    before = chain.parameterDefinition("BEFORE").defaultValue()
    after = chain.parameterDefinition("AFTER").defaultValue()
    assert (before, after) == (project_layers["before"].id(), project_layers["after"].id())
    assert "efficientnet-lite0" in chain.shortHelpString()
    assert "resnet18" not in chain.shortHelpString()


def test_dock_creates_the_labelling_grid_in_a_processing_task(dock, project_layers) -> None:
    from qgis.core import QgsApplication, QgsProcessingAlgRunnerTask

    ticks = []
    runner_tasks = []
    started = time.monotonic()
    dock.grid_button.click()
    # the interface keeps running while Processing's task runner runs the algorithm
    while dock.is_running():
        QgsApplication.processEvents()
        runner_tasks += [
            t
            for t in QgsApplication.taskManager().activeTasks()
            if isinstance(t, QgsProcessingAlgRunnerTask)
        ]
        ticks.append(time.monotonic())
        time.sleep(0.02)
        assert time.monotonic() - started < 120
    result = dock.last_result
    assert result.success, result.error
    assert runner_tasks, "the dock should run the algorithm through QgsProcessingAlgRunnerTask"
    assert result.outputs["grid"]["OUTPUT"].endswith("labelling_grid.gpkg")
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 1.0
    layers = group_layers("KD-MSI: taizhou 2000")
    grid = layers["Labelling grid"]
    assert grid.isValid() and grid.crs().authid() == "EPSG:32651"
    assert grid.renderer().type() == "categorizedSymbol"  # styled from resources/styles
    assert dock.progress_bar.value() == 100
    # the analyst labels the new grid next: the dock offers it as the weak-label layer
    assert dock.labels_combo.currentLayer().id() == grid.id()
    dock.labels_combo.setLayer(project_layers["labels"])
    dock.field_combo.setField("change")


def test_existing_outputs_need_the_replace_box(dock) -> None:
    assert not dock.overwrite_check.isChecked()
    dock.grid_button.click()
    assert not dock.is_running()
    message = last_log_line(dock)
    assert "labelling_grid.gpkg already exists" in message
    assert "Replace existing outputs" in message and "--overwrite" not in message


def test_dock_reports_bad_input_in_the_log(dock) -> None:
    previous = dock.output_widget.filePath()
    dock.output_widget.setFilePath("")
    try:
        dock.grid_button.click()
        assert not dock.is_running()
        assert "output folder" in last_log_line(dock)
    finally:
        dock.output_widget.setFilePath(previous)


def test_threshold_box_takes_rules_and_numbers(dock) -> None:
    for text, expected in (("auto", "auto"), ("otsu", "otsu"), (" 0.3 ", "0.3")):
        dock.threshold_combo.setCurrentText(text)
        assert dock._threshold() == expected
    dock.threshold_combo.setCurrentText("half")
    try:
        dock.train_button.click()
        assert not dock.is_running()
        assert "threshold 'half'" in last_log_line(dock)
    finally:
        dock.threshold_combo.setCurrentText("unchanged-q")


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
    report = result.outputs["env"]
    assert report["python"] == sys.executable and report["ok"], report
    assert report["torch"].startswith("2.") and report["device"] == "cpu"
    assert report["rasterio"] and report["gdal"].startswith("3.")
    text = dock.log_view.toPlainText()
    assert "torch: 2." in text and "Device: cpu" in text and "GPU:" in text
    assert dock.progress_bar.value() == 100


def test_failed_environment_check_is_one_line_and_does_not_linger(dock, iface, monkeypatch):
    """A failed check: the bar is not full, the long report stays in the log (the stage label
    keeps one short line, the fields keep their size), and the next message replaces the
    warning instead of letting it come back later."""
    from qgis.PyQt.QtWidgets import QScrollArea

    monkeypatch.setenv("KDMSI_PYTHON", "/nonexistent/python3")
    heights = {w: w.height() for w in (dock.tile_spin, dock.output_widget, dock.threshold_combo)}
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        dock.python_widget.blockSignals(True)  # not into the user's settings
        dock.python_widget.setFilePath("/nonexistent/python3")
        dock.env_button.click()
        wait_for(lambda: bool(finished), 60)
    finally:
        dock.jobFinished.disconnect(finished.append)
        dock.python_widget.setFilePath(sys.executable)
        dock.python_widget.blockSignals(False)
    assert not finished[0].success
    assert dock.progress_bar.value() == 0
    assert "\n" not in dock.stage_label.text() and len(dock.stage_label.text()) <= 110
    assert "nonexistent" in dock.stage_label.toolTip()
    # one line high whatever it says, and the fields in a scroll area keep their height
    assert dock.stage_label.sizeHint().height() < 2 * dock.stage_label.fontMetrics().lineSpacing()
    assert isinstance(dock.widget(), QScrollArea) and dock.widget().widgetResizable()
    for widget, height in heights.items():
        assert widget.height() == height
    bar = iface.messageBar()
    assert len(bar.items()) == 1
    dock._message("a later message", warning=False)
    assert len(bar.items()) == 1  # the old warning is gone, not waiting under the new one


def test_dock_cancel_keeps_a_checkpoint_and_offers_resume(dock) -> None:
    folder = Path(dock.output_widget.filePath()) / "training"
    checkpoint = folder / "student.kdmsi.ckpt"
    finished: list = []
    dock.jobFinished.connect(finished.append)
    dock.epochs_spin.setValue(500)
    try:
        dock.train_button.click()
        wait_for(checkpoint.is_file, 120)  # at least one epoch done
        dock.cancel_button.click()
        cancelled_at = time.monotonic()
        wait_for(lambda: bool(finished), 30)
        assert time.monotonic() - cancelled_at < 10
        result = finished.pop()
        assert result.cancelled and not result.success and result.step == "train"
        assert not (folder / "student.kdmsi").exists()
        assert [p.name for p in folder.iterdir()] == ["student.kdmsi.ckpt"]
        # the dock says where the checkpoint is and offers to go on from it
        assert dock.resume_box.isVisibleTo(dock)
        assert "training/student.kdmsi.ckpt" in dock.resume_label.text()
        assert dock.train_button.isEnabled() and dock.resume_button.isEnabled()
        dock.resume_button.click()
        wait_for(lambda: "resuming from" in dock.log_view.toPlainText(), 120)
        dock.cancel_button.click()
        wait_for(lambda: bool(finished), 30)
        assert finished[0].cancelled
    finally:
        dock.jobFinished.disconnect(finished.append)
        dock.epochs_spin.setValue(1)
    dock.discard_button.click()
    assert not checkpoint.exists() and not dock.resume_box.isVisibleTo(dock)


@pytest.mark.slow
def test_dock_run_all_shows_the_answer_first(dock, project_layers) -> None:
    dock.labels_combo.setLayer(project_layers["labels"])
    dock.field_combo.setField("change")
    result = run_step(dock, dock.run_button, 400)
    assert result.success, result.error
    assert set(result.outputs["run"]) >= {"CHANGE", "CHANGES", "PROBABILITY", "PSEUDO_LABELS"}
    layers = group_layers("KD-MSI: taizhou 2000")
    for name in ("Change probability", "Change", "Change polygons"):
        assert name in layers, name
        assert layers[name].isValid() and layers[name].crs().authid() == "EPSG:32651"
    assert layers["Change probability"].renderer().type() == "singlebandpseudocolor"
    assert layers["Change"].renderer().type() == "paletted"
    # the answer on, the intermediate layers there but off
    assert visible(layers["Change polygons"]) and visible(layers["Change probability"])
    intermediate = (
        "MSI change probability (KD-MSI)",
        "Pseudo labels",
        "Calibrated change vector analysis",
        "Change",
    )
    for name in intermediate:
        assert name in layers and not visible(layers[name]), name
    assert visible(project_layers["after"])
    # the trust report: agreement with the weak labels, in the log, which shows its end
    assert "agrees with" in dock.log_view.toPlainText()
    assert 0 <= result.outputs["trust"]["tile_agreement"] <= 1
    bar = dock.log_view.verticalScrollBar()
    assert bar.maximum() > 0 and bar.value() == bar.maximum()
    assert dock.log_view.minimumHeight() >= 12 * dock.log_view.fontMetrics().lineSpacing()
    names = [n.layer().name() for n in _group("KD-MSI: taizhou 2000").findLayers()]
    assert names.index("Change polygons") < names.index("Change probability")
    assert not dock.resume_box.isVisibleTo(dock)  # finished trainings leave no checkpoint


@pytest.mark.slow
def test_tiles_to_label_next_after_run_all_rank_on_the_runs_map(dock, tmp_path) -> None:
    """After Run all the suggestions come from the run's change map at the run's own
    threshold (its run.json), not from a preview."""
    from kdmsi_engine.suggest import suggest_tiles

    run_map = Path(dock.output_widget.filePath()) / "run" / "change_probability.tif"
    assert run_map.is_file()
    # every tile of the crop is labelled: the engine's refusal reaches the dock
    result = run_step(dock, dock.suggest_button, 120)
    assert not result.success and "nothing left to suggest" in result.error
    labels = dock.labels_combo.currentLayer()
    dock.labels_combo.setLayer(None)  # no labels: every tile is a candidate
    default_count = dock.suggest_count_spin.value()
    dock.suggest_count_spin.setValue(3)
    try:
        result = run_step(dock, dock.suggest_button, 120)
    finally:
        dock.labels_combo.setLayer(labels)
        dock.field_combo.setField("change")
        dock.suggest_count_spin.setValue(default_count)
    assert result.success, result.error
    assert list(result.outputs) == ["suggest"]  # no preview made: the run's map is there
    assert "from the change map of Run all (change_probability.tif)" in (
        dock.log_view.toPlainText()
    )
    assert not (Path(dock.output_widget.filePath()) / "preview").exists()
    engine = suggest_tiles(run_map, tmp_path / "next.gpkg", count=3, tile_size=64)
    assert engine["threshold_method"] == "run"
    layer = dock.suggestions_layer
    ranked = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])
    assert [feature["tile_id"] for feature in ranked] == engine["tiles"]
    assert group_layers("KD-MSI: taizhou 2000")["Tiles to label next"] is layer


def test_dock_detects_with_the_detector_of_the_run(dock) -> None:
    model = Path(dock.model_widget.filePath())
    assert model.name == "detector.kdmsi" and model.is_file()  # set by Run all
    result = run_step(dock, dock.detect_button, 200)
    assert result.success, result.error
    assert Path(result.outputs["detect"]["CHANGE"]).parent.name == "detection"
    layers = group_layers("KD-MSI: taizhou 2000")
    assert Path(layers["Change"].source()).parent.name == "detection"  # replaced, not doubled
    names = [n.layer().name() for n in _group("KD-MSI: taizhou 2000").findLayers()]
    assert names.count("Change") == 1


def _group(name: str):
    from qgis.core import QgsProject

    return QgsProject.instance().layerTreeRoot().findGroup(name)
