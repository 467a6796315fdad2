"""``make bench``: training and inference throughput, FLOPs, MSI cost, and memory vs scene size.

Runs on the CPU with 2 torch threads (``--threads``) and prints tables; writes
``bench-output/bench.json``. Sections:

1. **Training** (KD-MSI): tile pairs/s of one training step (teacher + student forward,
   ``L_cls + 10 L_kd``, backward, SGD step; :func:`kdmsi_engine.training.kd.kd_losses`) on real
   256 px Landsat tiles, batch 8, for resnet18 and efficientnet-lite0, fp32 vs bf16 autocast;
   FLOPs per tile pair counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward and
   backward of both networks, both dates).
1b. **Engine against plain PyTorch** (issue 14): one KD-MSI step and one detector step,
   ResNet50, batch 8, 256 px real tiles, by the engine (fp32, and bf16 where native) and by the
   yardstick of :mod:`benchmarks.yardstick` (plain PyTorch, fp32, a backbone pass per date,
   default memory format), interleaved in this process (5 runs, medians; ``--runs``); ratios in
   ``bench.json`` (``yardstick_ratios``). ``tests/benchmarks/test_yardstick.py`` checks both
   give the same losses. Each row also has the seconds of its step spent in convolutions
   (profiled), their share of the median, and ``bound_vs_plain``, the ratio the engine would
   reach if nothing but its convolutions took time. Also: ResNet50 MSI seconds per tile at
   batch 1 and 4 (``msi_batches``), and ``kdmsi detect``'s predict stage against its model
   alone on the same windows of a 2048 px six-band scene, 128 px windows, overlap 32
   (``detect_overhead``).
   ``--only-yardstick`` runs only these.
2. **Inference**: tiles/s and megapixels/s of the student map (one scale) and of MSI (scales
   0.5, 1, 1.5, 2 with horizontal flips) at 256 px, bf16 autocast (the engine's default), with
   FLOPs per tile. MSI's floor relative to one-scale inference: it runs the network on
   ``2 * sum(s^2) = 2 * 7.5 = 15`` tile-equivalents of pixels (each of the 4 scales on the pair
   and on its flip) against 1 for the one-scale student map, so 15x FLOPs (7.5x relative to a
   one-scale inference *with* a flip). Convolutions are linear in pixels, so the FLOP ratio sits
   at the floor; the table shows how close the measured time ratio comes.
3. **Memory** (issue 6): peak RSS of ``kdmsi infer``, ``kdmsi detect`` (random-weight
   efficientnet-lite0 DeepLabV3+, ``--scales 0.25``, ``--threshold 0.50006``) and ``kdmsi
   vectorize`` (of detect's sparse change raster) on a 2048 x 2048 and an 8192 x 8192 scene, VRTs repeating the real
   Landsat Taizhou pair (A as before, B as after), each job in its own subprocess, its peak
   RSS read with ``os.wait4``.
   Same settings for both sizes: a random-weight efficientnet-lite0 model, 256 px windows,
   overlap 32, batch 4, ``--method msi --scales 0.25`` (the network sees each window and its
   flip at 64 px: 1/8 of the one-scale compute, so the 67-megapixel scene takes minutes, not
   a quarter of an hour, on 2 cores; reading, blending and writing, the parts that could grow
   with the scene, are the same for every method).

Usage: ``python -m benchmarks.bench [--quick] [--skip-memory] [--only-yardstick] [--runs N]
[--out bench-output]``. The process gets the command line's settings first
(:func:`kdmsi_engine.environment.configure_process`), so the yardstick shares them.
``--pseudo-study MODEL`` instead compares pseudo-label thresholds (0.3 vs auto) on OSCD.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import subprocess  # nosec B404
import sys
import time
from pathlib import Path
from typing import Any

from kdmsi_engine.environment import configure_process

# the command line's process settings (OpenMP threads that sleep, the allocator), set before
# torch loads its OpenMP runtime; the engine's steps and the yardstick share them
configure_process()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdmsi_engine.device import CPU_PRECISION_ENV  # noqa: E402

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LANDSAT = DATA / "landsat-taizhou-nanjing"
SCALES = (0.5, 1.0, 1.5, 2.0)
TILE = 256


# --------------------------------------------------------------------------- helpers
def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def real_tiles(n: int, tile: int = TILE, bands: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """``n`` real tile pairs (Landsat Nanjing and Taizhou), scaled to [0, 1]."""
    from rasterio.windows import Window

    from kdmsi_engine.data.scene import ScenePair

    befores, afters, valids = [], [], []
    for site in ("nanjing", "taizhou"):
        with ScenePair.open(
            LANDSAT / "A" / f"{site}.tif", LANDSAT / "B" / f"{site}.tif", bands=bands
        ) as scene:
            g = scene.grid
            for r in range(0, g.height - tile + 1, tile):
                for c in range(0, g.width - tile + 1, tile):
                    w = scene.read(Window(c, r, tile, tile))
                    befores.append(w.before)
                    afters.append(w.after)
                    valids.append(w.valid)
                    if len(befores) == n:
                        break
                if len(befores) == n:
                    break
        if len(befores) == n:
            break
    while len(befores) < n:  # repeat if the scenes hold fewer tiles
        befores.append(befores[len(befores) % 9])
        afters.append(afters[len(afters) % 9])
        valids.append(valids[len(valids) % 9])
    return {
        "before": torch.from_numpy(np.stack(befores)),
        "after": torch.from_numpy(np.stack(afters)),
        "valid": torch.from_numpy(np.stack(valids)),
        "labels": torch.tensor([1.0, 0.0] * (n // 2) + [1.0] * (n % 2)),
    }


def _networks(backbone: str, in_channels: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models

    torch.manual_seed(0)
    return build_kdmsi_models(architecture(backbone, in_channels), weights="none")


def _flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _timed(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


# --------------------------------------------------------------------------- 1. training
def _train_forward(nets: tuple[Any, Any, Any], b: dict[str, Any]) -> None:
    """The forward half of a training step (teacher and student on both dates, the losses)."""
    from kdmsi_engine.training.kd import kd_losses

    teacher, student, _ = nets
    kd_losses(teacher, student, b["before"], b["after"], b["labels"], b["valid"])


def _train_step(nets: tuple[Any, Any, Any], b: dict[str, Any], precision: str) -> None:
    """One KD-MSI training step as ``kdmsi train`` runs it (kd_losses, backward, SGD)."""
    from kdmsi_engine.training.kd import kd_losses

    teacher, student, opt = nets
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        losses = kd_losses(teacher, student, b["before"], b["after"], b["labels"], b["valid"])
    losses.total.backward()
    opt.step()


def bench_training(quick: bool, force_bf16: bool = False) -> list[dict[str, Any]]:
    batch = real_tiles(8)
    rows = []
    backbones = ("resnet18", "efficientnet-lite0") if not quick else ("efficientnet-lite0",)
    for backbone in backbones:
        teacher, student = _networks(backbone)
        teacher.train()
        student.train()
        params = list(teacher.parameters()) + list(student.parameters())
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

        one = {k: v[:1] for k, v in batch.items()}
        nets = (teacher, student, opt)
        # FLOPs: 3x the forward count of the step (backward ~ 2x forward). torch's
        # FlopCounterMode counts a grouped (depthwise) convolution's backward as a dense one
        # (66x too many for a 64-channel depthwise 3x3), which would inflate efficientnet-lite0.
        with torch.no_grad():
            flops = 3 * _flops(functools.partial(_train_forward, nets, one))
        _train_step(nets, one, "fp32")  # warm-up
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not (_bf16() or force_bf16):
                # without AVX512-BF16/AMX, bf16 autocast is emulated: measured here once,
                # resnet18 batch 2 took 295 s a step (0.007 pairs/s, ~40x slower than fp32)
                rows.append(
                    {"backbone": backbone, "precision": "bf16", "skipped": "no native bf16"}
                )
                print(_row(rows[-1]), flush=True)
                continue
            if precision != "fp32":
                _train_step(nets, one, precision)
            size = 8
            part = {k: v[:size] for k, v in batch.items()}
            run = functools.partial(_train_step, nets, part, precision)
            seconds = _timed(run, repeats=1, warmup=0)
            rows.append(
                {
                    "backbone": backbone,
                    "precision": precision,
                    "batch": size,
                    "tile": TILE,
                    "seconds_per_step": round(seconds, 3),
                    "tile_pairs_per_s": round(size / seconds, 3),
                    "gflops_per_tile_pair": round(flops / 1e9, 2),
                    "achieved_gflops_s": round(size * flops / seconds / 1e9, 1),
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- 1b. yardstick
def engine_kd_step(nets: tuple[Any, Any, Any], b: dict[str, Any], precision: str) -> float:
    """The engine's KD-MSI step (:func:`kdmsi_engine.training.losses.train_step`); its loss."""
    from kdmsi_engine.training.losses import train_step

    teacher, student, opt = nets
    values = train_step(
        teacher, student, opt, b["before"], b["after"], b["labels"], b["valid"],
        precision=precision,
    )  # fmt: skip
    return values["loss"]


