"""``make bench-cluster``: ``kdmsi batch`` over real scenes, in one process and on 1 and 2 workers.

The scenes: a 256 x 256 crop of each of the 10 OSCD cities (4-band Sentinel-2, both dates) in
``../shared/data/oscd``. Every scene is detected with one random-weight efficientnet-lite0
detector (``--model``: the detection is what a cluster spreads; weights do not change its
cost), windows of 128 px, threshold 0.5. Three runs of the same command:

- without ``--cluster`` (one process, every core);
- ``--cluster local:1`` and ``--cluster local:2`` (worker processes with their share of the
  cores each: 2 and 1 threads on a 2-core machine).

It reports scenes per minute of the detection phase (from the first scene's start to the
batch's end, read from the progress events as they come) and of the whole command (with the
cluster's start), and the ratio of 2 workers to 1.

Usage: ``python -m benchmarks.cluster [--scenes 10] [--size 256] [--out bench-output]``; writes
``OUT/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess  # nosec B404
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OSCD = REPO.parent / "shared" / "data" / "oscd"
RUNS = (("one process", None), ("local:1", "local:1"), ("local:2", "local:2"))


def _crops(root: Path, count: int, size: int) -> Path:
    """Crop the first ``count`` OSCD cities; return a manifest of them (no labels)."""
    import rasterio
    from rasterio.windows import Window

    rows = ["name,before,after,labels"]
    for city in sorted(p.stem for p in (OSCD / "A").glob("*.tif"))[:count]:
        paths = []
        for folder in ("A", "B"):
            with rasterio.open(OSCD / folder / f"{city}.tif") as src:
                window = Window(0, 0, min(size, src.width), min(size, src.height))
                profile = {**src.profile, "width": int(window.width), "height": int(window.height)}
                profile["transform"] = src.window_transform(window)
                path = root / f"{city}_{folder}.tif"
                with rasterio.open(path, "w", **profile) as out:
                    out.write(src.read(window=window))
            paths.append(path)
        rows.append(f"{city},{paths[0]},{paths[1]},")
    manifest = root / "scenes.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _detector(root: Path) -> Path:
    """A random-weight efficientnet-lite0 detector on 4 bands (scaling from each scene)."""
    import torch

    from kdmsi_engine.modelfile import save_model
    from kdmsi_engine.models.deeplab import DETECTOR_KIND, architecture_dict, build_detector

    torch.manual_seed(0)
    net = build_detector("efficientnet-lite0", in_channels=4, weights="none")
    meta = {
        "kind": DETECTOR_KIND,
        "architecture": architecture_dict("efficientnet-lite0", 4),
        "bands": [1, 2, 3, 4],
        "num_bands": 4,
        "scaling": None,
        "tile_size": 128,
        "training": {"note": "random weights, for the cluster benchmark only"},
    }
    path = root / "detector.kdmsi"
    save_model(path, meta, {"detector": net.state_dict()}, overwrite=True)
    return path


def _batch(manifest: Path, model: Path, out: Path, cluster: str | None) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "kdmsi_engine", "batch", str(manifest), "-o", str(out),
        "--model", str(model), "--detect-tile-size", "128", "--threshold", "0.5",
        "--device", "cpu", "--progress", "json",
    ]  # fmt: skip
    if cluster:
        command += ["--cluster", cluster]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.monotonic()
    first_scene = None
    result: dict[str, Any] = {}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)  # nosec B603
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        scene_start = (event["event"] == "stage" and event["stage"] == "scenes") or (
            event["event"] == "log" and event.get("message", "").startswith("scene 1/")
        )
        if scene_start and first_scene is None:
            first_scene = time.monotonic()
        if event["event"] == "result":
            result = event["data"]
    if proc.wait() != 0 or first_scene is None:
        raise SystemExit(f"{' '.join(command)} failed")
    ended = time.monotonic()
    done = result["counts"]["complete"]
    return {
        "scenes": done,
        "failed": result["counts"]["failed"],
        "detect_seconds": round(ended - first_scene, 1),
        "wall_seconds": round(ended - started, 1),
        "scenes_per_minute": round(60 * done / (ended - first_scene), 2),
        "scenes_per_minute_with_start": round(60 * done / (ended - started), 2),
        "per_worker": (result.get("cluster") or {}).get("scenes_per_worker"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=10, help="OSCD cities (at most 10)")
    parser.add_argument("--size", type=int, default=256, help="crop size in pixels")
    parser.add_argument("--out", type=Path, default=REPO / "bench-output")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _crops(root, args.scenes, args.size)
        model = _detector(root)
        for label, cluster in RUNS:
            print(f"batch: {label} ...", flush=True)
            runs.append({"run": label, **_batch(manifest, model, root / label, cluster)})
    by_run = {r["run"]: r for r in runs}
    ratio = by_run["local:2"]["scenes_per_minute"] / by_run["local:1"]["scenes_per_minute"]
    print(f"\nkdmsi batch --model, {args.scenes} OSCD crops of {args.size} px, efficientnet-lite0, "
          f"{os.cpu_count()} cores ({platform.machine()})")  # fmt: skip
    print(
        f"{'run':12} {'scenes':>6} {'detect s':>9} {'scenes/min':>10} {'wall s':>7} {'with start':>10}"
    )
    for run in runs:
        print(
            f"{run['run']:12} {run['scenes']:>6} {run['detect_seconds']:>9.1f} "
            f"{run['scenes_per_minute']:>10.2f} {run['wall_seconds']:>7.1f} "
            f"{run['scenes_per_minute_with_start']:>10.2f}"
        )
    print(f"2 workers / 1 worker: {ratio:.2f}x scenes per minute")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "scenes": args.scenes,
        "size": args.size,
        "runs": runs,
        "ratio_2_to_1_workers": round(ratio, 3),
    }
    (args.out / "cluster.json").write_text(json.dumps(record, indent=2))
    print(f"written: {args.out / 'cluster.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
