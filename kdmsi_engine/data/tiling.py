"""Tile grids over a scene: windows, footprints, valid fractions, and the labelling grid file.

:func:`tile_windows` covers a grid with full-size tiles (the last row and column are shifted
back inside the grid, so every tile has the same size). :func:`make_tile_grid` turns them into
a GeoDataFrame with each tile's valid fraction, reading only valid masks, one tile at a time.
:func:`write_tile_grid` writes the labelling grid: tile footprints with an empty ``change``
field for the analyst to fill in.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
from rasterio.windows import Window
from shapely.geometry import Polygon

from kdmsi_engine import defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.data.grid import Grid
from kdmsi_engine.errors import GridError, InputError, OutputError
from kdmsi_engine.progress import Progress

if TYPE_CHECKING:
    from kdmsi_engine.data.scene import ScenePair

logger = logging.getLogger(__name__)

#: Columns of a tile grid, geometry last.
TILE_COLUMNS = ("tile_id", "row_off", "col_off", "width", "height", "valid_fraction")
#: Layer name of the labelling grid GeoPackage.
GRID_LAYER = "tiles"
#: Tiles larger than this are judged from coarser valid masks (cheap on huge tiles).
MASK_SIDE = 256
#: Attribute the analyst fills in (1 changed, 0 unchanged, empty = not labelled).
CHANGE_FIELD = "change"


def check_tile_params(tile_size: int, overlap: int = 0) -> None:
    """Raise :class:`InputError` for a bad tile size or overlap."""
    if int(tile_size) != tile_size or tile_size < 8:
        raise InputError(f"tile size {tile_size} is too small; use at least 8 pixels (e.g. 256)")
    if int(overlap) != overlap or overlap < 0 or overlap >= tile_size:
        raise InputError(f"overlap {overlap} must be between 0 and tile size - 1 ({tile_size - 1})")


def _offsets(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile + 1, stride))
    if offsets[-1] + tile < size:
        offsets.append(size - tile)
    return offsets


def tile_windows(grid: Grid, tile_size: int, overlap: int = 0) -> list[Window]:
    """Windows of ``tile_size`` pixels covering ``grid``, ``overlap`` pixels apart.

    Tiles step by ``tile_size - overlap``; the last row and column are moved back to end at
    the grid's edge, so all tiles lie inside the grid and have the same size (a grid smaller
    than one tile gives one tile of the grid's size). Row-major order.
    """
    check_tile_params(tile_size, overlap)
    stride = tile_size - overlap
    rows = _offsets(grid.height, tile_size, stride)
    cols = _offsets(grid.width, tile_size, stride)
    h, w = min(tile_size, grid.height), min(tile_size, grid.width)
    return [Window(c, r, w, h) for r in rows for c in cols]


def window_polygon(grid: Grid, window: Window) -> Polygon:
    """The footprint of a grid window as a polygon in the grid's CRS."""
    t = grid.window_transform(window)
    w, h = window.width, window.height
    return Polygon([t * (0, 0), t * (w, 0), t * (w, h), t * (0, h)])


def check_scene_fits(grid: Grid, tile_size: int) -> None:
    """Raise :class:`GridError` when the grid is smaller than one tile."""
    if grid.width < tile_size or grid.height < tile_size:
        raise GridError(
            f"the scene overlap is {grid.width}x{grid.height} pixels, smaller than one "
            f"{tile_size}x{tile_size} tile; use a smaller tile size"
        )


def make_tile_grid(
    scene: ScenePair,
    tile_size: int = defaults.TILE_SIZE,
    overlap: int = defaults.GRID_OVERLAP,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    progress: Progress | None = None,
    *,
    mask_side: int | None = MASK_SIDE,
) -> gpd.GeoDataFrame:
    """The tiles of ``scene`` with at least ``min_valid_fraction`` valid pixels.

    Only the valid masks are read, one tile at a time, so memory depends on the tile size.
    Tiles larger than ``mask_side`` pixels are judged from masks read at a coarser resolution
    (``None``: always full resolution).

    Returns:
        GeoDataFrame with ``tile_id, row_off, col_off, width, height, valid_fraction, geometry``
        (CRS: the scene's). ``tile_id`` numbers all tiles of the grid in row-major order, kept
        tiles keep their number.

    Raises:
        GridError: the scene is smaller than one tile, or no tile has enough valid pixels.
    """
    progress = progress or Progress()
    check_tile_params(tile_size, overlap)
    if not 0.0 <= float(min_valid_fraction) <= 1.0:
        raise InputError(f"minimum valid fraction {min_valid_fraction} must be between 0 and 1")
    grid = scene.grid
    check_scene_fits(grid, tile_size)
    windows = tile_windows(grid, tile_size, overlap)
    progress.stage("tiles", total=len(windows), message=f"{len(windows)} tiles of {tile_size} px")
    records: list[tuple[int, int, int, int, int, float]] = []
    geometries: list[Polygon] = []
    best = 0.0
    for tile_id, window in enumerate(windows):
        if tile_id % 64 == 0:
            progress.check_cancelled()
        fraction = scene.valid_fraction(window, max_side=mask_side)
        best = max(best, fraction)
        if fraction >= min_valid_fraction and fraction > 0:
            records.append(
                (tile_id, window.row_off, window.col_off, window.width, window.height, fraction)
            )
            geometries.append(window_polygon(grid, window))
        progress.advance(1)
    if not records:
        raise GridError(
            f"no {tile_size} px tile of scene {scene.name} has {min_valid_fraction:.0%} valid "
            f"pixels (best {best:.0%}); lower the minimum valid fraction or the tile size"
        )
    return tiles_frame(records, geometries, grid.crs)


