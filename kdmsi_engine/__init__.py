"""KD-MSI change detection engine.

Weakly supervised change detection for pairs of georeferenced rasters: knowledge distillation
from a CAM teacher to a sigmoid student, multiscale sigmoid inference (MSI) to make pseudo pixel
labels, and a Siamese DeepLabV3+ change detector trained on them. The engine has no QGIS imports;
the QGIS plugin runs it in a separate worker process through the ``kdmsi`` command line.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


def _ensure_proj_data() -> None:
    """Point PROJ at the system's data when a virtual environment hides it.

    A venv made with ``--system-site-packages`` uses Debian's pyproj and GDAL, which look for
    ``proj.db`` where the system puts it; setting the variable only when it is missing keeps a
    user's own choice.
    """
    if os.environ.get("PROJ_DATA") or os.environ.get("PROJ_LIB"):
        return
    for candidate in (Path("/usr/share/proj"), Path("/usr/local/share/proj")):
        if (candidate / "proj.db").is_file():
            os.environ["PROJ_DATA"] = str(candidate)
            os.environ["PROJ_LIB"] = str(candidate)
            return


def _quiet_openmp() -> None:
    """Let OpenMP threads sleep at barriers instead of spinning.

    With spinning threads, torch on a machine whose cores are shared (QGIS, other jobs) was
    measured 6x slower; sleeping costs nothing measurable when the machine is idle. It must be
    set before torch loads its OpenMP runtime, so it happens when the engine is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_ensure_proj_data()
_quiet_openmp()
