"""Tile windows, tile grids over real scenes, the labelling grid file, and flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from kdmsi_data_testutils import ramp, write_raster
from rasterio.crs import CRS
from rasterio.windows import Window

from kdmsi_engine.data import (
    Grid,
    ScenePair,
    labelled_tiles,
    make_tile_grid,
    tile_windows,
    write_tile_grid,
)
from kdmsi_engine.data.tiling import window_polygon
from kdmsi_engine.errors import LabelError, OutputError
from kdmsi_engine.progress import Progress

REPO = Path(__file__).resolve().parents[3]


def _grid(width: int, height: int) -> Grid:
    return Grid(CRS.from_epsg(32633), Affine(10, 0, 0, 0, -10, 0), width, height)


def test_tile_windows_cover_the_grid_with_full_tiles() -> None:
    grid = _grid(300, 200)
    windows = tile_windows(grid, 128)
    assert [(w.col_off, w.row_off) for w in windows] == [
        (0, 0),
        (128, 0),
        (172, 0),
        (0, 72),
        (128, 72),
        (172, 72),
    ]
    assert all((w.width, w.height) == (128, 128) for w in windows)
    covered = np.zeros((200, 300), int)
    for w in windows:
        covered[w.row_off : w.row_off + 128, w.col_off : w.col_off + 128] += 1
    assert covered.min() >= 1


def test_tile_windows_overlap_and_exact_fit() -> None:
    grid = _grid(256, 256)
    assert [(w.col_off, w.row_off) for w in tile_windows(grid, 128)] == [
        (0, 0),
        (128, 0),
        (0, 128),
        (128, 128),
    ]
    cols = [w.col_off for w in tile_windows(grid, 128, overlap=64) if w.row_off == 0]
    assert cols == [0, 64, 128]
    small = tile_windows(_grid(50, 40), 128)
    assert len(small) == 1 and (small[0].width, small[0].height) == (50, 40)


def test_tile_grid_on_oscd_matches_valid_masks(shared_data: Path) -> None:
    city = "bercy"
    before = shared_data / "oscd" / "A" / f"{city}.tif"
    after = shared_data / "oscd" / "B" / f"{city}.tif"
    events = []
    with ScenePair.open(before, after) as scene:
        tiles = make_tile_grid(
            scene, 128, overlap=32, min_valid_fraction=0.9, progress=Progress(events.append)
        )
        windows = tile_windows(scene.grid, 128, 32)
        assert list(tiles.columns) == [
            "tile_id",
            "row_off",
            "col_off",
            "width",
            "height",
            "valid_fraction",
            "geometry",
        ]
        assert tiles.crs == scene.grid.crs
        kept = set(tiles["tile_id"])
        for tile_id, window in enumerate(windows):
            fraction = scene.read_valid(window).mean()
            assert (tile_id in kept) == (fraction >= 0.9)
        for _, row in tiles.iterrows():
            window = Window(row.col_off, row.row_off, row.width, row.height)
            assert row.valid_fraction == pytest.approx(scene.read_valid(window).mean())
            assert row.geometry.equals(window_polygon(scene.grid, window))
            left, bottom, right, top = scene.grid.window_bounds(window)
            assert row.geometry.bounds == pytest.approx((left, bottom, right, top))
            assert row.geometry.area == pytest.approx(128 * 128 * scene.grid.res[0] ** 2)
        # Edge tiles of the warped UTM grid have invalid corners (the rotated footprint).
        assert tiles.valid_fraction.min() < 0.99
        assert tiles.valid_fraction.max() == 1.0
    stages = [e.stage for e in events if e.kind == "stage"]
    assert stages == ["tiles"]
    done = [e.done for e in events if e.kind == "progress"]
    assert done[-1] == len(windows)


def test_nodata_tiles_are_skipped(tmp_path: Path) -> None:
    data = ramp(3, 128, 192)
    data[:, :, 128:] = 0  # right third nodata
    data[:, 64:, 64:128] = 0  # and a quarter block
    path = write_raster(tmp_path / "s.tif", data, nodata=0)
    with ScenePair.open(path, path) as scene:
        tiles = make_tile_grid(scene, 64, min_valid_fraction=0.5)
        assert sorted(zip(tiles.row_off, tiles.col_off)) == [(0, 0), (0, 64), (64, 0)]
        assert np.allclose(tiles.valid_fraction, 1.0)
        tiles = make_tile_grid(scene, 64, overlap=32, min_valid_fraction=0.5)
        frac = dict(zip(zip(tiles.row_off, tiles.col_off), tiles.valid_fraction))
        assert frac[(32, 32)] == pytest.approx(0.75)
        assert (0, 96) in frac and frac[(0, 96)] == pytest.approx(0.5)


def test_labelling_grid_round_trip(tmp_path: Path, shared_data: Path) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    out = tmp_path / "grid.gpkg"
    with ScenePair.open(folder / "A" / "taizhou.tif", folder / "B" / "taizhou.tif") as scene:
        tiles = make_tile_grid(scene, 100)
        assert len(tiles) == 16
        write_tile_grid(tiles, out)
        with pytest.raises(OutputError, match="exists"):
            write_tile_grid(tiles, out)
        with pytest.raises(OutputError, match="GeoPackage"):
            write_tile_grid(tiles, tmp_path / "grid.shp")
        back = gpd.read_file(out, layer="tiles")
        assert back.crs == scene.grid.crs
        assert list(back["tile_id"]) == list(tiles["tile_id"])
        assert back["change"].isna().all()
        for a, b in zip(back.geometry, tiles.geometry):
            assert a.equals_exact(b, 1e-6)
        # An untouched grid has no labels yet.
        with pytest.raises(LabelError, match="no feature has a value"):
            labelled_tiles(scene, out, tile_size=100)
        # The analyst marks two tiles changed, three unchanged, the rest stay empty (NULL).
        back["change"] = back["change"].astype(object)
        marks = {0: 1, 5: 1, 1: 0, 2: 0, 15: 0}
        for tile_id, value in marks.items():
            back.loc[back.tile_id == tile_id, "change"] = value
        filled = tmp_path / "filled.gpkg"
        schema = {
            "geometry": "Polygon",
            "properties": {
                **{c: "int" for c in ("tile_id", "row_off", "col_off", "width", "height")},
                "valid_fraction": "float",
                "change": "int",
            },
        }
        back.to_file(filled, driver="GPKG", layer="tiles", schema=schema)
        labelled = labelled_tiles(scene, filled, tile_size=100)
    got = dict(zip(labelled.tile_id, labelled.label))
    for tile_id, label in got.items():
        assert label == marks.get(tile_id, -1), tile_id
    # Grid cells share edges with their neighbours; a shared edge alone does not label a tile.
    assert got[6] == -1 and got[4] == -1


VRT_TEMPLATE = """<VRTDataset rasterXSize="{size}" rasterYSize="{size}">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>500000, 1, 0, 5000000, 0, -1</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1">
    <NoDataValue>0</NoDataValue>
    <SimpleSource>
      <SourceFilename relativeToVRT="1">{source}</SourceFilename>
      <SourceBand>1</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="{src}" ySize="{src}"/>
      <DstRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
