"""Train KD-MSI without BatchNorm, in one process or under torchrun (a script for the tests).

Usage: ``[torchrun --standalone --nproc_per_node N] distributed_testutils.py DATASET OUT.kdmsi
STEPS.json --batch-size B [--augment]``.

The networks are the real KD-MSI teacher and student with every BatchNorm replaced by an
identity: BatchNorm normalises each process's part of a batch by that part's statistics, the
one thing that keeps N processes x B/N from being one process at B. Without it the two are the
same computation, which is what the test checks. Rank 0 writes the model file (the job itself
does that) and ``STEPS.json`` with the loss of every step (averaged over the processes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from kdmsi_engine.environment import configure_process
from kdmsi_engine.progress import Progress, ProgressEvent


def without_batchnorm(network: nn.Module) -> nn.Module:
    """``network`` with each BatchNorm layer replaced by an identity."""
    for name, child in list(network.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(network, name, nn.Identity())
        else:
            without_batchnorm(child)
    return network


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("out")
    parser.add_argument("steps")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--augment", action="store_true")
    args = parser.parse_args(argv)
    configure_process()

    from kdmsi_engine.training import distributed, kd

    build = kd.build_kdmsi_models

    def build_without_batchnorm(arch: Any, *, weights: str = "none") -> tuple[nn.Module, ...]:
        return tuple(without_batchnorm(net) for net in build(arch, weights=weights))

    kd.build_kdmsi_models = build_without_batchnorm  # type: ignore[assignment]
    steps: list[dict[str, Any]] = []

    def record(event: ProgressEvent) -> None:
        if event.kind == "progress" and event.stage == "train":
            steps.append(event.data)

    with distributed.launched("cpu") as device:
        result = kd.train_kdmsi(
            dataset=args.dataset,
            out=args.out,
            backbone="resnet18",
            weights="none",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=0.002,
            tile_size=64,
            seed=3,
            augment=args.augment,
            device=device,
            precision="fp32",
            progress=Progress(record),
        )
        if distributed.current().is_main:
            summary = {k: v for k, v in result.items() if k not in ("networks", "metadata")}
            Path(args.steps).write_text(json.dumps({"steps": steps, "result": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
