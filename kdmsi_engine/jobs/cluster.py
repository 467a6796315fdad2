"""Where ``kdmsi batch`` runs its work: in this process, or on a Dask cluster (``--cluster``).

``batch`` hands its work to a *runner*: the training (one call) and then one task per scene.
:class:`InProcess` runs them here, one after another, as ``batch`` always did. :class:`OnDask`
submits them to Dask distributed (``pip install 'kdmsi[cluster]'``):

- ``--cluster local`` or ``local:N`` starts a cluster of N worker processes on this machine
  (default :data:`~kdmsi_engine.defaults.CLUSTER_LOCAL_CORES_PER_WORKER` cores per worker), one
  task at a time each; ``--cluster tcp://HOST:PORT`` joins a running scheduler (``dask
  scheduler`` / ``dask worker``, Kubernetes or HPC queues through Dask's deployment packages).
- **Threads**: every worker limits torch and GDAL to its share of its machine's cores (cores /
  workers on that machine / task threads of the worker), so N workers on one machine do not
  oversubscribe it (:class:`~kdmsi_engine.jobs.dask_plugin.ThreadLimits`).
- **Progress**: the training task's progress events come back as they are (the usual bar or
  JSON lines); scene tasks send their log lines; the runner adds one ``scenes`` stage that
  advances as scenes finish, naming the worker, and logs the dashboard's address first.
- **Failures**: a scene that raises is reported by the scene step itself (``batch`` records it
  and goes on). A worker that dies mid-scene leaves only partial files (written under
  temporary names, :mod:`kdmsi_engine.atomic`); the scheduler gives the scene to another worker,
  and after ``distributed.scheduler.allowed-failures`` (3) deaths the scene is reported as
  failed with that reason.
- **Cancel** (SIGTERM/Ctrl-C of ``kdmsi batch``): queued scenes are dropped and running ones
  stop at their next window through a Dask event, so nothing is left under a final name.

Data paths in the manifest must be readable by every worker under the same name: a shared
filesystem, or object-store paths GDAL reads (``/vsis3/...``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kdmsi_engine import defaults
from kdmsi_engine.errors import CancelledError, InputError, KdmsiError
from kdmsi_engine.progress import Progress, ProgressEvent

logger = logging.getLogger(__name__)

#: Environment variable a worker's thread share is kept in (read by the tasks).
THREADS_ENV = "KDMSI_WORKER_THREADS"
#: How long a cancelled batch waits for running scenes to stop before it closes the cluster.
CANCEL_WAIT_S = 60.0
#: How often the client looks at its tasks (seconds).
POLL_S = 0.2


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: a local cluster of ``workers``, or a scheduler ``address``."""

    workers: int | None = None
    address: str | None = None

    def describe(self) -> str:
        return self.address or f"local cluster of {self.workers} worker(s)"


