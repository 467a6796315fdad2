"""``make accuracy``: the chain's change map against change vector analysis, scene by scene.

A benchmark, not a test. For every labelled, georeferenced scene of the data folder (the ten
OSCD cities and the Landsat Taizhou and Nanjing pairs of ``../shared/data``):

1. **Weak labels from the mask**, the way an analyst marks a scene: every connected region of
   change becomes a polygon with ``change=1``, every connected region of no change a polygon
   with ``change=0`` (on Taizhou and Nanjing, whose references are sparse samples, only the
   sampled areas). The engine's touching rule turns them into tile labels. The masks serve
   only to make these labels and to score.
2. **Two protocols**: (a) the whole footprint marked, scored everywhere; (b) half of the scene
   marked (a checkerboard of 256 px blocks on the scene grid), scored only on the unmarked half
   (pixels of no labelled tile), which is how an analyst uses the tool: mark part of a scene,
   map the rest.
3. ``kdmsi run BEFORE AFTER --labels LABELS -o DIR --tile-size T`` with every other option at
   its default, in a separate process, timed.
4. Scores (change IoU, F1, precision, recall; confusion summed over the scored pixels) of the
   final map (``change.tif``); of the final map's probability at the chain's threshold without
   keeping the labelled-unchanged tiles out (``unmasked``); of the detector alone and of the
   calibrated change vector analysis alone, each at the final map's quantile on its own
   calibration tiles as the chain has them (the unchanged tiles held out of the detector's
   training; every unchanged tile for the calibrated CVA); of the pseudo labels (on the pixels they label); of the MSI map (at its best
   threshold: uses the truth, an upper bound); of the baseline (``kdmsi cva`` + Otsu), of the
   baseline restricted to the tiles labelled changed and of the trivial map (every pixel of the
   changed tiles); the last two only exist where the scored pixels are labelled (protocol a).

Writes ``accuracy-output/accuracy.json`` (every number, the command lines, the machine) and
``accuracy-output/accuracy.md`` (the tables of the README).

Usage::

    python -m benchmarks.accuracy [--data ../shared/data] [--out accuracy-output]
        [--protocols a,b] [--scenes bercy,paris] [--jobs 1] [--reuse] [-- EXTRA RUN OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess  # nosec B404
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from shapely.geometry import shape

from kdmsi_engine.atomic import write_text_atomic
from kdmsi_engine.metrics import Confusion, confusion, metrics_from_confusion

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "accuracy-output"
#: Tile size of the weak labels: 64 px is 640 m on Sentinel-2 and 1.9 km on Landsat, the size
#: of the areas an analyst marks at a glance; the scenes are 360-900 px a side.
TILE_SIZE = 64
#: Side of the checkerboard blocks of protocol (b), in pixels of the scene grid.
BLOCK_SIZE = 256
#: Truth values: 1 change, 0 no change, anything else (e.g. 255) not labelled.
CHANGE, NO_CHANGE = 1, 0
PROTOCOLS = {
    "a": "whole footprint marked, scored everywhere",
    "b": "half marked (checkerboard of 256 px blocks), scored on the unmarked half",
}
MAPS = (
    "final",
    "unmasked",
    "detector",
    "evidence",
    "pseudo",
    "msi_best",
    "baseline",
    "baseline_restricted",
    "trivial",
)


@dataclass
class Scene:
    """A labelled, georeferenced scene of the data folder."""

    name: str
    before: Path
    after: Path
    truth: Path


def find_scenes(data: Path) -> list[Scene]:
    """Every pair ``DATASET/{A,B,label}/NAME`` whose before image has a CRS."""
    scenes: list[Scene] = []
    for dataset in sorted(p for p in data.iterdir() if p.is_dir()):
        a, b, label = dataset / "A", dataset / "B", dataset / "label"
        if not (a.is_dir() and b.is_dir() and label.is_dir()):
            continue
        for before in sorted(a.glob("*.tif")):
            after, truth = b / before.name, label / before.name
            if not (after.is_file() and truth.is_file()):
                continue
            with rasterio.open(before) as ds:
                if ds.crs is None:
                    continue
            scenes.append(Scene(before.stem, before, after, truth))
    return scenes


# --------------------------------------------------------------------- weak labels


def truth_on_grid(truth: Path, grid: Any) -> np.ndarray:
    """The reference on the scene grid (nearest): int8, 1 change, 0 no change, -1 unknown."""
    with rasterio.open(truth) as src:
        nodata = src.nodata
        with WarpedVRT(
            src,
            crs=grid.crs,
            transform=grid.transform,
            width=grid.width,
            height=grid.height,
            resampling=Resampling.nearest,
            add_alpha=True,
        ) as vrt:
            data = vrt.read(1)
            inside = vrt.read(vrt.count) > 0
    out = np.full(data.shape, -1, np.int8)
    known = inside if nodata is None else inside & (data != nodata)
    out[known & (data == CHANGE)] = CHANGE
    out[known & (data == NO_CHANGE)] = NO_CHANGE
    return out


def checkerboard(height: int, width: int, block: int = BLOCK_SIZE) -> np.ndarray:
    """Bool (H, W): True on the marked blocks of a checkerboard (the top-left block marked)."""
    rows = np.arange(height)[:, None] // block
    cols = np.arange(width)[None, :] // block
    return ((rows + cols) % 2) == 0


def weak_labels_from_truth(
    truth: np.ndarray,
    transform: Any,
    crs: Any,
    *,
    marked: np.ndarray | None = None,
    field: str = "change",
) -> gpd.GeoDataFrame:
    """Weak-label polygons from a reference on a grid, as an analyst would mark the scene.

    Each 4-connected region of change (1) becomes a polygon with ``field`` 1, each region of no
    change (0) a polygon with ``field`` 0; unknown pixels (-1) and pixels outside ``marked``
    give nothing.
    """
    geoms: list[Any] = []
    values: list[int] = []
    area = np.ones(truth.shape, bool) if marked is None else marked
    for value in (CHANGE, NO_CHANGE):
        mask = (truth == value) & area
        if not mask.any():
            continue
        for geom, _ in rasterio.features.shapes(
            mask.astype(np.uint8), mask=mask, connectivity=4, transform=transform
        ):
            geoms.append(shape(geom))
            values.append(value)
    return gpd.GeoDataFrame({field: np.asarray(values, np.int64)}, geometry=geoms, crs=crs)


# --------------------------------------------------------------------- scoring


def read_band(path: Path) -> tuple[np.ndarray, Any]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.nodata


def score(pred: np.ndarray, truth: np.ndarray, where: np.ndarray) -> dict[str, Any]:
    """Change metrics of a bool prediction over the pixels ``where`` with a known truth."""
    known = where & (truth >= 0)
    metrics = metrics_from_confusion(confusion(pred, truth == CHANGE, known))
    keys = ("iou", "f1", "precision", "recall", "oa", "mean_f1", "pixels")
    return {k: metrics[k] for k in keys}


def best_threshold_score(prob: np.ndarray, truth: np.ndarray, where: np.ndarray) -> dict:
    """Metrics at the threshold (0.01 steps) that maximises IoU: uses the truth (upper bound)."""
    known = where & (truth >= 0) & np.isfinite(prob) & (prob >= 0)
    values, labels = prob[known], truth[known] == CHANGE
    best: dict[str, Any] = {"iou": 0.0}
    for threshold in np.arange(0.0, 1.0, 0.01):
        pred = values > threshold
        tp = int(np.count_nonzero(pred & labels))
        c = Confusion(
            tp=tp,
            fp=int(np.count_nonzero(pred)) - tp,
            fn=int(np.count_nonzero(labels)) - tp,
            tn=int(values.size - np.count_nonzero(pred | labels)),
        )
        metrics = metrics_from_confusion(c)
        if metrics["iou"] > best["iou"]:
            keys = ("iou", "f1", "precision", "recall", "oa", "mean_f1", "pixels")
            best = {k: metrics[k] for k in keys}
            best["threshold"] = round(float(threshold), 2)
    return best


# --------------------------------------------------------------------- one scene


def run_command(
    scene: Scene, labels: Path, out: Path, extra: Sequence[str], tile_size: int = TILE_SIZE
) -> list[str]:
    """The ``kdmsi run`` command line of a scene: defaults, but the tile size of the labels."""
    return [
        sys.executable,
        "-m",
        "kdmsi_engine",
        "run",
        str(scene.before.absolute()),
        str(scene.after.absolute()),
        "--labels",
        str(labels.absolute()),
        "-o",
        str(out.absolute()),
        "--tile-size",
        str(tile_size),
        "--scene",
        scene.name,
        "--progress",
        "none",
        "--overwrite",
        *extra,
    ]


def evaluate_scene(
    scene: Scene,
    protocol: str,
    out_root: Path,
    *,
    extra: Sequence[str] = (),
    reuse: bool = False,
    threads: int | None = None,
    tile_size: int = TILE_SIZE,
    block_size: int = BLOCK_SIZE,
    engine: Path = REPO_ROOT,
) -> dict[str, Any]:
    """Labels, ``kdmsi run``, baseline and scores of one scene under one protocol.

    Writes into ``out_root/protocol/scene/`` (``labels.gpkg``, ``run/``, ``cva.tif``) and
    returns the scene's record (see the module docs); a failed run gives ``error``.
    ``engine``: the folder whose ``kdmsi_engine`` runs the chain (another checkout, e.g. an
    earlier version, is measured with this one's scoring).
    """
    from kdmsi_engine import defaults
    from kdmsi_engine.cva import cva_scene
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.pseudo import TileLabels
    from kdmsi_engine.thresholds import raster_threshold

    folder = out_root / protocol / scene.name
    folder.mkdir(parents=True, exist_ok=True)
    labels_path = folder / "labels.gpkg"
    run_dir = folder / "run"
    with ScenePair.open(scene.before, scene.after) as opened:
        grid = opened.grid
        valid = opened.read_valid(grid.full_window())
        truth = truth_on_grid(scene.truth, grid)
        marked = checkerboard(grid.height, grid.width, block_size) if protocol == "b" else None
        frame = weak_labels_from_truth(truth, grid.transform, grid.crs, marked=marked)
        if labels_path.exists():
            labels_path.unlink()
        frame.to_file(labels_path, driver="GPKG", layer="labels")
        tiles = TileLabels.from_frame(labelled_tiles(opened, labels_path, tile_size=tile_size))
    state = tiles.state(0, grid.height, grid.width)
    if protocol == "a":
        scored = valid.copy()
    else:
        scored = valid & ~marked & (state == -1)

    record: dict[str, Any] = {
        "scene": scene.name,
        "protocol": protocol,
        "pixels": int(grid.width * grid.height),
        "megapixels": round(grid.width * grid.height / 1e6, 4),
        "tiles": tiles.counts(),
        "scored_pixels": int(np.count_nonzero(scored & (truth >= 0))),
        "truth_change_pixels": int(np.count_nonzero(scored & (truth == CHANGE))),
    }
    command = run_command(scene, labels_path, run_dir, extra, tile_size)
    record["command"] = " ".join(command[2:])
    done = run_dir / defaults.RECORD_NAME
    if not (reuse and done.is_file()):
        env = dict(os.environ)
        # the engine to measure: ``python -m`` puts its working folder first on the path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(engine), env.get("PYTHONPATH")) if p)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        started = time.monotonic()
        # our own interpreter and an argument list, never a shell
        proc = subprocess.run(  # nosec B603
            command, capture_output=True, text=True, env=env, check=False, cwd=engine
        )
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            record["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return record
        (folder / "run_seconds.txt").write_text(f"{seconds:.2f}\n", encoding="utf-8")
    seconds = float((folder / "run_seconds.txt").read_text(encoding="utf-8"))
    record["run_seconds"] = round(seconds, 1)
    record["minutes_per_megapixel"] = round(seconds / 60.0 / record["megapixels"], 2)
    run = json.loads(done.read_text(encoding="utf-8"))
    record["trust"] = run.get("trust")
    record["chain_threshold"] = run["stages"]["detect"]["parameters"].get("threshold")
    record["pseudo"] = {
        k: run["stages"]["pseudo"].get(k) for k in ("source", "threshold", "threshold_method")
    }
    record["fusion"] = (run["stages"]["detect"].get("fusion") or {}).get("weights")

    cva_path = folder / "cva.tif"
    baseline = cva_scene(scene.before, scene.after, cva_path, overwrite=True)
    cva, _ = read_band(cva_path)
    base = (cva > baseline["threshold"]) & (cva >= 0)
    change, _ = read_band(run_dir / defaults.CHANGE_NAME)
    prob, _ = read_band(run_dir / defaults.PROBABILITY_NAME)
    pseudo, _ = read_band(run_dir / defaults.PSEUDO_NAME)
    msi, _ = read_band(run_dir / defaults.MSI_NAME)
    threshold = float(record["chain_threshold"])
    # the chain's calibration tiles: the detector's are the same seeded share of the unchanged
    # tiles (held out of its training); the calibrated CVA's are all of them
    held_out = tiles.held_out_split(defaults.CALIBRATION_FRACTION, defaults.SEED)
    held_unchanged = held_out & (tiles.label == 0)
    calibration = {
        "detector": tiles.only(held_unchanged) if held_unchanged.any() else tiles,
        "evidence": tiles,
    }
    maps: dict[str, Any] = {
        "final": score(change == 1, truth, scored),
        "unmasked": score(prob > threshold, truth, scored),
    }
    for name, file in (
        ("detector", defaults.DETECTOR_PROBABILITY_NAME),
        ("evidence", defaults.EVIDENCE_NAME),
    ):
        if (run_dir / file).is_file():
            alone = raster_threshold(
                run_dir / file,
                "unchanged-q",
                unchanged=calibration[name].unchanged_mask,
                quantile=defaults.DETECT_QUANTILE,
            )
            values, _ = read_band(run_dir / file)
            keep = state != 0 if protocol == "a" else np.ones_like(scored)
            maps[name] = score((values > alone) & keep, truth, scored)
    maps["pseudo"] = score(pseudo == 1, truth, (pseudo != 255) & valid)
    maps["msi_best"] = best_threshold_score(msi, truth, scored)
    maps["baseline"] = score(base, truth, scored)
    if protocol == "a":
        maps["baseline_restricted"] = score(base & (state == 1), truth, scored)
        maps["trivial"] = score(state == 1, truth, scored)
    record["baseline_otsu"] = baseline["threshold"]
    record["maps"] = maps
    return record


# --------------------------------------------------------------------- report


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol: mean of each map's IoU/F1, wins over the baseline, ratio of the means."""
    out: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        rows = [r for r in records if r["protocol"] == protocol and "maps" in r]
        if not rows:
            continue
        means = {}
        for name in MAPS:
            values = [r["maps"][name]["iou"] for r in rows if name in r["maps"]]
            f1 = [r["maps"][name]["f1"] for r in rows if name in r["maps"]]
            if values:
                means[name] = {"iou": float(np.mean(values)), "f1": float(np.mean(f1))}
        wins = [
            r["scene"] for r in rows if r["maps"]["final"]["iou"] > r["maps"]["baseline"]["iou"]
        ]
        base = means["baseline"]["iou"]
        out[protocol] = {
            "scenes": len(rows),
            "failed": [r["scene"] for r in records if r["protocol"] == protocol and "error" in r],
            "mean": means,
            "final_over_baseline": round(means["final"]["iou"] / base, 3) if base else None,
            "beats_baseline": len(wins),
            "loses_to_baseline": sorted({r["scene"] for r in rows} - set(wins)),
            "max_minutes_per_megapixel": max(r["minutes_per_megapixel"] for r in rows),
        }
    return out


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _table_cells(
    name: str, maps: dict[str, Any], size: str, final: str, labelled: bool
) -> list[str]:
    """One row of the report's table, up to the timing cells."""
    out = [
        name,
        size,
        final,
        _fmt(maps.get("detector", {}).get("iou")),
        _fmt(maps.get("evidence", {}).get("iou")),
        _fmt(maps["pseudo"]["iou"]),
        _fmt(maps["msi_best"]["iou"]),
        _fmt(maps["baseline"]["iou"]),
    ]
    if labelled:
        out += [
            _fmt(maps.get("baseline_restricted", {}).get("iou")),
            _fmt(maps.get("trivial", {}).get("iou")),
        ]
    return out


def markdown(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The README tables: one per protocol, a row per scene, then the means."""
    lines: list[str] = []
    for protocol, text in PROTOCOLS.items():
        rows = [r for r in records if r["protocol"] == protocol and "maps" in r]
        if not rows:
            continue
        labelled = protocol == "a"  # the scored pixels are labelled: two more references
        lines.append(f"**Protocol ({protocol})**: {text}. Change IoU (F1 of the final map).")
        lines.append("")
        head = [
            "scene",
            "MP",
            "final map (F1)",
            "detector alone",
            "calibrated CVA alone",
            "pseudo labels",
            "MSI (best thr.)",
            "CVA + Otsu",
        ]
        if labelled:
            head += ["CVA in changed tiles", "all of the changed tiles"]
        head += ["run (s)", "min/MP"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))

        for r in rows:
            m = r["maps"]
            row = _table_cells(
                r["scene"],
                m,
                f"{r['megapixels']:.2f}",
                f"**{m['final']['iou']:.3f}** ({m['final']['f1']:.3f})",
                labelled,
            )
            row += [f"{r['run_seconds']:.0f}", f"{r['minutes_per_megapixel']:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        s = summary[protocol]
        mean = s["mean"]
        final = f"**{mean['final']['iou']:.3f}** ({mean['final']['f1']:.3f})"
        row = _table_cells("**mean**", mean, "", final, labelled)
        row += ["", f"max {s['max_minutes_per_megapixel']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append(
            f"Final map over the baseline: {s['final_over_baseline']:.2f}x on the mean; beats "
            f"it on {s['beats_baseline']} of {s['scenes']} scenes"
            + (f" (not on {', '.join(s['loses_to_baseline'])})." if s["loses_to_baseline"] else ".")
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--protocols", default="a,b", help="a, b or a,b")
    parser.add_argument("--scenes", help="only these scenes (comma-separated names)")
    parser.add_argument("--jobs", type=int, default=1, help="scenes run at once (default 1)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument(
        "--engine",
        type=Path,
        default=REPO_ROOT,
        help="checkout whose kdmsi_engine runs the chain (default: this one)",
    )
    parser.add_argument("extra", nargs="*", help="extra 'kdmsi run' options (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    scenes = find_scenes(args.data)
    if args.scenes:
        wanted = set(args.scenes.split(","))
        scenes = [s for s in scenes if s.name in wanted]
    protocols = [p for p in args.protocols.split(",") if p in PROTOCOLS]
    if not scenes or not protocols:
        print("no scene or protocol to run; check --data, --scenes and --protocols")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, args.jobs)) if args.jobs > 1 else None
    jobs = [(s, p) for p in protocols for s in scenes]
    started = time.monotonic()

    def one(job: tuple[Scene, str]) -> dict[str, Any]:
        scene, protocol = job
        record = evaluate_scene(
            scene,
            protocol,
            args.out,
            extra=args.extra,
            reuse=args.reuse,
            threads=threads,
            engine=args.engine.absolute(),
        )
        final = record.get("maps", {}).get("final", {}).get("iou")
        base = record.get("maps", {}).get("baseline", {}).get("iou")
        print(
            f"{protocol} {scene.name:12s} final {_fmt(final)} baseline {_fmt(base)} "
            f"{record.get('run_seconds', '')} s {record.get('error', '')}",
            flush=True,
        )
        return record

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = list(pool.map(one, jobs))
    summary = summarize(records)
    result = {
        "benchmark": "accuracy",
        "data": str(args.data.absolute()),
        "tile_size": TILE_SIZE,
        "block_size": BLOCK_SIZE,
        "protocols": PROTOCOLS,
        "extra_run_options": list(args.extra),
        "engine": str(args.engine.absolute()),
        "machine": {
            "cpu_count": cores,
            "jobs": args.jobs,
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "scenes": records,
    }
    write_text_atomic(
        args.out / "accuracy.json", json.dumps(result, indent=2, default=str), overwrite=True
    )
    table = markdown(records, summary)
    write_text_atomic(args.out / "accuracy.md", table + "\n", overwrite=True)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
