"""Training tiles for KD-MSI: which tiles of which scenes train, with their tile labels.

Three sources, as ``kdmsi train`` takes them:

- one scene pair and a weak-label vector file (:func:`scene_training_set`);
- a manifest of scenes (:func:`manifest_training_set`): every scene with a label file trains;
- a folder dataset ``A/ B/ label/`` (:func:`folder_training_set`): tile labels from the masks
  (1 if a tile has any change pixel), for benchmarks.

Unlabelled tiles (label -1) never train. A :class:`TrainingSet` keeps the tile windows and labels
and re-opens scenes when the tiles are read (:class:`TileStore`): small sets are read once into
memory (float16), large ones are read batch by batch, so memory does not grow with the data.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from rasterio.windows import Window

from kdmsi_engine import defaults
from kdmsi_engine.errors import GridError, InputError, LabelError
from kdmsi_engine.progress import Progress

logger = logging.getLogger(__name__)

#: Tiles are read into memory when they need less than this (float16 both dates + mask).
DEFAULT_CACHE_BYTES = 2 * 1024**3

# Union, not |: evaluated at import, and Python 3.9 has no | between types.
PathLike = Union[str, os.PathLike[str]]


@dataclass
class SceneSource:
    """A scene that provides training tiles.

    Attributes:
        name: scene name (unique in a training set).
        open: opens the scene as a :class:`~kdmsi_engine.data.scene.ScenePair`.
        info: what describes the scene in the model's metadata (paths, label source).
        pair: the folder-dataset pair, when the scene came from a folder dataset.
    """

    name: str
    open: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    pair: Any | None = None


@dataclass(frozen=True)
class TileRef:
    """One training tile: a window of a scene and its tile label (0 or 1)."""

    scene: int
    row_off: int
    col_off: int
    label: int

    def window(self, tile_size: int) -> Window:
        return Window(self.col_off, self.row_off, tile_size, tile_size)


@dataclass
class TrainingSet:
    """Labelled training tiles of one or more scenes.

    Attributes:
        scenes: the scenes, indexed by :attr:`TileRef.scene`.
        tiles: the labelled tiles (labels 0/1 only).
        tile_size: tile side in pixels.
        bands: band indexes read from every scene.
        num_bands: number of bands.
        scalings: band scaling per scene name (``BandScaling.to_dict()``).
        source: ``scene``, ``manifest`` or ``dataset`` with its path(s).
        unlabelled: tiles left out because they had no label.
    """

    scenes: list[SceneSource]
    tiles: list[TileRef]
    tile_size: int
    bands: tuple[int, ...]
    num_bands: int
    scalings: dict[str, dict[str, Any]]
    source: dict[str, Any]
    unlabelled: int = 0

    @property
    def num_changed(self) -> int:
        return sum(1 for t in self.tiles if t.label == 1)

    @property
    def num_unchanged(self) -> int:
        return sum(1 for t in self.tiles if t.label == 0)

    def check_classes(self) -> None:
        """Raise :class:`LabelError` unless both classes have tiles."""
        changed, unchanged = self.num_changed, self.num_unchanged
        if changed == 0 or unchanged == 0:
            raise LabelError(
                f"training needs changed and unchanged tiles, found {changed} changed and "
                f"{unchanged} unchanged ({self.unlabelled} unlabelled) at {self.tile_size} px; "
                "label both kinds of area, count unmarked areas as unchanged, or change the "
                "tile size",
                parameters=("unmarked_unchanged", "tile_size"),
            )

    def describe(self) -> dict[str, Any]:
        """Metadata about the training data (for the model file)."""
        per_scene: dict[str, list[int]] = {s.name: [0, 0] for s in self.scenes}
        for tile in self.tiles:
            per_scene[self.scenes[tile.scene].name][tile.label] += 1
        return {
            **self.source,
            "tile_size": self.tile_size,
            "bands": list(self.bands),
            "tiles": len(self.tiles),
            "changed_tiles": self.num_changed,
            "unchanged_tiles": self.num_unchanged,
            "unlabelled_tiles": self.unlabelled,
            "scenes": [
                {
                    **s.info,
                    "name": s.name,
                    "changed": per_scene[s.name][1],
                    "unchanged": per_scene[s.name][0],
                }
                for s in self.scenes
            ],
        }

    def subset(self, indexes: Sequence[int]) -> TrainingSet:
        """A training set with only the given tiles."""
        return TrainingSet(
            self.scenes,
            [self.tiles[i] for i in indexes],
            self.tile_size,
            self.bands,
            self.num_bands,
            self.scalings,
            self.source,
            self.unlabelled,
        )


def _check_tile_size(tile_size: int) -> int:
    if int(tile_size) != tile_size or tile_size < 32 or tile_size % 16:
        raise InputError(f"tile size {tile_size} must be a multiple of 16, at least 32 (e.g. 256)")
    return int(tile_size)


def _tiles_from_frame(
    frame: Any, scene_index: int, labels: np.ndarray
) -> tuple[list[TileRef], int]:
    tiles: list[TileRef] = []
    unlabelled = 0
    rows = frame["row_off"].to_numpy()
    cols = frame["col_off"].to_numpy()
    for row, col, label in zip(rows, cols, np.asarray(labels).reshape(-1)):
        if label < 0:
            unlabelled += 1
            continue
        tiles.append(TileRef(scene_index, int(row), int(col), int(label > 0)))
    return tiles, unlabelled


def _finish(
    scenes: list[SceneSource],
    tiles: list[TileRef],
    unlabelled: int,
    tile_size: int,
    band_sets: list[tuple[int, ...]],
    scalings: dict[str, dict[str, Any]],
    source: dict[str, Any],
) -> TrainingSet:
    counts = {len(b) for b in band_sets}
    if len(counts) > 1:
        raise InputError(
            f"the scenes have different band counts ({sorted(counts)}); choose the same number "
            "of bands for every scene",
            parameters=("bands",),
        )
    bands = band_sets[0] if band_sets else ()
    tset = TrainingSet(scenes, tiles, tile_size, bands, len(bands), scalings, source, unlabelled)
    tset.check_classes()
    return tset


def _one_scene(
    before: PathLike,
    after: PathLike,
    labels: PathLike,
    index: int,
    *,
    tile_size: int,
    field: str,
    unmarked_unchanged: bool,
    bands: object,
    min_valid_fraction: float,
    name: str | None,
    progress: Progress | None,
) -> tuple[SceneSource, list[TileRef], int, tuple[int, ...], dict[str, Any]]:
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair

    before, after, labels = Path(before), Path(after), Path(labels)
    with ScenePair.open(before, after, bands=bands, name=name) as scene:
        frame = labelled_tiles(
            scene,
            labels,
            tile_size=tile_size,
            field=field,
            unmarked_unchanged=unmarked_unchanged,
            min_valid_fraction=min_valid_fraction,
            progress=progress,
        )
        scaling, scene_bands, scene_name = scene.scaling, tuple(scene.bands), scene.name
    tiles, unlabelled = _tiles_from_frame(frame, index, frame["label"].to_numpy())

    def _open() -> Any:
        return ScenePair.open(before, after, bands=scene_bands, scaling=scaling, name=scene_name)

    info = {
        "before": str(before.absolute()),
        "after": str(after.absolute()),
        "labels": str(labels.absolute()),
        "label_field": field,
        "unmarked_unchanged": bool(unmarked_unchanged),
    }
    return SceneSource(scene_name, _open, info), tiles, unlabelled, scene_bands, scaling.to_dict()


def scene_training_set(
    before: PathLike,
    after: PathLike,
    labels: PathLike,
    *,
    tile_size: int = defaults.TILE_SIZE,
    field: str = "change",
    unmarked_unchanged: bool = False,
    bands: object = None,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    name: str | None = None,
    progress: Progress | None = None,
) -> TrainingSet:
    """Labelled tiles of one scene pair from a weak-label vector file."""
    tile_size = _check_tile_size(tile_size)
    source, tiles, unlabelled, scene_bands, scaling = _one_scene(
        before,
        after,
        labels,
        0,
        tile_size=tile_size,
        field=field,
        unmarked_unchanged=unmarked_unchanged,
        bands=bands,
        min_valid_fraction=min_valid_fraction,
        name=name,
        progress=progress,
    )
    return _finish(
        [source],
        tiles,
        unlabelled,
        tile_size,
        [scene_bands],
        {source.name: scaling},
        {"source": "scene"},
    )


def manifest_training_set(
    manifest: PathLike,
    *,
    tile_size: int = defaults.TILE_SIZE,
    field: str = "change",
    unmarked_unchanged: bool = False,
    bands: object = None,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    progress: Progress | None = None,
) -> TrainingSet:
    """Labelled tiles of every scene of a manifest that has a label file.

    A scene may bring one class only, as long as the whole set has both.
    """
    from kdmsi_engine.data.manifest import read_manifest

    tile_size = _check_tile_size(tile_size)
    specs = [s for s in read_manifest(manifest) if s.labels is not None]
    if not specs:
        raise LabelError(
            f"manifest {manifest} names no label file; fill the labels column for training scenes"
        )
    scenes: list[SceneSource] = []
    tiles: list[TileRef] = []
    unlabelled = 0
    band_sets: list[tuple[int, ...]] = []
    scalings: dict[str, dict[str, Any]] = {}
    for spec in specs:
        assert spec.labels is not None  # scenes without labels were left out above
        source, new, skipped, scene_bands, scaling = _one_scene(
            spec.before,
            spec.after,
            spec.labels,
            len(scenes),
            tile_size=tile_size,
            field=field,
            unmarked_unchanged=unmarked_unchanged,
            bands=bands,
            min_valid_fraction=min_valid_fraction,
            name=spec.name,
            progress=progress,
        )
        scenes.append(source)
        tiles.extend(new)
        unlabelled += skipped
        band_sets.append(scene_bands)
        scalings[source.name] = scaling
    return _finish(
        scenes,
        tiles,
        unlabelled,
        tile_size,
        band_sets,
        scalings,
        {"source": "manifest", "manifest": str(Path(manifest).absolute())},
    )


def folder_training_set(
    roots: PathLike | Sequence[PathLike],
    *,
    tile_size: int = defaults.TILE_SIZE,
    bands: object = None,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> TrainingSet:
    """Tiles of folder datasets (``A/ B/ label/``) with tile labels from the change masks.

    Args:
        roots: one dataset folder or several.
        names: only the pairs with these names (e.g. a city list), in every root.
    """
    # Longer than 80 lines: its documented parameters; one pass over the folder's pairs.
    from kdmsi_engine.data.folder import find_pairs, mask_tile_labels
    from kdmsi_engine.data.tiling import make_tile_grid

    tile_size = _check_tile_size(tile_size)
    root_list = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    scenes: list[SceneSource] = []
    tiles: list[TileRef] = []
    band_sets: list[tuple[int, ...]] = []
    scalings: dict[str, dict[str, Any]] = {}
    wanted = set(names) if names is not None else None
    for root in root_list:
        for pair in find_pairs(root):
            if wanted is not None and pair.name not in wanted:
                continue
            if pair.label is None:
                logger.info("skipping %s: no label mask", pair.name)
                continue
            name = pair.name if len(root_list) == 1 else f"{root.name}/{pair.name}"
            with open_pair_on_own_grid(pair, bands=bands) as scene:
                try:
                    grid = make_tile_grid(scene, tile_size, min_valid_fraction=min_valid_fraction)
                except GridError as exc:
                    logger.warning("skipping %s: %s", name, exc)
                    continue
                scaling, scene_bands = scene.scaling, tuple(scene.bands)
                scene_grid = scene.grid
            if len(grid) == 0:
                continue
            labels = mask_tile_labels(pair, grid, scene_grid)
            index = len(scenes)
            new, _ = _tiles_from_frame(grid, index, labels)
            tiles.extend(new)

            def _open(
                pair: Any = pair, scene_bands: tuple[int, ...] = scene_bands, scaling: Any = scaling
            ) -> Any:
                return open_pair_on_own_grid(pair, bands=scene_bands, scaling=scaling)

            scenes.append(
                SceneSource(
                    name,
                    _open,
                    {
                        "before": str(Path(pair.before).absolute()),
                        "after": str(Path(pair.after).absolute()),
                        "labels": "mask",
                    },
                    pair,
                )
            )
            band_sets.append(scene_bands)
            scalings[name] = scaling.to_dict()
            if progress is not None:
                progress.check_cancelled()
    if not scenes:
        raise LabelError(
            f"no labelled pairs found in {', '.join(str(r) for r in root_list)}; a dataset "
            "folder needs A/, B/ and label/ with matching file names"
        )
    return _finish(
        scenes,
        tiles,
        0,
        tile_size,
        band_sets,
        scalings,
        {"source": "dataset", "dataset": [str(r.absolute()) for r in root_list]},
    )


def open_pair_on_own_grid(pair: Any, *, bands: object = None, scaling: Any = None) -> Any:
    """Open a folder-dataset pair on its before image's own pixel grid.

    The change masks of a folder dataset are read in their files' pixel grid, which is the
    before image's; a georeferenced pair (OSCD, in degrees) would otherwise be warped to UTM and
    its tiles would no longer line up with the masks. Plain images open as they are.
    """
    import rasterio

    from kdmsi_engine.data.folder import open_folder_pair
    from kdmsi_engine.data.scene import ScenePair

    with rasterio.open(pair.before) as ds:
        crs = ds.crs
    if crs is None:
        return open_folder_pair(pair, bands=bands, scaling=scaling)
    return ScenePair.open(
        pair.before, pair.after, bands=bands, scaling=scaling, target_crs=crs, name=pair.name
    )


class TileStore:
    """Reads training tiles as tensors, from memory when they fit in ``cache_bytes``.

    Use as a context manager; :meth:`batch` returns (before, after, valid, labels) tensors:
    float32 (B,C,T,T) in [0,1], float32 (B,C,T,T), bool (B,T,T), float32 (B,).
    """

    def __init__(
        self,
        tset: TrainingSet,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        progress: Progress | None = None,
    ) -> None:
        self.tset = tset
        self._stack = contextlib.ExitStack()
        self._open: dict[int, Any] = {}
        t, c, n = tset.tile_size, tset.num_bands, len(tset.tiles)
        need = n * (2 * c * t * t * 2 + t * t)
        self.cached = need <= cache_bytes
        self._before: np.ndarray | None = None
        self._after: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        if self.cached:
            self._preload(progress)

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def _scene(self, index: int) -> Any:
        if index not in self._open:
            self._open[index] = self._stack.enter_context(self.tset.scenes[index].open())
        return self._open[index]

    def _read(self, tile: TileRef) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        window = self._scene(tile.scene).read(tile.window(self.tset.tile_size))
        return window.before, window.after, window.valid

    def _preload(self, progress: Progress | None) -> None:
        tset = self.tset
        t, c, n = tset.tile_size, tset.num_bands, len(tset.tiles)
        self._before = np.zeros((n, c, t, t), dtype=np.float16)
        self._after = np.zeros((n, c, t, t), dtype=np.float16)
        self._valid = np.zeros((n, t, t), dtype=bool)
        if progress is not None:
            progress.stage("read tiles", total=n, message=f"{n} tiles of {t} px into memory")
        order = sorted(range(n), key=lambda i: (tset.tiles[i].scene, tset.tiles[i].row_off))
        current = None
        for count, i in enumerate(order, 1):
            tile = tset.tiles[i]
            if current is not None and tile.scene != current:
                self.close()
            current = tile.scene
            b, a, v = self._read(tile)
            self._before[i], self._after[i], self._valid[i] = b, a, v
            if progress is not None and (count % 16 == 0 or count == n):
                progress.advance(16 if count % 16 == 0 else count % 16)
                progress.check_cancelled()
        self.close()

    def batch(
        self, indexes: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tiles ``indexes`` of the training set as tensors."""
        labels = torch.tensor([float(self.tset.tiles[i].label) for i in indexes])
        if self.cached:
            assert self._before is not None and self._after is not None and self._valid is not None
            idx = np.asarray(indexes)
            before = torch.from_numpy(self._before[idx].astype(np.float32))
            after = torch.from_numpy(self._after[idx].astype(np.float32))
            valid = torch.from_numpy(self._valid[idx])
            return before, after, valid, labels
        parts = [self._read(self.tset.tiles[i]) for i in indexes]
        before = torch.from_numpy(np.stack([p[0] for p in parts]).astype(np.float32))
        after = torch.from_numpy(np.stack([p[1] for p in parts]).astype(np.float32))
        valid = torch.from_numpy(np.stack([p[2] for p in parts]))
        return before, after, valid, labels
