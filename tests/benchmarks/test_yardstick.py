"""The yardstick of ``make bench`` does the engine's work: same losses on the same inputs.

Float32, real Landsat tiles (64 px, batch 2), resnet18. Two steps each: the second step's loss
also checks that the first step's gradients and SGD update were the same. Tolerance: relative
1e-4 (the engine runs in channels-last, the yardstick in the default format, so the sums are
taken in another order; measured differences are around 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench import engine_detector_step, engine_kd_step, real_tiles
from benchmarks.yardstick import (
    PlainSiameseDeepLab,
    plain_detector_step,
    plain_kd_networks,
    plain_kd_step,
)
from kdmsi_engine.models.deeplab import build_detector
from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models
from kdmsi_engine.training.losses import prepare_for_training

CPU = torch.device("cpu")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tiles = real_tiles(2, tile=64)
    diff = (tiles["after"] - tiles["before"]).abs().mean(dim=1)
    tiles["pixels"] = (diff > diff.median()).to(torch.uint8)
    return tiles


def test_plain_and_engine_kd_steps_give_the_same_losses(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    teacher, student = build_kdmsi_models(architecture("resnet18", 3))
    plain_teacher, plain_student, plain_opt = plain_kd_networks(teacher, student)
    plain_teacher.train()
    plain_student.train()
    prepare_for_training(teacher, CPU)
    prepare_for_training(student, CPU)
    params = list(teacher.parameters()) + list(student.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    losses = []
    for _ in range(2):
        engine = engine_kd_step((teacher, student, opt), batch, "fp32")
        plain = plain_kd_step(plain_teacher, plain_student, plain_opt, batch)
        assert engine == pytest.approx(plain, rel=TOLERANCE)
        losses.append(engine)
    assert losses[0] != losses[1]  # the step changed the networks


def test_plain_and_engine_detector_steps_give_the_same_losses(
    batch: dict[str, torch.Tensor],
) -> None:
    torch.manual_seed(0)
    detector = build_detector("resnet18", in_channels=3)
    # dropout off in both: its random masks follow the memory order, which differs
    for module in detector.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = PlainSiameseDeepLab(detector).train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    prepare_for_training(detector, CPU)
    opt = torch.optim.SGD(detector.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(2):
        engine = engine_detector_step(detector, opt, batch, "fp32")
        reference = plain_detector_step(plain, plain_opt, batch)
        assert engine == pytest.approx(reference, rel=TOLERANCE)
        losses.append(engine)
    assert losses[0] != losses[1]


def test_profile_counts_the_convolutions_of_a_step(
    batch: dict[str, torch.Tensor],
) -> None:
    """The bound of ``bench.json`` rests on these seconds: nearly all of a step that is a
    single convolution, none of one without any, and part of a real KD-MSI step."""
    from benchmarks.bench import profile_convolutions

    conv = torch.nn.Conv2d(3, 64, 3, padding=1)
    x = batch["before"].contiguous(memory_format=torch.channels_last)
    conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds, total = profile_convolutions(lambda: conv(x))
        assert 0 < seconds <= total
        assert seconds > 0.9 * total
    seconds, total = profile_convolutions(lambda: torch.relu(x * 2 + 1))
    assert seconds == 0.0 and total > 0
    torch.manual_seed(0)
    teacher, student = build_kdmsi_models(architecture("resnet18", 3))
    prepare_for_training(teacher, CPU)
    prepare_for_training(student, CPU)
    opt = torch.optim.SGD(list(teacher.parameters()) + list(student.parameters()), lr=1e-4)
    seconds, total = profile_convolutions(
        lambda: engine_kd_step((teacher, student, opt), batch, "fp32")
    )
    assert 0.2 * total < seconds < 0.99 * total
