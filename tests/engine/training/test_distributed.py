"""Training over several processes (torchrun, gloo on the CPU): one job, one model file.

Every multi-process run here starts the real launcher, ``python -m torch.distributed.run
--standalone --nproc_per_node 2``, with one thread per process (2 cores).

Tolerances: with BatchNorm removed, 2 processes x batch b are the same computation as one
process at the global batch 2b, so step losses agree to 1e-4 (relative) and weights to 1e-5
(absolute): only the order of float sums differs (measured: 3e-7 and 3e-8). With the real
networks BatchNorm normalises each process's half of a batch by its own statistics, so the
losses differ by more (measured up to 9 % per step, 2 % per epoch); the epoch losses are checked
within 15 %.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

from kdmsi_engine.detect import detect_scene
from kdmsi_engine.errors import InputError
from kdmsi_engine.inference.maps import msi_map
from kdmsi_engine.modelfile import load_model
from kdmsi_engine.models.kdmsi import load_kdmsi_model
from kdmsi_engine.training import distributed
from kdmsi_engine.training.common import checkpoint_path, epoch_order
from kdmsi_engine.training.detector import train_detector
from kdmsi_engine.training.kd import train_kdmsi

HELPERS = Path(__file__).resolve().parents[2] / "helpers"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def _env(repo_root: Path) -> dict[str, str]:
    path = os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _dataset(shared_data: Path, root: Path, names: tuple[str, ...]) -> Path:
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        for name in names:
            (root / sub / name).symlink_to(shared_data / "dsifn-cd-samples" / sub / name)
    return root


def test_shards_are_disjoint_and_make_the_one_process_batches() -> None:
    order = epoch_order(10, 0, 1)
    parts = [distributed.shard(order, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded from 10 to 12 with the first two
    assert sorted(sum(parts, [])) == sorted(order + order[:2])
    assert set(parts[0]) & set(parts[1]) - set(order[:2]) == set()
    # step k of the three processes (batch 2 each) = step k of one process at batch 6
    for k in range(2):
        together = sorted(sum((p[2 * k : 2 * k + 2] for p in parts), []))
        assert together == sorted((order + order[:2])[6 * k : 6 * k + 6])
    assert distributed.shard(order, 0, 1) == order


def test_the_global_batch_must_divide_over_the_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    distributed.check_global_batch(4, 2)
    distributed.check_global_batch(5, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="global batch.*multiple of 2") as caught:
        train_kdmsi(dataset=tmp_path, out=tmp_path / "m.kdmsi", batch_size=5)
    assert caught.value.parameters == ("batch_size",)
    assert list(tmp_path.iterdir()) == []
    assert distributed.current() == distributed.SINGLE  # checking opens no process group


def test_other_commands_refuse_to_run_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from cli_harness import run_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["cva", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "p.tif")]
    run = run_cli(args, capfd)
    assert run.code == 2 and "only train and train-detector" in run.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_are_one_process_at_the_global_batch(
    shared_data: Path, tmp_path: Path, repo_root: Path
) -> None:
    """Without BatchNorm, 2 processes x 4 tile pairs = 1 process x 8: losses and weights."""
    data = _dataset(shared_data, tmp_path / "ds", ("9_3.png",))
    script = str(HELPERS / "distributed_testutils.py")
    runs = {}
    for processes in (1, 2):
        out, steps = tmp_path / f"p{processes}.kdmsi", tmp_path / f"p{processes}.json"
        launcher = [*TORCHRUN, "2"] if processes == 2 else [sys.executable]
        command = [*launcher, script, str(data), str(out), str(steps), "--batch-size", "8"]
        subprocess.run(command, check=True, env=_env(repo_root), capture_output=True, timeout=300)
        runs[processes] = (json.loads(steps.read_text()), load_model(out))
    (one, one_model), (two, two_model) = runs[1], runs[2]
    assert len(one["steps"]) == len(two["steps"]) == 4  # 16 tiles of 64 px, 2 epochs
    for a, b in zip(one["steps"], two["steps"]):
        assert b["lr"] == a["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for net in ("teacher", "student"):
        for name, value in one_model.tensors[net].items():
            assert torch.allclose(value, two_model.tensors[net][name], atol=1e-5), name
    assert two_model.metadata["training"]["batch"] == {
        "processes": 2, "backend": "gloo", "per_process_batch": 4, "global_batch": 8,
    }  # fmt: skip
    assert one_model.metadata["training"]["batch"]["processes"] == 1
    assert two["result"]["global_batch"] == 8 and two["result"]["per_process_batch"] == 4


@pytest.mark.slow
def test_torchrun_kd_training_writes_one_model_that_loads_and_infers(
    shared_data: Path, tmp_path: Path, repo_root: Path
) -> None:
    data = _dataset(shared_data, tmp_path / "ds", ("9_3.png", "0_2.png"))
    options = dict(backbone="efficientnet-lite0", epochs=2, batch_size=4, tile_size=128)
    out = tmp_path / "m.kdmsi"
    command = [
        *TORCHRUN, "2", "-m", "kdmsi_engine", "train", "--dataset", str(data), "-o", str(out),
        "--weights", "none", "--precision", "fp32", "--no-augment", "--device", "cpu",
        "--progress", "json", *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()],
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=_env(repo_root), capture_output=True, text=True, timeout=300, check=True
    )
    events = _events(proc.stdout)
    # rank 0 alone reports: one train stage, one result
    assert [e["stage"] for e in events if e["event"] == "stage"].count("train") == 1
    results = [e["data"] for e in events if e["event"] == "result"]
    assert len(results) == 1 and results[0]["model"] == str(out)
    assert (results[0]["processes"], results[0]["per_process_batch"]) == (2, 2)
    assert any("global batch 4" in e.get("message", "") for e in events)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "m.kdmsi"]  # no checkpoint left
    teacher, student, metadata = load_kdmsi_model(out)
    assert metadata["training"]["batch"]["global_batch"] == 4
    with rasterio.open(data / "A" / "9_3.png") as a, rasterio.open(data / "B" / "9_3.png") as b:
        before = torch.from_numpy(a.read()[None, :, :128, :128] / 255.0).float()
        after = torch.from_numpy(b.read()[None, :, :128, :128] / 255.0).float()
    with torch.no_grad():
        probability = msi_map(student, before, after, amp=False)
    assert probability.shape == (1, 128, 128)
    assert bool(torch.isfinite(probability).all()) and 0 <= float(probability.min())
    assert float(probability.max()) <= 1
    # the same run in one process at the global batch: BatchNorm keeps it from being identical
    train_kdmsi(
        dataset=data, out=tmp_path / "one.kdmsi", weights="none", precision="fp32",
        augment=False, device="cpu", **options,
    )  # fmt: skip
    two_losses = [h["loss"] for h in metadata["training"]["history"]]
    one_losses = [
        h["loss"] for h in load_model(tmp_path / "one.kdmsi").metadata["training"]["history"]
    ]
    assert np.allclose(two_losses, one_losses, rtol=0.15), (two_losses, one_losses)


def _detector_command(taizhou: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "kdmsi_engine", "train-detector", str(taizhou / "A" / "taizhou.tif"),
        str(taizhou / "B" / "taizhou.tif"), "--pseudo", str(taizhou / "label" / "taizhou.tif"),
        "-o", str(out), "--backbone", "resnet18", "--weights", "none", "--tile-size", "32",
        "--batch-size", "4", "--max-tiles", "16", "--epochs", "2", "--device", "cpu",
        "--progress", "json", *extra,
    ]  # fmt: skip


def _cancel_in_epoch_2(command: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """Run torchrun, SIGTERM it (as a cluster's scheduler or the plugin would) in epoch 2."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    events = []
    for line in proc.stdout:
        if line.startswith(b"{"):
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and events[-1].get("data", {}).get("epoch") == 2:
                proc.send_signal(signal.SIGTERM)
                break
    events += _events(proc.stdout.read().decode())
    assert proc.wait(timeout=120) != 0
    return events


@pytest.mark.slow
def test_torchrun_detector_cancel_and_resume_give_the_uninterrupted_model(
    shared_data: Path, tmp_path: Path, repo_root: Path
) -> None:
    taizhou = shared_data / "landsat-taizhou-nanjing"
    env = _env(repo_root)
    whole = tmp_path / "whole.kdmsi"
    subprocess.run(
        [*TORCHRUN, "2", *_detector_command(taizhou, whole)],
        env=env, capture_output=True, timeout=300, check=True,
    )  # fmt: skip
    cut = tmp_path / "cut.kdmsi"
    events = _cancel_in_epoch_2([*TORCHRUN, "2", *_detector_command(taizhou, cut)], env)
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["data"]["type"] == "CancelledError"
    assert "saved in" in errors[0]["message"]
    assert checkpoint_path(cut).is_file() and not cut.exists()
    # a checkpoint of 2 processes does not resume in one (its steps and padding differ)
    with pytest.raises(InputError, match="processes"):
        train_detector(
            taizhou / "A" / "taizhou.tif", taizhou / "B" / "taizhou.tif",
            taizhou / "label" / "taizhou.tif", cut, backbone="resnet18", weights="none",
            tile_size=32, batch_size=4, max_tiles=16, epochs=2, device="cpu", resume=True,
        )  # fmt: skip
    subprocess.run(
        [*TORCHRUN, "2", *_detector_command(taizhou, cut, "--resume")],
        env=env, capture_output=True, timeout=300, check=True,
    )  # fmt: skip
    assert not checkpoint_path(cut).exists()
    resumed, uninterrupted = load_model(cut), load_model(whole)
    for name, value in uninterrupted.tensors["detector"].items():
        assert torch.equal(value, resumed.tensors["detector"][name]), name
    assert resumed.metadata["training"]["batch"]["processes"] == 2
    history = resumed.metadata["training"]["final_loss"]
    assert history is not None and math.isfinite(history)
    record = detect_scene(
        taizhou / "A" / "taizhou.tif", taizhou / "B" / "taizhou.tif", cut, tmp_path / "detect",
        device="cpu",
    )  # fmt: skip
    with rasterio.open(record["outputs"]["change_probability"]) as src:
        probability = src.read(1, masked=True)
    assert probability.count() > 0 and 0 <= probability.min() and probability.max() <= 1
