"""The ``detect`` job: a trained change detector over a whole scene pair.

:func:`detect_scene` writes into ``OUTDIR``:

* ``change_probability.tif``: float32 probability of the change class (softmax of the
  detector), nodata -1 where the input had no data; overlapping windows blended
  (:func:`kdmsi_engine.inference.sliding.predict_scene`), optional test-time augmentation (mean
  of the probabilities over ``scales`` and, with ``flip``, horizontally flipped pairs);
* ``change.tif``: uint8, 1 change (probability > ``threshold``), 0 none, 255 nodata, with a
  colour table (:func:`kdmsi_engine.rasterio_out.write_uint8_classes`);
* ``changes.gpkg``: change polygons (:func:`kdmsi_engine.vectorize.vectorize_changes`);
* ``run.json``: inputs, model, parameters, versions, device, timings and outputs.

All are tiled, compressed GeoTIFFs with overviews on the scene grid, written window by window
and atomically; every output is checked first, so existing outputs are refused at once unless
``overwrite`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output, check_output_dir, write_text_atomic
from kdmsi_engine.device import autocast, describe_device, resolve_device
from kdmsi_engine.errors import InputError, ModelFileError, RasterError
from kdmsi_engine.inference.maps import parse_scales as _parse_scales
from kdmsi_engine.inference.maps import prepare_for_inference
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import DetectRecord

logger = logging.getLogger(__name__)

PROBABILITY_NAME = defaults.PROBABILITY_NAME
CHANGE_NAME = defaults.CHANGE_NAME
CHANGES_NAME = defaults.CHANGES_NAME
RECORD_NAME = defaults.RECORD_NAME
#: The detector's own probability when ``change_probability.tif`` is a fused map.
DETECTOR_PROBABILITY_NAME = defaults.DETECTOR_PROBABILITY_NAME
OUTPUT_NAMES = {
    "change_probability": PROBABILITY_NAME,
    "change": CHANGE_NAME,
    "changes": CHANGES_NAME,
    "run": RECORD_NAME,
}


def parse_scales(value: str | Sequence[float] | None) -> tuple[float, ...]:
    """Detection scales (default ``(1.0,)``: no test-time scaling)."""
    return _parse_scales(value, default=(1.0,))


def make_detector_predictor(
    model: torch.nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False
) -> Any:
    """``predict(before, after) -> (B,H,W)`` change probability with optional TTA.

    The probability is the mean of the softmax change probability over ``scales`` (both dates
    resized by the same factor, the output resized back) and, with ``flip``, the horizontally
    flipped pair (flipped back).
    """
    scales = tuple(float(s) for s in scales)

    def run(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        before = before.contiguous(memory_format=torch.channels_last)
        after = after.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(before.device):
            logits = model(before, after)
        return torch.softmax(logits.float(), dim=1)[:, 1]

    def predict(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        size = tuple(before.shape[-2:])
        total = torch.zeros(before.shape[0], *size, device=before.device)
        count = 0
        for scale in scales:
            if scale == 1.0:
                b, a = before, after
            else:
                new = (max(16, round(size[0] * scale)), max(16, round(size[1] * scale)))
                b = F.interpolate(before, size=new, mode="bilinear", align_corners=False)
                a = F.interpolate(after, size=new, mode="bilinear", align_corners=False)
            variants = [(b, a, False)] + ([(b.flip(-1), a.flip(-1), True)] if flip else [])
            for vb, va, flipped in variants:
                prob = run(vb, va)
                if flipped:
                    prob = prob.flip(-1)
                if tuple(prob.shape[-2:]) != size:
                    prob = F.interpolate(
                        prob[:, None], size=size, mode="bilinear", align_corners=False
                    )[:, 0]
                total += prob
                count += 1
        return (total / count).clamp(0.0, 1.0)

    return predict


def _versions() -> dict[str, str]:
    import numpy
    import rasterio

    from kdmsi_engine import __version__

    versions = {
        "kdmsi": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
    }
    try:
        import fiona
        import shapely

        versions["shapely"] = shapely.__version__
        versions["fiona"] = fiona.__version__
    except ImportError:  # pragma: no cover - both are engine dependencies
        pass
    try:
        import pyproj

        versions["proj"] = pyproj.proj_version_str
    except ImportError:  # pragma: no cover
        pass
    return versions


def software_versions() -> dict[str, str]:
    """Versions of the engine and the libraries that shape its results (for run records)."""
    import platform

    return {**_versions(), "python": platform.python_version()}


def output_paths(out_dir: Path) -> dict[str, Path]:
    """The files of a detection output folder."""
    return {key: out_dir / name for key, name in OUTPUT_NAMES.items()}


def check_detect_outputs(
    out_dir: str | os.PathLike[str], *, overwrite: bool = False, record: bool = True
) -> dict[str, Path]:
    """Create ``out_dir`` if needed and check that every output can be written."""
    folder = check_output_dir(out_dir)
    paths = output_paths(folder)
    for key, path in paths.items():
        if key == "run" and not record:
            continue
        check_output(path, overwrite=overwrite)
    return paths


def detect_scene(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    threshold: float | str = 0.5,
    scales: str | Sequence[float] | None = None,
    flip: bool = False,
    min_area: float = 0.0,
    simplify: float = 0.0,
    fill_holes: float = 0.0,
    dst_crs: str | None = None,
    scene_name: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    write_record: bool = True,
    unchanged_tiles: Any = None,
    calibration_tiles: Any = None,
    keep_unchanged_out: bool = True,
    unchanged_quantile: float = 0.99,
    fuse_with: str | os.PathLike[str] | None = None,
    fuse_weight: float = 0.5,
    gate_rate: float = 1.0,
    progress: Progress | None = None,
) -> DetectRecord:
    """Detect changes over a scene pair with a trained detector.

    Args:
        before, after: the two dates (the before raster defines the grid).
        model: detector model file (``kdmsi train-detector``).
        out_dir: output folder (created if missing).
        tile_size: window size (default: fitted to the scene by
            :func:`~kdmsi_engine.inference.sliding.fit_window`, between the model's training
            tile size (at least 128) and ``defaults.DETECT_MAX_WINDOW``).
        overlap: window overlap (default: ``defaults.DETECT_OVERLAP`` with a fitted window, a
            quarter of a given window).
        batch_size: windows per forward pass.
        threshold: change where the probability is above it: a number in [0, 1) or ``otsu``
            (Otsu's threshold of the probability map).
        scales: test-time scales (default ``1``; e.g. ``0.75,1,1.25``).
        flip: also average over the horizontally flipped pair.
        min_area, simplify, fill_holes, dst_crs: polygon options (see ``kdmsi vectorize``).
        scene_name: value of the polygons' ``scene`` attribute (default: before file's stem).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace existing outputs.
        write_record: write ``run.json`` (``run`` and ``batch`` write their own).
        unchanged_tiles: optional :class:`~kdmsi_engine.pseudo.TileLabels` on the scene grid:
            they allow the threshold ``unchanged-q`` (the ``unchanged_quantile`` of the
            probabilities on the tiles labelled unchanged) and, with ``keep_unchanged_out``,
            ``change.tif`` is 0 on those tiles (the analyst vouched for them), while
            ``change_probability.tif`` keeps the map's values there.
        calibration_tiles: the tiles whose unchanged ones calibrate the detector's map
            (default: ``unchanged_tiles``), e.g. unchanged tiles it did not train on: they set
            ``unchanged-q`` of the detector's map alone, and its rarity scale when fused.
        fuse_with: optional second change map on the scene grid, not trained on the tiles
            (the calibrated change vector analysis): the detector's probability goes to
            ``detector_probability.tif`` and ``change_probability.tif`` is their fused rarity
            score (:mod:`kdmsi_engine.fusion`): the detector's map on the calibration tiles,
            the other map on all of ``unchanged_tiles``, and ``unchanged-q`` of the fused
            score on all of ``unchanged_tiles`` too (many tiles give a steadier threshold than
            the few held out; the score is three quarters the untrained map by default).
        fuse_weight: with ``fuse_with``, the detector's weight in the fusion (the other map has
            the rest).
        gate_rate: with ``fuse_with``, the score is 0 where that map's value is not rarer on
            the calibration pixels than this rate (1: no veto).
        progress: progress and cancellation.

    Returns:
        the run record (also written to ``run.json``): paths, parameters, timings, polygons.
    """
    # Longer than 80 lines: the job's documented parameters (detection, fusion, keep-out,
    # polygons) and the record it writes; the steps are calls into their modules.
    progress = progress or Progress()
    from kdmsi_engine.inference.scene import check_band_fit, model_bands
    from kdmsi_engine.inference.sliding import check_window_params, fit_window
    from kdmsi_engine.thresholds import parse_threshold_spec, raster_threshold

    spec = parse_threshold_spec(threshold)
    scale_values = parse_scales(scales)
    for path, what in ((before, "before raster"), (after, "after raster")):
        if not Path(path).is_file():
            raise RasterError(f"{what} {path} does not exist; check the path")
    from kdmsi_engine.models.deeplab import load_detector

    net, metadata = load_detector(model)
    bands, count = model_bands(metadata)
    smallest = max(128, int(metadata.get("tile_size") or 256))
    if tile_size:
        tile = int(tile_size)
        lap = int(overlap if overlap is not None else tile // 4)
    else:  # fitted to the scene once it is open
        tile = max(smallest, defaults.DETECT_MAX_WINDOW)
        lap = int(overlap if overlap is not None else defaults.DETECT_OVERLAP)
    check_window_params(tile, lap, batch_size)
    if tile % 16:
        raise InputError(f"window size {tile} must be a multiple of 16 (the detector's stride)")
    paths = check_detect_outputs(out_dir, overwrite=overwrite, record=write_record)
    calibration = calibration_tiles if calibration_tiles is not None else unchanged_tiles
    # the tiles whose unchanged pixels set ``unchanged-q`` of change_probability.tif
    threshold_tiles = calibration
    detector_map = paths["change_probability"]
    if fuse_with is not None:
        if calibration is None:
            raise InputError("fusing change maps needs tiles labelled unchanged to calibrate on")
        # the fused score is mostly the untrained map's: its scale and the threshold from
        # every unchanged tile
        threshold_tiles = unchanged_tiles if unchanged_tiles is not None else calibration
        detector_map = check_output(
            paths["change"].parent / DETECTOR_PROBABILITY_NAME, overwrite=overwrite
        )
    torch_device = resolve_device(device)
    timings: dict[str, float] = {}
    started = time.monotonic()

    from kdmsi_engine.data.scaling import BandScaling
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.inference.sliding import predict_scene
    from kdmsi_engine.rasterio_out import write_uint8_classes
    from kdmsi_engine.vectorize import vectorize_changes

    scaling = BandScaling.from_dict(metadata["scaling"]) if metadata.get("scaling") else None
    check_band_fit(before, after, bands, count, model)
    name = scene_name or Path(before).stem
    with ScenePair.open(before, after, bands=bands, scaling=scaling, name=name) as scene:
        if count is not None and scene.num_bands != count:
            raise ModelFileError(
                f"detector {Path(model).name} was trained on {count} band(s), the scene gives "
                f"{scene.num_bands}; use a detector trained on these rasters' bands"
            )
        if not tile_size:
            tile = fit_window(scene.grid.width, scene.grid.height, smallest, tile, lap)
        net = prepare_for_inference(net, torch_device)
        progress.log(f"device: {describe_device(torch_device)}", device=str(torch_device))
        predictor = make_detector_predictor(net, scale_values, flip)
        predict_scene(
            scene,
            predictor,
            detector_map,
            tile_size=tile,
            overlap=lap,
            batch_size=batch_size,
            device=torch_device,
            overwrite=overwrite,
            progress=progress,
            tags={
                "KDMSI_MODEL": Path(model).name,
                "KDMSI_KIND": "detector",
                "KDMSI_SCALES": ",".join(f"{s:g}" for s in scale_values),
                "KDMSI_FLIP": str(bool(flip)),
            },
        )
        grid_info = scene.grid.to_dict()
        scene_info = scene.describe()
    timings["predict_s"] = round(time.monotonic() - started, 2)
    fusion = None
    if fuse_with is not None:
        from kdmsi_engine.fusion import fuse_maps

        mark = time.monotonic()
        fusion = fuse_maps(
            [detector_map, fuse_with],
            paths["change_probability"],
            [calibration.unchanged_mask, threshold_tiles.unchanged_mask],
            weights=(fuse_weight, 1.0 - fuse_weight),
            gate=1 if gate_rate < 1.0 else None,
            gate_rate=gate_rate,
            overwrite=overwrite,
            progress=progress,
        )
        timings["fuse_s"] = round(time.monotonic() - mark, 2)
    mark = time.monotonic()
    value = raster_threshold(
        paths["change_probability"],
        spec,
        unchanged=threshold_tiles.unchanged_mask if threshold_tiles is not None else None,
        quantile=unchanged_quantile,
    )
    write_uint8_classes(
        paths["change_probability"],
        paths["change"],
        value,
        exclude=(
            unchanged_tiles.unchanged_mask
            if unchanged_tiles is not None and keep_unchanged_out
            else None
        ),
        overwrite=overwrite,
        progress=progress,
    )
    timings["classes_s"] = round(time.monotonic() - mark, 2)
    mark = time.monotonic()
    polygons = vectorize_changes(
        paths["change"],
        paths["changes"],
        probability_path=paths["change_probability"],
        min_area=min_area,
        simplify=simplify,
        fill_holes=fill_holes,
        dst_crs=dst_crs,
        scene=name,
        overwrite=overwrite,
        progress=progress,
    )
    timings["vectorize_s"] = round(time.monotonic() - mark, 2)
    timings["total_s"] = round(time.monotonic() - started, 2)
    record: DetectRecord = {
        "job": "detect",
        "status": "complete",
        "inputs": {
            "before": str(Path(before).absolute()),
            "after": str(Path(after).absolute()),
            "model": str(Path(model).absolute()),
        },
        "scene": scene_info,
        "grid": grid_info,
        "model": {
            "architecture": metadata.get("architecture"),
            "bands": metadata.get("bands"),
            "tile_size": metadata.get("tile_size"),
            "engine_version": metadata.get("engine_version"),
        },
        "parameters": {
            "tile_size": tile,
            "overlap": lap,
            "batch_size": batch_size,
            "threshold": value,
            "threshold_method": spec if isinstance(spec, str) else "fixed",
            "unchanged_tiles_kept_out": unchanged_tiles is not None and keep_unchanged_out,
            "scales": list(scale_values),
            "flip": bool(flip),
            "min_area": min_area,
            "simplify": simplify,
            "fill_holes": fill_holes,
            "dst_crs": dst_crs,
        },
        "device": describe_device(torch_device),
        "versions": software_versions(),
        "timings": timings,
        "fusion": fusion,
        "polygons": polygons["polygons"],
        "change_area_m2": polygons["change_area_m2"],
        "outputs": {
            **{k: str(v) for k, v in paths.items() if k != "run" or write_record},
            **({"detector_probability": str(detector_map)} if fusion is not None else {}),
        },
    }
    if write_record:
        write_text_atomic(paths["run"], json.dumps(record, indent=2), overwrite=overwrite)
    progress.log(f"detection written to {paths['change'].parent}")
    return record
