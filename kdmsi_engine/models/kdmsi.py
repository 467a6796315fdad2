"""The KD-MSI Siamese networks (teacher and student share this architecture, not the weights).

One backbone with shared weights runs on both dates; its stride-16 features F1 (before) and F2
(after) are combined by ``diff`` (F2 - F1), ``absdiff`` (|F2 - F1|) or ``concat`` ([F2, F1]); a
1x1 convolution without bias maps them to one channel G (B,1,H/16,W/16). The teacher turns G
into a tile logit by global average pooling (and into a CAM); the student's map is sigmoid(G).

Model files (``kind`` ``"kdmsi"``) keep both networks; :func:`load_kdmsi_model` rebuilds them
from the metadata's ``architecture`` entry::

    {"backbone": "resnet50", "in_channels": 3, "teacher_combination": "diff",
     "student_combination": "diff", "output_stride": 16}
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from kdmsi_engine.errors import InputError, ModelFileError
from kdmsi_engine.modelfile import MAX_BANDS, load_model, metadata_int
from kdmsi_engine.models.backbones import BACKBONES, Backbone, build_backbone, encode_pair

logger = logging.getLogger(__name__)

COMBINATIONS = ("diff", "absdiff", "concat")
MODEL_KIND = "kdmsi"


def check_combination(combination: str) -> str:
    """Return ``combination`` if known, else raise :class:`InputError`."""
    if combination not in COMBINATIONS:
        raise InputError(
            f"unknown feature combination {combination!r}; choose one of {', '.join(COMBINATIONS)}"
        )
    return combination


class SiameseCAMNet(nn.Module):
    """Shared-weight backbone on both dates, feature combination, 1x1 conv to one channel.

    Args:
        backbone: the encoder (its weights are shared by both dates).
        combination: ``diff``, ``absdiff`` or ``concat``.

    ``forward(before, after)`` takes bands scaled to [0,1] (B,C,H,W) and returns G (B,1,h,w)
    at stride 16, in float32.
    """

    def __init__(self, backbone: Backbone, combination: str = "diff") -> None:
        super().__init__()
        self.combination = check_combination(combination)
        self.backbone = backbone
        channels = backbone.high_channels * (2 if combination == "concat" else 1)
        self.classifier = nn.Conv2d(channels, 1, kernel_size=1, bias=False)

    def features(self, before: Tensor, after: Tensor) -> Tensor:
        """Combined stride-16 features of the pair."""
        (_, f1), (_, f2) = encode_pair(self.backbone, before, after)
        if self.combination == "diff":
            return f2 - f1
        if self.combination == "absdiff":
            return (f2 - f1).abs()
        return torch.cat([f2, f1], dim=1)

    def forward(self, before: Tensor, after: Tensor) -> Tensor:
        features = self.features(before, after)
        # The 1x1 classifier runs in float32 even under autocast: its output is thresholded, and
        # bf16 logits (3 significant digits) make many pixels tie at a threshold.
        with torch.autocast(features.device.type, enabled=False):
            return self.classifier(features.float())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (possibly pretrained) backbone: base learning rate."""
        return list(self.backbone.parameters())

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of layers new to this task: 10x learning rate in training."""
        return list(self.classifier.parameters())


def architecture(
    backbone: str,
    in_channels: int,
    teacher_combination: str = "diff",
    student_combination: str = "diff",
) -> dict[str, Any]:
    """The ``architecture`` metadata entry of a KD-MSI model file."""
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    return {
        "backbone": backbone,
        "in_channels": int(in_channels),
        "teacher_combination": check_combination(teacher_combination),
        "student_combination": check_combination(student_combination),
        "output_stride": 16,
    }


def build_kdmsi_models(
    metadata: dict[str, Any], *, weights: str | os.PathLike[str] = "none"
) -> tuple[SiameseCAMNet, SiameseCAMNet]:
    """Build (teacher, student) from model-file metadata (its ``architecture`` entry).

    Args:
        metadata: model-file metadata, or the ``architecture`` dictionary itself.
        weights: starting backbone weights (``none`` when a model file's weights follow).
    """
    arch = metadata.get("architecture", metadata)
    try:
        name = str(arch["backbone"])
        in_channels = metadata_int(arch["in_channels"], "in_channels (bands)", 1, MAX_BANDS)
        t_comb = str(arch.get("teacher_combination", "diff"))
        s_comb = str(arch.get("student_combination", "diff"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            "model metadata lacks a valid 'architecture' entry; retrain with 'kdmsi train'"
        ) from exc
    try:
        teacher = SiameseCAMNet(
            build_backbone(name, weights=weights, in_channels=in_channels), t_comb
        )
        student = SiameseCAMNet(
            build_backbone(name, weights=weights, in_channels=in_channels), s_comb
        )
    except InputError as exc:
        if weights == "none":
            raise ModelFileError(f"model architecture is not supported here: {exc}") from exc
        raise
    return teacher, student


def load_kdmsi_model(
    path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[SiameseCAMNet, SiameseCAMNet, dict[str, Any]]:
    """Load a KD-MSI model file: (teacher, student, metadata), both networks in eval mode.

    Raises:
        ModelFileError: not a KD-MSI model file, altered, or weights that do not fit.
    """
    model_file = load_model(path, expected_kind=MODEL_KIND)
    teacher, student = build_kdmsi_models(model_file.metadata)
    for role, net in (("teacher", teacher), ("student", student)):
        state = model_file.tensors.get(role)
        if state is None:
            raise ModelFileError(f"{path} has no {role} weights; retrain with 'kdmsi train'")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(
                f"{path}: {role} weights do not fit its architecture; retrain with 'kdmsi train'"
            ) from exc
        net.to(device).eval()
    return teacher, student, model_file.metadata
