"""Progress reporting and cancellation shared by every engine job.

A job receives a :class:`Progress` and calls :meth:`Progress.stage` when a new phase starts,
:meth:`Progress.advance` as work is done, :meth:`Progress.log` for messages, and
:meth:`Progress.check_cancelled` between units of work (batches, windows). What happens with the
events depends on the reporter: a progress bar on stderr (the CLI), one JSON object a line on
stdout (``--progress json``, read by the QGIS plugin's worker launcher), or a Python callback.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from kdmsi_engine.errors import CancelledError

logger = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    """One thing a job reports.

    Attributes:
        kind: ``stage`` (a phase starts), ``progress`` (work done), ``log`` (a message),
            ``result`` (the job's result) or ``error`` (the job failed).
        stage: name of the current phase, e.g. ``train`` or ``msi``.
        done: units done in this phase.
        total: units in this phase, or ``None`` when unknown.
        message: free text.
        data: extra numbers (loss, learning rate, device, ...), JSON-serialisable.
    """

    kind: str
    stage: str = ""
    done: int = 0
    total: int | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        payload: dict[str, Any] = {"event": self.kind, "stage": self.stage}
        if self.kind in ("stage", "progress"):
            payload["done"] = self.done
            payload["total"] = self.total
            if self.total:
                payload["fraction"] = round(self.done / self.total, 4)
        if self.message:
            payload["message"] = self.message
        if self.data:
            payload["data"] = self.data
        return json.dumps(payload, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


Callback = Callable[[ProgressEvent], None]


class Progress:
    """Progress and cancellation for one job.

    Args:
        callback: receives every :class:`ProgressEvent`; ``None`` drops them.
        is_cancelled: returns ``True`` once the user asked to stop.
    """

    def __init__(
        self, callback: Callback | None = None, is_cancelled: Callable[[], bool] | None = None
    ) -> None:
        self._callback = callback
        self._is_cancelled = is_cancelled or (lambda: False)
        self._stage = ""
        self._done = 0
        self._total: int | None = None

    @property
    def current_stage(self) -> str:
        return self._stage

    def _emit(self, event: ProgressEvent) -> None:
        if self._callback is not None:
            self._callback(event)

    def stage(self, name: str, total: int | None = None, message: str = "") -> None:
        """Start phase ``name`` with ``total`` units of work."""
        self._stage, self._done, self._total = name, 0, total
        self._emit(ProgressEvent("stage", name, 0, total, message))
        logger.info("%s: %s", name, message or "started")

    def advance(self, n: int = 1, message: str = "", **data: Any) -> None:
        """Report ``n`` more units done in the current phase, with optional numbers."""
        self._done += n
        self._emit(ProgressEvent("progress", self._stage, self._done, self._total, message, data))

    def log(self, message: str, **data: Any) -> None:
        """Report a message (shown in the plugin's log, printed by the CLI)."""
        self._emit(ProgressEvent("log", self._stage, message=message, data=data))
        logger.info("%s", message)

    def result(self, **data: Any) -> None:
        """Report the job's result (paths written, metrics)."""
        self._emit(ProgressEvent("result", self._stage, data=data))

    def check_cancelled(self) -> None:
        """Raise :class:`CancelledError` if the user asked to stop."""
        if self._is_cancelled():
            raise CancelledError(
                f"cancelled during {self._stage or 'the job'}; nothing was written"
            )


class CancelFlag:
    """A thread-safe flag that SIGTERM/SIGINT set, so a job stops between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def install_signal_handlers(self) -> None:
        """Turn SIGTERM into a cancel request (the plugin ends workers with SIGTERM)."""

        def _handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            self.set()

        signal.signal(signal.SIGTERM, _handler)


class JsonReporter:
    """Writes one JSON object a line (``--progress json``), flushed at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    def __call__(self, event: ProgressEvent) -> None:
        self._stream.write(event.to_json() + "\n")
        self._stream.flush()


class BarReporter:
    """A plain-text progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self._stream = stream or sys.stderr
        self._width = width
        self._last_draw = 0.0
        self._stage_started = time.monotonic()
        self._open_line = False

    def _newline(self) -> None:
        if self._open_line:
            self._stream.write("\n")
            self._open_line = False

    def finish(self) -> None:
        """End an open bar line, so a following message starts on its own line."""
        self._newline()
        self._stream.flush()

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "stage":
            self._newline()
            self._stage_started = time.monotonic()
            self._stream.write(f"[{event.stage}] {event.message}".rstrip() + "\n")
        elif event.kind == "progress":
            now = time.monotonic()
            finished = event.total is not None and event.done >= event.total
            if now - self._last_draw < 0.1 and not finished:
                return
            self._last_draw = now
            self._stream.write("\r" + self._bar(event, now - self._stage_started))
            self._open_line = True
            if finished:
                self._newline()
        elif event.kind in ("log", "error"):
            self._newline()
            self._stream.write(f"{event.message}\n")
        self._stream.flush()

    def _bar(self, event: ProgressEvent, elapsed: float) -> str:
        extras = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.data.items()
        )
        if event.total:
            frac = min(1.0, event.done / event.total)
            filled = int(frac * self._width)
            bar = "#" * filled + "-" * (self._width - filled)
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            text = f"{event.stage} [{bar}] {event.done}/{event.total} {elapsed:.0f}s eta {eta:.0f}s"
        else:
            text = f"{event.stage} {event.done} {elapsed:.0f}s"
        return f"{text} {extras} {event.message}".rstrip()


def silent() -> Progress:
    """A Progress that reports nothing and is never cancelled (tests, library use)."""
    return Progress()