def engine_detector_step(model: Any, opt: Any, b: dict[str, Any], precision: str) -> float:
    """The engine's detector step (the forward under autocast, the loss in float32, SGD)."""
    from kdmsi_engine.training.detector import detector_loss
    from kdmsi_engine.training.losses import training_autocast

    opt.zero_grad(set_to_none=True)
    with training_autocast(torch.device("cpu"), precision):
        logits = model(b["before"], b["after"])
    loss = detector_loss(logits, b["pixels"])
    loss.backward()
    opt.step()
    return float(loss.detach())


def _prepare(*nets: Any) -> None:
    """The engine's preparation for training on the CPU (train mode, memory format)."""
    from kdmsi_engine.training.losses import prepare_for_training

    for net in nets:
        prepare_for_training(net, torch.device("cpu"))


def _interleaved(fns: dict[Any, Any], runs: int) -> dict[Any, float]:
    """Median seconds of each function, run in turn ``runs`` times after one warm-up each."""
    import statistics

    for fn in fns.values():
        fn()
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


#: the operators of a convolution's forward and backward passes on the CPU (oneDNN)
CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def profile_convolutions(fn: Any, calls: int = 2) -> tuple[float, float]:
    """``(convolution seconds, operator seconds)`` of one call, profiled; the least of ``calls``.

    The convolutions do the same arithmetic in the engine and the plain step, and run in
    oneDNN near the CPU's peak; the rest (BatchNorm, ReLU, additions, the optimizer) is what
    an implementation can shrink. So ``plain / convolution seconds`` bounds the engine's
    speed-up over the plain step if everything but its convolutions took no time.

    The bound uses the convolutions' own seconds, not their share of a profiled call: in the
    interleaved bench the operators around them slow down by up to half from one call to the
    next (page faults on freshly mapped buffers), which shrank the share and once overstated
    the float32 KD bound as 1.8x where it is 1.5x.
    """
    from torch.profiler import ProfilerActivity, profile

    def profiled() -> tuple[float, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        conv = sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTION_OPS) / 1e6
        return conv, total

    return min(profiled() for _ in range(calls))


