"""One KD-MSI training step: losses, mixed precision, optimizer step (torch only).

This module imports nothing but torch and the engine's model/map helpers, so the step can run
(and be checked on a GPU) without the GIS stack.

- :func:`kd_losses`: L = L_cls + lambda * L_kd. The teacher's tile logit is GAP(G_t) with
  L_cls = BCE-with-logits(logit, y); the KD target is ReLU(G_t)/max(ReLU(G_t)) per tile, times y,
  detached; L_kd is the mean squared error between sigmoid(G_s) and that target over the valid
  stride-16 cells (cells with less than half valid pixels do not count).
- :func:`train_step`: one optimizer step on both networks, with autocast (bf16/fp16) and, for
  fp16 on CUDA, a :class:`torch.amp.GradScaler`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdmsi_engine.device import cpu_precision, cpu_supports_bf16
from kdmsi_engine.errors import InputError
from kdmsi_engine.inference.maps import normalize_cam

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class KDLosses:
    """The terms of one KD-MSI step."""

    total: Tensor
    cls: Tensor
    kd: Tensor
    cam: Tensor
    logit: Tensor


def kd_target(g_teacher: Tensor, labels: Tensor) -> Tensor:
    """The student's target: the teacher's normalised CAM times the tile label, detached."""
    cam = normalize_cam(g_teacher.detach())
    return cam * labels.float().view(-1, 1, 1, 1)


def valid_cells(valid: Tensor | None, size: tuple[int, int]) -> Tensor | None:
    """Valid mask (B,H,W) -> (B,1,h,w) float mask of cells with at least half valid pixels."""
    if valid is None:
        return None
    fraction = F.adaptive_avg_pool2d(valid.float().unsqueeze(1), size)
    return (fraction >= 0.5).float()


def kd_losses(
    teacher: nn.Module,
    student: nn.Module,
    before: Tensor,
    after: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    *,
    kd_weight: float = 10.0,
) -> KDLosses:
    """L = L_cls(teacher) + kd_weight * L_kd(student -> teacher CAM); see the module docstring.

    Args:
        teacher, student: :class:`~kdmsi_engine.models.kdmsi.SiameseCAMNet`.
        before, after: (B,C,H,W) bands in [0,1].
        labels: (B,) tile labels 0/1.
        valid: (B,H,W) bool valid mask, or ``None`` (all valid).
        kd_weight: lambda.
    """
    labels = labels.float().to(before.device)
    g_t = teacher(before, after).float()
    logit = g_t.mean(dim=(1, 2, 3))
    loss_cls = F.binary_cross_entropy_with_logits(logit, labels)
    cam = kd_target(g_t, labels)
    g_s = student(before, after).float()
    diff2 = (torch.sigmoid(g_s) - cam) ** 2
    mask = valid_cells(valid.to(before.device) if valid is not None else None, g_s.shape[-2:])
    if mask is None:
        loss_kd = diff2.mean()
    else:
        loss_kd = (diff2 * mask).sum() / mask.sum().clamp_min(1.0)
    total = loss_cls + kd_weight * loss_kd
    return KDLosses(total, loss_cls, loss_kd, cam, logit)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp16`` on CUDA (with a grad scaler); on a CPU, the CPU's precision.

    The CPU's precision (:func:`~kdmsi_engine.device.cpu_precision`) is bf16 where the CPU has
    it natively, else fp32, unless ``KDMSI_CPU_PRECISION`` forces one: the same rule as
    inference and detector training, measured without loss by ``make accuracy`` (README).
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else cpu_precision()
    if precision == "fp16" and device.type != "cuda":
        raise InputError(
            "fp16 training needs a CUDA device; use precision bf16 or fp32 on a CPU",
            parameters=("precision",),
        )
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        logger.warning("this CPU has no native bf16: bf16 training will be slow")
    return precision


def prepare_for_training(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` on ``device`` in train mode; on the CPU its weights in channels-last.

    oneDNN's convolutions work in channels-last: weights (and inputs, see
    :func:`~kdmsi_engine.models.backbones.encode_pair`) already in that format spare a reorder of
    every weight and its gradient each step. The saved state is the same tensors.
    """
    net.to(device)
    if device.type == "cpu":
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net.train()


@contextlib.contextmanager
def training_autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast for ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        yield


def make_scaler(precision: str) -> Any | None:
    """A CUDA grad scaler for fp16 training, else ``None`` (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


def train_step(
    teacher: nn.Module,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    before: Tensor,
    after: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    *,
    kd_weight: float = 10.0,
    precision: str = "fp32",
    scaler: Any | None = None,
) -> dict[str, float]:
    """One optimizer step on both networks; returns ``loss``, ``cls`` and ``kd`` as floats.

    The caller sets the learning rate and the networks' train mode.
    """
    device = before.device
    optimizer.zero_grad(set_to_none=True)
    with training_autocast(device, precision):
        losses = kd_losses(teacher, student, before, after, labels, valid, kd_weight=kd_weight)
    if scaler is not None:
        scaler.scale(losses.total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses.total.backward()
        optimizer.step()
    return {
        "loss": float(losses.total.detach()),
        "cls": float(losses.cls.detach()),
        "kd": float(losses.kd.detach()),
    }
