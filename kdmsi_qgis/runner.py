"""Runs KD-MSI Processing algorithms one after the other in the background (the dock's engine).

The dock has no command builder of its own: every button runs the same Processing algorithms as
the toolbox, each through :class:`qgis.core.QgsProcessingAlgRunnerTask` (Processing's task
runner: ``prepareAlgorithm`` in the main thread, ``processAlgorithm`` in a task thread,
``postProcessAlgorithm`` back in the main thread). The algorithm starts the engine in a worker
process; the worker's events reach :class:`DockFeedback`, whose signals carry them to the
interface, so QGIS never waits for the engine. Cancel cancels the feedback, which stops the
worker within seconds (:mod:`kdmsi_qgis.worker`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsProcessingAlgorithm,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
)
from qgis.PyQt.QtCore import QCoreApplication, QObject, pyqtSignal

logger = logging.getLogger(__name__)

PROVIDER_PREFIX = "kdmsi:"


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiRunner", text)


class DockFeedback(QgsProcessingFeedback):
    """Processing feedback whose messages become Qt signals.

    The algorithm calls these methods from the task's thread; a signal emitted there reaches
    the dock's slots in the main thread (queued), so widgets are only touched there.

    Signals:
        progressText: the stage the engine is in (``train: epoch 2/4``).
        detail: progress with numbers (``train 3/8 loss=0.41``).
        logLine: a line for the log (the command, engine messages, worker output).
        errorLine: an error message.
    """

    progressText = pyqtSignal(str)  # noqa: N815 (Qt naming)
    detail = pyqtSignal(str)
    logLine = pyqtSignal(str)  # noqa: N815
    errorLine = pyqtSignal(str)  # noqa: N815

    def __init__(self) -> None:
        super().__init__()
        self.last_error = ""

    def setProgressText(self, text: str) -> None:  # noqa: N802 (QGIS API)
        super().setProgressText(text)
        self.progressText.emit(text)

    def pushDebugInfo(self, text: str) -> None:  # noqa: N802
        super().pushDebugInfo(text)
        self.detail.emit(text)

    def pushInfo(self, text: str) -> None:  # noqa: N802
        super().pushInfo(text)
        self.logLine.emit(text)

    def pushCommandInfo(self, text: str) -> None:  # noqa: N802
        super().pushCommandInfo(text)
        self.logLine.emit("$ " + text)

    def pushConsoleInfo(self, text: str) -> None:  # noqa: N802
        super().pushConsoleInfo(text)
        self.logLine.emit(text)

    def pushWarning(self, text: str) -> None:  # noqa: N802
        super().pushWarning(text)
        self.logLine.emit(text)

    def reportError(self, text: str, fatalError: bool = False) -> None:  # noqa: N802, N803
        super().reportError(text, fatalError)
        if text != self.last_error:  # the engine's error event, then Processing's own report
            self.errorLine.emit(text)
        self.last_error = text


@dataclass
class Step:
    """One algorithm run of a dock action.

    Attributes:
        algorithm: the algorithm's id without the provider (``trainmodel``).
        parameters: its parameters (layer ids, file paths, enum indexes, numbers, text).
        key: the name of the step's outputs in :attr:`ChainResult.outputs` (default: the id).
    """

    algorithm: str
    parameters: dict[str, Any]
    key: str = ""

    @property
    def name(self) -> str:
        return self.key or self.algorithm


@dataclass
class ChainResult:
    """What a dock action did.

    Attributes:
        title: the action (``Train``).
        success: every step finished.
        cancelled: the user cancelled it.
        error: one line that says what went wrong (empty on success).
        outputs: each finished step's outputs by step name, plus what the dock adds (``trust``).
        step: the step that failed or was cancelled (empty on success).
    """

    title: str
    success: bool
    cancelled: bool = False
    error: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    step: str = ""


def create_algorithm(algorithm_id: str) -> QgsProcessingAlgorithm:
    """A fresh instance of a KD-MSI algorithm (from the registry, else from its class)."""
    full_id = algorithm_id if ":" in algorithm_id else PROVIDER_PREFIX + algorithm_id
    registered = QgsApplication.processingRegistry().createAlgorithmById(full_id)
    if registered is not None:
        return registered
    # the dock can live without the provider (tests, a provider removed by the user)
    from kdmsi_qgis.algorithms import ALGORITHM_CLASSES

    for cls in ALGORITHM_CLASSES:
        if cls.ID == full_id.split(":", 1)[1]:
            algorithm = cls()
            algorithm.initAlgorithm()
            return algorithm
    raise KeyError(f"no KD-MSI algorithm {algorithm_id}")


class ChainRunner(QObject):
    """Runs :class:`Step` s one after the other, each as a Processing task.

    Signals:
        progressChanged: percent done of the current step.
        stageChanged: the current stage (from the engine's progress text).
        detail: progress details with numbers.
        logLine: a line for the log.
        stepStarted: the name of the step that starts.
        finished: the :class:`ChainResult`, once, in the main thread.
    """

    progressChanged = pyqtSignal(float)  # noqa: N815 (Qt naming)
    stageChanged = pyqtSignal(str)  # noqa: N815
    detail = pyqtSignal(str)
    logLine = pyqtSignal(str)  # noqa: N815
    stepStarted = pyqtSignal(str)  # noqa: N815
    finished = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.title = ""
        self._steps: list[Step] = []
        self._outputs: dict[str, Any] = {}
        # Processing's task holds references to these: keep them alive while it runs
        self._task: QgsProcessingAlgRunnerTask | None = None
        self._context: QgsProcessingContext | None = None
        self._feedback: DockFeedback | None = None
        self._algorithm: QgsProcessingAlgorithm | None = None
        self._current: Step | None = None
        self._cancelled = False
        #: Descriptions of the tasks this runner started (QGIS announces long tasks by them).
        self.descriptions: set[str] = set()

    def is_running(self) -> bool:
        return self._current is not None

    def start(self, title: str, steps: Sequence[Step]) -> None:
        """Run ``steps`` in order; :attr:`finished` reports the end (never raises)."""
        if self.is_running():
            raise RuntimeError("a KD-MSI action is running")
        self.title = title
        self._steps = list(steps)
        self._outputs = {}
        self._cancelled = False
        self._next()

    def cancel(self) -> None:
        """Stop the running step (its worker ends within seconds) and the steps after it."""
        if not self.is_running():
            return
        self._cancelled = True
        if self._feedback is not None:
            self._feedback.cancel()
        if self._task is not None:
            self._task.cancel()

    def _next(self) -> None:
        if self._cancelled:
            self._finish(False, tr("cancelled by the user"))
            return
        if not self._steps:
            self._finish(True, "")
            return
        step = self._steps.pop(0)
        self._current = step
        self.stepStarted.emit(step.name)
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        feedback = DockFeedback()
        feedback.progressChanged.connect(self.progressChanged)
        feedback.progressText.connect(self.stageChanged)
        feedback.detail.connect(self.detail)
        feedback.logLine.connect(self.logLine)
        feedback.errorLine.connect(self.logLine)
        try:
            algorithm = create_algorithm(step.algorithm)
        except KeyError as exc:
            self._finish(False, str(exc))
            return
        ok, message = algorithm.checkParameterValues(step.parameters, context)
        if not ok:
            self._finish(False, message)
            return
        self._context, self._feedback, self._algorithm = context, feedback, algorithm
        # the constructor runs prepareAlgorithm here, in the main thread
        task = QgsProcessingAlgRunnerTask(algorithm, step.parameters, context, feedback)
        self._task = task
        if task.isCanceled():  # prepareAlgorithm refused
            self._finish(False, feedback.last_error or tr("the algorithm could not start"))
            return
        self.descriptions.add(task.description())
        task.executed.connect(self._step_done)
        QgsApplication.taskManager().addTask(task)

    def _step_done(self, ok: bool, results: dict[str, Any]) -> None:
        step = self._current
        feedback = self._feedback
        self._task = None
        if step is None:
            return
        if self._cancelled or (feedback is not None and feedback.isCanceled()):
            self._cancelled = True
            self._finish(False, tr("cancelled by the user; no output of this step was written"))
            return
        if not ok:
            error = feedback.last_error if feedback is not None else ""
            self._finish(False, error or tr("{} failed").format(step.name))
            return
        self._outputs[step.name] = dict(results or {})
        self._next()

    def _finish(self, success: bool, error: str) -> None:
        step = self._current.name if self._current is not None and not success else ""
        result = ChainResult(
            title=self.title,
            success=success,
            cancelled=self._cancelled,
            error=error,
            outputs=dict(self._outputs),
            step=step,
        )
        self._current = None
        self._steps = []
        self._task = None
        self._context = self._feedback = self._algorithm = None
        self.finished.emit(result)
