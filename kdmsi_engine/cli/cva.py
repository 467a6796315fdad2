"""``kdmsi cva BEFORE AFTER -o PROB.tif``: change vector analysis, no labels, no training."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "cva"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``cva`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="quick change preview: change vector analysis (no labels, no training)",
        description=(
            "Scales each band to [0, 1] by its 2nd-98th percentiles over both dates and writes, "
            "per pixel, the root mean square of the band differences (0..1, nodata -1). With "
            "--change, also a change raster thresholded at --threshold (default: Otsu's "
            "threshold of the map). The classic unsupervised change map: what to look at "
            "first, and the yardstick the trained chain must beat."
        ),
    )
    parser.add_argument("before", metavar="BEFORE", help="raster of the first date")
    parser.add_argument("after", metavar="AFTER", help="raster of the second date")
    parser.add_argument("-o", "--output", required=True, metavar="PROB.tif", help="CVA map")
    parser.add_argument(
        "--change", metavar="CHANGE.tif", help="also write a change raster (1 change, 0 none)"
    )
    parser.add_argument(
        "--threshold",
        default=d.CVA_THRESHOLD,
        help="threshold of --change: a number in [0, 1) or otsu (default otsu)",
    )
    parser.add_argument("--bands", help="bands to use, e.g. 1,2,3 (default: all bands)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.cva import cva_scene

    return cva_scene(
        args.before,
        args.after,
        args.output,
        bands=args.bands,
        change_path=args.change,
        threshold=args.threshold,
        overwrite=args.overwrite,
        progress=progress,
    )
