"""The KD-MSI dock widget: pick the image pair and weak labels, run a step, see the results.

Every step runs as an :class:`~kdmsi_qgis.tasks.EngineTask` (the engine in a worker process),
so the interface never freezes; progress, stage and log lines arrive through signals; Cancel
ends the worker. Results are added to the project in one layer group, styled from
``resources/styles``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsFieldProxyModel,
    QgsMapLayerProxyModel,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QCoreApplication, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from kdmsi_qgis import envcheck, layers, settings, worker
from kdmsi_qgis.algorithms.base import BACKBONES, WEIGHTS
from kdmsi_qgis.algorithms.maps import threshold_argument
from kdmsi_qgis.contract import D
from kdmsi_qgis.tasks import EngineTask

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda:0")


@dataclass
class Step:
    """One engine command of a dock action."""

    command: str
    arguments: list[str]
    device: bool = True


#: The steps of a dock action and the ``(kind, path)`` outputs to show when all succeeded.
Plan = tuple[list[Step], list[tuple[str, str]]]


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiDock", text)


class KdmsiDock(QDockWidget):
    """The panel. ``iface`` may be ``None`` (tests): messages then go to the log only.

    Signals:
        jobFinished: the :class:`kdmsi_qgis.worker.EngineResult` of the step that ended.
    """

    jobFinished = pyqtSignal(object)  # noqa: N815 (Qt naming)

    def __init__(self, iface: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(tr("KD-MSI change detection"), parent)
        self.setObjectName("KdmsiDock")
        self.iface = iface
        self.task: EngineTask | None = None
        self.last_result: worker.EngineResult | None = None
        self._build()
        self._set_running(False)

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        body = QWidget(self)
        column = QVBoxLayout(body)

        data = QGroupBox(tr("Images and weak labels"), body)
        form = QFormLayout(data)
        self.before_combo = QgsMapLayerComboBox(data)
        self.before_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.after_combo = QgsMapLayerComboBox(data)
        self.after_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.labels_combo = QgsMapLayerComboBox(data)
        self.labels_combo.setFilters(
            QgsMapLayerProxyModel.Filter.PolygonLayer | QgsMapLayerProxyModel.Filter.PointLayer
        )
        self.labels_combo.setAllowEmptyLayer(True)
        self.field_combo = QgsFieldComboBox(data)
        self.field_combo.setFilters(QgsFieldProxyModel.Filter.Numeric)
        self.labels_combo.layerChanged.connect(self._labels_changed)
        self._labels_changed(self.labels_combo.currentLayer())
        form.addRow(tr("Before (date 1)"), self.before_combo)
        form.addRow(tr("After (date 2)"), self.after_combo)
        form.addRow(tr("Weak labels"), self.labels_combo)
        form.addRow(tr("Label field"), self.field_combo)
        column.addWidget(data)

        options = QGroupBox(tr("Model and options"), body)
        form = QFormLayout(options)
        self.model_widget = QgsFileWidget(options)
        self.model_widget.setFilter("KD-MSI model (*.kdmsi)")
        self.model_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.backbone_combo = QComboBox(options)
        self.backbone_combo.addItems(list(BACKBONES))
        self.weights_combo = QComboBox(options)
        self.weights_combo.addItems(list(WEIGHTS))
        self.epochs_spin = QSpinBox(options)
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(D.KD_EPOCHS)
        self.detector_epochs_spin = QSpinBox(options)
        self.detector_epochs_spin.setRange(1, 1000)
        self.detector_epochs_spin.setValue(D.DETECTOR_EPOCHS)
        self.device_combo = QComboBox(options)
        self.device_combo.setEditable(True)
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.setCurrentText(settings.saved_device())
        self.tile_spin = QSpinBox(options)
        self.tile_spin.setRange(32, 4096)
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setValue(D.TILE_SIZE)
        self.scales_edit = QLineEdit(D.MSI_SCALES_TEXT, options)
        self.source_combo = QComboBox(options)
        self.source_combo.addItems(list(D.PSEUDO_SOURCES))
        self.source_combo.setCurrentText(D.PSEUDO_SOURCE)
        # a number or a rule that needs no pixel truth (unchanged-q, otsu, auto)
        self.threshold_combo = QComboBox(options)
        self.threshold_combo.setEditable(True)
        self.threshold_combo.addItems(list(D.PSEUDO_THRESHOLDS))
        self.threshold_combo.setCurrentText(D.PSEUDO_THRESHOLD)
        self.output_widget = QgsFileWidget(options)
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.overwrite_check = QCheckBox(tr("Replace existing outputs"), options)
        form.addRow(tr("Model file"), self.model_widget)
        form.addRow(tr("Backbone"), self.backbone_combo)
        form.addRow(tr("Start weights"), self.weights_combo)
        form.addRow(tr("KD-MSI epochs"), self.epochs_spin)
        form.addRow(tr("Detector epochs"), self.detector_epochs_spin)
        form.addRow(tr("Device"), self.device_combo)
        form.addRow(tr("Tile size"), self.tile_spin)
        form.addRow(tr("MSI scales"), self.scales_edit)
        form.addRow(tr("Pseudo labels from"), self.source_combo)
        form.addRow(tr("Pseudo-label threshold"), self.threshold_combo)
        form.addRow(tr("Output folder"), self.output_widget)
        form.addRow("", self.overwrite_check)
        column.addWidget(options)

        engine = QGroupBox(tr("Engine"), body)
        form = QFormLayout(engine)
        self.python_widget = QgsFileWidget(engine)
        self.python_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.python_widget.setFilePath(settings.python_executable())
        self.python_widget.fileChanged.connect(settings.set_python_executable)
        self.env_button = QPushButton(tr("Check environment"), engine)
        self.env_button.clicked.connect(self.check_environment)
        form.addRow(tr("Python"), self.python_widget)
        form.addRow("", self.env_button)
        column.addWidget(engine)

        buttons = QHBoxLayout()
        self.preview_button = QPushButton(tr("Quick preview"), body)
        self.preview_button.setToolTip(
            tr("Quick change preview (no training): change vector analysis with Otsu's threshold")
        )
        self.preview_button.clicked.connect(self.quick_preview)
        self.grid_button = QPushButton(tr("Labelling grid"), body)
        self.grid_button.setToolTip(
            tr("Write the tile grid to label as changed (1) / unchanged (0)")
        )
        self.train_button = QPushButton(tr("Train"), body)
        self.train_button.setToolTip(tr("Train the KD-MSI model on the weak labels"))
        self.detect_button = QPushButton(tr("Detect"), body)
        self.detect_button.setToolTip(tr("Detect changes with the model file"))
        self.run_button = QPushButton(tr("Run all"), body)
        self.run_button.setToolTip(tr("Weak labels to change polygons: the whole chain"))
        self.step_buttons = (
            self.preview_button,
            self.grid_button,
            self.train_button,
            self.detect_button,
            self.run_button,
        )
        for button in self.step_buttons:
            buttons.addWidget(button)
        self.grid_button.clicked.connect(self.create_grid)
        self.train_button.clicked.connect(self.train)
        self.detect_button.clicked.connect(self.detect)
        self.run_button.clicked.connect(self.run_all)
        column.addLayout(buttons)

        status = QHBoxLayout()
        self.progress_bar = QProgressBar(body)
        self.progress_bar.setRange(0, 100)
        self.cancel_button = QPushButton(tr("Cancel"), body)
        self.cancel_button.clicked.connect(self.cancel)
        status.addWidget(self.progress_bar)
        status.addWidget(self.cancel_button)
        column.addLayout(status)
        self.stage_label = QLabel(tr("Ready"), body)
        self.stage_label.setWordWrap(True)
        column.addWidget(self.stage_label)
        self.log_view = QPlainTextEdit(body)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        column.addWidget(self.log_view, 1)
        self.setWidget(body)

    def _labels_changed(self, layer: Any) -> None:
        self.field_combo.setLayer(layer)
        if layer is not None and layer.fields().indexFromName("change") >= 0:
            self.field_combo.setField("change")

    # ------------------------------------------------------------------ inputs

    def _scene(self) -> list[str]:
        before = self.before_combo.currentLayer()
        after = self.after_combo.currentLayer()
        if not isinstance(before, QgsRasterLayer) or not isinstance(after, QgsRasterLayer):
            raise QgsProcessingException(tr("choose the before and after raster layers"))
        if before.id() == after.id():
            raise QgsProcessingException(tr("before and after are the same layer; pick two dates"))
        return [
            layers.raster_source(before, tr("Before image")),
            layers.raster_source(after, tr("After image")),
        ]

    def _labels(self) -> list[str]:
        layer = self.labels_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            raise QgsProcessingException(
                tr("choose a weak-label layer (make one with 'Labelling grid')")
            )
        field = self.field_combo.currentField()
        if not field:
            raise QgsProcessingException(tr("choose the label field (1 changed, 0 unchanged)"))
        return ["--labels", layers.vector_source(layer, tr("Weak labels")), "--label-field", field]

    def _output_folder(self) -> Path:
        text = self.output_widget.filePath().strip()
        if not text:
            raise QgsProcessingException(tr("choose an output folder"))
        folder = Path(text)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QgsProcessingException(
                tr("cannot create the output folder {}: {}").format(folder, exc.strerror)
            ) from exc
        return folder

    def _training(self, epochs: QSpinBox | None = None) -> list[str]:
        return [
            "--backbone",
            self.backbone_combo.currentText(),
            "--weights",
            self.weights_combo.currentText(),
            "--epochs",
            str((epochs or self.epochs_spin).value()),
            "--tile-size",
            str(self.tile_spin.value()),
        ]

    def _threshold(self) -> str:
        return threshold_argument(self.threshold_combo.currentText(), D.PSEUDO_THRESHOLDS)

    def device(self) -> str:
        return self.device_combo.currentText().strip() or "auto"

    def group_name(self) -> str:
        before = self.before_combo.currentLayer()
        return f"KD-MSI: {before.name()}" if before is not None else "KD-MSI"

    # ------------------------------------------------------------------ steps

    def quick_preview(self) -> None:
        """Change vector analysis with Otsu's threshold: what differs, in seconds."""

        def build() -> Plan:
            folder = self._output_folder() / "preview"
            magnitude = str(folder / "cva.tif")
            change = str(folder / "cva_change.tif")
            arguments = self._scene() + ["-o", magnitude, "--change", change]
            arguments += ["--threshold", D.CVA_THRESHOLD]
            return [Step("cva", arguments, device=False)], [
                ("preview", magnitude),
                ("preview_change", change),
            ]

        self._start(tr("Quick preview"), build, folder_name="preview")

    def create_grid(self) -> None:
        def build() -> Plan:
            output = str(self._output_folder() / "labelling_grid.gpkg")
            arguments = self._scene() + ["-o", output, "--tile-size", str(self.tile_spin.value())]
            return [Step("grid", arguments, device=False)], [("grid", output)]

        self._start(tr("Labelling grid"), build)

    def train(self) -> None:
        """KD-MSI model, MSI map, pseudo labels and the change detector, one after the other."""

        def build() -> Plan:
            folder = self._output_folder() / "training"
            scene = self._scene()
            labels = self._labels()
            student = str(folder / "student.kdmsi")
            msi = str(folder / "msi_probability.tif")
            pseudo = str(folder / "pseudo_labels.tif")
            detector = str(folder / "detector.kdmsi")
            scales = self.scales_edit.text().replace(" ", "")
            steps = [
                Step("train", scene + labels + ["-o", student] + self._training()),
                Step("infer", scene + ["--model", student, "-o", msi, "--scales", scales]),
                Step(
                    "pseudo",
                    [msi, "-o", pseudo, "--threshold", self._threshold()] + labels,
                    device=False,
                ),
                Step(
                    "train-detector",
                    scene
                    + ["--pseudo", pseudo, "-o", detector]
                    + self._training(self.detector_epochs_spin),
                ),
            ]
            outputs = [("msi", msi), ("pseudo", pseudo), ("model", detector)]
            return steps, outputs

        self._start(tr("Train"), build, folder_name="training")

    def detect(self) -> None:
        def build() -> Plan:
            model = self.model_widget.filePath().strip()
            if not model or not Path(model).is_file():
                raise QgsProcessingException(
                    tr("choose a change detector file (.kdmsi); press Train first or use Run all")
                )
            folder = self._output_folder() / "detection"
            arguments = self._scene() + ["--model", model, "-o", str(folder)]
            return [Step("detect", arguments)], _folder_outputs(folder)

        self._start(tr("Detect"), build)

    def run_all(self) -> None:
        def build() -> Plan:
            folder = self._output_folder() / "run"
            tile = str(self.tile_spin.value())
            arguments = self._scene() + self._labels() + ["-o", str(folder)]
            arguments += ["--backbone", self.backbone_combo.currentText()]
            arguments += ["--weights", self.weights_combo.currentText()]
            arguments += ["--kd-epochs", str(self.epochs_spin.value())]
            arguments += ["--detector-epochs", str(self.detector_epochs_spin.value())]
            arguments += ["--tile-size", tile, "--detector-tile-size", tile]
            arguments += ["--msi-scales", self.scales_edit.text().replace(" ", "")]
            arguments += ["--pseudo-source", self.source_combo.currentText()]
            arguments += ["--pseudo-threshold", self._threshold()]
            outputs = _folder_outputs(folder) + [
                ("msi", str(folder / D.MSI_NAME)),
                ("evidence", str(folder / D.EVIDENCE_NAME)),
                ("pseudo", str(folder / D.PSEUDO_NAME)),
                ("model", str(folder / D.DETECTOR_NAME)),
            ]
            return [Step("run", arguments)], outputs

        self._start(tr("Run all"), build)

    def check_environment(self) -> None:
        """Run ``kdmsi env`` in the background and show the report in the log."""
        self._start(tr("Check environment"), lambda: ([Step("env", [])], []))

    # ------------------------------------------------------------------ running

    def _start(self, title: str, build: Callable[[], Plan], folder_name: str = "") -> bool:
        """Check the inputs, then run the plan's steps one after the other in the background."""
        if self.task is not None:
            self._message(tr("A step is running; wait for it or cancel it"), warning=True)
            return False
        try:
            steps, outputs = build()
        except QgsProcessingException as exc:
            self._message(str(exc), warning=True)
            return False
        if folder_name:
            (self._output_folder() / folder_name).mkdir(exist_ok=True)
        settings.save_device(self.device())
        self._set_running(True)
        self._run_next(title, list(steps), outputs)
        return True

    def _run_next(self, title: str, steps: list[Step], outputs: list[tuple[str, str]]) -> None:
        step = steps.pop(0)
        argv = worker.engine_command(
            step.command,
            step.arguments,
            device=self.device() if step.device else None,
            overwrite=self.overwrite_check.isChecked() and step.command != "env",
            python=self.python_widget.filePath().strip() or None,
        )
        self.log_view.appendPlainText("$ " + " ".join(shlex.quote(a) for a in argv))
        task = EngineTask(f"KD-MSI: {title} ({step.command})", argv)
        task.engineEvent.connect(self._on_event)
        task.logLine.connect(self.log_view.appendPlainText)
        task.jobDone.connect(
            lambda result: self._step_done(title, step.command, steps, outputs, result)
        )
        self.task = task
        self.progress_bar.setValue(0)
        self.stage_label.setText(tr("{}: starting {}").format(title, step.command))
        QgsApplication.taskManager().addTask(task)

    def _step_done(
        self,
        title: str,
        command: str,
        steps: list[Step],
        outputs: list[tuple[str, str]],
        result: worker.EngineResult,
    ) -> None:
        self.task = None
        if result.success and steps:
            self._run_next(title, steps, outputs)
            return
        self._on_done(title, command, outputs, result)

    def cancel(self) -> None:
        if self.task is not None:
            self.log_view.appendPlainText(tr("Cancelling..."))
            self.task.cancel()

    def shutdown(self) -> None:
        """Cancel a running step (plugin unload)."""
        self.cancel()

    def is_running(self) -> bool:
        return self.task is not None

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        stage = str(event.get("stage") or "")
        message = str(event.get("message") or "")
        if kind == "stage":
            self.stage_label.setText(f"{stage}: {message}" if message else stage)
            self.progress_bar.setValue(0)
        elif kind == "progress":
            fraction = event.get("fraction")
            if fraction is not None:
                self.progress_bar.setValue(int(round(100 * float(fraction))))
            data = event.get("data") or {}
            if data:
                extras = " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items()
                )
                self.stage_label.setText(
                    f"{stage} {event.get('done')}/{event.get('total')} {extras}"
                )
        elif kind in ("log", "error"):
            self.log_view.appendPlainText(message)

    def _on_done(
        self,
        title: str,
        command: str,
        outputs: list[tuple[str, str]],
        result: worker.EngineResult,
    ) -> None:
        self.task = None
        self.last_result = result
        self._set_running(False)
        if command == "env":
            report = envcheck.check_environment_from_result(result)
            self.log_view.appendPlainText(envcheck.format_report(report))
            self.stage_label.setText(report.get("summary") or "")
            self._message(
                tr("Environment: {}").format(report.get("summary") or ""),
                warning=not report.get("ok"),
            )
        elif result.success:
            self.progress_bar.setValue(100)
            self.stage_label.setText(tr("{}: done").format(title))
            for kind, path in outputs:
                if kind == "model" and Path(path).is_file():
                    self.model_widget.setFilePath(path)
            map_outputs = [(k, p) for k, p in outputs if k in layers.STYLES]
            added = layers.add_results(QgsProject.instance(), map_outputs, self.group_name())
            if command == "grid" and added:
                self._select_labels(added[0])
            if command == "run":
                self._show_trust(result.result)
            else:
                self._message(tr("{} finished").format(title), warning=False)
        else:
            self.stage_label.setText(tr("{}: {}").format(title, result.error))
            self.log_view.appendPlainText(tr("Error: {}").format(result.error))
            self._message(result.error, warning=True)
        self.jobFinished.emit(result)

    def _show_trust(self, result: dict[str, Any]) -> None:
        """The run's trust report: agreement with the weak labels, and plain warnings."""
        trust = result.get("trust") or {}
        agreement = trust.get("tile_agreement")
        summary = tr("Run all finished")
        if agreement is not None:
            summary += tr(": the map agrees with {:.0%} of your tile labels").format(agreement)
        warnings = list(result.get("warnings") or [])
        self.log_view.appendPlainText(summary)
        for warning in warnings:
            self.log_view.appendPlainText(tr("Warning: {}").format(warning))
        if warnings:
            self._message(
                summary + tr(". Do not trust it blindly: {}").format(warnings[0]), warning=True
            )
        else:
            self._message(summary, warning=False)

    def _select_labels(self, layer: Any) -> None:
        if isinstance(layer, QgsVectorLayer):
            self.labels_combo.setLayer(layer)

    def _set_running(self, running: bool) -> None:
        for button in (*self.step_buttons, self.env_button):
            button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _message(self, text: str, *, warning: bool) -> None:
        self.log_view.appendPlainText(text)
        if self.iface is None or not hasattr(self.iface, "messageBar"):
            return
        from qgis.core import Qgis

        level = Qgis.MessageLevel.Warning if warning else Qgis.MessageLevel.Success
        self.iface.messageBar().pushMessage("KD-MSI", text, level, 8)


def _folder_outputs(folder: Path) -> list[tuple[str, str]]:
    return [
        ("probability", str(folder / D.PROBABILITY_NAME)),
        ("change", str(folder / D.CHANGE_NAME)),
        ("changes", str(folder / D.CHANGES_NAME)),
    ]
