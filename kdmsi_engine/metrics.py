"""Change-detection metrics over whole rasters (paper section 4.3), read window by window.

Confusion counts are summed over the whole evaluated area (never averaged per image). From them:
OA; change precision, recall, F1 and IoU (``iou``, the paper's cIoU); no-change IoU; ``miou``
(mean of both IoUs); ``mean_f1`` (mean of both classes' F1, the paper's "F1" column);
``fp_share`` = FP / (TP + FP + FN) and ``fn_share`` = FN / (TP + FP + FN), so that
``iou + fp_share + fn_share = 1``. An empty denominator gives 0.0 (no NaN in JSON).

:func:`evaluate_rasters` compares a prediction raster with a truth raster:

* prediction: float = change probability (change where ``> threshold``; nodata and NaN
  excluded), integer = class raster (change where ``> 0``, its nodata excluded, e.g. 255 of
  ``kdmsi detect``'s ``change.tif``);
* truth: change where value ``> 0`` (0/1 and 0/255 masks), or where the value is in
  ``truth_values`` when given; its nodata value (e.g. 255 of a 0/1 raster with nodata set) and
  pixels outside it are excluded;
* when the grids differ, the truth is warped (nearest neighbour) onto the prediction's grid.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kdmsi_engine.errors import GridError, InputError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import bounded_gdal_cache, check_threshold, open_raster
from kdmsi_engine.results import EvaluateResult, Metrics

logger = logging.getLogger(__name__)

#: thresholds of ``--sweep``: 0.05, 0.10, ..., 0.95.
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
_READ_BLOCK = 1024


@dataclass
class Confusion:
    """Pixel counts of the change class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> Confusion:
    """Confusion counts of boolean change arrays where ``valid`` (all pixels if ``None``)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise InputError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        pred, truth = pred[valid], truth[valid]
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(pred.size - tp - fp - fn)
    return Confusion(tp, fp, fn, tn)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def metrics_from_confusion(c: Confusion) -> Metrics:
    """The paper's metrics (and the counts) from confusion counts, as a JSON-ready dict."""
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn)
    f1 = _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)
    iou = _ratio(c.tp, c.tp + c.fp + c.fn)
    # no-change class: its TP is tn, its FP is fn, its FN is fp
    nc_precision = _ratio(c.tn, c.tn + c.fn)
    nc_recall = _ratio(c.tn, c.tn + c.fp)
    nc_f1 = _ratio(2 * c.tn, 2 * c.tn + c.fn + c.fp)
    nc_iou = _ratio(c.tn, c.tn + c.fn + c.fp)
    errors = c.tp + c.fp + c.fn
    return {
        "oa": _ratio(c.tp + c.tn, c.total),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "iou": iou,
        "nochange_precision": nc_precision,
        "nochange_recall": nc_recall,
        "nochange_f1": nc_f1,
        "nochange_iou": nc_iou,
        "miou": (iou + nc_iou) / 2.0,
        "mean_f1": (f1 + nc_f1) / 2.0,
        "fp_share": _ratio(c.fp, errors),
        "fn_share": _ratio(c.fn, errors),
        "counts": asdict(c),
        "pixels": c.total,
        "change_fraction_truth": _ratio(c.tp + c.fn, c.total),
        "change_fraction_pred": _ratio(c.tp + c.fp, c.total),
    }


def sweep_confusions(
    prob: np.ndarray, truth: np.ndarray, valid: np.ndarray, thresholds: Sequence[float]
) -> list[Confusion]:
    """Confusion counts at each threshold (change where ``prob > t``) in one pass."""
    p = np.asarray(prob)[valid]
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    # thresholds in the data's precision, as `prob > t` compares them
    ts = np.asarray(sorted(thresholds), dtype=p.dtype)
    t = np.asarray(truth, dtype=bool)[valid]
    # k = number of thresholds strictly below p: p > ts[j] for every j < k
    pos = np.bincount(np.searchsorted(ts, p[t], side="left"), minlength=len(ts) + 1)
    neg = np.bincount(np.searchsorted(ts, p[~t], side="left"), minlength=len(ts) + 1)
    # predicted change at threshold j: all pixels with k > j
    pos_above = np.cumsum(pos[::-1])[::-1][1:]
    neg_above = np.cumsum(neg[::-1])[::-1][1:]
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    out = []
    for j in range(len(ts)):
        tp, fp = int(pos_above[j]), int(neg_above[j])
        out.append(Confusion(tp=tp, fp=fp, fn=n_pos - tp, tn=n_neg - fp))
    return out


