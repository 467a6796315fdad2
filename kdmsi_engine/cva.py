"""Change vector analysis (CVA): the no-training change map, and its label-calibrated form.

**Plain CVA** (``kdmsi cva``, the "quick change preview"): per pixel, the length of the
difference between the two dates' band vectors, after each band is scaled to [0, 1] by its
2nd-98th percentiles over both dates. It is written as the root mean square over the ``C``
bands, ``sqrt(sum_b (after_b - before_b)^2 / C)``, which lies in [0, 1] and orders pixels like
the plain magnitude ``sqrt(sum_b (after_b - before_b)^2)``. Thresholded with Otsu's method it is
the classic unsupervised change detector, and the yardstick of ``make accuracy``. It needs no
labels and no training.

**Calibrated CVA** (the pixel evidence of the chain's pseudo labels): the difference vectors of
the pixels in tiles the analyst labelled *unchanged* show what differs between the dates where
nothing changed (illumination, season, sensor gain, haze, band correlations). Each pixel's
difference is standardised by their mean and covariance: the Mahalanobis distance
``d = sqrt((x - mu)^T S^-1 (x - mu))``, which is large only where the difference is unusual
for unchanged land. ``d`` is then averaged over the pixel's 3 x 3 valid neighbours (a change is
rarely a single pixel; noise often is) and mapped to [0, 1) as ``d^2 / (d^2 + C)`` (0.5 for a
typical unchanged pixel, whose ``d^2`` is about ``C``). Without unchanged tiles the statistics of
the whole scene are used. This is the relative radiometric normalisation of remote sensing
(calibrate on pseudo-invariant areas), with the analyst's unchanged tiles as the invariant set.

Both are streamed strip by strip; outputs are tiled, compressed float32 GeoTIFFs with nodata
-1 where either date has no data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from kdmsi_engine import defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.errors import InputError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import (
    PROB_NODATA,
    add_overviews,
    create_geotiff,
    strip_windows,
    write_uint8_classes,
)
from kdmsi_engine.results import CvaResult, EvidenceResult
from kdmsi_engine.thresholds import Histogram, parse_threshold_spec

logger = logging.getLogger(__name__)

#: Scaling of the bands for CVA: robust per-band percentiles over both dates, for every data
#: type (uint8 too), so that no band dominates the magnitude by its range alone.
CVA_SCALING = "percentile-2-98"
#: Rows per strip (a multiple of the output's internal tiles).
STRIP_ROWS = 512
#: Relative ridge added to the unchanged-difference covariance (keeps it invertible when two
#: bands move together exactly).
COVARIANCE_RIDGE = 1e-6


def rms_difference(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Plain CVA of one window: ``sqrt(mean over bands of (after - before)^2)``, (H, W)."""
    diff = after.astype(np.float32) - before.astype(np.float32)
    return np.sqrt(np.mean(diff * diff, axis=0))


class DifferenceStats:
    """Mean and covariance of difference vectors (after - before), accumulated by windows."""

    def __init__(self, bands: int) -> None:
        self.bands = bands
        self.count = 0
        self._sum = np.zeros(bands, np.float64)
        self._outer = np.zeros((bands, bands), np.float64)

    def add(self, before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> None:
        """Add the pixels of a window where ``mask`` is true."""
        if not mask.any():
            return
        diff = (after[:, mask] - before[:, mask]).astype(np.float64)
        self.count += diff.shape[1]
        self._sum += diff.sum(axis=1)
        self._outer += diff @ diff.T

    @property
    def mean(self) -> np.ndarray:
        return self._sum / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        mean = self.mean
        cov = self._outer / max(self.count, 1) - np.outer(mean, mean)
        ridge = COVARIANCE_RIDGE * max(float(np.trace(cov)) / self.bands, 1e-12)
        return cov + ridge * np.eye(self.bands)

    def whitener(self) -> np.ndarray:
        """``W`` with ``W (x - mean)`` of identity covariance (inverse Cholesky factor)."""
        chol = np.linalg.cholesky(self.covariance)
        return np.linalg.inv(chol)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pixels": int(self.count),
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in np.sqrt(np.diag(self.covariance))],
        }


def mahalanobis(
    before: np.ndarray, after: np.ndarray, mean: np.ndarray, whitener: np.ndarray
) -> np.ndarray:
    """Mahalanobis distance of each pixel's difference vector, (H, W)."""
    bands, height, width = before.shape
    diff = (after - before).reshape(bands, -1).astype(np.float64) - mean[:, None]
    z = whitener @ diff
    return np.sqrt((z * z).sum(axis=0)).reshape(height, width).astype(np.float32)


