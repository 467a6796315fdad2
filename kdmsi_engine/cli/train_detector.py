"""``kdmsi train-detector``: train the Siamese DeepLabV3+ change detector on pseudo labels."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "train-detector"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi train-detector``."""
    # Longer than 80 lines: one add_argument per option of the command, no logic.
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="train the change detector (Siamese DeepLabV3+) on pseudo labels",
        description=(
            "Train a Siamese DeepLabV3+ change detector on pseudo labels (1 change, 0 none, "
            "255 ignored) of one scene (BEFORE AFTER --pseudo) or of the scenes of a manifest "
            "(--scenes; pseudo labels from a 'pseudo' column or --pseudo-dir). Paper defaults: "
            "batch 16, 50 epochs, lr 0.007 with poly decay, SGD momentum 0.9, new layers 10x. "
            "Under torchrun (several processes) it trains with DistributedDataParallel; "
            "--batch-size is then the global batch, shared evenly by the processes."
        ),
    )
    parser.add_argument("before", nargs="?", metavar="BEFORE", help="raster of the first date")
    parser.add_argument("after", nargs="?", metavar="AFTER", help="raster of the second date")
    parser.add_argument("--pseudo", metavar="PSEUDO.tif", help="pseudo-label raster (1/0/255)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="DETECTOR.kdmsi", help="model file to write"
    )
    parser.add_argument(
        "--scenes",
        metavar="MANIFEST",
        help="CSV name,before,after,labels[,pseudo] instead of BEFORE AFTER",
    )
    parser.add_argument(
        "--pseudo-dir",
        metavar="DIR",
        help="with --scenes: pseudo labels DIR/<name>.tif or DIR/<name>/pseudo_labels.tif",
    )
    parser.add_argument("--bands", help="bands to use, e.g. 1,2,3 (default: every band)")
    parser.add_argument(
        "--backbone",
        default=d.BACKBONE,
        choices=d.BACKBONE_CHOICES,
        help=f"{', '.join(d.BACKBONE_CHOICES)} (default {d.BACKBONE}: efficientnet-lite0 unless "
        "a GPU and resnet50's weights are here)",
    )
    parser.add_argument(
        "--weights",
        default=d.WEIGHTS_DEFAULT,
        help="starting weights of the encoder: imagenet, none or a state-dict file",
    )
    parser.add_argument(
        "--epochs", type=int, default=d.DETECTOR_EPOCHS, help=f"epochs ({d.DETECTOR_EPOCHS})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.DETECTOR_BATCH_SIZE,
        help=f"tiles per step, over all torchrun processes together ({d.DETECTOR_BATCH_SIZE})",
    )
    parser.add_argument(
        "--lr", type=float, default=d.DETECTOR_LR, help=f"base learning rate ({d.DETECTOR_LR})"
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=d.MOMENTUM,
        help=f"SGD momentum ({d.MOMENTUM})",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d.WEIGHT_DECAY,
        help=f"weight decay ({d.WEIGHT_DECAY:g})",
    )
    parser.add_argument(
        "--tile-size", type=int, default=d.TILE_SIZE, help=f"training tile size ({d.TILE_SIZE})"
    )
    parser.add_argument(
        "--min-labelled",
        type=float,
        default=d.MIN_LABELLED,
        help=f"fraction of labelled pixels a tile needs to train ({d.MIN_LABELLED})",
    )
    parser.add_argument("--max-tiles", type=int, help="train on at most this many tiles")
    parser.add_argument(
        "--class-weights",
        choices=d.CLASS_WEIGHTS,
        default=d.DETECTOR_CLASS_WEIGHTS,
        help="cross-entropy class weights: none (paper) or balanced (for rare change) "
        f"(default {d.DETECTOR_CLASS_WEIGHTS})",
    )
    parser.add_argument("--seed", type=int, default=d.SEED, help="random seed (default 0)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint OUT.ckpt"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.training import distributed

    with distributed.launched(args.device) as device:
        return _train(args, device, progress)


def _train(args: argparse.Namespace, device: str, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.training.detector import train_detector

    return train_detector(
        args.before,
        args.after,
        args.pseudo,
        args.output,
        scenes=args.scenes,
        pseudo_dir=args.pseudo_dir,
        bands=args.bands,
        backbone=args.backbone,
        weights=args.weights,
        tile_size=args.tile_size,
        min_labelled=args.min_labelled,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_tiles=args.max_tiles,
        class_weights=args.class_weights,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=progress,
    )
