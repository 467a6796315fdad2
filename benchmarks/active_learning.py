"""``make active-learning``: does labelling the suggested tiles pay off against random tiles?

A benchmark, not a test. A simulated analyst works on a real scene of the data folder with the
weak-label tiles of ``make accuracy`` (64 px; the reference answers for the tiles it is asked
about by the same rule: a tile is changed when it has a change pixel, unchanged when it has
known no-change pixels only, unanswerable when it has no reference pixel, as on the sparse
Landsat references):

1. **Seed**: a few changed and a few unchanged tiles drawn at random (``--seed-tiles``).
2. ``kdmsi run`` on the labelled tiles (the labelling grid filled in, as in QGIS), scored: change
   IoU of ``change.tif`` over the whole scene (every pixel with a reference).
3. For ``--rounds`` rounds, the analysts of ``--strategies`` go on from the same seed run:
   **uncertainty** and **false-alarms** label the ``--per-round`` tiles ``kdmsi suggest
   --measure`` ranks first on the run's ``change_probability.tif``, **mixed** those of
   ``--measure uncertainty --explore 0.5`` (half ranked, half drawn at random by the tool: the
   defaults) (its other defaults: the run's threshold, one tile width between suggestions;
   unanswerable suggestions are passed over), **random** labels as many unlabelled, answerable tiles drawn
   at random (seeded). Each reruns the chain and is scored.

The chain runs with its defaults and ``--tile-size 64`` plus ``--kd-epochs 1 --msi-scales 1``:
with the default pseudo-label source (the calibrated change vector analysis) and a detector
started from ImageNet, the KD-MSI student and its MSI map do not enter the final map, and
these two options leave ``change.tif`` and ``change_probability.tif`` bit-identical while
saving the KD training and MSI inference time (checked on Hong Kong: 19 s of a 45 s run;
``--full-kd`` runs the exact defaults).

Writes ``active-learning-output/active_learning.json`` (every run, label counts, IoU, commands)
and ``active_learning.md`` (the README table: IoU against tiles labelled, each strategy, per
scene and the mean).

Usage::

    python -m benchmarks.active_learning [--runs beihai:0,abudhabi:0,...] [--rounds 2]
        [--strategies uncertainty,false-alarms,mixed,random]
        [--per-round 8] [--seed-tiles 4] [--scenes all --seeds 0,1] [--full-kd] [--reuse]
        [--out DIR] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess  # nosec B404
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np

from benchmarks.accuracy import (
    DEFAULT_DATA,
    REPO_ROOT,
    TILE_SIZE,
    Scene,
    find_scenes,
    read_band,
    run_command,
    score,
    truth_on_grid,
    weak_labels_from_truth,
)
from kdmsi_engine import defaults
from kdmsi_engine.atomic import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "active-learning-output"
#: Scene and seed of each simulation by default: the five OSCD cities with the most 64 px tiles
#: (over 100: room to choose tiles from), ten simulations in all, three seeds on Abu Dhabi and
#: Mumbai, two on Beihai (about 35 minutes on 2 cores, README). --scenes/--seeds (every scene
#: with every seed) or --runs take others.
DEFAULT_RUNS = (
    "beihai:0,abudhabi:0,mumbai:0,abudhabi:1,mumbai:1,"
    "beihai:1,hongkong:0,saclay_e:0,mumbai:2,abudhabi:2"
)
#: The analysts who label ``kdmsi suggest``'s tiles: its ``--measure`` and ``--explore`` (the
#: share of the suggestions drawn at random); and the one who labels random tiles.
SUGGESTING = {
    "uncertainty": ("uncertainty", 0.0),
    "false-alarms": ("false-alarms", 0.0),
    "mixed": ("uncertainty", 0.5),
}
RANDOM = "random"
STRATEGIES = (*SUGGESTING, RANDOM)
#: Options added to ``kdmsi run`` by default (see the module docs: same final map, cheaper).
CHEAP_RUN = ("--kd-epochs", "1", "--msi-scales", "1")


@dataclass
class SceneTruth:
    """A scene's reference on its grid and its tiles with the answer the reference gives."""

    scene: Scene
    truth: np.ndarray
    valid: np.ndarray
    tiles: gpd.GeoDataFrame  # the run's tiles, ``answer``: 1, 0, or -1 (unanswerable)


@dataclass
class Analyst:
    """One strategy's labels so far (tile index -> answer) and its scores by round."""

    strategy: str
    labels: dict[int, int]
    rounds: list[dict[str, Any]] = field(default_factory=list)


