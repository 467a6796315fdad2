"""Weak labels: which areas changed, which did not, turned into per-tile labels.

A weak-label source is a vector file (GeoPackage, Shapefile, GeoJSON, ...) or a GeoDataFrame of
polygons or points with an integer field (default ``change``: 1 changed, 0 unchanged; empty
values are unmarked). The rule (DESIGN.md): a tile is changed (1) if it touches a changed
feature, unchanged (0) if it touches only unchanged features, unlabelled (-1) otherwise, unless
unmarked tiles count as unchanged. The labelling grid written by
:func:`kdmsi_engine.data.tiling.write_tile_grid` is itself a valid label source.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.features
from rasterio.windows import Window
from shapely.geometry import box, shape

from kdmsi_engine import defaults
from kdmsi_engine.data.tiling import make_tile_grid
from kdmsi_engine.errors import LabelError
from kdmsi_engine.progress import Progress

if TYPE_CHECKING:
    from kdmsi_engine.data.scene import ScenePair

logger = logging.getLogger(__name__)

CHANGED = 1
UNCHANGED = 0
UNLABELLED = -1
DEFAULT_FIELD = defaults.LABEL_FIELD
#: Overlap (as a fraction of the tile's area) under which a polygon only touches a tile's edge.
AREA_EPSILON = 1e-9

# Union, not |: evaluated at import, and Python 3.9 has no | between types.
LabelSource = Union[str, os.PathLike[str], gpd.GeoDataFrame]


def _read_source(source: LabelSource) -> tuple[gpd.GeoDataFrame, str]:
    if isinstance(source, gpd.GeoDataFrame):
        return source.copy(), "the label layer"
    path = Path(source)
    if not path.exists():
        raise LabelError(f"label file {path} does not exist; check the path")
    try:
        frame = gpd.read_file(path)
    except Exception as exc:  # fiona raises several driver-specific errors  # noqa: BLE001
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LabelError(
            f"label file {path} cannot be read as a vector layer ({detail}); "
            "give a GeoPackage, Shapefile or GeoJSON"
        ) from exc
    if not isinstance(frame, gpd.GeoDataFrame) or "geometry" not in frame:
        raise LabelError(f"label file {path} has no geometries; give a vector layer")
    return frame, f"label file {path.name}"


def _integer_values(values: pd.Series, field: str, what: str) -> pd.Series:
    """Values as a nullable integer series; raise on text, fractions, or values not 0/1."""
    non_null = values.dropna()
    if non_null.empty:
        return pd.Series(pd.array([pd.NA] * len(values), dtype="Int64"), index=values.index)
    if values.dtype == object:
        try:
            numeric = pd.to_numeric(non_null, errors="raise")
        except (ValueError, TypeError) as exc:
            bad = next(
                (v for v in non_null if not _is_number(v)),
                non_null.iloc[0],
            )
            raise LabelError(
                f"{what}: field {field!r} must hold integers 1 (changed) or 0 (unchanged); "
                f"found {bad!r}"
            ) from exc
        if any(isinstance(v, str) for v in non_null):
            bad = next(v for v in non_null if isinstance(v, str))
            raise LabelError(
                f"{what}: field {field!r} must hold integers 1 (changed) or 0 (unchanged), not "
                f"text; found {bad!r}"
            )
        non_null = numeric
    elif not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
        raise LabelError(
            f"{what}: field {field!r} has type {values.dtype}; it must hold integers 1 or 0"
        )
    arr = non_null.astype(float).to_numpy()
    fractional = arr[~np.isclose(arr, np.round(arr))]
    if fractional.size:
        raise LabelError(
            f"{what}: field {field!r} must hold integers 1 or 0; found {fractional[0]:g}"
        )
    other = sorted(set(np.round(arr).tolist()) - {float(CHANGED), float(UNCHANGED)})
    if other:
        shown = ", ".join(f"{v:.0f}" if abs(v) < 1e15 else f"{v:g}" for v in other[:5])
        raise LabelError(
            f"{what}: field {field!r} must be 1 (changed) or 0 (unchanged); found {shown}"
        )
    out = pd.Series(pd.array([pd.NA] * len(values), dtype="Int64"), index=values.index)
    out.loc[non_null.index] = np.round(arr).astype(np.int64)
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def read_weak_labels(
    source: LabelSource,
    *,
    crs: object,
    field: str = DEFAULT_FIELD,
    bounds: tuple[float, float, float, float] | None = None,
) -> gpd.GeoDataFrame:
    """Read, check and reproject weak labels.

    Args:
        source: vector file path or GeoDataFrame.
        crs: the scene CRS to reproject to (``None`` for ungeoreferenced folder scenes: the
            features are then taken in pixel coordinates and must have no CRS either).
        field: the integer attribute (1 changed, 0 unchanged, empty = unmarked).
        bounds: optional scene bounds ``(left, bottom, right, top)`` in ``crs``; raise if no
            feature falls inside.

    Returns:
        GeoDataFrame with the field as int64 (unmarked features dropped) and geometry, in ``crs``.

    Raises:
        LabelError: unreadable file, no features, missing field, bad values, no CRS, or all
            features outside ``bounds``.
    """
    # Longer than 80 lines: its documented parameters and one check per way a label file can be wrong.
    frame, what = _read_source(source)
    frame = frame[frame.geometry.notna()]
    frame = frame[~frame.geometry.is_empty]
    if frame.empty:
        raise LabelError(f"{what} has no features; draw changed (1) and unchanged (0) areas")
    if field not in frame.columns:
        available = [c for c in frame.columns if c != frame.geometry.name]
        raise LabelError(
            f"{what} has no field {field!r}; available fields: "
            f"{', '.join(available) if available else 'none'}; choose one as the label field",
            parameters=("label_field",),
        )
    values = _integer_values(frame[field], field, what)
    keep = values.notna()
    if not keep.any():
        raise LabelError(
            f"{what}: no feature has a value in field {field!r}; set it to 1 (changed) or 0 "
            "(unchanged) on the features you know"
        )
    frame = frame.loc[keep].copy()
    frame[field] = values[keep].astype(np.int64).to_numpy()
    geom_types = set(frame.geometry.geom_type.unique())
    allowed = {"Point", "MultiPoint", "Polygon", "MultiPolygon", "LineString", "MultiLineString"}
    if not geom_types <= allowed:
        raise LabelError(
            f"{what} has {', '.join(sorted(geom_types - allowed))} geometries; use polygons or points"
        )
    frame = _usable_geometries(frame, what, "has no usable geometry (empty or bad coordinates)")
    if frame.crs is not None and str(frame.crs.name).lower().startswith("undefined"):
        # GeoPackages written without a CRS read back with GDAL's "Undefined ... SRS".
        frame = gpd.GeoDataFrame(
            frame.drop(columns=frame.geometry.name), geometry=list(frame.geometry), crs=None
        )
    if crs is not None:
        if frame.crs is None:
            raise LabelError(f"{what} has no CRS; assign its CRS (e.g. in QGIS) and save it again")
        if frame.crs != crs:
            try:
                frame = frame.to_crs(crs)
            except Exception as exc:  # pyproj raises several error types  # noqa: BLE001
                raise LabelError(
                    f"{what} cannot be reprojected from {frame.crs.to_string()} to the scene CRS; "
                    "check the label CRS"
                ) from exc
            frame = _usable_geometries(
                frame,
                what,
                "has no feature that can be reprojected to the scene CRS; check its CRS",
            )
    elif frame.crs is not None:
        raise LabelError(
            f"{what} is georeferenced ({frame.crs.to_string()}) but the scene is not; "
            "give labels in pixel coordinates"
        )
    frame = gpd.GeoDataFrame(
        {field: frame[field].to_numpy()}, geometry=frame.geometry.to_numpy(), crs=crs
    )
    if bounds is not None:
        check_inside(frame, bounds, what=what)
    return frame


def _usable_geometries(frame: gpd.GeoDataFrame, what: str, reason: str) -> gpd.GeoDataFrame:
    """Drop empty geometries and those with non-finite coordinates; repair invalid polygons."""
    with np.errstate(invalid="ignore"):
        bounds = frame.geometry.bounds.to_numpy(dtype=np.float64)
    finite = np.isfinite(bounds).all(axis=1) & ~frame.geometry.is_empty.to_numpy()
    frame = frame.loc[finite]
    if not frame.empty:
        poly = frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"]) & ~frame.geometry.is_valid
        if poly.any():
            frame = frame.copy()
            frame.loc[poly, frame.geometry.name] = frame.geometry[poly].buffer(0)
            frame = frame.loc[~frame.geometry.is_empty]
    if frame.empty:
        raise LabelError(f"{what} {reason}")
    return frame


def check_inside(
    features: gpd.GeoDataFrame, bounds: tuple[float, float, float, float], *, what: str = "labels"
) -> None:
    """Raise :class:`LabelError` when no feature intersects ``bounds``."""
    left, bottom, right, top = bounds
    hits = features.sindex.query(box(left, bottom, right, top), predicate="intersects")
    if len(hits) == 0:
        fb = features.total_bounds
        raise LabelError(
            f"all {len(features)} features of {what} lie outside the scene "
            f"(labels {_fmt_bounds(fb)}, scene {_fmt_bounds(bounds)}); check the label CRS"
        )


def _fmt_bounds(b: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in b) + ")"


def assign_tile_labels(
    tiles: gpd.GeoDataFrame,
    features: gpd.GeoDataFrame,
    *,
    field: str = DEFAULT_FIELD,
    unmarked_unchanged: bool = False,
) -> np.ndarray:
    """Per-tile labels by the touching rule.

    Returns:
        int8 array, one per tile: 1 touches a changed feature, 0 touches only unchanged
        features, -1 touches none (0 when ``unmarked_unchanged``).
    """
    n = len(tiles)
    labels = np.full(n, UNCHANGED if unmarked_unchanged else UNLABELLED, dtype=np.int8)
    if n == 0 or len(features) == 0:
        return labels
    if tiles.crs != features.crs and tiles.crs is not None and features.crs is not None:
        features = features.to_crs(tiles.crs)
    values = np.asarray(features[field].to_numpy(), dtype=np.int64)
    tile_idx, feat_idx = touching_pairs(tiles, features)
    touched = np.zeros(n, dtype=bool)
    changed = np.zeros(n, dtype=bool)
    touched[tile_idx] = True
    np.logical_or.at(changed, tile_idx, values[feat_idx] == CHANGED)
    labels[touched] = UNCHANGED
    labels[changed] = CHANGED
    return labels


def touching_pairs(
    tiles: gpd.GeoDataFrame, features: gpd.GeoDataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """``(tile_index, feature_index)`` of every feature that touches a tile.

    A point touches the tiles it lies in or on the edge of. A polygon or line touches a tile
    when it reaches into it: sharing only an edge or a corner does not count (so the cells of a
    labelling grid label exactly their own tile).
    """
    tile_idx, feat_idx = features.sindex.query_bulk(tiles.geometry, predicate="intersects")
    if len(tile_idx) == 0:
        return tile_idx, feat_idx
    keep = np.ones(len(tile_idx), dtype=bool)
    tile_geoms = tiles.geometry.to_numpy()
    feat_geoms = features.geometry.to_numpy()
    for k, (t, f) in enumerate(zip(tile_idx, feat_idx)):
        geom = feat_geoms[f]
        kind = geom.geom_type
        if kind in ("Point", "MultiPoint"):
            continue
        tile = tile_geoms[t]
        if kind in ("Polygon", "MultiPolygon"):
            keep[k] = tile.intersection(geom).area > AREA_EPSILON * tile.area
        else:
            keep[k] = not tile.touches(geom)
    return tile_idx[keep], feat_idx[keep]


def labelled_tiles(
    scene: ScenePair,
    labels: LabelSource,
    *,
    tile_size: int,
    overlap: int = defaults.GRID_OVERLAP,
    field: str = DEFAULT_FIELD,
    unmarked_unchanged: bool = False,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    progress: Progress | None = None,
) -> gpd.GeoDataFrame:
    """The scene's tile grid with a ``label`` column (1, 0, -1) from weak labels.

    The labels are read and checked first, so bad labels fail before any tiling work.
    """
    progress = progress or Progress()
    features = read_weak_labels(labels, crs=scene.grid.crs, field=field, bounds=scene.grid.bounds)
    tiles = make_tile_grid(
        scene, tile_size, overlap, min_valid_fraction=min_valid_fraction, progress=progress
    )
    progress.stage("labels", total=None, message=f"{len(features)} label features")
    tiles["label"] = assign_tile_labels(
        tiles, features, field=field, unmarked_unchanged=unmarked_unchanged
    )
    return tiles


def label_counts(labels: np.ndarray | pd.Series) -> dict[str, int]:
    """``{"changed": n1, "unchanged": n0, "unlabelled": n_minus1}``."""
    arr = np.asarray(labels)
    return {
        "changed": int(np.count_nonzero(arr == CHANGED)),
        "unchanged": int(np.count_nonzero(arr == UNCHANGED)),
        "unlabelled": int(np.count_nonzero(arr == UNLABELLED)),
    }


def check_both_classes(labels: np.ndarray | pd.Series) -> None:
    """Raise :class:`LabelError` unless there are changed and unchanged tiles (for training)."""
    counts = label_counts(labels)
    if counts["changed"] == 0 or counts["unchanged"] == 0:
        missing = "changed (1)" if counts["changed"] == 0 else "unchanged (0)"
        raise LabelError(
            f"the labels give {counts['changed']} changed and {counts['unchanged']} unchanged "
            f"tiles; training needs both: mark some {missing} areas"
        )


def labels_from_raster(
    path: str | os.PathLike[str],
    *,
    geometry: str = "polygons",
    changed_values: tuple[int, ...] = (1,),
    unchanged_values: tuple[int, ...] = (0,),
    field: str = DEFAULT_FIELD,
    block_size: int = 1024,
    min_pixels: int = 1,
) -> gpd.GeoDataFrame:
    """Weak labels from a sparse sample raster (e.g. 1 changed, 0 unchanged, 255 unlabelled).

    Each connected region of one class becomes a polygon (or, with ``geometry="points"``, one
    point inside it). The raster is read in blocks, so a region crossing a block edge becomes
    several features (harmless for the touching rule).

    Returns:
        GeoDataFrame with ``field`` (1/0) and geometry, in the raster's CRS.
    """
    if geometry not in ("polygons", "points"):
        raise LabelError(f"geometry must be 'polygons' or 'points', not {geometry!r}")
    from kdmsi_engine.data.raster import open_raster

    values_out: list[int] = []
    geoms: list[Any] = []
    with open_raster(path, what="label raster") as ds:
        crs = ds.crs
        for row in range(0, ds.height, block_size):
            for col in range(0, ds.width, block_size):
                window = Window(
                    col, row, min(block_size, ds.width - col), min(block_size, ds.height - row)
                )
                data = ds.read(1, window=window)
                classes = np.full(data.shape, 255, dtype=np.uint8)
                classes[np.isin(data, unchanged_values)] = UNCHANGED
                classes[np.isin(data, changed_values)] = CHANGED
                mask = classes != 255
                if not mask.any():
                    continue
                transform = ds.window_transform(window)
                for geom, value in rasterio.features.shapes(
                    classes, mask=mask, transform=transform, connectivity=4
                ):
                    poly = shape(geom)
                    if min_pixels > 1 and poly.area < min_pixels * abs(transform.a * transform.e):
                        continue
                    geoms.append(poly.representative_point() if geometry == "points" else poly)
                    values_out.append(int(value))
    if not geoms:
        raise LabelError(f"label raster {Path(path).name} has no changed or unchanged pixels")
    return gpd.GeoDataFrame(
        {field: np.asarray(values_out, dtype=np.int64)}, geometry=geoms, crs=crs
    )
