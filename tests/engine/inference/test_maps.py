"""CAM / student / MI / MSI maps: normalisation, label mask, the MSI formula, MI vs MSI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdmsi_engine.errors import InputError
from kdmsi_engine.inference.maps import (
    cam_map,
    change_map,
    mi_map,
    msi_map,
    normalize_cam,
    prepare_for_inference,
    student_map,
)
from kdmsi_engine.models.backbones import build_backbone
from kdmsi_engine.models.kdmsi import SiameseCAMNet


class FixedG(nn.Module):
    """A network with a known output: G = one value per tile, at stride 16."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        b, _, h, w = before.shape
        values = self.values[torch.arange(b) % len(self.values)]  # flipped copies ride along
        return values.view(b, 1, 1, 1).expand(b, 1, max(1, h // 16), max(1, w // 16))


class PoolNet(nn.Module):
    """G = 8 * (mean of after-before over 16x16 cells) - 2 + a left-to-right ramp.

    The output depends on position (so a flip that is not undone shows) and on the scale.
    """

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        d = F.avg_pool2d((after - before).mean(dim=1, keepdim=True), 16, ceil_mode=True)
        ramp = torch.linspace(0, 1, d.shape[-1]).view(1, 1, 1, -1)
        return 8 * d - 2 + ramp


def _pair(size: tuple[int, int] = (64, 96)) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = size
    before = torch.zeros(2, 3, h, w)
    after = torch.zeros(2, 3, h, w)
    after[0, :, 8:40, 4:36] = 1.0  # a changed block left of centre
    after[1, :, 30:60, 60:90] = 0.6
    return before, after


def _reference_msi(
    net: nn.Module, before: torch.Tensor, after: torch.Tensor, scales
) -> torch.Tensor:
    """The paper's formula written out, one image and one flip at a time."""
    size = before.shape[-2:]
    out = []
    for i in range(before.shape[0]):
        maps = []
        for s in scales:
            target = (round(size[0] * s), round(size[1] * s))
            b = F.interpolate(before[i : i + 1], size=target, mode="bilinear", align_corners=False)
            a = F.interpolate(after[i : i + 1], size=target, mode="bilinear", align_corners=False)
            for flip in (False, True):
                bb, aa = (b.flip(-1), a.flip(-1)) if flip else (b, a)
                p = torch.sigmoid(net(bb, aa))
                if flip:
                    p = p.flip(-1)
                maps.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False))
        out.append(torch.stack(maps).mean(dim=0)[0, 0])
    return torch.stack(out)


def test_normalize_cam_per_tile() -> None:
    g = torch.tensor([[[[-1.0, 2.0], [4.0, 1.0]]], [[[-3.0, -1.0], [-2.0, -0.5]]]])
    cam = normalize_cam(g)
    assert torch.allclose(cam[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]), atol=1e-6)
    assert torch.count_nonzero(cam[1]) == 0  # no positive evidence: all zero, no division by 0


def test_cam_map_label_mask_and_size() -> None:
    before, after = _pair()
    net = PoolNet()
    cam = cam_map(net, before, after, amp=False)
    assert cam.shape == (2, 64, 96)
    assert float(cam.max()) <= 1.0 and float(cam.min()) >= 0.0
    assert torch.allclose(cam.flatten(1).amax(dim=1), torch.ones(2), atol=1e-6)
    masked = cam_map(net, before, after, labels=torch.tensor([1, 0]), amp=False)
    assert torch.equal(masked[0], cam[0])
    assert torch.count_nonzero(masked[1]) == 0


def test_student_map_is_sigmoid_of_g() -> None:
    before, after = _pair()
    net = FixedG([0.0, -2.0])
    out = student_map(net, before, after, amp=False)
    assert torch.allclose(out[0], torch.full((64, 96), 0.5))
    assert torch.allclose(out[1], torch.full((64, 96), torch.sigmoid(torch.tensor(-2.0)).item()))


@pytest.mark.parametrize("scales", [(0.5, 1.0, 1.5, 2.0), (0.5, 1.0, 1.25, 2.0), (1.0,)])
def test_msi_equals_the_formula(scales: tuple[float, ...]) -> None:
    before, after = _pair()
    net = PoolNet()
    got = msi_map(net, before, after, scales, amp=False)
    want = _reference_msi(net, before, after, scales)
    assert got.shape == (2, 64, 96)
    assert torch.allclose(got, want, atol=1e-5)


