"""Atomic outputs: write under a temporary name, rename when complete.

Every file the engine writes goes through :func:`atomic_output`, so a cancelled, crashed or
killed job never leaves a half-written file under the final name, and an existing file is only
replaced when the user asked for it (``overwrite=True``). Call :func:`check_output` for every
output *before* starting work, so a job that cannot write its results fails at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from kdmsi_engine.errors import KdmsiError, OutputError

PARTIAL_MARK = ".partial-"


def check_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Check that ``path`` can be written; return it as an absolute :class:`Path`.

    Raises:
        OutputError: the file exists and ``overwrite`` is false, the folder is missing or not
            writable, or the path is a folder.
    """
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise OutputError(f"output {target} is a folder; give a file name")
    if target.exists() and not overwrite:
        raise OutputError(
            f"output {target} already exists; choose another name or allow replacing it",
            parameters=("overwrite",),
        )
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable; choose another folder")
    return target


def check_output_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Check (and by default create) an output folder; return it as an absolute path."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file, not a folder; choose a folder name")
    if not folder.exists():
        if not create:
            raise OutputError(f"output folder {folder} does not exist; create it first")
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another folder")
    return folder


def _host() -> str:
    """This machine's name, made safe for a file name."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def partial_path(target: Path) -> Path:
    """A hidden temporary name beside ``target`` that keeps its extension (GDAL needs it).

    The name holds the host and process id of the writer, so :func:`remove_stale_partials` can
    tell a file in progress from one left by a killed job.
    """
    token = f"{_host()}-{os.getpid()}-{secrets.token_hex(3)}"
    return target.with_name(f".{target.stem}{PARTIAL_MARK}{token}{target.suffix}")


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary files of ``target`` whose writer on this host no longer runs.

    A SIGKILLed job cannot clean up after itself; the next write of the same output does.
    Files written from another host (a shared network folder) are left alone.
    """
    prefix = f".{target.stem}{PARTIAL_MARK}{_host()}-"
    removed = []
    for path in target.parent.glob(f".{target.stem}{PARTIAL_MARK}*{target.suffix}"):
        rest = path.name[len(prefix) :] if path.name.startswith(prefix) else ""
        pid_text = rest.split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        _remove(path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    for candidate in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
    aux = Path(f"{path}.aux.xml")
    with contextlib.suppress(FileNotFoundError):
        aux.unlink()


_GDAL_LOGGERS = ("rasterio._env", "fiona._env", "rasterio._io", "rasterio._base")
_DISK_FULL_TEXT = ("no space left on device", "disk is full", "disk full")
_MIN_FREE_BYTES = 16 * 1024


class _GdalErrors(logging.Handler):
    """Collects GDAL errors logged by rasterio/fiona while an output is written."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _disk_full(folder: Path, texts: list[str]) -> bool:
    if any(mark in text.lower() for text in texts for mark in _DISK_FULL_TEXT):
        return True
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _MIN_FREE_BYTES


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    The temporary file is removed if the block raises (cancel included). A full disk becomes an
    :class:`OutputError` that names the file.

    Example:
        >>> with atomic_output("change.tif", overwrite=False) as tmp:  # doctest: +SKIP
        ...     write_raster(tmp)
    """
    target = check_output(path, overwrite=overwrite)
    remove_stale_partials(target)
    tmp = partial_path(target)
    errors = _GdalErrors()
    loggers = [logging.getLogger(name) for name in _GDAL_LOGGERS]
    for log in loggers:
        log.addHandler(errors)
    full_message = f"disk full while writing {target}; free space or choose another folder"
    try:
        try:
            yield tmp
        except (KdmsiError, KeyboardInterrupt, OSError):
            raise
        except Exception as exc:  # GDAL/SQLite report a full disk as their own errors
            if _disk_full(target.parent, [str(exc), *errors.messages]):
                raise OutputError(full_message) from exc
            raise
        if not tmp.exists():
            raise OutputError(f"nothing was written for {target}")
        if _disk_full(target.parent, errors.messages):  # GDAL logs write errors, raises nothing
            raise OutputError(full_message)
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        if exc.errno == errno.ENOSPC:
            raise OutputError(full_message) from exc
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove(tmp)
        raise
    finally:
        for log in loggers:
            log.removeHandler(errors)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write a small text file (JSON records) atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