def _ratio_rows(
    step: str,
    backbone: str,
    size: int,
    medians: dict[str, float],
    runs: int,
    convolutions: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    plain = medians["plain fp32"]
    rows = []
    for name, seconds in medians.items():
        rows.append(
            {
                "step": step,
                "backbone": backbone,
                "implementation": name,
                "batch": size,
                "tile": TILE,
                "runs": runs,
                "median_seconds_per_step": round(seconds, 3),
                "speed_vs_plain": round(plain / seconds, 2),
            }
        )
        if convolutions and name in convolutions:
            conv = convolutions[name]
            rows[-1]["convolution_seconds"] = round(conv, 3)
            rows[-1]["convolution_share"] = round(conv / seconds, 3)
            rows[-1]["bound_vs_plain"] = round(plain / conv, 2)
        print(_row(rows[-1]), flush=True)
    return rows


def bench_yardstick(
    runs: int,
    steps: tuple[str, ...] = ("kd", "detector"),
    backbone: str = "resnet50",
    size: int = 8,
) -> list[dict[str, Any]]:
    """The engine's KD-MSI and detector steps against the plain ones, interleaved (issue 14)."""
    batch = real_tiles(size)
    # pixel labels for the detector: change where the dates differ most (about a tenth)
    diff = (batch["after"] - batch["before"]).abs().mean(dim=1)
    batch["pixels"] = (diff > diff.quantile(0.9)).to(torch.uint8)
    precisions = ("fp32", "bf16") if _bf16() else ("fp32",)
    rows = _yardstick_kd(runs, backbone, batch, precisions) if "kd" in steps else []
    if "detector" in steps:
        rows += _yardstick_detector(runs, backbone, batch, precisions)
    return rows


def _yardstick_kd(
    runs: int, backbone: str, batch: dict[str, Any], precisions: tuple[str, ...]
) -> list[dict[str, Any]]:
    from benchmarks.yardstick import plain_kd_networks, plain_kd_step

    teacher, student = _networks(backbone)
    p_teacher, p_student, p_opt = plain_kd_networks(teacher, student)
    p_teacher.train()
    p_student.train()
    _prepare(teacher, student)
    opt = torch.optim.SGD(
        list(teacher.parameters()) + list(student.parameters()), lr=1e-4, momentum=0.9
    )
    fns: dict[str, Any] = {
        "plain fp32": functools.partial(plain_kd_step, p_teacher, p_student, p_opt, batch)
    }
    for precision in precisions:
        fns[f"engine {precision}"] = functools.partial(
            engine_kd_step, (teacher, student, opt), batch, precision
        )
    medians = _interleaved(fns, runs)
    convolutions = {name: profile_convolutions(fn)[0] for name, fn in fns.items()}
    return _ratio_rows("kd", backbone, len(batch["labels"]), medians, runs, convolutions)


def _yardstick_detector(
    runs: int, backbone: str, batch: dict[str, Any], precisions: tuple[str, ...]
) -> list[dict[str, Any]]:
    from benchmarks.yardstick import PlainSiameseDeepLab, plain_detector_step
    from kdmsi_engine.models.deeplab import build_detector

    torch.manual_seed(0)
    detector = build_detector(backbone, in_channels=3)
    plain = PlainSiameseDeepLab(detector).train()
    p_opt = torch.optim.SGD(plain.parameters(), lr=1e-4, momentum=0.9)
    _prepare(detector)
    opt = torch.optim.SGD(detector.parameters(), lr=1e-4, momentum=0.9)
    fns: dict[str, Any] = {
        "plain fp32": functools.partial(plain_detector_step, plain, p_opt, batch)
    }
    for precision in precisions:
        fns[f"engine {precision}"] = functools.partial(
            engine_detector_step, detector, opt, batch, precision
        )
    medians = _interleaved(fns, runs)
    convolutions = {name: profile_convolutions(fn)[0] for name, fn in fns.items()}
    return _ratio_rows("detector", backbone, len(batch["labels"]), medians, runs, convolutions)


def bench_msi_batches(runs: int, backbone: str = "resnet50") -> list[dict[str, Any]]:
    """MSI seconds per 256 px tile at batch 1 and 4, interleaved (a larger batch not slower)."""
    from kdmsi_engine.inference.maps import msi_map, prepare_for_inference

    tiles = real_tiles(4)
    _, student = _networks(backbone)
    student = prepare_for_inference(student)
    precisions = (("bf16", True), ("fp32", False)) if _bf16() else (("fp32", False),)
    fns = {
        (name, size): functools.partial(
            msi_map, student, tiles["before"][:size], tiles["after"][:size], SCALES, amp=amp
        )
        for name, amp in precisions
        for size in (1, 4)
    }
    medians = _interleaved(fns, runs)
    rows = []
    for (precision, size), seconds in medians.items():
        rows.append(
            {
                "backbone": backbone,
                "method": "msi",
                "precision": precision,
                "batch": size,
                "runs": runs,
                "seconds_per_tile": round(seconds / size, 3),
            }
        )
        print(_row(rows[-1]), flush=True)
    return rows


def bench_detect_overhead(
    out_dir: Path,
    runs: int,
    size: int = 2048,
    tile: int = 128,
    overlap: int = 32,
    batch: int = 4,
    backbone: str = "efficientnet-lite0",
) -> dict[str, Any]:
    """``kdmsi detect``'s predict stage against its model alone on the same windows.

    A random-weight six-band detector (the demo's backbone) over a ``size`` px VRT repeating the
    real Taizhou pair. *Predict* is :func:`~kdmsi_engine.inference.sliding.predict_scene` as
    ``detect`` runs it (reading, scaling, the model, blending, writing); *model alone* is the
    sum of the predictor's calls on the same batches, read beforehand and not timed. Run in
    turn ``runs`` times; medians.
    """
    import statistics

    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.detect import make_detector_predictor
    from kdmsi_engine.inference.maps import prepare_for_inference
    from kdmsi_engine.inference.sliding import predict_scene, scene_windows
    from kdmsi_engine.models.deeplab import build_detector

    work = out_dir / "detect-overhead"
    work.mkdir(parents=True, exist_ok=True)
    before = mosaic_vrt(LANDSAT / "A" / "taizhou.tif", size, work / f"before-{size}.vrt")
    after = mosaic_vrt(LANDSAT / "B" / "taizhou.tif", size, work / f"after-{size}.vrt")
    torch.manual_seed(0)
    predictor = make_detector_predictor(
        prepare_for_inference(build_detector(backbone, in_channels=6))
    )
    windows = [w for strip in scene_windows(size, size, tile, overlap) for w in strip]
    times: dict[str, list[float]] = {"predict": [], "model": []}
    with ScenePair.open(before, after) as scene:
        for run in range(runs + 1):  # the first is a warm-up
            model = 0.0
            for first in range(0, len(windows), batch):
                reads = [scene.read(w) for w in windows[first : first + batch]]
                b = torch.from_numpy(np.stack([r.before for r in reads]))
                a = torch.from_numpy(np.stack([r.after for r in reads]))
                start = time.perf_counter()
                with torch.no_grad():
                    predictor(b, a)
                model += time.perf_counter() - start
            start = time.perf_counter()
            predict_scene(
                scene, predictor, work / "probability.tif", tile_size=tile, overlap=overlap,
                batch_size=batch, overwrite=True,
            )  # fmt: skip
            if run:
                times["predict"].append(time.perf_counter() - start)
                times["model"].append(model)
    predict_s, model_s = (statistics.median(times[k]) for k in ("predict", "model"))
    row = {
        "backbone": backbone,
        "scene": size,
        "bands": 6,
        "tile": tile,
        "overlap": overlap,
        "batch": batch,
        "windows": len(windows),
        "computed_pixels_ratio": round(len(windows) * tile * tile / (size * size), 3),
        "runs": runs,
        "predict_seconds": round(predict_s, 2),
        "model_alone_seconds": round(model_s, 2),
        "predict_over_model": round(predict_s / model_s, 3),
    }
    print(_row(row), flush=True)
    return row


# --------------------------------------------------------------------------- 2. inference
def bench_inference(quick: bool) -> list[dict[str, Any]]:
    from kdmsi_engine.inference.maps import msi_map, prepare_for_inference, student_map

    batch = real_tiles(4)
    b, a = batch["before"], batch["after"]
    rows = []
    backbones = ("resnet18", "efficientnet-lite0") if not quick else ("efficientnet-lite0",)
    for backbone in backbones:
        _, student = _networks(backbone)
        student = prepare_for_inference(student)
        one = functools.partial(student_map, student, b[:1], a[:1], amp=False)
        msi = functools.partial(msi_map, student, b[:1], a[:1], SCALES, amp=False)
        f_one, f_msi = _flops(one), _flops(msi)  # also the warm-up (fp32 path)
        if _bf16():  # warm the autocast path the engine uses
            student_map(student, b[:1], a[:1])
        t_one = _timed(functools.partial(student_map, student, b, a), 1, warmup=0) / len(b)
        t_msi = _timed(functools.partial(msi_map, student, b[:2], a[:2], SCALES), 1, 0) / 2
        mpx = TILE * TILE / 1e6
        for method, t, f in (("student", t_one, f_one), ("msi", t_msi, f_msi)):
            rows.append(
                {
                    "backbone": backbone,
                    "method": method,
                    "precision": "bf16" if _bf16() else "fp32",
                    "tile": TILE,
                    "seconds_per_tile": round(t, 4),
                    "tiles_per_s": round(1 / t, 3),
                    "megapixels_per_s": round(mpx / t, 3),
                    "gflops_per_tile": round(f / 1e9, 2),
                }
            )
            print(_row(rows[-1]), flush=True)
        rows.append(
            {
                "backbone": backbone,
                "method": "msi/student",
                "flops_ratio": round(f_msi / f_one, 2),
                "time_ratio": round(t_msi / t_one, 2),
                "pixel_floor": 2 * sum(s * s for s in SCALES),
            }
        )
        print(_row(rows[-1]), flush=True)
    return rows


def _auto_precision() -> str:
    """What ``--precision auto`` trains in on this CPU (and ``KDMSI_CPU_PRECISION``)."""
    from kdmsi_engine.training.losses import resolve_precision

    return resolve_precision("auto", torch.device("cpu"))


def _bf16() -> bool:
    from kdmsi_engine.device import cpu_supports_bf16

    return cpu_supports_bf16()


# --------------------------------------------------------------------------- 3. memory
def mosaic_vrt(source: Path, size: int, out: Path) -> Path:
    """A ``size`` x ``size`` VRT tiling ``source`` (all bands) edge to edge, georeferenced."""
    import rasterio

    with rasterio.open(source) as src:
        w, h, count = src.width, src.height, src.count
        t = src.transform
        dtype = {"uint8": "Byte", "uint16": "UInt16"}[src.dtypes[0]]
        crs_wkt = src.crs.to_wkt()
    lines = [
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">',
        f"  <SRS>{_xml(crs_wkt)}</SRS>",
        f"  <GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>",
    ]
    for band in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{dtype}" band="{band}">')
        for row in range(0, size, h):
            for col in range(0, size, w):
                cw, ch = min(w, size - col), min(h, size - row)
                lines += [
                    "    <SimpleSource>",
                    f'      <SourceFilename relativeToVRT="0">{_xml(str(source))}</SourceFilename>',
                    f"      <SourceBand>{band}</SourceBand>",
                    f'      <SrcRect xOff="0" yOff="0" xSize="{cw}" ySize="{ch}"/>',
                    f'      <DstRect xOff="{col}" yOff="{row}" xSize="{cw}" ySize="{ch}"/>',
                    "    </SimpleSource>",
                ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _xml(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


#: A tiny launcher: runs the job, reads the job's own rusage with os.wait4, writes it as JSON.
#: It keeps the measured job a child of a small process: a child forked straight from this
#: (large) benchmark process would inherit its resident-set high-water mark through fork/exec.
_LAUNCHER = (
    "import json, os, subprocess, sys, time\n"
    "t = time.time()\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "rc = os.waitstatus_to_exitcode(status)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'rc': rc, 'maxrss_kb': usage.ru_maxrss, 'seconds': time.time() - t}, f)\n"
)


def run_measured(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``args`` in a subprocess; return exit code, seconds and its own peak RSS (MB)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        out_path, err_path = Path(tmp) / "out.txt", Path(tmp) / "err.txt"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            launcher = [sys.executable, "-c", _LAUNCHER, str(report), *args]
            subprocess.run(launcher, stdout=out, stderr=err, env=env, check=False)  # nosec B603
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace").strip()
        usage = json.loads(report.read_text()) if report.exists() else {}
    return {
        "returncode": usage.get("rc"),
        "seconds": round(float(usage.get("seconds", 0.0)), 1),
        "peak_rss_mb": round(usage.get("maxrss_kb", 0) / 1024.0, 1),  # Linux: kilobytes
        "stderr_tail": stderr.splitlines()[-1] if stderr else "",
        "stdout": stdout,
    }


def bench_memory(out_dir: Path, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    from kdmsi_engine.data.scaling import BandScaling
    from kdmsi_engine.modelfile import save_model
    from kdmsi_engine.models.kdmsi import MODEL_KIND, architecture

    work = out_dir / "memory"
    work.mkdir(parents=True, exist_ok=True)
    arch = architecture("efficientnet-lite0", 3)
    teacher, student = _networks("efficientnet-lite0")
    model = work / "random-effnet.kdmsi"
    meta = {
        "kind": MODEL_KIND,
        "architecture": arch,
        "bands": [1, 2, 3],
        "num_bands": 3,
        "scaling": BandScaling.uint8(3).to_dict(),
        "tile_size": TILE,
        "note": "random weights, for the memory benchmark only",
    }
    save_model(
        model,
        meta,
        {"teacher": teacher.state_dict(), "student": student.state_dict()},
        overwrite=True,
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    rows = []
    for size in sizes:
        before = mosaic_vrt(LANDSAT / "A" / "taizhou.tif", size, work / f"before-{size}.vrt")
        after = mosaic_vrt(LANDSAT / "B" / "taizhou.tif", size, work / f"after-{size}.vrt")
        prob = work / f"prob-{size}.tif"
        args = [
            sys.executable,
            "-m",
            "kdmsi_engine",
            "infer",
            str(before),
            str(after),
            "--model",
            str(model),
            "-o",
            str(prob),
            "--method",
            "student",
            "--tile-size",
            str(TILE),
            "--overlap",
            "32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--progress",
            "none",
            "--overwrite",
        ]
        result = run_measured(args, env)
        rows.append({"job": "infer", "size": size, **_strip(result)})
        print(_row(rows[-1]), flush=True)
        rows += _other_jobs(work, size, before, after, prob, env)
    return rows


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "stdout"}


def _detector_model(work: Path) -> Path | None:
    """A random-weight efficientnet-lite0 detector file, when DETECT's code exists."""
    try:
        from kdmsi_engine.models.deeplab import DETECTOR_KIND, architecture_dict, build_detector
    except ImportError:
        return None
    from kdmsi_engine.data.scaling import BandScaling
    from kdmsi_engine.modelfile import save_model

    path = work / "random-detector.kdmsi"
    torch.manual_seed(0)
    net = build_detector("efficientnet-lite0", in_channels=3)
    meta = {
        "kind": DETECTOR_KIND,
        "architecture": architecture_dict("efficientnet-lite0", 3),
        "bands": [1, 2, 3],
        "num_bands": 3,
        "scaling": BandScaling.uint8(3).to_dict(),
        "tile_size": TILE,
        "training": {"note": "random weights, for the memory benchmark only"},
    }
    save_model(path, meta, {"detector": net.state_dict()}, overwrite=True)
    return path


def _other_jobs(
    work: Path, size: int, before: Path, after: Path, prob: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    """``detect`` and ``vectorize`` with the same window settings, when DETECT's code exists.

    A random-weight detector gives probabilities of 0.5000x everywhere; ``--threshold 0.50006``
    (about the 99.9th percentile) turns them into a sparse, speckled change raster, a hard case
    for ``vectorize`` (many small polygons), instead of one scene-sized polygon.
    """
    import importlib

    rows: list[dict[str, Any]] = []
    detector = _detector_model(work)
    if detector is not None:
        args = [
            sys.executable, "-m", "kdmsi_engine", "detect", str(before), str(after),
            "--model", str(detector), "-o", str(work / f"detect-{size}"),
            "--tile-size", str(TILE), "--overlap", "32", "--batch-size", "4",
            "--scales", "0.25", "--threshold", "0.50006", "--device", "cpu", "--progress", "none",
            "--overwrite",
        ]  # fmt: skip
        result = run_measured(args, env)
        rows.append({"job": "detect", "size": size, **_strip(result)})
        print(_row(rows[-1]), flush=True)
    try:
        importlib.import_module("kdmsi_engine.vectorize")
    except ImportError:
        return rows
    # the detector's sparse change raster (see the threshold above), else infer's map at 0.5
    classes = work / f"detect-{size}" / "change.tif"
    if not classes.exists():
        if not prob.exists():
            return rows
        from kdmsi_engine.rasterio_out import write_uint8_classes

        classes = work / f"change-{size}.tif"
        write_uint8_classes(prob, classes, 0.5, overwrite=True)
    args = [
        sys.executable, "-m", "kdmsi_engine", "vectorize", str(classes), "-o",
        str(work / f"changes-{size}.gpkg"), "--progress", "none", "--overwrite",
    ]  # fmt: skip
    result = run_measured(args, env)
    rows.append({"job": "vectorize", "size": size, **_strip(result)})
    print(_row(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- output
def _row(record: dict[str, Any]) -> str:
    return "  " + "  ".join(f"{k}={v}" for k, v in record.items() if k != "stderr_tail" or v)


def _table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> str:
    rows = [r for r in rows if all(k in r for k in keys)]
    if not rows:
        return ""
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = [title, "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdmsi-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench-output"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one backbone")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--bf16-anyway", action="store_true", help="time bf16 training even without native bf16"
    )
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument(
        "--only-yardstick", action="store_true", help="only the engine vs plain PyTorch steps"
    )
    parser.add_argument("--skip-yardstick", action="store_true")
    parser.add_argument("--yardstick", default="kd,detector", help="steps compared")
    parser.add_argument("--runs", type=int, default=0, help="interleaved runs (default 5)")
    parser.add_argument("--sizes", default="2048,8192", help="memory scene sizes")
    parser.add_argument("--pseudo-study", metavar="MODEL", help="threshold study (see docs)")
    parser.add_argument("--study-method", default="msi", help="map of the threshold study")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.pseudo_study:
        from benchmarks.threshold_study import run_study

        return run_study(Path(args.pseudo_study), out_dir, method=args.study_method)
    started = time.perf_counter()
    previous: dict[str, Any] = {}
    if (args.only_memory or args.only_yardstick) and (out_dir / "bench.json").is_file():
        previous = json.loads((out_dir / "bench.json").read_text(encoding="utf-8"))
    record: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_native": _bf16(),
        "training_precision_auto": _auto_precision(),
        "load_average_start": _load(),
    }
    print(f"KD-MSI bench: {record}", flush=True)
    for key in ("training", "inference", "yardstick", "msi_batches", "detect_overhead"):
        if key in previous:
            record[key] = previous[key]
    if not (args.only_memory or args.skip_yardstick):
        print("\n[yardstick] engine vs plain PyTorch step, resnet50, 256 px, batch 8", flush=True)
        record["yardstick"] = bench_yardstick(
            args.runs or (2 if args.quick else 5), tuple(args.yardstick.split(","))
        )
        record["yardstick_ratios"] = {
            f"{r['step']} {r['implementation']}": r["speed_vs_plain"] for r in record["yardstick"]
        }
        print("\n[detect overhead] predict stage vs the model alone, same windows", flush=True)
        record["detect_overhead"] = bench_detect_overhead(
            out_dir, args.runs or (1 if args.quick else 3)
        )
        print("\n[msi batches] resnet50 MSI per 256 px tile, batch 1 vs 4", flush=True)
        record["msi_batches"] = bench_msi_batches(args.runs or (2 if args.quick else 5))
    if not (args.only_memory or args.only_yardstick):
        print("\n[training] KD-MSI step, 256 px, batch 8", flush=True)
        record["training"] = bench_training(args.quick, args.bf16_anyway)
        print(
            "\n[inference] 256 px tiles, student (1 scale) vs MSI (0.5,1,1.5,2 + flips)", flush=True
        )
        record["inference"] = bench_inference(args.quick)
    if not (args.skip_memory or args.only_yardstick):
        sizes = tuple(int(s) for s in args.sizes.split(","))
        print(f"\n[memory] peak RSS of jobs on {sizes} px scenes", flush=True)
        record["memory"] = bench_memory(out_dir, sizes)
        for job in ("infer", "detect", "vectorize"):
            rss = {r["size"]: r["peak_rss_mb"] for r in record["memory"] if r["job"] == job}
            if len(rss) >= 2:
                lo, hi = rss[min(rss)], rss[max(rss)]
                record[f"memory_growth_{job}"] = round(hi / lo - 1.0, 3)
    record["load_average_end"] = _load()
    record["seconds"] = round(time.perf_counter() - started, 1)
    print()
    for title, key, keys in (
        (
            "Engine vs plain PyTorch (interleaved in this process; medians)",
            "yardstick",
            [
                "step",
                "backbone",
                "implementation",
                "batch",
                "median_seconds_per_step",
                "speed_vs_plain",
                "convolution_seconds",
                "convolution_share",
                "bound_vs_plain",
            ],
        ),
        (
            "MSI per tile by batch size (interleaved; medians)",
            "msi_batches",
            ["backbone", "precision", "batch", "seconds_per_tile"],
        ),
        (
            "Training throughput (CPU)",
            "training",
            [
                "backbone",
                "precision",
                "batch",
                "tile_pairs_per_s",
                "seconds_per_step",
                "gflops_per_tile_pair",
                "achieved_gflops_s",
            ],
        ),
        (
            "Inference throughput (CPU)",
            "inference",
            [
                "backbone",
                "method",
                "precision",
                "tiles_per_s",
                "megapixels_per_s",
                "gflops_per_tile",
            ],
        ),
        (
            "MSI cost relative to one-scale inference",
            "inference",
            ["backbone", "flops_ratio", "time_ratio", "pixel_floor"],
        ),
        (
            "Peak RSS by scene size",
            "memory",
            ["job", "size", "peak_rss_mb", "seconds", "returncode"],
        ),
    ):
        text = _table(title, record.get(key, []), keys)
        if text:
            print(text + "\n")
    for job in ("infer", "detect", "vectorize"):
        if f"memory_growth_{job}" in record:
            print(
                f"{job} peak RSS growth, smallest -> largest scene: "
                f"{record[f'memory_growth_{job}']:+.1%} (issue 6 asks < 30 %)"
            )
    native = "native bf16" if record["bf16_native"] else "no native bf16"
    print(
        f"training precision 'auto' on this CPU ({native}): {record['training_precision_auto']}"
        f" (force with {CPU_PRECISION_ENV}=fp32|bf16)"
    )
    (out_dir / "bench.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"written {out_dir / 'bench.json'} in {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