def _same_grid(a: Any, b: Any) -> bool:
    if (a.width, a.height) != (b.width, b.height):
        return False
    if (a.crs is None) != (b.crs is None):
        return False
    if a.crs is not None and a.crs != b.crs:
        return False
    return all(
        math.isclose(x, y, rel_tol=0, abs_tol=1e-9 * max(1.0, abs(x)))
        for x, y in zip(a.transform[:6], b.transform[:6])
    )


class _TruthReader:
    """Reads truth (change bool, valid bool) windows on the prediction's grid."""

    def __init__(
        self,
        truth: Any,
        pred: Any,
        truth_values: Sequence[float] | None,
        truth_nodata: float | None,
    ) -> None:
        self.values = None if truth_values is None else np.asarray(truth_values, np.float64)
        self.nodata = truth.nodata if truth_nodata is None else truth_nodata
        self.reprojected = not _same_grid(truth, pred)
        self.vrt = None
        self.src = truth
        if self.reprojected:
            if truth.crs is None or pred.crs is None:
                raise RasterError(
                    f"truth raster ({truth.width}x{truth.height}) and prediction "
                    f"({pred.width}x{pred.height}) differ and are not both georeferenced; "
                    "give a truth on the same pixel grid"
                )
            self.vrt = WarpedVRT(
                truth,
                crs=pred.crs,
                transform=pred.transform,
                width=pred.width,
                height=pred.height,
                resampling=Resampling.nearest,
                add_alpha=True,
            )
            self.src = self.vrt

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        data = self.src.read(1, window=window, masked=False)
        if self.vrt is not None:
            valid = self.vrt.read(self.vrt.count, window=window) > 0
        else:
            valid = np.ones(data.shape, bool)
        if self.nodata is not None and not _isnan(self.nodata):
            valid &= data != self.nodata
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data)
        if self.values is not None:
            change = np.isin(data, self.values)
        else:
            change = data > 0
        return change, valid

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _windows(width: int, height: int) -> Iterator[Window]:
    for row in range(0, height, _READ_BLOCK):
        for col in range(0, width, _READ_BLOCK):
            yield Window(col, row, min(_READ_BLOCK, width - col), min(_READ_BLOCK, height - row))


def _pred_valid(data: np.ndarray, nodata: Any) -> np.ndarray:
    valid = np.ones(data.shape, bool)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data)
    if nodata is not None and not _isnan(nodata):
        valid &= data != nodata
    return valid


def _check_truth_fits(pred: Any, truth: Any, truth_path: Path) -> None:
    """Refuse a truth that is an image, or of another place, before scoring anything."""
    if truth.count != 1:
        raise RasterError(
            f"truth raster {truth_path} has {truth.count} bands; a change mask has one band "
            "(change > 0, 0 none): give the reference mask, not an image"
        )
    if pred.crs is None or truth.crs is None:
        if (pred.width, pred.height) != (truth.width, truth.height):
            raise GridError(
                f"truth raster {truth_path} is {truth.width}x{truth.height} px and not "
                f"georeferenced, the prediction is {pred.width}x{pred.height}: give the mask "
                "of the same scene"
            )
        return
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(truth.crs, pred.crs, *truth.bounds)
    p_left, p_bottom, p_right, p_top = pred.bounds
    if left >= p_right or right <= p_left or bottom >= p_top or top <= p_bottom:
        raise GridError(
            f"truth raster {truth_path} does not overlap the prediction; give the reference "
            "of the same place"
        )


