"""GeoTIFF outputs written window by window: tiled, DEFLATE-compressed, with overviews.

Every raster the engine writes (change probability, pseudo labels, binary change) goes through
these helpers, so all outputs share one layout: 512 x 512 internal tiles, DEFLATE with a
predictor, BigTIFF when needed, internal overviews built at the end, and a bounded GDAL block
cache (:data:`GDAL_CACHE_BYTES`) so that writing and overview building never hold a whole scene.

Conventions:
    * probability rasters: float32 in [0, 1], nodata :data:`PROB_NODATA` (-1) where the input
      had no data;
    * class rasters: uint8, 1 change, 0 no change, :data:`CLASS_NODATA` (255) nodata, with the
      colour table :data:`CLASS_COLORMAP` (1 red, 0 transparent-ish black, 255 transparent).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.environment import usable_cpus
from kdmsi_engine.errors import GridError, InputError
from kdmsi_engine.progress import Progress

logger = logging.getLogger(__name__)

#: nodata value of float32 probability rasters (outside [0, 1], so no threshold selects it).
PROB_NODATA = -1.0
#: nodata value of uint8 class rasters (change / pseudo labels).
CLASS_NODATA = 255
#: internal tile size of every GeoTIFF the engine writes.
BLOCK_SIZE = 512
#: GDAL block cache while writing (bytes); keeps memory independent of the scene size.
GDAL_CACHE_BYTES = 64 * 1024 * 1024
#: colour table of class rasters: 0 no change, 1 change (red), 255 nodata.
CLASS_COLORMAP: dict[int, tuple[int, int, int, int]] = {
    0: (0, 0, 0, 0),
    1: (230, 25, 25, 255),
    255: (0, 0, 0, 0),
}


class GridLike(Protocol):
    """What the helpers need of a grid (``kdmsi_engine.data.scene.Grid`` fits)."""

    @property
    def crs(self) -> Any: ...
    @property
    def transform(self) -> Any: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


def _block_size(grid: GridLike, block: int = BLOCK_SIZE) -> int:
    """512, or the smallest multiple of 16 covering a small raster (smaller files)."""
    largest = max(grid.width, grid.height)
    if largest >= block:
        return block
    return max(16, int(math.ceil(largest / 16.0)) * 16)


def compression_threads() -> str:
    """Threads GDAL compresses a GeoTIFF's blocks with: ``GDAL_NUM_THREADS`` if the user set
    it, else every CPU the process may use.

    GDAL compresses a block when it leaves its cache: for a map that fits the cache, all of
    them at the end, with the overviews, while nothing else runs. A 2048 x 2048 float32 map's
    last flush and overviews took 0.38 s in one thread and 0.22 s in two (issue 14). It is a
    creation option: GDAL reads it when the file is created.
    """
    return os.environ.get("GDAL_NUM_THREADS") or str(usable_cpus())


def geotiff_profile(
    grid: GridLike,
    *,
    count: int = 1,
    dtype: str = "float32",
    nodata: float | int | None = None,
    block: int = BLOCK_SIZE,
) -> dict[str, Any]:
    """Creation profile of a tiled, DEFLATE-compressed GeoTIFF on ``grid``.

    Args:
        grid: target grid (CRS, transform, width, height); CRS may be ``None`` (pixel grid).
        count: number of bands.
        dtype: numpy/rasterio data type name.
        nodata: nodata value or ``None``.
        block: internal tile size (multiple of 16).
    """
    size = _block_size(grid, block)
    floating = np.dtype(dtype).kind == "f"
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": int(grid.width),
        "height": int(grid.height),
        "count": int(count),
        "dtype": dtype,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": size,
        "blockysize": size,
        "compress": "deflate",
        "zlevel": 6,
        "predictor": 3 if floating else 2,
        "interleave": "band" if count > 1 else "pixel",
        "BIGTIFF": "IF_SAFER",
        "num_threads": compression_threads(),
    }
    if np.dtype(dtype).itemsize == 1:
        profile["predictor"] = 1
    if grid.crs is not None:
        profile["crs"] = grid.crs
    if nodata is not None:
        profile["nodata"] = nodata
    return profile


@contextlib.contextmanager
def bounded_gdal_cache(cache_bytes: int = GDAL_CACHE_BYTES) -> Iterator[None]:
    """Limit GDAL's block cache (default 5 % of RAM) while a raster is written or read."""
    with rasterio.Env(GDAL_CACHEMAX=int(cache_bytes)):
        yield


@contextlib.contextmanager
def create_geotiff(
    path: str | os.PathLike[str],
    grid: GridLike,
    *,
    count: int = 1,
    dtype: str = "float32",
    nodata: float | int | None = None,
    block: int = BLOCK_SIZE,
    **extra: Any,
) -> Iterator[Any]:
    """Open a new tiled, compressed GeoTIFF for writing (no atomic rename: wrap the caller).

    Yields:
        the open rasterio dataset (mode ``w``).
    """
    profile = geotiff_profile(grid, count=count, dtype=dtype, nodata=nodata, block=block)
    profile.update(extra)
    with bounded_gdal_cache(), rasterio.open(Path(path), "w", **profile) as dst:
        yield dst