def tiles_frame(
    records: list[tuple[int, int, int, int, int, float]],
    geometries: list[Polygon],
    crs: object,
) -> gpd.GeoDataFrame:
    """A tile GeoDataFrame from ``(tile_id, row_off, col_off, width, height, fraction)``."""
    arr = np.asarray(records, dtype=np.float64).reshape(-1, 6)
    data = {
        "tile_id": arr[:, 0].astype(np.int64),
        "row_off": arr[:, 1].astype(np.int64),
        "col_off": arr[:, 2].astype(np.int64),
        "width": arr[:, 3].astype(np.int64),
        "height": arr[:, 4].astype(np.int64),
        "valid_fraction": arr[:, 5],
    }
    return gpd.GeoDataFrame(data, geometry=geometries, crs=crs)


def tile_window(row: Any) -> Window:
    """The pixel window of one tile record (a row of a tile GeoDataFrame)."""
    return Window(int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"]))


def write_tile_grid(
    tiles: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    layer: str = GRID_LAYER,
) -> Path:
    """Write the labelling grid: tile footprints and an empty integer ``change`` field.

    The analyst sets ``change`` to 1 (changed) or 0 (unchanged) on the tiles they know; empty
    (NULL) tiles are unmarked. The file is a GeoPackage, written atomically.
    """
    target = check_output(path, overwrite=overwrite)
    if target.suffix.lower() != ".gpkg":
        raise OutputError(f"the labelling grid must be a GeoPackage (.gpkg), not {target.name}")
    missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
    if missing:
        raise InputError(
            f"tile table lacks columns {', '.join(missing)}; make it with make_tile_grid"
        )
    frame = gpd.GeoDataFrame(
        {
            "tile_id": tiles["tile_id"].astype(int).to_numpy(),
            "row_off": tiles["row_off"].astype(int).to_numpy(),
            "col_off": tiles["col_off"].astype(int).to_numpy(),
            "width": tiles["width"].astype(int).to_numpy(),
            "height": tiles["height"].astype(int).to_numpy(),
            "valid_fraction": tiles["valid_fraction"].astype(float).round(4).to_numpy(),
            CHANGE_FIELD: [None] * len(tiles),
        },
        geometry=tiles.geometry.to_numpy(),
        crs=tiles.crs,
    )
    schema = {
        "geometry": "Polygon",
        "properties": {
            "tile_id": "int",
            "row_off": "int",
            "col_off": "int",
            "width": "int",
            "height": "int",
            "valid_fraction": "float",
            CHANGE_FIELD: "int",
        },
    }
    with atomic_output(target, overwrite=overwrite) as tmp:
        write_vector(frame, tmp, target, driver="GPKG", layer=layer, schema=schema)
    logger.info("labelling grid: %d tiles -> %s", len(frame), target)
    return target


_DISK_FULL = re.compile(r"disk is full|no space left|disk full", re.IGNORECASE)


def write_vector(frame: gpd.GeoDataFrame, tmp: Path, target: Path, **kwargs: Any) -> None:
    """``frame.to_file(tmp, **kwargs)`` with GDAL/fiona failures turned into :class:`OutputError`.

    fiona reports a full disk (SQLite "database or disk is full") as a ``RuntimeError`` or a
    driver error, not an ``OSError``; this names the final file and says what to do.
    """
    try:
        frame.to_file(tmp, **kwargs)
    except OSError:
        raise
    except Exception as exc:  # fiona/GDAL raise several unrelated types  # noqa: BLE001
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if _DISK_FULL.search(str(exc)) or _low_space(target.parent):
            raise OutputError(
                f"disk full while writing {target}; free space or choose another folder"
            ) from exc
        raise OutputError(f"cannot write {target}: {detail}") from exc


def _low_space(folder: Path, minimum: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < minimum
    except OSError:
        return False
