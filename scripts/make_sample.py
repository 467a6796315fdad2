"""Make the demo scene in ``resources/sample/`` from the Landsat Taizhou pair.

Run from the repository root (the data folder ``../shared/data`` must exist)::

    .venv/bin/python -m scripts.make_sample [--data DIR] [--out resources/sample]

What it writes (all on the grid of the source rasters, EPSG:32651, 30 m, 400 x 400 pixels):

* ``taizhou_2000.tif`` and ``taizhou_2003.tif``: the Landsat 7 ETM+ scenes, 6 bands
  (TM bands 1, 2, 3, 4, 5, 7), uint8, copied pixel for pixel into tiled, DEFLATE-compressed
  GeoTIFFs;
* ``taizhou_truth.tif``: the sample reference (1 changed sample, 0 unchanged sample, 255 not
  labelled = nodata), used only to report the demo's accuracy on the labelled pixels;
* ``taizhou_labels.gpkg``: the *weak* labels the demo trains with: one polygon per connected
  region of the reference (4-connectivity), field ``change`` (1 changed, 0 unchanged). The
  engine only uses them to label whole tiles (a tile touching a changed polygon is changed),
  never as pixel masks.

The imagery is USGS Landsat (public domain); the reference comes from an MIT-licensed repository
(see ``resources/sample/ATTRIBUTION.md``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import fiona
import numpy as np
import rasterio
import rasterio.features
from shapely.geometry import mapping, shape

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "landsat-taizhou-nanjing"
DEFAULT_OUT = REPO_ROOT / "resources" / "sample"
SITE = "taizhou"
BEFORE_NAME = "taizhou_2000.tif"
AFTER_NAME = "taizhou_2003.tif"
TRUTH_NAME = "taizhou_truth.tif"
LABELS_NAME = "taizhou_labels.gpkg"


def _copy_raster(src_path: Path, dst_path: Path) -> None:
    with rasterio.open(src_path) as src:
        profile = src.profile.copy()
        profile.update(
            tiled=True, blockxsize=256, blockysize=256, compress="deflate", zlevel=9, predictor=2
        )
        data = src.read()
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(data)
            for band in range(1, src.count + 1):
                description = src.descriptions[band - 1]
                if description:
                    dst.set_band_description(band, description)


def _weak_labels(truth_path: Path, out_path: Path) -> int:
    with rasterio.open(truth_path) as src:
        truth = src.read(1)
        transform, crs = src.transform, src.crs
    schema = {"geometry": "Polygon", "properties": {"id": "int", "change": "int"}}
    records = []
    for value in (1, 0):
        mask = truth == value
        for geom, _ in rasterio.features.shapes(
            mask.astype(np.uint8), mask=mask, connectivity=4, transform=transform
        ):
            records.append(
                {
                    "geometry": mapping(shape(geom)),
                    "properties": {"id": len(records) + 1, "change": value},
                }
            )
    if out_path.exists():
        out_path.unlink()
    with fiona.open(
        out_path, "w", driver="GPKG", schema=schema, crs_wkt=crs.to_wkt(), layer="labels"
    ) as sink:
        sink.writerecords(records)
    return len(records)


def make_sample(data_dir: Path = DEFAULT_DATA, out_dir: Path = DEFAULT_OUT) -> dict[str, Path]:
    """Write the demo scene, reference and weak labels into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "before": out_dir / BEFORE_NAME,
        "after": out_dir / AFTER_NAME,
        "truth": out_dir / TRUTH_NAME,
        "labels": out_dir / LABELS_NAME,
    }
    _copy_raster(data_dir / "A" / f"{SITE}.tif", paths["before"])
    _copy_raster(data_dir / "B" / f"{SITE}.tif", paths["after"])
    _copy_raster(data_dir / "label" / f"{SITE}.tif", paths["truth"])
    count = _weak_labels(paths["truth"], paths["labels"])
    logger.info("wrote %d weak-label polygons to %s", count, paths["labels"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="landsat-taizhou-nanjing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    paths = make_sample(args.data, args.out)
    for key, path in paths.items():
        print(f"{key}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