def test_msi_undoes_the_flip() -> None:
    """Without undoing the flip the map would be mirrored: the formula test would catch it."""
    before, after = _pair()
    net = PoolNet()
    got = msi_map(net, before, after, (1.0,), amp=False)
    p = torch.sigmoid(net(before, after))
    p_flip_not_undone = torch.sigmoid(net(before.flip(-1), after.flip(-1)))
    wrong = F.interpolate((p + p_flip_not_undone) / 2, size=(64, 96), mode="bilinear")[:, 0]
    assert not torch.allclose(got, wrong, atol=1e-3)
    # the changed block (left, first tile) is where the map is highest
    assert int(got[0].mean(dim=0).argmax()) < 48


def test_mi_differs_from_msi_as_the_paper_says() -> None:
    before, after = _pair()
    # A tile where the student is sure of "no change" everywhere: MSI keeps its low
    # probability, MI (ReLU then max normalisation) gives exactly zero.
    sure = FixedG([-3.0, -3.0])
    assert torch.allclose(
        msi_map(sure, before, after, amp=False), torch.sigmoid(torch.tensor(-3.0))
    )
    assert torch.count_nonzero(mi_map(sure, before, after, amp=False)) == 0
    # A tile with a weak, uniform positive response: MI normalises it to 1 everywhere (any
    # tile's strongest response becomes "certain change"), MSI keeps it near 0.5.
    weak = FixedG([0.05, 0.05])
    assert torch.allclose(mi_map(weak, before, after, amp=False), torch.ones(2, 64, 96))
    assert torch.allclose(
        msi_map(weak, before, after, amp=False), torch.sigmoid(torch.tensor(0.05))
    )
    # On a real map both rank pixels alike inside a tile but differ in values.
    net = PoolNet()
    mi = mi_map(net, before, after, amp=False)
    msi = msi_map(net, before, after, amp=False)
    assert torch.allclose(mi.flatten(1).amax(dim=1), torch.ones(2), atol=1e-6)
    assert float(msi.max()) < 0.99
    assert not torch.allclose(mi, msi, atol=0.05)


def test_mi_is_normalised_sum_of_logits() -> None:
    before, after = _pair()
    net = PoolNet()
    scales = (0.5, 1.0)
    size = (64, 96)
    total = torch.zeros(2, 1, *size)
    for s in scales:
        t = (round(64 * s), round(96 * s))
        b = F.interpolate(before, size=t, mode="bilinear", align_corners=False)
        a = F.interpolate(after, size=t, mode="bilinear", align_corners=False)
        total += F.interpolate(net(b, a), size=size, mode="bilinear", align_corners=False)
        flipped = net(b.flip(-1), a.flip(-1)).flip(-1)
        total += F.interpolate(flipped, size=size, mode="bilinear", align_corners=False)
    want = F.relu(total) / F.relu(total).flatten(1).amax(dim=1).view(2, 1, 1, 1)
    assert torch.allclose(mi_map(net, before, after, scales, amp=False), want[:, 0], atol=1e-5)


def test_change_map_dispatch_and_errors() -> None:
    before, after = _pair((40, 56))
    net = PoolNet()
    for method in ("cam", "student", "mi", "msi"):
        out = change_map(method, net, net, before, after, (0.5, 1.0), amp=False)
        assert out.shape == (2, 40, 56) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    with pytest.raises(InputError, match="unknown method"):
        change_map("gradcam", net, net, before, after, (1.0,))
    with pytest.raises(InputError, match="scales"):
        change_map("msi", net, net, before, after, (0.0, 1.0))
    with pytest.raises(InputError, match="needs the teacher"):
        change_map("cam", None, net, before, after, (1.0,))
    with pytest.raises(InputError, match="one shape"):
        msi_map(net, before, after[:, :, :32])


def test_bf16_channels_last_close_to_fp32() -> None:
    torch.manual_seed(0)
    net = prepare_for_inference(SiameseCAMNet(build_backbone("resnet18"), "diff"))
    before = torch.rand(1, 3, 64, 64)
    after = before.clone()
    after[:, :, 16:48, 16:48] = torch.rand(1, 3, 32, 32)
    fp32 = msi_map(net, before, after, (1.0, 2.0), amp=False)
    fast = msi_map(net, before, after, (1.0, 2.0), amp=True)
    assert fast.dtype == torch.float32
    assert float((fast - fp32).abs().max()) < 0.05
