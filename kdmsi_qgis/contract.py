"""The engine's defaults and names, read from the engine the plugin runs (one source).

:mod:`kdmsi_engine.defaults` imports only the standard library, so it is loaded here straight
from its file, without importing the engine package (whose import prepares torch and GDAL for
the worker process, which QGIS does not need). The Processing algorithms and the dock take
every default and choice list from it, so they always agree with ``kdmsi run``.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from types import ModuleType

from kdmsi_qgis import settings

MODULE_NAME = "kdmsi_engine_defaults"


@lru_cache(maxsize=1)
def engine_defaults() -> ModuleType:
    """The engine's ``defaults`` module (bundled with the plugin or beside it in a checkout)."""
    root = settings.engine_root()
    if root is None:
        raise ImportError(
            "the KD-MSI engine (kdmsi_engine) is not beside the plugin; reinstall the plugin zip"
        )
    path = root / "kdmsi_engine" / "defaults.py"
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the engine's defaults from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


D = engine_defaults()
