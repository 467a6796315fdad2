"""Tiles to label next: the unlabelled tiles where a change map is least sure (active learning).

An analyst marks tiles changed (1) or unchanged (0); every tile marked adds to what the chain
learns from (the unchanged tiles calibrate the change vector analysis and the final threshold
and are kept out of the change map, the changed ones give the detector its positives). This job
says which unlabelled tiles are worth marking next, from a probability raster on the scene grid:
the quick change preview (``kdmsi cva``) before any training, or a run's
``change_probability.tif`` after it.

**The measures.** The map's decision is per pixel: change where the value is above the decision
threshold (the run's own threshold, recorded in its ``run.json``; Otsu's for the preview). For
each tile, ``change_share`` is the share of its valid pixels above the threshold. Why the share
and not the tile's highest value: the touching rule makes a tile changed when one pixel changed,
but the chain's thresholds allow a few per cent of false positives on unchanged land (2 %:
dozens of pixels of a 64 px tile), so nearly every tile has pixels above the threshold; its
highest value says nothing. The share is in the map's own decisions, so it needs no calibration
of the map's units and works the same on the preview and on a trained chain's map.

- ``uncertainty`` (the default): ``1 - |2 * change_share - 1|``, 1 where the map splits the
  tile in half (as much of it called change as not) and 0 where it calls all or none of it
  change.
- ``false-alarms``: the share of the tile a label would most likely prove a false
  alarm, ``change_share * (1 - p_changed)``. ``p_changed`` is the chance that a tile with that
  share is changed, learned from the tiles labelled so far (a logistic regression of their
  labels on the logit of their shares, ridge-penalised so that a handful of labels cannot make
  it a step). Why: the chain gets much of its precision from tiles labelled unchanged (they are
  kept out of the change map, calibrate the change vector analysis and set the final threshold),
  so the label worth most is the one on a tile that looks unchanged to the labels so far but
  where the map still calls much of it change: labelled unchanged, its false alarms leave the
  map and teach the calibration what unchanged land there looks like; labelled changed, it is a
  change the map half saw. Tiles the map calls change all over are ranked low (almost surely
  changed: a label adds little), and so are tiles it calls change nowhere. Needs at least one
  labelled tile of each kind; before that the tiles are ranked by ``uncertainty``.

Measured with ``benchmarks/active_learning.py`` (README): both pick mostly changed tiles (most
64 px tiles of a city hold some change), ``uncertainty`` scores higher, and neither beats
labelling random tiles on every scene.

**Exploration.** ``explore`` draws that share of the suggestions at random among the other
unlabelled tiles, after the ranked ones (``picked_by`` says which). Why: the tiles labelled
unchanged calibrate the chain's view of unchanged land (the change vector analysis, the final
threshold), and tiles suggested for being unsure are not a fair sample of it: measured, with
few labels they can make real changes look ordinary and lower the recall.

**Diversity.** Neighbouring tiles of one large blob score alike and teach the same thing, so the
tiles are taken in rank order and a tile is skipped when it lies within ``min_gap`` tile widths
of one already taken (``min_gap`` 1: at least one tile's width between any two suggestions;
0: no rule, the ranked list as it is).

Tiles are those of ``kdmsi run`` (the same windows and numbering on the scene grid, tiles with
less than half their pixels valid left out), labelled by the weak labels' touching rule; only
unlabelled tiles are suggested. The output is a GeoPackage layer (``suggestions``) with the
rank (1 = label first), the uncertainty, the share, the tile's window and its footprint in the
scene CRS, written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np

from kdmsi_engine import defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.data.grid import Grid
from kdmsi_engine.data.labels import (
    DEFAULT_FIELD,
    UNLABELLED,
    assign_tile_labels,
    label_counts,
    read_weak_labels,
)
from kdmsi_engine.data.tiling import (
    check_scene_fits,
    check_tile_params,
    tile_windows,
    tiles_frame,
    window_polygon,
    write_vector,
)
from kdmsi_engine.errors import InputError, LabelError, OutputError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import open_raster, valid_values
from kdmsi_engine.results import SuggestResult
from kdmsi_engine.thresholds import UNCHANGED_Q, parse_threshold_spec, raster_threshold

logger = logging.getLogger(__name__)

#: Layer name of the suggestions GeoPackage.
SUGGEST_LAYER = "suggestions"
#: ``--threshold auto``: the run's recorded threshold, else Otsu's.
AUTO = "auto"
#: Values of a probability raster may stray this far outside [0, 1] (float rounding).
RANGE_TOLERANCE = 1e-4
#: ``picked_by`` of the suggestions drawn at random (``explore``).
RANDOM_PICK = "random"
#: What each measure computes (``kdmsi suggest``'s record).
MEASURE_FORMULAS = {
    "false-alarms": "change_share * (1 - p_changed), p_changed a logistic fit on labelled tiles",
    "uncertainty": "1 - |2 * change_share - 1|",
}
#: Columns of the suggestions layer, geometry last.
SUGGEST_SCHEMA = {
    "geometry": "Polygon",
    "properties": {
        "rank": "int",
        "picked_by": "str",
        "tile_id": "int",
        "score": "float",
        "uncertainty": "float",
        "p_changed": "float",
        "change_share": "float",
        "row_off": "int",
        "col_off": "int",
        "width": "int",
        "height": "int",
    },
}


@dataclass(frozen=True)
class Threshold:
    """The decision threshold of the map and where it came from."""

    value: float
    method: str


def uncertainty(change_share: np.ndarray) -> np.ndarray:
    """``1 - |2 share - 1|``: 1 when the map calls half the tile change, 0 for none or all."""
    share = np.asarray(change_share, dtype=np.float64)
    return 1.0 - np.abs(2.0 * share - 1.0)


#: Shares are clipped to [``SHARE_EPSILON``, 1 - ``SHARE_EPSILON``] before their logit.
SHARE_EPSILON = 1e-3
#: Ridge penalty of the logistic regression's slope (on the standardised logit of the share).
RIDGE = 1.0


def _logit(change_share: np.ndarray) -> np.ndarray:
    share = np.clip(np.asarray(change_share, dtype=np.float64), SHARE_EPSILON, 1 - SHARE_EPSILON)
    return np.log(share / (1.0 - share))


@dataclass(frozen=True)
class ChangeOdds:
    """``p_changed(share)`` of a tile: a logistic regression of tile labels on the logit of the
    tiles' change shares (standardised), with a ridge penalty on the slope."""

    center: float
    scale: float
    intercept: float
    slope: float

    @classmethod
    def fit(cls, change_share: np.ndarray, labels: np.ndarray) -> ChangeOdds | None:
        """Fit on labelled tiles (``labels`` 1 changed, 0 unchanged); ``None`` unless both kinds
        are present."""
        y = np.asarray(labels, dtype=np.float64)
        if y.size == 0 or y.min() == y.max():
            return None
        x = _logit(change_share)
        center, scale = float(x.mean()), max(float(x.std()), 1e-6)
        z = (x - center) / scale
        design = np.stack([np.ones_like(z), z], axis=1)
        penalty = np.diag([0.0, RIDGE])
        weights = np.zeros(2)
        for _ in range(100):  # Newton's method on the penalised log-likelihood
            p = 1.0 / (1.0 + np.exp(-(design @ weights)))
            gradient = design.T @ (p - y) + penalty @ weights
            hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            weights -= step
            if np.abs(step).max() < 1e-10:
                break
        return cls(center, scale, float(weights[0]), float(weights[1]))

    def __call__(self, change_share: np.ndarray) -> np.ndarray:
        z = (_logit(change_share) - self.center) / self.scale
        return 1.0 / (1.0 + np.exp(-(self.intercept + self.slope * z)))


