"""Weak labels: the touching rule, points and polygons, other CRSs, real Landsat samples, errors."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import LineString, Point, box

from kdmsi_engine.data import (
    Grid,
    ScenePair,
    assign_tile_labels,
    check_both_classes,
    labelled_tiles,
    labels_from_raster,
    read_weak_labels,
    tile_windows,
)
from kdmsi_engine.data.labels import label_counts
from kdmsi_engine.data.tiling import tiles_frame, window_polygon
from kdmsi_engine.errors import LabelError

UTM = CRS.from_epsg(32633)


def _tiles(cols: int = 4, rows: int = 3, size: int = 10) -> gpd.GeoDataFrame:
    """A grid of ``rows x cols`` tiles of 10 px (10 m pixels): tile (r, c) covers
    x in [100 c, 100 (c + 1)], y in [-100 (r + 1), -100 r]."""
    grid = Grid(UTM, Affine(10, 0, 0, 0, -10, 0), cols * size, rows * size)
    windows = tile_windows(grid, size)
    records = [(i, w.row_off, w.col_off, w.width, w.height, 1.0) for i, w in enumerate(windows)]
    return tiles_frame(records, [window_polygon(grid, w) for w in windows], UTM)


def _cell(r: int, c: int, margin: float = 10.0):
    return box(100 * c + margin, -100 * (r + 1) + margin, 100 * (c + 1) - margin, -100 * r - margin)


def _features(items: list[tuple[object, int | None]], crs=UTM) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"change": [v for _, v in items]}, geometry=[g for g, _ in items], crs=crs
    )


def _as_grid(labels: np.ndarray, cols: int = 4) -> list[list[int]]:
    return labels.reshape(-1, cols).tolist()


def test_touching_rule_polygons() -> None:
    tiles = _tiles()
    features = _features(
        [
            (_cell(0, 0), 1),  # inside tile (0, 0): changed
            (_cell(0, 0).buffer(5), 0),  # unchanged overlapping the same tile: changed wins
            (_cell(1, 1), 0),  # only unchanged: 0
            # Spans tiles (2, 2) and (2, 3): both changed.
            (box(250, -290, 350, -210), 1),
            # Shares only an edge with tile (0, 3): does not reach into it.
            (box(400, -100, 450, 0), 0),
        ]
    )
    labels = assign_tile_labels(tiles, features)
    assert labels.dtype == np.int8
    assert _as_grid(labels) == [
        [1, -1, -1, -1],
        [-1, 0, -1, -1],
        [-1, -1, 1, 1],
    ]
    unmarked = assign_tile_labels(tiles, features, unmarked_unchanged=True)
    assert _as_grid(unmarked) == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]


def test_touching_rule_points_and_lines() -> None:
    tiles = _tiles()
    features = _features(
        [
            (Point(50, -50), 1),  # tile (0, 0)
            (Point(150, -150), 0),  # tile (1, 1)
            (Point(160, -160), 0),  # tile (1, 1) again, still unchanged
            (Point(200, -250), 1),  # on the edge between tiles (2, 1) and (2, 2): both
            (Point(350, -150), 0),  # tile (1, 3) unchanged...
            (Point(360, -160), 1),  # ...until a changed point lands in it too
            (LineString([(10, -210), (90, -290)]), 0),  # a line inside tile (2, 0)
        ]
    )
    labels = assign_tile_labels(tiles, features)
    assert _as_grid(labels) == [
        [1, -1, -1, -1],
        [-1, 0, -1, 1],
        [0, 1, 1, -1],
    ]
    assert label_counts(labels) == {"changed": 4, "unchanged": 2, "unlabelled": 6}


def test_labels_in_another_crs_are_reprojected(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    with ScenePair.open(folder / "A" / "taizhou.tif", folder / "B" / "taizhou.tif") as scene:
        grid = scene.grid
        # Points in the centres of tile (1, 2) (changed) and tile (3, 0) (unchanged) of a
        # 100 px grid, written in WGS 84 and in Web Mercator.
        centres = [grid.transform * (250, 150), grid.transform * (50, 350)]
        utm = gpd.GeoDataFrame(
            {"change": [1, 0]}, geometry=[Point(c) for c in centres], crs=grid.crs
        )
        for crs in ("EPSG:4326", "EPSG:3857"):
            path = tmp_path / f"labels_{crs.replace(':', '')}.geojson"
            utm.to_crs(crs).to_file(path, driver="GeoJSON")
            features = read_weak_labels(path, crs=grid.crs)
            assert features.crs == grid.crs
            for got, want in zip(features.geometry, utm.geometry):
                assert got.distance(want) < 0.01
            tiles = labelled_tiles(scene, path, tile_size=100)
            got = dict(zip(zip(tiles.row_off, tiles.col_off), tiles.label))
            assert got[(100, 200)] == 1 and got[(300, 0)] == 0
            assert sum(v != -1 for v in got.values()) == 2


def _expected_from_raster(label: np.ndarray, window: Window, *, pad: int) -> int:
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    block = label[max(0, r0 - pad) : r0 + h + pad, max(0, c0 - pad) : c0 + w + pad]
    if (block == 1).any():
        return 1
    if (block == 0).any():
        return 0
    return -1


@pytest.mark.parametrize("site", ["taizhou", "nanjing"])
def test_landsat_sample_labels_polygons(shared_data: Path, site: str) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    label_path = folder / "label" / f"{site}.tif"
    features = labels_from_raster(label_path)
    with rasterio.open(label_path) as src:
        label = src.read(1)
        assert features.crs == src.crs
    assert set(features["change"]) == {0, 1}
    # The polygons cover exactly the labelled pixels.
    changed_area = features[features.change == 1].area.sum()
    assert changed_area == pytest.approx((label == 1).sum() * 900.0)
    assert features[features.change == 0].area.sum() == pytest.approx((label == 0).sum() * 900.0)
    with ScenePair.open(folder / "A" / f"{site}.tif", folder / "B" / f"{site}.tif") as scene:
        tiles = labelled_tiles(scene, features, tile_size=64)
        for _, row in tiles.iterrows():
            window = Window(row.col_off, row.row_off, row.width, row.height)
            # Polygons made of whole pixels reach into a tile iff one of its pixels is labelled.
            assert row.label == _expected_from_raster(label, window, pad=0)
    counts = label_counts(tiles["label"])
    assert counts["changed"] > 0 and counts["unchanged"] > 0
    check_both_classes(tiles["label"])


def test_landsat_sample_labels_points(shared_data: Path) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    label_path = folder / "label" / "taizhou.tif"
    points = labels_from_raster(label_path, geometry="points")
    polygons = labels_from_raster(label_path)
    assert len(points) == len(polygons)
    assert set(points.geom_type) == {"Point"}
    for pt, poly in zip(points.geometry[:50], polygons.geometry[:50]):
        assert poly.contains(pt)
    with ScenePair.open(folder / "A" / "taizhou.tif", folder / "B" / "taizhou.tif") as scene:
        by_points = labelled_tiles(scene, points, tile_size=50)
        by_polygons = labelled_tiles(scene, polygons, tile_size=50)
    # A point labels one tile (or two on an edge); a region labels all tiles it reaches.
    assert (by_points.label != -1).sum() <= (by_polygons.label != -1).sum()
    assert ((by_points.label == 1) <= (by_polygons.label == 1) | (by_polygons.label == 0)).all()


def test_check_both_classes() -> None:
    check_both_classes(np.array([1, 0, -1]))
    with pytest.raises(LabelError, match="unchanged"):
        check_both_classes(np.array([1, 1, -1]))
    with pytest.raises(LabelError, match="changed"):
        check_both_classes(np.array([0, -1]))


def _write(tmp_path: Path, frame: gpd.GeoDataFrame, name: str = "labels.gpkg") -> Path:
    path = tmp_path / name
    frame.to_file(path, driver="GPKG" if name.endswith(".gpkg") else None)
    return path


def test_label_errors(tmp_path: Path) -> None:
    inside = box(100, -200, 200, -100)
    # No features.
    empty = gpd.GeoDataFrame({"change": []}, geometry=[], crs=UTM)
    with pytest.raises(LabelError, match="no features"):
        read_weak_labels(empty, crs=UTM)
    # Missing field: the message lists the fields there are.
    other = gpd.GeoDataFrame({"klass": [1], "note": ["x"]}, geometry=[inside], crs=UTM)
    with pytest.raises(LabelError) as exc:
        read_weak_labels(_write(tmp_path, other), crs=UTM)
    assert "no field 'change'" in str(exc.value) and "klass, note" in str(exc.value)
    assert read_weak_labels(other, crs=UTM, field="klass")["klass"].tolist() == [1]
    # Text values.
    text = gpd.GeoDataFrame({"change": ["yes", "no"]}, geometry=[inside, inside], crs=UTM)
    with pytest.raises(LabelError, match="found 'yes'"):
        read_weak_labels(text, crs=UTM)
    # Fractions.
    frac = gpd.GeoDataFrame({"change": [0.5, 1.0]}, geometry=[inside, inside], crs=UTM)
    with pytest.raises(LabelError, match="found 0.5"):
        read_weak_labels(frac, crs=UTM)
    # Values other than 0 / 1.
    two = gpd.GeoDataFrame({"change": [1, 2, 7]}, geometry=[inside] * 3, crs=UTM)
    with pytest.raises(LabelError, match="found 2, 7"):
        read_weak_labels(_write(tmp_path, two, "two.gpkg"), crs=UTM)
    # Integers stored as floats (NULLs in GeoPackage) and text digits are fine.
    ok = gpd.GeoDataFrame({"change": [1.0, None, 0.0]}, geometry=[inside] * 3, crs=UTM)
    assert read_weak_labels(ok, crs=UTM)["change"].tolist() == [1, 0]
    # All outside the scene.
    far = gpd.GeoDataFrame({"change": [1]}, geometry=[box(1e6, 1e6, 1e6 + 10, 1e6 + 10)], crs=UTM)
    with pytest.raises(LabelError, match="outside the scene"):
        read_weak_labels(far, crs=UTM, bounds=(0, -300, 400, 0))
    # Unreadable and missing files.
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"not a geopackage at all")
    with pytest.raises(LabelError, match="cannot be read"):
        read_weak_labels(junk, crs=UTM)
    with pytest.raises(LabelError, match="does not exist"):
        read_weak_labels(tmp_path / "missing.gpkg", crs=UTM)
    # No CRS on georeferenced scenes.
    nocrs = gpd.GeoDataFrame({"change": [1]}, geometry=[inside])
    with pytest.raises(LabelError, match="no CRS"):
        read_weak_labels(nocrs, crs=UTM)
    for error in (LabelError("x"),):
        assert "\n" not in str(error)


def test_shapefile_and_geojson_sources(tmp_path: Path) -> None:
    frame = _features([(_cell(0, 0), 1), (_cell(1, 1), 0)])
    shp = tmp_path / "labels.shp"
    frame.to_file(shp)
    geojson = tmp_path / "labels.geojson"
    frame.to_crs("EPSG:4326").to_file(geojson, driver="GeoJSON")
    tiles = _tiles()
    for source in (shp, geojson):
        features = read_weak_labels(source, crs=UTM, bounds=(0, -300, 400, 0))
        labels = assign_tile_labels(tiles, features)
        assert labels[0] == 1 and labels[5] == 0 and (labels == -1).sum() == 10


def test_pixel_coordinate_labels_for_plain_images(tmp_path: Path, shared_data: Path) -> None:
    from kdmsi_engine.data import find_pairs, open_folder_pair, write_tile_grid

    pair = find_pairs(shared_data / "levir-cd-samples")[0]
    with open_folder_pair(pair) as scene:
        tiles = labelled_tiles(
            scene,
            _features([(box(10, 10, 20, 20), 1), (Point(200, 200), 0)], crs=None),
            tile_size=128,
        )
        assert tiles.label.tolist() == [1, -1, -1, 0]  # x = column, y = row
        # A grid GeoPackage without CRS reads back as pixel coordinates ("Undefined SRS").
        path = write_tile_grid(tiles, tmp_path / "pixel_grid.gpkg")
        with pytest.raises(LabelError, match="no feature has a value"):
            read_weak_labels(path, crs=None)
        georef = _features([(box(10, 10, 20, 20), 1)])
        with pytest.raises(LabelError, match="scene is not"):
            read_weak_labels(georef, crs=None)