"""

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, resource, sys, tracemalloc
    def peak_rss_kib():
        # VmHWM restarts at exec; ru_maxrss would carry the parent's (pytest + torch) peak.
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from rasterio.windows import Window
    from kdmsi_engine.data import ScenePair, make_tile_grid
    out = {}
    for name in sys.argv[1:]:
        with ScenePair.open(name, name, scaling={"method": "uint8", "low": [0], "high": [255]}) as scene:
            tracemalloc.start()
            tiles = make_tile_grid(scene, 1000, min_valid_fraction=0.5)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            tracemalloc.start()
            tile = scene.read(Window(scene.grid.width // 2, scene.grid.height // 2, 256, 256))
            read_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out[name] = {
                "read_peak": read_peak,
                "tile_mean": float(tile.before[:, tile.valid].mean()),
                "tiles": len(tiles),
                "fractions": sorted(set(round(f, 3) for f in tiles.valid_fraction)),
                "peak": peak,
                "rss_kib": peak_rss_kib(),
            }
    print(json.dumps(out))
    """
)


def test_tiling_memory_is_flat_on_a_huge_virtual_raster(tmp_path: Path) -> None:
    # A 40 x 40 source: left quarter nodata (0); stretched by a VRT to 2000 and 20000 pixels.
    source = np.full((40, 40), 120, dtype=np.uint8)
    source[:, :10] = 0
    write_raster(tmp_path / "src.tif", source, nodata=0)
    paths = []
    for size in (2000, 20000):
        vrt = tmp_path / f"big{size}.vrt"
        vrt.write_text(VRT_TEMPLATE.format(size=size, source="src.tif", src=40))
        paths.append(str(vrt))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, *paths],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    small, big = stats[paths[0]], stats[paths[1]]
    # 20 x 20 tiles of 1000 px; the left quarter (5 columns of tiles) is nodata.
    assert big["tiles"] == 20 * 15
    assert big["fractions"] == [1.0]
    # 2 x 2 tiles of 1000 px; the left tiles are half nodata (kept at 0.5).
    assert small["tiles"] == 4 and small["fractions"] == [0.5, 1.0]
    # A whole-scene mask would be 400 MB; tiling keeps to a few tile-sized buffers.
    assert big["peak"] < 16 * 2**20
    assert big["peak"] < small["peak"] + 4 * 2**20
    # Reading one 256 px tile of both dates costs a few tile-sized arrays, whatever the scene.
    assert big["read_peak"] < 8 * 2**20
    assert big["tile_mean"] == pytest.approx(120 / 255, abs=1e-6)
    assert big["rss_kib"] < 400 * 2**10  # under 400 MiB for the whole process


def test_coarse_valid_fractions_estimate_the_exact_ones(shared_data: Path) -> None:
    city = "abudhabi"
    before = shared_data / "oscd" / "A" / f"{city}.tif"
    after = shared_data / "oscd" / "B" / f"{city}.tif"
    with ScenePair.open(before, after) as scene:
        exact = make_tile_grid(scene, 256, min_valid_fraction=0.0, mask_side=None)
        coarse = make_tile_grid(scene, 256, min_valid_fraction=0.0, mask_side=64)
    assert list(exact.tile_id) == list(coarse.tile_id)
    assert exact.valid_fraction.min() < 0.95  # the warped footprint leaves invalid corners
    np.testing.assert_allclose(coarse.valid_fraction, exact.valid_fraction, atol=0.03)