def expected_false_alarms(change_share: np.ndarray, p_changed: np.ndarray) -> np.ndarray:
    """``change_share * (1 - p_changed)``: the share of the tile a label would likely prove a
    false alarm."""
    return np.asarray(change_share, dtype=np.float64) * (1.0 - np.asarray(p_changed))


@dataclass(frozen=True)
class Ranking:
    """Each candidate's score under the measure used, and what went into it."""

    measure: str
    score: np.ndarray
    uncertainty: np.ndarray
    p_changed: np.ndarray  # NaN where the measure needs none


def rank_tiles(
    measure: str,
    candidate_shares: np.ndarray,
    labelled_shares: np.ndarray,
    labelled: np.ndarray,
    progress: Progress,
) -> Ranking:
    """Score the candidates with ``measure`` (``false-alarms`` falls back to ``uncertainty``
    until a tile of each kind is labelled)."""
    unsure = uncertainty(candidate_shares)
    none = np.full(len(candidate_shares), np.nan)
    if measure == "uncertainty":
        return Ranking(measure, unsure, unsure, none)
    odds = ChangeOdds.fit(labelled_shares, labelled)
    if odds is None:
        progress.log(
            "the false-alarms measure learns from labelled tiles of both kinds; until there "
            "are some, tiles are ranked by uncertainty"
        )
        return Ranking("uncertainty", unsure, unsure, none)
    p_changed = odds(candidate_shares)
    return Ranking(measure, expected_false_alarms(candidate_shares, p_changed), unsure, p_changed)


