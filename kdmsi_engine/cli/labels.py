"""``kdmsi labels``: per-tile labels (1 changed, 0 unchanged, -1 unlabelled) as a table."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine.cli.grid import add_scene_options
from kdmsi_engine.errors import InputError
from kdmsi_engine.progress import Progress

NAME = "labels"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="per-tile labels from weak labels (or a folder dataset's masks)",
        description=(
            "Label the tiles of a scene from weak labels: a tile is changed (1) if it touches "
            "a changed feature, unchanged (0) if it touches only unchanged features, "
            "unlabelled (-1) otherwise. Writes a GeoPackage (.gpkg) or a CSV table (.csv). "
            "With --dataset DIR (A/ B/ label/ folders) the labels come from the change masks."
        ),
    )
    parser.add_argument("before", nargs="?", help="raster of the first date")
    parser.add_argument("after", nargs="?", help="raster of the second date")
    parser.add_argument("--labels", help="weak labels: GeoPackage, Shapefile or GeoJSON")
    parser.add_argument("--dataset", help="folder dataset with A/ B/ label/ instead of a scene")
    parser.add_argument("--label-field", default="change", help="integer label field (change)")
    parser.add_argument(
        "--unmarked-unchanged",
        action="store_true",
        help="tiles that touch no labelled feature count as unchanged",
    )
    parser.add_argument("-o", "--output", required=True, help="output table (.gpkg or .csv)")
    add_scene_options(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    if args.dataset is None and (args.before is None or args.after is None):
        raise InputError("give BEFORE AFTER --labels FILE, or --dataset DIR")
    from kdmsi_engine.data.jobs import write_tile_labels

    return write_tile_labels(
        args.output,
        before=args.before,
        after=args.after,
        labels=args.labels,
        dataset=args.dataset,
        label_field=args.label_field,
        unmarked_unchanged=args.unmarked_unchanged,
        tile_size=args.tile_size,
        overlap=args.overlap,
        bands=args.bands,
        min_valid_fraction=args.min_valid,
        target_crs=args.target_crs,
        resolution=args.resolution,
        overwrite=args.overwrite,
        progress=progress,
    )
