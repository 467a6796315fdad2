"""The one training loop: KD-MSI and the detector each supply a task, the loop does the rest.

A :class:`TrainingTask` owns its networks, reads (and augments) a batch of samples and computes
the loss of a batch. Everything else is written once, here, and behaves the same for both:

- **order and augmentation**: the samples of epoch ``e`` come in :func:`epoch_order` order and
  are augmented with :func:`epoch_generator` ``(seed, e, 1)`` (``1 + r`` in process ``r`` of
  several), so both depend only on ``(seed, e)`` and a resumed run repeats what an
  uninterrupted one does;
- **learning rate**: polynomial decay per optimizer step (:func:`set_poly_lr`);
- **precision**: the forward pass under autocast for ``bf16``/``fp16``, a CUDA grad scaler for
  ``fp16`` only (:func:`make_scaler`);
- **finite loss**: a loss that is NaN or infinite stops the run with a :class:`TrainingError`
  instead of writing a model of NaNs;
- **checkpoints**: after every epoch but the last (the model file follows it), with the networks,
  optimizer, scaler, generator states, history and a *resume key*; ``resume=True`` continues from
  it and is refused when there is no checkpoint or when it was made with other data or
  parameters (the key differs); without ``resume`` an old checkpoint is replaced;
- **cancel**: checked before every step; a cancelled run names the checkpoint it kept;
- **several processes** (``torchrun``, :mod:`kdmsi_engine.training.distributed`): when a process
  group is open, each process trains on its shard of every epoch's order with ``batch_size / N``
  samples a step, the networks in DistributedDataParallel; losses are averaged over the
  processes, cancel and empty batches are decided together, rank 0 writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdmsi_engine.device import describe_device
from kdmsi_engine.errors import CancelledError, InputError, ModelFileError, TrainingError
from kdmsi_engine.progress import Progress
from kdmsi_engine.training import distributed
from kdmsi_engine.training.common import (
    epoch_generator,
    epoch_order,
    load_checkpoint,
    save_checkpoint,
    set_poly_lr,
    set_rng_state,
)
from kdmsi_engine.training.losses import make_scaler, training_autocast

logger = logging.getLogger(__name__)

Autocast = Callable[[], AbstractContextManager[None]]


class TrainingTask(Protocol):
    """What a model family supplies to :func:`fit`."""

    #: progress stage name (``train``, ``train-detector``)
    stage: str

    def networks(self) -> dict[str, nn.Module]:
        """The trained networks by name, as saved in checkpoints and model files."""
        ...

    def num_samples(self) -> int:
        """How many samples one epoch goes through."""
        ...

    def load_batch(self, indexes: list[int], generator: torch.Generator) -> Any | None:
        """The samples ``indexes``, augmented with ``generator``, on the training device.

        ``None`` when the batch has nothing to learn from (the step is counted, not taken).
        """
        ...

    def losses(self, batch: Any, autocast: Autocast) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss of ``batch`` and its named parts (``autocast()`` wraps the forward)."""
        ...

    def distribute(self, wrapped: dict[str, nn.Module]) -> None:
        """Run the training forward passes through ``wrapped`` (DDP wrappers by name).

        :meth:`networks` keeps returning the bare networks, whose state is what gets saved.
        """
        ...


@dataclass(frozen=True)
class LoopSettings:
    """How long and how fast to train (checked by the job before the loop starts)."""

    epochs: int
    #: the global batch: with N processes each takes ``batch_size / N`` samples a step
    batch_size: int
    lr: float
    poly_power: float
    seed: int
    precision: str
    device: torch.device


