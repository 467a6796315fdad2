"""Options that several commands share, each defined once (defaults from the contract).

Like rasterio's ``rio/options.py``: a command adds the group it needs, so the flags, their
defaults and their help read the same in every command.
"""

from __future__ import annotations

import argparse
from typing import Union

from kdmsi_engine import defaults as d

# a parser or one of its argument groups (Union: the engine runs on Python 3.9)
ParserLike = Union[argparse.ArgumentParser, argparse._ArgumentGroup]


def add_polygon_options(parser: ParserLike) -> None:
    """Options of the change polygons (``detect``, ``vectorize``, ``run``, ``batch``)."""
    parser.add_argument(
        "--min-area",
        type=float,
        default=d.MIN_AREA,
        metavar="M2",
        help=f"drop polygons under M2 m² (default {d.MIN_AREA:g})",
    )
    parser.add_argument(
        "--simplify",
        type=float,
        default=d.SIMPLIFY,
        metavar="M",
        help=f"simplification tolerance in CRS units, topology preserved (default {d.SIMPLIFY:g})",
    )
    parser.add_argument(
        "--fill-holes",
        type=float,
        default=d.FILL_HOLES,
        metavar="M2",
        help=f"fill holes smaller than M2 m² (default {d.FILL_HOLES:g})",
    )
