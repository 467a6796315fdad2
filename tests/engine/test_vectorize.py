"""Change polygons: areas, attributes, block edges, options, CRS, memory, CLI."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import fiona
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from rasterio.transform import from_origin
from rasterio.windows import Window
from shapely.geometry import shape

from kdmsi_engine.cli import main
from kdmsi_engine.errors import InputError, OutputError, RasterError
from kdmsi_engine.vectorize import vectorize_changes

PIXEL_AREA = 900.0  # Landsat 30 m


@pytest.fixture(scope="module")
def taizhou_change(shared_data: Path) -> Path:
    """The real Taizhou sample reference used as a change raster (1 change, 0, 255 nodata)."""
    return shared_data / "landsat-taizhou-nanjing" / "label" / "taizhou.tif"


@pytest.fixture(scope="module")
def probability(tmp_path_factory, taizhou_change: Path) -> Path:
    """A probability raster on the Taizhou grid with known values (row-dependent ramp)."""
    path = tmp_path_factory.mktemp("prob") / "prob.tif"
    with rasterio.open(taizhou_change) as src:
        profile = src.profile.copy()
        h, w = src.height, src.width
    profile.update(dtype="float32", nodata=-1.0, count=1)
    rows, cols = np.mgrid[0:h, 0:w]
    values = ((rows * 7 + cols * 3) % 100 / 100.0).astype(np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)
    return path


def _read(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(path, layer="changes")


def test_polygons_match_pixels_and_cross_block_edges_whole(tmp_path, taizhou_change):
    whole = vectorize_changes(taizhou_change, tmp_path / "whole.gpkg", block_size=4096)
    small = vectorize_changes(taizhou_change, tmp_path / "small.gpkg", block_size=37)
    a, b = _read(tmp_path / "whole.gpkg"), _read(tmp_path / "small.gpkg")
    with rasterio.open(taizhou_change) as src:
        change_pixels = int((src.read(1) == 1).sum())
    assert whole["polygons"] == small["polygons"] == len(a) == len(b)
    assert len(a) > 50
    for frame in (a, b):
        assert frame.is_valid.all()
        assert int(frame["pixels"].sum()) == change_pixels
        np.testing.assert_allclose(frame.area, frame["pixels"] * PIXEL_AREA)
        np.testing.assert_allclose(frame["area_m2"], frame["pixels"] * PIXEL_AREA)
        assert frame.crs.to_epsg() == 32651
    # Some region crosses several 37 px blocks, and it comes out as one polygon.
    with rasterio.open(taizhou_change) as src:
        t = src.transform
    spans = (b.bounds.maxx - b.bounds.minx) / t.a
    assert spans.max() > 2 * 37
    # Same geometries, whichever block size.
    for frame in (a, b):
        frame["cx"] = frame.geometry.centroid.x.round(3)
        frame["cy"] = frame.geometry.centroid.y.round(3)
    a = a.sort_values(["pixels", "cx", "cy"]).reset_index(drop=True)
    b = b.sort_values(["pixels", "cx", "cy"]).reset_index(drop=True)
    assert list(a["pixels"]) == list(b["pixels"])
    assert sum(ga.symmetric_difference(gb).area for ga, gb in zip(a.geometry, b.geometry)) == 0


def test_probability_attributes(tmp_path, taizhou_change, probability):
    vectorize_changes(
        taizhou_change, tmp_path / "c.gpkg", probability_path=probability, block_size=50
    )
    frame = _read(tmp_path / "c.gpkg")
    with rasterio.open(taizhou_change) as src, rasterio.open(probability) as psrc:
        change = src.read(1) == 1
        prob = psrc.read(1)
        transform = src.transform
    for _, row in frame.sample(15, random_state=0).iterrows():
        inside = rasterio.features.geometry_mask(
            [row.geometry], change.shape, transform, invert=True
        )
        values = prob[inside & change]
        assert values.size == row["pixels"]
        assert row["mean_prob"] == pytest.approx(values.mean(), abs=1e-4)
        assert row["max_prob"] == pytest.approx(values.max(), abs=1e-4)
    assert (frame["scene"] == "label").all()


def test_options_min_area_fill_holes_simplify_and_reprojection(tmp_path, taizhou_change):
    plain = vectorize_changes(taizhou_change, tmp_path / "plain.gpkg")
    vectorize_changes(taizhou_change, tmp_path / "min.gpkg", min_area=20 * PIXEL_AREA)
    frame = _read(tmp_path / "min.gpkg")
    assert 0 < len(frame) < plain["polygons"]
    assert (frame["area_m2"] >= 20 * PIXEL_AREA).all()

    vectorize_changes(taizhou_change, tmp_path / "simple.gpkg", simplify=30.0)
    simple = _read(tmp_path / "simple.gpkg")
    original = _read(tmp_path / "plain.gpkg")
    vertices = lambda f: sum(len(p.exterior.coords) for g in f.geometry for p in g.geoms)  # noqa: E731
    assert simple.is_valid.all()
    assert vertices(simple) < vertices(original)

    vectorize_changes(
        taizhou_change, tmp_path / "ll.gpkg", dst_crs="EPSG:4326", scene="taizhou", block_size=64
    )
    ll = _read(tmp_path / "ll.gpkg")
    assert ll.crs.to_epsg() == 4326
    minx, miny, maxx, maxy = ll.total_bounds
    assert 119 < minx < maxx < 121 and 32 < miny < maxy < 33.5
    # Areas stay in square metres of the scene CRS.
    assert ll["area_m2"].sum() == pytest.approx(original["area_m2"].sum())
    assert set(ll["scene"]) == {"taizhou"}


def test_fill_holes(tmp_path):
    """A ring with a 2x2 hole (synthetic: exact hole sizes are not in real data)."""
    data = np.zeros((40, 40), dtype=np.uint8)
    data[5:15, 5:15] = 1
    data[8:10, 8:10] = 0  # hole of 4 pixels = 400 m2
    data[20:35, 20:35] = 1
    data[23:31, 23:31] = 0  # hole of 64 pixels = 6400 m2
    path = tmp_path / "ring.tif"
    profile = dict(
        driver="GTiff", width=40, height=40, count=1, dtype="uint8", nodata=255,
        crs="EPSG:32651", transform=from_origin(0, 4000, 10, 10),
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    vectorize_changes(path, tmp_path / "f.gpkg", fill_holes=1000, block_size=16)
    frame = _read(tmp_path / "f.gpkg").sort_values("pixels")
    holes = [len(g.geoms[0].interiors) for g in frame.geometry]
    assert holes == [0, 1]  # small hole filled, big one kept
    assert list(frame["area_m2"]) == [10000.0, (225 - 64) * 100.0]


def test_memory_does_not_grow_with_the_scene(tmp_path):
    """A 4096 x 4096 raster (synthetic: a scene this size is not in the data) in 512 blocks."""
    size = 4096
    path = tmp_path / "big.tif"
    profile = dict(
        driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=255,
        crs="EPSG:32651", transform=from_origin(0, 100000, 10, 10),
        tiled=True, blockxsize=512, blockysize=512, compress="deflate",
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 512):
            rows = np.arange(row, row + 512)[:, None]
            cols = np.arange(size)[None, :]
            band = (np.abs(rows - cols) < 6).astype(np.uint8)  # one diagonal band
            band |= ((rows // 300 + cols // 300) % 7 == 0) & (rows % 300 < 40)
            dst.write(band.astype(np.uint8), 1, window=Window(0, row, size, 512))
    tracemalloc.start()
    result = vectorize_changes(path, tmp_path / "big.gpkg", block_size=512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole_scene = size * size * 4  # one int32 label image of the scene
    assert peak < whole_scene / 4, f"peak {peak / 1e6:.1f} MB"
    frame = _read(tmp_path / "big.gpkg")
    assert len(frame) == result["polygons"]
    diagonal = frame.loc[frame["area_m2"].idxmax()]
    minx, _, maxx, _ = diagonal.geometry.bounds
    assert maxx - minx == pytest.approx(size * 10, rel=0.01)  # the band crosses 8 blocks, whole


def test_refusals(tmp_path, taizhou_change, probability, shared_data):
    out = tmp_path / "c.gpkg"
    vectorize_changes(taizhou_change, out)
    before = out.stat().st_mtime_ns
    with pytest.raises(OutputError):
        vectorize_changes(taizhou_change, out)
    assert out.stat().st_mtime_ns == before
    with pytest.raises(InputError):
        vectorize_changes(taizhou_change, tmp_path / "x.gpkg", min_area=-1)
    with pytest.raises(InputError):
        vectorize_changes(taizhou_change, tmp_path / "x.shp")
    other_grid = shared_data / "landsat-taizhou-nanjing" / "label" / "nanjing.tif"
    with pytest.raises(RasterError):
        vectorize_changes(taizhou_change, tmp_path / "y.gpkg", probability_path=other_grid)
    assert not (tmp_path / "y.gpkg").exists()
    with pytest.raises(RasterError):
        vectorize_changes(tmp_path / "missing.tif", tmp_path / "z.gpkg")


def test_cli(tmp_path, taizhou_change, probability, capsys):
    out = tmp_path / "cli.gpkg"
    status = main(
        [
            "vectorize", str(taizhou_change), "-o", str(out), "--probability", str(probability),
            "--min-area", "1800", "--progress", "none",
        ]
    )  # fmt: skip
    assert status == 0
    assert "polygons:" in capsys.readouterr().out
    with fiona.open(out, layer="changes") as layer:
        features = list(layer)
        assert layer.schema["geometry"] == "MultiPolygon"
    assert features and all(f["properties"]["area_m2"] >= 1800 for f in features)
    assert all(shape(f["geometry"]).is_valid for f in features)
    assert main(["vectorize", str(taizhou_change), "-o", str(out), "--progress", "none"]) == 2
