"""Process-wide settings a job needs before torch and GDAL start.

Importing the engine changes nothing; the command line calls :func:`configure_process` first
thing in ``main()``, and a program that uses the engine as a library may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h) and the value given to both: buffers up to 1 GiB come
#: from the heap and freed memory stays mapped up to 1 GiB.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
ALLOCATOR_KEEP_BYTES = 1 << 30

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
    keep_allocations_mapped()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def keep_allocations_mapped() -> bool:
    """Make glibc keep freed training buffers instead of returning them to the OS each step.

    glibc serves buffers above its mmap threshold (at most 32 MiB when it adapts itself) with
    fresh ``mmap`` calls and unmaps them on free; a ResNet50 step at batch 8 allocates and frees
    hundreds of such activations, and every new one is zeroed page by page by the kernel. Measured
    (issue 14) this made the float32 step about a quarter slower. Raising the mmap and trim
    thresholds keeps the memory mapped for the next step; the peak stays what the step needs.
    Linux with glibc only; elsewhere (and with another C library) nothing is changed.

    Returns:
        Whether the thresholds were set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    done = all(
        mallopt(option, ALLOCATOR_KEEP_BYTES) == 1
        for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)
    )
    if not done:
        logger.debug("mallopt refused the allocator thresholds; glibc's defaults stay")
    return done


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
