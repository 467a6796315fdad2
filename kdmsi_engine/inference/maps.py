"""Change maps from KD-MSI networks for a batch of tile pairs: CAM, student, MI and MSI.

Every function takes bands scaled to [0,1], ``before`` and ``after`` (B,C,H,W) on the networks'
device, and returns a float32 map (B,H,W) in [0,1] at the input size. The networks should be in
eval mode (:func:`kdmsi_engine.models.kdmsi.load_kdmsi_model` returns them so).

- ``cam``: the teacher's class activation map: G upsampled bilinearly to the input size, then
  ReLU(G)/max(ReLU(G)) per tile; multiplied by the tile labels when they are given.
- ``student``: sigmoid(G) of the student at one scale, upsampled bilinearly.
- ``mi`` (multiscale inference, the baseline): G of every scale and of the horizontally flipped
  pair (flip undone), resized to the input size and summed; then the CAM normalisation.
- ``msi`` (multiscale sigmoid inference): for every scale, sigmoid(G) of the pair and of the
  flipped pair (flip undone), resized to the input size; the mean of the 2|S| maps.

Each scale costs one forward pass: the flipped pair rides in the same batch. Forward passes run
with channels-last inputs, under :func:`kdmsi_engine.device.autocast` (bf16 on CPUs with native
bf16, fp16/bf16 on CUDA) unless ``amp=False``. On CPUs without native bf16 (AVX2 only) autocast
stays off: emulated bf16 was measured 6x (channels-last) to 40x slower than float32 here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdmsi_engine import defaults
from kdmsi_engine.device import autocast
from kdmsi_engine.errors import InputError

logger = logging.getLogger(__name__)

NetT = TypeVar("NetT", bound=nn.Module)

METHODS = ("msi", "mi", "student", "cam")
DEFAULT_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
CAM_EPS = 1e-5


def normalize_cam(g: Tensor, eps: float = CAM_EPS) -> Tensor:
    """ReLU(g) / max(ReLU(g)) per tile: (B,1,h,w) or (B,h,w) -> same shape in [0,1]."""
    relu = F.relu(g.float())
    peak = relu.flatten(1).amax(dim=1).clamp_min(eps)
    return relu / peak.view(-1, *([1] * (relu.dim() - 1)))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale)))


def _forward(net: nn.Module, before: Tensor, after: Tensor, amp: bool) -> Tensor:
    before = before.contiguous(memory_format=torch.channels_last)
    after = after.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(before.device, enabled=amp):
        return net(before, after).float()


def _check(before: Tensor, after: Tensor) -> None:
    if before.dim() != 4 or before.shape != after.shape:
        raise InputError(
            f"before and after must be (B,C,H,W) tensors of one shape, got {tuple(before.shape)} "
            f"and {tuple(after.shape)}"
        )


def _labels_factor(labels: Tensor | Sequence[float], batch: int, like: Tensor) -> Tensor:
    factor = torch.as_tensor(labels, dtype=torch.float32, device=like.device).reshape(-1)
    if factor.numel() != batch:
        raise InputError(f"{factor.numel()} tile labels for a batch of {batch} tiles")
    return factor.clamp(0, 1).view(batch, 1, 1)


def cam_map(
    teacher: nn.Module,
    before: Tensor,
    after: Tensor,
    labels: Tensor | Sequence[float] | None = None,
    *,
    amp: bool = True,
) -> Tensor:
    """The teacher's CAM at the input size (G upsampled, then normalised), times the labels."""
    _check(before, after)
    size = (before.shape[-2], before.shape[-1])
    cam = normalize_cam(_resize(_forward(teacher, before, after, amp), size))[:, 0]
    if labels is not None:
        cam = cam * _labels_factor(labels, before.shape[0], cam)
    return cam


def student_map(student: nn.Module, before: Tensor, after: Tensor, *, amp: bool = True) -> Tensor:
    """sigmoid(G) of the student at scale 1, upsampled to the input size."""
    _check(before, after)
    size = (before.shape[-2], before.shape[-1])
    return _resize(torch.sigmoid(_forward(student, before, after, amp)), size)[:, 0]


