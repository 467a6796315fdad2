"""KD-MSI training: losses, learning-rate schedule, augmentation, tiny real runs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from shapely.geometry import Point

from kdmsi_engine.cli import main as cli_main
from kdmsi_engine.device import CPU_PRECISION_ENV, cpu_supports_bf16
from kdmsi_engine.errors import CancelledError, InputError, LabelError
from kdmsi_engine.inference.maps import student_map
from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models, load_kdmsi_model
from kdmsi_engine.progress import Progress
from kdmsi_engine.training.augment import augment_batch, dihedral
from kdmsi_engine.training.common import (
    checkpoint_path,
    epoch_generator,
    epoch_order,
    param_groups,
    poly_lr,
    set_poly_lr,
)
from kdmsi_engine.training.kd import train_kdmsi
from kdmsi_engine.training.losses import kd_losses, kd_target, resolve_precision, valid_cells


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    return build_kdmsi_models(architecture("resnet18", 3))


def test_kd_loss_reaches_only_the_student() -> None:
    teacher, student = _nets()
    before, after = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    labels = torch.tensor([1.0, 0.0])
    losses = kd_losses(teacher, student, before, after, labels, kd_weight=10.0)
    (10.0 * losses.kd).backward()
    t_grads = [p.grad for p in teacher.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in t_grads)
    s_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert s_grads and any(torch.count_nonzero(g) > 0 for g in s_grads)


def test_classification_loss_reaches_only_the_teacher() -> None:
    teacher, student = _nets()
    before, after = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    losses = kd_losses(teacher, student, before, after, torch.tensor([1.0, 0.0]))
    losses.cls.backward()
    assert all(p.grad is None for p in student.parameters())
    assert torch.count_nonzero(teacher.classifier.weight.grad) > 0
    # total = cls + lambda * kd
    assert torch.isclose(losses.total, losses.cls + 10.0 * losses.kd)


def test_kd_target_is_normalised_cam_times_label() -> None:
    g = torch.tensor([[[[2.0, -1.0], [1.0, 4.0]]], [[[3.0, 1.0], [0.0, 2.0]]]], requires_grad=True)
    target = kd_target(g, torch.tensor([1.0, 0.0]))
    assert not target.requires_grad
    assert torch.allclose(target[0, 0], torch.tensor([[0.5, 0.0], [0.25, 1.0]]))
    assert torch.count_nonzero(target[1]) == 0


def test_nodata_cells_do_not_count_in_kd_loss() -> None:
    teacher, student = _nets()
    before, after = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    valid = torch.ones(1, 64, 64, dtype=torch.bool)
    valid[:, :, :32] = False  # left half is nodata
    teacher.eval()
    student.eval()
    losses = kd_losses(teacher, student, before, after, torch.tensor([1.0]), valid)
    with torch.no_grad():
        p = torch.sigmoid(student(before, after))
    diff2 = (p - losses.cam) ** 2
    assert torch.isclose(losses.kd, diff2[..., 2:].mean(), atol=1e-6)
    assert not torch.isclose(losses.kd, diff2.mean(), atol=1e-6)
    cells = valid_cells(valid, (4, 4))
    assert cells is not None and cells.sum() == 8


def test_training_precision_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(CPU_PRECISION_ENV, raising=False)
    # bf16 only where the CPU has it natively (measured without loss, README), else fp32
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv(CPU_PRECISION_ENV, forced)
        assert resolve_precision("auto", cpu) == forced
    # an explicit choice wins over the switch
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(InputError, match="CUDA"):
        resolve_precision("fp16", cpu)


def test_poly_lr_and_param_groups() -> None:
    assert poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    teacher, student = _nets()
    groups = param_groups(
        teacher.backbone_parameters(), teacher.new_parameters(), lr=0.001, weight_decay=1e-4
    )
    opt = torch.optim.SGD(groups, lr=0.001, momentum=0.9)
    set_poly_lr(opt, 0.001, 10, 20)
    lrs = {(g["lr_mult"], g["weight_decay"]): g["lr"] for g in opt.param_groups}
    base = 0.001 * 0.5**0.9
    assert lrs[(1.0, 1e-4)] == pytest.approx(base)
    assert lrs[(1.0, 0.0)] == pytest.approx(base)  # BN and biases: no decay
    assert lrs[(10.0, 1e-4)] == pytest.approx(10 * base)  # the new 1x1 classifier
    new_ids = {id(p) for g in opt.param_groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert new_ids == {id(teacher.classifier.weight)}


def test_augmentation_same_for_both_dates_and_reproducible() -> None:
    before = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    after = before * 10
    valid = before[:, 0] > 5
    b1, a1, v1 = augment_batch(before, after, valid, generator=epoch_generator(1, 3, 1))
    b2, a2, v2 = augment_batch(before, after, valid, generator=epoch_generator(1, 3, 1))
    assert torch.equal(b1, b2) and torch.equal(a1, a2) and torch.equal(v1, v2)
    assert torch.equal(a1, b1 * 10)  # the same transform on both dates
    assert torch.equal(v1, b1[:, 0] > 5)
    # each of the 8 symmetries is a distinct permutation of the pixels
    images = {tuple(dihedral(before[0, 0], c).flatten().tolist()) for c in range(8)}
    assert len(images) == 8
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)


def _tiny_dataset(shared_data: Path, root: Path) -> Path:
    """A folder dataset with one real DSIFN-CD pair: 4 tiles of 128 px, 2 changed."""
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        os.symlink(shared_data / "dsifn-cd-samples" / sub / "9_3.png", root / sub / "9_3.png")
    return root


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _cancel_after(n: int) -> Progress:
    seen = {"train": 0}

    def _callback(event) -> None:
        if event.kind == "progress" and event.stage == "train":
            seen["train"] += 1

    return Progress(_callback, lambda: seen["train"] >= n)


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_weights(
    shared_data: Path, tmp_path: Path
) -> None:
    data = _tiny_dataset(shared_data, tmp_path / "ds")
    kwargs = dict(
        dataset=data,
        backbone="efficientnet-lite0",
        weights="none",
        epochs=2,
        batch_size=2,
        tile_size=128,
        seed=7,
        device="cpu",
    )
    whole = train_kdmsi(out=tmp_path / "whole.kdmsi", **kwargs)
    assert whole["tiles"] == 4 and whole["changed_tiles"] == 2
    assert not checkpoint_path(tmp_path / "whole.kdmsi").exists()  # removed once written
    cut = tmp_path / "cut.kdmsi"
    with pytest.raises(CancelledError, match="resume"):
        train_kdmsi(out=cut, progress=_cancel_after(3), **kwargs)  # stops inside epoch 2
    assert not cut.exists()
    assert checkpoint_path(cut).is_file()
    with pytest.raises(InputError, match="other training parameters"):
        train_kdmsi(out=cut, resume=True, **{**kwargs, "seed": 8})
    resumed = train_kdmsi(out=cut, resume=True, **kwargs)
    assert resumed["epochs"] == 2
    t1, s1, m1 = load_kdmsi_model(tmp_path / "whole.kdmsi")
    t2, s2, m2 = load_kdmsi_model(cut)
    for a, b in ((t1, t2), (s1, s2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in m1["training"]["history"]] == [
        h["loss"] for h in m2["training"]["history"]
    ]
    _assert_kill_and_resume_matches(data, tmp_path, kwargs, s1)
    # training changed the weights from their seeded start
    torch.manual_seed(7)
    t0, _ = build_kdmsi_models(architecture("efficientnet-lite0", 3))
    assert not torch.equal(t0.classifier.weight, t1.classifier.weight)


def _assert_kill_and_resume_matches(
    data: Path, tmp_path: Path, kwargs: dict, reference: torch.nn.Module
) -> None:
    """SIGKILL a CLI training process inside epoch 2, resume it: same student weights."""
    out = tmp_path / "killed.kdmsi"
    command = [
        sys.executable, "-m", "kdmsi_engine", "train", "--dataset", str(data), "-o", str(out),
        "--backbone", str(kwargs["backbone"]), "--weights", "none", "--epochs", "2",
        "--batch-size", "2", "--tile-size", "128", "--seed", "7", "--device", "cpu",
        "--progress", "json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event.get("data", {}).get("epoch") == 2:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL
    assert not out.exists() and checkpoint_path(out).is_file()
    train_kdmsi(out=out, resume=True, **kwargs)
    _, student, _ = load_kdmsi_model(out)
    ref, got = reference.state_dict(), student.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def _taizhou_labels(shared_data: Path, path: Path) -> tuple[int, int]:
    """Weak labels: points on 3 changed and 2 unchanged 64 px tiles of the Taizhou pair."""
    with rasterio.open(shared_data / "landsat-taizhou-nanjing" / "label" / "taizhou.tif") as ds:
        sample = ds.read(1)
        transform, crs = ds.transform, ds.crs
    points, values = [], []
    wanted = {1: 3, 0: 2}
    for r in range(0, 384, 64):
        for c in range(0, 384, 64):
            tile = sample[r : r + 64, c : c + 64]
            value = 1 if (tile == 1).any() else (0 if (tile == 0).any() else None)
            if value is None or not wanted[value]:
                continue
            inner = np.argwhere(tile[2:-2, 2:-2] == value)
            if not len(inner):
                continue
            y, x = inner[0] + 2 + (r, c)
            points.append(Point(*(transform * (x + 0.5, y + 0.5))))
            values.append(value)
            wanted[value] -= 1
    gpd.GeoDataFrame({"change": values}, geometry=points, crs=crs).to_file(path, driver="GPKG")
    return values.count(1), values.count(0)


def test_cli_train_on_a_real_scene_with_weak_labels(shared_data: Path, tmp_path: Path) -> None:
    site = shared_data / "landsat-taizhou-nanjing"
    labels = tmp_path / "labels.gpkg"
    changed, unchanged = _taizhou_labels(shared_data, labels)
    assert (changed, unchanged) == (3, 2)
    out = tmp_path / "taizhou.kdmsi"
    args = [
        "train",
        str(site / "A" / "taizhou.tif"),
        str(site / "B" / "taizhou.tif"),
        "--labels",
        str(labels),
        "-o",
        str(out),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "5",
        "--tile-size",
        "64",
        "--bands",
        "4,3,2,1",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]
    assert cli_main(args) == 0
    teacher, student, meta = load_kdmsi_model(out)
    assert meta["kind"] == "kdmsi"
    assert meta["architecture"]["in_channels"] == 4
    assert meta["bands"] == [4, 3, 2, 1] and meta["tile_size"] == 64
    assert meta["scaling"]["method"] == "uint8"
    data = meta["training"]["data"]
    # only the 5 tiles the points touch train; the other tiles are unlabelled
    assert (data["changed_tiles"], data["unchanged_tiles"]) == (3, 2)
    assert data["unlabelled_tiles"] >= 31
    params = meta["training"]["parameters"]
    assert params["lr"] == 0.001 and params["kd_weight"] == 10.0 and params["augment"] is True
    assert "engine_version" in meta and meta["timings"]["train_seconds"] > 0
    x = torch.rand(1, 4, 64, 64)
    out_map = student_map(student, x, x.flip(-1))
    assert out_map.shape == (1, 64, 64) and 0 <= float(out_map.min()) <= float(out_map.max()) <= 1
    # an existing output is refused before any work, exit status 2 with one line
    assert cli_main(args) == 2


def test_one_class_labels_are_refused(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        name = "train_386_0512_0768.png"  # the LEVIR-CD pair without change
        os.symlink(shared_data / "levir-cd-samples" / sub / name, root / sub / name)
    with pytest.raises(LabelError, match="0 changed"):
        train_kdmsi(
            dataset=root,
            out=tmp_path / "m.kdmsi",
            backbone="resnet18",
            weights="none",
            tile_size=128,
        )
    assert not (tmp_path / "m.kdmsi").exists()


def test_bad_parameters_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="one data source"):
        train_kdmsi(out=tmp_path / "m.kdmsi")
    with pytest.raises(InputError, match="number of epochs"):
        train_kdmsi(dataset=tmp_path, out=tmp_path / "m.kdmsi", epochs=0)
    with pytest.raises(InputError, match="weights"):
        train_kdmsi(dataset=tmp_path, out=tmp_path / "m.kdmsi", weights=tmp_path / "nope.pth")
    with pytest.raises(InputError, match="no checkpoint"):
        train_kdmsi(dataset=tmp_path, out=tmp_path / "m.kdmsi", resume=True)
