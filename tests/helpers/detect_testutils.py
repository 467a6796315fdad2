"""Helpers of the detector/pipeline tests: small real scenes cut from the shipped sample."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import rasterio
from rasterio.windows import Window
from shapely.geometry import box

from kdmsi_engine.jobs.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "resources" / "sample"
NAMES = ("taizhou_2000.tif", "taizhou_2003.tif", "taizhou_truth.tif")


def crop_sample(dst: Path, window: Window, *, labels: bool = True) -> dict[str, Path]:
    """Cut ``window`` out of the real Taizhou sample (rasters, truth and clipped weak labels)."""
    dst.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, name in zip(("before", "after", "truth"), NAMES):
        with rasterio.open(SAMPLE / name) as src:
            profile = src.profile.copy()
            profile.update(
                width=int(window.width),
                height=int(window.height),
                transform=src.window_transform(window),
                blockxsize=32,
                blockysize=32,
                tiled=True,
            )
            data = src.read(window=window)
            bounds = rasterio.windows.bounds(window, src.transform)
        paths[key] = dst / name
        with rasterio.open(paths[key], "w", **profile) as out:
            out.write(data)
    if labels:
        frame = gpd.read_file(SAMPLE / "taizhou_labels.gpkg")
        clipped = frame[frame.intersects(box(*bounds))].copy()
        clipped["geometry"] = clipped.geometry.intersection(box(*bounds))
        clipped = clipped.explode(index_parts=False)
        clipped = clipped[clipped.geometry.geom_type == "Polygon"]
        clipped = clipped[clipped.geometry.area > 0]
        paths["labels"] = dst / "taizhou_labels.gpkg"
        clipped.to_file(paths["labels"], driver="GPKG")
    return paths


def tiny_config() -> RunConfig:
    """The smallest chain that runs every stage: resnet18 from scratch, 32 px, one epoch."""
    return RunConfig(
        kd_backbone="resnet18",
        kd_weights="none",
        kd_epochs=1,
        kd_batch_size=4,
        tile_size=32,
        msi_scales=(1.0,),
        detector_backbone="resnet18",
        detector_weights="none",
        detector_epochs=1,
        detector_batch_size=4,
        detector_tile_size=32,
        detect_tile_size=64,
        batch_size=4,
    )


#: The same as command-line options (appended to a command, they override earlier ones).
TINY_ARGS = [
    "--backbone", "resnet18", "--weights", "none", "--kd-epochs", "1", "--kd-batch-size", "4",
    "--tile-size", "32", "--msi-scales", "1", "--detector-epochs", "1",
    "--detector-batch-size", "4", "--detector-tile-size", "32", "--detect-tile-size", "64",
]  # fmt: skip
