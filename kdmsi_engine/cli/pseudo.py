"""`kdmsi pseudo PROB.tif -o PSEUDO.tif --labels LABELS`: pseudo pixel labels."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "pseudo"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``pseudo`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="pseudo pixel labels (uint8 1/0/255) from a change probability and weak labels",
        description=(
            "On tiles labelled changed, change (1) where the probability is above the "
            "threshold, else 0; unchanged tiles 0; unlabelled tiles and nodata 255. "
            "--threshold auto picks it without pixel truth: Otsu on the changed tiles' "
            "probabilities, never below the 99th percentile of the unchanged tiles' "
            "probabilities (also: otsu, unchanged-q)."
        ),
    )
    parser.add_argument("prob", help="change probability GeoTIFF from 'kdmsi infer'")
    parser.add_argument("-o", "--output", required=True, help="output pseudo-label GeoTIFF")
    parser.add_argument(
        "--threshold",
        default=d.PSEUDO_THRESHOLD,
        help=f"a number in [0, 1), auto, otsu or unchanged-q (default {d.PSEUDO_THRESHOLD})",
    )
    parser.add_argument("--labels", required=True, help="weak labels (vector file)")
    parser.add_argument("--label-field", default=d.LABEL_FIELD, help="1 changed, 0 unchanged")
    parser.add_argument(
        "--unmarked-unchanged",
        action="store_true",
        help="tiles that no label touches are unchanged (default: unlabelled, ignored)",
    )
    parser.add_argument(
        "--tile-size", type=int, help="tile size of the labels (default: the one infer used)"
    )
    parser.add_argument("--before", help="before raster: use the scene's own tile grid")
    parser.add_argument("--after", help="after raster (with --before)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.pseudo import make_pseudo_labels

    return make_pseudo_labels(
        args.prob,
        args.output,
        labels=args.labels,
        threshold=args.threshold,
        label_field=args.label_field,
        unmarked_unchanged=args.unmarked_unchanged,
        tile_size=args.tile_size,
        before=args.before,
        after=args.after,
        overwrite=args.overwrite,
        progress=progress,
    )
