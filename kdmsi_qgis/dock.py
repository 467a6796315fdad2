"""The KD-MSI dock widget: pick the image pair, label tiles on the map, run the chain, see it.

Every button runs the same Processing algorithms as the toolbox (``kdmsi:labellinggrid``,
``kdmsi:trainmodel``, ``kdmsi:runchain``, ...) through Processing's task runner
(:mod:`kdmsi_qgis.runner`), so the dock has no command builder of its own and QGIS never waits
for the engine. Progress, stage and log lines arrive through signals; Cancel stops the worker
and, where training left a checkpoint, the dock says where it is and offers to resume from it
or delete it. Results go to one layer group, styled from ``resources/styles``, the answer
switched on (change polygons over the probability map) and the intermediate layers off.

"Label tiles" turns the canvas into a labelling tool over the grid of the chosen rasters and
tile size (:mod:`kdmsi_qgis.labeltool`), made on the fly by "Create labelling grid" when there
is none; the dock shows the live counts and says when training has enough of both kinds.
"Tiles to label next" asks ``kdmsi:suggesttiles`` which unlabelled tiles the best map of the
output folder is least sure about (:mod:`kdmsi_qgis.suggestions`), and "Next tile" zooms to
each in rank order, skipping the ones labelled meanwhile, while "Label tiles" stays on.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsFieldProxyModel,
    QgsMapLayerProxyModel,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsUnitTypes,
    QgsVectorLayer,
)
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from kdmsi_qgis import envcheck, labeltool, layers, settings, suggestions, worker
from kdmsi_qgis.algorithms.base import BACKBONES, METHODS, WEIGHTS
from kdmsi_qgis.algorithms.maps import check_scales, threshold_argument
from kdmsi_qgis.contract import D
from kdmsi_qgis.runner import ChainResult, ChainRunner, Step
from kdmsi_qgis.tasks import EngineTask

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda:0")
#: Lines of text the log shows without scrolling.
LOG_LINES = 12
#: Longest text in the one-line stage label (the log has the whole of it).
STAGE_CHARS = 110
#: What the dock calls the engine's command-line options in its messages.
#: The engine describes its parameters in words; these name the dock's own box and button.
FLAG_WORDS = (
    (
        re.compile(r"choose another name or allow replacing it"),
        "choose another folder or tick 'Replace existing outputs'",
    ),
    (re.compile(r"run again without resume"), "delete the checkpoint and run again"),
    (re.compile(r"^resume: "), ""),
    (re.compile(r"again with resume to continue"), "again with Resume to continue"),
)
GRID_NAME = "labelling_grid.gpkg"
#: Algorithms that train, keep a checkpoint and can resume from it.
TRAINING_ALGORITHMS = ("trainmodel", "traindetector")
#: Output files of a detection folder and of a run folder (``kdmsi detect`` / ``kdmsi run``).
DETECT_FILES = (
    D.PROBABILITY_NAME,
    D.DETECTOR_PROBABILITY_NAME,
    D.CHANGE_NAME,
    D.CHANGES_NAME,
    D.RECORD_NAME,
)
RUN_FILES = (*DETECT_FILES, D.STUDENT_NAME, D.MSI_NAME, D.EVIDENCE_NAME, D.PSEUDO_NAME)


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiDock", text)


def plain_error(text: str) -> str:
    """An engine message in the dock's words (its boxes and buttons, not command-line flags)."""
    for pattern, words in FLAG_WORDS:
        text = pattern.sub(words, text)
    return text


def checkpoint_of(model: Path) -> Path:
    """The training checkpoint the engine keeps beside ``model`` (``MODEL.ckpt``)."""
    return model.with_name(model.name + ".ckpt")


@dataclass
class Plan:
    """A dock action: the algorithms it runs and what it leaves.

    Attributes:
        title: the action's name (``Train``).
        steps: the Processing algorithms, in order.
        folder: where the outputs go.
        show: ``(kind, path)`` layers to add when every step succeeded.
        shown: the kinds switched on (the others are added switched off).
        protect: files that exist only if replaced on purpose ('Replace existing outputs').
        checkpoints: training checkpoints a cancelled run may leave.
        suggestions: the tiles-to-label-next file the plan writes (shown in its own way).
    """

    title: str
    steps: list[Step]
    folder: Path
    show: list[tuple[str, str]] = field(default_factory=list)
    shown: frozenset[str] = layers.SHOWN_FIRST
    protect: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    suggestions: Path | None = None


PlanBuilder = Callable[[bool], Plan]


