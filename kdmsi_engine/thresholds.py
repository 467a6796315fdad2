"""Thresholds without pixel truth: Otsu's method and quantiles of streamed histograms.

Every automatic threshold of the engine comes from a histogram of a map's values, accumulated
window by window (:class:`Histogram`), so choosing a threshold never holds a scene in memory:

* :func:`otsu_threshold`: the value that maximises the between-class variance of the histogram
  (Otsu 1979), for a map whose values form two groups (change and no change);
* :func:`quantile_threshold`: the value under which a given fraction of the histogram lies, for
  known negatives (tiles an analyst labelled unchanged): their 99th percentile bounds the false
  positive rate at about 1 % (``unchanged-q``).

:func:`parse_threshold_spec` reads a user's threshold: a number in [0, 1), ``otsu`` or
``unchanged-q``; :func:`raster_threshold` resolves the named ones over a probability raster.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

from kdmsi_engine.errors import InputError

logger = logging.getLogger(__name__)

#: Bins of the histograms behind automatic thresholds (on [0, 1]: steps of 0.001).
HIST_BINS = 1000
#: The automatic threshold accepted wherever a probability raster is thresholded.
OTSU = "otsu"
#: The quantile of the values on tiles labelled unchanged (needs weak labels).
UNCHANGED_Q = "unchanged-q"
NAMED = (OTSU, UNCHANGED_Q)


class Histogram:
    """A fixed-bin histogram of values in [``low``, ``high``], filled window by window."""

    def __init__(self, bins: int = HIST_BINS, low: float = 0.0, high: float = 1.0) -> None:
        self.edges = np.linspace(low, high, bins + 1)
        self.counts = np.zeros(bins, np.int64)

    def add(self, values: np.ndarray) -> None:
        """Add values (clipped into the range; NaNs are dropped)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            clipped = np.clip(values, self.edges[0], self.edges[-1])
            self.counts += np.histogram(clipped, bins=self.edges)[0]

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def otsu(self) -> float | None:
        """Otsu's threshold, or ``None`` when empty."""
        return otsu_threshold(self.counts, self.edges) if self.total else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (upper bin edge), or ``None`` when empty."""
        return quantile_threshold(self.counts, self.edges, q)


def otsu_threshold(hist: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold of a histogram (maximum between-class variance); 0.5 if empty.

    Returns the upper edge of the last bin of the lower class, so ``value > threshold`` selects
    the upper class.
    """
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def quantile_threshold(hist: np.ndarray, edges: np.ndarray, q: float) -> float | None:
    """The value under which a fraction ``q`` of the histogram lies (upper bin edge)."""
    total = hist.sum()
    if total <= 0:
        return None
    cdf = np.cumsum(hist) / total
    k = int(np.searchsorted(cdf, q, side="left"))
    return float(edges[min(k + 1, len(edges) - 1)])


def parse_threshold_spec(value: float | str, named: tuple[str, ...] = NAMED) -> float | str:
    """A probability threshold: a number in [0, 1) or one of ``named``; else InputError."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in named:
            return text
        try:
            value = float(text)
        except ValueError as exc:
            raise InputError(
                f"threshold {value!r} is neither a number in [0, 1) nor one of "
                f"{', '.join(named)}; give e.g. 0.5 or {named[0]}"
            ) from exc
    from kdmsi_engine.rasterio_out import check_threshold

    return check_threshold(value)


def raster_threshold(
    path: str | os.PathLike[str],
    spec: float | str,
    *,
    band: int = 1,
    unchanged: Callable[[int, int, int], np.ndarray] | None = None,
    quantile: float = 0.99,
) -> float:
    """Resolve a threshold for a probability raster: a number as is, a named one from the data.

    ``otsu``: Otsu's threshold over the raster's valid pixels (not nodata, not NaN).
    ``unchanged-q``: the ``quantile`` of the values on the pixels ``unchanged(row, height,
    width)`` marks (tiles labelled unchanged), read strip by strip.
    """
    value = parse_threshold_spec(spec)
    if not isinstance(value, str):
        return float(value)
    if value == UNCHANGED_Q and unchanged is None:
        raise InputError(
            "threshold unchanged-q needs weak labels with tiles labelled unchanged; give a "
            "number or otsu"
        )
    from kdmsi_engine.rasterio_out import (
        bounded_gdal_cache,
        open_raster,
        strip_windows,
        valid_values,
    )

    histogram = Histogram()
    with bounded_gdal_cache(), open_raster(path, "probability raster") as src:
        nodata = src.nodata
        for window in strip_windows(src.width, src.height):
            data = src.read(band, window=window)
            valid = valid_values(data, nodata)
            if value == UNCHANGED_Q:
                assert unchanged is not None
                valid &= unchanged(int(window.row_off), int(window.height), int(window.width))
            histogram.add(data[valid])
    threshold = histogram.otsu() if value == OTSU else histogram.quantile(quantile)
    if threshold is None:
        where = "on tiles labelled unchanged " if value == UNCHANGED_Q else ""
        raise InputError(
            f"{path} has no valid pixel {where}to choose a threshold from; give a number"
        )
    logger.info("%s threshold of %s: %.4f", value, path, threshold)
    return min(threshold, 0.999)