def evaluate_rasters(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    sweep: bool | Sequence[float] = False,
    truth_values: Sequence[float] | None = None,
    truth_nodata: float | None = None,
    progress: Progress | None = None,
) -> EvaluateResult:
    """Evaluate a prediction raster against a truth raster.

    Args:
        pred_path: probability (float) or class (integer, change > 0) raster.
        truth_path: change truth (change > 0 or in ``truth_values``; nodata excluded).
        threshold: probability threshold (default 0.5); refused for class rasters.
        sweep: ``True`` for :data:`SWEEP_THRESHOLDS`, or a list of thresholds; probability only.
        truth_values: truth values meaning change (default: every value > 0).
        truth_nodata: truth value to exclude (default: the raster's nodata).
        progress: progress and cancellation.

    Returns:
        the metrics at ``threshold`` (keys of :func:`metrics_from_confusion`) plus ``pred``,
        ``truth``, ``threshold``, ``pred_kind``, ``truth_reprojected``; with ``sweep`` also
        ``sweep`` (one record per threshold) and ``best`` (the threshold of highest IoU).

    Raises:
        RasterError: a raster is missing, unreadable, or grids cannot be matched.
        InputError: bad threshold, or a threshold/sweep on a class raster.
    """
    # Longer than 80 lines: its documented parameters; one streaming pass accumulating confusion counts.
    progress = progress or Progress()
    thresholds: list[float] = []
    if sweep is True:
        thresholds = list(SWEEP_THRESHOLDS)
    elif sweep:
        thresholds = sorted(check_threshold(t) for t in sweep)
    if threshold is not None:
        threshold = check_threshold(threshold)
    with (
        open_raster(pred_path, "prediction raster") as pred,
        open_raster(truth_path, "truth raster") as truth,
    ):
        floating = np.issubdtype(np.dtype(pred.dtypes[0]), np.floating)
        if not floating and (threshold is not None or thresholds):
            raise InputError(
                f"{pred_path} is a class raster ({pred.dtypes[0]}); a threshold and a sweep "
                "apply to probability rasters only: leave them out",
                parameters=("threshold", "sweep"),
            )
        if floating and threshold is None:
            threshold = 0.5
        _check_truth_fits(pred, truth, Path(truth_path))
        reader = _TruthReader(truth, pred, truth_values, truth_nodata)
        windows = list(_windows(pred.width, pred.height))
        progress.stage("evaluate", total=len(windows))
        total = Confusion()
        swept = [Confusion() for _ in thresholds]
        try:
            with bounded_gdal_cache():
                for window in windows:
                    progress.check_cancelled()
                    data = pred.read(1, window=window)
                    change_t, valid_t = reader.read(window)
                    valid = valid_t & _pred_valid(data, pred.nodata)
                    if floating:
                        change_p = data > threshold
                    else:
                        change_p = data > 0
                    total = total + confusion(change_p, change_t, valid)
                    if thresholds:
                        for j, c in enumerate(sweep_confusions(data, change_t, valid, thresholds)):
                            swept[j] = swept[j] + c
                    progress.advance()
        finally:
            reader.close()
        result: EvaluateResult = {
            "pred": str(Path(pred_path)),
            "truth": str(Path(truth_path)),
            "pred_kind": "probability" if floating else "classes",
            "threshold": threshold,
            "truth_reprojected": reader.reprojected,
        }
    if total.total == 0:
        raise InputError(
            f"no pixel is valid in both {pred_path} and {truth_path}; check that the truth "
            "covers the predicted area and that its nodata value is right",
            parameters=("truth_nodata",),
        )
    result.update(metrics_from_confusion(total))
    if thresholds:
        records: list[dict[str, Any]] = []
        for t, c in zip(thresholds, swept):
            m = metrics_from_confusion(c)
            records.append({"threshold": t, **{k: v for k, v in m.items() if k != "counts"}})
        best = max(records, key=lambda r: (r["iou"], -abs(r["threshold"] - 0.5)))
        result["sweep"] = records
        result["best"] = {"threshold": best["threshold"], "iou": best["iou"], "f1": best["f1"]}
    return result