def box_mean3(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean over each pixel's valid 3 x 3 neighbours (0 where a pixel has none)."""
    v = np.where(valid, values, 0.0).astype(np.float64)
    w = valid.astype(np.float64)
    pv = np.pad(v, 1)
    pw = np.pad(w, 1)
    total = np.zeros_like(v)
    weight = np.zeros_like(w)
    height, width = v.shape
    for dy in range(3):
        for dx in range(3):
            total += pv[dy : dy + height, dx : dx + width]
            weight += pw[dy : dy + height, dx : dx + width]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(weight > 0, total / np.maximum(weight, 1.0), 0.0)
    return out.astype(np.float32)


def distance_to_unit(distance: np.ndarray, bands: int) -> np.ndarray:
    """Map a Mahalanobis distance to [0, 1): ``d^2 / (d^2 + C)``."""
    d2 = distance.astype(np.float64) ** 2
    return (d2 / (d2 + float(bands))).astype(np.float32)


def _check_inputs(before: Any, after: Any) -> None:
    for path, what in ((before, "before raster"), (after, "after raster")):
        if not Path(path).is_file():
            raise RasterError(f"{what} {path} does not exist; check the path")


def _write_map(
    scene: Any,
    target: Path,
    compute: Callable[[Window], tuple[np.ndarray, np.ndarray]],
    *,
    tags: dict[str, str],
    overwrite: bool,
    progress: Progress,
    stage: str,
) -> Histogram:
    """Write ``compute(window) -> (values, valid)`` strip by strip; return their histogram."""
    grid = scene.grid
    strips = list(strip_windows(grid.width, grid.height, STRIP_ROWS))
    histogram = Histogram()
    progress.stage(stage, total=len(strips), message=f"{grid.width}x{grid.height} pixels")
    with atomic_output(target, overwrite=overwrite) as tmp:
        with create_geotiff(tmp, grid, dtype="float32", nodata=PROB_NODATA) as dst:
            for window in strips:
                progress.check_cancelled()
                values, valid = compute(window)
                out = np.where(valid, np.clip(values, 0.0, 1.0), PROB_NODATA).astype(np.float32)
                histogram.add(out[valid])
                dst.write(out, 1, window=window)
                progress.advance()
            dst.update_tags(**tags)
            add_overviews(dst, "average")
    return histogram


def cva_scene(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    bands: object = None,
    change_path: str | os.PathLike[str] | None = None,
    threshold: float | str = defaults.CVA_THRESHOLD,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CvaResult:
    """Plain change vector analysis of a scene pair (no labels, no training).

    Args:
        before: raster of date 1 (defines the grid).
        after: raster of date 2 (warped onto the grid).
        out_path: float32 GeoTIFF of the RMS band difference in [0, 1] (nodata -1).
        bands: 1-based bands (default: every band when there are more than three... as the
            data layer chooses; see :meth:`ScenePair.open`).
        change_path: optional uint8 change raster (1 change, 0 none, 255 nodata).
        threshold: threshold of ``change_path``: a number in [0, 1) or ``otsu``.
        overwrite: replace existing outputs.
        progress: progress and cancellation.

    Returns:
        ``output``, ``change`` (or ``None``), ``otsu_threshold``, ``threshold``, ``bands``,
        ``scaling``, ``grid``, ``seconds``, and the share of valid pixels above the threshold.
    """
    from kdmsi_engine.data.scene import ScenePair

    progress = progress or Progress()
    spec = parse_threshold_spec(threshold)
    _check_inputs(before, after)
    target = check_output(out_path, overwrite=overwrite)
    change_target = check_output(change_path, overwrite=overwrite) if change_path else None
    if change_target is not None and change_target == target:
        raise InputError("the change raster and the CVA raster must be different files")
    started = time.monotonic()
    with ScenePair.open(before, after, bands=bands, scaling_method=CVA_SCALING) as scene:

        def compute(window: Window) -> tuple[np.ndarray, np.ndarray]:
            data = scene.read(window)
            return rms_difference(data.before, data.after), data.valid

        histogram = _write_map(
            scene,
            target,
            compute,
            tags={"KDMSI_METHOD": "cva", "KDMSI_BANDS": ",".join(map(str, scene.bands))},
            overwrite=overwrite,
            progress=progress,
            stage="cva",
        )
        info = scene.describe()
    if histogram.total == 0:
        raise RasterError("the scene pair has no pixel with data in both dates")
    otsu = histogram.otsu()
    value = float(otsu if spec == "otsu" else spec)  # type: ignore[arg-type]
    above = float(histogram.counts[histogram.edges[1:] > value].sum()) / histogram.total
    if change_target is not None:
        write_uint8_classes(target, change_target, value, overwrite=overwrite, progress=progress)
    return {
        "output": str(target),
        "change": str(change_target) if change_target is not None else None,
        "method": "cva",
        "otsu_threshold": round(float(otsu), 6) if otsu is not None else None,
        "threshold": round(value, 6),
        "threshold_method": spec if isinstance(spec, str) else "fixed",
        "changed_fraction": round(above, 6),
        "bands": info["bands"],
        "scaling": info["scaling"],
        "grid": info["grid"],
        "seconds": round(time.monotonic() - started, 2),
    }


def unchanged_statistics(scene: Any, tiles: Any, progress: Progress) -> DifferenceStats:
    """Difference statistics over the valid pixels of tiles labelled unchanged.

    ``tiles`` is a :class:`~kdmsi_engine.pseudo.TileLabels` on the scene grid. With no
    unchanged tile, every valid pixel of the scene counts.
    """
    grid = scene.grid
    stats = DifferenceStats(scene.num_bands)
    strips = list(strip_windows(grid.width, grid.height, STRIP_ROWS))
    use_all = tiles is None or tiles.counts()["unchanged"] == 0
    progress.stage("calibrate", total=len(strips), message="differences of unchanged tiles")
    for window in strips:
        progress.check_cancelled()
        data = scene.read(window)
        mask = data.valid
        if not use_all:
            state = tiles.state(int(window.row_off), int(window.height), int(window.width))
            mask = mask & (state == 0)
        stats.add(data.before, data.after, mask)
        progress.advance()
    if stats.count < scene.num_bands + 1:
        raise InputError(
            "too few valid pixels to calibrate change vector analysis; label more unchanged area"
        )
    return stats


def calibrated_cva_scene(
    scene: Any,
    tiles: Any,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> EvidenceResult:
    """Write the label-calibrated CVA map of an open scene (see the module docs).

    Args:
        scene: an open :class:`~kdmsi_engine.data.scene.ScenePair`.
        tiles: :class:`~kdmsi_engine.pseudo.TileLabels` on the scene grid (or ``None``).
        out_path: float32 GeoTIFF in [0, 1) (nodata -1).
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``output``, ``calibration`` (``unchanged-tiles`` or ``scene``) and the difference
        statistics.
    """
    progress = progress or Progress()
    target = check_output(out_path, overwrite=overwrite)
    started = time.monotonic()
    stats = unchanged_statistics(scene, tiles, progress)
    mean, whitener = stats.mean, stats.whitener()
    bands = scene.num_bands

    def compute(window: Window) -> tuple[np.ndarray, np.ndarray]:
        # one row of halo above and below, so the 3 x 3 mean is the same across strips
        row0 = int(window.row_off)
        top = 1 if row0 > 0 else 0
        bottom = 1 if row0 + int(window.height) < scene.grid.height else 0
        padded = Window(0, row0 - top, window.width, int(window.height) + top + bottom)
        data = scene.read(padded)
        distance = mahalanobis(data.before, data.after, mean, whitener)
        smooth = box_mean3(distance, data.valid)
        rows = slice(top, top + int(window.height))
        return distance_to_unit(smooth[rows], bands), data.valid[rows]

    calibration = "scene" if tiles is None or tiles.counts()["unchanged"] == 0 else "unchanged"
    if calibration == "scene":
        progress.log("no tile is labelled unchanged: CVA calibrated on the whole scene")
    _write_map(
        scene,
        target,
        compute,
        tags={"KDMSI_METHOD": "calibrated-cva", "KDMSI_CALIBRATION": calibration},
        overwrite=overwrite,
        progress=progress,
        stage="evidence",
    )
    return {
        "output": str(target),
        "method": "calibrated-cva",
        "calibration": "unchanged-tiles" if calibration == "unchanged" else "scene",
        "statistics": stats.to_dict(),
        "seconds": round(time.monotonic() - started, 2),
    }