def scene_truth(scene: Scene, tile_size: int = TILE_SIZE) -> SceneTruth:
    """The reference on the scene grid and the answer for each tile (the touching rule)."""
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair

    with ScenePair.open(scene.before, scene.after) as opened:
        grid = opened.grid
        truth = truth_on_grid(scene.truth, grid)
        valid = opened.read_valid(grid.full_window())
        reference = weak_labels_from_truth(truth, grid.transform, grid.crs)
        tiles = labelled_tiles(opened, reference, tile_size=tile_size)
    tiles = tiles.rename(columns={"label": "answer"}).reset_index(drop=True)
    return SceneTruth(scene, truth, valid, tiles)


def seed_labels(answers: np.ndarray, per_class: int, rng: np.random.Generator) -> dict[int, int]:
    """``per_class`` random changed and as many random unchanged tiles."""
    labels: dict[int, int] = {}
    for value in (1, 0):
        pool = np.flatnonzero(answers == value)
        if pool.size < per_class:
            raise SystemExit(f"only {pool.size} tiles answer {value}; lower --seed-tiles")
        for index in rng.choice(pool, size=per_class, replace=False):
            labels[int(index)] = value
    return labels


def write_labels(tiles: gpd.GeoDataFrame, labels: dict[int, int], path: Path) -> Path:
    """The labelling grid as the analyst leaves it: the labelled tiles with ``change`` set."""
    indices = sorted(labels)
    frame = gpd.GeoDataFrame(
        {
            "tile_id": tiles["tile_id"].to_numpy()[indices],
            "change": np.asarray([labels[i] for i in indices], dtype=np.int64),
        },
        geometry=tiles.geometry.to_numpy()[indices],
        crs=tiles.crs,
    )
    if path.exists():
        path.unlink()
    frame.to_file(path, driver="GPKG", layer="tiles")
    return path


def _finished_run(truth: SceneTruth, labels: dict[int, int], folder: Path) -> float | None:
    """The seconds of a finished run in ``folder`` on exactly these labels (``--reuse``)."""
    record, labels_path = folder / "run" / "run.json", folder / "labels.gpkg"
    if not (record.is_file() and labels_path.is_file()):
        return None
    written = gpd.read_file(labels_path)
    ids = truth.tiles["tile_id"].to_numpy()
    wanted = {int(ids[i]): v for i, v in labels.items()}
    if dict(zip(written["tile_id"].astype(int), written["change"].astype(int))) != wanted:
        return None
    seconds = folder / "run_seconds.txt"
    if seconds.is_file():
        return float(seconds.read_text(encoding="utf-8"))
    return float(json.loads(record.read_text(encoding="utf-8"))["timings"]["total_s"])


