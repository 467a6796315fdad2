"""`kdmsi evaluate PRED.tif TRUTH.tif [--threshold T | --sweep]`: metrics as JSON on stdout."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from kdmsi_engine.progress import Progress

NAME = "evaluate"


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="change metrics of a prediction raster against a truth raster (JSON on stdout)",
        description=(
            "Confusion counts summed over the whole area; OA, change precision/recall/F1/IoU, "
            "no-change IoU, mIoU, mean F1, FP and FN shares. A float prediction is a "
            "probability (change > threshold); an integer one a class raster (change > 0, its "
            "nodata excluded). Truth: change > 0 (0/1, 0/255 masks), nodata excluded; warped "
            "(nearest) onto the prediction's grid when grids differ."
        ),
    )
    parser.add_argument("pred", help="prediction raster (probability or classes)")
    parser.add_argument("truth", help="truth raster (change > 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--threshold", help="probability threshold: a number in [0, 1) or otsu (default 0.5)"
    )
    mode.add_argument(
        "--sweep", action="store_true", help="metrics at thresholds 0.05..0.95 and the best IoU"
    )
    parser.add_argument(
        "--truth-values",
        type=_numbers,
        help="truth values that mean change, e.g. 1 or 2,3 (default: every value > 0)",
    )
    parser.add_argument(
        "--truth-nodata", type=float, help="truth value to ignore (default: the raster's nodata)"
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any] | None:
    from kdmsi_engine.metrics import evaluate_rasters
    from kdmsi_engine.thresholds import raster_threshold

    threshold = None if args.threshold is None else raster_threshold(args.pred, args.threshold)
    result = evaluate_rasters(
        args.pred,
        args.truth,
        threshold=threshold,
        sweep=args.sweep,
        truth_values=args.truth_values,
        truth_nodata=args.truth_nodata,
        progress=progress,
    )
    if args.progress == "json":
        return result
    print(json.dumps(result, indent=2))
    return None
