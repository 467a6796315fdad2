"""Training on several processes: ``torchrun`` and DistributedDataParallel over the one loop.

``torchrun --nproc_per_node N -m kdmsi_engine train ...`` (or ``train-detector``) starts N copies
of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in their environment. This module turns those copies into one training run:

- **process group**: the two training commands open it (:func:`launched`) from those variables,
  and only when ``WORLD_SIZE > 1``: a plain run never touches :mod:`torch.distributed` and trains
  bit for bit as before. gloo for a CPU device, NCCL for CUDA, where each process takes the GPU
  of its local rank (``--device auto`` or ``cuda``).
- **batch**: ``batch_size`` is the *global* batch, the one the learning rate is tuned for, split
  evenly over the processes (each takes ``batch_size / N`` tile pairs a step, so it must divide).
  The same command then means the same optimisation with 1 or N processes, and the defaults keep
  the paper's meaning. Both numbers are logged and written to the model's metadata.
- **data**: each epoch's seeded order (:func:`~kdmsi_engine.training.common.epoch_order`) is
  padded to a multiple of N by wrapping to its start (as torch's ``DistributedSampler`` does) and
  process ``r`` takes every N-th sample from ``r`` (:func:`shard`), so global step ``k`` trains on
  the same tiles as step ``k`` of one process at the same global batch. Process ``r`` augments
  with its own generator stream (``1 + r``; rank 0's is the one-process stream).
- **networks**: the loop wraps each trained network in
  :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`wrap`), which averages gradients
  over the processes. KD-MSI's teacher and student get one wrapper each: the student's target
  (the teacher's CAM) is detached, so the two graphs meet only in the summed loss.
- **loss**: each step's loss and parts are averaged over the processes, weighted by their
  samples (:func:`reduce_weighted`), for the log, the history and the finite-loss check (so all
  processes stop together).
- **cancel**: a process asked to stop tells the others (:func:`any_process`), so all leave at the
  same step; a process that skips an empty batch skips it everywhere.
- **files**: only rank 0 writes checkpoints and the model file; the others wait at a
  :func:`barrier`. A resume loads the checkpoint in every process (the output folder must be on
  a filesystem every node sees).

What differs from one process at the same global batch: BatchNorm normalises each process's part
of the batch by that part's statistics (as DDP always does; SyncBatchNorm would share them, but
it runs on GPUs only), and a loss that is a mean over pixels (the detector's labelled pixels,
KD-MSI's valid cells) is a mean of per-process means. Everything else (order, learning rate,
gradient) is the same computation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdmsi_engine.device import resolve_device
from kdmsi_engine.errors import DeviceError, InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a (possibly one-process) training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: ``gloo`` or ``nccl``; ``None`` without a process group
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports progress and writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this process's collective operations run (NCCL needs CUDA tensors)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = Distributed()


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current() -> Distributed:
    """This process's place in the run: :data:`SINGLE` unless a process group is open."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    world = dist.get_world_size()
    if world <= 1:
        return SINGLE
    return Distributed(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def process_device(spec: str) -> torch.device:
    """The device of this process: ``auto``/``cuda`` become the GPU of its local rank."""
    text = (spec or "auto").strip().lower()
    if launched_world_size() > 1 and text in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DeviceError(
                f"process {local} on this node has no GPU of its own ({torch.cuda.device_count()} "
                "found); start at most one process per GPU (torchrun --nproc_per_node)",
                parameters=("device",),
            )
        return torch.device("cuda", local)
    return resolve_device(spec)


@contextlib.contextmanager
def launched(device: str) -> Iterator[str]:
    """Open the process group for a training command started by torchrun; yield its device.

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing is opened and ``device`` comes back as
    given. The group is closed when the command ends, however it ends.
    """
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if not dist.is_available():
        raise DeviceError("this torch has no torch.distributed; train with one process")
    chosen = process_device(device)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info(
        "process %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, chosen
    )
    try:
        yield str(chosen)
    finally:
        dist.destroy_process_group()


def check_global_batch(batch_size: int, world_size: int | None = None) -> None:
    """Refuse a global batch the processes cannot share evenly."""
    world = launched_world_size() if world_size is None else world_size
    if world > 1 and batch_size % world:
        raise InputError(
            f"the batch size {batch_size} is the global batch, shared by the {world} training "
            f"processes, and must be a multiple of {world}; use e.g. {world * max(1, batch_size // world)}",
            parameters=("batch_size",),
        )


def shard(order: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s part of one epoch's sample order.

    The order is padded to a multiple of ``world_size`` with its own first samples, then every
    ``world_size``-th sample from ``rank`` on: all parts are the same length and disjoint but
    for the padding, and the first ``b`` samples of every part together are the first
    ``world_size * b`` samples of the order.
    """
    if world_size <= 1:
        return list(order)
    per_process = math.ceil(len(order) / world_size)
    padded = list(order) + list(order[: per_process * world_size - len(order)])
    return padded[rank::world_size]


def wrap(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` in DistributedDataParallel (gradients averaged over the processes)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(network, device_ids=[device.index])
    return DistributedDataParallel(network)


def reduce_weighted(
    context: Distributed, values: dict[str, float], count: int
) -> tuple[dict[str, float], int]:
    """The count-weighted mean of ``values`` over the processes and the total count."""
    if not context.active:
        return values, count
    names = list(values)
    sums = torch.tensor(
        [values[name] * count for name in names] + [float(count)],
        dtype=torch.float64,
        device=context.device,
    )
    dist.all_reduce(sums)
    total = float(sums[-1])
    means = {name: float(sums[i]) / total if total else math.nan for i, name in enumerate(names)}
    return means, int(round(total))


def any_process(context: Distributed, *flags: bool) -> tuple[bool, ...]:
    """For each flag: whether it is set in any process (every process gets the same answer)."""
    if not context.active:
        return tuple(flags)
    values = torch.tensor([float(f) for f in flags], device=context.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def barrier(context: Distributed) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if not context.active:
        return
    if context.backend == "nccl":
        dist.barrier(device_ids=[context.device.index])
    else:
        dist.barrier()
