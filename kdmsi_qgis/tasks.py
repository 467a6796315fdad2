"""A QgsTask that runs one engine command in the background (used by the dock widget).

The task's thread runs :func:`kdmsi_qgis.worker.run_engine`; engine events and log lines come
back to the main thread through Qt signals, so the interface never waits for the worker.
Cancelling the task (the dock's Cancel button, or the task manager) terminates the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from kdmsi_qgis import worker

logger = logging.getLogger(__name__)


class EngineTask(QgsTask):
    """Runs ``argv`` (from :func:`kdmsi_qgis.worker.engine_command`) as a QGIS task.

    Signals:
        engineEvent: an engine JSON event (dict).
        logLine: a log line.
        jobDone: the :class:`kdmsi_qgis.worker.EngineResult`, emitted once in the main thread.
    """

    engineEvent = pyqtSignal(object)  # noqa: N815 (Qt naming)
    logLine = pyqtSignal(str)  # noqa: N815
    jobDone = pyqtSignal(object)  # noqa: N815

    def __init__(self, description: str, argv: Sequence[str]) -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.argv = list(argv)
        self.result: worker.EngineResult | None = None

    def run(self) -> bool:
        self.result = worker.run_engine(
            self.argv,
            on_event=self._on_event,
            on_log=self.logLine.emit,
            is_cancelled=self.isCanceled,
        )
        return self.result.success

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("stage", "progress"):
            fraction = event.get("fraction")
            self.setProgress(100.0 * float(fraction) if fraction is not None else 0.0)
        self.engineEvent.emit(event)

    def finished(self, result: bool) -> None:  # noqa: ARG002 (QgsTask API)
        if self.result is None:  # cancelled before it started
            self.result = worker.EngineResult(
                success=False,
                exit_code=None,
                error="cancelled before it started",
                cancelled=True,
                command=self.argv,
            )
        self.jobDone.emit(self.result)
