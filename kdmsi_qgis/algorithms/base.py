"""The base of every KD-MSI Processing algorithm: parameters shared by many, and running the
engine command in a worker process with progress, log and cancel wired to Processing."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
    QgsProject,
)
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QIcon

from kdmsi_qgis import layers, worker
from kdmsi_qgis.contract import D

logger = logging.getLogger(__name__)

#: Choice lists, the engine's default first (enum parameters default to their first option).
BACKBONES = D.BACKBONE_CHOICES
WEIGHTS = D.WEIGHTS
METHODS = D.MAP_METHODS
MODEL_FILTER = "KD-MSI model (*.kdmsi);;All files (*.*)"


def advanced(parameter: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """Mark ``parameter`` as an advanced one."""
    parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
    return parameter


class FeedbackSink:
    """Turns engine events into Processing feedback (progress bar, progress text, log)."""

    def __init__(self, feedback: QgsProcessingFeedback) -> None:
        self.feedback = feedback

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        stage = str(event.get("stage") or "")
        message = str(event.get("message") or "")
        if kind == "stage":
            self.feedback.setProgressText(f"{stage}: {message}" if message else stage)
            self.feedback.setProgress(0.0)
        elif kind == "progress":
            fraction = event.get("fraction")
            if fraction is not None:
                self.feedback.setProgress(100.0 * float(fraction))
            data = event.get("data") or {}
            if data or message:
                extras = " ".join(f"{k}={_short(v)}" for k, v in data.items())
                total = event.get("total")
                count = f"{event.get('done')}/{total}" if total else f"{event.get('done')}"
                self.feedback.pushDebugInfo(f"{stage} {count} {extras} {message}".rstrip())
        elif kind == "log":
            self.feedback.pushInfo(message)
        elif kind == "error":
            self.feedback.reportError(message, False)
        elif kind == "result":
            self.feedback.setProgress(100.0)

    def log(self, line: str) -> None:
        self.feedback.pushConsoleInfo(line)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class EngineCall:
    """One engine command, built from an algorithm's parameters by ``build_call``.

    Attributes:
        command: the engine sub-command (``grid``, ``train``, ``run``, ...).
        arguments: its positional arguments and options, one list item each (the worker adds
            ``--progress json``, ``--device`` and ``--overwrite``).
        device: ``--device`` for the commands that take one, else ``None``.
        outputs: the algorithm's output values known before the run (output name -> path).
    """

    command: str
    arguments: list[str]
    device: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)


class KdmsiAlgorithm(QgsProcessingAlgorithm):
    """Base class: subclasses set the names and implement ``initAlgorithm`` and ``build_call``
    (and ``finish`` where the outputs need more than the paths the call was built with).

    One method builds the engine command (:meth:`build_call`, testable without running
    anything), one runs it (:meth:`processAlgorithm`), as QGIS's GDAL algorithms do with
    ``getConsoleCommands``. Parameter names are the upper-case constants of each class; their
    values are stable, so models and scripts that call ``processing.run("kdmsi:...", {...})``
    keep working.
    """

    BEFORE = "BEFORE"
    AFTER = "AFTER"
    LABELS = "LABELS"
    LABEL_FIELD = "LABEL_FIELD"
    MODEL = "MODEL"
    TILE_SIZE = "TILE_SIZE"
    BANDS = "BANDS"
    DEVICE = "DEVICE"
    OUTPUT = "OUTPUT"
    RESUME = "RESUME"

    ID = ""
    DISPLAY = ""
    GROUP = ""
    GROUP_ID = ""
    HELP = ""

    def tr(self, text: str) -> str:
        return QCoreApplication.translate(type(self).__name__, text)

    def createInstance(self) -> KdmsiAlgorithm:  # noqa: N802 (QGIS API)
        return type(self)()

    def name(self) -> str:
        return self.ID

    def displayName(self) -> str:  # noqa: N802
        return self.tr(self.DISPLAY)

    def group(self) -> str:
        return self.tr(self.GROUP)

    def groupId(self) -> str:  # noqa: N802
        return self.GROUP_ID

    def shortHelpString(self) -> str:  # noqa: N802
        return self.tr(self.HELP)

    def icon(self) -> QIcon:
        return QIcon(str(layers.resource_path("icons", "kdmsi.svg")))

    def flags(self) -> QgsProcessingAlgorithm.Flags:
        return super().flags() | QgsProcessingAlgorithm.Flag.FlagCanCancel

    # ------------------------------------------------------------- shared parameters

    def add_scene_parameters(self) -> None:
        """Before and after rasters; in a project with two or more rasters they start on two
        different layers, the earlier date first (:func:`kdmsi_qgis.layers.guess_pair`)."""
        before, after = layers.guess_pair(QgsProject.instance())
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.BEFORE,
                self.tr("Before image (date 1)"),
                defaultValue=before.id() if before is not None else None,
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.AFTER,
                self.tr("After image (date 2)"),
                defaultValue=after.id() if after is not None else None,
            )
        )

    def add_resume_parameter(self) -> None:
        self.addParameter(
            advanced(
                QgsProcessingParameterBoolean(
                    self.RESUME,
                    self.tr("Continue an interrupted training from its checkpoint"),
                    False,
                )
            )
        )

    def resume_arguments(
        self, parameters: dict[str, Any], context: QgsProcessingContext
    ) -> list[str]:
        return ["--resume"] if self.parameterAsBoolean(parameters, self.RESUME, context) else []

    def add_labels_parameters(self) -> None:
        self.addParameter(
            QgsProcessingParameterVectorLayer(
                self.LABELS,
                self.tr("Weak labels (polygons or points: 1 changed, 0 unchanged)"),
                [
                    QgsProcessing.SourceType.TypeVectorPolygon,
                    QgsProcessing.SourceType.TypeVectorPoint,
                ],
            )
        )
        self.addParameter(
            QgsProcessingParameterField(
                self.LABEL_FIELD,
                self.tr("Label field (integer: 1 changed, 0 unchanged)"),
                defaultValue="change",
                parentLayerParameterName=self.LABELS,
                type=QgsProcessingParameterField.DataType.Numeric,
            )
        )

    def add_model_parameter(self, description: str) -> None:
        self.addParameter(
            QgsProcessingParameterFile(
                self.MODEL,
                description,
                behavior=QgsProcessingParameterFile.Behavior.File,
                fileFilter=MODEL_FILTER,
            )
        )

    def add_tile_size_parameter(self, default: int = D.TILE_SIZE) -> None:
        self.addParameter(
            QgsProcessingParameterNumber(
                self.TILE_SIZE,
                self.tr("Tile size (pixels)"),
                type=QgsProcessingParameterNumber.Type.Integer,
                defaultValue=default,
                minValue=32,
                maxValue=4096,
            )
        )

    def add_bands_parameter(self) -> None:
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.BANDS,
                    self.tr("Bands (comma-separated, 1-based; empty = every band)"),
                    defaultValue="",
                    optional=True,
                )
            )
        )

    def add_device_parameter(self) -> None:
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.DEVICE,
                    self.tr("Device (auto, cpu, cuda or cuda:N)"),
                    defaultValue="auto",
                )
            )
        )

    def add_enum(
        self,
        name: str,
        description: str,
        options: tuple[str, ...],
        default: str | None = None,
        adv: bool = False,
    ) -> None:
        parameter = QgsProcessingParameterEnum(
            name,
            description,
            options=list(options),
            defaultValue=options.index(default) if default is not None else 0,
            allowMultiple=False,
        )
        self.addParameter(advanced(parameter) if adv else parameter)

    def add_int(
        self, name: str, description: str, default: int, minimum: int = 1, adv: bool = False
    ) -> None:
        parameter = QgsProcessingParameterNumber(
            name,
            description,
            type=QgsProcessingParameterNumber.Type.Integer,
            defaultValue=default,
            minValue=minimum,
        )
        self.addParameter(advanced(parameter) if adv else parameter)

    def add_float(
        self, name: str, description: str, default: float, minimum: float = 0.0, adv: bool = False
    ) -> None:
        parameter = QgsProcessingParameterNumber(
            name,
            description,
            type=QgsProcessingParameterNumber.Type.Double,
            defaultValue=default,
            minValue=minimum,
        )
        self.addParameter(advanced(parameter) if adv else parameter)

    # ------------------------------------------------------------- reading parameters

    def scene_arguments(
        self, parameters: dict[str, Any], context: QgsProcessingContext
    ) -> list[str]:
        before = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.BEFORE, context), self.tr("Before image")
        )
        after = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.AFTER, context), self.tr("After image")
        )
        if Path(before).resolve() == Path(after).resolve():
            raise QgsProcessingException(
                self.tr("the before and after images are the same file; choose two dates")
            )
        return [before, after]

    def prepareAlgorithm(  # noqa: N802 (QGIS API)
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> bool:
        """Runs in the main thread: export a weak-label layer that is not a file here, since
        project layers (memory layers included) belong to the main thread."""
        self._labels_args: list[str] | None = None
        self._labels_error = ""
        if self.parameterDefinition(self.LABELS) is not None:
            try:
                self._labels_args = self._resolve_labels(parameters, context, feedback)
            except QgsProcessingException as exc:
                # raised again from processAlgorithm, so that callers get the message itself
                self._labels_error = str(exc)
        return True

    def labels_arguments(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> list[str]:
        """``--labels FILE --label-field NAME`` (resolved in :meth:`prepareAlgorithm`)."""
        if getattr(self, "_labels_error", ""):
            raise QgsProcessingException(self._labels_error)
        prepared = getattr(self, "_labels_args", None)
        if prepared is not None:
            return prepared
        return self._resolve_labels(parameters, context, feedback)

    def _resolve_labels(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> list[str]:
        layer = self.parameterAsVectorLayer(parameters, self.LABELS, context)
        path = layers.vector_source(layer, self.tr("Weak labels"), context, feedback)
        field = self.parameterAsString(parameters, self.LABEL_FIELD, context) or "change"
        if layer is not None and layer.fields().indexFromName(field) < 0:
            raise QgsProcessingException(
                self.tr(
                    "the weak-label layer has no field {}; pick the field that holds 1/0"
                ).format(field)
            )
        return ["--labels", path, "--label-field", field]

    def bands_arguments(
        self, parameters: dict[str, Any], context: QgsProcessingContext
    ) -> list[str]:
        text = (self.parameterAsString(parameters, self.BANDS, context) or "").replace(" ", "")
        return ["--bands", text] if text else []

    def enum_value(
        self,
        parameters: dict[str, Any],
        name: str,
        options: tuple[str, ...],
        context: QgsProcessingContext,
    ) -> str:
        return options[self.parameterAsEnum(parameters, name, context)]

    def number(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext) -> str:
        value = self.parameterAsDouble(parameters, name, context)
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    def device(self, parameters: dict[str, Any], context: QgsProcessingContext) -> str:
        return (self.parameterAsString(parameters, self.DEVICE, context) or "auto").strip()

    def output_file(
        self, parameters: dict[str, Any], name: str, context: QgsProcessingContext
    ) -> str:
        path = layers.destination_path(self.parameterAsFileOutput(parameters, name, context))
        if not path:
            raise QgsProcessingException(self.tr("no output file given for {}").format(name))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return path

    def output_layer(
        self, parameters: dict[str, Any], name: str, context: QgsProcessingContext
    ) -> str:
        path = layers.destination_path(self.parameterAsOutputLayer(parameters, name, context))
        if not path:
            raise QgsProcessingException(self.tr("no output file given for {}").format(name))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------- running the engine

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        """The engine command these parameters ask for (each algorithm implements it)."""
        raise NotImplementedError

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        """The algorithm's outputs after the engine ran (default: the call's outputs)."""
        return dict(call.outputs)

    def processAlgorithm(  # noqa: N802 (QGIS API)
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        call = self.build_call(parameters, context, feedback)
        result = self.run_engine(call.command, call.arguments, feedback, device=call.device)
        return self.finish(call, result or {}, context, feedback)

    def run_engine(
        self,
        command: str,
        arguments: list[str],
        feedback: QgsProcessingFeedback,
        *,
        device: str | None = None,
    ) -> dict[str, Any]:
        """Run ``kdmsi COMMAND ARGUMENTS`` in a worker; return its result dictionary.

        Processing outputs are files the user chose (Processing asked before replacing them),
        so ``--overwrite`` is always passed.

        Raises:
            QgsProcessingException: the engine refused the input (its one-line reason), the
                worker failed, or the user cancelled.
        """
        argv = worker.engine_command(command, arguments, device=device, overwrite=True)
        feedback.pushCommandInfo(" ".join(shlex.quote(a) for a in argv))
        sink = FeedbackSink(feedback)
        result = worker.run_engine(
            argv, on_event=sink.event, on_log=sink.log, is_cancelled=feedback.isCanceled
        )
        if result.cancelled:
            raise QgsProcessingException(
                self.tr("Cancelled: the worker was stopped and no output of this step was written")
            )
        if not result.success:
            raise QgsProcessingException(self.error_text(result.error, result.error_parameters))
        return result.result

    def error_text(self, message: str, parameters: list[str]) -> str:
        """The engine's message, naming the dialog's fields it is about.

        The engine names its parameters by keyword (``tile_size``); an algorithm's parameter
        of the same name in capitals (``TILE_SIZE``) is the field the user filled in.
        """
        fields = []
        for name in parameters:
            definition = self.parameterDefinition(name.upper())
            if definition is not None:
                fields.append(definition.description())
        if not fields:
            return message
        return self.tr("{} (see: {})").format(message, "; ".join(fields))

    def add_to_load(
        self,
        context: QgsProcessingContext,
        path: str,
        kind: str,
        output_name: str,
    ) -> None:
        """Load ``path`` into the project when the algorithm finishes (dialog runs), styled."""
        if not path or not Path(path).exists():
            return
        details = QgsProcessingContext.LayerDetails(
            layers.STYLES.get(kind, ("", Path(path).stem))[1], context.project(), output_name
        )
        details.setPostProcessor(layers.StyleAndGroup.create(kind))
        context.addLayerToLoadOnCompletion(path, details)

    def style_on_load(self, context: QgsProcessingContext, path: str, kind: str) -> None:
        """Style a destination output that Processing loads itself."""
        if context.willLoadLayerOnCompletion(path):
            context.layerToLoadOnCompletionDetails(path).setPostProcessor(
                layers.StyleAndGroup.create(kind)
            )
