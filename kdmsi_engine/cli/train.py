"""``kdmsi train``: train the KD-MSI teacher and student on weak tile labels."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.models.kdmsi import COMBINATIONS
from kdmsi_engine.progress import Progress
from kdmsi_engine.training import distributed
from kdmsi_engine.training.kd import train_kdmsi
from kdmsi_engine.training.losses import PRECISIONS

NAME = "train"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    # Longer than 80 lines: one add_argument per option of the command, no logic.
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="train the KD-MSI teacher and student from weak (tile) labels",
        description=(
            "Train a CAM teacher (tile classification) and a sigmoid student distilled from it "
            "(L = L_cls + lambda L_kd) on the labelled tiles of BEFORE/AFTER (--labels), of a "
            "manifest of scenes (--scenes) or of a folder dataset A/ B/ label/ (--dataset). "
            "Writes one model file with both networks; a checkpoint OUT.ckpt after every epoch "
            "lets --resume continue an interrupted run. Under torchrun (several processes) it "
            "trains with DistributedDataParallel; --batch-size is then the global batch, shared "
            "evenly by the processes."
        ),
    )
    parser.add_argument("before", nargs="?", help="raster of the first date")
    parser.add_argument("after", nargs="?", help="raster of the second date")
    parser.add_argument("--labels", help="weak labels: polygons/points with a change field")
    parser.add_argument("--label-field", default=d.LABEL_FIELD, help="label field (change)")
    parser.add_argument(
        "--unmarked-unchanged",
        action="store_true",
        help="tiles no label touches count as unchanged (default: they do not train)",
    )
    parser.add_argument("--scenes", metavar="MANIFEST", help="CSV name,before,after,labels")
    parser.add_argument("--dataset", metavar="DIR", help="folder dataset with A/ B/ label/")
    parser.add_argument("-o", "--output", required=True, help="model file to write (.kdmsi)")
    parser.add_argument(
        "--backbone",
        choices=d.BACKBONE_CHOICES,
        default=d.BACKBONE,
        help=f"({d.BACKBONE}: efficientnet-lite0 unless a GPU and resnet50's weights are here)",
    )
    parser.add_argument(
        "--weights",
        default=d.WEIGHTS_DEFAULT,
        help="starting backbone weights: imagenet, none, or a state-dict FILE (imagenet)",
    )
    parser.add_argument("--epochs", type=int, default=d.KD_EPOCHS, help=f"({d.KD_EPOCHS})")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.KD_BATCH_SIZE,
        help=f"tile pairs per step, over all torchrun processes together ({d.KD_BATCH_SIZE})",
    )
    parser.add_argument("--lr", type=float, default=d.KD_LR, help=f"base learning rate ({d.KD_LR})")
    parser.add_argument(
        "--kd-weight", type=float, default=d.KD_WEIGHT, help=f"lambda of L_kd ({d.KD_WEIGHT:g})"
    )
    parser.add_argument(
        "--teacher-combination", choices=COMBINATIONS, default=d.TEACHER_COMBINATION, help="(diff)"
    )
    parser.add_argument(
        "--student-combination", choices=COMBINATIONS, default=d.STUDENT_COMBINATION, help="(diff)"
    )
    parser.add_argument(
        "--tile-size", type=int, default=d.TILE_SIZE, help=f"tile size in pixels ({d.TILE_SIZE})"
    )
    parser.add_argument(
        "--min-valid",
        type=float,
        default=d.MIN_VALID_FRACTION,
        help=f"minimum valid fraction of a tile ({d.MIN_VALID_FRACTION})",
    )
    parser.add_argument("--bands", default=None, help="bands, e.g. 1,2,3 (default: every band)")
    parser.add_argument("--seed", type=int, default=d.SEED, help="random seed (0)")
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="no flips/rotations (default: the same random flip/rot90 on both dates)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: fp16 + grad scaling on CUDA, fp32 on CPU; bf16 on capable CPUs",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT.ckpt of an interrupted run"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    with distributed.launched(args.device) as device:
        return _train(args, device, progress)


def _train(args: argparse.Namespace, device: str, progress: Progress) -> dict[str, Any]:
    result = train_kdmsi(
        args.before,
        args.after,
        out=args.output,
        labels=args.labels,
        scenes=args.scenes,
        dataset=args.dataset,
        label_field=args.label_field,
        unmarked_unchanged=args.unmarked_unchanged,
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kd_weight=args.kd_weight,
        teacher_combination=args.teacher_combination,
        student_combination=args.student_combination,
        tile_size=args.tile_size,
        min_valid_fraction=args.min_valid,
        bands=args.bands,
        seed=args.seed,
        augment=not args.no_augment,
        resume=args.resume,
        device=device,
        precision=args.precision,
        overwrite=args.overwrite,
        progress=progress,
    )
    return {k: v for k, v in result.items() if k not in ("metadata", "networks")}
