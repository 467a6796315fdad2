"""``make demo``: the whole chain on the small Landsat scene shipped in ``resources/sample/``.

Runs ``kdmsi run`` on the Taizhou pair (Landsat 7, 2000 and 2003, 400 x 400 pixels of 30 m,
see ``resources/sample/ATTRIBUTION.md``) with its weak labels, on the CPU, with the chain's
defaults (efficientnet-lite0 from the ImageNet weights that ship with its package) and 64 px
tiles; then writes a PNG quicklook
(before | after | change overlay). The sample reference raster is given as ``--truth``, so
``run.json`` reports the accuracy on its labelled pixels (note: the weak labels were derived from
the same reference, as tile labels only).

Usage::

    python -m scripts.demo [--out demo-output] [--device cpu] [--fast]

The demo owns its output folder and replaces what an earlier demo wrote there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kdmsi_engine import defaults
from scripts.make_sample import (
    AFTER_NAME,
    BEFORE_NAME,
    LABELS_NAME,
    TRUTH_NAME,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "resources" / "sample"
DEFAULT_OUT = REPO_ROOT / "demo-output"
QUICKLOOK_NAME = "quicklook.png"
#: Labelling tiles of 64 px: 1.9 km of the sample's 30 m pixels.
DEMO_TILE_SIZE = 64
#: Landsat 7 bands in the sample: TM 1 (blue), 2 (green), 3 (red), 4 (NIR), 5, 7 (SWIR); the
#: quicklook shows red, green, blue (the chain uses every band).
DISPLAY_BANDS = (3, 2, 1)


def demo_arguments(
    out_dir: Path,
    *,
    sample_dir: Path = SAMPLE_DIR,
    device: str = "cpu",
    fast: bool = False,
    progress: str = "bar",
) -> list[str]:
    """The ``kdmsi run`` command line of the demo: the chain's defaults, 64 px tiles.

    The tile size is the one setting that depends on the imagery (64 px is 1.9 km of 30 m
    Landsat, an area an analyst marks at a glance); everything else is what ``kdmsi run`` does
    with no options. ``fast``: one epoch per stage and one MSI scale (a smoke run).
    """
    arguments = [
        "run",
        str(sample_dir / BEFORE_NAME),
        str(sample_dir / AFTER_NAME),
        "--labels",
        str(sample_dir / LABELS_NAME),
        "--truth",
        str(sample_dir / TRUTH_NAME),
        "-o",
        str(out_dir),
        "--scene",
        "taizhou",
        "--tile-size",
        str(DEMO_TILE_SIZE),
        "--device",
        device,
        "--progress",
        progress,
        "--overwrite",
    ]
    if fast:
        arguments += ["--kd-epochs", "1", "--detector-epochs", "1", "--msi-scales", "1"]
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="KD-MSI demo on the shipped Landsat scene")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda:N")
    parser.add_argument("--fast", action="store_true", help="1 epoch per stage (smoke test)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    import torch

    from kdmsi_engine.cli import main as kdmsi_main
    from scripts.quicklook import make_quicklook

    # One thread: the run is then reproducible (the thread count changes the order of float
    # sums, and a training this short is sensitive to it); on 2 cores it costs about 2x time,
    # still well under the 10 minutes budget (about 150 s of CPU in all).
    torch.set_num_threads(args.threads)

    out_dir = args.out.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = demo_arguments(out_dir, device=args.device, fast=args.fast, progress=args.progress)
    print("kdmsi " + " ".join(command), flush=True)
    started = time.monotonic()
    status = kdmsi_main(command)
    if status != 0:
        print(f"demo failed (exit status {status})", file=sys.stderr)
        return status
    record = json.loads((out_dir / defaults.RECORD_NAME).read_text(encoding="utf-8"))
    change = record.get("metrics", {}).get("change", {})
    title = (
        f"KD-MSI demo, Taizhou (Landsat 7, 2000 -> 2003): change IoU {change.get('iou', 0):.3f}, "
        f"F1 {change.get('f1', 0):.3f}, OA {change.get('oa', 0):.3f} on the sample pixels"
    )
    quicklook = make_quicklook(
        SAMPLE_DIR / BEFORE_NAME,
        SAMPLE_DIR / AFTER_NAME,
        out_dir / defaults.CHANGE_NAME,
        out_dir / QUICKLOOK_NAME,
        bands=DISPLAY_BANDS,
        truth=SAMPLE_DIR / TRUTH_NAME,
        title=title,
        overwrite=True,
    )
    seconds = time.monotonic() - started
    print()
    print(f"demo finished in {seconds:.0f} s on {record.get('device')}")
    print(f"outputs in {out_dir}:")
    for key, path in record["outputs"].items():
        print(f"  {key:20s} {path}")
    print(f"  {'quicklook':20s} {quicklook}")
    if change:
        print(
            "accuracy on the labelled pixels of the sample reference: "
            f"change IoU {change['iou']:.3f}, precision {change['precision']:.3f}, "
            f"recall {change['recall']:.3f}, F1 {change['f1']:.3f}, mean F1 "
            f"{change['mean_f1']:.3f}, OA {change['oa']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
