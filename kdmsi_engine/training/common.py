"""Training helpers shared by KD-MSI training and the DeepLabV3+ detector.

- :func:`poly_lr` / :func:`set_poly_lr`: polynomial learning-rate decay ``lr * (1 - t/T)^power``
  applied per step, with each parameter group's ``lr_mult``.
- :func:`param_groups`: backbone parameters at the base rate, new layers at ``new_lr_mult`` (10x)
  the base rate; no weight decay on biases and normalisation parameters.
- :func:`seed_everything`, :func:`epoch_generator`: reproducible runs; data order and
  augmentation of an epoch depend only on (seed, epoch), so a resumed run repeats exactly what
  an uninterrupted one does.
- :func:`save_checkpoint` / :func:`load_checkpoint`: a checkpoint file
  (:data:`kdmsi_engine.modelfile.CHECKPOINT_FORMAT`) with the networks, the optimizer and
  grad-scaler states, the epoch and the random generator states.
- :func:`augment_batch`: geometric augmentation identical for both dates (re-exported from
  :mod:`kdmsi_engine.training.augment`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdmsi_engine.errors import ModelFileError
from kdmsi_engine.modelfile import CHECKPOINT_FORMAT, ModelFile, load_model, save_model
from kdmsi_engine.training.augment import augment_batch, dihedral

logger = logging.getLogger(__name__)

__all__ = [
    "augment_batch",
    "dihedral",
    "poly_lr",
    "set_poly_lr",
    "param_groups",
    "seed_everything",
    "epoch_generator",
    "epoch_order",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

NEW_LR_MULT = 10.0


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step / total_steps) ** power`` (0 at and after the last step)."""
    if total_steps <= 0:
        return base_lr
    frac = min(max(step / total_steps, 0.0), 1.0)
    return base_lr * (1.0 - frac) ** power


def set_poly_lr(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    step: int,
    total_steps: int,
    power: float = 0.9,
) -> float:
    """Set every group's lr to ``poly_lr(...) * group['lr_mult']``; return the base value."""
    lr = poly_lr(base_lr, step, total_steps, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_mult", 1.0))
    return lr


def _split_decay(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 else decay).append(p)
    return decay, no_decay


def param_groups(
    backbone_params: Iterable[nn.Parameter],
    new_params: Iterable[nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 1e-4,
    new_lr_mult: float = NEW_LR_MULT,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: backbone at ``lr``, new layers at ``new_lr_mult * lr``.

    Weights (dim > 1) get ``weight_decay``; biases and normalisation parameters none. Empty
    groups are left out. Each group carries ``lr_mult`` for :func:`set_poly_lr`.
    """
    groups: list[dict[str, Any]] = []
    for params, mult in ((backbone_params, 1.0), (new_params, new_lr_mult)):
        decay, no_decay = _split_decay(params)
        for plist, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if plist:
                groups.append(
                    {"params": plist, "lr": lr * mult, "lr_mult": mult, "weight_decay": wd}
                )
    return groups


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A torch generator that depends only on (seed, epoch, stream)."""
    generator = torch.Generator()
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch) * 9_973 + int(stream)) % (2**63))
    return generator


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch (a permutation depending only on seed and epoch)."""
    return torch.randperm(num_samples, generator=epoch_generator(seed, epoch, 0)).tolist()


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    """The checkpoint file that belongs to output ``out`` (``OUT.ckpt``)."""
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + ".ckpt")


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), NumPy and Python generator states as tensors and plain values."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (missing entries are skipped)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy_keys" in state:
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(state.get("numpy_pos", 624)), 0, 0.0))
    if "python" in state:
        import ast

        value = ast.literal_eval(state["python"])
        random.setstate((value[0], tuple(value[1]), value[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any],
    networks: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    scaler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint after ``epoch`` epochs (``step`` optimizer steps) are done."""
    payload: dict[str, Any] = {
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if extra:
        payload.update(extra)
    tensors = {name: net.state_dict() for name, net in networks.items()}
    return save_model(
        path, metadata, tensors, overwrite=True, extra=payload, file_format=CHECKPOINT_FORMAT
    )


def load_checkpoint(path: str | os.PathLike[str]) -> ModelFile:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    checkpoint = load_model(path, file_format=CHECKPOINT_FORMAT)
    for key in ("optimizer", "epoch", "step"):
        if key not in checkpoint.extra:
            raise ModelFileError(
                f"checkpoint {path} lacks {key!r}; start again without resume",
                parameters=("resume",),
            )
    return checkpoint