class KdmsiDock(QDockWidget):
    """The panel. ``iface`` may be ``None`` (tests): messages then go to the log only.

    Signals:
        jobFinished: the :class:`kdmsi_qgis.runner.ChainResult` of the action that ended.
    """

    jobFinished = pyqtSignal(object)  # noqa: N815 (Qt naming)

    def __init__(self, iface: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(tr("KD-MSI change detection"), parent)
        self.setObjectName("KdmsiDock")
        self.iface = iface
        self.runner = ChainRunner(self)
        self.runner.progressChanged.connect(lambda value: self.progress_bar.setValue(int(value)))
        self.runner.stageChanged.connect(self._set_stage)
        self.runner.detail.connect(self._set_stage)
        self.runner.logLine.connect(self._log)
        self.runner.finished.connect(self._on_done)
        self.env_task: EngineTask | None = None
        self.last_result: ChainResult | None = None
        self.plan: Plan | None = None
        self.resume_builder: PlanBuilder | None = None
        self.grid_labels: labeltool.GridLabels | None = None
        self.label_tool: labeltool.TileLabelTool | None = None
        self._label_after_grid = False
        self._started_editing = False
        self._was_ready = False
        self._message_item: Any = None
        self._tile_suggested = True
        self.suggestions_layer: QgsVectorLayer | None = None
        self.suggestion_steps: suggestions.SuggestionSteps | None = None
        self._build()
        self._set_running(False)
        self._pick_pair()
        self._suggest_tile_size(self.before_combo.currentLayer())
        QgsProject.instance().legendLayersAdded.connect(self._pick_pair)
        self._find_checkpoints()
        if self.iface is not None and hasattr(self.iface, "messageBar"):
            self.iface.messageBar().widgetAdded.connect(self._drop_task_notice)

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        body = QWidget(self)
        column = QVBoxLayout(body)
        column.addWidget(self._build_data(body))
        column.addWidget(self._build_labelling(body))
        column.addWidget(self._build_options(body))
        column.addWidget(self._build_engine(body))
        column.addLayout(self._build_steps(body))
        column.addWidget(self._build_resume(body))
        column.addLayout(self._build_status(body))
        self.log_view = QPlainTextEdit(body)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setMinimumHeight(self.log_view.fontMetrics().lineSpacing() * LOG_LINES + 12)
        # the log follows its end, unless the user scrolled up to read
        self._follow_log = True
        log_bar = self.log_view.verticalScrollBar()
        log_bar.rangeChanged.connect(self._log_range_changed)
        log_bar.valueChanged.connect(self._log_scrolled)
        column.addWidget(self.log_view, 1)
        # in a scroll area the fields keep their height however short the dock is
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(body)
        self.setWidget(scroll)

    def _build_data(self, body: QWidget) -> QGroupBox:
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
        self.before_combo.layerChanged.connect(self._suggest_tile_size)
        self._pair_chosen = False  # the user picked a date: keep it
        self.before_combo.activated.connect(self._pair_picked)
        self.after_combo.activated.connect(self._pair_picked)
        form.addRow(tr("Before (date 1)"), self.before_combo)
        form.addRow(tr("After (date 2)"), self.after_combo)
        form.addRow(tr("Weak labels"), self.labels_combo)
        form.addRow(tr("Label field"), self.field_combo)
        return data

    def _build_labelling(self, body: QWidget) -> QGroupBox:
        group = QGroupBox(tr("Label tiles on the map"), body)
        column = QVBoxLayout(group)
        # more labelling buttons (e.g. tiles to label next) go in this row
        self.label_buttons = QHBoxLayout()
        self.label_button = QPushButton(tr("Label tiles"), group)
        self.label_button.setCheckable(True)
        self.label_button.setToolTip(
            tr(
                "Mark tiles of the labelling grid on the map (made from the images and tile "
                "size when there is none)"
            )
        )
        self.label_button.toggled.connect(self.toggle_label_tool)
        self.undo_button = QPushButton(tr("Undo"), group)
        self.redo_button = QPushButton(tr("Redo"), group)
        self.undo_button.clicked.connect(lambda: self._label_stack("undo"))
        self.redo_button.clicked.connect(lambda: self._label_stack("redo"))
        for button in (self.label_button, self.undo_button, self.redo_button):
            self.label_buttons.addWidget(button)
        column.addLayout(self.label_buttons)
        column.addLayout(self._build_suggest_row(group))
        self.suggest_label = QLabel("", group)
        self.suggest_label.setWordWrap(True)
        column.addWidget(self.suggest_label)
        self.counts_label = QLabel(tr("No labelling grid yet"), group)
        self.advice_label = QLabel("", group)
        self.advice_label.setWordWrap(True)
        hint = QLabel(
            tr(
                "Click: changed. Right click: unchanged. Shift-click: clear. Drag to paint "
                "several. Every gesture is saved to the grid's GeoPackage; Undo takes it back."
            ),
            group,
        )
        hint.setWordWrap(True)
        hint.setStyleSheet("color: palette(mid);")
        for widget in (self.counts_label, self.advice_label, hint):
            column.addWidget(widget)
        self._update_label_buttons()
        return group

    def _build_suggest_row(self, group: QGroupBox) -> QHBoxLayout:
        row = QHBoxLayout()
        self.suggest_button = QPushButton(tr("Tiles to label next"), group)
        self.suggest_button.setToolTip(
            tr(
                "The unlabelled tiles where the change map is least sure, ranked: the map of "
                "the last run (or, before any training, the quick preview, made if needed) "
                "with the labels so far"
            )
        )
        self.suggest_button.clicked.connect(self.suggest_tiles)
        self.suggest_count_spin = _spin(group, 1, 1000, D.SUGGEST_COUNT)
        self.suggest_count_spin.setToolTip(tr("How many tiles to suggest"))
        self.next_button = QPushButton(tr("Next tile"), group)
        self.next_button.setToolTip(
            tr("Zoom to the next suggested tile in rank order (the ones labelled are skipped)")
        )
        self.next_button.setEnabled(False)
        self.next_button.clicked.connect(self.next_tile)
        row.addWidget(self.suggest_button)
        row.addWidget(self.suggest_count_spin)
        row.addWidget(self.next_button)
        return row

    def _build_options(self, body: QWidget) -> QGroupBox:
        options = QGroupBox(tr("Model and options"), body)
        form = QFormLayout(options)
        self.model_widget = QgsFileWidget(options)
        self.model_widget.setFilter("KD-MSI model (*.kdmsi)")
        self.model_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.backbone_combo = _combo(options, BACKBONES, D.BACKBONE)
        self.backbone_combo.setToolTip(
            tr(
                "auto: efficientnet-lite0, whose ImageNet weights ship with the engine (works "
                "offline on a CPU); resnet50 on a GPU when its ImageNet weights are here"
            )
        )
        self.weights_combo = _combo(options, WEIGHTS, D.WEIGHTS_DEFAULT)
        self.epochs_spin = _spin(options, 1, 1000, D.KD_EPOCHS)
        self.detector_epochs_spin = _spin(options, 1, 1000, D.DETECTOR_EPOCHS)
        self.device_combo = _combo(options, DEVICES, settings.saved_device())
        self.device_combo.setEditable(True)
        self.tile_spin = _spin(options, 32, 4096, D.TILE_SIZE)
        self.tile_spin.setSingleStep(16)
        self.tile_spin.valueChanged.connect(self._tile_edited)
        self.scales_edit = QLineEdit(D.MSI_SCALES_TEXT, options)
        self.source_combo = _combo(options, D.PSEUDO_SOURCES, D.PSEUDO_SOURCE)
        self.source_combo.setToolTip(tr("Where Run all takes its pseudo labels from"))
        # a number in (0, 1) or a rule that needs no pixel truth (auto, otsu, unchanged-q)
        self.threshold_combo = _combo(options, D.PSEUDO_THRESHOLDS, D.PSEUDO_THRESHOLD)
        self.threshold_combo.setEditable(True)
        self.threshold_combo.setToolTip(
            tr("A number in (0, 1) such as 0.3, or auto, otsu or unchanged-q")
        )
        self.output_widget = QgsFileWidget(options)
        self.output_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_widget.fileChanged.connect(lambda _path: self._find_checkpoints())
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
        return options

    def _build_engine(self, body: QWidget) -> QGroupBox:
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
        return engine

    def _build_steps(self, body: QWidget) -> QGridLayout:
        buttons = QGridLayout()
        self.preview_button = QPushButton(tr("Quick preview"), body)
        self.preview_button.setToolTip(
            tr("Quick change preview (no training): change vector analysis with Otsu's threshold")
        )
        self.grid_button = QPushButton(tr("Labelling grid"), body)
        self.grid_button.setToolTip(
            tr("Write the tile grid to label as changed (1) / unchanged (0)")
        )
        self.train_button = QPushButton(tr("Train"), body)
        self.train_button.setToolTip(
            tr("Train the KD-MSI model, make pseudo labels and train the change detector")
        )
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
        for index, button in enumerate(self.step_buttons):
            # two rows: the panel stays narrow enough for the side of the window
            buttons.addWidget(button, index // 3, index % 3)
        self.preview_button.clicked.connect(self.quick_preview)
        self.grid_button.clicked.connect(self.create_grid)
        self.train_button.clicked.connect(self.train)
        self.detect_button.clicked.connect(self.detect)
        self.run_button.clicked.connect(self.run_all)
        return buttons

    def _build_resume(self, body: QWidget) -> QWidget:
        self.resume_box = QWidget(body)
        row = QHBoxLayout(self.resume_box)
        row.setContentsMargins(0, 0, 0, 0)
        self.resume_label = QLabel("", self.resume_box)
        self.resume_label.setWordWrap(True)
        self.resume_button = QPushButton(tr("Resume"), self.resume_box)
        self.resume_button.setToolTip(tr("Go on from the checkpoint of the interrupted training"))
        self.resume_button.clicked.connect(self.resume)
        self.discard_button = QPushButton(tr("Delete checkpoint"), self.resume_box)
        self.discard_button.clicked.connect(self.delete_checkpoints)
        row.addWidget(self.resume_label, 1)
        row.addWidget(self.resume_button)
        row.addWidget(self.discard_button)
        self.resume_box.setVisible(False)
        return self.resume_box

    def _build_status(self, body: QWidget) -> QVBoxLayout:
        column = QVBoxLayout()
        status = QHBoxLayout()
        self.progress_bar = QProgressBar(body)
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        self.cancel_button = QPushButton(tr("Cancel"), body)
        self.cancel_button.clicked.connect(self.cancel)
        status.addWidget(self.progress_bar)
        status.addWidget(self.cancel_button)
        column.addLayout(status)
        # one line, whatever the text: a long message must not push the fields apart
        self.stage_label = QLabel(tr("Ready"), body)
        self.stage_label.setWordWrap(False)
        self.stage_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        column.addWidget(self.stage_label)
        return column

    def _labels_changed(self, layer: Any) -> None:
        self.field_combo.setLayer(layer)
        if layer is not None and layer.fields().indexFromName(D.LABEL_FIELD) >= 0:
            self.field_combo.setField(D.LABEL_FIELD)

    def _pair_picked(self, _index: int) -> None:
        self._pair_chosen = True

    def _pick_pair(self, *_args: Any) -> None:
        """Before and after on two different rasters, the earlier date first, until the user
        picks them."""
        before, after = self.before_combo.currentLayer(), self.after_combo.currentLayer()
        two = before is not None and after is not None and before.id() != after.id()
        if two and self._pair_chosen:
            return
        guessed_before, guessed_after = layers.guess_pair(QgsProject.instance())
        if guessed_before is None or guessed_after is None:
            return
        self.before_combo.setLayer(guessed_before)
        self.after_combo.setLayer(guessed_after)

    def _tile_edited(self, _value: int) -> None:
        if not getattr(self, "_setting_tile", False):
            self._tile_suggested = False

    def _suggest_tile_size(self, layer: Any) -> None:
        """Start at the tile size that suits the before image, until the user sets one."""
        if not self._tile_suggested or not isinstance(layer, QgsRasterLayer):
            return
        self._setting_tile = True
        try:
            self.tile_spin.setValue(suggested_tile_size(layer))
        finally:
            self._setting_tile = False

    # ------------------------------------------------------------------ inputs

    def _scene(self) -> dict[str, str]:
        before = self.before_combo.currentLayer()
        after = self.after_combo.currentLayer()
        if not isinstance(before, QgsRasterLayer) or not isinstance(after, QgsRasterLayer):
            raise QgsProcessingException(tr("choose the before and after raster layers"))
        if before.id() == after.id():
            raise QgsProcessingException(tr("before and after are the same layer; pick two dates"))
        return {
            "BEFORE": layers.raster_source(before, tr("Before image")),
            "AFTER": layers.raster_source(after, tr("After image")),
        }

    def _labels(self) -> dict[str, str]:
        layer = self.labels_combo.currentLayer()
        if not isinstance(layer, QgsVectorLayer):
            raise QgsProcessingException(
                tr("choose a weak-label layer, or press 'Label tiles' and mark tiles on the map")
            )
        field_name = self.field_combo.currentField()
        if not field_name:
            raise QgsProcessingException(tr("choose the label field (1 changed, 0 unchanged)"))
        return {"LABELS": layer.id(), "LABEL_FIELD": field_name}

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

    def _training(self, epochs: QSpinBox) -> dict[str, Any]:
        return {
            "BACKBONE": BACKBONES.index(self.backbone_combo.currentText()),
            "WEIGHTS": WEIGHTS.index(self.weights_combo.currentText()),
            "EPOCHS": epochs.value(),
            "TILE_SIZE": self.tile_spin.value(),
            "DEVICE": self.device(),
        }

    def _threshold(self) -> str:
        return threshold_argument(self.threshold_combo.currentText(), D.PSEUDO_THRESHOLDS)

    def _scales(self) -> str:
        return check_scales(self.scales_edit.text())

    def device(self) -> str:
        return self.device_combo.currentText().strip() or "auto"

    def group_name(self) -> str:
        before = self.before_combo.currentLayer()
        return f"KD-MSI: {before.name()}" if before is not None else "KD-MSI"

    # ------------------------------------------------------------------ actions

    def quick_preview(self) -> None:
        """Change vector analysis with Otsu's threshold: what differs, in seconds."""
        self._start(self._plan_preview)

    def create_grid(self) -> None:
        self._start(self._plan_grid)

    def train(self) -> None:
        """KD-MSI model, MSI map, pseudo labels and the change detector, one after the other."""
        self._start(self._plan_train)

    def detect(self) -> None:
        self._start(self._plan_detect)

    def run_all(self) -> None:
        self._start(self._plan_run)

    def suggest_tiles(self) -> None:
        """The unlabelled tiles the best map is least sure about, on the map, ranked."""
        self._start(self._plan_suggest)

    def resume(self) -> None:
        """Run the interrupted action again, training going on from its checkpoint."""
        if self.resume_builder is not None:
            self._start(self.resume_builder, resume=True)

    def _plan_preview(self, resume: bool = False) -> Plan:
        step, magnitude, change = self._preview_step()
        return Plan(
            tr("Quick preview"),
            [step],
            magnitude.parent,
            show=[("preview", str(magnitude)), ("preview_change", str(change))],
            protect=[magnitude, change],
        )

    def _preview_step(self) -> tuple[Step, Path, Path]:
        """The quick preview's step and its two outputs (magnitude, change)."""
        magnitude, change = _preview_files(self._output_folder())
        parameters = {
            **self._scene(),
            "THRESHOLD": D.CVA_THRESHOLD,
            "OUTPUT": str(magnitude),
            "CHANGE": str(change),
        }
        return Step("quickpreview", parameters, "cva"), magnitude, change

    def _plan_suggest(self, resume: bool = False) -> Plan:
        """The ranked tiles to label next from the best map there is: the trained chain's,
        else the quick preview, which runs first when there is none."""
        folder = self._output_folder()
        magnitude = _preview_files(folder)[0]
        found = suggestions.change_map(folder, magnitude)
        steps: list[Step] = []
        show: list[tuple[str, str]] = []
        if found is None:
            step, magnitude, change = self._preview_step()
            steps.append(step)
            show = [("preview", str(magnitude)), ("preview_change", str(change))]
            found = suggestions.ChangeMap(magnitude, tr("the quick change preview, made first"))
        output = folder / suggestions.SUGGEST_FILE
        labels, field_name = self._current_labels()
        # a labelling grid gives its own tile size (0); polygons and points take the dock's
        grid = labeltool.is_grid_layer(labels, field_name)
        parameters: dict[str, Any] = {
            "PROBABILITY": str(found.path),
            "COUNT": self.suggest_count_spin.value(),
            "TILE_SIZE": 0 if grid else self.tile_spin.value(),
            "OUTPUT": str(output),
        }
        if labels is not None:
            parameters.update({"LABELS": labels.id(), "LABEL_FIELD": field_name})
        self._log(
            tr("Tiles to label next from {} ({}), with the labels of {}").format(
                found.what, found.path.name, labels.name() if labels is not None else tr("none yet")
            )
        )
        steps.append(Step("suggesttiles", parameters, "suggest"))
        # the suggestions are replaced without asking: they are the answer to this click; a
        # preview made on the way is added switched off, so it hides neither grid nor image
        return Plan(
            tr("Tiles to label next"),
            steps,
            folder,
            show=show,
            shown=frozenset(),
            suggestions=output,
        )

    def _plan_grid(self, resume: bool = False) -> Plan:
        folder = self._output_folder()
        output = folder / GRID_NAME
        parameters = {**self._scene(), "TILE_SIZE": self.tile_spin.value(), "OUTPUT": str(output)}
        return Plan(
            tr("Labelling grid"),
            [Step("labellinggrid", parameters, "grid")],
            folder,
            show=[("grid", str(output))],
            protect=[output],
        )

    def _plan_train(self, resume: bool = False) -> Plan:
        folder = self._output_folder() / "training"
        scene, labels = self._scene(), self._labels()
        student, msi = folder / D.STUDENT_NAME, folder / D.MSI_NAME
        pseudo, detector = folder / D.PSEUDO_NAME, folder / D.DETECTOR_NAME
        steps = [
            Step(
                "trainmodel",
                {**scene, **labels, **self._training(self.epochs_spin), "OUTPUT": str(student)},
                "train",
            ),
            Step(
                "changeprobability",
                {
                    **scene,
                    "MODEL": str(student),
                    "METHOD": METHODS.index(D.MAP_METHOD),
                    "SCALES": self._scales(),
                    "DEVICE": self.device(),
                    "OUTPUT": str(msi),
                },
                "infer",
            ),
            Step(
                "pseudolabels",
                {
                    "PROBABILITY": str(msi),
                    **labels,
                    "THRESHOLD": self._threshold(),
                    "OUTPUT": str(pseudo),
                },
                "pseudo",
            ),
            Step(
                "traindetector",
                {
                    **scene,
                    "PSEUDO": str(pseudo),
                    **self._training(self.detector_epochs_spin),
                    "OUTPUT": str(detector),
                },
                "train-detector",
            ),
        ]
        outputs = [student, msi, pseudo, detector]
        if resume:
            steps = _resumed_steps(steps, outputs)
        return Plan(
            tr("Train"),
            steps,
            folder,
            show=[("msi", str(msi)), ("pseudo", str(pseudo)), ("model", str(detector))],
            shown=frozenset({"msi"}),
            protect=outputs,
            checkpoints=[checkpoint_of(student), checkpoint_of(detector)],
        )

    def _plan_detect(self, resume: bool = False) -> Plan:
        model = self.model_widget.filePath().strip()
        if not model or not Path(model).is_file():
            raise QgsProcessingException(
                tr("choose a change detector file (.kdmsi); press Train first or use Run all")
            )
        folder = self._output_folder() / "detection"
        parameters = {
            **self._scene(),
            "MODEL": model,
            "DEVICE": self.device(),
            "OUTPUT_FOLDER": str(folder),
        }
        return Plan(
            tr("Detect"),
            [Step("detectchanges", parameters, "detect")],
            folder,
            show=_folder_outputs(folder),
            protect=[folder / name for name in DETECT_FILES],
        )

    def _plan_run(self, resume: bool = False) -> Plan:
        folder = self._output_folder() / "run"
        checkpoints = [
            checkpoint_of(folder / D.STUDENT_NAME),
            checkpoint_of(folder / D.DETECTOR_NAME),
        ]
        training = self._training(self.epochs_spin)
        parameters = {
            **self._scene(),
            **self._labels(),
            **training,
            "DETECTOR_EPOCHS": self.detector_epochs_spin.value(),
            "SCALES": self._scales(),
            "PSEUDO_SOURCE": D.PSEUDO_SOURCES.index(self.source_combo.currentText()),
            "THRESHOLD": self._threshold(),
            "RESUME": resume and any(path.is_file() for path in checkpoints),
            "OUTPUT_FOLDER": str(folder),
        }
        show = _folder_outputs(folder) + [
            ("msi", str(folder / D.MSI_NAME)),
            ("evidence", str(folder / D.EVIDENCE_NAME)),
            ("pseudo", str(folder / D.PSEUDO_NAME)),
            ("model", str(folder / D.DETECTOR_NAME)),
        ]
        return Plan(
            tr("Run all"),
            [Step("runchain", parameters, "run")],
            folder,
            show=show,
            protect=[folder / name for name in RUN_FILES],
            checkpoints=checkpoints,
        )

    def check_environment(self) -> None:
        """Run ``kdmsi env`` in the background and show the report in the log."""
        if self.is_running():
            self._message(tr("A step is running; wait for it or cancel it"), warning=True)
            return
        argv = worker.engine_command(
            "env", [], device=self.device(), python=self.python_widget.filePath().strip() or None
        )
        self._log("$ " + " ".join(argv))
        task = EngineTask(tr("KD-MSI: check environment"), argv)
        task.logLine.connect(self._log)
        task.jobDone.connect(self._environment_done)
        self.env_task = task
        self._set_running(True)
        self.progress_bar.setValue(0)
        self._set_stage(tr("Check environment: running kdmsi env"))
        from qgis.core import QgsApplication

        QgsApplication.taskManager().addTask(task)

    # ------------------------------------------------------------------ running

    def _start(self, builder: PlanBuilder, resume: bool = False) -> bool:
        """Check the inputs, then run the plan's algorithms one after the other."""
        if self.is_running():
            self._message(tr("A step is running; wait for it or cancel it"), warning=True)
            return False
        try:
            plan = builder(resume)
        except QgsProcessingException as exc:
            self._message(plain_error(str(exc)), warning=True)
            return False
        existing = [path for path in plan.protect if path.exists()]
        if existing and not resume and not self.overwrite_check.isChecked():
            self._message(
                tr(
                    "{} already exists in {}; tick 'Replace existing outputs' to replace it, or "
                    "choose another output folder"
                ).format(existing[0].name, existing[0].parent),
                warning=True,
            )
            return False
        plan.folder.mkdir(parents=True, exist_ok=True)
        settings.save_device(self.device())
        self.plan = plan
        if plan.checkpoints:
            self.resume_builder = builder
        self.resume_box.setVisible(False)
        self._set_running(True)
        self.progress_bar.setValue(0)
        self._set_stage(tr("{}: starting").format(plan.title))
        self.runner.start(plan.title, plan.steps)
        return True

    def cancel(self) -> None:
        if self.runner.is_running():
            self._log(tr("Cancelling..."))
            self.runner.cancel()
        if self.env_task is not None:
            self._log(tr("Cancelling..."))
            self.env_task.cancel()

    def shutdown(self) -> None:
        """Cancel a running step and put the map tool down (plugin unload)."""
        self.cancel()
        self.stop_labelling()
        try:
            QgsProject.instance().legendLayersAdded.disconnect(self._pick_pair)
            if self.iface is not None and hasattr(self.iface, "messageBar"):
                self.iface.messageBar().widgetAdded.disconnect(self._drop_task_notice)
        except TypeError:
            pass

    def is_running(self) -> bool:
        return self.runner.is_running() or self.env_task is not None

    def _on_done(self, result: ChainResult) -> None:
        plan = self.plan
        self.plan = None
        self._set_running(False)
        if result.success and plan is not None:
            self.progress_bar.setValue(100)
            self._set_stage(tr("{}: done").format(result.title))
            self._show_results(plan, result)
        else:
            self.progress_bar.setValue(0)
            result.error = plain_error(result.error)
            self._set_stage(tr("{}: {}").format(result.title, result.error))
            self._log(tr("Error: {}").format(result.error))
            self._message(result.error, warning=True)
            if self._label_after_grid:
                self._label_after_grid = False
                self.label_button.setChecked(False)
        if plan is not None and plan.checkpoints:
            self._offer_resume(plan.checkpoints, cancelled=result.cancelled)
        self.last_result = result
        self.jobFinished.emit(result)

    def _show_results(self, plan: Plan, result: ChainResult) -> None:
        for kind, path in plan.show:
            if kind == "model" and Path(path).is_file():
                self.model_widget.setFilePath(path)
        map_outputs = [(k, p) for k, p in plan.show if k in layers.STYLES]
        added = layers.add_results(
            QgsProject.instance(), map_outputs, self.group_name(), plan.shown
        )
        self._show_after_image()
        if plan.suggestions is not None:
            self._show_suggestions(plan.suggestions)
            return
        if self.suggestions_layer is not None:
            suggestions.raise_layer(QgsProject.instance(), self.suggestions_layer)
        if "grid" in result.outputs and added:
            self._select_labels(added[0])
            if self._label_after_grid:
                self._label_after_grid = False
                self._start_labelling(added[0])
        if "run" in result.outputs:
            record = _read_record(plan.folder / D.RECORD_NAME)
            result.outputs["trust"] = record.get("trust") or {}
            self._show_trust(result.outputs["trust"])
        else:
            self._message(tr("{} finished").format(result.title), warning=False)

    def _show_after_image(self) -> None:
        """The answer over the after image: the after image on, and no before image above it."""
        root = QgsProject.instance().layerTreeRoot()
        after, before = self.after_combo.currentLayer(), self.before_combo.currentLayer()
        after_node = root.findLayer(after.id()) if after is not None else None
        if after_node is None:
            return
        after_node.setItemVisibilityChecked(True)
        before_node = root.findLayer(before.id()) if before is not None else None
        order = [node.layerId() for node in root.findLayers()]
        if before_node is not None and order.index(before.id()) < order.index(after.id()):
            before_node.setItemVisibilityChecked(False)

    def _show_trust(self, trust: dict[str, Any]) -> None:
        """The run's trust report: agreement with the weak labels, and plain warnings."""
        agreement = trust.get("tile_agreement")
        summary = tr("Run all finished")
        if agreement is not None:
            summary += tr(": the map agrees with {:.0%} of your tile labels").format(agreement)
        warnings = list(trust.get("warnings") or [])
        self._log(summary)
        for warning in warnings:
            self._log(tr("Warning: {}").format(warning))
        if warnings:
            self._message(
                summary + tr(". Do not trust it blindly: {}").format(warnings[0]), warning=True
            )
        else:
            self._message(summary, warning=False)

    def _environment_done(self, engine_result: worker.EngineResult) -> None:
        self.env_task = None
        self._set_running(False)
        report = envcheck.check_environment_from_result(engine_result)
        ok = bool(report.get("ok")) and engine_result.success
        self._log(envcheck.format_report(report))
        summary = str(report.get("summary") or "")
        self.progress_bar.setValue(100 if ok else 0)
        self._set_stage(tr("Environment: {}").format(summary))
        self._message(tr("Environment: {}").format(summary), warning=not ok)
        result = ChainResult(
            tr("Check environment"),
            engine_result.success,
            cancelled=engine_result.cancelled,
            error=engine_result.error,
            outputs={"env": report},
        )
        self.last_result = result
        self.jobFinished.emit(result)

    # ------------------------------------------------------------------ checkpoints

    def _offer_resume(self, checkpoints: list[Path], *, cancelled: bool) -> None:
        found = [path for path in checkpoints if path.is_file()]
        if not found:
            self.resume_box.setVisible(False)
            return
        size = sum(path.stat().st_size for path in found) / 1e6
        where = ", ".join(f"{path.parent.name}/{path.name}" for path in found)
        reason = tr("The training was cancelled") if cancelled else tr("The training stopped")
        text = tr(
            "{}; its checkpoint ({:.0f} MB) is in {}. Resume goes on from it with the same "
            "settings; Delete checkpoint frees the space."
        ).format(reason, size, where)
        self.resume_label.setText(text)
        self.resume_label.setToolTip("\n".join(str(path) for path in found))
        self.resume_box.setVisible(True)
        self._log(text)

    def _find_checkpoints(self) -> None:
        """Offer to resume a training interrupted earlier (another session included)."""
        if self.is_running():
            return
        text = self.output_widget.filePath().strip()
        self.resume_box.setVisible(False)
        if not text:
            return
        folder = Path(text)
        for sub, builder in (("run", self._plan_run), ("training", self._plan_train)):
            names = (D.STUDENT_NAME, D.DETECTOR_NAME)
            found = [checkpoint_of(folder / sub / name) for name in names]
            if any(path.is_file() for path in found):
                self.resume_builder = builder
                self._offer_resume(found, cancelled=False)
                return

    def delete_checkpoints(self) -> None:
        """Delete the checkpoints of the interrupted training."""
        label = self.resume_label.toolTip()
        for line in label.splitlines():
            path = Path(line)
            if path.suffix == ".ckpt" and path.is_file():
                path.unlink()
                self._log(tr("Deleted {}").format(path))
        self.resume_box.setVisible(False)
        self.resume_builder = None

    # ------------------------------------------------------------------ labelling

    def toggle_label_tool(self, checked: bool) -> None:
        """Start or stop labelling tiles on the map."""
        if not checked:
            self.stop_labelling()
            return
        if self.label_tool is not None:
            return
        try:
            grid = self._labelling_grid()
        except QgsProcessingException as exc:
            self._message(plain_error(str(exc)), warning=True)
            self.label_button.setChecked(False)
            return
        if grid is not None:
            self._start_labelling(grid)
            return
        self._log(
            tr("No labelling grid yet: making one over the images ({} px tiles)").format(
                self.tile_spin.value()
            )
        )
        self._label_after_grid = True
        if not self._start(self._plan_grid):
            self._label_after_grid = False
            self.label_button.setChecked(False)

    def _labelling_grid(self) -> QgsVectorLayer | None:
        """The grid to label: the weak-label layer if it is one, else the output folder's
        labelling grid (loaded if it exists); ``None`` when one must be made."""
        field_name = self.field_combo.currentField() or D.LABEL_FIELD
        current = self.labels_combo.currentLayer()
        if labeltool.is_grid_layer(current, field_name):
            return current
        path = self._output_folder() / GRID_NAME
        for layer in QgsProject.instance().mapLayers().values():
            source = Path(layer.source().split("|", 1)[0])
            if labeltool.is_grid_layer(layer) and source.resolve() == path.resolve():
                return layer
        if path.is_file():
            self._log(tr("Labelling the existing grid {}").format(path))
            added = layers.add_results(
                QgsProject.instance(), [("grid", str(path))], self.group_name()
            )
            return added[0] if added and isinstance(added[0], QgsVectorLayer) else None
        self._scene()  # the grid needs the images: say so now
        return None

    def _start_labelling(self, layer: QgsVectorLayer) -> None:
        field_name = (
            self.field_combo.currentField()
            if self.labels_combo.currentLayer() is layer
            else D.LABEL_FIELD
        )
        if not labeltool.is_grid_layer(layer, field_name):
            field_name = D.LABEL_FIELD
        self._select_labels(layer)
        self.field_combo.setField(field_name)
        grid = labeltool.GridLabels(layer, field_name)
        grid.countsChanged.connect(self._show_counts)
        grid.stack.canUndoChanged.connect(self._update_label_buttons)
        grid.stack.canRedoChanged.connect(self._update_label_buttons)
        self.grid_labels = grid
        self._was_ready = grid.counts().ready
        self._show_counts(grid.counts())
        # in editing mode QGIS's Undo and Redo act on the layer's stack (our gestures)
        self._started_editing = not layer.isEditable() and layer.startEditing()
        layer.willBeDeleted.connect(self.stop_labelling)
        canvas = self._canvas()
        if canvas is None:
            self._log(tr("No map canvas: the grid's labels can be set from code only"))
            return
        tool = labeltool.TileLabelTool(canvas, grid)
        tool.failed.connect(lambda text: self._message(text, warning=True))
        tool.deactivated.connect(self._tool_deactivated)
        self.label_tool = tool
        node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
        if node is not None:
            node.setItemVisibilityChecked(True)
        if self.iface is not None and hasattr(self.iface, "setActiveLayer"):
            self.iface.setActiveLayer(layer)
        canvas.setMapTool(tool)
        self.label_button.setChecked(True)
        self._update_label_buttons()
        self._log(tr("Label tiles: {} ({})").format(layer.name(), grid.counts().summary()))

    def stop_labelling(self) -> None:
        """Put the map tool down and leave the grid's editing mode (its labels are saved)."""
        tool, grid = self.label_tool, self.grid_labels
        self.label_tool = None
        self.grid_labels = None
        if tool is not None and not sip.isdeleted(tool):
            canvas = tool.canvas()
            if canvas is not None and canvas.mapTool() is tool:
                canvas.unsetMapTool(tool)
        if grid is not None and not sip.isdeleted(grid.layer):
            layer = grid.layer
            for signal, slot in (
                (grid.stack.canUndoChanged, self._update_label_buttons),
                (grid.stack.canRedoChanged, self._update_label_buttons),
                (layer.willBeDeleted, self.stop_labelling),
            ):
                try:
                    signal.disconnect(slot)
                except TypeError:
                    pass
            # leave the editing mode we started (the user's own edits, if any, stay open)
            if self._started_editing and layer.isEditable() and not layer.isModified():
                layer.commitChanges()
            self._started_editing = False
        if self.label_button.isChecked():
            self.label_button.blockSignals(True)
            self.label_button.setChecked(False)
            self.label_button.blockSignals(False)
        self._update_label_buttons()

    def _tool_deactivated(self) -> None:
        # another map tool took the canvas: labelling stops, its labels are saved already
        if self.label_tool is not None:
            self.stop_labelling()

    def _label_stack(self, action: str) -> None:
        if self.grid_labels is None:
            return
        stack = self.grid_labels.stack
        try:
            stack.undo() if action == "undo" else stack.redo()
        except OSError as exc:
            self._message(str(exc), warning=True)

    def _update_label_buttons(self, *_args: Any) -> None:
        stack = self.grid_labels.stack if self.grid_labels is not None else None
        self.undo_button.setEnabled(stack is not None and stack.canUndo())
        self.redo_button.setEnabled(stack is not None and stack.canRedo())

    def _show_counts(self, counts: labeltool.LabelCounts) -> None:
        self.counts_label.setText(counts.summary())
        self.advice_label.setText(counts.advice())
        colour = "#1a7f37" if counts.ready else "#9a6700"
        self.advice_label.setStyleSheet(f"color: {colour};")
        if counts.ready and not self._was_ready:
            self._message(counts.advice(), warning=False)
        self._was_ready = counts.ready
        self._update_next_button()

    def _canvas(self) -> Any:
        if self.iface is None or not hasattr(self.iface, "mapCanvas"):
            return None
        return self.iface.mapCanvas()

    # ------------------------------------------------------------------ tiles to label next

    def _current_labels(self) -> tuple[QgsVectorLayer | None, str]:
        """The labels so far and their field: the grid "Label tiles" edits, else the
        weak-label layer (``None`` before any)."""
        grid = self.grid_labels
        if grid is not None and not sip.isdeleted(grid.layer):
            return grid.layer, grid.field
        layer = self.labels_combo.currentLayer()
        field_name = self.field_combo.currentField() or D.LABEL_FIELD
        return (layer if isinstance(layer, QgsVectorLayer) else None), field_name

    def _show_suggestions(self, path: Path) -> None:
        project = QgsProject.instance()
        layer = suggestions.show_suggestions(project, path, self.group_name())
        if layer is None:
            self._forget_suggestions()
            self._message(
                tr("The tiles to label next did not load from {}").format(path), warning=True
            )
            return
        self.suggestions_layer = layer
        self.suggestion_steps = suggestions.SuggestionSteps(suggestions.read_suggestions(layer))
        layer_id = layer.id()
        layer.willBeDeleted.connect(lambda: self._suggestions_gone(layer_id))
        count = len(self.suggestion_steps)
        self.suggest_label.setText(
            tr("{} tiles to label next, ranked: press Next tile to go to each").format(count)
        )
        self._update_next_button()
        self._message(tr("{} tiles to label next (rank 1 first)").format(count), warning=False)

    def next_tile(self) -> None:
        """Zoom to the next suggested tile in rank order that is still unlabelled."""
        steps, layer = self.suggestion_steps, self.suggestions_layer
        if steps is None or layer is None or sip.isdeleted(layer):
            return
        labelled = self._labelled_test(layer)
        suggestion = steps.next(labelled)
        if suggestion is None:
            self.suggest_label.setText(
                tr(
                    "All {} suggested tiles are labelled: run the chain again, then ask for "
                    "the tiles to label next"
                ).format(len(steps))
            )
            self.next_button.setEnabled(False)
            return
        canvas = self._canvas()
        if canvas is not None:
            suggestions.zoom_to(canvas, layer, suggestion)
        left = steps.remaining(labelled)
        self.suggest_label.setText(
            tr("Tile {} of {} ({} still to label)").format(suggestion.rank, len(steps), left)
        )

    def _labelled_test(self, layer: QgsVectorLayer) -> Callable[[suggestions.Suggestion], bool]:
        """Whether a suggested tile is labelled now, in the current labels."""
        labels, field_name = self._current_labels()
        crs, project = layer.crs(), QgsProject.instance()
        return lambda tile: suggestions.is_labelled(tile, crs, labels, field_name, project)

    def _update_next_button(self) -> None:
        """Next is on while some suggested tile is unlabelled (a label cleared counts again)."""
        steps, layer = self.suggestion_steps, self.suggestions_layer
        alive = steps is not None and layer is not None and not sip.isdeleted(layer)
        self.next_button.setEnabled(alive and steps.remaining(self._labelled_test(layer)) > 0)

    def _suggestions_gone(self, layer_id: str) -> None:
        layer = self.suggestions_layer
        if layer is not None and (sip.isdeleted(layer) or layer.id() == layer_id):
            self._forget_suggestions()

    def _forget_suggestions(self) -> None:
        self.suggestions_layer = None
        self.suggestion_steps = None
        self.suggest_label.setText("")
        self.next_button.setEnabled(False)

    # ------------------------------------------------------------------ small things

    def _select_labels(self, layer: Any) -> None:
        if isinstance(layer, QgsVectorLayer):
            self.labels_combo.setLayer(layer)

    def _set_running(self, running: bool) -> None:
        buttons = (*self.step_buttons, self.suggest_button, self.env_button, self.resume_button)
        for button in buttons:
            button.setEnabled(not running)
        self.discard_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _set_stage(self, text: str) -> None:
        """One line in the stage label (its tooltip and the log have the whole text)."""
        line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
        shown = line if len(line) <= STAGE_CHARS else line[: STAGE_CHARS - 1] + "…"
        self.stage_label.setText(shown)
        self.stage_label.setToolTip(text)

    def _log(self, text: str) -> None:
        self.log_view.appendPlainText(text)
        if self._follow_log:
            bar = self.log_view.verticalScrollBar()
            bar.setValue(bar.maximum())

    def _log_range_changed(self, _minimum: int, maximum: int) -> None:
        if self._follow_log:
            self.log_view.verticalScrollBar().setValue(maximum)

    def _log_scrolled(self, value: int) -> None:
        self._follow_log = value >= self.log_view.verticalScrollBar().maximum()

    def _drop_task_notice(self, item: Any) -> None:
        """QGIS announces the end of a long task in the message bar by the task's name; the
        dock says how its own tasks ended, and QGIS's notice would come back after the dock's
        message expires (a stale 'Task failed' a minute later), so it goes."""
        descriptions = self.runner.descriptions | {tr("KD-MSI: check environment")}
        if item is self._message_item or item.text() not in descriptions:
            return
        bar = self.iface.messageBar()
        QTimer.singleShot(0, lambda: None if sip.isdeleted(item) else bar.popWidget(item))

    def _message(self, text: str, *, warning: bool) -> None:
        """Log ``text`` and show it in the message bar, replacing this dock's last message (an
        old warning must not come back when a newer message times out)."""
        self._log(text)
        if self.iface is None or not hasattr(self.iface, "messageBar"):
            return
        from qgis.core import Qgis

        bar = self.iface.messageBar()
        if self._message_item is not None and not sip.isdeleted(self._message_item):
            bar.popWidget(self._message_item)
        level = Qgis.MessageLevel.Warning if warning else Qgis.MessageLevel.Success
        item = bar.createMessage("KD-MSI", text)
        self._message_item = bar.pushWidget(item, level, 10)


def suggested_tile_size(layer: QgsRasterLayer) -> int:
    """The tile size to start at for ``layer``: the engine's coarse-imagery size for pixels of
    ``D.COARSE_PIXEL_M`` metres or more, else its default; halved until the image holds
    ``D.MIN_TILES_PER_SIDE`` tiles a side (a tile-size multiple of 16, 32 at least)."""
    pixel = layer.rasterUnitsPerPixelX()
    units = layer.crs().mapUnits()
    if units == QgsUnitTypes.DistanceUnit.DistanceDegrees:
        pixel *= 111_320.0  # metres per degree at the equator: enough to tell 1 m from 30 m
    elif units != QgsUnitTypes.DistanceUnit.DistanceMeters:
        pixel *= QgsUnitTypes.fromUnitToUnitFactor(units, QgsUnitTypes.DistanceUnit.DistanceMeters)
    tile = D.COARSE_TILE_SIZE if pixel >= D.COARSE_PIXEL_M else D.TILE_SIZE
    side = min(layer.width(), layer.height())
    while tile > 32 and side < D.MIN_TILES_PER_SIDE * tile:
        tile = max(32, int(math.floor(tile / 2 / 16)) * 16)
    return tile


def _combo(parent: QWidget, items: tuple[str, ...], current: str) -> QComboBox:
    combo = QComboBox(parent)
    combo.addItems(list(items))
    combo.setCurrentText(current)
    return combo


def _spin(parent: QWidget, minimum: int, maximum: int, value: int) -> QSpinBox:
    spin = QSpinBox(parent)
    spin.setRange(minimum, maximum)
    spin.setValue(value)
    return spin


def _resumed_steps(steps: list[Step], outputs: list[Path]) -> list[Step]:
    """The steps still to run after an interruption: a step whose output exists finished; a
    training step with a checkpoint goes on from it."""
    remaining = []
    for step, output in zip(steps, outputs):
        checkpoint = checkpoint_of(output).is_file()
        if output.is_file() and not checkpoint:
            continue
        if checkpoint and step.algorithm in TRAINING_ALGORITHMS:
            step.parameters["RESUME"] = True
        remaining.append(step)
    return remaining


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _preview_files(folder: Path) -> tuple[Path, Path]:
    """The quick preview's magnitude and change rasters in the output folder ``folder``."""
    preview = folder / "preview"
    return preview / "cva.tif", preview / "cva_change.tif"


def _folder_outputs(folder: Path) -> list[tuple[str, str]]:
    return [
        ("probability", str(folder / D.PROBABILITY_NAME)),
        ("change", str(folder / D.CHANGE_NAME)),
        ("changes", str(folder / D.CHANGES_NAME)),
    ]
