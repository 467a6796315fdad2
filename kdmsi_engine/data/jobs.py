"""Engine jobs of the data layer: the labelling grid (``kdmsi grid``) and tile labels
(``kdmsi labels``). Plain signatures, a :class:`Progress`, a result dictionary."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import geopandas as gpd
import pandas as pd

from kdmsi_engine import defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.data.folder import dataset_tiles
from kdmsi_engine.data.labels import label_counts, labelled_tiles
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.data.tiling import (
    check_tile_params,
    make_tile_grid,
    write_tile_grid,
    write_vector,
)
from kdmsi_engine.errors import InputError, OutputError
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import GridResult, LabelsResult

logger = logging.getLogger(__name__)

# Union, not |: evaluated at import, and Python 3.9 has no | between types.
PathLike = Union[str, os.PathLike[str]]
TABLE_SUFFIXES = (".gpkg", ".csv")


def write_labelling_grid(
    before: PathLike,
    after: PathLike,
    out: PathLike,
    *,
    tile_size: int = defaults.TILE_SIZE,
    overlap: int = defaults.GRID_OVERLAP,
    bands: object = None,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    target_crs: object = None,
    resolution: object = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> GridResult:
    """Write the labelling grid GeoPackage of a scene (``kdmsi grid``).

    Returns:
        ``{"grid": path, "tiles": n, "crs": ..., "width": ..., "height": ..., "resolution": ...}``
    """
    progress = progress or Progress()
    target = check_output(out, overwrite=overwrite)
    if target.suffix.lower() != ".gpkg":
        raise OutputError(f"the labelling grid must be a GeoPackage (.gpkg), not {target.name}")
    check_tile_params(tile_size, overlap)
    progress.stage("open", message=f"{Path(before).name} / {Path(after).name}")
    with ScenePair.open(
        before, after, bands=bands, target_crs=target_crs, resolution=resolution
    ) as scene:
        tiles = make_tile_grid(scene, tile_size, overlap, min_valid_fraction, progress)
        grid = scene.grid
        progress.stage("write", message=str(target))
        write_tile_grid(tiles, target, overwrite=overwrite)
    return {
        "grid": str(target),
        "tiles": len(tiles),
        "crs": grid.crs.to_string() if grid.crs is not None else None,
        "width": grid.width,
        "height": grid.height,
        "resolution": list(grid.res),
    }


def write_tile_labels(
    out: PathLike,
    *,
    before: PathLike | None = None,
    after: PathLike | None = None,
    labels: PathLike | gpd.GeoDataFrame | None = None,
    dataset: PathLike | None = None,
    label_field: str = defaults.LABEL_FIELD,
    unmarked_unchanged: bool = False,
    tile_size: int = defaults.TILE_SIZE,
    overlap: int = defaults.GRID_OVERLAP,
    bands: object = None,
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
    target_crs: object = None,
    resolution: object = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LabelsResult:
    """Write per-tile labels (``kdmsi labels``) as a GeoPackage layer or a CSV table.

    Either ``before``, ``after`` and ``labels`` (weak labels by the touching rule), or
    ``dataset`` (a folder dataset: labels from the change masks).

    Returns:
        ``{"output": path, "tiles": n, "changed": n1, "unchanged": n0, "unlabelled": n_1}``
    """
    # Longer than 80 lines: the job's documented parameters and its two data sources (scene pair or folder dataset).
    progress = progress or Progress()
    target = check_output(out, overwrite=overwrite)
    suffix = target.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise OutputError(f"tile labels are written as .gpkg or .csv, not {target.name}")
    check_tile_params(tile_size, overlap)
    if dataset is not None:
        if before is not None or after is not None or labels is not None:
            raise InputError(
                "give either a folder dataset or a scene pair with labels, not both",
                parameters=("dataset", "labels"),
            )
        tiles = dataset_tiles(
            dataset,
            tile_size=tile_size,
            overlap=overlap,
            min_valid_fraction=min_valid_fraction,
            bands=bands,
            progress=progress,
        )
    else:
        if before is None or after is None:
            raise InputError(
                "give the before and after rasters (or a folder dataset)",
                parameters=("dataset",),
            )
        if labels is None:
            raise InputError(
                "give the weak labels (a vector file, or a folder dataset)",
                parameters=("labels", "dataset"),
            )
        progress.stage("open", message=f"{Path(before).name} / {Path(after).name}")
        with ScenePair.open(
            before, after, bands=bands, target_crs=target_crs, resolution=resolution
        ) as scene:
            tiles = labelled_tiles(
                scene,
                labels,
                tile_size=tile_size,
                overlap=overlap,
                field=label_field,
                unmarked_unchanged=unmarked_unchanged,
                min_valid_fraction=min_valid_fraction,
                progress=progress,
            )
            tiles.insert(0, "scene", scene.name)
    progress.stage("write", message=str(target))
    write_label_table(tiles, target, overwrite=overwrite)
    counts = label_counts(tiles["label"])
    return {
        "output": str(target),
        "tiles": len(tiles),
        "changed": counts["changed"],
        "unchanged": counts["unchanged"],
        "unlabelled": counts["unlabelled"],
    }


def write_label_table(tiles: gpd.GeoDataFrame, path: Path, *, overwrite: bool = False) -> Path:
    """Write labelled tiles: GeoPackage layer ``tiles`` or CSV with the tile bounds."""
    frame = tiles.copy()
    frame["label"] = frame["label"].astype(int)
    with atomic_output(path, overwrite=overwrite) as tmp:
        if path.suffix.lower() == ".gpkg":
            write_vector(frame, tmp, path, driver="GPKG", layer="tiles")
        else:
            bounds = frame.geometry.bounds
            table = pd.DataFrame(frame.drop(columns=frame.geometry.name))
            table["left"], table["bottom"] = bounds["minx"], bounds["miny"]
            table["right"], table["top"] = bounds["maxx"], bounds["maxy"]
            table.to_csv(tmp, index=False)
    return path
