"""GeoTIFF helpers: profile, overviews, class raster with colour table, errors."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from kdmsi_engine.errors import InputError, OutputError, RasterError
from kdmsi_engine.rasterio_out import (
    CLASS_NODATA,
    PROB_NODATA,
    add_overviews,
    classes_from_probability,
    create_geotiff,
    geotiff_profile,
    overview_factors,
    write_uint8_classes,
)


class _Grid:
    crs = CRS.from_epsg(32618)
    transform = Affine(30, 0, 101985, 0, -30, 2826915)
    width = 700
    height = 600


def test_profile_and_overviews(tmp_path):
    prof = geotiff_profile(_Grid(), dtype="float32", nodata=PROB_NODATA)
    assert prof["blockxsize"] == 512 and prof["compress"] == "deflate" and prof["predictor"] == 3
    small = type("G", (), {"crs": None, "transform": Affine.identity(), "width": 40, "height": 20})
    assert geotiff_profile(small(), dtype="uint8")["blockxsize"] == 48
    assert overview_factors(700, 600) == [2, 4]
    assert overview_factors(200, 100) == []
    path = tmp_path / "x.tif"
    data = np.linspace(0, 1, 600 * 700, dtype=np.float32).reshape(600, 700)
    with create_geotiff(path, _Grid(), nodata=PROB_NODATA) as dst:
        dst.write(data, 1)
        assert add_overviews(dst) == [2, 4]
    with rasterio.open(path) as src:
        assert src.overviews(1) == [2, 4]
        assert src.block_shapes[0] == (512, 512)
        assert src.crs == _Grid.crs and src.nodata == PROB_NODATA
        np.testing.assert_array_equal(src.read(1), data)


def test_classes_from_probability():
    prob = np.array([[0.9, 0.5, PROB_NODATA, np.nan, 0.51]], np.float32)
    assert classes_from_probability(prob, 0.5).tolist() == [[1, 0, 255, 255, 1]]


def test_write_uint8_classes_real_raster(shared_data, tmp_path):
    """Band 1 of RGB.byte scaled to a probability; nodata (0) kept as 255."""
    src_path = shared_data / "rasterio-rgb-byte" / "RGB.byte.tif"
    with rasterio.open(src_path) as src:
        band = src.read(1)
        grid = src
        prob = np.where(band == 0, PROB_NODATA, band / 255.0).astype(np.float32)
        p = tmp_path / "prob.tif"
        with create_geotiff(p, grid, nodata=PROB_NODATA) as dst:
            dst.write(prob, 1)
    out = write_uint8_classes(p, tmp_path / "cls.tif", 0.1)
    with rasterio.open(out) as dst:
        cls = dst.read(1)
        assert dst.nodata == CLASS_NODATA
        assert dst.colormap(1)[1] == (230, 25, 25, 255)
        assert dst.overviews(1) == [2, 4]
        assert dst.crs == CRS.from_epsg(32618)
    expect = np.where(band == 0, 255, (prob > 0.1).astype(np.uint8))
    assert (cls == expect).all()
    assert (cls == 1).sum() > 1000 and (cls == 0).sum() > 1000 and (cls == 255).sum() > 1000
    with pytest.raises(OutputError):
        write_uint8_classes(p, out, 0.1)
    with pytest.raises(InputError):
        write_uint8_classes(p, tmp_path / "bad.tif", 1.2)
    with pytest.raises(RasterError):
        write_uint8_classes(tmp_path / "missing.tif", tmp_path / "bad.tif", 0.5)
    assert not (tmp_path / "bad.tif").exists()


def test_compression_threads_follow_the_user_or_the_usable_cpus(tmp_path, monkeypatch):
    """Issue 14: GeoTIFFs are compressed with every usable CPU unless GDAL_NUM_THREADS says
    otherwise; the written map is the same either way."""
    from kdmsi_engine.environment import usable_cpus

    monkeypatch.delenv("GDAL_NUM_THREADS", raising=False)
    assert geotiff_profile(_Grid())["num_threads"] == str(usable_cpus())
    data = np.linspace(0, 1, 600 * 700, dtype=np.float32).reshape(600, 700)
    written = []
    for threads in ("1", "ALL_CPUS"):
        monkeypatch.setenv("GDAL_NUM_THREADS", threads)
        assert geotiff_profile(_Grid())["num_threads"] == threads
        path = tmp_path / f"t{len(written)}.tif"
        with create_geotiff(path, _Grid(), nodata=PROB_NODATA) as dst:
            dst.write(data, 1)
            add_overviews(dst)
        with rasterio.open(path) as src:
            written.append((src.read(1), src.read(1, out_shape=(150, 175))))
    np.testing.assert_array_equal(written[0][0], data)
    np.testing.assert_array_equal(written[0][0], written[1][0])
    np.testing.assert_array_equal(written[0][1], written[1][1])