def parse_cluster(text: str) -> ClusterSpec:
    """``local``, ``local:N`` or ``tcp://HOST:PORT`` (also ``tls://``) -> :class:`ClusterSpec`.

    Raises:
        InputError: anything else.
    """
    value = (text or "").strip()
    if value == "local":
        cores = os.cpu_count() or 1
        return ClusterSpec(workers=max(1, cores // defaults.CLUSTER_LOCAL_CORES_PER_WORKER))
    if value.startswith("local:"):
        count = value[len("local:") :]
        if count.isdigit() and int(count) >= 1:
            return ClusterSpec(workers=int(count))
    parsed = urlparse(value)
    if parsed.scheme in ("tcp", "tls") and parsed.hostname and parsed.port:
        return ClusterSpec(address=value)
    raise InputError(
        f"cluster {text!r} is neither local, local:N (N workers on this machine) nor the "
        "address of a Dask scheduler, tcp://HOST:PORT",
        parameters=("cluster",),
    )


@dataclass
class Task:
    """One unit of work: ``func(*args, progress=...)`` named ``name``."""

    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass
class Outcome:
    """How a task ended: ``done`` (with ``value``), ``error`` (with ``error``) or ``cancelled``."""

    name: str
    status: str
    value: Any = None
    error: str = ""
    worker: str | None = None
    seconds: float = 0.0


class InProcess:
    """Runs the tasks here, one after another, with the job's own progress (``batch`` as ever)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.summary: dict[str, Any] = {}

    def call(self, task: Task) -> Any:
        """Run one task (the training) and return its value; its errors propagate."""
        return task.func(*task.args, progress=self.progress)

    def run(self, tasks: Sequence[Task], *, first: int, total: int) -> Iterator[Outcome]:
        """Run the scene tasks in order; each one's errors are its own to report."""
        for index, task in enumerate(tasks, start=first):
            self.progress.check_cancelled()
            self.progress.log(f"scene {index}/{total}: {task.name}", scene=task.name)
            started = time.monotonic()
            value = task.func(*task.args, progress=self.progress)
            yield Outcome(task.name, "done", value, seconds=time.monotonic() - started)


class OnDask:
    """Runs the tasks on a Dask cluster; see the module docstring."""

    def __init__(self, client: Any, progress: Progress, summary: dict[str, Any]) -> None:
        self.client = client
        self.progress = progress
        self.summary = summary
        self._token = uuid.uuid4().hex[:12]
        self._events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._done_in_stage: dict[str, int] = {}
        self._topic = f"kdmsi-progress-{self._token}"
        from distributed import Event

        self._cancel = Event(f"kdmsi-cancel-{self._token}", client=client)
        client.subscribe_topic(self._topic, self._receive)

    def _receive(self, event: Any) -> None:
        # called on the client's event loop thread: hand over to the job's thread
        _, message = event
        self._events.put((str(message.get("task", "")), message))

    def _submit(self, task: Task, forward: tuple[str, ...]) -> Any:
        return self.client.submit(
            run_on_worker,
            task,
            self._topic,
            self._cancel.name,
            forward,
            key=f"kdmsi-{task.name}-{self._token}",
            pure=False,
        )

    def call(self, task: Task) -> Any:
        """Run one task on a worker with all its progress forwarded; return its value."""
        future = self._submit(task, ("stage", "progress", "log"))
        outcome = next(self._wait({future: task.name}, scene_stage=False))
        if outcome.status == "done":
            return outcome.value
        if outcome.status == "cancelled":
            raise CancelledError(f"cancelled during {task.name}; nothing was written")
        raise KdmsiError(f"{task.name} failed on the cluster: {outcome.error}")

    def run(self, tasks: Sequence[Task], *, first: int, total: int) -> Iterator[Outcome]:
        """Submit every scene task, yield their outcomes as they finish."""
        if first == 1:
            self.progress.stage("scenes", total=total, message=f"{total} scene(s) on the cluster")
        futures = {self._submit(task, ("log",)): task.name for task in tasks}
        yield from self._wait(futures, scene_stage=True)

    def _wait(self, futures: dict[Any, str], *, scene_stage: bool) -> Iterator[Outcome]:
        pending = dict(futures)
        try:
            while pending:
                self._forward_events()
                self.progress.check_cancelled()
                finished = [f for f in pending if f.done()]
                if not finished:
                    time.sleep(POLL_S)
                    continue
                for future in finished:
                    outcome = self._outcome(future, pending.pop(future))
                    self._forward_events()
                    if scene_stage:
                        self.progress.advance(
                            1,
                            message=f"{outcome.name}: {outcome.status}",
                            scene=outcome.name,
                            worker=outcome.worker,
                        )
                    yield outcome
        except CancelledError:
            self._stop(list(pending))
            raise
        finally:
            self._forward_events()

    def _outcome(self, future: Any, name: str) -> Outcome:
        if future.status == "finished":
            result: Outcome = future.result()
            return result
        error = future.exception()
        reason = f"{type(error).__name__}: {error}"
        if type(error).__name__ == "KilledWorker":
            reason = (
                "the workers running this scene died (KilledWorker: out of memory, killed, or "
                "crashed) too many times; see the workers' logs"
            )
        return Outcome(name, "error", error=reason)

    def _stop(self, futures: list[Any]) -> None:
        """Cancel: every task sees the event at its first or next check and stops there.

        The tasks are left to stop themselves (a queued one stops before it starts): cancelling
        a running future would let the cluster close under it, in the middle of a file.
        """
        self._cancel.set()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while any(not f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.client.cancel([f for f in futures if not f.done()])

    def _forward_events(self) -> None:
        while True:
            try:
                name, message = self._events.get_nowait()
            except queue.Empty:
                return
            kind, stage = message.get("kind"), str(message.get("stage", ""))
            data = dict(message.get("data") or {})
            if kind == "stage":
                self._done_in_stage[stage] = 0
                self.progress.stage(stage, total=message.get("total"), message=message["message"])
            elif kind == "progress":
                done = int(message.get("done", 0))
                step = done - self._done_in_stage.get(stage, 0)
                self._done_in_stage[stage] = done
                self.progress.advance(step, message=message.get("message", ""), **data)
            elif kind == "log":
                text = message.get("message", "")
                scene = data.pop("scene", None) or name
                self.progress.log(text if text.startswith(scene) else f"{scene}: {text}", **data)


class _Forward:
    """A task's progress callback: sends the chosen kinds of events to the client."""

    def __init__(self, worker: Any, topic: str, name: str, kinds: tuple[str, ...]) -> None:
        self.worker, self.topic, self.name, self.kinds = worker, topic, name, kinds

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind not in self.kinds:
            return
        self.worker.log_event(
            self.topic,
            {
                "task": self.name,
                "kind": event.kind,
                "stage": event.stage,
                "done": event.done,
                "total": event.total,
                "message": event.message,
                "data": event.data,
            },
        )


class _CancelCheck:
    """Whether the batch was cancelled: the Dask event, asked at most once a second."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._checked = 0.0
        self._set = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked >= 1.0:
            from distributed import Event

            self._checked = now
            with contextlib.suppress(Exception):  # the scheduler is gone: the batch ends anyway
                self._set = bool(Event(self.name).is_set())
        return self._set


def run_on_worker(task: Task, topic: str, cancel: str, forward: tuple[str, ...]) -> Outcome:
    """Run ``task`` in a Dask worker with the worker's thread share and forwarded progress."""
    import rasterio
    from distributed import get_worker

    from kdmsi_engine.environment import GDAL_CACHE_MB

    worker = get_worker()
    threads = os.environ.get(THREADS_ENV, "1")
    progress = Progress(_Forward(worker, topic, task.name, forward), _CancelCheck(cancel))
    started = time.monotonic()
    cache = int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB)) * 2**20
    with rasterio.Env(GDAL_NUM_THREADS=threads, GDAL_CACHEMAX=cache):
        try:
            value = task.func(*task.args, progress=progress)
        except CancelledError:
            return Outcome(task.name, "cancelled", worker=worker.address)
    return Outcome(
        task.name, "done", value, worker=worker.address, seconds=time.monotonic() - started
    )


@contextlib.contextmanager
def open_runner(spec: ClusterSpec | None, progress: Progress) -> Iterator[InProcess | OnDask]:
    """The runner of a batch: :class:`InProcess` without ``spec``, else :class:`OnDask`."""
    if spec is None:
        yield InProcess(progress)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise InputError(
            "running on a cluster needs Dask distributed: pip install 'kdmsi[cluster]' "
            "(or dask distributed) in the engine's Python",
            parameters=("cluster",),
        ) from exc
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Dask logs every worker's start and stop at INFO; the job's own events say enough
        logging.getLogger("distributed").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if spec.workers is not None:
            # Dask's nanny sets OMP_NUM_THREADS=1 (and MKL, OpenBLAS, malloc settings) in this
            # process's environment to pass them to its workers; processes started after the
            # batch must not inherit them
            stack.callback(_restore_environment, dict(os.environ))
            progress.log(f"starting a local Dask cluster of {spec.workers} worker(s)")
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=spec.workers,
                    threads_per_worker=1,
                    processes=True,
                    silence_logs=logging.ERROR,
                )
            )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(spec.address, timeout="30s"))
            except OSError as exc:
                raise InputError(
                    f"no Dask scheduler answers at {spec.address}: {exc}; start one (dask "
                    "scheduler) and its workers (dask worker ADDRESS), or use --cluster local",
                    parameters=("cluster",),
                ) from exc
        summary = _describe(client, spec)
        if not summary["workers"]:
            raise InputError(
                f"the Dask scheduler at {spec.address} has no workers; start some with "
                f"dask worker {spec.address}",
                parameters=("cluster",),
            )
        from kdmsi_engine.jobs.dask_plugin import ThreadLimits

        client.register_plugin(ThreadLimits(summary["workers_per_host"]))
        progress.log(
            f"Dask cluster {summary['scheduler']}: {summary['workers']} worker(s); "
            f"dashboard {summary['dashboard']}",
            dashboard=summary["dashboard"],
            scheduler=summary["scheduler"],
            workers=summary["workers"],
        )
        yield OnDask(client, progress, summary)


def _restore_environment(saved: dict[str, str]) -> None:
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


def _describe(client: Any, spec: ClusterSpec) -> dict[str, Any]:
    info = client.scheduler_info()
    workers = info.get("workers", {})
    per_host: dict[str, int] = {}
    for address in workers:
        host = urlparse(address).hostname or ""
        per_host[host] = per_host.get(host, 0) + 1
    return {
        "cluster": spec.describe(),
        "scheduler": info.get("address", spec.address),
        "dashboard": client.dashboard_link,
        "workers": len(workers),
        "workers_per_host": per_host,
    }