def run_and_score(
    truth: SceneTruth,
    labels: dict[int, int],
    folder: Path,
    extra: list[str],
    *,
    reuse: bool = False,
) -> dict[str, Any]:
    """``kdmsi run`` on the labels (a separate process, timed) and the whole scene's scores;
    with ``reuse``, a finished run on the same labels in ``folder`` is scored again instead."""
    folder.mkdir(parents=True, exist_ok=True)
    finished = _finished_run(truth, labels, folder) if reuse else None
    labels_path = folder / "labels.gpkg"
    command = run_command(truth.scene, labels_path, folder / "run", extra)
    if finished is None:
        write_labels(truth.tiles, labels, labels_path)
        env = dict(os.environ)
        paths = (str(REPO_ROOT), env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        started = time.monotonic()
        # our own interpreter and an argument list, never a shell
        done = subprocess.run(  # nosec B603
            command, capture_output=True, text=True, env=env, check=False, cwd=REPO_ROOT
        )
        seconds = time.monotonic() - started
        (folder / "run_seconds.txt").write_text(f"{seconds:.2f}\n", encoding="utf-8")
        failed = done.returncode != 0
        error = (done.stderr.strip().splitlines() or ["failed"])[-1] if failed else ""
    else:
        seconds, error = finished, ""
    record: dict[str, Any] = {
        "tiles_labelled": len(labels),
        "changed": sum(1 for v in labels.values() if v == 1),
        "unchanged": sum(1 for v in labels.values() if v == 0),
        "command": " ".join(command[2:]),
        "run_seconds": round(seconds, 1),
    }
    if error:
        record["error"] = error
        return record
    change, _ = read_band(folder / "run" / "change.tif")
    record["scores"] = score(change == 1, truth.truth, truth.valid)
    return record


def suggested_tiles(
    truth: SceneTruth,
    labels: dict[int, int],
    run_dir: Path,
    count: int,
    folder: Path,
    measure: str = defaults.SUGGEST_MEASURE,
    explore: float = defaults.SUGGEST_EXPLORE,
) -> list[int]:
    """The first ``count`` answerable tiles ``kdmsi suggest --measure --explore`` suggests on
    the run's map.

    Suggestions the reference cannot answer are passed over (asked for with enough spare that
    ``count`` answerable ones remain)."""
    from kdmsi_engine.suggest import SUGGEST_LAYER, suggest_tiles

    answerable = int(np.count_nonzero(truth.tiles["answer"].to_numpy() >= 0)) - len(labels)
    unanswerable = int(np.count_nonzero(truth.tiles["answer"].to_numpy() < 0))
    out = folder / f"suggestions-{measure}-{explore:g}.gpkg"
    suggest_tiles(
        run_dir / "change_probability.tif",
        out,
        labels=folder / "labels.gpkg",
        tile_size=TILE_SIZE,
        count=min(count + unanswerable, answerable + unanswerable),
        measure=measure,
        explore=explore,
        overwrite=True,
    )
    index_of = {int(t): i for i, t in enumerate(truth.tiles["tile_id"])}
    answers = truth.tiles["answer"].to_numpy()
    picked = [index_of[int(t)] for t in gpd.read_file(out, layer=SUGGEST_LAYER)["tile_id"]]
    return [i for i in picked if answers[i] >= 0 and i not in labels][:count]


def random_tiles(
    truth: SceneTruth, labels: dict[int, int], count: int, rng: np.random.Generator
) -> list[int]:
    """``count`` unlabelled, answerable tiles drawn at random."""
    answers = truth.tiles["answer"].to_numpy()
    pool = [i for i in np.flatnonzero(answers >= 0) if int(i) not in labels]
    return [int(i) for i in rng.choice(pool, size=min(count, len(pool)), replace=False)]


def simulate(
    truth: SceneTruth, seed: int, args: argparse.Namespace, extra: list[str]
) -> dict[str, Any]:
    """The seed run and both analysts' rounds on one scene; their curves."""
    name = truth.scene.name
    root = args.out / name / f"seed{seed}"
    rng_seed = np.random.default_rng(seed)
    answers = truth.tiles["answer"].to_numpy()
    start = seed_labels(answers, args.seed_tiles, rng_seed)
    first = run_and_score(truth, start, root / "round0", extra, reuse=args.reuse)
    print(f"{name} seed {seed} round 0: {_iou(first)} ({first['run_seconds']} s)", flush=True)
    analysts = [Analyst(s, dict(start), [first]) for s in args.strategies]
    rng_random = np.random.default_rng([seed, 1])
    for round_index in range(1, args.rounds + 1):
        for analyst in analysts:
            previous = root / (
                "round0" if round_index == 1 else f"{analyst.strategy}{round_index - 1}"
            )
            if "error" in analyst.rounds[-1]:
                continue
            if analyst.strategy in SUGGESTING:
                measure, explore = SUGGESTING[analyst.strategy]
                new = suggested_tiles(
                    truth,
                    analyst.labels,
                    previous / "run",
                    args.per_round,
                    previous,
                    measure,
                    explore,
                )
            else:
                new = random_tiles(truth, analyst.labels, args.per_round, rng_random)
            analyst.labels.update({i: int(answers[i]) for i in new})
            record = run_and_score(
                truth,
                analyst.labels,
                root / f"{analyst.strategy}{round_index}",
                extra,
                reuse=args.reuse,
            )
            record["new_tiles"] = [int(truth.tiles["tile_id"].iloc[i]) for i in new]
            record["new_changed"] = int(sum(answers[i] == 1 for i in new))
            analyst.rounds.append(record)
            print(
                f"{name} seed {seed} round {round_index} {analyst.strategy:9s}: "
                f"{_iou(record)} ({record['run_seconds']} s, {record['new_changed']} of "
                f"{len(new)} new tiles changed)",
                flush=True,
            )
    return {
        "scene": name,
        "seed": seed,
        "tiles": len(truth.tiles),
        "answerable": int(np.count_nonzero(answers >= 0)),
        "curves": {a.strategy: a.rounds for a in analysts},
    }


def _iou(record: dict[str, Any]) -> str:
    return f"{record['scores']['iou']:.3f}" if "scores" in record else record.get("error", "?")


def curve(result: dict[str, Any], strategy: str) -> list[tuple[int, float | None]]:
    """``(tiles labelled, IoU)`` per round of one analyst."""
    return [
        (r["tiles_labelled"], r["scores"]["iou"] if "scores" in r else None)
        for r in result["curves"][strategy]
    ]


def markdown(results: list[dict[str, Any]]) -> str:
    """The README table: a row per scene and strategy, a column per round, then the means."""
    strategies = list(results[0]["curves"])
    rounds = max(len(curve) for r in results for curve in r["curves"].values())
    head = ["scene (seed)", "strategy"] + [f"round {i}" for i in range(rounds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[str, list[list[float]]] = {s: [[] for _ in range(rounds)] for s in strategies}
    counts: dict[str, list[list[int]]] = {s: [[] for _ in range(rounds)] for s in strategies}
    for result in results:
        for strategy in strategies:
            cells = []
            for i, (labelled, iou) in enumerate(curve(result, strategy)):
                cells.append("failed" if iou is None else f"{iou:.3f} ({labelled})")
                if iou is not None:
                    means[strategy][i].append(iou)
                    counts[strategy][i].append(labelled)
            label = f"{result['scene']} ({result['seed']})"
            lines.append("| " + " | ".join([label, strategy, *cells]) + " |")
    for strategy in strategies:
        cells = [
            f"**{np.mean(v):.3f}** ({np.mean(c):.0f})" if v else ""
            for v, c in zip(means[strategy], counts[strategy])
        ]
        lines.append("| " + " | ".join(["**mean**", strategy, *cells]) + " |")
    lines.append("")
    lines.append("Change IoU of `change.tif` over the whole scene (tiles labelled in brackets).")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean IoU per round and strategy, and per suggesting strategy the simulations where its
    last round beats random's and those where it does not."""
    strategies = list(results[0]["curves"])
    out: dict[str, Any] = {"mean_iou": {}, "better_than_random": {}, "not_better": {}}
    for strategy in strategies:
        per_round = list(zip(*[[iou for _, iou in curve(r, strategy)] for r in results]))
        out["mean_iou"][strategy] = [
            round(float(np.mean([v for v in values if v is not None])), 4)
            if any(v is not None for v in values)
            else None
            for values in per_round
        ]
    if RANDOM not in strategies:
        return out
    for strategy in (s for s in strategies if s != RANDOM):
        out["better_than_random"][strategy] = []
        out["not_better"][strategy] = []
        for result in results:
            last_s, last_r = curve(result, strategy)[-1][1], curve(result, RANDOM)[-1][1]
            if last_s is not None and last_r is not None:
                key = "better_than_random" if last_s > last_r else "not_better"
                out[key][strategy].append(f"{result['scene']} ({result['seed']})")
    return out


def simulations(scenes: list[Scene], args: argparse.Namespace) -> list[tuple[Scene, int]]:
    """``(scene, seed)`` of each simulation: every --scenes with every --seeds when either is
    given, else the --runs pairs, in their order."""
    by_name = {s.name: s for s in scenes}
    if args.scenes or args.seeds:
        names = list(by_name) if args.scenes in (None, "all") else args.scenes.split(",")
        seeds = [int(v) for v in (args.seeds or "0").split(",")]
        pairs = [(name, seed) for name in names for seed in seeds]
    else:
        pairs = [(p.split(":")[0], int(p.split(":")[1])) for p in args.runs.split(",")]
    return [(by_name[name], seed) for name, seed in pairs if name in by_name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"scene:seed pairs ({DEFAULT_RUNS})")
    parser.add_argument(
        "--scenes", help="comma-separated scene names, or all (with --seeds: instead of --runs)"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated analysts among {', '.join(STRATEGIES)} (all)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="labelling rounds (2)")
    parser.add_argument("--per-round", type=int, default=8, help="tiles labelled a round (8)")
    parser.add_argument(
        "--seed-tiles", type=int, default=4, help="changed and unchanged tiles to start with (4+4)"
    )
    parser.add_argument("--seeds", help="comma-separated random seeds (with --scenes; 0)")
    parser.add_argument(
        "--full-kd", action="store_true", help="run the chain's exact defaults (slower)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="score finished runs on the same labels again"
    )
    args = parser.parse_args(argv)
    args.strategies = [s for s in args.strategies.split(",") if s]
    if not args.strategies or set(args.strategies) - set(STRATEGIES):
        parser.error(f"--strategies takes some of {', '.join(STRATEGIES)}")
    logging.basicConfig(level=logging.WARNING)
    jobs = simulations(find_scenes(args.data), args)
    if not jobs:
        print("no scene to run; check --data, --runs and --scenes")
        return 2
    extra = [] if args.full_kd else list(CHEAP_RUN)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    truths: dict[str, SceneTruth] = {}
    for scene, seed in jobs:
        if scene.name not in truths:
            truths[scene.name] = scene_truth(scene)
        results.append(simulate(truths[scene.name], seed, args, extra))
    record = {
        "benchmark": "active_learning",
        "data": str(args.data.absolute()),
        "tile_size": TILE_SIZE,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "seed_tiles": args.seed_tiles,
        "extra_run_options": extra,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary(results),
        "scenes": results,
    }
    write_text_atomic(
        args.out / "active_learning.json", json.dumps(record, indent=2, default=str), overwrite=True
    )
    table = markdown(results)
    write_text_atomic(args.out / "active_learning.md", table + "\n", overwrite=True)
    print()
    print(table)
    print(json.dumps(record["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
