"""`kdmsi infer BEFORE AFTER --model STUDENT.kdmsi -o PROB.tif`: change probability of a scene."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "infer"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``infer`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="change probability of a whole scene from a KD-MSI model (float32 GeoTIFF)",
        description=(
            "Runs the model over overlapping windows of the scene (blended, streamed) and writes "
            "a float32 GeoTIFF (0..1, nodata -1 where the input had no data). Methods: msi "
            "(default), mi, student, cam (the teacher's raw CAM, as if every window were "
            "labelled changed)."
        ),
    )
    parser.add_argument("before", help="raster of date 1 (defines the grid)")
    parser.add_argument("after", help="raster of date 2")
    parser.add_argument("--model", required=True, help="KD-MSI model file from 'kdmsi train'")
    parser.add_argument("-o", "--output", required=True, help="output probability GeoTIFF")
    parser.add_argument("--method", choices=d.MAP_METHODS, default=d.MAP_METHOD)
    parser.add_argument("--scales", default=d.MSI_SCALES_TEXT, help="scales of msi/mi")
    parser.add_argument("--tile-size", type=int, help="window size (default: the model's)")
    parser.add_argument("--overlap", type=int, help="window overlap (default: tile size / 4)")
    parser.add_argument(
        "--batch-size", type=int, default=d.INFER_BATCH_SIZE, help="windows per forward pass"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.inference.scene import infer_scene

    return infer_scene(
        args.before,
        args.after,
        args.model,
        args.output,
        method=args.method,
        scales=args.scales,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=progress,
    )