def rank_order(scores: np.ndarray, tile_ids: np.ndarray) -> np.ndarray:
    """Indices by score, highest first; ties by tile number (so the order repeats)."""
    return np.lexsort((np.asarray(tile_ids), -np.asarray(scores, dtype=np.float64)))


def _window(values: np.ndarray) -> tuple[int, int, int, int]:
    row, col, height, width = (int(v) for v in values)
    return row, col, height, width


def tile_gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels between two windows ``(row, col, height, width)`` along rows or columns
    (the larger of the two; 0 for touching tiles, negative for overlapping ones)."""
    rows = max(a[0], b[0]) - min(a[0] + a[2], b[0] + b[2])
    cols = max(a[1], b[1]) - min(a[1] + a[3], b[1] + b[3])
    return max(rows, cols)


def spaced_selection(
    order: np.ndarray,
    windows: np.ndarray,
    count: int,
    min_gap_pixels: int,
    already: list[int] | None = None,
) -> list[int]:
    """The first ``count`` of ``order`` (indices into ``windows``, rows of ``(row, col,
    height, width)``) such that every two are at least ``min_gap_pixels`` apart, and apart from
    those ``already`` chosen; greedy, in rank order. Fewer when the grid has no room for more.
    ``min_gap_pixels`` 0: no rule."""
    taken = list(already or [])
    chosen: list[int] = []
    if count <= 0:
        return chosen
    for index in order:
        if int(index) in taken:
            continue
        row, col, height, width = (int(v) for v in windows[index])
        window = (row, col, height, width)
        if min_gap_pixels <= 0 or all(
            tile_gap(window, _window(windows[j])) >= min_gap_pixels for j in taken
        ):
            chosen.append(int(index))
            taken.append(int(index))
            if len(chosen) == count:
                break
    return chosen


def check_parameters(
    count: int,
    min_gap: float,
    min_valid_fraction: float,
    measure: str = defaults.SUGGEST_MEASURE,
    explore: float = 0.0,
) -> None:
    """Raise :class:`InputError` for a bad number of tiles, gap, valid fraction, measure or
    share of random tiles."""
    if not np.isfinite(explore) or not 0.0 <= explore <= 1.0:
        raise InputError(
            f"share of random tiles {explore} must be between 0 and 1, e.g. 0.5",
            parameters=("explore",),
        )
    if measure not in defaults.SUGGEST_MEASURES:
        raise InputError(
            f"measure {measure!r} is not one of {', '.join(defaults.SUGGEST_MEASURES)}",
            parameters=("measure",),
        )
    if int(count) != count or count < 1:
        raise InputError(
            f"number of tiles {count} must be a whole number of at least 1, e.g. 10",
            parameters=("count",),
        )
    if not np.isfinite(min_gap) or min_gap < 0:
        raise InputError(
            f"minimum gap {min_gap} must be 0 or more tile widths, e.g. 1",
            parameters=("min_gap",),
        )
    if not 0.0 <= float(min_valid_fraction) <= 1.0:
        raise InputError(f"minimum valid fraction {min_valid_fraction} must be between 0 and 1")


def parse_suggest_threshold(value: float | str) -> float | str:
    """``auto``, ``otsu``, ``unchanged-q`` or a number in [0, 1); else :class:`InputError`."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return parse_threshold_spec(value)


