"""Every input the data layer refuses: one-line errors, raised before any output is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from kdmsi_data_testutils import ramp, write_raster

from kdmsi_engine.cli import main
from kdmsi_engine.data import ScenePair, make_tile_grid
from kdmsi_engine.data.grid import parse_crs, parse_resolution
from kdmsi_engine.data.scene import parse_bands
from kdmsi_engine.errors import GridError, InputError, KdmsiError, RasterError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.fixture()
def landsat(shared_data: Path) -> tuple[Path, Path]:
    folder = shared_data / "landsat-taizhou-nanjing"
    return folder / "A" / "taizhou.tif", folder / "B" / "taizhou.tif"


def test_missing_file(tmp_path: Path, landsat: tuple[Path, Path]) -> None:
    with pytest.raises(RasterError) as exc:
        ScenePair.open(tmp_path / "nope.tif", landsat[1])
    assert "does not exist" in _one_line(exc)
    with pytest.raises(RasterError, match="after raster"):
        ScenePair.open(landsat[0], tmp_path / "nope.tif")


def test_not_a_raster(tmp_path: Path, landsat: tuple[Path, Path]) -> None:
    fake = tmp_path / "notes.tif"
    fake.write_text("this is not a raster\n")
    with pytest.raises(RasterError) as exc:
        ScenePair.open(fake, landsat[1])
    assert "not a readable raster" in _one_line(exc)
    with pytest.raises(RasterError, match="folder"):
        ScenePair.open(tmp_path, landsat[1])


def test_truncated_geotiff(tmp_path: Path, shared_data: Path) -> None:
    source = shared_data / "oscd" / "A" / "bercy.tif"
    truncated = tmp_path / "bercy_cut.tif"
    data = source.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(RasterError) as exc:
        ScenePair.open(truncated, shared_data / "oscd" / "B" / "bercy.tif")
    assert "truncated" in _one_line(exc)
    # A few bytes short is caught too.
    short = tmp_path / "bercy_short.tif"
    short.write_bytes(data[:-5])
    with pytest.raises(RasterError, match="truncated|damaged"):
        ScenePair.open(short, shared_data / "oscd" / "B" / "bercy.tif")
    # Truncated inside the header: not readable at all.
    header = tmp_path / "bercy_header.tif"
    header.write_bytes(data[:100])
    with pytest.raises(RasterError):
        ScenePair.open(header, shared_data / "oscd" / "B" / "bercy.tif")


def test_no_crs(tmp_path: Path, landsat: tuple[Path, Path]) -> None:
    plain = write_raster(tmp_path / "plain.tif", ramp(3, 50, 50), crs=None)
    with pytest.raises(RasterError) as exc:
        ScenePair.open(landsat[0], plain)
    assert "has no CRS" in _one_line(exc)
    with pytest.raises(RasterError, match="only one"):
        ScenePair.open(landsat[0], plain, require_crs=False)


def test_rasters_that_do_not_overlap(tmp_path: Path) -> None:
    a = write_raster(tmp_path / "a.tif", ramp(3, 40, 40))
    far = Affine(10.0, 0.0, 700000.0, 0.0, -10.0, 5000000.0)
    b = write_raster(tmp_path / "b.tif", ramp(3, 40, 40), transform=far)
    with pytest.raises(GridError) as exc:
        ScenePair.open(a, b)
    assert "do not overlap" in _one_line(exc)
    # Different CRS, different continents.
    c = write_raster(tmp_path / "c.tif", ramp(3, 40, 40), crs="EPSG:32750")
    with pytest.raises(GridError, match="do not overlap"):
        ScenePair.open(a, c)


def test_band_out_of_range(landsat: tuple[Path, Path]) -> None:
    with pytest.raises(InputError) as exc:
        ScenePair.open(*landsat, bands="1,2,7")
    text = _one_line(exc)
    assert "band 7" in text and "6 band" in text
    with pytest.raises(InputError, match="start at 1"):
        ScenePair.open(*landsat, bands=[0, 1])
    with pytest.raises(InputError):
        parse_bands("a,b")
    with pytest.raises(InputError):
        parse_bands("1,1")


def test_band_counts_differ(tmp_path: Path) -> None:
    a = write_raster(tmp_path / "a.tif", ramp(2, 40, 40))
    b = write_raster(tmp_path / "b.tif", ramp(1, 40, 40))
    with pytest.raises(InputError, match="same bands"):
        ScenePair.open(a, b)


def test_overlap_all_nodata(tmp_path: Path) -> None:
    data = ramp(3, 60, 60)
    before = data.copy()
    before[:, :, 30:] = 0
    after = data.copy()
    after[:, :, :30] = 0
    a = write_raster(tmp_path / "a.tif", before, nodata=0)
    b = write_raster(tmp_path / "b.tif", after, nodata=0)
    with pytest.raises(GridError) as exc:
        ScenePair.open(a, b)
    assert "no valid pixel" in _one_line(exc)


def test_sparse_valid_data_is_found_by_the_scan(tmp_path: Path) -> None:
    # Valid pixels only in a small corner that the regular sample misses.
    data = ramp(3, 1100, 1100)
    data[:, :, :] = 0
    data[:, 1080:, 1085:] = ramp(3, 20, 15)
    a = write_raster(tmp_path / "a.tif", data, nodata=0)
    with ScenePair.open(a, a) as scene:
        assert scene.scaling.method == "percentile-2-98"
        assert scene.scaling.low[0] >= 100


def test_scene_smaller_than_one_tile(landsat: tuple[Path, Path]) -> None:
    with ScenePair.open(*landsat) as scene:
        with pytest.raises(GridError) as exc:
            make_tile_grid(scene, tile_size=512)
        assert "smaller than one" in _one_line(exc)
        with pytest.raises(InputError):
            make_tile_grid(scene, tile_size=64, overlap=64)
        with pytest.raises(InputError):
            make_tile_grid(scene, tile_size=64, min_valid_fraction=1.5)


def test_too_few_valid_tiles(tmp_path: Path) -> None:
    data = ramp(3, 64, 64)
    data[:, :, 20:] = 0
    a = write_raster(tmp_path / "a.tif", data, nodata=0)
    with ScenePair.open(a, a) as scene:
        with pytest.raises(GridError) as exc:
            make_tile_grid(scene, tile_size=64, min_valid_fraction=0.5)
        assert "best 31%" in _one_line(exc)
        tiles = make_tile_grid(scene, tile_size=64, min_valid_fraction=0.3)
        assert tiles["valid_fraction"].iloc[0] == pytest.approx(20 / 64)


def test_bad_crs_and_resolution() -> None:
    with pytest.raises(InputError):
        parse_crs("EPSG:99999999")
    with pytest.raises(InputError):
        parse_resolution(-1)
    with pytest.raises(InputError):
        parse_resolution("abc")
    assert parse_resolution(10) == (10.0, 10.0)
    assert parse_resolution((10, 20)) == (10.0, 20.0)


def test_plain_images_of_different_sizes(shared_data: Path) -> None:
    air = shared_data / "airchange"
    with pytest.raises(GridError, match="same size"):
        ScenePair.open(air / "A" / "Archieve.png", air / "B" / "Szada_1.png", require_crs=False)


def test_cli_errors_write_nothing(
    tmp_path: Path, landsat: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grid.gpkg"
    cut = tmp_path / "cut.tif"
    shutil.copy(landsat[1], cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    cases = [
        [str(tmp_path / "missing.tif"), str(landsat[1])],
        [str(landsat[0]), str(cut)],
        [str(landsat[0]), str(landsat[1]), "--bands", "9"],
        [str(landsat[0]), str(landsat[1]), "--tile-size", "1024"],
    ]
    for args in cases:
        code = main(["grid", *args, "-o", str(out), "--progress", "none"])
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert err.startswith("kdmsi grid: error: ") and "\n" not in err
        assert not out.exists()
        assert list(tmp_path.iterdir()) == [cut]


def test_errors_are_kdmsi_errors() -> None:
    assert issubclass(GridError, RasterError) and issubclass(RasterError, KdmsiError)
    assert np.dtype("uint16").kind == "u"
