"""``make bench-distributed``: KD-MSI training in 1 and 2 processes (torchrun, gloo, CPU).

Trains the same KD-MSI job (efficientnet-lite0 from random weights, real DSIFN-CD tile pairs,
128 px, augmentation on, the CPU's default precision) three ways, each as its own command:

- ``1 process x 2 threads``: the plain ``kdmsi train`` with every core;
- ``1 process x 1 thread``: what one of the two processes below has;
- ``2 processes x 1 thread``: ``torchrun --standalone --nproc_per_node 2 -m kdmsi_engine train``
  (gloo, DistributedDataParallel), the threads per process set so the two do not oversubscribe
  the cores (``OMP_NUM_THREADS=1``, torchrun's own default too).

All three train at the same global batch (``--batch-size``), so they take the same steps over the
same tiles. It reports tile pairs per second of the training loop (the model's
``timings.tile_pairs_per_second``: samples of all processes over rank 0's loop time), the wall
time of the command, and each epoch's loss next to the one-process run's: BatchNorm normalises
each process's half of a batch by its own statistics, so the curves agree closely but not
exactly (``tests/engine/test_distributed.py`` shows that without BatchNorm they agree to float
precision).

Usage: ``python -m benchmarks.distributed [--pairs 8] [--epochs 2] [--batch-size 8]
[--out bench-output]``; writes ``OUT/distributed.json``.
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
DSIFN = REPO.parent / "shared" / "data" / "dsifn-cd-samples"
RUNS = (
    ("1 process x 2 threads", 1, 2),
    ("1 process x 1 thread", 1, 1),
    ("2 processes x 1 thread", 2, 1),
)


def _dataset(root: Path, pairs: int) -> Path:
    """A folder dataset of the first ``pairs`` DSIFN-CD pairs (links to the real files)."""
    names = sorted(p.name for p in (DSIFN / "A").iterdir())[:pairs]
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        for name in names:
            (root / sub / name).symlink_to(DSIFN / sub / name)
    return root


def _train(
    dataset: Path, out: Path, processes: int, threads: int, args: argparse.Namespace
) -> dict[str, Any]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        *launcher, "-m", "kdmsi_engine", "train", "--dataset", str(dataset), "-o", str(out),
        "--backbone", "efficientnet-lite0", "--weights", "none", "--tile-size", "128",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", "cpu",
        "--progress", "json",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # nosec B603
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result = next(e["data"] for e in events if e["event"] == "result")
    from kdmsi_engine.modelfile import load_model

    metadata = load_model(out).metadata
    return {
        "processes": processes,
        "threads_per_process": threads,
        "per_process_batch": result["per_process_batch"],
        "global_batch": result["global_batch"],
        "tiles": result["tiles"],
        "precision": result["precision"],
        "tile_pairs_per_second": metadata["timings"]["tile_pairs_per_second"],
        "train_seconds": metadata["timings"]["train_seconds"],
        "wall_seconds": round(wall, 1),
        "epoch_losses": [round(h["loss"], 5) for h in metadata["training"]["history"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="DSIFN-CD pairs (4 tiles each)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--out", type=Path, default=REPO / "bench-output")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _dataset(Path(tmp) / "ds", args.pairs)
        for label, processes, threads in RUNS:
            print(f"training: {label} ...", flush=True)
            run = _train(
                dataset, Path(tmp) / f"p{processes}t{threads}.kdmsi", processes, threads, args
            )
            results.append({"run": label, **run})
    reference = results[0]
    print(f"\nKD-MSI training, efficientnet-lite0, {reference['tiles']} tiles of 128 px, "
          f"global batch {args.batch_size}, {args.epochs} epochs, {reference['precision']}, "
          f"{os.cpu_count()} cores ({platform.machine()})")  # fmt: skip
    print(f"{'run':26} {'batch/proc':>10} {'pairs/s':>8} {'x 1st':>6} {'wall s':>7}  epoch losses")
    for run in results:
        speedup = run["tile_pairs_per_second"] / reference["tile_pairs_per_second"]
        differences = [
            abs(a - b) / abs(b) for a, b in zip(run["epoch_losses"], reference["epoch_losses"])
        ]
        run["speedup_vs_first"] = round(speedup, 3)
        run["max_relative_loss_difference_vs_first"] = round(max(differences), 4)
        print(
            f"{run['run']:26} {run['per_process_batch']:>10} {run['tile_pairs_per_second']:>8.2f} "
            f"{speedup:>6.2f} {run['wall_seconds']:>7.1f}  {run['epoch_losses']} "
            f"(max {run['max_relative_loss_difference_vs_first']:.1%} from the first)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "pairs": args.pairs,
        "epochs": args.epochs,
        "global_batch": args.batch_size,
        "runs": results,
    }
    (args.out / "distributed.json").write_text(json.dumps(record, indent=2))
    print(f"\nwritten: {args.out / 'distributed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
