"""Folder datasets laid out like LEVIR-CD: ``A/`` (before), ``B/`` (after), ``label/`` (masks).

File names match across the three folders. Images need no georeferencing: each pair is its own
pixel grid. Masks are change masks (any value > 0 is change, e.g. 0/255 or 0/1); tile labels are
derived from them (1 if the tile has a change pixel, else 0), for benchmarks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from kdmsi_engine import defaults
from kdmsi_engine.data.grid import Grid
from kdmsi_engine.data.raster import open_raster
from kdmsi_engine.data.scaling import BandScaling
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.data.tiling import make_tile_grid, tile_window
from kdmsi_engine.errors import GridError, LabelError
from kdmsi_engine.progress import Progress

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".vrt", ".img")
BEFORE_DIR, AFTER_DIR, LABEL_DIR = "A", "B", "label"


@dataclass
class FolderPair:
    """One image pair of a folder dataset.

    Attributes:
        name: the file stem shared by the three folders.
        before: image of the first date (``A/``).
        after: image of the second date (``B/``).
        label: change mask (``label/``), or ``None`` when the dataset has none.
    """

    name: str
    before: Path
    after: Path
    label: Path | None


def _images(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


def find_pairs(root: str | os.PathLike[str], *, require_labels: bool = False) -> list[FolderPair]:
    """The image pairs of a folder dataset, sorted by name.

    Raises:
        LabelError: ``root`` lacks ``A/`` or ``B/``, has no images, or names do not match.
    """
    base = Path(root)
    if not base.is_dir():
        raise LabelError(f"dataset folder {base} does not exist; give a folder with A/ B/ label/")
    dirs = {name: base / name for name in (BEFORE_DIR, AFTER_DIR, LABEL_DIR)}
    for name in (BEFORE_DIR, AFTER_DIR):
        if not dirs[name].is_dir():
            raise LabelError(
                f"dataset folder {base} has no {name}/ sub-folder; expected A/ (before), "
                "B/ (after) and label/ (change masks)"
            )
    if require_labels and not dirs[LABEL_DIR].is_dir():
        raise LabelError(f"dataset folder {base} has no label/ sub-folder with change masks")
    before, after = _images(dirs[BEFORE_DIR]), _images(dirs[AFTER_DIR])
    masks = _images(dirs[LABEL_DIR]) if dirs[LABEL_DIR].is_dir() else {}
    if not before:
        raise LabelError(f"dataset folder {dirs[BEFORE_DIR]} holds no images")
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise LabelError(
            f"{missing[0]} is in only one of A/ and B/ of {base}; every image needs a partner "
            "with the same name"
        )
    if masks or require_labels:
        lacking = sorted(set(before) - set(masks))
        if lacking:
            raise LabelError(
                f"{lacking[0]} has no change mask in {dirs[LABEL_DIR]}; add it or remove the pair"
            )
    return [FolderPair(name, before[name], after[name], masks.get(name)) for name in sorted(before)]


def open_folder_pair(
    pair: FolderPair, *, bands: object = None, scaling: BandScaling | dict | None = None
) -> ScenePair:
    """Open one pair as a :class:`ScenePair` on its pixel grid (CRS ``None`` allowed).

    8-bit images are scaled by /255 unless ``scaling`` says otherwise.
    """
    return ScenePair.open(
        pair.before,
        pair.after,
        bands=bands,
        scaling=scaling,
        require_crs=False,
        name=pair.name,
    )


def _open_mask(pair: FolderPair) -> rasterio.DatasetReader:
    if pair.label is None:
        raise LabelError(f"pair {pair.name} has no change mask; add label/{pair.name}")
    return open_raster(pair.label, what="change mask")


@contextlib.contextmanager
def _mask_on_grid(pair: FolderPair, grid: Grid | None) -> Iterator[Any]:
    """The change mask, warped (nearest) onto ``grid`` when both are georeferenced.

    A georeferenced pair (OSCD) opens on its UTM grid, while its mask file keeps the source
    grid: pixel windows of the scene only match the mask after this warp. Plain images (PNG)
    share one pixel grid and are read as they are.
    """
    with _open_mask(pair) as ds:
        if grid is None or grid.crs is None or ds.crs is None:
            yield ds
            return
        with WarpedVRT(
            ds,
            crs=grid.crs,
            transform=grid.transform,
            width=grid.width,
            height=grid.height,
            resampling=Resampling.nearest,
        ) as vrt:
            yield vrt


def read_mask(pair: FolderPair, window: Window, grid: Grid | None = None) -> np.ndarray:
    """uint8 ``(h, w)`` change mask (1 where the label is > 0) of a pixel window, 0 outside.

    Args:
        pair: the folder pair.
        window: pixel window on ``grid`` (the scene's grid from :func:`open_folder_pair`).
        grid: the scene grid; needed for georeferenced pairs, whose scene grid is warped.
    """
    with _mask_on_grid(pair, grid) as ds:
        return _read_mask(ds, window)


def _read_mask(ds: Any, window: Window) -> np.ndarray:
    h, w = int(window.height), int(window.width)
    out = np.zeros((h, w), dtype=np.uint8)
    r0, c0 = int(window.row_off), int(window.col_off)
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + h, ds.height), min(c0 + w, ds.width)
    if rr1 > rr0 and cc1 > cc0:
        data = ds.read(1, window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0))
        out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = (data > 0).astype(np.uint8)
    return out


def mask_tile_labels(
    pair: FolderPair, tiles: gpd.GeoDataFrame, grid: Grid | None = None
) -> np.ndarray:
    """int8 per tile: 1 if the tile's mask has any change pixel, else 0.

    ``grid`` is the scene grid the tiles were cut from (see :func:`read_mask`).
    """
    labels = np.zeros(len(tiles), dtype=np.int8)
    with _mask_on_grid(pair, grid) as ds:
        for i, (_, row) in enumerate(tiles.iterrows()):
            labels[i] = 1 if _read_mask(ds, tile_window(row)).any() else 0
    return labels


def dataset_tiles(
    root: str | os.PathLike[str],
    *,
    tile_size: int = defaults.TILE_SIZE,
    overlap: int = defaults.GRID_OVERLAP,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    bands: object = None,
    progress: Progress | None = None,
) -> gpd.GeoDataFrame:
    """Tiles of every pair of a folder dataset with mask-derived labels.

    Returns:
        GeoDataFrame (pixel coordinates, no CRS) with ``scene`` and the tile columns plus
        ``label`` (1 change in the tile, 0 none).

    Raises:
        LabelError: bad dataset layout or masks missing.
        GridError: an image is smaller than one tile.
    """
    progress = progress or Progress()
    pairs = find_pairs(root, require_labels=True)
    frames = []
    for pair in pairs:
        progress.check_cancelled()
        with open_folder_pair(pair, bands=bands) as scene:
            try:
                tiles = make_tile_grid(scene, tile_size, overlap, min_valid_fraction, progress)
            except GridError as exc:
                raise GridError(f"pair {pair.name}: {exc}") from exc
            grid = scene.grid
        tiles["label"] = mask_tile_labels(pair, tiles, grid)
        tiles.insert(0, "scene", pair.name)
        frames.append(tiles)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=None)
