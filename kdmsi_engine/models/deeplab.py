"""Siamese DeepLabV3+ change detector (stage 2 of KD-MSI).

One encoder (:func:`kdmsi_engine.models.backbones.build_backbone`) with shared weights runs on
both dates; it returns stride-4 ("low") and stride-16 ("high") features. The detector works on
their differences (after minus before):

* ASPP on the stride-16 difference ``F2_high - F1_high``: a 1x1 branch, three 3x3 atrous
  branches (rates 6, 12, 18 at output stride 16) and an image-pooling branch, 256 channels each,
  concatenated and projected to 256 channels;
* the decoder reduces the stride-4 difference ``F2_low - F1_low`` to 48 channels (1x1 conv),
  concatenates it with the ASPP output upsampled to stride 4, and refines with two 3x3
  convolutions (256 channels);
* a 1x1 classifier gives 2 classes (0 no change, 1 change), bilinearly upsampled to the input
  size: ``forward(before, after) -> (B, 2, H, W)`` logits.

Inputs are the scene's bands scaled to [0, 1]; the model normalises them for the backbone
(:func:`~kdmsi_engine.models.backbones.normalize_input`). The image-pooling branch has no batch
norm, so training works with any batch size (a 1x1 map cannot be batch-normalised alone).

Model files of kind ``"detector"`` store the state dict under ``"detector"`` and the metadata
built by :func:`detector_metadata` (architecture, bands, scaling, tile size, training).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdmsi_engine.errors import InputError, ModelFileError
from kdmsi_engine.modelfile import MAX_BANDS, metadata_int

if TYPE_CHECKING:
    from kdmsi_engine.models.backbones import Backbone

logger = logging.getLogger(__name__)

ARCHITECTURE = "siamese-deeplabv3plus"
DETECTOR_KIND = "detector"
NUM_CLASSES = 2
ASPP_CHANNELS = 256
LOW_REDUCED_CHANNELS = 48
ASPP_RATES = (6, 12, 18)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3).

    Args:
        in_channels: channels of the input features.
        out_channels: channels of every branch and of the output.
        rates: dilation rates of the three 3x3 branches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = ASPP_CHANNELS,
        rates: tuple[int, ...] = ASPP_RATES,
    ) -> None:
        super().__init__()
        branches = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=True),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1),
            nn.Dropout(0.1),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [branch(x) for branch in self.branches]
        outs.append(F.interpolate(self.pool(x), size=size, mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class SiameseDeepLabV3Plus(nn.Module):
    """Siamese DeepLabV3+ over a shared encoder; ``forward(before, after)`` gives 2-class logits.

    Args:
        backbone: the shared encoder (has ``low_channels``, ``high_channels`` and returns
            ``(low, high)`` features at strides 4 and 16).
        num_classes: output classes (2: no change, change).
        aspp_rates: dilation rates of the ASPP.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = NUM_CLASSES,
        aspp_rates: tuple[int, ...] = ASPP_RATES,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.high_channels, ASPP_CHANNELS, tuple(aspp_rates))
        self.reduce = _conv_bn_relu(backbone.low_channels, LOW_REDUCED_CHANNELS, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(ASPP_CHANNELS + LOW_REDUCED_CHANNELS, 256, 3),
            _conv_bn_relu(256, 256, 3),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)
        for module in self.new_modules():
            for sub in module.modules():
                if isinstance(sub, nn.Conv2d):
                    nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.BatchNorm2d):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
        # Small classifier weights: the first logits are near 0 (loss near ln 2), so the
        # 10x learning rate of the new layers does not start with huge gradients.
        nn.init.normal_(self.classifier.weight, std=0.01)
        assert self.classifier.bias is not None
        nn.init.zeros_(self.classifier.bias)

    def new_modules(self) -> list[nn.Module]:
        """Layers that are not the (possibly pretrained) backbone."""
        return [self.aspp, self.reduce, self.decoder, self.classifier]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters (trained at the base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """New layers' parameters (trained at 10x the base learning rate)."""
        for module in self.new_modules():
            yield from module.parameters()

    def forward(self, before: Tensor, after: Tensor) -> Tensor:
        from kdmsi_engine.models.backbones import encode_pair

        size = before.shape[-2:]
        # the encoder's weights are shared by both dates
        (low1, high1), (low2, high2) = encode_pair(self.backbone, before, after)
        low_diff = low2 - low1
        high_diff = high2 - high1
        x = self.aspp(high_diff)
        low_feat = self.reduce(low_diff)
        x = F.interpolate(x, size=low_feat.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decoder(torch.cat([x, low_feat.to(x.dtype)], dim=1))
        # The classifier and the upsampling run in float32 even under autocast: the
        # probabilities are thresholded, and bf16 logits tie at thresholds.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.classifier(x.float())
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def architecture_dict(
    backbone: str, in_channels: int, aspp_rates: tuple[int, ...] = ASPP_RATES
) -> dict[str, Any]:
    """The ``architecture`` entry of a detector's metadata."""
    return {
        "name": ARCHITECTURE,
        "backbone": backbone,
        "in_channels": int(in_channels),
        "num_classes": NUM_CLASSES,
        "aspp_rates": [int(r) for r in aspp_rates],
        "aspp_channels": ASPP_CHANNELS,
        "low_reduced_channels": LOW_REDUCED_CHANNELS,
        "output_stride": 16,
    }


def build_detector(
    backbone: str,
    *,
    in_channels: int = 3,
    weights: str | os.PathLike[str] = "none",
    aspp_rates: tuple[int, ...] = ASPP_RATES,
) -> SiameseDeepLabV3Plus:
    """A new detector with the named encoder (``weights``: ``none``, ``imagenet`` or a file)."""
    from kdmsi_engine.models.backbones import build_backbone

    encoder = build_backbone(backbone, weights=weights, in_channels=in_channels)
    return SiameseDeepLabV3Plus(encoder, NUM_CLASSES, tuple(aspp_rates))


def build_detector_from_metadata(metadata: dict[str, Any]) -> SiameseDeepLabV3Plus:
    """The detector described by a model file's metadata, with untrained weights.

    Raises:
        ModelFileError: the metadata does not describe a detector this engine can build.
    """
    arch = metadata.get("architecture")
    if not isinstance(arch, dict) or arch.get("name") != ARCHITECTURE:
        raise ModelFileError(
            f"model architecture {arch!r} is not a {ARCHITECTURE}; train a detector with "
            "'kdmsi train-detector'"
        )
    try:
        backbone = arch["backbone"]
        if not isinstance(backbone, str):
            raise ModelFileError(f"detector metadata names no backbone ({backbone!r}); retrain")
        rates = arch.get("aspp_rates", list(ASPP_RATES))
        if not isinstance(rates, (list, tuple)) or not 1 <= len(rates) <= 8:
            raise ModelFileError("detector metadata has invalid aspp_rates; retrain the detector")
        return build_detector(
            backbone,
            in_channels=metadata_int(arch["in_channels"], "in_channels (bands)", 1, MAX_BANDS),
            weights="none",
            aspp_rates=tuple(metadata_int(r, "ASPP rate", 1, 64) for r in rates),
        )
    except InputError as exc:  # an unknown backbone name
        raise ModelFileError(f"detector architecture is not supported here: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"detector metadata is incomplete ({exc}); retrain the detector"
        ) from exc


def load_detector(
    path: str | os.PathLike[str],
) -> tuple[SiameseDeepLabV3Plus, dict[str, Any]]:
    """Load a detector model file; return ``(model in eval mode, metadata)``.

    Raises:
        ModelFileError: not a detector file, altered, or weights that do not fit.
    """
    from kdmsi_engine.modelfile import load_model

    loaded = load_model(path, expected_kind=DETECTOR_KIND)
    model = build_detector_from_metadata(loaded.metadata)
    state = loaded.tensors.get("detector")
    if state is None:
        raise ModelFileError(f"{path} has no detector weights; retrain the detector")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{path}: weights do not fit the architecture in its metadata; retrain the detector"
        ) from exc
    model.eval()
    return model, loaded.metadata


@torch.no_grad()
def change_probability(model: nn.Module, before: Tensor, after: Tensor) -> Tensor:
    """Softmax probability of the change class, ``(B, H, W)`` float32 in [0, 1]."""
    logits = model(before, after)
    return torch.softmax(logits.float(), dim=1)[:, 1]
