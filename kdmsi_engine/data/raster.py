"""Opening rasters with checks, and reading them onto a :class:`Grid` by windows.

:func:`open_raster` turns every way a file can be unusable (missing, not a raster, truncated,
no CRS) into a one-line :class:`RasterError`. :class:`GridReader` reads any window of the grid
from one raster, aligned (a plain windowed read when the raster already is on the grid, a
``WarpedVRT`` otherwise), boundless (outside the raster is invalid), with its valid mask from
nodata values, alpha bands and dataset masks.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Literal, overload

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kdmsi_engine.data.grid import Grid, offset_in
from kdmsi_engine.errors import RasterError

logger = logging.getLogger(__name__)

#: Most GeoTIFF blocks whose offsets are checked against the file size (truncation check).
MAX_BLOCKS_CHECKED = 20000
_ALPHA_MAX = {"uint8": 255, "uint16": 65535, "int16": 32767}


def open_raster(path: str | os.PathLike[str], *, what: str = "raster") -> rasterio.DatasetReader:
    """Open ``path`` for reading and check that it is a complete, readable raster.

    Raises:
        RasterError: missing file, not a raster, truncated or unreadable.
    """
    p = Path(path)
    text = str(path)
    is_gdal_path = text.startswith(("/vsi", "http://", "https://")) or ":" in p.name
    if not is_gdal_path and not p.exists():
        raise RasterError(f"{what} {p} does not exist; check the path")
    if not is_gdal_path and p.is_dir():
        raise RasterError(f"{what} {p} is a folder, not a raster file; give a raster file")
    try:
        with warnings.catch_warnings(), _GdalIOWarnings() as io_warnings:
            # Plain images (folder datasets) have no georeferencing; the scene checks CRSs.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(text)
    except RasterioIOError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "unknown format"
        if not is_gdal_path and not os.access(p, os.R_OK):
            raise RasterError(f"{what} {p} cannot be read (permission denied)") from exc
        raise RasterError(
            f"{what} {p} is not a readable raster ({detail}); give a GeoTIFF or another GDAL raster"
        ) from exc
    except RasterioError as exc:  # pragma: no cover - other GDAL failures
        raise RasterError(f"{what} {p} cannot be opened: {exc}") from exc
    try:
        if io_warnings.messages:
            raise RasterError(
                f"{what} {p} is truncated or damaged ({io_warnings.messages[0]}); "
                "copy or download it again"
            )
        _check_complete(dataset, p, what)
    except BaseException:
        dataset.close()
        raise
    return dataset


class _GdalIOWarnings(logging.Handler):
    """Collects GDAL's read-error warnings (a truncated file often only warns on open)."""

    PATTERN = re.compile(r"IO error|truncat|Read error|short read|Cannot read", re.IGNORECASE)

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("rasterio._env")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.PATTERN.search(message):
            self.messages.append(message.split(": ", 1)[-1].strip())

    def __enter__(self) -> _GdalIOWarnings:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


def _check_complete(dataset: rasterio.DatasetReader, path: Path, what: str) -> None:
    """Raise if the raster has no bands, an unusable type, or its data lies past the file end."""
    if dataset.count < 1 or dataset.width < 1 or dataset.height < 1:
        raise RasterError(f"{what} {path} has no pixels or no bands; give a raster with data")
    if any(np.dtype(dt).kind == "c" for dt in dataset.dtypes):
        raise RasterError(f"{what} {path} has complex values; give a real-valued raster")
    if dataset.driver == "GTiff" and path.is_file():
        size = path.stat().st_size
        end = _max_block_end(dataset)
        if end is not None and end > size:
            raise RasterError(
                f"{what} {path} is truncated (data ends at byte {end}, file has {size}); "
                "copy or download it again"
            )
    # Last resort: read the last pixel of every band (catches corrupt final blocks).
    try:
        dataset.read(window=Window(dataset.width - 1, dataset.height - 1, 1, 1))
    except RasterioError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "read failed"
        raise RasterError(
            f"{what} {path} is damaged or truncated ({detail}); copy or download it again"
        ) from exc


