"""Pseudo pixel labels from a change-probability raster and weak tile labels.

Rules (DESIGN.md): on tiles labelled **changed**, a pixel is change (1) where the probability
is above the threshold and background (0) elsewhere; tiles labelled **unchanged** are all
background (0); **unlabelled** tiles and nodata pixels are 255 (ignored by the detector's
loss). Where tiles overlap (the last row/column of the tile grid is shifted inside the scene),
an unchanged tile wins over a changed one (it vouches for every pixel), and a changed tile wins
over an unlabelled one.

Tile labels come from the weak labels (DATA's ``read_weak_labels`` + ``assign_tile_labels``,
the touching rule) on the tile grid of the probability raster's grid, which is the scene grid
``kdmsi infer`` wrote: the same tiling as training when the tile size is the model's (read from
the raster's ``KDMSI_TILE_SIZE`` tag by default). Given the two dates, the scene's own tile
grid is used instead (DATA's ``labelled_tiles``, which also drops tiles with little valid data).

Automatic thresholds (no pixel truth needed), computed from 1000-bin histograms of the
probabilities, streamed over the raster:

* ``unchanged-q``: the 99th percentile of the probabilities on tiles labelled **unchanged**.
  They are known negatives, so the threshold bounds the false-positive rate to about 1 %
  (assuming the background of changed tiles looks like unchanged tiles).
* ``otsu``: Otsu's threshold on the probabilities of tiles labelled **changed**, which hold a
  mixture of change and background.
* ``auto`` (the one to use): Otsu on the changed tiles, but never below the unchanged-tile
  99th percentile: ``max(otsu, unchanged-q)``; with no unchanged tile it is Otsu, with no
  changed tile it is ``unchanged-q`` (nothing is thresholded then anyway).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdmsi_engine import defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.errors import GridError, InputError, LabelError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import (
    CLASS_COLORMAP,
    CLASS_NODATA,
    add_overviews,
    bounded_gdal_cache,
    create_geotiff,
    open_on_one_grid,
    open_raster,
    strip_windows,
    valid_values,
)
from kdmsi_engine.results import PseudoResult
from kdmsi_engine.thresholds import (  # noqa: F401 (re-exported)
    HIST_BINS,
    otsu_threshold,
    parse_threshold_spec,
    quantile_threshold,
)

logger = logging.getLogger(__name__)

#: threshold names accepted besides a number.
AUTO_METHODS = ("auto", "otsu", "unchanged-q")
#: quantile of the unchanged tiles' probabilities used by ``unchanged-q`` and ``auto``.
UNCHANGED_QUANTILE = defaults.UNCHANGED_QUANTILE
#: raster tag where ``kdmsi infer`` records its window/tile size.
TILE_SIZE_TAG = "KDMSI_TILE_SIZE"


@dataclass
class TileLabels:
    """Tile windows (pixel offsets on the probability raster's grid) and their labels.

    Attributes:
        row_off, col_off, height, width: int arrays, one per tile.
        label: int8 array: 1 changed, 0 unchanged, -1 unlabelled.
    """

    row_off: np.ndarray
    col_off: np.ndarray
    height: np.ndarray
    width: np.ndarray
    label: np.ndarray

    @classmethod
    def from_frame(cls, tiles: Any, column: str = "label") -> TileLabels:
        """From a tile GeoDataFrame (DATA's ``labelled_tiles``) with a label column."""

        def col(name: str) -> np.ndarray:
            return np.asarray(tiles[name].to_numpy(), dtype=np.int64)

        return cls(
            col("row_off"),
            col("col_off"),
            col("height"),
            col("width"),
            np.asarray(tiles[column].to_numpy(), dtype=np.int8),
        )

    def counts(self) -> dict[str, int]:
        return {
            "changed": int(np.count_nonzero(self.label == 1)),
            "unchanged": int(np.count_nonzero(self.label == 0)),
            "unlabelled": int(np.count_nonzero(self.label == -1)),
        }

    def without(self, drop: np.ndarray) -> TileLabels:
        """The same tiles with those where ``drop`` is true made unlabelled (-1)."""
        label = self.label.copy()
        label[np.asarray(drop, dtype=bool)] = -1
        return TileLabels(self.row_off, self.col_off, self.height, self.width, label)

    def only(self, keep: np.ndarray) -> TileLabels:
        """The same tiles with all but those where ``keep`` is true made unlabelled (-1)."""
        return self.without(~np.asarray(keep, dtype=bool))

    def held_out_split(self, fraction: float, seed: int = 0) -> np.ndarray:
        """Bool per tile: a random ``fraction`` of the unchanged tiles, kept out of the
        detector's training to calibrate its map in the final one.

        At least one tile when there are ``defaults.MIN_HELD_OUT_UNCHANGED`` or more unchanged
        tiles, none below; the choice depends only on ``seed`` and the labels.
        """
        members = np.flatnonzero(self.label == 0)
        enough = members.size >= defaults.MIN_HELD_OUT_UNCHANGED
        count = max(int(round(fraction * members.size)), 1) if enough else 0
        out = np.zeros(self.label.size, dtype=bool)
        out[np.random.default_rng(seed).choice(members, size=count, replace=False)] = True
        return out

    def unchanged_mask(self, row: int, height: int, width: int) -> np.ndarray:
        """Bool mask of the pixels of rows ``[row, row + height)`` in tiles labelled unchanged."""
        return self.state(row, height, width) == 0

    def state(self, row: int, height: int, width: int) -> np.ndarray:
        """Per-pixel tile state for rows ``[row, row + height)``: 1, 0 or -1 (see rules)."""
        out = np.full((height, width), -1, np.int8)
        hit = (self.row_off < row + height) & (self.row_off + self.height > row)
        for value in (1, 0):  # unchanged painted last: it wins
            for i in np.flatnonzero(hit & (self.label == value)):
                r0 = max(int(self.row_off[i]) - row, 0)
                r1 = min(int(self.row_off[i] + self.height[i]) - row, height)
                c0 = max(int(self.col_off[i]), 0)
                c1 = min(int(self.col_off[i] + self.width[i]), width)
                out[r0:r1, c0:c1] = value
        return out


def parse_threshold(value: float | str) -> float | str:
    """A number in [0, 1) or one of :data:`AUTO_METHODS`, or :class:`InputError`."""
    return parse_threshold_spec(value, AUTO_METHODS)


def choose_threshold(
    method: str,
    hist_changed: np.ndarray,
    hist_unchanged: np.ndarray,
    edges: np.ndarray,
    quantile: float = UNCHANGED_QUANTILE,
) -> tuple[float, dict[str, Any]]:
    """The automatic threshold ``method`` and the numbers behind it."""
    otsu = otsu_threshold(hist_changed, edges) if hist_changed.sum() > 0 else None
    neg_q = quantile_threshold(hist_unchanged, edges, quantile)
    info: dict[str, Any] = {
        "otsu_changed": otsu,
        "unchanged_quantile": quantile,
        "unchanged_q": neg_q,
        "changed_pixels": int(hist_changed.sum()),
        "unchanged_pixels": int(hist_unchanged.sum()),
    }
    if method == "otsu":
        value = otsu
    elif method == "unchanged-q":
        value = neg_q
    else:
        candidates = [v for v in (otsu, neg_q) if v is not None]
        value = max(candidates) if candidates else None
    if value is None:
        raise LabelError(
            f"threshold {method!r} needs tiles labelled "
            f"{'changed' if method == 'otsu' else 'changed or unchanged'} with valid "
            "probabilities; give a number as the threshold (e.g. 0.3)",
            parameters=("threshold",),
        )
    return float(min(max(value, 0.0), 0.999)), info


def _tile_labels_from_grid(
    grid: Any,
    labels: Any,
    *,
    tile_size: int,
    field: str,
    unmarked_unchanged: bool,
) -> TileLabels:
    from kdmsi_engine.data.labels import assign_tile_labels, read_weak_labels
    from kdmsi_engine.data.tiling import tile_windows, tiles_frame, window_polygon

    features = read_weak_labels(labels, crs=grid.crs, field=field, bounds=tuple(grid.bounds))
    windows = tile_windows(grid, tile_size, 0)
    records = [
        (i, int(w.row_off), int(w.col_off), int(w.width), int(w.height), 1.0)
        for i, w in enumerate(windows)
    ]
    tiles = tiles_frame(records, [window_polygon(grid, w) for w in windows], grid.crs)
    tiles["label"] = assign_tile_labels(
        tiles, features, field=field, unmarked_unchanged=unmarked_unchanged
    )
    return TileLabels.from_frame(tiles)


def _tile_labels_from_scene(
    before: Any,
    after: Any,
    grid: Any,
    labels: Any,
    *,
    tile_size: int,
    field: str,
    unmarked_unchanged: bool,
    progress: Progress,
) -> TileLabels:
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair

    with ScenePair.open(before, after) as scene:
        sg = scene.grid
        if (
            (sg.width, sg.height) != (grid.width, grid.height)
            or sg.crs != grid.crs
            or not (np.allclose(list(sg.transform)[:6], list(grid.transform)[:6]))
        ):
            raise GridError(
                f"the probability raster's grid ({grid.width}x{grid.height}) is not the grid of "
                f"the scene {scene.name} ({sg.width}x{sg.height}); give the pair it was "
                "inferred from, or leave the before and after rasters out",
                parameters=("before", "after"),
            )
        tiles = labelled_tiles(
            scene,
            labels,
            tile_size=tile_size,
            field=field,
            unmarked_unchanged=unmarked_unchanged,
            progress=progress,
        )
    return TileLabels.from_frame(tiles)


def pseudo_from_window(
    prob: np.ndarray, state: np.ndarray, valid: np.ndarray, threshold: float
) -> np.ndarray:
    """uint8 pseudo labels of one window from probabilities, tile states and valid mask."""
    out = np.full(prob.shape, CLASS_NODATA, np.uint8)
    out[state == 0] = 0
    changed = state == 1
    out[changed] = (prob[changed] > threshold).astype(np.uint8)
    out[~valid] = CLASS_NODATA
    return out


def make_pseudo_labels(
    prob_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    labels: Any = None,
    tile_labels: TileLabels | Any | None = None,
    threshold: float | str = defaults.PSEUDO_THRESHOLD,
    label_field: str = defaults.LABEL_FIELD,
    unmarked_unchanged: bool = False,
    tile_size: int | None = None,
    before: str | os.PathLike[str] | None = None,
    after: str | os.PathLike[str] | None = None,
    quantile: float = UNCHANGED_QUANTILE,
    held_out: np.ndarray | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PseudoResult:
    """Write pseudo labels (uint8: 1 change, 0 background, 255 ignore) from a probability map.

    Args:
        prob_path: change probability GeoTIFF (``kdmsi infer``; nodata -1).
        out_path: output GeoTIFF, same grid, colour table, overviews.
        labels: weak labels (vector file or GeoDataFrame) in the ``label_field`` convention.
        tile_labels: instead of ``labels``: a :class:`TileLabels` or a tile GeoDataFrame with
            ``row_off, col_off, width, height, label`` on the probability raster's grid.
        threshold: a number in [0, 1) or ``auto`` / ``otsu`` / ``unchanged-q`` (module docs).
        label_field: integer field of ``labels`` (1 changed, 0 unchanged).
        unmarked_unchanged: tiles no feature touches are unchanged instead of unlabelled.
        tile_size: tile size of the labelling (default: the raster's ``KDMSI_TILE_SIZE`` tag,
            else the default tile size).
        before, after: the scene pair, to use its tile grid (tiles with little valid data
            dropped, as in training); otherwise the probability raster's grid is tiled.
        quantile: the quantile of the unchanged tiles' values of ``unchanged-q`` and ``auto``.
        held_out: optional bool per tile: tiles whose pixels are written 255 (kept out of the
            detector's training, e.g. to calibrate its threshold); they still count for the
            threshold.
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``{"output", "threshold", "threshold_method", "tiles", "pixels", ...}``; for automatic
        thresholds also ``threshold_info`` (Otsu and quantile values).
    """
    # Longer than 80 lines: the job's documented parameters; the steps are the helpers below.
    progress = progress or Progress()
    mode = parse_threshold(threshold)
    if labels is None and tile_labels is None:
        raise InputError(
            "pseudo labels need weak labels: give a weak-label vector file",
            parameters=("labels",),
        )
    if (before is None) != (after is None):
        raise InputError(
            "give both the before and the after raster, or neither",
            parameters=("before", "after"),
        )
    target = check_output(out_path, overwrite=overwrite)
    from kdmsi_engine.data.grid import Grid

    with open_raster(prob_path, "probability raster") as src:
        if src.count < 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.floating):
            raise InputError(
                f"{prob_path} is not a probability raster (band type {src.dtypes[0]}); give "
                "the float32 output of 'kdmsi infer'"
            )
        grid = Grid.from_dataset(src)
        tile = int(tile_size or src.tags().get(TILE_SIZE_TAG) or defaults.TILE_SIZE)
        tiles = _resolve_tiles(
            tile_labels, labels, grid, tile, before, after, label_field, unmarked_unchanged,
            progress,
        )  # fmt: skip
        counts = tiles.counts()
        written = tiles if held_out is None else tiles.without(held_out)
        info: dict[str, Any] = {}
        with bounded_gdal_cache():
            if isinstance(mode, str):
                value, info = _automatic_threshold(src, tiles, mode, quantile, progress)
            else:
                value = float(mode)
            pixel_counts = _write_pseudo(
                src, written, value, target, grid, tile, overwrite, progress
            )
    if counts["changed"] == 0:
        logger.warning("no tile is labelled changed: the pseudo labels hold no change")
    result: PseudoResult = {
        "output": str(target),
        "threshold": round(value, 6),
        "threshold_method": mode if isinstance(mode, str) else "fixed",
        "tile_size": tile,
        "tiles": counts,
        "held_out_tiles": int(np.count_nonzero(held_out)) if held_out is not None else 0,
        "pixels": {
            "change": int(pixel_counts[0]),
            "background": int(pixel_counts[1]),
            "ignore": int(pixel_counts[2]),
        },
    }
    if info:
        result["threshold_info"] = info
    return result


def _resolve_tiles(
    tile_labels: Any,
    labels: Any,
    grid: Any,
    tile: int,
    before: Any,
    after: Any,
    label_field: str,
    unmarked_unchanged: bool,
    progress: Progress,
) -> TileLabels:
    """The tile labels given, or made from ``labels`` on the scene's (or the raster's) grid."""
    if isinstance(tile_labels, TileLabels):
        return tile_labels
    if tile_labels is not None:
        return TileLabels.from_frame(tile_labels)
    if before is not None:
        return _tile_labels_from_scene(
            before, after, grid, labels, tile_size=tile, field=label_field,
            unmarked_unchanged=unmarked_unchanged, progress=progress,
        )  # fmt: skip
    return _tile_labels_from_grid(
        grid, labels, tile_size=tile, field=label_field, unmarked_unchanged=unmarked_unchanged
    )


def _automatic_threshold(
    src: Any, tiles: TileLabels, mode: str, quantile: float, progress: Progress
) -> tuple[float, dict[str, Any]]:
    """``auto`` / ``otsu`` / ``unchanged-q`` from the histograms of the labelled tiles' values."""
    strips = list(strip_windows(src.width, src.height))
    progress.stage("threshold", total=len(strips), message=f"{mode} threshold")
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    hist_c = np.zeros(HIST_BINS, np.int64)
    hist_u = np.zeros(HIST_BINS, np.int64)
    for window in strips:
        progress.check_cancelled()
        prob = src.read(1, window=window)
        valid = valid_values(prob, src.nodata)
        state = tiles.state(int(window.row_off), prob.shape[0], prob.shape[1])
        for label, hist in ((1, hist_c), (0, hist_u)):
            sel = valid & (state == label)
            hist += np.histogram(np.clip(prob[sel], 0, 1), bins=edges)[0]
        progress.advance()
    return choose_threshold(mode, hist_c, hist_u, edges, quantile)


def _write_pseudo(
    src: Any,
    written: TileLabels,
    value: float,
    target: Path,
    grid: Any,
    tile: int,
    overwrite: bool,
    progress: Progress,
) -> np.ndarray:
    """Write the pseudo labels strip by strip (atomically); pixel counts of 1, 0 and 255."""
    strips = list(strip_windows(src.width, src.height))
    progress.stage("pseudo", total=len(strips), message=f"threshold {value:.3f}")
    pixel_counts = np.zeros(3, np.int64)
    with atomic_output(target, overwrite=overwrite) as tmp:
        with create_geotiff(tmp, grid, dtype="uint8", nodata=CLASS_NODATA) as dst:
            for window in strips:
                progress.check_cancelled()
                prob = src.read(1, window=window)
                valid = valid_values(prob, src.nodata)
                state = written.state(int(window.row_off), prob.shape[0], prob.shape[1])
                out = pseudo_from_window(prob, state, valid, value)
                pixel_counts += [
                    np.count_nonzero(out == 1),
                    np.count_nonzero(out == 0),
                    np.count_nonzero(out == CLASS_NODATA),
                ]
                dst.write(out, 1, window=window)
                progress.advance()
            dst.write_colormap(1, CLASS_COLORMAP)
            dst.update_tags(KDMSI_THRESHOLD=f"{value:.6g}", KDMSI_TILE_SIZE=str(tile))
            add_overviews(dst, "nearest")
    return pixel_counts


def combine_maps(
    first: str | os.PathLike[str],
    second: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the geometric mean ``sqrt(a * b)`` of two probability rasters on one grid.

    High only where both maps are high (e.g. the MSI map and the calibrated CVA); nodata (-1)
    where either has none.
    """
    from kdmsi_engine.data.grid import Grid
    from kdmsi_engine.rasterio_out import PROB_NODATA

    progress = progress or Progress()
    target = check_output(out_path, overwrite=overwrite)
    with contextlib.ExitStack() as stack:
        a, b = open_on_one_grid(stack, [first, second])
        grid = Grid.from_dataset(a)
        strips = list(strip_windows(a.width, a.height))
        progress.stage("combine", total=len(strips), message="geometric mean of two maps")
        with atomic_output(target, overwrite=overwrite) as tmp:
            with create_geotiff(tmp, grid, dtype="float32", nodata=PROB_NODATA) as dst:
                for window in strips:
                    progress.check_cancelled()
                    pa, pb = a.read(1, window=window), b.read(1, window=window)
                    valid = valid_values(pa, a.nodata) & valid_values(pb, b.nodata)
                    both = np.sqrt(np.clip(pa, 0, 1) * np.clip(pb, 0, 1))
                    dst.write(
                        np.where(valid, both, PROB_NODATA).astype(np.float32), 1, window=window
                    )
                    progress.advance()
                add_overviews(dst, "average")
    return {"output": str(target), "method": "geometric-mean"}
