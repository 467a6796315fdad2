"""Final-detector evaluation on real data: KD-MSI pseudo labels vs CAM pseudo labels vs masks.

Usage (from the repository root; ``../shared/data`` must exist)::

    python -m benchmarks.detector_eval [--out detector-eval-output]
        [--datasets levir-cd-samples,dsifn-cd-samples] [--backbone efficientnet-lite0]
        [--tile-size 64] [--kd-epochs 4] [--detector-epochs 3] [--threads 2]

Protocol (CPU-sized version of the paper's section 4):

* Data: the folder datasets named (``A/ B/ label/``, 256 px RGB pairs). Pairs are split in a
  fixed way: every third pair (index 2, 5, 8, ... in file-name order, per dataset) is a **test**
  pair, the others **train** pairs. Train pairs give tile labels only (a tile is changed when
  its mask has any change pixel), except for the supervised row.
* Stage 1 on the train tiles: KD-MSI teacher and student (ImageNet efficientnet-lite0, SGD,
  lr 0.001, poly, batch 8).
* Pseudo labels on the train pairs with ``kdmsi pseudo``'s rules and its ``auto`` threshold,
  from (a) the student's MSI map (scales 0.5, 1, 1.5, 2 with flips) and (b) the teacher's CAM.
* Stage 2: three Siamese DeepLabV3+ detectors with the same settings, trained on (a) MSI pseudo
  labels ("KD-MSI"), (b) CAM pseudo labels ("CAM"), (c) the pixel masks ("Supervised").
* Test: each detector over the test pairs (overlapping windows), change where p > 0.5;
  confusion counts summed over all test pixels; the paper's metrics: OA, change precision,
  recall, F1, cIoU, mean F1 (both classes), mIoU, FP and FN shares (cIoU + FP + FN = 1).
  Also reported: the quality of each pseudo-label set on the train pairs (labelled pixels).

Writes ``OUT/detector_eval.json`` and ``OUT/detector_eval.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from kdmsi_engine import defaults
from kdmsi_engine.progress import BarReporter, Progress

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "detector-eval-output"
ROWS = ("CAM", "KD-MSI", "Supervised")
METRIC_KEYS = (
    ("oa", "OA"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1 (change)"),
    ("mean_f1", "mean F1"),
    ("iou", "cIoU"),
    ("miou", "mIoU"),
    ("fp_share", "FP"),
    ("fn_share", "FN"),
)


def split_pairs(data: Path, datasets: list[str]) -> tuple[list[Any], list[Any]]:
    """(train, test) folder pairs: every third pair of each dataset is a test pair."""
    from kdmsi_engine.data.folder import find_pairs

    train, test = [], []
    for name in datasets:
        pairs = sorted(find_pairs(data / name, require_labels=True), key=lambda p: p.name)
        for index, pair in enumerate(pairs):
            (test if index % 3 == 2 else train).append(pair)
    return train, test


def _write_like(path: Path, array: np.ndarray, *, dtype: str, nodata: float | None) -> None:
    profile = {
        "driver": "GTiff",
        "width": array.shape[1],
        "height": array.shape[0],
        "count": 1,
        "dtype": dtype,
        "nodata": nodata,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(dtype), 1)


def _mask(pair: Any) -> np.ndarray:
    with rasterio.open(pair.label) as ds:
        return ds.read(1) > 0


def _tile_labels(pair: Any, tile_size: int) -> Any:
    from kdmsi_engine.data.folder import mask_tile_labels, open_folder_pair
    from kdmsi_engine.data.tiling import make_tile_grid
    from kdmsi_engine.pseudo import TileLabels

    with open_folder_pair(pair) as scene:
        tiles = make_tile_grid(scene, tile_size)
        grid = scene.grid
    tiles["label"] = mask_tile_labels(pair, tiles, grid)
    return TileLabels.from_frame(tiles)


def _confusion_add(total: Any, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> Any:
    from kdmsi_engine.metrics import confusion

    return total + confusion(pred, truth, valid)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from kdmsi_engine.training.kd import fit_kdmsi
    from kdmsi_engine.training.samples import folder_training_set

    out = Path(args.out).absolute()
    maps = out / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    progress = Progress(BarReporter() if args.progress else None)
    datasets = [d for d in args.datasets.split(",") if d]
    train, test = split_pairs(Path(args.data), datasets)
    timings: dict[str, float] = {}
    started = time.monotonic()

    # Stage 1: KD-MSI on the train pairs' tile labels.
    mark = time.monotonic()
    tset = folder_training_set(
        [Path(args.data) / d for d in datasets],
        tile_size=args.tile_size,
        names=[p.name for p in train],
        progress=progress,
    )
    student_path = out / defaults.STUDENT_NAME
    if args.reuse_student and student_path.is_file():
        kd = {"tiles": len(tset.tiles), "reused": str(student_path)}
    else:
        kd = _fit_student(fit_kdmsi, tset, student_path, args, progress)
    timings["kd_s"] = round(time.monotonic() - mark, 1)
    return _after_kd(args, out, maps, progress, datasets, train, test, timings, started, kd)


def _fit_student(fit_kdmsi: Any, tset: Any, student_path: Path, args: Any, progress: Any) -> dict:
    from kdmsi_engine.training.kd import KDConfig

    config = KDConfig(
        backbone=args.backbone, weights="imagenet", epochs=args.kd_epochs, seed=args.seed
    )
    return fit_kdmsi(
        tset, config, out=student_path, device="cpu", overwrite=True, progress=progress
    )


def _after_kd(
    args: Any,
    out: Path,
    maps: Path,
    progress: Any,
    datasets: list[str],
    train: list[Any],
    test: list[Any],
    timings: dict[str, float],
    started: float,
    kd: dict[str, Any],
) -> dict[str, Any]:
    from kdmsi_engine.data.folder import open_folder_pair
    from kdmsi_engine.detect import make_detector_predictor
    from kdmsi_engine.inference.maps import prepare_for_inference
    from kdmsi_engine.inference.scene import make_predictor
    from kdmsi_engine.inference.sliding import predict_scene
    from kdmsi_engine.metrics import Confusion, metrics_from_confusion
    from kdmsi_engine.models.deeplab import load_detector
    from kdmsi_engine.models.kdmsi import load_kdmsi_model
    from kdmsi_engine.pseudo import make_pseudo_labels
    from kdmsi_engine.training.detector import (
        DetectorConfig,
        DetectorScene,
        train_detector_scenes,
    )

    student_path = out / defaults.STUDENT_NAME
    # Maps and pseudo labels on the train pairs.
    mark = time.monotonic()
    teacher, student, _ = load_kdmsi_model(student_path)
    teacher = prepare_for_inference(teacher, "cpu")
    student = prepare_for_inference(student, "cpu")
    predictors = {
        "KD-MSI": make_predictor("msi", teacher, student, (0.5, 1.0, 1.5, 2.0)),
        "CAM": make_predictor("cam", teacher, student, (1.0,)),
    }
    scenes: dict[str, list[Any]] = {row: [] for row in ROWS}
    pseudo_quality: dict[str, Any] = {row: Confusion() for row in ROWS}
    thresholds: dict[str, list[float]] = {"KD-MSI": [], "CAM": []}
    for pair in train:
        tile_labels = _tile_labels(pair, args.tile_size)
        truth = _mask(pair)
        for row, predict in predictors.items():
            tag = row.lower().replace("-", "")
            prob_path = maps / f"{pair.name}_{tag}.tif"
            with open_folder_pair(pair) as scene:
                predict_scene(
                    scene, predict, prob_path, tile_size=args.tile_size * 2, overlap=args.tile_size // 2,
                    device="cpu", overwrite=True,
                )  # fmt: skip
            pseudo_path = maps / f"{pair.name}_{tag}_pseudo.tif"
            info = make_pseudo_labels(
                prob_path, pseudo_path, tile_labels=tile_labels, threshold="auto", overwrite=True
            )
            thresholds[row].append(float(info["threshold"]))
            with rasterio.open(pseudo_path) as ds:
                pseudo = ds.read(1)
            pseudo_quality[row] = _confusion_add(
                pseudo_quality[row], pseudo == 1, truth, pseudo != 255
            )
            scenes[row].append(
                DetectorScene(pair.name, pair.before, pair.after, pseudo_path, require_crs=False)
            )
        supervised = maps / f"{pair.name}_mask.tif"
        _write_like(supervised, truth.astype(np.uint8), dtype="uint8", nodata=255)
        scenes["Supervised"].append(
            DetectorScene(pair.name, pair.before, pair.after, supervised, require_crs=False)
        )
    timings["maps_pseudo_s"] = round(time.monotonic() - mark, 1)

    # Stage 2: three detectors, same settings.
    config = DetectorConfig(
        backbone=args.backbone,
        weights="imagenet",
        tile_size=args.tile_size,
        epochs=args.detector_epochs,
        batch_size=8,
        lr=args.detector_lr,
        seed=args.seed,
        min_labelled=0.25,
    )
    results: dict[str, Any] = {}
    for row in ROWS:
        mark = time.monotonic()
        model_path = out / f"detector_{row.lower().replace('-', '')}.kdmsi"
        trained = train_detector_scenes(
            scenes[row], model_path, config=config, device="cpu", overwrite=True,
            progress=progress,
        )  # fmt: skip
        timings[f"detector_{row}_s"] = round(time.monotonic() - mark, 1)
        net, _ = load_detector(model_path)
        net = net.eval().to(memory_format=torch.channels_last)
        predictor = make_detector_predictor(net)
        total = Confusion()
        for pair in test:
            prob_path = maps / f"test_{pair.name}_{row.lower().replace('-', '')}.tif"
            with open_folder_pair(pair) as scene:
                predict_scene(
                    scene, predictor, prob_path, tile_size=args.tile_size * 2,
                    overlap=args.tile_size // 2, device="cpu", overwrite=True,
                )  # fmt: skip
            with rasterio.open(prob_path) as ds:
                prob = ds.read(1)
            total = _confusion_add(total, prob > 0.5, _mask(pair), prob >= 0)
        results[row] = {
            "test": metrics_from_confusion(total),
            "pseudo_labels_train": metrics_from_confusion(pseudo_quality[row]),
            "train_tiles": trained["tiles"],
            "final_loss": trained["final_loss"],
        }
    timings["total_s"] = round(time.monotonic() - started, 1)
    record = {
        "command": "python -m benchmarks.detector_eval " + " ".join(args.argv),
        "configuration": {
            "datasets": datasets,
            "train_pairs": [p.name for p in train],
            "test_pairs": [p.name for p in test],
            "backbone": args.backbone,
            "weights": "imagenet",
            "tile_size": args.tile_size,
            "kd": {
                "epochs": args.kd_epochs,
                "batch_size": 8,
                "lr": 0.001,
                "tiles": kd.get("tiles"),
            },
            "msi_scales": [0.5, 1.0, 1.5, 2.0],
            "pseudo_threshold": "auto",
            "pseudo_thresholds_mean": {k: float(np.mean(v)) for k, v in thresholds.items()},
            "detector": {"epochs": args.detector_epochs, "batch_size": 8, "lr": args.detector_lr},
            "test_threshold": 0.5,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "results": results,
        "timings": timings,
    }
    (out / "detector_eval.json").write_text(json.dumps(record, indent=2, default=str))
    table = markdown_table(record)
    (out / "detector_eval.md").write_text(table + "\n")
    return record


def markdown_table(record: dict[str, Any]) -> str:
    head = (
        "| detector trained on | "
        + " | ".join(t for _, t in METRIC_KEYS)
        + " | pseudo-label cIoU (train) |"
    )
    sep = "|" + "---|" * (len(METRIC_KEYS) + 2)
    lines = [head, sep]
    for row in ROWS:
        res = record["results"][row]
        values = " | ".join(f"{res['test'][k]:.3f}" for k, _ in METRIC_KEYS)
        pseudo = res["pseudo_labels_train"]["iou"] if row != "Supervised" else 1.0
        lines.append(f"| {row} | {values} | {pseudo:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="final-detector evaluation on real data")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--datasets", default="levir-cd-samples,dsifn-cd-samples")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--kd-epochs", type=int, default=4)
    parser.add_argument("--detector-epochs", type=int, default=3)
    parser.add_argument("--detector-lr", type=float, default=0.007)
    parser.add_argument(
        "--reuse-student", action="store_true", help="keep OUT/student.kdmsi if it exists"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else os.sys.argv[1:]
    torch.set_num_threads(args.threads)
    record = run_eval(args)
    print(markdown_table(record))
    print(f"\ncommand: {record['command']}")
    print(
        f"total {record['timings']['total_s']:.0f} s; details in {Path(args.out) / 'detector_eval.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
