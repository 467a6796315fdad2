"""The Dask worker plugin of ``kdmsi batch --cluster`` (imported only where Dask is installed)."""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlparse

from distributed import WorkerPlugin

from kdmsi_engine.jobs.cluster import THREADS_ENV

logger = logging.getLogger(__name__)


class ThreadLimits(WorkerPlugin):
    """Dask worker plugin: the engine's process settings and a share of the cores per worker.

    ``workers_per_host`` counts the workers on each machine when the batch starts; a worker
    takes ``cores // (workers on its machine * its task threads)`` threads (at least 1) for
    torch and GDAL, and the engine's process settings (PROJ data, OpenMP waiting, GDAL cache).
    Registered once per batch; Dask runs it on every worker, also one that joins or restarts
    later.
    """

    name = "kdmsi-thread-limits"

    def __init__(self, workers_per_host: dict[str, int]) -> None:
        self.workers_per_host = dict(workers_per_host)

    def setup(self, worker: Any) -> None:
        from kdmsi_engine.environment import configure_process, usable_cpus

        configure_process()
        host = urlparse(worker.address).hostname or ""
        share = self.workers_per_host.get(host, 1) * max(1, int(worker.state.nthreads))
        threads = max(1, usable_cpus() // share)
        os.environ[THREADS_ENV] = str(threads)
        os.environ["GDAL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        # the scene step's imports (torch, GDAL, the engine) once here, while the batch checks
        # its scenes, rather than in the first scene's time
        import kdmsi_engine.jobs.batch  # noqa: F401

        logger.info("worker %s: %d thread(s)", worker.address, threads)