@dataclass(frozen=True)
class Checkpointing:
    """Where the loop keeps its checkpoint and what must match for a resume."""

    path: Path | None
    metadata: dict[str, Any]
    #: parts of the run (architecture, bands, parameters, data) that a resume must share
    resume_key: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    """What a finished loop reports."""

    #: one entry per epoch: the sample-weighted mean of ``loss`` and each named part, ``epoch``
    history: list[dict[str, float]]
    steps: int
    #: seconds of training, including the part before a resume
    seconds: float
    #: samples of all processes per second
    samples_per_second: float | None
    #: processes, backend, per-process and global batch
    batch: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def fit(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    checkpointing: Checkpointing,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    message: str = "",
) -> FitResult:
    """Train ``task`` with ``optimizer`` for ``settings.epochs`` epochs.

    Raises:
        InputError: ``resume`` without a checkpoint, or one made with other data/parameters.
        ModelFileError: the checkpoint does not fit the networks.
        TrainingError: the loss became NaN or infinite.
        CancelledError: cancelled (the checkpoint of the last finished epoch is kept).
    """
    progress = progress or Progress()
    group = distributed.current()
    distributed.check_global_batch(settings.batch_size, group.world_size)
    if group.active:
        # a checkpoint's steps and padding depend on the number of processes
        checkpointing = dataclasses.replace(
            checkpointing, resume_key={**checkpointing.resume_key, "processes": group.world_size}
        )
    scaler = make_scaler(settings.precision)
    state = _LoopState()
    if resume:
        state = _restore(task, optimizer, scaler, checkpointing)
        progress.log(f"resuming from {checkpointing.path} after epoch {state.epoch}")
    elif checkpointing.path is not None and checkpointing.path.exists():
        logger.info("replacing the old checkpoint %s (not resuming)", checkpointing.path)
    progress.log(
        f"device: {describe_device(settings.device)}; precision {settings.precision}",
        device=str(settings.device),
        precision=settings.precision,
    )
    batch = _describe_batch(group, settings.batch_size)
    if group.active:
        progress.log(
            f"{group.world_size} processes ({group.backend}): {batch['per_process_batch']} "
            f"samples per process per step, global batch {batch['global_batch']}",
            **batch,
        )
        task.distribute(
            {name: distributed.wrap(net, settings.device) for name, net in task.networks().items()}
        )
    total_steps = _steps_per_epoch(task.num_samples(), group, settings) * settings.epochs
    progress.stage(task.stage, total=total_steps, message=message)
    if state.step:
        progress.advance(state.step)
    started = time.monotonic()
    try:
        for epoch in range(state.epoch, settings.epochs):
            _train_epoch(task, optimizer, scaler, settings, state, epoch, total_steps, progress)
            state.epoch = epoch + 1
            if epoch + 1 < settings.epochs and group.is_main:
                _save(task, optimizer, scaler, checkpointing, state, started)
    except CancelledError as exc:
        if checkpointing.path is not None and checkpointing.path.is_file():
            raise CancelledError(
                f"training cancelled; the last finished epoch is saved in {checkpointing.path}: "
                "run the same job again with resume to continue",
                parameters=("resume",),
            ) from exc
        raise
    seconds = time.monotonic() - started
    return FitResult(
        history=state.history,
        steps=state.step,
        seconds=state.seconds_before + seconds,
        samples_per_second=state.samples_seen / seconds if seconds > 0 else None,
        batch=batch,
    )


def _describe_batch(group: distributed.Distributed, global_batch: int) -> dict[str, Any]:
    return {
        "processes": group.world_size,
        "backend": group.backend,
        "per_process_batch": global_batch // group.world_size,
        "global_batch": global_batch,
    }


