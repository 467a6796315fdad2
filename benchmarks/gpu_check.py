"""CUDA check and GPU throughput for the networks, on real tiles, with torch alone.

Run on a machine with a CUDA GPU (``python -m benchmarks.gpu_check --data DIR``), where
``DIR`` holds folder datasets (``A/``, ``B/``, ``label/`` PNG tiles such as LEVIR-CD samples). It
needs torch, numpy and Pillow only (no GDAL), so it runs on a bare GPU machine. It checks:

- device choice (``auto`` -> CUDA, a missing ``cuda:N`` is refused) and mixed precision;
- KD-MSI training steps (teacher + student, the engine's losses) in fp32 and fp16 autocast with a
  grad scaler: tile pairs/s, and that the loss falls;
- MSI inference throughput (tiles/s, megapixels/s) in fp32 and autocast, and the autocast map's
  relative error against fp32;
- the Siamese DeepLabV3+ detector's training throughput.

It prints a table and writes ``gpu_check.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import DeviceError
from kdmsi_engine.inference.maps import msi_map, prepare_for_inference
from kdmsi_engine.models.deeplab import build_detector
from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models
from kdmsi_engine.training.losses import make_scaler, train_step

logger = logging.getLogger(__name__)


def load_tiles(root: Path, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real tiles from folder datasets: before, after (N,3,tile,tile) in [0,1], masks (N,tile,tile)."""
    from PIL import Image

    befores, afters, masks = [], [], []
    for dataset in sorted(p for p in root.iterdir() if (p / "A").is_dir()):
        for path in sorted((dataset / "A").glob("*.png")):
            a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            b_img = Image.open(dataset / "B" / path.name).convert("RGB")
            b = np.asarray(b_img, dtype=np.float32) / 255.0
            m = np.asarray(Image.open(dataset / "label" / path.name).convert("L")) > 0
            h, w = m.shape
            for r in range(0, h - tile + 1, tile):
                for c in range(0, w - tile + 1, tile):
                    befores.append(a[r : r + tile, c : c + tile].transpose(2, 0, 1))
                    afters.append(b[r : r + tile, c : c + tile].transpose(2, 0, 1))
                    masks.append(m[r : r + tile, c : c + tile])
    return (
        torch.from_numpy(np.stack(befores)),
        torch.from_numpy(np.stack(afters)),
        torch.from_numpy(np.stack(masks)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_kd(
    backbone: str,
    data: tuple[torch.Tensor, ...],
    device: torch.device,
    precision: str,
    steps: int,
    batch: int = 8,
) -> dict[str, Any]:
    """KD-MSI training steps: tile pairs/s and first/last loss."""
    torch.manual_seed(0)
    arch = architecture(backbone, 3, "diff", "diff")
    teacher, student = build_kdmsi_models({"architecture": arch})
    teacher.to(device).train()
    student.to(device).train()
    params = list(teacher.parameters()) + list(student.parameters())
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9, weight_decay=1e-4)
    scaler = make_scaler(precision)
    before, after, masks = data
    labels = masks.flatten(1).any(1).float()
    n = before.shape[0]
    losses: list[float] = []
    timed_from = 3
    for step in range(steps):
        if step == timed_from:
            _sync(device)
            start = time.perf_counter()
        idx = torch.randint(0, n, (batch,))
        b, a, y = before[idx].to(device), after[idx].to(device), labels[idx].to(device)
        out = train_step(teacher, student, optimizer, b, a, y, precision=precision, scaler=scaler)
        losses.append(out["loss"])
    _sync(device)
    elapsed = time.perf_counter() - start
    finite = all(np.isfinite(losses))
    return {
        "backbone": backbone,
        "precision": precision,
        "tile": int(before.shape[-1]),
        "batch": batch,
        "pairs_per_s": (steps - timed_from) * batch / elapsed,
        "loss_first5": float(np.mean(losses[:5])),
        "loss_last5": float(np.mean(losses[-5:])),
        "finite": bool(finite),
    }


def msi_throughput(
    backbone: str, data: tuple[torch.Tensor, ...], device: torch.device, amp: bool, batch: int = 16
) -> tuple[dict[str, Any], torch.Tensor]:
    """MSI (scales 0.5,1,1.5,2 with flips) tiles/s; returns the maps of the first batch too."""
    torch.manual_seed(0)
    _, student = build_kdmsi_models({"architecture": architecture(backbone, 3, "diff", "diff")})
    student = prepare_for_inference(student, device)
    before, after, _ = data
    b, a = before[:batch].to(device), after[:batch].to(device)
    with torch.inference_mode():
        first = msi_map(student, b, a, amp=amp).float().cpu()
        for _ in range(2):
            msi_map(student, b, a, amp=amp)
        _sync(device)
        reps = 5
        start = time.perf_counter()
        for _ in range(reps):
            msi_map(student, b, a, amp=amp)
        _sync(device)
    elapsed = time.perf_counter() - start
    tiles = reps * batch
    pixels = tiles * b.shape[-1] * b.shape[-2]
    return (
        {
            "backbone": backbone,
            "amp": amp,
            "tiles_per_s": tiles / elapsed,
            "megapixels_per_s": pixels / elapsed / 1e6,
        },
        first,
    )


def detector_throughput(
    backbone: str, data: tuple[torch.Tensor, ...], device: torch.device, steps: int = 15
) -> dict[str, Any]:
    """Siamese DeepLabV3+ training steps with fp16 autocast: pairs/s and loss trend."""
    torch.manual_seed(0)
    model = build_detector(backbone, weights="none", in_channels=3).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    before, after, masks = data
    target_all = masks.long()
    batch = 16
    losses = []
    for step in range(steps):
        if step == 3:
            _sync(device)
            start = time.perf_counter()
        idx = torch.randint(0, before.shape[0], (batch,))
        b, a = before[idx].to(device), after[idx].to(device)
        target = target_all[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(b, a)
            loss = F.cross_entropy(logits.float(), target, ignore_index=255)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    _sync(device)
    return {
        "backbone": backbone,
        "pairs_per_s": (steps - 3) * batch / (time.perf_counter() - start),
        "loss_first3": float(np.mean(losses[:3])),
        "loss_last3": float(np.mean(losses[-3:])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of folder datasets")
    parser.add_argument("--out", type=Path, default=Path("."), help="where gpu_check.json goes")
    parser.add_argument("--steps", type=int, default=40, help="KD training steps per run")
    parser.add_argument(
        "--backbones", default="resnet50,resnet18,efficientnet-lite0", help="comma-separated"
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="smoke-test the script on a CPU (fp32 only)"
    )
    args = parser.parse_args(argv)

    device = resolve_device("auto")
    report: dict[str, Any] = {"torch": torch.__version__, "device": describe_device(device)}
    print(f"torch {torch.__version__}, auto device: {report['device']}")
    try:
        resolve_device(f"cuda:{torch.cuda.device_count()}")
        report["missing_device_refused"] = False
    except DeviceError as exc:
        report["missing_device_refused"] = str(exc)
    if device.type != "cuda" and not args.allow_cpu:
        print("no CUDA device: nothing to check (use --allow-cpu for a smoke test)")
        return 1
    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    precisions = ("fp32", "fp16") if device.type == "cuda" else ("fp32",)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    data = load_tiles(args.data, 256)
    print(
        f"{data[0].shape[0]} real 256 px tile pairs, {int(data[2].flatten(1).any(1).sum())} with change"
    )

    report["kd_training"] = [
        train_kd(name, data, device, precision, args.steps)
        for name in backbones
        for precision in precisions
    ]
    report["msi"] = []
    for name in backbones[:1] + [b for b in backbones[1:] if b == "efficientnet-lite0"]:
        fp32, ref = msi_throughput(name, data, device, amp=False)
        amp, approx = msi_throughput(name, data, device, amp=True)
        amp["rel_error_vs_fp32"] = float((approx - ref).norm() / ref.norm().clamp_min(1e-12))
        report["msi"] += [fp32, amp]
    report["detector"] = (
        [detector_throughput(n, data, device) for n in backbones[:2]]
        if device.type == "cuda"
        else []
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print("\nKD-MSI training (batch 8, 256 px)")
    for row in report["kd_training"]:
        print(
            f"  {row['backbone']:18s} {row['precision']:5s} {row['pairs_per_s']:8.1f} pairs/s  "
            f"loss {row['loss_first5']:.3f} -> {row['loss_last5']:.3f}  finite={row['finite']}"
        )
    print("MSI inference (scales 0.5,1,1.5,2 + flips, batch 16, 256 px)")
    for row in report["msi"]:
        err = row.get("rel_error_vs_fp32")
        print(
            f"  {row['backbone']:18s} amp={row['amp']!s:5s} {row['tiles_per_s']:8.1f} tiles/s "
            f"{row['megapixels_per_s']:7.1f} MP/s" + (f"  rel.err {err:.2e}" if err else "")
        )
    print("Detector training (batch 16, 256 px, fp16)")
    for row in report["detector"]:
        print(
            f"  {row['backbone']:18s} {row['pairs_per_s']:8.1f} pairs/s  "
            f"loss {row['loss_first3']:.3f} -> {row['loss_last3']:.3f}"
        )
    print(f"missing cuda index refused: {report['missing_device_refused']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
