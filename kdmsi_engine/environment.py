"""Process-wide settings a job needs before torch and GDAL start.

Importing the engine changes nothing; the command line calls :func:`configure_process` first
thing in ``main()``, and a program that uses the engine as a library may call it too.
"""

from __future__ import annotations

import os
from pathlib import Path

#: GDAL block cache for a job, in MB: GDAL's own default (5 % of RAM) grows peak memory with
#: the scene (measured: ``detect`` +55 % from 2048 to 8192 px).
GDAL_CACHE_MB = "128"


def configure_process() -> None:
    """Set the environment a job runs best in; a user's own settings are kept."""
    ensure_proj_data()
    # OpenMP threads that spin at barriers made torch 6x slower on a machine whose cores are
    # shared (QGIS, other jobs); sleeping costs nothing measurable when the machine is idle.
    # It must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHE_MB)


def ensure_proj_data() -> None:
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


def torchrun_process() -> tuple[int, int]:
    """``(rank, world size)`` of a process that ``torchrun`` started; ``(0, 1)`` otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)
