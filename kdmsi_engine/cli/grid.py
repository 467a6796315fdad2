"""``kdmsi grid``: write the labelling grid of a scene (tile footprints, empty ``change`` field)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "grid"


def add_scene_options(parser: argparse.ArgumentParser) -> None:
    """Tile and grid options shared by ``grid`` and ``labels``."""
    parser.add_argument(
        "--tile-size", type=int, default=d.TILE_SIZE, help=f"tile size in pixels ({d.TILE_SIZE})"
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=d.GRID_OVERLAP,
        help=f"tile overlap in pixels ({d.GRID_OVERLAP})",
    )
    parser.add_argument(
        "--bands", default=None, help="bands to use, e.g. 1,2,3 (default: every band)"
    )
    parser.add_argument(
        "--min-valid",
        type=float,
        default=d.MIN_VALID_FRACTION,
        help=f"skip tiles with a smaller fraction of valid pixels ({d.MIN_VALID_FRACTION})",
    )
    parser.add_argument(
        "--target-crs",
        default=None,
        help="work in this CRS (default: the before raster's, "
        "or its UTM zone if it is in degrees), e.g. EPSG:32633",
    )
    parser.add_argument(
        "--resolution", type=float, default=None, help="pixel size in the working CRS's units"
    )


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="write the labelling grid (tile footprints) of a scene as a GeoPackage",
        description=(
            "Tile the overlap of BEFORE and AFTER and write the tile footprints as a GeoPackage "
            "with an empty integer 'change' field: set it to 1 (changed) or 0 (unchanged) on "
            "the tiles you know, then use the file as --labels."
        ),
    )
    parser.add_argument("before", help="raster of the first date")
    parser.add_argument("after", help="raster of the second date")
    parser.add_argument("-o", "--output", required=True, help="output GeoPackage (.gpkg)")
    add_scene_options(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    # Imported here, not at module level: every command module loads at start-up.
    from kdmsi_engine.data.jobs import write_labelling_grid

    return write_labelling_grid(
        args.before,
        args.after,
        args.output,
        tile_size=args.tile_size,
        overlap=args.overlap,
        bands=args.bands,
        min_valid_fraction=args.min_valid,
        target_crs=args.target_crs,
        resolution=args.resolution,
        overwrite=args.overwrite,
        progress=progress,
    )