def recorded_threshold(raster: Path) -> float | None:
    """The threshold ``kdmsi run`` recorded for ``raster`` (its ``change_probability.tif``) in
    the ``run.json`` beside it; ``None`` when there is none or it is about another file."""
    record_path = raster.parent / defaults.RECORD_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        listed = Path(record["outputs"]["change_probability"])
        value = float(record["stages"]["detect"]["parameters"]["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        same = listed.exists() and os.path.samefile(listed, raster)
    except OSError:
        same = False
    return value if same and 0.0 <= value < 1.0 else None


def resolve_threshold(
    raster: Path, spec: float | str, tiles: gpd.GeoDataFrame, band: int
) -> Threshold:
    """The decision threshold: a number as given, ``otsu`` / ``unchanged-q`` from the raster
    (the latter on the tiles labelled unchanged, at the final map's quantile), ``auto`` the
    run's own threshold when ``raster`` is a run's ``change_probability.tif``, else Otsu's."""
    if not isinstance(spec, str):
        return Threshold(float(spec), "fixed")
    if spec == AUTO:
        recorded = recorded_threshold(raster)
        if recorded is not None:
            return Threshold(recorded, "run")
        spec = "otsu"
    unchanged = None
    if spec == UNCHANGED_Q:
        unchanged_tiles = tiles[tiles["label"] == 0]
        if unchanged_tiles.empty:
            raise LabelError(
                "threshold unchanged-q needs tiles labelled unchanged; label some, or use "
                "threshold auto, otsu or a number",
                parameters=("threshold",),
            )
        unchanged = _tile_mask(unchanged_tiles)
    value = raster_threshold(
        raster, spec, band=band, unchanged=unchanged, quantile=defaults.DETECT_QUANTILE
    )
    return Threshold(float(value), spec)


def _tile_mask(tiles: gpd.GeoDataFrame) -> Any:
    """``mask(row, height, width)``: the pixels of a full-width strip inside ``tiles``."""
    windows = tiles[["row_off", "col_off", "height", "width"]].to_numpy(dtype=np.int64)

    def mask(row: int, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), dtype=bool)
        for r, c, h, w in windows:
            r0, r1 = max(r - row, 0), min(r + h - row, height)
            if r1 > r0:
                out[r0:r1, c : c + w] = True
        return out

    return mask


def _attributes(labels: Any) -> Any:
    """The attribute table of a label source (``None`` when it cannot be read)."""
    if isinstance(labels, gpd.GeoDataFrame):
        return labels
    try:
        return gpd.read_file(Path(labels), ignore_geometry=True)
    except Exception:  # fiona/pyogrio raise several driver-specific errors  # noqa: BLE001
        return None


def grid_tile_size(labels: Any) -> int | None:
    """The tile size of a labelling grid (``kdmsi grid``: one ``width`` = ``height`` for every
    tile), ``None`` for other label sources."""
    if labels is None:
        return None
    table = _attributes(labels)
    if table is None or not {"tile_id", "width", "height"} <= set(table.columns):
        return None
    sizes = set(table["width"].dropna().astype(int)) | set(table["height"].dropna().astype(int))
    return sizes.pop() if len(sizes) == 1 else None


def label_features(labels: Any, grid: Grid, field: str, progress: Progress) -> Any:
    """The weak labels on the grid's CRS, or ``None`` when there are none yet (no source, or a
    labelling grid whose ``field`` is still empty everywhere: before anything is labelled,
    every tile is a candidate)."""
    if labels is None:
        return None
    try:
        return read_weak_labels(labels, crs=grid.crs, field=field, bounds=tuple(grid.bounds))
    except LabelError:
        table = _attributes(labels)
        if table is None or field not in table.columns or len(table) == 0:
            raise
        if table[field].notna().any():
            raise
    progress.log(f"no tile is labelled yet ({field!r} is empty): every tile is a candidate")
    return None


def _check_probabilities(values: np.ndarray, raster: Path) -> None:
    if values.size and (values.min() < -RANGE_TOLERANCE or values.max() > 1.0 + RANGE_TOLERANCE):
        raise RasterError(
            f"{raster.name} holds values outside [0, 1] (from {values.min():.4g} to "
            f"{values.max():.4g}): it is not a probability map; give the quick preview "
            f"(kdmsi cva) or a run's {defaults.PROBABILITY_NAME}"
        )


def valid_tiles(
    src: Any,
    grid: Grid,
    tile_size: int,
    overlap: int,
    band: int,
    min_valid_fraction: float,
    progress: Progress,
) -> gpd.GeoDataFrame:
    """The tiles of the grid with at least ``min_valid_fraction`` valid pixels (the windows
    and numbers of ``kdmsi run``'s tiles); checks every value is a probability."""
    raster = Path(src.name)
    windows = tile_windows(grid, tile_size, overlap)
    progress.stage("tiles", total=len(windows), message=f"{len(windows)} tiles of {tile_size} px")
    records: list[tuple[int, int, int, int, int, float]] = []
    geometries = []
    for tile_id, window in enumerate(windows):
        progress.check_cancelled()
        data = src.read(band, window=window)
        valid = valid_values(data, src.nodata)
        _check_probabilities(data[valid], raster)
        fraction = float(valid.mean()) if valid.size else 0.0
        if fraction >= min_valid_fraction and fraction > 0:
            records.append(
                (tile_id, window.row_off, window.col_off, window.width, window.height, fraction)
            )
            geometries.append(window_polygon(grid, window))
        progress.advance()
    if not records:
        raise RasterError(
            f"no {tile_size} px tile of {raster.name} has {min_valid_fraction:.0%} valid pixels; "
            "lower the minimum valid fraction or the tile size"
        )
    return tiles_frame(records, geometries, grid.crs)


def change_shares(src: Any, tiles: gpd.GeoDataFrame, threshold: float, band: int) -> np.ndarray:
    """Per tile, the share of its valid pixels whose value is above ``threshold``."""
    shares = np.zeros(len(tiles), dtype=np.float64)
    windows = tiles[["col_off", "row_off", "width", "height"]].to_numpy(dtype=np.int64)
    for index, (col, row, width, height) in enumerate(windows):
        data = src.read(band, window=((row, row + height), (col, col + width)))
        values = data[valid_values(data, src.nodata)]
        shares[index] = float(np.count_nonzero(values > threshold)) / max(values.size, 1)
    return shares


def suggestion_frame(
    candidates: gpd.GeoDataFrame,
    ranked: list[int],
    drawn: list[int],
    ranking: Ranking,
    shares: np.ndarray,
) -> gpd.GeoDataFrame:
    """The suggestions layer: the ranked candidates in rank order, then the drawn ones."""
    chosen = ranked + drawn
    picked = candidates.iloc[chosen]
    columns = {
        "rank": np.arange(1, len(chosen) + 1, dtype=np.int64),
        "picked_by": np.array([ranking.measure] * len(ranked) + [RANDOM_PICK] * len(drawn)),
        "tile_id": picked["tile_id"].to_numpy(dtype=np.int64),
        "score": np.round(ranking.score[chosen], 6),
        "uncertainty": np.round(ranking.uncertainty[chosen], 6),
        "p_changed": np.round(ranking.p_changed[chosen], 6),
        "change_share": np.round(shares[chosen], 6),
    }
    for name in ("row_off", "col_off", "width", "height"):
        columns[name] = picked[name].to_numpy(dtype=np.int64)
    return gpd.GeoDataFrame(columns, geometry=picked.geometry.to_numpy(), crs=candidates.crs)


def ranked_candidates(
    raster: Path,
    spec: float | str,
    *,
    labels: Any,
    label_field: str,
    tile_size: int,
    overlap: int,
    band: int,
    min_valid_fraction: float,
    progress: Progress,
) -> tuple[gpd.GeoDataFrame, np.ndarray, dict[str, int], Threshold]:
    """Every valid tile of ``raster`` with its ``label``, the tiles' change shares, the tile
    counts and the threshold; raises on a bad raster or labels, or when no tile is left
    unlabelled."""
    with open_raster(raster, "probability raster") as src:
        if not 1 <= int(band) <= src.count:
            raise InputError(f"{raster.name} has {src.count} band(s); band {band} asked for")
        grid = Grid.from_dataset(src)
        check_scene_fits(grid, tile_size)
        features = label_features(labels, grid, label_field, progress)
        tiles = valid_tiles(src, grid, tile_size, overlap, band, min_valid_fraction, progress)
        tiles["label"] = (
            assign_tile_labels(tiles, features, field=label_field)
            if features is not None
            else np.full(len(tiles), UNLABELLED, dtype=np.int8)
        )
        counts = label_counts(tiles["label"])
        if counts["unlabelled"] == 0:
            raise LabelError(
                f"every tile is labelled ({counts['changed']} changed, {counts['unchanged']} "
                "unchanged): there is nothing left to suggest; run the chain"
            )
        progress.stage("threshold", message=str(spec))
        threshold = resolve_threshold(raster, spec, tiles, band)
        progress.stage("rank", message=f"{counts['unlabelled']} unlabelled tiles")
        shares = change_shares(src, tiles, threshold.value, band)
    return tiles, shares, counts, threshold


def choose_suggestions(
    tiles: gpd.GeoDataFrame,
    shares: np.ndarray,
    count: int,
    min_gap: float,
    tile_size: int,
    progress: Progress,
    measure: str = defaults.SUGGEST_MEASURE,
    explore: float = 0.0,
    seed: int = defaults.SEED,
) -> tuple[gpd.GeoDataFrame, str]:
    """The suggestions layer and the measure used: the unlabelled ``tiles`` ranked by
    ``measure``, then a share ``explore`` of ``count`` drawn at random among the other
    unlabelled tiles (seeded by ``seed`` and the number of labelled tiles), all spaced;
    ``shares`` is the change share of every tile, labelled or not."""
    labels = tiles["label"].to_numpy()
    shares = np.asarray(shares, dtype=np.float64)
    is_candidate = labels == UNLABELLED
    candidates = tiles[is_candidate]
    ranking = rank_tiles(
        measure, shares[is_candidate], shares[~is_candidate], labels[~is_candidate], progress
    )
    windows = candidates[["row_off", "col_off", "height", "width"]].to_numpy(dtype=np.int64)
    order = rank_order(ranking.score, candidates["tile_id"].to_numpy())
    gap = int(np.ceil(min_gap * tile_size))
    random_count = int(round(explore * count))
    chosen = spaced_selection(order, windows, count - random_count, gap)
    rng = np.random.default_rng([int(seed), int(np.count_nonzero(~is_candidate))])
    drawn = spaced_selection(
        rng.permutation(len(candidates)), windows, count - len(chosen), gap, already=chosen
    )
    if len(chosen) + len(drawn) == len(candidates) < count:
        progress.log(f"only {len(candidates)} tiles are unlabelled; all are suggested")
    elif len(chosen) + len(drawn) < count:
        progress.log(
            f"only {len(chosen) + len(drawn)} of {count} tiles fit {min_gap:g} tile width(s) "
            f"apart among {len(candidates)} unlabelled tiles; lower the minimum gap for more"
        )
    frame = suggestion_frame(candidates, chosen, drawn, ranking, shares[is_candidate])
    return frame, ranking.measure


def suggest_tiles(
    probability: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: Any = None,
    label_field: str = DEFAULT_FIELD,
    count: int = defaults.SUGGEST_COUNT,
    tile_size: int | None = None,
    overlap: int = 0,
    threshold: float | str = defaults.SUGGEST_THRESHOLD,
    min_gap: float = defaults.SUGGEST_MIN_GAP,
    min_valid_fraction: float = 0.5,
    band: int = 1,
    measure: str = defaults.SUGGEST_MEASURE,
    explore: float = defaults.SUGGEST_EXPLORE,
    seed: int = defaults.SEED,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SuggestResult:
    """Write the ``count`` unlabelled tiles the map is least sure about (``kdmsi suggest``).

    Args:
        probability: a probability raster on the scene grid (values in [0, 1], nodata outside
            the scene): ``kdmsi cva``'s preview, or a run's ``change_probability.tif``.
        out: the GeoPackage to write (layer :data:`SUGGEST_LAYER`).
        labels: the weak labels so far (a labelling grid, polygons or points; ``None`` before
            any labelling).
        label_field: their integer field (1 changed, 0 unchanged).
        count: how many tiles to suggest.
        tile_size: tile size in pixels (default: the labelling grid's, else the engine's).
        overlap: tile overlap in pixels (as the grid was made).
        threshold: the map's decision threshold: ``auto`` (the run's, else Otsu's), ``otsu``,
            ``unchanged-q`` (the final map's quantile on the unchanged tiles) or a number.
        min_gap: tile widths kept free between any two suggestions (0: no rule).
        min_valid_fraction: tiles with fewer valid pixels are left out (as in ``kdmsi run``).
        band: the raster's band.
        measure: how tiles are ranked: ``uncertainty`` or ``false-alarms`` (module docs).
        explore: the share of ``count`` drawn at random among the other unlabelled tiles
            (module docs), after the ranked ones.
        seed: the random draw's seed (with the number of labelled tiles, so a new round of
            labels draws anew).
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``output``, ``layer``, ``suggested``, ``requested``, ``candidates``, the tile counts,
        the threshold and its method, the measure used, ``tile_size``, ``min_gap`` and the
        ranked ``tiles``.

    Raises:
        InputError, LabelError, RasterError, OutputError: bad input; nothing is written.
    """
    # Longer than 80 lines: the job's documented parameters; each step is a helper above.
    progress = progress or Progress()
    check_parameters(count, min_gap, min_valid_fraction, measure, explore)
    spec = parse_suggest_threshold(threshold)
    target = check_output(out, overwrite=overwrite)
    if target.suffix.lower() != ".gpkg":
        raise OutputError(f"suggestions are written as a GeoPackage (.gpkg), not {target.name}")
    size = int(tile_size or grid_tile_size(labels) or defaults.TILE_SIZE)
    check_tile_params(size, overlap)
    tiles, shares, counts, chosen_threshold = ranked_candidates(
        Path(probability),
        spec,
        labels=labels,
        label_field=label_field,
        tile_size=size,
        overlap=overlap,
        band=band,
        min_valid_fraction=min_valid_fraction,
        progress=progress,
    )
    frame, used = choose_suggestions(
        tiles,
        shares,
        int(count),
        min_gap,
        size,
        progress,
        measure=measure,
        explore=explore,
        seed=seed,
    )
    progress.stage("write", message=str(target))
    with atomic_output(target, overwrite=overwrite) as tmp:
        write_vector(frame, tmp, target, driver="GPKG", layer=SUGGEST_LAYER, schema=SUGGEST_SCHEMA)
    logger.info("%d suggestions -> %s", len(frame), target)
    return {
        "output": str(target),
        "layer": SUGGEST_LAYER,
        "suggested": len(frame),
        "requested": int(count),
        "candidates": counts["unlabelled"],
        "changed": counts["changed"],
        "unchanged": counts["unchanged"],
        "unlabelled": counts["unlabelled"],
        "threshold": round(chosen_threshold.value, 6),
        "threshold_method": chosen_threshold.method,
        "measure": used,
        "measure_formula": MEASURE_FORMULAS[used],
        "explore": float(explore),
        "random_tiles": int(np.count_nonzero(frame["picked_by"] == RANDOM_PICK)),
        "tile_size": size,
        "min_gap": min_gap,
        "tiles": [int(v) for v in frame["tile_id"]],
    }
