"""Fusing change maps on one scale: how rare a value is on land known to be unchanged.

The chain has two maps of different nature: the detector's probability (it sees shapes and
context, but at stride 4 and through its training) and the calibrated change vector analysis
(it sees each pixel's spectral change, but no context). Measured, neither wins everywhere: the
detector on 10 m Sentinel-2 cities, the spectral map on 30 m Landsat (README).

Each map ``m`` is first put on a common scale with its *calibration pixels* (valid pixels of
tiles labelled unchanged that the map did not learn from):

    ``r_m(x)`` = the share of calibration pixels whose value is at least ``m(x)``,

the false-positive rate a threshold at ``m(x)`` would have on unchanged land. Each map has its
own calibration pixels: the detector's are the unchanged tiles held out of its training (on the
tiles it trained on its probabilities are too low to say how rare a value is on new land); the
spectral map's are all the unchanged tiles (it is not trained: only the mean and covariance of
unchanged differences, a few dozen numbers from thousands of pixels, are fitted, so every
unchanged tile shows it the same as a new one would, and many tiles give a steadier scale than
the one or two held out when an analyst has labelled few). The maps are
combined by a weighted product of these rates (Fisher's method when the weights are equal),
written as a score in [0, 1]:

    ``score(x) = sum_m w_m log r_m(x) / sum_m w_m log r_min``,

``r_min = 0.5 / N`` the floor of a rate (``N`` calibration pixels): 0 where every map looks
like ordinary unchanged land, 1 where each is beyond every calibration pixel. Thresholding the
score at a quantile of the calibration pixels flags that share of unchanged land.

A *gate* map (the spectral one) can veto: where its rate is above ``gate_rate`` (its value is
ordinary for unchanged land, e.g. among the 90 % most common) the score is 0. A change of land
cover changes the spectrum; the veto removes the detector's halo around real changes, where its
map is blurred by its stride but the pixels did not change.

Rates come from fine histograms (:data:`BINS` bins on [0, 1]) accumulated strip by strip; the
fused map is written strip by strip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.errors import InputError, LabelError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import (
    PROB_NODATA,
    add_overviews,
    bounded_gdal_cache,
    create_geotiff,
    open_on_one_grid,
    strip_windows,
    valid_values,
)
from kdmsi_engine.thresholds import Histogram

logger = logging.getLogger(__name__)

#: Histogram bins of each map on [0, 1] (the rates' resolution in value).
BINS = 10000

MaskFunction = Callable[[int, int, int], np.ndarray]


class RarityScale:
    """The share of calibration values at or above a value (from a histogram)."""

    def __init__(self, histogram: Histogram) -> None:
        counts = histogram.counts.astype(np.float64)
        self.total = float(counts.sum())
        if self.total <= 0:
            raise LabelError(
                "no calibration pixel (tiles labelled unchanged) to fuse the change maps on; "
                "label some unchanged areas"
            )
        self.edges = histogram.edges
        # at_or_above[k]: calibration values in bin k or higher
        self.at_or_above = np.cumsum(counts[::-1])[::-1] / self.total
        self.floor = 0.5 / self.total

    def rate(self, values: np.ndarray) -> np.ndarray:
        """``s(x)``: the share of calibration values at least ``x`` (at least the floor)."""
        bins = len(self.edges) - 1
        index = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, bins - 1)
        return np.maximum(self.at_or_above[index], self.floor)


def calibration_scales(
    sources: Sequence[Any], calibrations: Sequence[MaskFunction], strips: list[Any]
) -> list[RarityScale]:
    """One :class:`RarityScale` per open raster, from its values on its calibration pixels
    (``calibrations``: one mask function per raster)."""
    histograms = [Histogram(BINS) for _ in sources]
    for window in strips:
        row, height, width = int(window.row_off), int(window.height), int(window.width)
        masks: dict[int, np.ndarray] = {}  # one mask per distinct function and strip
        for src, histogram, calibration in zip(sources, histograms, calibrations):
            mask = masks.get(id(calibration))
            if mask is None:
                mask = masks[id(calibration)] = calibration(row, height, width)
            if not mask.any():
                continue
            values = src.read(1, window=window)
            histogram.add(values[mask & valid_values(values, src.nodata)])
    return [RarityScale(h) for h in histograms]


def fuse_maps(
    maps: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    calibration: MaskFunction | Sequence[MaskFunction],
    *,
    weights: Sequence[float] | None = None,
    gate: int | None = None,
    gate_rate: float = 0.1,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the fused rarity score of ``maps`` (probability rasters on one grid).

    Args:
        maps: two or more float rasters in [0, 1] (nodata excluded) on one grid.
        out_path: float32 GeoTIFF of the score in [0, 1] (nodata -1 where any map has none).
        calibration: ``mask(row, height, width)``: the calibration pixels of a full-width
            strip (e.g. :meth:`~kdmsi_engine.pseudo.TileLabels.unchanged_mask`), or one such
            function per map (each map's own calibration pixels).
        weights: one positive weight per map (default: equal).
        gate: index in ``maps`` of a map that vetoes: the score is 0 where its rate on the
            calibration pixels is above ``gate_rate``; ``None``: no veto.
        gate_rate: see ``gate``.
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``output``, ``maps``, the gate and, per map, ``calibration_pixels`` and the value at
        which its rate on the calibration pixels falls to 1 % (and for the gate, to
        ``gate_rate``).
    """
    # Longer than 80 lines: its documented parameters; one streaming pass over the strips.
    from contextlib import ExitStack

    from kdmsi_engine.data.grid import Grid

    progress = progress or Progress()
    target = check_output(out_path, overwrite=overwrite)
    with ExitStack() as stack, bounded_gdal_cache():
        sources = open_on_one_grid(stack, maps)
        first = sources[0]
        weight = np.ones(len(maps)) if weights is None else np.asarray(weights, np.float64)
        if weight.shape != (len(maps),) or (weight < 0).any() or weight.sum() <= 0:
            raise InputError(f"fusion weights {weights} must be one non-negative number per map")
        weight = weight / weight.sum()
        calibrations = [calibration] * len(maps) if callable(calibration) else list(calibration)
        if len(calibrations) != len(maps):
            raise InputError(
                f"{len(calibrations)} calibration masks for {len(maps)} maps: give one, or one "
                "per map"
            )
        strips = list(strip_windows(first.width, first.height))
        progress.stage("fuse", total=len(strips), message=f"{len(maps)} maps")
        scales = calibration_scales(sources, calibrations, strips)
        log_floor = float(sum(w * np.log(s.floor) for w, s in zip(weight, scales)))
        with atomic_output(target, overwrite=overwrite) as tmp:
            with create_geotiff(
                tmp, Grid.from_dataset(first), dtype="float32", nodata=PROB_NODATA
            ) as dst:
                for window in strips:
                    progress.check_cancelled()
                    log_rate = np.zeros((int(window.height), int(window.width)))
                    valid = np.ones(log_rate.shape, dtype=bool)
                    kept = np.ones(log_rate.shape, dtype=bool)
                    for index, (src, scale) in enumerate(zip(sources, scales)):
                        values = src.read(1, window=window)
                        valid &= valid_values(values, src.nodata)
                        rate = scale.rate(np.where(np.isfinite(values), values, 0))
                        log_rate += weight[index] * np.log(rate)
                        if index == gate:
                            kept &= rate <= gate_rate
                    score = np.where(kept, np.clip(log_rate / log_floor, 0.0, 1.0), 0.0)
                    dst.write(
                        np.where(valid, score, PROB_NODATA).astype(np.float32), 1, window=window
                    )
                    progress.advance()
                dst.update_tags(
                    KDMSI_METHOD="fused-rarity",
                    KDMSI_MAPS=",".join(Path(p).name for p in maps),
                    KDMSI_WEIGHTS=",".join(f"{w:g}" for w in weight),
                    KDMSI_GATE="" if gate is None else f"{Path(maps[gate]).name}:{gate_rate:g}",
                )
                add_overviews(dst, "average")
    return {
        "output": str(target),
        "method": "product of rates on unchanged calibration tiles",
        "maps": [str(p) for p in maps],
        "weights": [round(float(w), 6) for w in weight],
        "gate": None if gate is None else {"map": str(maps[gate]), "rate": gate_rate},
        "calibration_pixels": [int(scale.total) for scale in scales],
        "one_percent_values": [_value_at(s, 0.01) for s in scales],
        "gate_value": None if gate is None else _value_at(scales[gate], gate_rate),
    }


def _value_at(scale: RarityScale, rate: float) -> float:
    """The value above which a share ``rate`` of the calibration pixels lie."""
    index = int(np.searchsorted(-scale.at_or_above, -rate))
    return round(float(scale.edges[min(index, len(scale.edges) - 1)]), 6)
