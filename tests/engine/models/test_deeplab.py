"""Siamese DeepLabV3+: shapes, shared encoder, difference features, model files."""

from __future__ import annotations

import pytest
import torch

from kdmsi_engine.errors import ModelFileError
from kdmsi_engine.modelfile import save_model
from kdmsi_engine.models.deeplab import (
    ASPP_CHANNELS,
    LOW_REDUCED_CHANNELS,
    architecture_dict,
    build_detector,
    change_probability,
    load_detector,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("resnet18", in_channels=4, weights="none").eval()


def test_logits_at_input_size_two_classes(model):
    before, after = torch.rand(2, 4, 64, 48), torch.rand(2, 4, 64, 48)
    with torch.no_grad():
        logits = model(before, after)
    assert logits.shape == (2, 2, 64, 48)
    prob = change_probability(model, before, after)
    assert prob.shape == (2, 64, 48)
    assert float(prob.min()) >= 0 and float(prob.max()) <= 1


def test_architecture_parts(model):
    assert model.reduce[0].out_channels == LOW_REDUCED_CHANNELS
    assert model.reduce[0].in_channels == model.backbone.low_channels == 64
    assert model.aspp.branches[0][0].in_channels == model.backbone.high_channels == 512
    assert model.aspp.project[0][0].out_channels == ASPP_CHANNELS
    assert [b[0].dilation for b in model.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert model.classifier.out_channels == 2
    # Backbone and new layers partition the parameters (for the 10x learning rate).
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}


def test_works_on_the_difference_of_one_shared_encoder(model):
    """Same image on both dates: every feature difference is 0, so logits are uniform."""
    image = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        same = model(image, image)
        changed = model(image, torch.rand(1, 4, 64, 64))
    assert torch.allclose(same, same[..., :1, :1].expand_as(same), atol=1e-5)
    assert changed.std(dim=(2, 3)).max() > 1e-4
    # One encoder: its weights get gradients from both dates.
    train = build_detector("resnet18", in_channels=4, weights="none").train()
    train(torch.rand(2, 4, 32, 32), torch.rand(2, 4, 32, 32)).sum().backward()
    assert train.backbone.encoder.conv1.weight.grad is not None
    assert sum(1 for m in train.modules() if m.__class__.__name__ == "ResNetEncoder") == 1


def test_batch_of_one_trains():
    net = build_detector("resnet18", in_channels=3, weights="none").train()
    net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).mean().backward()


def test_model_file_round_trip(tmp_path, model):
    meta = {
        "kind": "detector",
        "architecture": architecture_dict("resnet18", 4),
        "bands": [1, 2, 3, 4],
        "tile_size": 64,
    }
    save_model(tmp_path / "d.kdmsi", meta, {"detector": model.state_dict()})
    loaded, metadata = load_detector(tmp_path / "d.kdmsi")
    x, y = torch.rand(1, 4, 32, 32), torch.rand(1, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))
    assert metadata["architecture"]["name"] == "siamese-deeplabv3plus"
    assert not loaded.training
    # Metadata that does not fit the weights, or a KD-MSI file, is refused.
    bad = dict(meta, architecture=architecture_dict("resnet34", 4))
    save_model(tmp_path / "bad.kdmsi", bad, {"detector": model.state_dict()})
    with pytest.raises(ModelFileError):
        load_detector(tmp_path / "bad.kdmsi")
    save_model(tmp_path / "kd.kdmsi", {"kind": "kdmsi"}, {"student": model.state_dict()})
    with pytest.raises(ModelFileError):
        load_detector(tmp_path / "kd.kdmsi")
