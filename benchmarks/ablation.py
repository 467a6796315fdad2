"""The KD-MSI paper's ablation (its Table 4) repeated on the real data beside the repository.

``make ablation`` (``python -m benchmarks.ablation``) trains KD-MSI with weak labels only
on OSCD (10 cities, bands 1-3 = red, green, blue), AirChange, LEVIR-CD and DSIFN-CD tiles (tile
labels from the masks: a tile is changed if any pixel changed), then scores the training set's
change maps against the pixel masks with the paper's protocol: confusion counts summed over all
tiles, tiles labelled unchanged count as background (maps multiplied by the tile label), change
IoU at the best threshold and at 0.5. Columns: teacher CAM, student, student + MI, student +
MSI, and the trivial map "every pixel of a changed tile".

Configurations (each sized for < 30 min on 2 CPU cores when the machine is not shared):

- ``resnet18-scratch``: ResNet-18 from random weights (no ImageNet weights offline);
- ``lite0-imagenet``: EfficientNet-Lite0 from its packaged ImageNet weights;
- the paper's: ``--backbone resnet50 --weights imagenet --epochs 20 --tile-size 256`` (GPU).

``--time-budget`` caps the training time: the epochs are reduced (before training, from a
measured step time) so the run fits; the table says how many epochs ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.errors import NotGeoreferencedWarning

from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.inference.maps import cam_map, multiscale_maps, student_map
from kdmsi_engine.progress import BarReporter, Progress
from kdmsi_engine.training.kd import KDConfig, fit_kdmsi
from kdmsi_engine.training.losses import train_step
from kdmsi_engine.training.samples import TileStore, TrainingSet, folder_training_set

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("oscd", "airchange", "levir-cd-samples", "dsifn-cd-samples")
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
METHODS = ("cam", "student", "mi", "msi", "trivial")
COLUMNS = {
    "cam": "teacher CAM",
    "student": "student",
    "mi": "student+MI",
    "msi": "student+MSI",
    "trivial": "changed tiles",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18-scratch": {"backbone": "resnet18", "weights": "none"},
    "lite0-imagenet": {"backbone": "efficientnet-lite0", "weights": "imagenet"},
}
FULL_BALANCE: dict[str, int] = {}
PAPER = {
    "WHU-CD (paper, ResNet50 ImageNet, GPU)": {
        "cam": 0.351,
        "student": 0.477,
        "mi": 0.473,
        "msi": 0.527,
    },
    "LEVIR-CD (paper)": {"cam": 0.253, "student": 0.323, "mi": 0.291, "msi": 0.353},
}


class Confusion:
    """Change-class confusion counts at many thresholds, summed over tiles."""

    def __init__(self, thresholds: np.ndarray) -> None:
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)
        n = len(thresholds)
        self.tp = np.zeros(n, dtype=np.int64)
        self.fp = np.zeros(n, dtype=np.int64)
        self.fn = np.zeros(n, dtype=np.int64)

    def add(self, prob: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        """``prob`` (B,H,W) in [0,1], ``truth`` bool (B,H,W), ``valid`` bool (B,H,W)."""
        p = prob[valid].float()
        t = truth[valid]
        pred = p.unsqueeze(0) > self.thresholds.view(-1, 1)
        self.tp += (pred & t).sum(dim=1).numpy()
        self.fp += (pred & ~t).sum(dim=1).numpy()
        self.fn += (~pred & t).sum(dim=1).numpy()

    def iou(self) -> np.ndarray:
        denom = self.tp + self.fp + self.fn
        return np.where(denom > 0, self.tp / np.maximum(denom, 1), 0.0)

    def summary(self) -> dict[str, float]:
        iou = self.iou()
        best = int(np.argmax(iou))
        half = int(np.argmin(np.abs(self.thresholds.numpy() - 0.5)))
        return {
            "iou_best": round(float(iou[best]), 4),
            "threshold_best": round(float(self.thresholds[best]), 2),
            "iou_at_0.5": round(float(iou[half]), 4),
        }


def collect(data: Path, tile_size: int, max_tiles: int | None, seed: int) -> TrainingSet:
    """Tiles of the four datasets (bands 1-3) with tile labels from their masks."""
    roots = [data / name for name in DATASETS]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"ablation: data folder(s) missing: {', '.join(missing)}")
    tset = folder_training_set(roots, tile_size=tile_size, bands=(1, 2, 3))
    logger.warning(
        "all tiles: %d of %d px from %d pairs, %d changed, %d unchanged",
        len(tset.tiles),
        tile_size,
        len(tset.scenes),
        tset.num_changed,
        tset.num_unchanged,
    )
    FULL_BALANCE.update(
        tiles=len(tset.tiles), changed=tset.num_changed, unchanged=tset.num_unchanged
    )
    if max_tiles is not None and len(tset.tiles) > max_tiles:
        tset = tset.subset(balanced_subset(tset, max_tiles, seed))
    return tset


def balanced_subset(tset: TrainingSet, size: int, seed: int) -> list[int]:
    """Random tile indexes, half changed and half unchanged where the classes allow."""
    rng = np.random.default_rng(seed)
    labels = np.array([t.label for t in tset.tiles])
    changed, unchanged = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_un = min(len(unchanged), size // 2)
    n_ch = min(len(changed), size - n_un)
    n_un = min(len(unchanged), size - n_ch)
    keep = np.concatenate(
        [rng.choice(changed, n_ch, replace=False), rng.choice(unchanged, n_un, replace=False)]
    )
    return sorted(int(i) for i in keep)


def read_masks(tset: TrainingSet) -> np.ndarray:
    """uint8 (N,T,T) change masks of the training tiles (used only for scoring)."""
    from kdmsi_engine.data.folder import read_mask

    out = np.zeros((len(tset.tiles), tset.tile_size, tset.tile_size), dtype=bool)
    for i, tile in enumerate(tset.tiles):
        pair = tset.scenes[tile.scene].pair
        out[i] = read_mask(pair, tile.window(tset.tile_size)) > 0
    return out


def measure_step_seconds(tset: TrainingSet, config: dict[str, Any], device: torch.device) -> float:
    """Seconds per training step at the configuration's batch size (2 timed steps)."""
    from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models
    from kdmsi_engine.training.common import param_groups

    arch = architecture(config["backbone"], tset.num_bands)
    teacher, student = build_kdmsi_models(arch, weights=config["weights"])
    teacher.to(device).train()
    student.to(device).train()
    groups = param_groups(
        teacher.backbone_parameters() + student.backbone_parameters(),
        teacher.new_parameters() + student.new_parameters(),
        lr=1e-4,
    )
    opt = torch.optim.SGD(groups, lr=1e-4, momentum=0.9)
    with TileStore(tset.subset(range(min(len(tset.tiles), config["batch_size"])))) as store:
        batch = [x.to(device) for x in store.batch(range(len(store.tset.tiles)))]
    before, after, valid, labels = batch
    times = []
    for _ in range(3):
        started = time.monotonic()
        train_step(
            teacher, student, opt, before, after, labels, valid, precision=config["precision"]
        )
        times.append(time.monotonic() - started)
    return float(np.median(times[1:]))


