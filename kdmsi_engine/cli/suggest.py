"""``kdmsi suggest PROB.tif -o NEXT.gpkg``: the unlabelled tiles to label next."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "suggest"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``suggest`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="tiles to label next: the unlabelled tiles where a change map is least sure",
        description=(
            "Ranks the unlabelled tiles of a scene by what a label would teach the chain and "
            "writes the first --count as a GeoPackage layer (rank, score, uncertainty, "
            "p_changed, change_share, the tile's window and footprint). A tile's change_share "
            "is the share of its pixels above the map's decision threshold. --measure "
            "uncertainty (default) scores 1 - |2 change_share - 1|, 1 where the map calls half "
            "the tile change; --measure false-alarms scores change_share * (1 - p_changed), "
            "p_changed the chance that a tile with that share is changed, learned from the "
            "labelled tiles: first the tiles where the map calls much change but which look "
            "unchanged. Give the quick preview (kdmsi cva) before any training, or a run's "
            "change_probability.tif after it; suggestions keep --min-gap tile widths apart."
        ),
    )
    parser.add_argument(
        "probability", metavar="PROB.tif", help="probability raster of the scene (values 0..1)"
    )
    parser.add_argument("-o", "--output", required=True, help="output GeoPackage (.gpkg)")
    parser.add_argument(
        "--labels", help="weak labels so far: the labelling grid, polygons or points (optional)"
    )
    parser.add_argument(
        "--label-field", default=d.LABEL_FIELD, help=f"integer label field ({d.LABEL_FIELD})"
    )
    parser.add_argument(
        "-n",
        "--count",
        type=int,
        default=d.SUGGEST_COUNT,
        help=f"number of tiles to suggest ({d.SUGGEST_COUNT})",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help=f"tile size in pixels (default: the labelling grid's, else {d.TILE_SIZE})",
    )
    parser.add_argument("--overlap", type=int, default=0, help="tile overlap in pixels (0)")
    parser.add_argument(
        "--threshold",
        default=d.SUGGEST_THRESHOLD,
        help="the map's decision threshold: auto (the run's own when PROB.tif is a run's "
        "change_probability.tif, else otsu), otsu, unchanged-q or a number in [0, 1) "
        f"(default {d.SUGGEST_THRESHOLD})",
    )
    parser.add_argument(
        "--min-gap",
        type=float,
        default=d.SUGGEST_MIN_GAP,
        help=f"tile widths kept free between any two suggestions; 0: no rule ({d.SUGGEST_MIN_GAP})",
    )
    parser.add_argument(
        "--min-valid",
        type=float,
        default=0.5,
        help="skip tiles with a smaller fraction of valid pixels (0.5)",
    )
    parser.add_argument("--band", type=int, default=1, help="band of PROB.tif (1)")
    parser.add_argument(
        "--measure",
        choices=d.SUGGEST_MEASURES,
        default=d.SUGGEST_MEASURE,
        help=f"how tiles are ranked ({d.SUGGEST_MEASURE})",
    )
    parser.add_argument(
        "--explore",
        type=float,
        default=d.SUGGEST_EXPLORE,
        help="share of the tiles drawn at random among the other unlabelled ones, after the "
        f"ranked ones, so that the labels stay a fair sample of the scene ({d.SUGGEST_EXPLORE:g})",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    # Imported here, not at module level: every command module loads at start-up.
    from kdmsi_engine.suggest import suggest_tiles

    return suggest_tiles(
        args.probability,
        args.output,
        labels=args.labels,
        label_field=args.label_field,
        count=args.count,
        tile_size=args.tile_size,
        overlap=args.overlap,
        threshold=args.threshold,
        min_gap=args.min_gap,
        min_valid_fraction=args.min_valid,
        band=args.band,
        measure=args.measure,
        explore=args.explore,
        overwrite=args.overwrite,
        progress=progress,
    )
