"""``kdmsi export DETECTOR.kdmsi -o detector.onnx``: the detector as an ONNX model for Deepness.

The ONNX model takes the before and after bands stacked as one raster (raw values, before
first) and returns per-pixel class probabilities, with the metadata the Deepness QGIS plugin
reads (:mod:`kdmsi_engine.export`). ``--vrt BEFORE AFTER STACK.vrt`` also writes that stacked
raster as a VRT, the one layer Deepness takes. Needs the ``onnx``, ``onnxscript`` and
``onnxruntime`` packages (the ``export`` extra).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults as d
from kdmsi_engine.progress import Progress

NAME = "export"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi export``."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="export a trained detector as an ONNX model (Deepness, onnxruntime)",
        description=(
            "Write the detector as an ONNX segmentation model: one input, the detector's bands "
            "of the before date then of the after date as raw raster values (the band scaling "
            "is in the model); one output, the probabilities of 'unchanged' and 'changed' per "
            "pixel; the metadata Deepness reads (model type, class names, resolution, tile "
            "size, standardisation). The file is checked with onnxruntime against torch before "
            "it is written."
        ),
    )
    parser.add_argument("model", metavar="DETECTOR.kdmsi", help="from 'kdmsi train-detector'")
    parser.add_argument(
        "-o", "--output", required=True, metavar="DETECTOR.onnx", help="ONNX file to write"
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        help="fixed tile size of the model (default: the window 'kdmsi detect' uses, >= 128)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=d.EXPORT_OPSET,
        help=f"ONNX opset, 18 or later ({d.EXPORT_OPSET})",
    )
    parser.add_argument(
        "--vrt",
        nargs=3,
        metavar=("BEFORE", "AFTER", "STACK.vrt"),
        help=(
            "also write STACK.vrt, the detector's bands of BEFORE then AFTER on one grid (the "
            "raster to give Deepness); needed for a detector trained on several scenes, whose "
            "band scaling then comes from this pair"
        ),
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.export import export_detector

    return export_detector(
        args.model,
        args.output,
        tile_size=args.tile_size,
        opset=args.opset,
        vrt=tuple(args.vrt) if args.vrt else None,
        overwrite=args.overwrite,
        progress=progress,
    )