def _multiscale(
    net: nn.Module,
    before: Tensor,
    after: Tensor,
    scales: Sequence[float],
    amp: bool,
) -> tuple[Tensor, Tensor]:
    """Sums over scales and flips of G and of sigmoid(G), flips undone, at the input size.

    Returns two (B,1,H,W) tensors: the sum of G (for MI) and the sum of sigmoid(G) (for MSI).
    """
    _check(before, after)
    scales = parse_scales(scales)
    batch = before.shape[0]
    size = (before.shape[-2], before.shape[-1])
    sum_g = torch.zeros(batch, 1, *size, dtype=torch.float32, device=before.device)
    sum_p = torch.zeros_like(sum_g)
    for scale in scales:
        target = _scaled_size(size, scale)
        b = _resize(before, target)
        a = _resize(after, target)
        chunk = _tiles_per_forward(target)
        for first in range(0, batch, chunk):
            part = slice(first, first + chunk)
            n = b[part].shape[0]
            g = _forward_with_flip(net, b[part], a[part], amp)
            p = _resize(torch.sigmoid(g), size)
            g = _resize(g, size)
            sum_g[part] += g[:n] + g[n:]
            sum_p[part] += p[:n] + p[n:]
    return sum_g, sum_p


def _tiles_per_forward(size: tuple[int, int]) -> int:
    """How many tile pairs (each with its flip) one forward pass takes at ``size``.

    A forward of more pixels than :data:`~kdmsi_engine.defaults.MSI_FORWARD_PIXELS` makes
    activations that no longer fit the caches: measured (issue 14), ResNet50 MSI per tile took
    1.17 s at batch 4 against 0.95 s at batch 1. Chunks keep a larger batch as fast as batch 1.
    """
    return max(1, defaults.MSI_FORWARD_PIXELS // (2 * size[0] * size[1]))


def _forward_with_flip(net: nn.Module, before: Tensor, after: Tensor, amp: bool) -> Tensor:
    """G of the pairs, then of their horizontal flips (flip undone): (2B,1,h,w)."""
    g = _forward(net, torch.cat([before, before.flip(-1)]), torch.cat([after, after.flip(-1)]), amp)
    batch = before.shape[0]
    return torch.cat([g[:batch], g[batch:].flip(-1)])


def multiscale_maps(
    student: nn.Module,
    before: Tensor,
    after: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    amp: bool = True,
) -> tuple[Tensor, Tensor]:
    """(MI, MSI) maps (B,H,W) from one set of forward passes (for comparisons)."""
    sum_g, sum_p = _multiscale(student, before, after, scales, amp)
    mi = normalize_cam(sum_g)[:, 0]
    msi = (sum_p / (2 * len(tuple(scales))))[:, 0].clamp(0, 1)
    return mi, msi


def mi_map(
    student: nn.Module,
    before: Tensor,
    after: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    amp: bool = True,
) -> Tensor:
    """Multiscale inference: sum of G over scales and flips, then CAM normalisation."""
    return multiscale_maps(student, before, after, scales, amp=amp)[0]


def msi_map(
    student: nn.Module,
    before: Tensor,
    after: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    amp: bool = True,
) -> Tensor:
    """Multiscale sigmoid inference: mean of sigmoid(G) over scales and flips."""
    return multiscale_maps(student, before, after, scales, amp=amp)[1]


def parse_scales(
    value: str | Sequence[float] | None, default: tuple[float, ...] = defaults.MSI_SCALES
) -> tuple[float, ...]:
    """Inference scales by :func:`kdmsi_engine.defaults.parse_scales`, or :class:`InputError`."""
    try:
        return defaults.parse_scales(value, default)
    except ValueError as exc:
        raise InputError(str(exc), parameters=("scales",)) from exc


def change_map(
    method: str,
    teacher: nn.Module | None,
    student: nn.Module | None,
    before: Tensor,
    after: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    labels: Tensor | Sequence[float] | None = None,
    amp: bool = True,
) -> Tensor:
    """Dispatch on ``method`` (``msi``, ``mi``, ``student``, ``cam``): (B,H,W) in [0,1].

    ``labels`` (tile labels) only affect ``cam``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "cam":
        if teacher is None:
            raise InputError("method 'cam' needs the teacher network")
        return cam_map(teacher, before, after, labels, amp=amp)
    if student is None:
        raise InputError(f"method {method!r} needs the student network")
    if method == "student":
        return student_map(student, before, after, amp=amp)
    if method == "mi":
        return mi_map(student, before, after, scales, amp=amp)
    return msi_map(student, before, after, scales, amp=amp)


def prepare_for_inference(net: NetT, device: torch.device | str = "cpu") -> NetT:
    """Move ``net`` to ``device``, eval mode, channels-last weights (faster on CPU and GPU)."""
    # torch's stubs lack Module.to(memory_format=...), which torch documents and supports
    return net.to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