def evaluate(
    tset: TrainingSet,
    masks: np.ndarray,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    *,
    scales: Sequence[float],
    device: torch.device,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Pixel IoU of each map over the training tiles (unchanged tiles = background)."""
    confusions = {m: Confusion(THRESHOLDS) for m in METHODS}
    teacher.eval()
    student.eval()
    n = len(tset.tiles)
    if progress is not None:
        progress.stage("evaluate", total=n, message=f"CAM, student, MI, MSI on {n} tiles")
    with TileStore(tset) as store:
        for first in range(0, n, batch_size):
            idx = list(range(first, min(n, first + batch_size)))
            before, after, valid, labels = store.batch(idx)
            before, after = before.to(device), after.to(device)
            label_map = labels.view(-1, 1, 1)
            truth = torch.from_numpy(masks[idx])
            maps = {
                "cam": cam_map(teacher, before, after, labels.to(device)).cpu(),
                "student": student_map(student, before, after).cpu() * label_map,
            }
            mi, msi = multiscale_maps(student, before, after, scales)
            maps["mi"] = mi.cpu() * label_map
            maps["msi"] = msi.cpu() * label_map
            maps["trivial"] = label_map.expand_as(truth).float()
            for name, prob in maps.items():
                confusions[name].add(prob, truth, valid)
            if progress is not None:
                progress.advance(len(idx))
    return {m: c.summary() for m, c in confusions.items()}


def pixel_balance(masks: np.ndarray, tset: TrainingSet) -> dict[str, float]:
    changed = np.array([t.label for t in tset.tiles]) == 1
    return {
        "change_pixel_fraction": round(float(masks.mean()), 4),
        "change_fraction_in_changed_tiles": round(float(masks[changed].mean()), 4),
    }


def run_config(
    name: str,
    config: dict[str, Any],
    tset: TrainingSet,
    masks: np.ndarray,
    *,
    device: torch.device,
    time_budget: float | None,
    progress: Progress,
) -> dict[str, Any]:
    """Train one configuration and score its maps."""
    epochs = config["epochs"]
    steps_per_epoch = math.ceil(len(tset.tiles) / config["batch_size"])
    step_seconds = None
    if time_budget:
        step_seconds = measure_step_seconds(tset, config, device)
        fit = int(time_budget / (step_seconds * steps_per_epoch))
        if fit < epochs:
            progress.log(
                f"{name}: {step_seconds:.2f} s per step; {epochs} epochs do not fit "
                f"{time_budget:.0f} s, training {max(1, fit)}"
            )
            epochs = max(1, fit)
    started = time.monotonic()
    kd_config = KDConfig(
        backbone=config["backbone"],
        weights=config["weights"],
        epochs=epochs,
        batch_size=config["batch_size"],
        lr=config["lr"],
        kd_weight=config["kd_weight"],
        seed=config["seed"],
        augment=config["augment"],
        precision=config["precision"],
    )
    result = fit_kdmsi(tset, kd_config, out=None, device=device, progress=progress)
    train_seconds = time.monotonic() - started
    started = time.monotonic()
    nets = result["networks"]
    scores = evaluate(
        tset,
        masks,
        nets["teacher"],
        nets["student"],
        scales=config["scales"],
        device=device,
        progress=progress,
    )
    return {
        "config": name,
        **{k: v for k, v in config.items() if k != "scales"},
        "scales": list(config["scales"]),
        "epochs_run": epochs,
        "step_seconds_measured": step_seconds,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.monotonic() - started, 1),
        "final_loss": result["final_loss"],
        "history": result["metadata"]["training"]["history"],
        "scores": scores,
    }


def format_table(results: list[dict[str, Any]], tset: TrainingSet) -> str:
    head = "| configuration | " + " | ".join(COLUMNS[m] for m in METHODS) + " |"
    rule = "|---|" + "---|" * len(METHODS)
    lines = [
        f"Pixel change IoU on the {len(tset.tiles)} training tiles of {tset.tile_size} px "
        f"({tset.num_changed} changed, {tset.num_unchanged} unchanged), best threshold "
        "(threshold) / at 0.5; unchanged tiles count as background.",
        "",
        head,
        rule,
    ]
    for r in results:
        cells = []
        for m in METHODS:
            s = r["scores"][m]
            if m == "trivial":
                cells.append(f"{s['iou_best']:.3f}")
            else:
                cells.append(
                    f"{s['iou_best']:.3f} ({s['threshold_best']:.2f}) / {s['iou_at_0.5']:.3f}"
                )
        label = (
            f"{r['backbone']} {r['weights']}, {r['epochs_run']} ep, "
            f"{r['train_seconds'] / 60:.1f} min"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, values in PAPER.items():
        cells = [f"{values[m]:.3f}" if m in values else "" for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation",
        description="Repeat the KD-MSI paper's ablation (Table 4) on the real data.",
    )
    parser.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGS),
        help="a named CPU configuration (repeatable); default: both",
    )
    parser.add_argument("--backbone", help="a custom configuration's backbone (e.g. resnet50)")
    parser.add_argument("--weights", default="imagenet", help="custom configuration's weights")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--kd-weight", type=float, default=10.0)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--scales", default="0.5,1,1.5,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="train and score on a random subset of this many tiles, half changed where possible",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=25 * 60,
        help="seconds of training per configuration; fewer epochs when needed (1500; 0: none)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    torch.set_num_threads(max(1, args.threads))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress(BarReporter())
    device = resolve_device(args.device)
    scales = tuple(float(s) for s in args.scales.split(","))
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kd_weight": args.kd_weight,
        "seed": args.seed,
        "augment": not args.no_augment,
        "precision": args.precision,
        "scales": scales,
    }
    if args.backbone:
        configs = {
            f"{args.backbone}-{Path(args.weights).name}": {
                "backbone": args.backbone,
                "weights": args.weights,
            }
        }
    else:
        names = args.config or list(CONFIGS)
        configs = {n: CONFIGS[n] for n in names}
    started = time.monotonic()
    tset = collect(args.data, args.tile_size, args.max_tiles, args.seed)
    masks = read_masks(tset)
    balance = pixel_balance(masks, tset)
    progress.log(
        f"{len(tset.tiles)} tiles of {tset.tile_size} px from {len(tset.scenes)} pairs: "
        f"{tset.num_changed} changed, {tset.num_unchanged} unchanged; change pixels "
        f"{balance['change_pixel_fraction']:.1%} of all, "
        f"{balance['change_fraction_in_changed_tiles']:.1%} of changed tiles"
    )
    results = []
    for name, config in configs.items():
        results.append(
            run_config(
                name,
                {**common, **config},
                tset,
                masks,
                device=device,
                time_budget=args.time_budget or None,
                progress=progress,
            )
        )
    table = format_table(results, tset)
    record = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks.ablation " + " ".join(argv or sys.argv[1:]),
        "tiles": tset.describe(),
        "balance": balance,
        "all_tiles_before_subset": FULL_BALANCE,
        "results": results,
        "seconds": round(time.monotonic() - started, 1),
        "table": table,
    }
    print(table)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP threads that spin-wait are several times slower on a shared machine; the
        # variable must be set before torch loads, hence a fresh interpreter.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.ablation", *sys.argv[1:]])  # noqa: S606
    sys.exit(main())
