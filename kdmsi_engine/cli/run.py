"""``kdmsi run BEFORE AFTER --labels LABELS -o OUTDIR``: the whole chain on one scene."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults
from kdmsi_engine.cli.options import add_polygon_options
from kdmsi_engine.progress import Progress

NAME = "run"


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of the whole chain (shared by ``run`` and ``batch``); defaults from
    :mod:`kdmsi_engine.defaults`."""
    # Longer than 80 lines: one add_argument per option of the whole chain, no logic.
    d = defaults
    both = parser.add_argument_group("both stages")
    both.add_argument(
        "--bands", help="bands to use, e.g. 1,2,3 (default: every band of the rasters)"
    )
    both.add_argument(
        "--backbone",
        help=f"backbone of both stages ({', '.join(d.BACKBONE_CHOICES)}); --kd-backbone / "
        "--detector-backbone override it per stage (default auto: efficientnet-lite0, whose "
        "ImageNet weights ship with it, unless a GPU and resnet50's weights are here)",
    )
    both.add_argument(
        "--weights",
        help="starting weights of both stages: imagenet (default), none or a file",
    )
    both.add_argument("--seed", type=int, default=d.SEED, help=f"random seed ({d.SEED})")
    both.add_argument(
        "--label-field", default=d.LABEL_FIELD, help="weak-label field, 1 changed / 0 unchanged"
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
    kd.add_argument("--kd-epochs", type=int, default=d.KD_EPOCHS, help=f"epochs ({d.KD_EPOCHS})")
    kd.add_argument(
        "--kd-batch-size", type=int, default=d.KD_BATCH_SIZE, help=f"batch ({d.KD_BATCH_SIZE})"
    )
    kd.add_argument("--kd-lr", type=float, default=d.KD_LR, help=f"learning rate ({d.KD_LR})")
    kd.add_argument(
        "--kd-weight", type=float, default=d.KD_WEIGHT, help=f"KD loss weight ({d.KD_WEIGHT:g})"
    )
    kd.add_argument(
        "--tile-size",
        type=int,
        default=d.TILE_SIZE,
        help=f"tile size of the weak labels and KD (default {d.TILE_SIZE}; 64 suits 10-30 m "
        "pixels)",
    )
    kd.add_argument(
        "--msi-scales", default=d.MSI_SCALES_TEXT, help=f"MSI scales ({d.MSI_SCALES_TEXT})"
    )
    pseudo = parser.add_argument_group("pseudo labels")
    pseudo.add_argument(
        "--pseudo-source",
        choices=d.PSEUDO_SOURCES,
        default=d.PSEUDO_SOURCE,
        help="map the pseudo labels threshold: evidence (change vector analysis calibrated on "
        "the unchanged tiles), msi (the student's MSI map, as the paper), both (their "
        f"geometric mean) (default {d.PSEUDO_SOURCE})",
    )
    pseudo.add_argument(
        "--pseudo-threshold",
        default=d.PSEUDO_THRESHOLD,
        help=f"a number or {'/'.join(d.PSEUDO_THRESHOLDS)} (default {d.PSEUDO_THRESHOLD})",
    )
    pseudo.add_argument(
        "--unchanged-quantile",
        type=float,
        default=d.UNCHANGED_QUANTILE,
        help="quantile of the unchanged tiles' values for unchanged-q thresholds "
        f"(default {d.UNCHANGED_QUANTILE}: 1 %% false positives there)",
    )
    det = parser.add_argument_group("stage 2: detector")
    det.add_argument("--detector-backbone", help="detector encoder")
    det.add_argument("--detector-weights", help="detector encoder's starting weights")
    det.add_argument(
        "--detector-epochs", type=int, default=d.DETECTOR_EPOCHS, help=f"({d.DETECTOR_EPOCHS})"
    )
    det.add_argument(
        "--detector-batch-size",
        type=int,
        default=d.DETECTOR_BATCH_SIZE,
        help=f"batch size ({d.DETECTOR_BATCH_SIZE})",
    )
    det.add_argument(
        "--detector-lr", type=float, default=d.DETECTOR_LR, help=f"learning rate ({d.DETECTOR_LR})"
    )
    det.add_argument("--detector-tile-size", type=int, help="tile size (default: --tile-size)")
    det.add_argument(
        "--detector-from-student",
        action=argparse.BooleanOptionalAction,
        default=d.DETECTOR_FROM_STUDENT,
        help="start the detector's encoder from the KD-MSI student's backbone (same backbone); "
        "--no-detector-from-student: from --detector-weights",
    )
    det.add_argument(
        "--min-labelled",
        type=float,
        default=d.MIN_LABELLED,
        help=f"labelled fraction a detector tile needs (default {d.MIN_LABELLED})",
    )
    det.add_argument(
        "--detector-class-weights",
        choices=d.CLASS_WEIGHTS,
        default=d.DETECTOR_CLASS_WEIGHTS,
        help="cross-entropy class weights: none (paper) or balanced (for rare change) "
        f"(default {d.DETECTOR_CLASS_WEIGHTS})",
    )
    out = parser.add_argument_group("detection")
    out.add_argument(
        "--threshold",
        default=d.RUN_THRESHOLD,
        help="change threshold: a number, otsu, or unchanged-q (the --detect-quantile of the "
        "final map on unchanged tiles the detector did not train on) (default "
        f"{d.RUN_THRESHOLD})",
    )
    out.add_argument(
        "--detect-quantile",
        type=float,
        default=d.DETECT_QUANTILE,
        help=f"quantile of unchanged-q for the final map (default {d.DETECT_QUANTILE}: 2 %% "
        "false positives on unchanged land)",
    )
    out.add_argument(
        "--fuse-evidence",
        action=argparse.BooleanOptionalAction,
        default=d.FUSE_EVIDENCE,
        help="final map: the detector's map fused with the calibrated change vector analysis "
        "(how rare each is on unchanged tiles); --no-fuse-evidence: the detector's alone "
        "(default: fuse)",
    )
    out.add_argument(
        "--fusion-detector-weight",
        type=float,
        default=d.FUSION_DETECTOR_WEIGHT,
        help="with --fuse-evidence: the detector's weight in the fusion, the calibrated CVA has "
        f"the rest (default {d.FUSION_DETECTOR_WEIGHT}; 0: the calibrated CVA alone)",
    )
    out.add_argument(
        "--evidence-gate",
        type=float,
        default=d.EVIDENCE_GATE,
        help="with --fuse-evidence: change only where the pixel's spectral change is rarer than "
        f"this share of unchanged land (default {d.EVIDENCE_GATE}; 1: no gate)",
    )
    out.add_argument(
        "--keep-labels-out",
        dest="keep_unchanged_out",
        action=argparse.BooleanOptionalAction,
        default=d.KEEP_UNCHANGED_OUT,
        help="keep the tiles labelled unchanged out of the change raster and polygons "
        "(default: yes)",
    )
    out.add_argument("--detect-tile-size", type=int, help="detection window (default >= 128)")
    out.add_argument("--detect-scales", default=d.DETECT_SCALES, help="test-time scales (1)")
    out.add_argument("--flip", action="store_true", help="test-time horizontal flips")
    out.add_argument(
        "--batch-size",
        type=int,
        default=d.INFER_BATCH_SIZE,
        help=f"windows per inference pass ({d.INFER_BATCH_SIZE})",
    )
    add_polygon_options(out)


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`~kdmsi_engine.jobs.config.RunConfig` from parsed options."""
    from kdmsi_engine.detect import parse_scales
    from kdmsi_engine.jobs.config import RunConfig

    backbone = args.backbone or defaults.BACKBONE
    weights = args.weights or defaults.WEIGHTS_DEFAULT
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
        pseudo_source=args.pseudo_source,
        pseudo_threshold=args.pseudo_threshold,
        unchanged_quantile=args.unchanged_quantile,
        detector_backbone=args.detector_backbone or backbone,
        detector_weights=args.detector_weights or weights,
        detector_epochs=args.detector_epochs,
        detector_batch_size=args.detector_batch_size,
        detector_lr=args.detector_lr,
        detector_tile_size=args.detector_tile_size,
        min_labelled=args.min_labelled,
        detector_class_weights=args.detector_class_weights,
        detector_from_student=args.detector_from_student,
        threshold=args.threshold,
        detect_quantile=args.detect_quantile,
        fuse_evidence=args.fuse_evidence,
        evidence_gate=args.evidence_gate,
        fusion_detector_weight=args.fusion_detector_weight,
        keep_unchanged_out=args.keep_unchanged_out,
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


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.jobs.run import run_scene

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
    trust = record.get("trust") or {}
    result["trust"] = {
        k: trust.get(k)
        for k in ("tile_agreement", "unchanged_tiles_flagged", "teacher_auc", "trusted")
    }
    for warning in trust.get("warnings", []):
        result.setdefault("warnings", []).append(warning)
    result["seconds"] = record["timings"]["total_s"]
    return result
