"""A pair of rasters (before, after) on one grid, read window by window.

:meth:`ScenePair.open` checks both rasters, picks the scene grid (see
:mod:`kdmsi_engine.data.grid`), selects the bands, computes the band scaling from a sample of
windows and checks that the overlap has valid pixels, all before any output is written.
:meth:`ScenePair.read` returns both dates' scaled bands and the valid mask for any window of the
grid. Nothing ever holds a whole scene.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import affine
import numpy as np
from rasterio.windows import Window

from kdmsi_engine.data.grid import Grid, choose_grid
from kdmsi_engine.data.raster import GridReader, data_bands, open_raster
from kdmsi_engine.data.scaling import PERCENTILE_METHOD, UINT8_METHOD, BandScaling
from kdmsi_engine.errors import GridError, InputError, RasterError

__all__ = ["BandScaling", "Grid", "ScenePair", "SceneWindow", "parse_bands"]

logger = logging.getLogger(__name__)

#: Windows sampled per scene for the band statistics (a 4 x 4 lattice).
SAMPLE_GRID = 4
#: Side of a sample window in pixels.
SAMPLE_SIZE = 256
#: Most values kept per band and window for the percentiles.
SAMPLE_VALUES_PER_WINDOW = 16384
#: Side of the windows scanned when the sample finds no valid pixel.
SCAN_SIZE = 1024

# Union, not |: evaluated at import, and Python 3.9 has no | between types.
PathLike = Union[str, os.PathLike[str]]


@dataclass
class SceneWindow:
    """Both dates of one window, scaled, with the valid mask.

    Attributes:
        before: float32 ``(C, h, w)`` in [0, 1], 0 where invalid.
        after: float32 ``(C, h, w)`` in [0, 1], 0 where invalid.
        valid: bool ``(h, w)``: both dates have data and the pixel is inside the overlap.
    """

    before: np.ndarray
    after: np.ndarray
    valid: np.ndarray

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0


def parse_bands(value: object) -> tuple[int, ...] | None:
    """``None``, ``"1,2,3"``, an int or a sequence of ints -> a tuple of 1-based band indexes."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            items = [int(v) for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, int):
            items = [value]
        else:
            items = [int(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"bands {value!r} are not band numbers; give e.g. 1,2,3", parameters=("bands",)
        ) from exc
    if not items:
        raise InputError("no bands given; give e.g. 1,2,3", parameters=("bands",))
    if any(b < 1 for b in items):
        raise InputError(
            f"band numbers start at 1 (got {value!r}); give e.g. 1,2,3", parameters=("bands",)
        )
    if len(set(items)) != len(items):
        raise InputError(
            f"bands {value!r} repeat a band; give each band once", parameters=("bands",)
        )
    return tuple(items)


def _select_bands(before: Any, after: Any, bands: tuple[int, ...] | None) -> tuple[int, ...]:
    if bands is not None:
        for ds, label in ((before, "before"), (after, "after")):
            bad = [b for b in bands if b > ds.count]
            if bad:
                raise InputError(
                    f"band {bad[0]} is out of range: the {label} raster {Path(ds.name).name} has "
                    f"{ds.count} band(s); choose bands between 1 and {ds.count}",
                    parameters=("bands",),
                )
        return bands
    # Every band by default: change shows in the near and short-wave infrared as much as in
    # the visible bands (measured by ``make accuracy``); rasters with different band counts
    # fall back to their first three.
    b_bands, a_bands = data_bands(before), data_bands(after)
    if len(b_bands) == len(a_bands):
        chosen = b_bands
    elif len(b_bands) >= 3 and len(a_bands) >= 3:
        chosen = b_bands[:3]
    else:
        raise InputError(
            f"the before raster has {len(b_bands)} band(s) and the after raster {len(a_bands)}; "
            "choose the same bands for both",
            parameters=("bands",),
        )
    missing = [b for b in chosen if b > after.count]
    if missing:
        raise InputError(
            f"band {missing[0]} is out of range for the after raster; choose other bands",
            parameters=("bands",),
        )
    return chosen


class ScenePair:
    """Two dates of one place on one grid. Use :meth:`open`; close it (or use ``with``).

    Attributes:
        name: scene name (default: the before file's stem).
        grid: the scene grid (cropped to the overlap).
        bands: 1-based band indexes read from both rasters.
        num_bands: ``len(bands)``.
        scaling: the per-band scaling applied on read.
        before_path, after_path: the input files.
    """

    def __init__(
        self,
        *,
        name: str,
        grid: Grid,
        bands: tuple[int, ...],
        scaling: BandScaling,
        before_path: Path,
        after_path: Path,
        readers: tuple[GridReader, GridReader],
        datasets: tuple[Any, Any],
    ) -> None:
        self.name = name
        self.grid = grid
        self.bands = bands
        self.num_bands = len(bands)
        self.scaling = scaling
        self.before_path = before_path
        self.after_path = after_path
        self._readers = readers
        self._datasets = datasets
        self._closed = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        before: PathLike,
        after: PathLike,
        *,
        bands: object = None,
        target_crs: object = None,
        resolution: object = None,
        scaling: BandScaling | dict | None = None,
        require_crs: bool = True,
        name: str | None = None,
        scaling_method: str = "auto",
    ) -> ScenePair:
        """Open and check a pair of rasters; nothing is read but a sample of windows.

        Args:
            before: raster of the first date (any GDAL raster, VRTs included).
            after: raster of the second date.
            bands: 1-based band indexes (``"1,2,3"`` or a sequence); default every data band
                (not alpha) when both rasters have the same count, else the first three.
            target_crs: work in this CRS instead of the before raster's.
            resolution: pixel size in the working CRS's units (one number or ``(x, y)``).
            scaling: the band scaling to use (e.g. from a model file); computed when ``None``.
            require_crs: refuse rasters without a CRS (``False`` for folder datasets, whose
                pixels are aligned as they are).
            name: scene name; default the before file's stem.
            scaling_method: ``auto`` (``uint8`` for 8-bit rasters, else percentiles),
                ``percentile-2-98`` or ``uint8``.

        Raises:
            RasterError: a file is missing, unreadable, truncated, or has no CRS.
            GridError: the rasters do not overlap, or the overlap has no valid pixel.
            InputError: bad bands, CRS, resolution or scaling.
        """
        # Longer than 80 lines: its documented parameters and one check per way two rasters can fail to share a grid.
        if scaling_method not in ("auto", PERCENTILE_METHOD, UINT8_METHOD):
            raise InputError(
                f"unknown scaling method {scaling_method!r}; use auto, {PERCENTILE_METHOD} or "
                f"{UINT8_METHOD}"
            )
        if isinstance(scaling, dict):
            scaling = BandScaling.from_dict(scaling)
        band_list = parse_bands(bands)
        before_path, after_path = Path(before), Path(after)
        ds_before = open_raster(before, what="before raster")
        try:
            ds_after = open_raster(after, what="after raster")
        except BaseException:
            ds_before.close()
            raise
        datasets = (ds_before, ds_after)
        readers: list[GridReader] = []
        try:
            chosen = _select_bands(ds_before, ds_after, band_list)
            grid, georef = _scene_grid(
                ds_before, ds_after, target_crs, resolution, require_crs=require_crs
            )
            for ds in datasets:
                readers.append(GridReader(ds, grid, use_geotransform=georef))
            if scaling is not None and scaling.num_bands != len(chosen):
                raise InputError(
                    f"the scaling has {scaling.num_bands} band(s) but {len(chosen)} band(s) were "
                    "selected; use the bands the model was trained with"
                )
            scene = cls(
                name=name or before_path.stem,
                grid=grid,
                bands=chosen,
                scaling=scaling or BandScaling.uint8(len(chosen)),
                before_path=before_path,
                after_path=after_path,
                readers=(readers[0], readers[1]),
                datasets=datasets,
            )
            method = scaling_method
            if method == "auto":
                is_byte = all(ds.dtypes[b - 1] == "uint8" for ds in datasets for b in chosen)
                method = UINT8_METHOD if is_byte else PERCENTILE_METHOD
            todo = method if scaling is None else None
            has_valid = scene._compute_scaling(todo, scene._sample_windows())
            if not has_valid:
                # The regular sample missed the data: scan for windows that have some.
                found = scene._valid_windows(SAMPLE_GRID * SAMPLE_GRID)
                has_valid = scene._compute_scaling(todo, found) if found else False
            if not has_valid:
                raise GridError(
                    f"the overlap of {before_path.name} and {after_path.name} has no valid pixel "
                    "(all nodata in one date or the other); check the nodata values and extents"
                )
        except BaseException:
            for reader in readers:
                reader.close()
            for ds in datasets:
                ds.close()
            raise
        logger.info(
            "scene %s: grid %dx%d %s, bands %s, scaling %s",
            scene.name,
            grid.width,
            grid.height,
            grid.crs,
            chosen,
            scene.scaling.method,
        )
        return scene

    def _sample_windows(self) -> list[Window]:
        g = self.grid
        # Windows that do not overlap on small scenes, SAMPLE_SIZE on large ones.
        side = min(SAMPLE_SIZE, max(32, min(g.height, g.width) // SAMPLE_GRID))
        h, w = min(side, g.height), min(side, g.width)
        rows = np.linspace(0, g.height - h, SAMPLE_GRID).round().astype(int)
        cols = np.linspace(0, g.width - w, SAMPLE_GRID).round().astype(int)
        seen: set[tuple[int, int]] = set()
        windows = []
        for r in rows:
            for c in cols:
                if (int(r), int(c)) not in seen:
                    seen.add((int(r), int(c)))
                    windows.append(Window(int(c), int(r), w, h))
        return windows

    def _compute_scaling(self, method: str | None, windows: list[Window]) -> bool:
        """Set the scaling from ``windows`` (when ``method`` is given); return whether any
        valid pixel was seen in them."""
        samples: list[list[np.ndarray]] = [[] for _ in self.bands]
        found = False
        need_data = method == PERCENTILE_METHOD
        for window in windows:
            if not need_data:
                if self.read_valid(window).any():
                    found = True
                    break
                continue
            (b_data, b_valid), (a_data, a_valid) = (
                reader.read(window, self.bands) for reader in self._readers
            )
            valid = b_valid & a_valid
            n = int(valid.sum())
            if n == 0:
                continue
            found = True
            step = max(1, n // SAMPLE_VALUES_PER_WINDOW)
            for i in range(len(self.bands)):
                for data in (b_data, a_data):
                    samples[i].append(data[i][valid][::step].astype(np.float64))
        if method == UINT8_METHOD:
            self.scaling = BandScaling.uint8(len(self.bands))
        elif method == PERCENTILE_METHOD and found:
            self.scaling = BandScaling.from_samples([np.concatenate(s) for s in samples])
        return found

    def _valid_windows(self, limit: int) -> list[Window]:
        """Scan the grid by large windows; return up to ``limit`` that hold valid pixels."""
        g = self.grid
        found: list[Window] = []
        for row in range(0, g.height, SCAN_SIZE):
            for col in range(0, g.width, SCAN_SIZE):
                window = Window(
                    col, row, min(SCAN_SIZE, g.width - col), min(SCAN_SIZE, g.height - row)
                )
                if self.read_valid(window).any():
                    found.append(window)
                    if len(found) >= limit:
                        return found
        return found

    # ------------------------------------------------------------------ reading
    def read(self, window: Window) -> SceneWindow:
        """Both dates' scaled bands and the valid mask for a grid window (boundless)."""
        self._check_open()
        (b_data, b_valid), (a_data, a_valid) = (
            reader.read(window, self.bands) for reader in self._readers
        )
        valid = b_valid & a_valid
        before = self.scaling.apply(b_data)
        after = self.scaling.apply(a_data)
        before *= valid
        after *= valid
        return SceneWindow(before, after, valid)

    def read_valid(self, window: Window) -> np.ndarray:
        """Bool ``(h, w)`` valid mask of a grid window, reading masks only where possible."""
        self._check_open()
        valid = None
        for reader in self._readers:
            _, v = reader.read(window, self.bands, with_data=False)
            valid = v if valid is None else valid & v
        assert valid is not None
        return valid

    def valid_fraction(self, window: Window, *, max_side: int | None = None) -> float:
        """Fraction of valid pixels in a grid window.

        With ``max_side``, windows larger than that are judged from masks read at a coarser
        resolution (at most ``max_side`` cells a side), which is much cheaper on large tiles.
        """
        self._check_open()
        side = max(int(window.width), int(window.height))
        factor = 1 if not max_side or side <= max_side else -(-side // int(max_side))
        valid = None
        for reader in self._readers:
            v = reader.read_valid_coarse(window, self.bands, factor)
            valid = v if valid is None else valid & v
        assert valid is not None
        return float(np.count_nonzero(valid)) / valid.size if valid.size else 0.0

    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unscaled ``(before, after, valid)`` for a grid window, in the rasters' types."""
        self._check_open()
        (b_data, b_valid), (a_data, a_valid) = (
            reader.read(window, self.bands) for reader in self._readers
        )
        return b_data, a_data, b_valid & a_valid

    @property
    def warped(self) -> tuple[bool, bool]:
        """Whether the before / after raster is warped onto the grid."""
        return (self._readers[0].warped, self._readers[1].warped)

    @property
    def crs(self) -> Any:
        return self.grid.crs

    @property
    def transform(self) -> affine.Affine:
        return self.grid.transform

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for run records."""
        return {
            "name": self.name,
            "before": str(self.before_path),
            "after": str(self.after_path),
            "bands": list(self.bands),
            "grid": self.grid.to_dict(),
            "scaling": self.scaling.to_dict(),
            "warped": list(self.warped),
        }

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise RasterError(f"scene {self.name} is closed; open it again")

    def close(self) -> None:
        """Close both rasters (idempotent)."""
        if self._closed:
            return
        for reader in self._readers:
            reader.close()
        for ds in self._datasets:
            ds.close()
        self._closed = True

    def __enter__(self) -> ScenePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        g = self.grid
        return f"ScenePair({self.name!r}, {g.width}x{g.height}, crs={g.crs}, bands={self.bands})"


def _scene_grid(
    before: Any, after: Any, target_crs: object, resolution: object, *, require_crs: bool
) -> tuple[Grid, bool]:
    """The grid and whether it is georeferenced."""
    if before.crs is None or after.crs is None:
        if require_crs:
            which = "before" if before.crs is None else "after"
            ds = before if before.crs is None else after
            raise RasterError(
                f"the {which} raster {Path(ds.name).name} has no CRS; assign one "
                "(e.g. gdal_edit.py -a_srs EPSG:xxxx) or use a georeferenced raster"
            )
        if (before.crs is None) != (after.crs is None):
            raise RasterError(
                f"only one of {Path(before.name).name} and {Path(after.name).name} has a CRS; "
                "give two georeferenced rasters or two plain images"
            )
        if target_crs is not None or resolution is not None:
            raise InputError("a target CRS or resolution needs georeferenced rasters")
        if (before.width, before.height) != (after.width, after.height):
            raise GridError(
                f"{Path(before.name).name} is {before.width}x{before.height} pixels and "
                f"{Path(after.name).name} {after.width}x{after.height}; images without "
                "georeferencing must have the same size"
            )
        return Grid(None, affine.Affine.identity(), before.width, before.height), False
    return choose_grid(before, after, target_crs=target_crs, resolution=resolution), True
