"""The ``infer`` job: a KD-MSI model's change probability over a whole scene pair.

:func:`infer_scene` opens the pair with the model's bands and scaling, checks that the band
count fits the model, and streams the chosen map through
:func:`~kdmsi_engine.inference.sliding.predict_scene`:

* ``msi`` (default): the student's multiscale sigmoid inference (mean of sigmoid maps over
  scales and horizontal flips);
* ``mi``: the baseline multiscale inference (sum of G over scales and flips, CAM-normalised);
* ``student``: the student's sigmoid map at one scale;
* ``cam``: the teacher's class activation map. Over a scene no tile label is known, so the
  **raw CAM** is written, as if every window were labelled changed (``y = 1``):
  ``ReLU(G_t) / max(ReLU(G_t))`` per window, before blending. Note that the per-window max
  normalisation makes it relative: a window without change still has a maximum of 1.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdmsi_engine.atomic import check_output
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import InputError, ModelFileError, RasterError
from kdmsi_engine.inference.maps import parse_scales
from kdmsi_engine.inference.sliding import check_window_params, predict_scene
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import InferResult

logger = logging.getLogger(__name__)

METHODS = ("msi", "mi", "student", "cam")
DEFAULT_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)


def model_bands(metadata: dict[str, Any]) -> tuple[list[int] | None, int | None]:
    """The band indices and band count a KD-MSI model was trained with (from its metadata)."""
    bands = metadata.get("bands")
    arch = metadata.get("architecture") or {}
    count = arch.get("in_channels", metadata.get("num_bands", metadata.get("in_channels")))
    if bands is not None:
        bands = [int(b) for b in bands]
        count = count if count is not None else len(bands)
    return bands, None if count is None else int(count)


def _scaling(metadata: dict[str, Any]) -> Any:
    from kdmsi_engine.data.scene import BandScaling

    scaling = metadata.get("scaling")
    if not scaling:
        return None
    try:
        return BandScaling.from_dict(scaling)
    except Exception as exc:  # malformed metadata: never guess a scaling
        raise ModelFileError(
            f"model metadata has an unreadable band scaling ({exc}); retrain the model"
        ) from exc


def check_band_fit(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    bands: list[int] | None,
    count: int | None,
    model_path: str | os.PathLike[str],
) -> None:
    """Refuse rasters that lack the model's bands (before any reading)."""
    import rasterio

    for path in (before, after):
        try:
            with rasterio.open(path) as ds:
                available = ds.count
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"{path} cannot be read as a raster: {exc}") from exc
        needed = max(bands) if bands else count
        if needed is not None and available < needed:
            raise ModelFileError(
                f"model {Path(model_path).name} was trained on {count} band(s) "
                f"(bands {bands or 'first'}), {Path(path).name} has {available}; "
                "use a model trained on these rasters' bands"
            )


def make_predictor(method: str, teacher: Any, student: Any, scales: Sequence[float]) -> Any:
    """``predict_batch(before, after) -> (B,H,W)`` for ``method`` using KD's ``change_map``."""
    from kdmsi_engine.inference.maps import change_map

    def predict(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        # change_map runs its forward passes under autocast (bf16 on capable CPUs, CUDA amp)
        out = change_map(method, teacher, student, before, after, tuple(scales))
        return out.float().clamp(0.0, 1.0)

    return predict


def infer_scene(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    method: str = "msi",
    scales: Sequence[float] | str = DEFAULT_SCALES,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> InferResult:
    """Write a change-probability GeoTIFF of a scene pair from a KD-MSI model.

    Args:
        before: raster of date 1 (defines the grid).
        after: raster of date 2 (warped onto the grid).
        model_path: ``.kdmsi`` file from ``kdmsi train``.
        out_path: output float32 GeoTIFF (nodata -1).
        method: ``msi``, ``mi``, ``student`` or ``cam`` (raw CAM, see module docs).
        scales: scales of ``msi``/``mi``.
        tile_size: window size (default: the model's training tile size).
        overlap: window overlap (default: a quarter of the tile size).
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``{"output", "method", "scales", "tile_size", "overlap", "device", "grid", "seconds"}``.
    """
    # Longer than 80 lines: the job's documented parameters; each step is short.
    progress = progress or Progress()
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    scale_values = parse_scales(scales)
    for path, what in ((before, "before raster"), (after, "after raster")):
        if not Path(path).is_file():
            raise RasterError(f"{what} {path} does not exist; check the path")
    target = check_output(out_path, overwrite=overwrite)
    torch_device = resolve_device(device)

    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.models.kdmsi import load_kdmsi_model

    teacher, student, metadata = load_kdmsi_model(model_path)
    bands, count = model_bands(metadata)
    tile = int(tile_size or metadata.get("tile_size") or 256)
    lap = int(overlap if overlap is not None else tile // 4)
    check_window_params(tile, lap, batch_size)
    scaling = _scaling(metadata)
    check_band_fit(before, after, bands, count, model_path)
    started = time.monotonic()
    with ScenePair.open(before, after, bands=bands, scaling=scaling) as scene:
        if count is not None and scene.num_bands != count:
            raise ModelFileError(
                f"model {model_path} was trained on {count} band(s), the scene gives "
                f"{scene.num_bands}; use a model trained on these rasters' bands"
            )
        from kdmsi_engine.inference.maps import prepare_for_inference

        teacher = prepare_for_inference(teacher, torch_device)
        student = prepare_for_inference(student, torch_device)
        progress.log(f"device: {describe_device(torch_device)}", device=str(torch_device))
        predict = make_predictor(method, teacher, student, scale_values)
        predict_scene(
            scene,
            predict,
            target,
            tile_size=tile,
            overlap=lap,
            batch_size=batch_size,
            device=torch_device,
            overwrite=overwrite,
            progress=progress,
            tags={
                "KDMSI_METHOD": method,
                "KDMSI_SCALES": ",".join(f"{s:g}" for s in scale_values),
                "KDMSI_MODEL": Path(model_path).name,
            },
        )
        grid = scene.grid
        grid_info = {
            "width": grid.width,
            "height": grid.height,
            "crs": grid.crs.to_string() if grid.crs is not None else None,
        }
    return {
        "output": str(target),
        "method": method,
        "scales": list(scale_values) if method in ("msi", "mi") else [1.0],
        "tile_size": tile,
        "overlap": lap,
        "device": str(torch_device),
        "grid": grid_info,
        "seconds": round(time.monotonic() - started, 2),
    }
