"""The yardstick of ``make bench``: KD-MSI and detector training steps in the most direct PyTorch.

Issue 14 asks the engine to be faster than a plain implementation of the same math on every CPU.
This module is that plain implementation, written without the engine's step code and without
tricks: default memory format, float32, one backbone pass per date (the paper's reference
network), the losses written out, SGD. Only the layers come from the engine: torchvision is not
installed with the engine, and its ResNet (:class:`~kdmsi_engine.models.resnet.ResNetEncoder`)
has torchvision's layers and parameter names, so the weights are exactly the engine's.

- :class:`PlainSiameseCAM` and :func:`plain_kd_step`: teacher and student Siamese ResNets,
  ``BCE(GAP(G_t), y) + lambda * MSE(sigmoid(G_s), CAM(G_t) * y)`` over the valid cells, SGD.
- :class:`PlainSiameseDeepLab` and :func:`plain_detector_step`: the Siamese DeepLabV3+ (ASPP on
  the stride-16 difference, decoder on the stride-4 difference), cross-entropy over the labelled
  pixels, SGD.

``tests/benchmarks/test_yardstick.py`` checks that these and the engine's steps give the same
losses on the same inputs in float32, so the ratios in ``bench.json`` compare equal work.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy of an engine module with torch's own BatchNorm2d (the engine's subclass undone)."""
    copied = copy.deepcopy(module)
    for sub in copied.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.__class__ = nn.BatchNorm2d
    return copied.to(memory_format=torch.contiguous_format)


def _normalize(x: Tensor) -> Tensor:
    """ImageNet mean/std for 3 bands (the yardstick is timed on RGB tiles)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class PlainSiameseCAM(nn.Module):
    """One encoder on each date in turn, the difference of the stride-16 features, a 1x1 conv."""

    def __init__(self, encoder: nn.Module, channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Conv2d(channels, 1, kernel_size=1, bias=False)

    def forward(self, before: Tensor, after: Tensor) -> Tensor:
        f1 = self.encoder(_normalize(before))[1]
        f2 = self.encoder(_normalize(after))[1]
        return self.classifier(f2 - f1)


def plain_kd_networks(
    teacher: Any, student: Any
) -> tuple[PlainSiameseCAM, PlainSiameseCAM, torch.optim.SGD]:
    """Copies of the engine's teacher and student as plain networks, with a plain SGD."""
    nets = []
    for engine_net in (teacher, student):
        encoder = _plain_copy(engine_net.backbone.encoder)
        plain = PlainSiameseCAM(encoder, engine_net.classifier.in_channels)
        plain.classifier.load_state_dict(engine_net.classifier.state_dict())
        nets.append(plain)
    params = list(nets[0].parameters()) + list(nets[1].parameters())
    return nets[0], nets[1], torch.optim.SGD(params, lr=1e-4, momentum=0.9)


def plain_kd_losses(
    teacher: nn.Module,
    student: nn.Module,
    before: Tensor,
    after: Tensor,
    labels: Tensor,
    valid: Tensor,
    kd_weight: float = 10.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, bce, mse)`` of one KD-MSI batch, as the paper writes them."""
    g_t = teacher(before, after)
    bce = F.binary_cross_entropy_with_logits(g_t.mean(dim=(1, 2, 3)), labels)
    relu = F.relu(g_t.detach())
    peak = relu.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    target = relu / peak * labels.view(-1, 1, 1, 1)
    g_s = student(before, after)
    cells = (F.adaptive_avg_pool2d(valid.float().unsqueeze(1), g_s.shape[-2:]) >= 0.5).float()
    mse = (((torch.sigmoid(g_s) - target) ** 2) * cells).sum() / cells.sum().clamp_min(1.0)
    return bce + kd_weight * mse, bce, mse


def plain_kd_step(
    teacher: nn.Module,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    kd_weight: float = 10.0,
) -> float:
    """One SGD step of both networks; the total loss before the step."""
    optimizer.zero_grad()
    total, _, _ = plain_kd_losses(
        teacher,
        student,
        batch["before"],
        batch["after"],
        batch["labels"],
        batch["valid"],
        kd_weight,
    )
    total.backward()
    optimizer.step()
    return float(total.detach())


class PlainSiameseDeepLab(nn.Module):
    """The Siamese DeepLabV3+ written out: one encoder pass per date, ASPP, decoder, classifier.

    The layers (``encoder``, ``aspp``, ``reduce``, ``decoder``, ``classifier``) are copies of an
    engine detector's, so both start from the same weights.
    """

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.encoder = _plain_copy(detector.backbone.encoder)
        self.aspp = _plain_copy(detector.aspp)
        self.reduce = _plain_copy(detector.reduce)
        self.decoder = _plain_copy(detector.decoder)
        self.classifier = _plain_copy(detector.classifier)

    def forward(self, before: Tensor, after: Tensor) -> Tensor:
        low1, high1 = self.encoder(_normalize(before))
        low2, high2 = self.encoder(_normalize(after))
        x = self.aspp(high2 - high1)
        low = self.reduce(low2 - low1)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.classifier(self.decoder(torch.cat([x, low], dim=1)))
        return F.interpolate(x, size=before.shape[-2:], mode="bilinear", align_corners=False)


def plain_detector_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> float:
    """One SGD step of the detector on 0/1 pixel labels (255 ignored); the loss before it."""
    optimizer.zero_grad()
    logits = model(batch["before"], batch["after"])
    loss = F.cross_entropy(logits, batch["pixels"].long(), ignore_index=IGNORE)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
