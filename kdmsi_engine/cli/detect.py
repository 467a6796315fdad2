"""``kdmsi detect BEFORE AFTER --model DETECTOR.kdmsi -o OUTDIR``: detect changes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.cli.options import add_polygon_options
from kdmsi_engine.progress import Progress

NAME = "detect"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi detect``."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="detect changes with a trained detector (rasters + polygons)",
        description=(
            "Run a trained change detector over a whole scene pair with overlapping, blended "
            "windows; write OUTDIR/change_probability.tif, change.tif, changes.gpkg and run.json."
        ),
    )
    parser.add_argument("before", metavar="BEFORE", help="raster of the first date")
    parser.add_argument("after", metavar="AFTER", help="raster of the second date")
    parser.add_argument(
        "--model", required=True, metavar="DETECTOR.kdmsi", help="from 'kdmsi train-detector'"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--tile-size",
        type=int,
        help="window size (default: fitted to the scene, from the model's tile size (>= 128) "
        "to 512, the one that computes least)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        help="window overlap (default: 16 with a fitted window, a quarter of a given one)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.INFER_BATCH_SIZE,
        help=f"windows per pass ({d.INFER_BATCH_SIZE})",
    )
    parser.add_argument(
        "--threshold",
        default=str(d.DETECT_THRESHOLD),
        help=f"change probability threshold: a number in [0, 1) or otsu ({d.DETECT_THRESHOLD})",
    )
    parser.add_argument(
        "--scales", default="1", help="test-time scales, e.g. 0.75,1,1.25 (default 1)"
    )
    parser.add_argument("--flip", action="store_true", help="also average horizontal flips")
    add_polygon_options(parser)
    parser.add_argument("--dst-crs", metavar="CRS", help="reproject polygons, e.g. EPSG:4326")
    parser.add_argument("--scene", help="scene name for the polygons (default: BEFORE's name)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.detect import detect_scene

    record = detect_scene(
        args.before,
        args.after,
        args.model,
        args.output,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        threshold=args.threshold,
        scales=args.scales,
        flip=args.flip,
        min_area=args.min_area,
        simplify=args.simplify,
        fill_holes=args.fill_holes,
        dst_crs=args.dst_crs,
        scene_name=args.scene,
        device=args.device,
        overwrite=args.overwrite,
        progress=progress,
    )
    return {**record["outputs"], "polygons": record["polygons"], "device": record["device"]}
