"""The shipped demo scene and the demo's command line."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import rasterio

from kdmsi_engine.cli import build_parser
from scripts.demo import SAMPLE_DIR, demo_arguments


def test_sample_is_small_real_georeferenced_and_attributed():
    files = sorted(p.name for p in SAMPLE_DIR.iterdir())
    assert files == [
        "ATTRIBUTION.md", "taizhou_2000.tif", "taizhou_2003.tif", "taizhou_labels.gpkg",
        "taizhou_truth.tif",
    ]  # fmt: skip
    assert sum(p.stat().st_size for p in SAMPLE_DIR.iterdir()) < 3_000_000
    text = (SAMPLE_DIR / "ATTRIBUTION.md").read_text()
    assert "MIT License" in text and "U.S. Geological Survey" in text and "Wu" in text
    grids = set()
    for name in ("taizhou_2000.tif", "taizhou_2003.tif", "taizhou_truth.tif"):
        with rasterio.open(SAMPLE_DIR / name) as ds:
            grids.add((ds.crs.to_epsg(), tuple(ds.transform), ds.width, ds.height))
    assert grids == {(32651, (30.0, 0.0, 203325.0, 0.0, -30.0, 3604935.0, 0, 0, 1), 400, 400)}


def test_weak_labels_come_from_the_reference(shared_data):
    labels = gpd.read_file(SAMPLE_DIR / "taizhou_labels.gpkg")
    assert set(labels["change"]) == {0, 1}
    assert labels.crs.to_epsg() == 32651
    with rasterio.open(shared_data / "landsat-taizhou-nanjing" / "label" / "taizhou.tif") as ds:
        ref = ds.read(1)
    for value in (0, 1):
        area = labels.loc[labels["change"] == value].area.sum()
        assert area == np.count_nonzero(ref == value) * 900.0


def test_demo_runs_the_chain_defaults(tmp_path):
    """The demo is what ``kdmsi run`` does with no options (the tile size aside)."""
    from kdmsi_engine.cli.run import config_from_args
    from kdmsi_engine.jobs.config import RunConfig

    args = build_parser().parse_args(demo_arguments(tmp_path / "out"))
    assert args.command == "run" and args.overwrite
    assert args.device == "cpu" and args.truth.endswith("taizhou_truth.tif")
    assert args.tile_size == 64
    assert config_from_args(args) == RunConfig(tile_size=64)
