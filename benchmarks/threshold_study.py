"""Pseudo-label threshold study on real data: fixed 0.3 against the automatic thresholds.

Protocol (``python -m benchmarks.bench --pseudo-study MODEL``):

1. Weak labels for the 10 OSCD cities of ``../shared/data/oscd``: the scene grid (UTM, from
   the data layer) is cut into tiles of the model's size; a tile is *changed* when the truth
   mask (warped onto the grid, nearest) has at least one change pixel in it, else
   *unchanged* (image-level labels, as in the paper). The masks are used for nothing else but
   scoring.
2. If ``MODEL`` does not exist it is trained on those labels (``train_kdmsi`` with a manifest):
   efficientnet-lite0 from its ImageNet weights, 128 px tiles, a few epochs (CPU-sized).
3. ``infer_scene`` writes each city's MSI map; ``make_pseudo_labels`` thresholds it with 0.3,
   ``auto``, ``otsu`` and ``unchanged-q`` (and 0.0 = "every pixel of a changed tile", the
   trivial map); ``evaluate_rasters`` scores each pseudo-label raster against the truth
   (pixels of unchanged tiles count as background, as in the paper's protocol).
4. Confusion counts are summed over all cities; per-city IoU is listed too. The best fixed
   threshold found with the truth (an oracle sweep of the MSI maps) is given for reference.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
OSCD = REPO.parent / "shared" / "data" / "oscd"
THRESHOLDS: tuple[Any, ...] = (0.3, "auto", "otsu", "unchanged-q", 0.0)
#: fixed thresholds tried only to find the best one with the truth (an oracle, for reference).
ORACLE: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)


def tile_labels_from_mask(
    before: Path, after: Path, truth: Path, tile_size: int, out: Path
) -> dict:
    """Write a GeoPackage of tile polygons with ``change`` 1/0 from a truth mask."""
    import geopandas as gpd
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.data.tiling import tile_windows, window_polygon

    with ScenePair.open(before, after) as scene:
        grid = scene.grid
        windows = tile_windows(grid, tile_size, 0)
        with (
            rasterio.open(truth) as src,
            WarpedVRT(
                src,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling.nearest,
            ) as vrt,
        ):
            values, geoms = [], []
            for w in windows:
                valid = scene.read_valid(w)
                if valid.mean() < 0.5:
                    continue
                mask = vrt.read(1, window=w) > 0
                values.append(int((mask & valid).any()))
                geoms.append(window_polygon(grid, w))
    frame = gpd.GeoDataFrame({"change": values}, geometry=geoms, crs=grid.crs)
    frame.to_file(out, driver="GPKG")
    return {"tiles": len(values), "changed": int(sum(values))}


def _printing_progress() -> Any:
    """A Progress that prints stages, logs and every 10th step with a timestamp."""
    from kdmsi_engine.progress import Progress

    def show(event: Any) -> None:
        if event.kind in ("stage", "log") or (event.kind == "progress" and event.done % 10 == 0):
            print(
                time.strftime("%H:%M:%S"),
                event.kind,
                event.stage,
                event.done,
                event.total,
                event.message,
                flush=True,
            )

    return Progress(show)


def run_study(
    model: Path, out_dir: Path, *, epochs: int = 20, tile_size: int = 128, method: str = "msi"
) -> int:
    """Run the study (see module docs); print a table, write ``pseudo-study.json``."""
    from kdmsi_engine.errors import LabelError
    from kdmsi_engine.inference.scene import infer_scene
    from kdmsi_engine.metrics import Confusion, evaluate_rasters, metrics_from_confusion
    from kdmsi_engine.pseudo import make_pseudo_labels

    work = out_dir / "pseudo-study"
    work.mkdir(parents=True, exist_ok=True)
    cities = sorted(p.stem for p in (OSCD / "label").glob("*.tif"))
    started = time.perf_counter()
    rows = []
    balance = {}
    for city in cities:
        gpkg = work / f"{city}-labels.gpkg"
        if not gpkg.exists():
            balance[city] = tile_labels_from_mask(
                OSCD / "A" / f"{city}.tif",
                OSCD / "B" / f"{city}.tif",
                OSCD / "label" / f"{city}.tif",
                tile_size,
                gpkg,
            )
        rows.append(
            [city, str(OSCD / "A" / f"{city}.tif"), str(OSCD / "B" / f"{city}.tif"), str(gpkg)]
        )
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "before", "after", "labels"])
        writer.writerows(rows)
    print(f"weak labels: {balance}", flush=True)
    train_info: dict[str, Any] = {}
    if not model.exists():
        from kdmsi_engine.training.kd import train_kdmsi

        t0 = time.perf_counter()
        result = train_kdmsi(
            scenes=manifest,
            out=model,
            backbone="efficientnet-lite0",
            weights="imagenet",
            epochs=epochs,
            batch_size=8,
            tile_size=tile_size,
            device="cpu",
            progress=_printing_progress(),
        )
        train_info = {k: v for k, v in result.items() if k not in ("metadata", "networks")}
        train_info["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"trained: {train_info}", flush=True)
    tried = THRESHOLDS + ORACLE
    totals = {str(t): Confusion() for t in tried}
    per_city: dict[str, dict[str, Any]] = {}
    for city in cities:
        prob = work / f"{city}-{method}.tif"
        if not prob.exists():
            infer_scene(
                OSCD / "A" / f"{city}.tif",
                OSCD / "B" / f"{city}.tif",
                model,
                prob,
                method=method,
                device="cpu",
                batch_size=4,
            )
        truth = OSCD / "label" / f"{city}.tif"
        sweep = evaluate_rasters(prob, truth, sweep=True)
        per_city[city] = {"msi_best_iou": sweep["best"]}
        for t in tried:
            out = work / f"{city}-pseudo-{method}-{t}.tif"
            try:
                res = make_pseudo_labels(
                    prob,
                    out,
                    labels=work / f"{city}-labels.gpkg",
                    threshold=t if isinstance(t, str) else float(t),
                    tile_size=tile_size,
                    overwrite=True,
                )
            except LabelError:  # e.g. unchanged-q on a scene without unchanged tiles
                per_city[city][str(t)] = {"threshold": None, "iou": None}
                continue
            ev = evaluate_rasters(out, truth)
            c = ev["counts"]
            totals[str(t)] = totals[str(t)] + Confusion(**c)
            per_city[city][str(t)] = {"threshold": res["threshold"], "iou": round(ev["iou"], 4)}
        print(city, json.dumps(per_city[city]), flush=True)
    summary = {}
    for t in tried:
        m = metrics_from_confusion(totals[str(t)])
        done = [c for c in cities if per_city[c][str(t)]["threshold"] is not None]
        thresholds = [per_city[c][str(t)]["threshold"] for c in done]
        summary[str(t)] = {
            "iou": round(m["iou"], 4),
            "f1": round(m["f1"], 4),
            "precision": round(m["precision"], 4),
            "recall": round(m["recall"], 4),
            "mean_city_iou": round(float(np.mean([per_city[c][str(t)]["iou"] for c in done])), 4),
            "cities": len(done),
            "threshold_mean": round(float(np.mean(thresholds)), 3),
            "threshold_range": [round(min(thresholds), 3), round(max(thresholds), 3)],
        }
    record = {
        "method": method,
        "model": str(model),
        "tile_size": tile_size,
        "training": train_info,
        "label_balance": balance,
        "summary": summary,
        "per_city": per_city,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / f"pseudo-study-{method}.json").write_text(
        json.dumps(record, indent=2), encoding="utf-8"
    )
    print(f"\nPseudo-label IoU on OSCD from {method} maps (10 cities, counts summed):")
    print(
        f"{'threshold':<12} {'IoU':>7} {'F1':>7} {'prec':>7} {'recall':>7} {'city IoU':>9} "
        f"{'cities':>6}  threshold mean [range]"
    )
    for t, s in summary.items():
        tag = " (oracle grid)" if t in {str(v) for v in ORACLE} else ""
        print(
            f"{t:<12} {s['iou']:>7.4f} {s['f1']:>7.4f} {s['precision']:>7.4f} "
            f"{s['recall']:>7.4f} {s['mean_city_iou']:>9.4f} {s['cities']:>6}  "
            f"{s['threshold_mean']} {s['threshold_range']}{tag}"
        )
    best = max(ORACLE + (0.3, 0.0), key=lambda t: summary[str(t)]["iou"])
    print(f"best fixed threshold with the truth (oracle): {best} IoU {summary[str(best)]['iou']}")
    return 0
