"""The pixel grid a scene is worked on: CRS, affine transform and size.

A :class:`Grid` is the one grid of a scene: both dates are read onto it, tiles are windows of
it, and every output raster of the scene is written on it. :func:`choose_grid` picks it from the
two rasters (the before raster's grid by default, UTM for geographic rasters, or a target CRS and
resolution) and crops it to the intersection of both footprints, keeping pixel alignment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import affine
import rasterio
import rasterio.windows
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from kdmsi_engine.errors import GridError, InputError

logger = logging.getLogger(__name__)

#: Tolerance (in pixels) under which two grids count as aligned.
ALIGN_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform (pixel to map) and size in pixels.

    Attributes:
        crs: the coordinate reference system, ``None`` only for ungeoreferenced folder datasets
            (whose transform maps pixel column/row to x/y as is).
        transform: affine transform from (col, row) to (x, y).
        width: number of columns.
        height: number of rows.
    """

    crs: CRS | None
    transform: affine.Affine
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` as positive numbers (map units)."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> BoundingBox:
        """``(left, bottom, right, top)`` of the whole grid, min/max ordered."""
        return self.window_bounds(Window(0, 0, self.width, self.height))

    def full_window(self) -> Window:
        """The window that covers the whole grid."""
        return Window(0, 0, self.width, self.height)

    def window_transform(self, window: Window) -> affine.Affine:
        """The affine transform of ``window`` (its top-left pixel at (0, 0))."""
        return rasterio.windows.transform(window, self.transform)

    def window_bounds(self, window: Window) -> BoundingBox:
        """``(left, bottom, right, top)`` of ``window``, min/max ordered."""
        t = self.window_transform(window)
        xs, ys = [], []
        for col, row in (
            (0, 0),
            (window.width, 0),
            (0, window.height),
            (window.width, window.height),
        ):
            x, y = t * (col, row)
            xs.append(x)
            ys.append(y)
        return BoundingBox(min(xs), min(ys), max(xs), max(ys))

    def is_georeferenced(self) -> bool:
        return self.crs is not None

    def to_dict(self) -> dict:
        """JSON-serialisable description (for run records)."""
        return {
            "crs": self.crs.to_string() if self.crs is not None else None,
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dataset(cls, dataset: rasterio.io.DatasetReader) -> Grid:
        """The grid of an open raster as it is."""
        return cls(dataset.crs, dataset.transform, dataset.width, dataset.height)


def utm_crs_for(lon: float, lat: float) -> CRS:
    """The WGS 84 UTM zone CRS that contains ``(lon, lat)``."""
    lon = ((lon + 180.0) % 360.0) - 180.0
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def parse_crs(value: object) -> CRS:
    """A CRS from ``EPSG:xxxx``, an integer EPSG code, WKT, PROJ string or CRS object."""
    if isinstance(value, CRS):
        return value
    try:
        if isinstance(value, int):
            return CRS.from_epsg(value)
        return CRS.from_user_input(value)
    except (CRSError, ValueError, TypeError) as exc:
        raise InputError(f"unknown CRS {value!r}; give e.g. EPSG:32633") from exc


def parse_resolution(value: object) -> tuple[float, float] | None:
    """``None``, one number, or ``(x, y)`` -> positive ``(x, y)`` pixel size."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        res = (float(value), float(value))
    else:
        try:
            items = [float(v) for v in value]  # type: ignore[attr-defined]
        except (TypeError, ValueError) as exc:
            raise InputError(f"resolution {value!r} is not a number; give e.g. 10") from exc
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise InputError(f"resolution {value!r} needs one or two numbers; give e.g. 10")
        res = (items[0], items[1])
    if not all(math.isfinite(r) and r > 0 for r in res):
        raise InputError(f"resolution {value!r} must be positive; give e.g. 10")
    return res


def base_grid(
    before: rasterio.io.DatasetReader,
    *,
    target_crs: object = None,
    resolution: object = None,
) -> Grid:
    """The grid before cropping: the before raster's, reprojected when needed.

    The before raster's own grid is kept when it is projected and no target is given. A
    geographic raster (degrees) goes to the UTM zone of its centre; ``target_crs`` and/or
    ``resolution`` give another CRS or pixel size (the resolution in the target's units).
    """
    src_crs = before.crs
    res = parse_resolution(resolution)
    dst_crs = parse_crs(target_crs) if target_crs is not None else None
    if dst_crs is None and src_crs.is_geographic:
        left, bottom, right, top = transform_bounds(src_crs, "EPSG:4326", *before.bounds)
        dst_crs = utm_crs_for((left + right) / 2.0, (bottom + top) / 2.0)
        logger.info("geographic raster: working in %s", dst_crs)
    if dst_crs is None:
        dst_crs = src_crs
    if dst_crs == src_crs and res is None:
        return Grid.from_dataset(before)
    if dst_crs == src_crs and res is not None:
        b = before.bounds
        width = max(1, int(math.ceil((b.right - b.left) / res[0] - ALIGN_TOLERANCE)))
        height = max(1, int(math.ceil((b.top - b.bottom) / res[1] - ALIGN_TOLERANCE)))
        transform = affine.Affine(res[0], 0.0, b.left, 0.0, -res[1], b.top)
        return Grid(dst_crs, transform, width, height)
    transform, width, height = calculate_default_transform(
        src_crs, dst_crs, before.width, before.height, *before.bounds, resolution=res
    )
    if res is None:
        # Square pixels of the mean size GDAL suggests, so x and y resolution agree.
        size = (abs(transform.a) + abs(transform.e)) / 2.0
        transform, width, height = calculate_default_transform(
            src_crs, dst_crs, before.width, before.height, *before.bounds, resolution=(size, size)
        )
    return Grid(dst_crs, transform, int(width), int(height))


def crop_to_bounds(grid: Grid, bounds: tuple[float, float, float, float]) -> Grid | None:
    """Crop ``grid`` to ``bounds`` (outwards to whole pixels); ``None`` if nothing is left."""
    window = rasterio.windows.from_bounds(*bounds, transform=grid.transform)
    col0 = max(0, int(math.floor(window.col_off + ALIGN_TOLERANCE)))
    row0 = max(0, int(math.floor(window.row_off + ALIGN_TOLERANCE)))
    col1 = min(grid.width, int(math.ceil(window.col_off + window.width - ALIGN_TOLERANCE)))
    row1 = min(grid.height, int(math.ceil(window.row_off + window.height - ALIGN_TOLERANCE)))
    if col1 <= col0 or row1 <= row0:
        return None
    cropped = Window(col0, row0, col1 - col0, row1 - row0)
    return Grid(grid.crs, grid.window_transform(cropped), col1 - col0, row1 - row0)


def footprint_in(dataset: rasterio.io.DatasetReader, crs: CRS) -> BoundingBox:
    """Bounding box of ``dataset``'s footprint in ``crs``."""
    if dataset.crs == crs:
        b = dataset.bounds
        return BoundingBox(
            min(b.left, b.right), min(b.bottom, b.top), max(b.left, b.right), max(b.bottom, b.top)
        )
    return BoundingBox(*transform_bounds(dataset.crs, crs, *dataset.bounds, densify_pts=21))


def intersect_bounds(a: BoundingBox, b: BoundingBox) -> BoundingBox | None:
    left, bottom = max(a.left, b.left), max(a.bottom, b.bottom)
    right, top = min(a.right, b.right), min(a.top, b.top)
    if right <= left or top <= bottom:
        return None
    return BoundingBox(left, bottom, right, top)


def choose_grid(
    before: rasterio.io.DatasetReader,
    after: rasterio.io.DatasetReader,
    *,
    target_crs: object = None,
    resolution: object = None,
) -> Grid:
    """The scene grid: :func:`base_grid`, cropped to the intersection of both footprints.

    Raises:
        GridError: the rasters do not overlap.
    """
    grid = base_grid(before, target_crs=target_crs, resolution=resolution)
    inter = intersect_bounds(grid.bounds, footprint_in(after, grid.crs))
    cropped = crop_to_bounds(grid, inter) if inter is not None else None
    if cropped is None:
        raise GridError(
            f"{before.name} and {after.name} do not overlap; give two rasters of the same place"
        )
    return cropped


def offset_in(dataset_transform: affine.Affine, grid: Grid) -> tuple[int, int] | None:
    """``(row, col)`` of the grid's origin in a raster's pixels if both grids are aligned.

    ``None`` when the raster must be warped (other pixel size, rotation, sub-pixel shift).
    """
    t = dataset_transform
    g = grid.transform
    if abs(t.b) > 0 or abs(t.d) > 0 or abs(g.b) > 0 or abs(g.d) > 0:
        return None
    if not (math.isclose(t.a, g.a, rel_tol=1e-9) and math.isclose(t.e, g.e, rel_tol=1e-9)):
        return None
    col = (g.c - t.c) / t.a
    row = (g.f - t.f) / t.e
    # Tolerance: the extent's rounding error stays far below a pixel over the grid.
    tol = 1e-3
    if abs(col - round(col)) > tol or abs(row - round(row)) > tol:
        return None
    return int(round(row)), int(round(col))
