"""``kdmsi batch MANIFEST -o OUTDIR``: train once on labelled scenes, detect on every scene."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine import defaults
from kdmsi_engine.cli.run import add_run_options, config_from_args
from kdmsi_engine.progress import Progress

NAME = "batch"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kdmsi batch``."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="many scenes: train once on the labelled ones, detect on all",
        description=(
            "Read a manifest (CSV name,before,after,labels; labels empty for detect-only "
            "scenes), train KD-MSI and the detector once over the labelled scenes, and detect "
            "on every scene into OUTDIR/<name>/. A failing scene is reported in "
            "OUTDIR/batch.json and the others go on; a rerun skips finished scenes and reuses "
            "trained models (--overwrite starts again). --model detects every scene with a "
            "detector you have, without training; --cluster runs the training and one task per "
            "scene on Dask distributed."
        ),
    )
    parser.add_argument("manifest", metavar="MANIFEST", help="scene manifest (CSV)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--model",
        metavar="DETECTOR.kdmsi",
        help="detect every scene with this detector instead of training one (labelled scenes "
        "still calibrate their threshold on their labels)",
    )
    parser.add_argument(
        "--cluster",
        metavar="local[:N]|tcp://HOST:PORT",
        help="run on Dask distributed: a local cluster of N worker processes (default one per "
        f"{defaults.CLUSTER_LOCAL_CORES_PER_WORKER} cores) or a running scheduler's address; "
        "the data paths must be readable by every worker (pip install 'kdmsi[cluster]')",
    )
    add_run_options(parser)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.jobs.batch import batch_scenes

    record = batch_scenes(
        args.manifest,
        args.output,
        config=config_from_args(args),
        model=args.model,
        cluster=args.cluster,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=progress,
    )
    return {
        "batch_record": record["batch_record"],
        "status": record["status"],
        "counts": record["counts"],
        "failed": [s["name"] for s in record["scenes"] if s.get("status") == "failed"],
        "seconds": record["seconds"],
        **({"cluster": record["cluster"]} if "cluster" in record else {}),
    }