def _max_block_end(dataset: rasterio.DatasetReader) -> int | None:
    """Largest ``offset + size`` over the GeoTIFF's data blocks (``None`` if unknown)."""
    bx, by = dataset.block_shapes[0][1], dataset.block_shapes[0][0]
    nx = (dataset.width + bx - 1) // bx
    ny = (dataset.height + by - 1) // by
    bands = (
        [1]
        if dataset.interleaving and dataset.interleaving.name == "pixel"
        else list(dataset.indexes)
    )
    positions = [(x, y) for y in range(ny) for x in range(nx)]
    if len(positions) * len(bands) > MAX_BLOCKS_CHECKED:
        positions = positions[-max(1, MAX_BLOCKS_CHECKED // len(bands)) :]
    end = None
    for band in bands:
        for x, y in positions:
            off = dataset.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
            cnt = dataset.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
            if off is None or cnt is None:
                continue
            value = int(off) + int(cnt)
            end = value if end is None else max(end, value)
    return end


def alpha_band(dataset: rasterio.DatasetReader) -> int | None:
    """1-based index of the raster's alpha band, or ``None``."""
    for i, ci in enumerate(dataset.colorinterp, start=1):
        if ci == ColorInterp.alpha:
            return i
    flags = dataset.mask_flag_enums[0] if dataset.mask_flag_enums else []
    if MaskFlags.alpha in flags and dataset.count in (2, 4):
        return dataset.count
    return None


def data_bands(dataset: rasterio.DatasetReader) -> tuple[int, ...]:
    """Indexes of the bands that are not alpha bands."""
    alpha = alpha_band(dataset)
    return tuple(i for i in dataset.indexes if i != alpha)


class GridReader:
    """Reads windows of one raster as they fall on ``grid``.

    Args:
        dataset: an open raster.
        grid: the grid to read onto.
        resampling: resampling when the raster must be warped (bilinear for images, nearest for
            masks and classes).
        use_geotransform: ``False`` for ungeoreferenced rasters: the raster's pixels are the
            grid's pixels (same size required).
    """

    def __init__(
        self,
        dataset: rasterio.DatasetReader,
        grid: Grid,
        *,
        resampling: Resampling = Resampling.bilinear,
        use_geotransform: bool = True,
    ) -> None:
        self.dataset = dataset
        self.grid = grid
        self._alpha = alpha_band(dataset)
        self._vrt: WarpedVRT | None = None
        offset = (0, 0) if not use_geotransform else offset_in(dataset.transform, grid)
        if use_geotransform and dataset.crs != grid.crs:
            offset = None
        if offset is not None:
            self._source = dataset
            self._row0, self._col0 = offset
            self._src_shape = (dataset.height, dataset.width)
            self._alpha_index = self._alpha
        else:
            add_alpha = self._alpha is None
            self._vrt = WarpedVRT(
                dataset,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=resampling,
                add_alpha=add_alpha,
                src_alpha=self._alpha or 0,
            )
            self._source = self._vrt
            self._row0, self._col0 = 0, 0
            self._src_shape = (grid.height, grid.width)
            self._alpha_index = self._vrt.count if add_alpha else self._alpha
        self._nan_possible = any(np.dtype(dt).kind == "f" for dt in dataset.dtypes)
        self._all_valid = (
            self._vrt is None
            and self._alpha is None
            and all(MaskFlags.all_valid in flags for flags in dataset.mask_flag_enums)
        )

    @property
    def warped(self) -> bool:
        """Whether reads go through a WarpedVRT."""
        return self._vrt is not None

    def _clip(self, window: Window) -> tuple[Window, tuple[slice, slice]] | None:
        """The part of ``window`` inside the source (in source pixels) and where it goes."""
        row0 = int(round(window.row_off)) + self._row0
        col0 = int(round(window.col_off)) + self._col0
        h, w = int(round(window.height)), int(round(window.width))
        r0, c0 = max(row0, 0), max(col0, 0)
        r1 = min(row0 + h, self._src_shape[0])
        c1 = min(col0 + w, self._src_shape[1])
        if r1 <= r0 or c1 <= c0:
            return None
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        return inner, (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))

    @overload
    def read(
        self, window: Window, bands: tuple[int, ...], *, with_data: Literal[True] = True
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def read(
        self, window: Window, bands: tuple[int, ...], *, with_data: Literal[False]
    ) -> tuple[None, np.ndarray]: ...

    def read(
        self, window: Window, bands: tuple[int, ...], *, with_data: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Read ``bands`` and the valid mask for a grid window (boundless).

        Returns:
            ``(data, valid)``: data ``(C, h, w)`` in the raster's type (zeros outside), or
            ``None`` when ``with_data`` is false; valid ``(h, w)`` bool.
        """
        h, w = int(round(window.height)), int(round(window.width))
        valid = np.zeros((h, w), dtype=bool)
        data = None
        if with_data:
            data = np.zeros((len(bands), h, w), dtype=self.dataset.dtypes[bands[0] - 1])
        clipped = self._clip(window)
        if clipped is None:
            return data, valid
        inner, (rs, cs) = clipped
        alpha = None
        part = None
        if with_data or self._nan_possible:
            indexes = list(bands)
            if self._alpha_index is not None and self._alpha_index not in indexes:
                indexes.append(self._alpha_index)  # one read (one warp) for data and alpha
            arr = self._source.read(indexes, window=inner)
            part = arr[: len(bands)]
            if self._alpha_index is not None:
                alpha = arr[indexes.index(self._alpha_index)]
        part_valid = self._read_valid(inner, bands, alpha)
        if part is not None:
            if self._nan_possible:
                part_valid &= np.all(np.isfinite(part), axis=0)
            if data is not None:
                if data.dtype != part.dtype:
                    data = data.astype(part.dtype)
                data[:, rs, cs] = part
        valid[rs, cs] = part_valid
        return data, valid

    def _read_valid(
        self, inner: Window, bands: tuple[int, ...], alpha: np.ndarray | None = None
    ) -> np.ndarray:
        shape = (int(inner.height), int(inner.width))
        if self._all_valid:
            return np.ones(shape, dtype=bool)
        masks = self._source.read_masks(list(bands), window=inner)
        valid = np.all(masks > 0, axis=0)
        if self._alpha_index is not None:
            if alpha is None:
                alpha = self._source.read(self._alpha_index, window=inner)
            valid &= self._alpha_valid(alpha)
        return valid

    def read_valid_coarse(self, window: Window, bands: tuple[int, ...], factor: int) -> np.ndarray:
        """Valid mask of a grid window at 1/``factor`` resolution (nearest sampling).

        Returns a bool array of ``(ceil(h / factor), ceil(w / factor))`` cells; used to estimate
        valid fractions of large tiles cheaply. ``factor`` 1 is :meth:`read`'s mask.
        """
        if factor <= 1:
            return self.read(window, bands, with_data=False)[1]
        h, w = int(round(window.height)), int(round(window.width))
        out = np.zeros((-(-h // factor), -(-w // factor)), dtype=bool)
        clipped = self._clip(window)
        if clipped is None:
            return out
        inner, (rs, cs) = clipped
        i0, i1 = rs.start // factor, -(-rs.stop // factor)
        j0, j1 = cs.start // factor, -(-cs.stop // factor)
        shape = (i1 - i0, j1 - j0)
        if self._all_valid:
            out[i0:i1, j0:j1] = True
            return out
        masks = self._source.read_masks(
            list(bands), window=inner, out_shape=(len(bands), *shape), resampling=Resampling.nearest
        )
        valid = np.all(masks > 0, axis=0)
        extra = [self._alpha_index] if self._alpha_index is not None else []
        if self._nan_possible or extra:
            indexes = (list(bands) if self._nan_possible else []) + extra
            arr = self._source.read(
                indexes,
                window=inner,
                out_shape=(len(indexes), *shape),
                resampling=Resampling.nearest,
            )
            if self._nan_possible:
                valid &= np.all(np.isfinite(arr[: len(bands)]), axis=0)
            if extra:
                valid &= self._alpha_valid(arr[-1])
        out[i0:i1, j0:j1] = valid
        return out

    def _alpha_valid(self, alpha: np.ndarray) -> np.ndarray:
        if self._vrt is not None and self._alpha is None:
            return alpha >= _ALPHA_MAX.get(str(alpha.dtype), 255) / 2.0
        return alpha > 0

    def close(self) -> None:
        if self._vrt is not None:
            self._vrt.close()
            self._vrt = None
