"""``kdmsi vectorize CHANGE.tif -o CHANGES.gpkg``: change polygons from a change raster."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine.cli.options import add_polygon_options
from kdmsi_engine.progress import Progress

NAME = "vectorize"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi vectorize``."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="turn a change raster into change polygons (GeoPackage)",
        description=(
            "Polygonise the change pixels (value 1) of a change raster by blocks, joining "
            "polygons across block edges, into a GeoPackage layer 'changes' with area_m2, "
            "pixels, mean_prob, max_prob and scene attributes."
        ),
    )
    parser.add_argument("change", metavar="CHANGE.tif", help="change raster (1 change, 0 none)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="CHANGES.gpkg", help="GeoPackage to write"
    )
    parser.add_argument(
        "--probability",
        metavar="PROB.tif",
        help="change probability raster on the same grid (for mean_prob and max_prob)",
    )
    add_polygon_options(parser)
    parser.add_argument(
        "--dst-crs", metavar="CRS", help="reproject polygons to this CRS, e.g. EPSG:4326"
    )
    parser.add_argument("--scene", help="value of the 'scene' attribute (default: folder name)")
    parser.add_argument(
        "--block-size", type=int, default=1024, help="block edge in pixels (default 1024)"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.vectorize import vectorize_changes

    return vectorize_changes(
        args.change,
        args.output,
        probability_path=args.probability,
        min_area=args.min_area,
        simplify=args.simplify,
        fill_holes=args.fill_holes,
        dst_crs=args.dst_crs,
        scene=args.scene,
        block_size=args.block_size,
        overwrite=args.overwrite,
        progress=progress,
    )