def overview_factors(width: int, height: int, min_size: int = 256) -> list[int]:
    """Overview decimation factors 2, 4, 8, ... until the overview is below ``min_size``."""
    factors: list[int] = []
    factor = 2
    while max(width, height) / factor >= min_size / 2 and max(width, height) > min_size:
        factors.append(factor)
        factor *= 2
    return factors


def add_overviews(dataset: Any, resampling: str = "average", min_size: int = 256) -> list[int]:
    """Build internal overviews on an open dataset (mode ``w`` or ``r+``); return the factors.

    Use ``average`` for probabilities (nodata is excluded by GDAL) and ``nearest`` for classes.
    """
    factors = overview_factors(dataset.width, dataset.height, min_size)
    if factors:
        with bounded_gdal_cache():
            dataset.build_overviews(factors, Resampling[resampling])
            dataset.update_tags(ns="rio_overview", resampling=resampling)
    return factors


def block_windows(width: int, height: int, block: int = BLOCK_SIZE) -> Iterator[Window]:
    """Row-major windows of ``block`` x ``block`` pixels covering a ``width`` x ``height`` grid."""
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(block, height - row))


def strip_windows(width: int, height: int, rows: int = BLOCK_SIZE) -> Iterator[Window]:
    """Full-width strips of ``rows`` rows (aligned with the output tiles)."""
    for row in range(0, height, rows):
        yield Window(0, row, width, min(rows, height - row))


def check_threshold(threshold: float) -> float:
    """A probability threshold in [0, 1), or :class:`InputError`."""
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"threshold {threshold!r} is not a number; give a value in [0, 1)"
        ) from exc
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise InputError(f"threshold {threshold!r} is outside [0, 1); give e.g. 0.3 or 0.5")
    return value


def valid_values(values: np.ndarray, nodata: Any) -> np.ndarray:
    """Pixels of a band that hold data: finite and not the band's (finite) nodata value."""
    valid = np.isfinite(values)
    if nodata is not None and np.isfinite(nodata):
        valid &= values != nodata
    return valid


def open_on_one_grid(
    stack: contextlib.ExitStack, paths: Any, what: str = "probability raster"
) -> list[Any]:
    """Open rasters (entered on ``stack``) and check they share the first one's grid.

    Raises:
        GridError: a raster's size, CRS or transform differs from the first's.
    """
    sources = [stack.enter_context(open_raster(p, what)) for p in paths]
    first = sources[0]
    for path, src in zip(list(paths)[1:], sources[1:]):
        if (src.width, src.height, src.crs, src.transform) != (
            first.width,
            first.height,
            first.crs,
            first.transform,
        ):
            raise GridError(f"{path} is not on the grid of {paths[0]}; make both from one scene")
    return sources


def open_raster(path: str | os.PathLike[str], what: str = "raster") -> Any:
    """Open a raster for reading, or raise :class:`RasterError` with one line.

    The data layer's checks (missing, not a raster, truncated) with a positional ``what``.
    """
    from kdmsi_engine.data.raster import open_raster as _open_checked

    return _open_checked(path, what=what)


def write_uint8_classes(
    prob_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    threshold: float = 0.5,
    *,
    band: int = 1,
    exclude: Callable[[int, int, int], np.ndarray] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Threshold a probability raster into a uint8 class raster with a colour table.

    ``1`` where probability > ``threshold``, ``0`` elsewhere, :data:`CLASS_NODATA` where the
    probability raster is nodata (or NaN). Written strip by strip, atomically, with overviews.
    ``exclude(row, height, width)``, when given, returns a bool mask of a full-width strip whose
    pixels are written 0 whatever their probability (e.g. tiles labelled unchanged).

    Returns:
        ``out_path`` as a :class:`Path`.
    """
    progress = progress or Progress()
    value = check_threshold(threshold)
    target = check_output(out_path, overwrite=overwrite)
    with open_raster(prob_path, "probability raster") as src:
        if band < 1 or band > src.count:
            raise InputError(f"{prob_path} has {src.count} band(s), band {band} asked for")
        nodata = src.nodata
        strips = list(strip_windows(src.width, src.height))
        progress.stage("classes", total=len(strips), message=f"threshold {value:g}")
        with atomic_output(target, overwrite=overwrite) as tmp:
            with create_geotiff(tmp, src, dtype="uint8", nodata=CLASS_NODATA) as dst:
                for window in strips:
                    progress.check_cancelled()
                    prob = src.read(band, window=window)
                    classes = classes_from_probability(prob, value, nodata)
                    if exclude is not None:
                        shape = (int(window.row_off), int(window.height), int(window.width))
                        classes[exclude(*shape) & (classes == 1)] = 0
                    dst.write(classes, 1, window=window)
                    progress.advance()
                dst.write_colormap(1, CLASS_COLORMAP)
                add_overviews(dst, "nearest")
    return target


def classes_from_probability(
    prob: np.ndarray, threshold: float, nodata: float | None = PROB_NODATA
) -> np.ndarray:
    """uint8 classes (1 > threshold, 0 otherwise, 255 nodata/NaN) from a probability array."""
    invalid = ~np.isfinite(prob)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        invalid |= prob == nodata
    out = (prob > threshold).astype(np.uint8)
    out[invalid] = CLASS_NODATA
    return out
