"""Scene pairs on one grid: real OSCD and Landsat rasters, synthetic masks and edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from kdmsi_data_testutils import UTM33, ramp, write_raster
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from kdmsi_engine.data import BandScaling, Grid, ScenePair
from kdmsi_engine.data.grid import utm_crs_for

OSCD_CITIES = (
    "abudhabi",
    "aguasclaras",
    "beihai",
    "bercy",
    "bordeaux",
    "hongkong",
    "mumbai",
    "paris",
    "rennes",
    "saclay_e",
)
#: The OSCD cities whose after raster is on another grid than the before raster.
DIFFERING = ("abudhabi", "hongkong", "saclay_e")


def _oscd(shared_data: Path, city: str) -> tuple[Path, Path]:
    return shared_data / "oscd" / "A" / f"{city}.tif", shared_data / "oscd" / "B" / f"{city}.tif"


def _reference(path: Path, grid: Grid, window: Window, bands=(1, 2, 3, 4)) -> np.ndarray:
    """Independent bilinear resampling of a raster onto a window of ``grid``."""
    out = np.zeros((len(bands), int(window.height), int(window.width)), dtype=np.float32)
    with rasterio.open(path) as src:
        reproject(
            rasterio.band(src, list(bands)),
            out,
            dst_transform=grid.window_transform(window),
            dst_crs=grid.crs,
            resampling=Resampling.bilinear,
        )
    return out


def test_differing_oscd_grids_are_the_three_known_cities(shared_data: Path) -> None:
    differing = []
    for city in OSCD_CITIES:
        before, after = _oscd(shared_data, city)
        with rasterio.open(before) as a, rasterio.open(after) as b:
            assert a.crs == b.crs == CRS.from_epsg(4326)
            if a.transform != b.transform or a.shape != b.shape:
                differing.append(city)
    assert tuple(differing) == DIFFERING


def test_oscd_geographic_goes_to_utm(shared_data: Path) -> None:
    before, after = _oscd(shared_data, "bercy")
    with ScenePair.open(before, after) as scene:
        grid = scene.grid
        assert grid.crs == CRS.from_epsg(32631)  # Paris: UTM 31N
        # Sentinel-2 10 m pixels, square, in metres.
        assert grid.res[0] == pytest.approx(grid.res[1])
        assert 8.0 < grid.res[0] < 12.5
        # The grid covers the raster's footprint (in UTM) and not much more.
        with rasterio.open(before) as src:
            fb = transform_bounds(src.crs, grid.crs, *src.bounds)
        gb = grid.bounds
        assert gb.left == pytest.approx(fb[0], abs=2 * grid.res[0])
        assert gb.top == pytest.approx(fb[3], abs=2 * grid.res[1])
        assert scene.warped == (True, True)
        assert scene.bands == (1, 2, 3, 4)  # every band by default
        assert scene.scaling.method == "percentile-2-98"
        window = Window(60, 80, 128, 128)
        b, a, valid = scene.read_raw(window)
        assert valid.all()
        for path, got in ((before, b), (after, a)):
            ref = _reference(path, grid, window)
            diff = np.abs(ref - got.astype(np.float32))
            # GDAL chunks the warp differently: tiny differences, no shift.
            assert np.median(diff) < 0.01 * ref.mean()
            assert np.percentile(diff, 99) < 0.05 * ref.mean()


def test_utm_zone_choice() -> None:
    assert utm_crs_for(2.35, 48.85) == CRS.from_epsg(32631)
    assert utm_crs_for(-48.0, -15.8) == CRS.from_epsg(32723)
    assert utm_crs_for(179.9, 10.0) == CRS.from_epsg(32660)
    assert utm_crs_for(-180.0, 10.0) == CRS.from_epsg(32601)


@pytest.mark.parametrize("city", DIFFERING)
def test_differing_after_grid_is_warped_onto_before_grid(shared_data: Path, city: str) -> None:
    before, after = _oscd(shared_data, city)
    # Keep the before raster's own grid (EPSG:4326) so only the after raster is warped.
    with (
        ScenePair.open(before, after, target_crs="EPSG:4326") as scene,
        rasterio.open(before) as src_b,
        rasterio.open(after) as src_a,
    ):
        assert scene.warped == (False, True)
        grid = scene.grid
        assert grid.transform == src_b.transform
        assert (grid.width, grid.height) == (src_b.width, src_b.height)
        assert (src_a.width, src_a.height) != (src_b.width, src_b.height)
        for window in (Window(0, 0, 96, 96), Window(grid.width - 200, grid.height - 150, 128, 128)):
            b, a, valid = scene.read_raw(window)
            # Before: read as is.
            assert np.array_equal(b, src_b.read(window=window))
            # After: matches an independent bilinear resampling (uint16 rounding only).
            ref = _reference(after, grid, window)
            assert np.abs(ref - a.astype(np.float32)).max() <= 1.0
            # ...and not the after raster's own pixels at the same indexes (grids differ).
            unwarped = src_a.read(window=window, boundless=True).astype(np.float32)
            if window.col_off > 0:
                assert np.abs(unwarped - ref).mean() > 10 * np.abs(ref - a).mean() + 5
            assert valid.mean() > 0.95
    # Default: both warped to UTM, the after tile still matches the reference.
    with ScenePair.open(before, after) as scene:
        window = Window(200, 200, 128, 128)
        _, a, _ = scene.read_raw(window)
        ref = _reference(after, scene.grid, window)
        diff = np.abs(ref - a.astype(np.float32))
        assert np.median(diff) < 0.01 * ref.mean()


def test_same_grid_city_reads_directly(shared_data: Path) -> None:
    before, after = _oscd(shared_data, "paris")
    with ScenePair.open(before, after, target_crs="EPSG:4326", bands=[4, 3, 2]) as scene:
        assert scene.warped == (False, False)
        with rasterio.open(after) as src:
            window = Window(10, 20, 64, 64)
            _, a, _ = scene.read_raw(window)
            assert np.array_equal(a, src.read([4, 3, 2], window=window))


def test_landsat_utm_scene_keeps_its_grid(shared_data: Path) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    with ScenePair.open(folder / "A" / "taizhou.tif", folder / "B" / "taizhou.tif") as scene:
        with rasterio.open(folder / "A" / "taizhou.tif") as src:
            assert scene.grid == Grid(src.crs, src.transform, src.width, src.height)
            assert scene.grid.crs == CRS.from_epsg(32651)
            assert scene.warped == (False, False)
            assert scene.bands == (1, 2, 3, 4, 5, 6)  # every band by default
            assert scene.scaling == BandScaling.uint8(6)
            window = Window(100, 150, 64, 64)
            tile = scene.read(window)
            raw = src.read(window=window).astype(np.float32) / 255.0
            assert tile.before.dtype == np.float32
            np.testing.assert_allclose(tile.before, raw, atol=1e-6)
            assert tile.valid.all()


def test_landsat_band_selection_and_percentiles(shared_data: Path) -> None:
    folder = shared_data / "landsat-taizhou-nanjing"
    before, after = folder / "A" / "nanjing.tif", folder / "B" / "nanjing.tif"
    with ScenePair.open(before, after, bands="4,5,6", scaling_method="percentile-2-98") as scene:
        assert scene.bands == (4, 5, 6)
        assert scene.num_bands == 3
        b, a, valid = scene.read_raw(scene.grid.full_window())
        for i in range(3):
            values = np.concatenate([b[i][valid], a[i][valid]]).astype(float)
            below = np.mean(values < scene.scaling.low[i])
            above = np.mean(values > scene.scaling.high[i])
            # A 2-98 % estimate from a sample: about 2 % each side.
            assert 0.002 < below < 0.06
            assert 0.002 < above < 0.06
        tile = scene.read(Window(0, 0, 100, 100))
        assert 0.0 <= tile.before.min() and tile.before.max() <= 1.0
        assert tile.before.max() == 1.0 and tile.before.min() == 0.0


def test_scaling_round_trip_and_apply() -> None:
    scaling = BandScaling([10.0, 0.0], [20.0, 0.0], "percentile-2-98")
    again = BandScaling.from_dict(scaling.to_dict())
    assert again == scaling
    data = np.array([[[5, 10, 15, 25]], [[3, 3, 3, 3]]], dtype=np.uint16)
    out = scaling.apply(data)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(out[1, 0], [1.0, 1.0, 1.0, 1.0])  # constant band: clipped


def test_given_scaling_is_used(shared_data: Path) -> None:
    before, after = _oscd(shared_data, "rennes")
    given = BandScaling([1000.0] * 4, [2000.0] * 4)
    with ScenePair.open(before, after, scaling=given.to_dict()) as scene:
        assert scene.scaling == given
        b, _, valid = scene.read_raw(Window(0, 0, 32, 32))
        tile = scene.read(Window(0, 0, 32, 32))
        expected = np.clip((b.astype(np.float32) - 1000.0) / 1000.0, 0, 1) * valid
        np.testing.assert_allclose(tile.before, expected, atol=1e-6)


def test_nodata_edges_and_boundless_reads(tmp_path: Path) -> None:
    data = ramp(3, 80, 100)
    before_data = data.copy()
    before_data[:, :, :12] = 0  # nodata strip on the left of the before date
    after_data = data.copy() + 7
    after_data[:, 70:, :] = 0  # nodata strip at the bottom of the after date
    before = write_raster(tmp_path / "b.tif", before_data, nodata=0)
    after = write_raster(tmp_path / "a.tif", after_data, nodata=0)
    with ScenePair.open(before, after) as scene:
        assert (scene.grid.width, scene.grid.height) == (100, 80)
        tile = scene.read(scene.grid.full_window())
        expected = np.ones((80, 100), bool)
        expected[:, :12] = False
        expected[70:, :] = False
        assert np.array_equal(tile.valid, expected)
        assert np.all(tile.before[:, ~expected] == 0) and np.all(tile.after[:, ~expected] == 0)
        _, raw_after, _ = scene.read_raw(scene.grid.full_window())
        assert np.array_equal(raw_after[:, expected], after_data[:, expected])
        assert tile.after[:, expected].max() == 1.0
        # Boundless: a window half outside the grid.
        outside = scene.read(Window(80, -10, 40, 40))
        assert outside.valid.shape == (40, 40)
        assert not outside.valid[:10].any() and not outside.valid[:, 20:].any()
        assert outside.valid[10:, :20].all()
        _, a, _ = scene.read_raw(Window(80, -10, 40, 40))
        assert np.array_equal(a[:, 10:, :20], after_data[:, :30, 80:])


def test_alpha_band_and_dataset_mask(tmp_path: Path) -> None:
    data = ramp(3, 64, 64)
    alpha = np.full((64, 64), 65535)
    alpha[50:] = 0
    mask = np.ones((64, 64), bool)
    mask[:, :10] = False
    before = write_raster(tmp_path / "m.tif", data, mask=mask)
    after = write_raster(tmp_path / "alpha.tif", data, alpha=alpha)
    with ScenePair.open(before, after) as scene:
        assert scene.bands == (1, 2, 3)  # the alpha band is not a default band
        valid = scene.read_valid(scene.grid.full_window())
        assert np.array_equal(valid, mask & (alpha > 0))
    # The same through a WarpedVRT (another CRS): the masks follow.
    with ScenePair.open(before, after, target_crs="EPSG:4326") as scene:
        assert scene.warped == (True, True)
        valid = scene.read_valid(scene.grid.full_window())
        assert 0.55 < valid.mean() < 0.75  # about 54 x 50 of 64 x 64 pixels
        assert not valid[:, :5].any()  # the masked left columns stay invalid


def test_intersection_crop_and_target_resolution(tmp_path: Path) -> None:
    data = ramp(3, 60, 90)
    t = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    before = write_raster(tmp_path / "b.tif", data, transform=t)
    # The after raster starts 30 px right and 20 px down and is the same image region.
    after_t = t * Affine.translation(30, 20)
    after = write_raster(tmp_path / "a.tif", data[:, 20:, 30:], transform=after_t)
    with ScenePair.open(before, after) as scene:
        assert scene.warped == (False, False)
        assert (scene.grid.width, scene.grid.height) == (60, 40)
        assert scene.grid.transform == after_t
        b, a, valid = scene.read_raw(scene.grid.full_window())
        assert valid.all()
        assert np.array_equal(b, a)
    with ScenePair.open(before, after, resolution=20) as scene:
        assert scene.grid.res == (20.0, 20.0)
        assert (scene.grid.width, scene.grid.height) == (30, 20)
        assert scene.warped == (True, True)
    with ScenePair.open(before, after, target_crs="EPSG:32632") as scene:
        assert scene.grid.crs == CRS.from_epsg(32632)


def test_plain_images_need_require_crs_false(tmp_path: Path, shared_data: Path) -> None:
    folder = shared_data / "levir-cd-samples"
    before, after = folder / "A" / "test_2_0000_0000.png", folder / "B" / "test_2_0000_0000.png"
    with ScenePair.open(before, after, require_crs=False) as scene:
        assert scene.grid.crs is None
        assert scene.grid.transform == Affine.identity()
        assert scene.scaling.method == "uint8"
        with rasterio.open(after) as src:
            tile = scene.read(Window(0, 0, 256, 256))
            np.testing.assert_allclose(tile.after, src.read([1, 2, 3]) / 255.0, atol=1e-6)
        assert scene.describe()["grid"]["crs"] is None


def test_fewer_than_three_bands_uses_all(tmp_path: Path) -> None:
    before = write_raster(tmp_path / "b.tif", ramp(2, 40, 40))
    after = write_raster(tmp_path / "a.tif", ramp(2, 40, 40, seed=1))
    with ScenePair.open(before, after) as scene:
        assert scene.bands == (1, 2)
        assert scene.read(Window(0, 0, 8, 8)).before.shape == (2, 8, 8)


def test_closed_scene_refuses_reads(shared_data: Path) -> None:
    before, after = _oscd(shared_data, "bercy")
    scene = ScenePair.open(before, after)
    scene.close()
    scene.close()
    with pytest.raises(Exception, match="closed"):
        scene.read(Window(0, 0, 4, 4))


def test_utm33_helper_sanity() -> None:
    assert UTM33.to_epsg() == 32633
