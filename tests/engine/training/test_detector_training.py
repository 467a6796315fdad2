"""Detector training: loss ignores 255, tile selection, model file, cancel/resume, manifests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from kdmsi_engine import defaults
from kdmsi_engine.cli import main
from kdmsi_engine.data.tiling import tile_windows
from kdmsi_engine.errors import CancelledError, LabelError
from kdmsi_engine.modelfile import load_model
from kdmsi_engine.models.deeplab import load_detector
from kdmsi_engine.progress import Progress
from kdmsi_engine.training.common import checkpoint_path
from kdmsi_engine.training.detector import (
    balanced_weights,
    detector_loss,
    scenes_from_manifest,
    train_detector,
)

TINY = dict(backbone="resnet18", weights="none", tile_size=32, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def taizhou(shared_data: Path) -> dict[str, Path]:
    root = shared_data / "landsat-taizhou-nanjing"
    return {
        "before": root / "A" / "taizhou.tif",
        "after": root / "B" / "taizhou.tif",
        # The sample reference is a 1/0/255 raster on the scene grid, like pseudo labels.
        "pseudo": root / "label" / "taizhou.tif",
    }


def test_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    labels = torch.randint(0, 2, (2, 8, 8))
    labels[:, :4] = 255
    loss = detector_loss(logits, labels)
    loss.backward()
    keep = labels != 255
    picked = logits.detach().permute(0, 2, 3, 1)[keep]
    expected = torch.nn.functional.cross_entropy(picked, labels[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.count_nonzero(logits.grad[:, :, :4]) == 0
    assert torch.count_nonzero(logits.grad[:, :, 4:]) > 0


def test_cli_trains_a_detector_on_labelled_tiles(tmp_path, taizhou):
    out = tmp_path / "det.kdmsi"
    status = main(
        [
            "train-detector", str(taizhou["before"]), str(taizhou["after"]),
            "--pseudo", str(taizhou["pseudo"]), "-o", str(out), "--backbone", "resnet18",
            "--weights", "none", "--tile-size", "32", "--epochs", "1", "--batch-size", "4",
            "--min-labelled", "0.6", "--bands", "4,3,2", "--device", "cpu", "--progress", "none",
        ]
    )  # fmt: skip
    assert status == 0
    # Tiles: exactly those with >= 60 % labelled pixels.
    with rasterio.open(taizhou["pseudo"]) as src:
        labels = src.read(1)
        from kdmsi_engine.data.grid import Grid

        grid = Grid.from_dataset(src)
    fractions = [
        (labels[w.row_off : w.row_off + 32, w.col_off : w.col_off + 32] != 255).mean()
        for w in tile_windows(grid, 32)
    ]
    expected = sum(f >= 0.6 for f in fractions)
    assert 0 < expected < len(fractions)
    model, meta = load_detector(out)
    assert meta["kind"] == "detector"
    assert meta["training"]["tiles"] == expected
    assert meta["bands"] == [4, 3, 2]
    assert meta["tile_size"] == 32
    assert meta["scaling"]["method"] == "uint8"
    assert meta["architecture"]["backbone"] == "resnet18"
    assert meta["architecture"]["in_channels"] == 3
    training = meta["training"]
    assert (training["epochs"], training["batch_size"], training["lr"]) == (
        1,
        4,
        defaults.DETECTOR_LR,
    )
    assert training["momentum"] == 0.9 and training["new_lr_mult"] == 10.0
    assert np.isfinite(training["final_loss"])
    assert not checkpoint_path(out).exists()


def test_nothing_labelled_is_refused(tmp_path, taizhou):
    pseudo = tmp_path / "empty.tif"
    with rasterio.open(taizhou["pseudo"]) as src:
        profile = src.profile
    with rasterio.open(pseudo, "w", **profile) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 255, np.uint8))
    with pytest.raises(LabelError):
        train_detector(
            taizhou["before"], taizhou["after"], pseudo, tmp_path / "d.kdmsi", epochs=1, **TINY
        )
    assert not (tmp_path / "d.kdmsi").exists()


@pytest.mark.slow
def test_cancel_then_resume_equals_uninterrupted(tmp_path, taizhou):
    args = (taizhou["before"], taizhou["after"], taizhou["pseudo"])
    opts = dict(epochs=2, max_tiles=4, min_labelled=0.3, seed=3, **TINY)
    train_detector(*args, tmp_path / "full.kdmsi", **opts)

    steps = {"n": 0}

    def cancel_in_epoch_two(event):
        if event.kind == "progress" and event.stage == "train-detector":
            steps["n"] += 1

    progress = Progress(cancel_in_epoch_two, lambda: steps["n"] >= 3)
    out = tmp_path / "resumed.kdmsi"
    with pytest.raises(CancelledError):
        train_detector(*args, out, progress=progress, **opts)
    assert not out.exists()
    ckpt = checkpoint_path(out)
    assert load_model(ckpt, file_format="kdmsi-checkpoint").extra["epoch"] == 1
    train_detector(*args, out, resume=True, **opts)
    assert not ckpt.exists()
    full = load_model(tmp_path / "full.kdmsi").tensors["detector"]
    resumed = load_model(out).tensors["detector"]
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-5), key


def test_manifest_pseudo_column_and_folder(tmp_path, taizhou):
    for name in ("a", "b"):
        shutil.copy(taizhou["pseudo"], tmp_path / f"{name}.tif")
    manifest = tmp_path / "scenes.csv"
    manifest.write_text(
        "name,before,after,labels,pseudo\n"
        f"a,{taizhou['before']},{taizhou['after']},,a.tif\n"
        f"b,{taizhou['before']},{taizhou['after']},,\n"
        f"c,{taizhou['before']},{taizhou['after']},,\n",
        encoding="utf-8",
    )
    found = scenes_from_manifest(manifest, tmp_path)
    assert [(s.name, s.pseudo.name) for s in found] == [("a", "a.tif"), ("b", "b.tif")]
    only_column = scenes_from_manifest(manifest)
    assert [s.name for s in only_column] == ["a"]


def test_balanced_class_weights():
    assert balanced_weights([90, 10]) == pytest.approx([100 / 180, 100 / 20])
    assert balanced_weights([50, 0]) == [1.0, 1.0]
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 0]]])
    plain = detector_loss(logits, labels)
    weighted = detector_loss(logits, labels, torch.tensor([0.5, 4.0]))
    # Equal logits: every labelled pixel costs ln 2, whatever the weights (weighted mean).
    assert plain.item() == pytest.approx(weighted.item()) == pytest.approx(0.6931, abs=1e-4)
    logits[0, 1] = 1.0  # now the change pixel is right, the no-change pixels wrong
    assert detector_loss(logits, labels, torch.tensor([0.5, 4.0])) < detector_loss(logits, labels)
