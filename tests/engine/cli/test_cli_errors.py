"""Bad input through the command line: exit 2, one line on stderr, nothing written.

Owner: RELIABILITY. One test per bad input of issue 2 item 7 (rasters, grid) and issue 6 item 1
(labels, outputs), run through ``kdmsi grid`` / ``kdmsi labels`` on the real Taizhou Landsat pair.
Model, manifest and training inputs are in ``test_cli_errors_jobs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_harness import assert_refused, run_cli
from reliability_helpers import copy_raster, tmpfs

TILE = ["--tile-size", "64"]


@pytest.fixture(scope="module")
def landsat(shared_data: Path) -> Path:
    return shared_data / "landsat-taizhou-nanjing"


@pytest.fixture
def pair(landsat: Path) -> tuple[str, str]:
    return str(landsat / "A" / "taizhou.tif"), str(landsat / "B" / "taizhou.tif")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


def grid(before: str, after: str, out: Path, *extra: str) -> list[str]:
    return ["grid", before, after, "-o", str(out / "grid.gpkg"), *TILE, *extra]


def test_grid_works_on_good_input(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """The control: the same command on good input succeeds (so refusals mean something)."""
    run = run_cli(grid(*pair, out), capfd)
    assert run.code == 0, run.err
    assert run.events[-1]["event"] == "result"
    assert (out / "grid.gpkg").is_file()
    assert run.events[-1]["data"]["tiles"] == 49  # 400 px: 6 tiles + one flush with the edge


# --- issue 2 item 7: rasters ----------------------------------------------------------------


def test_missing_file(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    missing = str(inputs / "nope.tif")
    assert_refused(grid(pair[0], missing, out), capfd, "nope.tif", watch=[out, inputs])
    assert_refused(grid(missing, pair[1], out), capfd, "nope.tif", watch=[out, inputs])


def test_unreadable_file_is_a_folder(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    folder = inputs / "folder.tif"
    folder.mkdir()
    assert_refused(grid(str(folder), pair[1], out), capfd, "folder.tif", watch=[out, inputs])


def test_unreadable_broken_link(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    link = inputs / "link.tif"
    link.symlink_to(inputs / "gone.tif")
    assert_refused(grid(pair[0], str(link), out), capfd, "link.tif", watch=[out, inputs])


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("text.tif", b"this is not a raster\n"),
        ("empty.tif", b""),
        ("labels.geojson", b'{"type": "FeatureCollection", "features": []}'),
        ("random.tif", bytes(range(256)) * 8),
    ],
)
def test_not_a_raster(pair, out, inputs, capfd, name: str, content: bytes) -> None:  # type: ignore[no-untyped-def]
    path = inputs / name
    path.write_bytes(content)
    assert_refused(grid(pair[0], str(path), out), capfd, name, watch=[out, inputs])


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.9])
def test_truncated_geotiff(pair, out, inputs, capfd, fraction: float) -> None:  # type: ignore[no-untyped-def]
    data = Path(pair[1]).read_bytes()
    path = inputs / "truncated.tif"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert_refused(grid(pair[0], str(path), out), capfd, "truncated.tif", watch=[out, inputs])


def test_no_crs(shared_data, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """LEVIR-CD PNGs have no georeferencing: a scene job needs a CRS (folder datasets do not)."""
    levir = shared_data / "levir-cd-samples"
    name = sorted(p.name for p in (levir / "A").iterdir())[0]
    args = grid(str(levir / "A" / name), str(levir / "B" / name), out)
    assert_refused(args, capfd, "(?i)crs|georeferenc", watch=[out])


def test_no_crs_on_one_date(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    after = copy_raster(Path(pair[1]), inputs / "nocrs.tif", crs=None)
    assert_refused(grid(pair[0], str(after), out), capfd, "(?i)crs|georeferenc", watch=[out])


def test_rasters_do_not_overlap(landsat, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """Taizhou and Nanjing (real, about 100 km apart, different UTM zones) do not overlap."""
    args = grid(str(landsat / "A" / "taizhou.tif"), str(landsat / "B" / "nanjing.tif"), out)
    assert_refused(args, capfd, "do not overlap", watch=[out])


@pytest.mark.parametrize(
    "bands",
    [
        "1,2,9",
        "0,1,2",
        "7",
        "-1,2,3",
        "a,b",
        "1,1,2",
        "2,7",
    ],
)
def test_band_index_out_of_range(pair, out, capfd, bands: str) -> None:  # type: ignore[no-untyped-def]
    assert_refused(grid(*pair, out, "--bands", bands), capfd, "(?i)band", watch=[out])


def test_overlap_all_nodata(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    """The after date is entirely nodata (synthetic: real pixels replaced by the nodata value)."""
    after = copy_raster(Path(pair[1]), inputs / "allnodata.tif", nodata=0, fill=0)
    assert_refused(
        grid(pair[0], str(after), out), capfd, "(?i)nodata|no valid|no data", watch=[out]
    )


def test_raster_smaller_than_one_tile(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    args = ["grid", *pair, "-o", str(out / "grid.gpkg"), "--tile-size", "512"]
    assert_refused(args, capfd, "smaller than one", watch=[out])


@pytest.mark.parametrize(
    "extra",
    [["--tile-size", "0"], ["--tile-size", "-64"], ["--overlap", "64"], ["--overlap", "-1"]],
)
def test_bad_tile_parameters(pair, out, capfd, extra: list[str]) -> None:  # type: ignore[no-untyped-def]
    args = ["grid", *pair, "-o", str(out / "grid.gpkg"), *TILE, *extra]
    assert_refused(args, capfd, "(?i)tile|overlap", watch=[out])


# --- outputs ----------------------------------------------------------------------------------


def test_existing_output_not_overwritten(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    target = out / "grid.gpkg"
    target.write_bytes(b"earlier output")
    assert_refused(grid(*pair, out), capfd, "already exists.*--overwrite", watch=[out])
    assert target.read_bytes() == b"earlier output"
    run = run_cli([*grid(*pair, out), "--overwrite"], capfd)
    assert run.code == 0, run.err
    assert target.read_bytes()[:16] == b"SQLite format 3\x00"


def test_output_folder_missing(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    args = ["grid", *pair, "-o", str(tmp_path / "no" / "such" / "grid.gpkg"), *TILE]
    assert_refused(args, capfd, "does not exist", watch=[tmp_path])


def test_output_folder_not_writable(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, read_only=True) as ro:
        if ro is None:
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "grid.gpkg"
        else:
            target = ro / "grid.gpkg"
        args = ["grid", *pair, "-o", str(target), *TILE]
        assert_refused(args, capfd, "(?i)writable|does not exist", watch=[tmp_path])


def test_output_is_a_folder(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    args = ["grid", *pair, "-o", str(out), *TILE]
    assert_refused(args, capfd, "is a folder", watch=[out])


def test_grid_output_wrong_extension(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    args = ["grid", *pair, "-o", str(out / "grid.tif"), *TILE]
    assert_refused(args, capfd, r"\.gpkg", watch=[out])


def test_grid_disk_full(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, size_kib=48) as small:
        if small is None:
            pytest.skip("cannot mount a small file system here")
        args = ["grid", *pair, "-o", str(small / "grid.gpkg"), "--tile-size", "32"]
        assert_refused(args, capfd, "disk full", watch=[small])


# --- issue 6 item 1: weak labels (kdmsi labels) -------------------------------------------------


def _geojson(folder: Path, features: list[dict], name: str = "labels.geojson") -> Path:
    path = folder / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _point(lon: float, lat: float, **props: object) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "properties": props,
    }


def labels_cmd(pair: tuple[str, str], labels: Path, out: Path, *extra: str) -> list[str]:
    return ["labels", *pair, "--labels", str(labels), "-o", str(out / "tiles.gpkg"), *TILE, *extra]


def test_labels_work_on_good_input(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _geojson(inputs, [_point(119.90, 32.50, change=1), _point(119.88, 32.46, change=0)])
    run = run_cli(labels_cmd(pair, labels, out), capfd)
    assert run.code == 0, run.err
    result = run.events[-1]["data"]
    assert (result["changed"], result["unchanged"]) == (1, 1)
    assert result["unlabelled"] == result["tiles"] - 2


def test_label_file_missing(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    args = labels_cmd(pair, inputs / "none.gpkg", out)
    assert_refused(args, capfd, "none.gpkg.*does not exist", watch=[out])


def test_label_file_no_features(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _geojson(inputs, [])
    assert_refused(labels_cmd(pair, labels, out), capfd, "no features", watch=[out, inputs])


def test_label_file_missing_field(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _geojson(inputs, [_point(119.9, 32.5, klass=1), _point(119.88, 32.46, klass=0)])
    assert_refused(labels_cmd(pair, labels, out), capfd, "no field 'change'", watch=[out])
    assert_refused(
        labels_cmd(pair, labels, out, "--label-field", "other"), capfd, "'other'", watch=[out]
    )


@pytest.mark.parametrize("value", ["yes", 0.5, 2, -1, 1e20])
def test_label_values_not_integer(pair, out, inputs, capfd, value: object) -> None:  # type: ignore[no-untyped-def]
    labels = _geojson(inputs, [_point(119.9, 32.5, change=value), _point(119.88, 32.46, change=0)])
    assert_refused(labels_cmd(pair, labels, out), capfd, "(?i)integer|1 \\(changed\\)", watch=[out])


def test_label_features_all_outside(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _geojson(inputs, [_point(10.0, 50.0, change=1), _point(10.1, 50.1, change=0)])
    assert_refused(labels_cmd(pair, labels, out), capfd, "outside the scene", watch=[out])


def test_label_file_without_crs(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    """A shapefile without .prj has no CRS: say so rather than guess."""
    import geopandas as gpd
    from shapely.geometry import Point

    frame = gpd.GeoDataFrame({"change": [1, 0]}, geometry=[Point(205000, 3600000), Point(0, 0)])
    frame.to_file(inputs / "nocrs.shp")
    args = labels_cmd(pair, inputs / "nocrs.shp", out)
    assert_refused(args, capfd, "(?i)no crs", watch=[out])


def test_label_file_not_vector(pair, out, inputs, capfd) -> None:  # type: ignore[no-untyped-def]
    path = inputs / "labels.gpkg"
    path.write_bytes(b"not a geopackage")
    assert_refused(labels_cmd(pair, path, out), capfd, "labels.gpkg", watch=[out])
    assert_refused(labels_cmd(pair, Path(pair[0]), out), capfd, "taizhou.tif", watch=[out])
