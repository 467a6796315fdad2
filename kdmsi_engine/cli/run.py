"""``kdmsi run BEFORE AFTER --labels LABELS -o OUTDIR``: the whole chain on one scene."""

from __future__ import annotations

import argparse
from typing import Any

from kdmsi_engine.cli.detect import add_polygon_options
from kdmsi_engine.progress import Progress

NAME = "run"


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of the whole chain (shared by ``run`` and ``batch``); paper defaults."""
    both = parser.add_argument_group("both stages")
    both.add_argument("--bands", help="bands to use, e.g. 1,2,3 (default: the first three)")
    both.add_argument(
        "--backbone",
        help="backbone of both stages (resnet18, resnet34, resnet50, efficientnet-lite0); "
        "--kd-backbone / --detector-backbone override it per stage (default resnet50)",
    )
    both.add_argument(
        "--weights", help="starting weights of both stages: imagenet (default), none or a file"
    )
    both.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    both.add_argument(
        "--label-field", default="change", help="weak-label field, 1 changed / 0 unchanged"
    )
    both.add_argument(
        "--unmarked-unchanged",
        action="store_true",
        help="tiles that no weak label touches count as unchanged",
    )
    both.add_argument(
        "--resume", action="store_true", help="continue interrupted training from checkpoints"
    )
    kd = parser.add_argument_group("stage 1: KD-MSI")
    kd.add_argument("--kd-backbone", help="backbone of teacher and student")
    kd.add_argument("--kd-weights", help="starting weights of teacher and student")
    kd.add_argument("--kd-epochs", type=int, default=20, help="epochs (default 20)")
    kd.add_argument("--kd-batch-size", type=int, default=8, help="batch size (default 8)")
    kd.add_argument("--kd-lr", type=float, default=0.001, help="learning rate (default 0.001)")
    kd.add_argument("--kd-weight", type=float, default=10.0, help="KD loss weight (default 10)")
    kd.add_argument("--tile-size", type=int, default=256, help="KD tile size (default 256)")
    kd.add_argument("--msi-scales", default="0.5,1,1.5,2", help="MSI scales (default 0.5,1,1.5,2)")
    kd.add_argument(
        "--pseudo-threshold",
        default="auto",
        help="MSI threshold for pseudo labels: a number or auto/otsu/unchanged-q (auto)",
    )
    det = parser.add_argument_group("stage 2: detector")
    det.add_argument("--detector-backbone", help="detector encoder")
    det.add_argument("--detector-weights", help="detector encoder's starting weights")
    det.add_argument("--detector-epochs", type=int, default=50, help="epochs (default 50)")
    det.add_argument("--detector-batch-size", type=int, default=16, help="batch size (16)")
    det.add_argument("--detector-lr", type=float, default=0.007, help="learning rate (0.007)")
    det.add_argument("--detector-tile-size", type=int, default=256, help="tile size (256)")
    det.add_argument(
        "--min-labelled",
        type=float,
        default=0.25,
        help="labelled fraction a detector tile needs (default 0.25)",
    )
    det.add_argument(
        "--detector-class-weights",
        choices=("none", "balanced"),
        default="none",
        help="cross-entropy class weights: none (paper) or balanced (for rare change)",
    )
    out = parser.add_argument_group("detection")
    out.add_argument("--threshold", type=float, default=0.5, help="change threshold (0.5)")
    out.add_argument("--detect-tile-size", type=int, help="detection window (default >= 128)")
    out.add_argument("--detect-scales", default="1", help="test-time scales (default 1)")
    out.add_argument("--flip", action="store_true", help="test-time horizontal flips")
    out.add_argument("--batch-size", type=int, default=4, help="windows per inference pass (4)")
    add_polygon_options(out)


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`~kdmsi_engine.pipeline.RunConfig` from parsed options."""
    from kdmsi_engine.detect import parse_scales
    from kdmsi_engine.pipeline import RunConfig

    backbone = args.backbone or "resnet50"
    weights = args.weights or "imagenet"
    return RunConfig(
        kd_backbone=args.kd_backbone or backbone,
        kd_weights=args.kd_weights or weights,
        kd_epochs=args.kd_epochs,
        kd_batch_size=args.kd_batch_size,
        kd_lr=args.kd_lr,
        kd_weight=args.kd_weight,
        tile_size=args.tile_size,
        label_field=args.label_field,
        unmarked_unchanged=args.unmarked_unchanged,
        msi_scales=parse_scales(args.msi_scales),
        pseudo_threshold=args.pseudo_threshold,
        detector_backbone=args.detector_backbone or backbone,
        detector_weights=args.detector_weights or weights,
        detector_epochs=args.detector_epochs,
        detector_batch_size=args.detector_batch_size,
        detector_lr=args.detector_lr,
        detector_tile_size=args.detector_tile_size,
        min_labelled=args.min_labelled,
        detector_class_weights=args.detector_class_weights,
        threshold=args.threshold,
        detect_tile_size=args.detect_tile_size,
        detect_scales=parse_scales(args.detect_scales),
        flip=args.flip,
        min_area=args.min_area,
        simplify=args.simplify,
        fill_holes=args.fill_holes,
        bands=args.bands,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi run``."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="the whole chain: KD-MSI, MSI, pseudo labels, detector, detection, polygons",
        description=(
            "Train KD-MSI on weak labels, make MSI pseudo labels, train the change detector and "
            "detect changes over the scene. OUTDIR gets student.kdmsi, msi_probability.tif, "
            "pseudo_labels.tif, detector.kdmsi, change_probability.tif, change.tif, "
            "changes.gpkg and run.json."
        ),
    )
    parser.add_argument("before", metavar="BEFORE", help="raster of the first date")
    parser.add_argument("after", metavar="AFTER", help="raster of the second date")
    parser.add_argument(
        "--labels", required=True, metavar="LABELS", help="weak labels (vector file)"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--truth", metavar="TRUTH.tif", help="pixel truth raster: metrics in run.json"
    )
    parser.add_argument("--scene", help="scene name (default: BEFORE's file name)")
    add_run_options(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from kdmsi_engine.pipeline import run_scene

    record = run_scene(
        args.before,
        args.after,
        args.labels,
        args.output,
        config=config_from_args(args),
        truth=args.truth,
        name=args.scene,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=progress,
    )
    result: dict[str, Any] = {**record["outputs"], "polygons": record["polygons"]}
    if "metrics" in record:
        change = record["metrics"]["change"]
        result["metrics"] = {k: change[k] for k in ("iou", "f1", "mean_f1", "oa") if k in change}
    result["seconds"] = record["timings"]["total_s"]
    return result
