"""Plugin settings: which Python runs the engine, and where the engine's code is.

The engine runs in a separate worker process, started with the interpreter named by the
``kdmsi/python`` setting, so a user can point the plugin at any environment that has torch (a
CUDA build included) while QGIS itself stays torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from qgis.core import QgsSettings

logger = logging.getLogger(__name__)

#: QgsSettings key of the Python interpreter that runs the engine.
PYTHON_KEY = "kdmsi/python"
#: QgsSettings key of the last device chosen in the dock (``auto``, ``cpu``, ``cuda:0``).
DEVICE_KEY = "kdmsi/device"
#: Environment variable that overrides the interpreter (headless runs, ``qgis_process``).
PYTHON_ENV = "KDMSI_PYTHON"

PLUGIN_DIR = Path(__file__).resolve().parent


def engine_root() -> Path | None:
    """The folder to put on ``PYTHONPATH`` so that ``import kdmsi_engine`` finds the engine.

    The packaged plugin carries the engine inside its own folder; a development checkout has it
    beside the plugin folder. ``None`` when neither exists (the interpreter must then have the
    engine installed, e.g. ``pip install kdmsi``).
    """
    for candidate in (PLUGIN_DIR, PLUGIN_DIR.parent):
        if (candidate / "kdmsi_engine" / "__init__.py").is_file():
            return candidate
    return None


def default_python() -> str:
    """The ``.venv`` beside the plugin's repository if there is one, else ``python3`` on PATH."""
    for root in (PLUGIN_DIR.parent, PLUGIN_DIR):
        for relative in (("bin", "python"), ("Scripts", "python.exe")):
            candidate = root.joinpath(".venv", *relative)
            if candidate.is_file():
                return str(candidate)
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found:
            return found
    return sys.executable


def python_executable() -> str:
    """The interpreter that runs the engine: ``$KDMSI_PYTHON``, the setting, or the default."""
    from_env = os.environ.get(PYTHON_ENV, "").strip()
    if from_env:
        return from_env
    configured = str(QgsSettings().value(PYTHON_KEY, "", type=str) or "").strip()
    return configured or default_python()


def set_python_executable(path: str) -> None:
    """Store the interpreter in the settings (an empty string restores the default)."""
    QgsSettings().setValue(PYTHON_KEY, path.strip())


def saved_device() -> str:
    return str(QgsSettings().value(DEVICE_KEY, "auto", type=str) or "auto")


def save_device(device: str) -> None:
    QgsSettings().setValue(DEVICE_KEY, device)
