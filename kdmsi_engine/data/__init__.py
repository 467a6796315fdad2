"""The engine's geospatial data layer: scene pairs on one grid, tiles, weak labels, datasets.

Public API (see TEAM.md): :class:`ScenePair`, :class:`Grid`, :class:`BandScaling`,
:class:`SceneWindow`, :func:`tile_windows`, :func:`make_tile_grid`, :func:`write_tile_grid`,
:func:`read_weak_labels`, :func:`assign_tile_labels`, :func:`labelled_tiles`, folder datasets
(:func:`find_pairs`, :func:`open_folder_pair`, :func:`read_mask`, :func:`mask_tile_labels`) and
:func:`read_manifest`.
"""

from __future__ import annotations

from kdmsi_engine.data.folder import (
    FolderPair,
    dataset_tiles,
    find_pairs,
    mask_tile_labels,
    open_folder_pair,
    read_mask,
)
from kdmsi_engine.data.grid import Grid
from kdmsi_engine.data.labels import (
    assign_tile_labels,
    check_both_classes,
    label_counts,
    labelled_tiles,
    labels_from_raster,
    read_weak_labels,
)
from kdmsi_engine.data.manifest import SceneSpec, read_manifest
from kdmsi_engine.data.raster import GridReader, open_raster
from kdmsi_engine.data.scaling import BandScaling
from kdmsi_engine.data.scene import ScenePair, SceneWindow, parse_bands
from kdmsi_engine.data.tiling import make_tile_grid, tile_window, tile_windows, write_tile_grid

__all__ = [
    "BandScaling",
    "FolderPair",
    "Grid",
    "GridReader",
    "ScenePair",
    "SceneSpec",
    "SceneWindow",
    "assign_tile_labels",
    "check_both_classes",
    "dataset_tiles",
    "find_pairs",
    "label_counts",
    "labelled_tiles",
    "labels_from_raster",
    "make_tile_grid",
    "mask_tile_labels",
    "open_folder_pair",
    "open_raster",
    "parse_bands",
    "read_manifest",
    "read_mask",
    "read_weak_labels",
    "tile_window",
    "tile_windows",
    "write_tile_grid",
]