def _steps_per_epoch(num: int, group: distributed.Distributed, settings: LoopSettings) -> int:
    """Optimizer steps in one epoch (with N processes: of each process's padded shard)."""
    per_process = math.ceil(num / group.world_size)
    return math.ceil(per_process / (settings.batch_size // group.world_size))


@dataclass
class _LoopState:
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_before: float = 0.0
    samples_seen: int = 0


def _train_epoch(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    settings: LoopSettings,
    state: _LoopState,
    epoch: int,
    total_steps: int,
    progress: Progress,
) -> None:
    group = distributed.current()
    for net in task.networks().values():
        net.train()
    order = distributed.shard(
        epoch_order(task.num_samples(), settings.seed, epoch), group.rank, group.world_size
    )
    local_batch = settings.batch_size // group.world_size
    # each process its own augmentation stream (rank 0's is the one-process stream)
    generator = epoch_generator(settings.seed, epoch, 1 + group.rank)
    sums: dict[str, float] = {}
    counted = 0
    for first in range(0, len(order), local_batch):
        indexes = order[first : first + local_batch]
        batch = _next_batch(task, indexes, generator, group, progress)
        if batch is None:
            state.step += 1
            progress.advance(1)
            continue
        lr = set_poly_lr(optimizer, settings.lr, state.step, total_steps, settings.poly_power)
        values, count = distributed.reduce_weighted(
            group, _step(task, optimizer, scaler, batch, settings), len(indexes)
        )
        state.step += 1
        state.samples_seen += count
        if not math.isfinite(values["loss"]):
            raise TrainingError(
                f"training diverged (loss {values['loss']}) at epoch {epoch + 1}; lower the "
                "learning rate or train in fp32 precision",
                parameters=("lr", "precision"),
            )
        counted += count
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * count
        progress.advance(1, epoch=epoch + 1, lr=lr, **values)  # type: ignore[arg-type]
    if counted:
        means = {key: value / counted for key, value in sums.items()}
        state.history.append({**means, "epoch": epoch + 1})
        parts = ", ".join(f"{k} {v:.5f}" for k, v in means.items() if k != "loss")
        progress.log(
            f"epoch {epoch + 1}/{settings.epochs}: loss {means['loss']:.4f}"
            + (f" ({parts})" if parts else ""),
            **state.history[-1],
        )


def _next_batch(
    task: TrainingTask,
    indexes: list[int],
    generator: torch.Generator,
    group: distributed.Distributed,
    progress: Progress,
) -> Any | None:
    """The batch of ``indexes``; ``None`` when there is nothing to learn from.

    With several processes, a cancel in one process cancels all, and an empty batch in one
    skips the step in all: a process that left or skipped alone would leave the others
    waiting for its gradients.
    """
    if not group.active:
        progress.check_cancelled()
        return task.load_batch(indexes, generator)
    batch = task.load_batch(indexes, generator)
    cancelled, empty = distributed.any_process(group, _cancel_asked(progress), batch is None)
    if cancelled:
        raise CancelledError(f"cancelled during {progress.current_stage}; nothing was written")
    return None if empty else batch


def _cancel_asked(progress: Progress) -> bool:
    try:
        progress.check_cancelled()
    except CancelledError:
        return True
    return False


def _step(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    batch: Any,
    settings: LoopSettings,
) -> dict[str, float]:
    """One optimizer step; the loss and its parts as floats."""

    @contextlib.contextmanager
    def autocast() -> Iterator[None]:
        with training_autocast(settings.device, settings.precision):
            yield

    optimizer.zero_grad(set_to_none=True)
    total, parts = task.losses(batch, autocast)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


def _save(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    checkpointing: Checkpointing,
    state: _LoopState,
    started: float,
) -> None:
    if checkpointing.path is None:
        return
    save_checkpoint(
        checkpointing.path,
        metadata=checkpointing.metadata,
        networks=task.networks(),
        optimizer=optimizer,
        epoch=state.epoch,
        step=state.step,
        scaler=scaler,
        extra={
            "history": state.history,
            "seconds": state.seconds_before + time.monotonic() - started,
            "resume_key": checkpointing.resume_key,
        },
    )


def _restore(
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    checkpointing: Checkpointing,
) -> _LoopState:
    path = checkpointing.path
    if path is None or not path.is_file():
        raise InputError(
            f"resume: no checkpoint {path}; run again without resume", parameters=("resume",)
        )
    saved = load_checkpoint(path)
    differs = _differences(saved.extra.get("resume_key") or {}, checkpointing.resume_key)
    if differs:
        raise InputError(
            f"resume: the checkpoint {path} was made with other {differs}; use the same data "
            "and options, or run again without resume",
            parameters=("resume",),
        )
    try:
        for name, net in task.networks().items():
            net.load_state_dict(saved.tensors[name], strict=True)
        optimizer.load_state_dict(saved.extra["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelFileError(
            f"checkpoint {path} does not fit these networks; run again without resume"
        ) from exc
    if scaler is not None and "scaler" in saved.extra:
        scaler.load_state_dict(saved.extra["scaler"])
    set_rng_state(saved.extra.get("rng", {}))
    return _LoopState(
        epoch=int(saved.extra["epoch"]),
        step=int(saved.extra["step"]),
        history=list(saved.extra.get("history", [])),
        seconds_before=float(saved.extra.get("seconds", 0.0)),
    )


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What differs between two resume keys, in words ("" when nothing does)."""
    names = []
    for name in sorted(set(saved) | set(wanted)):
        old, new = saved.get(name), wanted.get(name)
        if old == new:
            continue
        if name == "parameters" and isinstance(old, dict) and isinstance(new, dict):
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            names.append(f"training parameters ({', '.join(changed)})")
        else:
            names.append(name)
    return ", ".join(names)
