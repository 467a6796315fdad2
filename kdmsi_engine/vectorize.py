"""Change polygons from a binary change raster, by windows, in bounded memory.

The change raster (``change.tif``: 1 change, 0 none, 255 nodata) is read block by block
(row-major, ``block_size`` pixels square). In each block the change pixels are polygonised with
``rasterio.features.shapes`` (4-connectivity) and burnt back into a label image, which gives the
pixels of every piece for its statistics (pixel count, mean and maximum probability). Pieces that
touch an inner block edge are joined to the pieces across that edge with a union-find over the
edge rows and columns (two pieces join where a change pixel on one side has a change pixel right
across the edge: the same 4-connectivity as inside a block). A group of pieces is finished once
no member touches the bottom edge of the last block row read; it is then dissolved into one
polygon, cleaned and written. So a polygon that crosses block edges comes out whole, and memory
holds one block plus one row of edge labels plus the pieces still open, never the whole scene.

Every written polygon is valid (``shapely.validation.make_valid`` where needed), in the change
raster's CRS unless ``dst_crs`` asks for a reprojection, with the attributes ``area_m2`` (area of
the final polygon in the raster CRS, computed before any reprojection; geodesic when the CRS is
geographic), ``pixels`` (change pixels in it), ``mean_prob`` and ``max_prob`` (over those pixels,
empty without a probability raster) and ``scene``. Options, applied in this order: ``fill_holes``
removes holes smaller than that area, ``min_area`` drops polygons smaller than that area (after
hole filling), ``simplify`` simplifies with that tolerance in CRS units, preserving topology.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fiona
import numpy as np
import rasterio
import rasterio.features
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.ops import transform as shapely_transform
from shapely.ops import unary_union
from shapely.validation import make_valid

from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.data.raster import open_raster
from kdmsi_engine.errors import InputError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import VectorizeResult

logger = logging.getLogger(__name__)

#: Value of change pixels in a change raster.
CHANGE_VALUE = 1
#: Layer name of the change polygons in the GeoPackage.
LAYER_NAME = "changes"
#: Polygons written per GeoPackage transaction.
WRITE_BATCH = 2000
SCHEMA = {
    "geometry": "MultiPolygon",
    "properties": {
        "id": "int",
        "area_m2": "float",
        "pixels": "int",
        "mean_prob": "float",
        "max_prob": "float",
        "scene": "str",
    },
}


@dataclass
class _Piece:
    """The part of one connected change region that lies in one block."""

    geometry: Polygon
    pixels: int
    prob_sum: float
    prob_count: int
    prob_max: float


@dataclass
class _UnionFind:
    parent: dict[int, int] = field(default_factory=dict)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def forget(self, ids: list[int]) -> None:
        for i in ids:
            self.parent.pop(i, None)


@dataclass
class VectorizeOptions:
    """Clean-up options for change polygons (areas in square metres, lengths in CRS units)."""

    min_area: float = 0.0
    simplify: float = 0.0
    fill_holes: float = 0.0

    def check(self) -> None:
        for name in ("min_area", "simplify", "fill_holes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")


def vectorize_changes(
    change_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    probability_path: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    fill_holes: float = 0.0,
    dst_crs: str | CRS | None = None,
    scene: str | None = None,
    block_size: int = 1024,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> VectorizeResult:
    """Polygonise the change pixels (value 1) of ``change_path`` into a GeoPackage.

    Args:
        change_path: single-band change raster (1 change, 0 none, anything else ignored).
        out_path: GeoPackage to write (layer ``changes``).
        probability_path: change probability raster on the same grid, for ``mean_prob`` and
            ``max_prob``; without it those attributes are empty.
        min_area: drop polygons smaller than this (square metres, after hole filling).
        simplify: simplification tolerance in CRS units (0: none); topology is preserved.
        fill_holes: fill holes smaller than this area (square metres; 0: none).
        dst_crs: reproject the polygons to this CRS (EPSG code, WKT, PROJ string).
        scene: value of the ``scene`` attribute (default: the change raster's folder name).
        block_size: block edge in pixels (memory is about 13 bytes times its square).
        overwrite: replace an existing output.
        progress: progress and cancellation.

    Returns:
        ``{"changes": path, "polygons": n, "change_area_m2": total area, "crs": ...}``.

    Raises:
        InputError: bad options. RasterError: unreadable rasters or grids that differ.
        OutputError: the output exists without ``overwrite`` or cannot be written.
    """
    progress = progress or Progress()
    options = VectorizeOptions(float(min_area), float(simplify), float(fill_holes))
    options.check()
    if int(block_size) < 16:
        raise InputError(f"block size must be at least 16 pixels, got {block_size}")
    change_path = Path(change_path)
    target = check_output(out_path, overwrite=overwrite)
    if target.suffix.lower() != ".gpkg":
        raise InputError(f"output {target.name} must be a GeoPackage (.gpkg)")
    with open_raster(change_path, what="change raster") as change_ds:
        if change_ds.count != 1:
            raise RasterError(
                f"change raster {change_path} has {change_ds.count} bands; give the single-band "
                "change.tif that 'kdmsi detect' writes"
            )
        src_crs = change_ds.crs
        out_crs = _parse_crs(dst_crs) if dst_crs not in (None, "") else None
        if out_crs is not None and src_crs is None:
            raise InputError(
                f"change raster {change_path} has no CRS, so it cannot be reprojected; "
                "leave the output CRS out",
                parameters=("dst_crs",),
            )
        prob_ds = None
        if probability_path is not None:
            prob_ds = open_raster(Path(probability_path), what="probability raster")
            _check_same_grid(change_ds, prob_ds, change_path, Path(probability_path))
        scene_name = scene if scene is not None else _default_scene_name(change_path)
        try:
            with atomic_output(target, overwrite=overwrite) as tmp:
                result = _write_polygons(
                    change_ds, prob_ds, tmp, options, out_crs, scene_name, int(block_size), progress
                )
        finally:
            if prob_ds is not None:
                prob_ds.close()
    result["changes"] = str(target)
    progress.log(f"{result['polygons']} change polygons written to {target}")
    return result


def _default_scene_name(change_path: Path) -> str:
    parent = change_path.absolute().parent.name
    return parent or change_path.stem


def _parse_crs(value: str | CRS) -> CRS:
    if isinstance(value, CRS):
        return value
    text = str(value).strip()
    try:
        return CRS.from_user_input(int(text) if text.isdigit() else text)
    except (CRSError, ValueError) as exc:
        raise InputError(f"unknown CRS {value!r}; give e.g. EPSG:4326") from exc


def _check_same_grid(a: Any, b: Any, path_a: Path, path_b: Path) -> None:
    same = (
        a.width == b.width
        and a.height == b.height
        and a.transform.almost_equals(b.transform)
        and (a.crs == b.crs)
    )
    if not same:
        raise RasterError(
            f"probability raster {path_b} is not on the grid of {path_a}; give the "
            "change_probability.tif written with it"
        )
    if b.count != 1:
        raise RasterError(f"probability raster {path_b} must have one band, has {b.count}")


def _pixel_area(transform: Any) -> float:
    return abs(transform.a * transform.e - transform.b * transform.d)


def _blocks(height: int, width: int, size: int) -> Iterator[list[Window]]:
    """Rows of square windows covering the raster, row-major."""
    for row in range(0, height, size):
        h = min(size, height - row)
        yield [Window(col, row, min(size, width - col), h) for col in range(0, width, size)]


def _write_polygons(
    change_ds: Any,
    prob_ds: Any,
    tmp: Path,
    options: VectorizeOptions,
    out_crs: CRS | None,
    scene_name: str,
    block_size: int,
    progress: Progress,
) -> VectorizeResult:
    height, width = change_ds.height, change_ds.width
    src_crs = change_ds.crs
    geodesic = src_crs is not None and src_crs.is_geographic
    reproject = None
    if out_crs is not None and out_crs != src_crs:
        from pyproj import Transformer

        transformer = Transformer.from_crs(src_crs, out_crs, always_xy=True)

        def reproject(geom: Any) -> Any:
            return shapely_transform(transformer.transform, geom)

    write_crs = out_crs if out_crs is not None else src_crs
    crs_wkt = write_crs.to_wkt() if write_crs is not None else ""
    rows_of_blocks = list(_blocks(height, width, block_size))
    progress.stage(
        "vectorize", total=sum(len(r) for r in rows_of_blocks), message="polygonising changes"
    )
    state = _State(options=options, geodesic=geodesic, crs=src_crs, scene=scene_name)
    with fiona.open(
        tmp, "w", driver="GPKG", schema=SCHEMA, crs_wkt=crs_wkt, layer=LAYER_NAME
    ) as sink:
        buffer: list[dict[str, Any]] = []

        def emit(piece_list: list[_Piece]) -> None:
            record = state.finish(piece_list)
            if record is None:
                return
            geom, props = record
            if reproject is not None:
                geom = reproject(geom)
            buffer.append({"geometry": mapping(geom), "properties": props})
            if len(buffer) >= WRITE_BATCH:
                sink.writerecords(buffer)
                buffer.clear()

        prev_bottom = np.zeros(width, dtype=np.int64)  # global ids on the last row read
        next_id = 1
        for block_row in rows_of_blocks:
            this_bottom = np.zeros(width, dtype=np.int64)
            prev_right: np.ndarray | None = None
            for window in block_row:
                progress.check_cancelled()
                next_id, prev_right = state.block(
                    change_ds,
                    prob_ds,
                    window,
                    next_id,
                    prev_bottom,
                    this_bottom,
                    prev_right,
                    (height, width),
                    emit,
                )
                progress.advance(1)
            # Groups with no member on the bottom edge of this block row are complete.
            open_ids = set(np.unique(this_bottom[this_bottom > 0]).tolist())
            state.flush(open_ids, emit)
            prev_bottom = this_bottom
        state.flush(set(), emit)
        if buffer:
            sink.writerecords(buffer)
    return {
        "polygons": state.written,
        "change_area_m2": round(state.total_area, 3),
        "crs": write_crs.to_string() if write_crs is not None else None,
        "layer": LAYER_NAME,
        "changes": "",
    }


@dataclass
class _State:
    options: VectorizeOptions
    geodesic: bool
    crs: CRS | None
    scene: str = ""
    pending: dict[int, _Piece] = field(default_factory=dict)
    uf: _UnionFind = field(default_factory=_UnionFind)
    written: int = 0
    total_area: float = 0.0

    def block(
        self,
        change_ds: Any,
        prob_ds: Any,
        window: Window,
        next_id: int,
        prev_bottom: np.ndarray,
        this_bottom: np.ndarray,
        prev_right: np.ndarray | None,
        shape_hw: tuple[int, int],
        emit: Any,
    ) -> tuple[int, np.ndarray]:
        """Polygonise one block; return the next free id and its right-column global ids."""
        # Longer than 80 lines: one pass per block: polygons, their statistics and the seams between blocks.
        height, width = shape_hw
        h, w = int(window.height), int(window.width)
        r0, c0 = int(window.row_off), int(window.col_off)
        mask = change_ds.read(1, window=window) == CHANGE_VALUE
        if not mask.any():
            return next_id, np.zeros(h, dtype=np.int64)
        wt = change_ds.window_transform(window)
        polygons = [
            geom
            for geom, _ in rasterio.features.shapes(
                mask.view(np.uint8), mask=mask, connectivity=4, transform=wt
            )
        ]
        labels = rasterio.features.rasterize(
            ((geom, i + 1) for i, geom in enumerate(polygons)),
            out_shape=(h, w),
            transform=wt,
            fill=0,
            dtype="int32",
        )
        n = len(polygons)
        flat = labels[mask]
        counts = np.bincount(flat, minlength=n + 1)
        prob_sum: np.ndarray = np.zeros(n + 1)
        prob_count: np.ndarray = np.zeros(n + 1, dtype=np.int64)
        prob_max = np.full(n + 1, -np.inf)
        if prob_ds is not None:
            prob = prob_ds.read(1, window=window, masked=True)
            values = np.ma.getdata(prob)[mask].astype(np.float64)
            ok = ~np.ma.getmaskarray(prob)[mask] & np.isfinite(values)
            ids, vals = flat[ok], values[ok]
            prob_sum = np.bincount(ids, weights=vals, minlength=n + 1)
            prob_count = np.bincount(ids, minlength=n + 1)
            np.maximum.at(prob_max, ids, vals)
        base = next_id - 1
        gl = np.where(labels > 0, labels.astype(np.int64) + base, 0)
        edge_ids: set[int] = set()
        if r0 > 0:
            top = gl[0]
            above = prev_bottom[c0 : c0 + w]
            both = (top > 0) & (above > 0)
            for a, b in zip(top[both].tolist(), above[both].tolist()):
                self.uf.union(a, b)
            edge_ids.update(top[top > 0].tolist())
        if c0 > 0 and prev_right is not None:
            left = gl[:, 0]
            both = (left > 0) & (prev_right > 0)
            for a, b in zip(left[both].tolist(), prev_right[both].tolist()):
                self.uf.union(a, b)
            edge_ids.update(left[left > 0].tolist())
        if r0 + h < height:
            edge_ids.update(gl[-1][gl[-1] > 0].tolist())
        if c0 + w < width:
            edge_ids.update(gl[:, -1][gl[:, -1] > 0].tolist())
        this_bottom[c0 : c0 + w] = gl[-1]
        for i, geom in enumerate(polygons, start=1):
            piece = _Piece(
                geometry=shape(geom),
                pixels=int(counts[i]),
                prob_sum=float(prob_sum[i]),
                prob_count=int(prob_count[i]),
                prob_max=float(prob_max[i]),
            )
            gid = base + i
            if gid in edge_ids:
                self.pending[gid] = piece
            else:
                emit([piece])
        return next_id + n, gl[:, -1].copy()

    def flush(self, open_ids: set[int], emit: Any) -> None:
        """Write every pending group none of whose pieces is in ``open_ids``."""
        if not self.pending:
            return
        groups: dict[int, list[int]] = {}
        for gid in self.pending:
            groups.setdefault(self.uf.find(gid), []).append(gid)
        for members in groups.values():
            if any(m in open_ids for m in members):
                continue
            emit([self.pending.pop(m) for m in members])
            self.uf.forget(members)

    def finish(self, pieces: list[_Piece]) -> tuple[Any, dict[str, Any]] | None:
        """Dissolve, clean and measure one change region; ``None`` when it is dropped."""
        if len(pieces) == 1:
            geom = pieces[0].geometry
        else:
            geom = unary_union([p.geometry for p in pieces])
        geom = _valid_polygonal(geom)
        if geom is None:
            return None
        opts = self.options
        if opts.fill_holes > 0:
            geom = _fill_holes(geom, opts.fill_holes, self._area)
        if opts.min_area > 0 and self._area(geom) < opts.min_area:
            return None
        if opts.simplify > 0:
            geom = _valid_polygonal(geom.simplify(opts.simplify, preserve_topology=True))
            if geom is None:
                return None
        area = self._area(geom)
        pixels = sum(p.pixels for p in pieces)
        prob_count = sum(p.prob_count for p in pieces)
        mean_prob = sum(p.prob_sum for p in pieces) / prob_count if prob_count else None
        max_prob = max(p.prob_max for p in pieces) if prob_count else None
        self.written += 1
        self.total_area += area
        props = {
            "id": self.written,
            "area_m2": round(area, 3),
            "pixels": pixels,
            # not rounded: a polygon's pixels are all above the threshold, so is their mean
            "mean_prob": None if mean_prob is None else float(mean_prob),
            "max_prob": None if max_prob is None else float(max_prob),
            "scene": self.scene,
        }
        return _as_multi(geom), props

    def _area(self, geom: Any) -> float:
        if self.geodesic:
            from pyproj import Geod

            area, _ = Geod(ellps="WGS84").geometry_area_perimeter(geom)
            return abs(area)
        return float(geom.area)


def _valid_polygonal(geom: Any) -> Polygon | MultiPolygon | None:
    """A valid (multi)polygon from ``geom``, or ``None`` when nothing areal is left."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom if not geom.is_empty else None
    parts: list[Polygon] = []
    for part in getattr(geom, "geoms", []):
        if isinstance(part, Polygon) and not part.is_empty:
            parts.append(part)
        elif isinstance(part, MultiPolygon):
            parts.extend(p for p in part.geoms if not p.is_empty)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _fill_holes(geom: Polygon | MultiPolygon, max_area: float, area_of: Any) -> Any:
    def fill(poly: Polygon) -> Polygon:
        keep = [ring for ring in poly.interiors if area_of(Polygon(ring)) >= max_area]
        return Polygon(poly.exterior, keep)

    if isinstance(geom, Polygon):
        return fill(geom)
    return MultiPolygon([fill(p) for p in geom.geoms])


def _as_multi(geom: Polygon | MultiPolygon) -> MultiPolygon:
    return MultiPolygon([geom]) if isinstance(geom, Polygon) else geom
