"""Fuzzing weak-label files and manifests: the readers raise only our own errors.

Owner: RELIABILITY (issue 6 item 4). GeoJSON text with every kind of bad content (no features,
missing field, strings, floats, nulls, huge numbers, wrong geometry types, invalid CRS, broken
JSON) goes through :func:`read_weak_labels` against the real Taizhou Landsat scene's grid; it
returns checked labels or raises :class:`LabelError`, nothing else. Manifests likewise with
:func:`read_manifest` and :class:`ManifestError`.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from kdmsi_engine.data.labels import assign_tile_labels, read_weak_labels
from kdmsi_engine.data.manifest import read_manifest
from kdmsi_engine.errors import KdmsiError, LabelError, ManifestError


def fuzz(examples: int) -> settings:
    """Hypothesis settings: reading a vector file costs ~0.1 s, so examples are counted."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Taizhou Landsat pair (landsat-taizhou-nanjing/A/taizhou.tif): EPSG:32651, 30 m, 400 x 400.
SCENE_CRS = CRS.from_epsg(32651)
SCENE_BOUNDS = (203325.0, 3592935.0, 215325.0, 3604935.0)
# Its footprint in longitude/latitude (GeoJSON's default CRS), with a margin around it.
LON = (119.80, 120.02)
LAT = (32.40, 32.58)

lons = st.floats(*LON)
lats = st.floats(*LAT)
anywhere = st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
coordinate = st.one_of(st.tuples(lons, lats), st.tuples(lons, lats), anywhere)
weird_numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -1, 0.5, 1.0, 1e308, -0.0, 2**63, 2**64]),
)
change_values = st.one_of(
    st.sampled_from([0, 1]),
    st.none(),
    st.booleans(),
    weird_numbers,
    st.text(max_size=6),
    st.sampled_from(["1", "0", "yes", "", " 1", "1.0", "NaN"]),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 1), max_size=1),
)


def _ring(center: tuple[float, float], size: float) -> list[list[float]]:
    x, y = center
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


geometries = st.one_of(
    st.builds(lambda c: {"type": "Point", "coordinates": list(c)}, coordinate),
    st.builds(
        lambda c, s: {"type": "Polygon", "coordinates": [_ring(c, s)]},
        coordinate,
        st.floats(1e-4, 0.05),
    ),
    st.builds(
        lambda cs: {"type": "Polygon", "coordinates": [[list(c) for c in cs]]},
        st.lists(coordinate, max_size=5),
    ),  # unclosed / degenerate rings
    st.builds(
        lambda c: {
            "type": "Polygon",
            "coordinates": [
                [
                    [c[0], c[1]],
                    [c[0] + 0.01, c[1] + 0.01],
                    [c[0] + 0.01, c[1]],
                    [c[0], c[1] + 0.01],
                    [c[0], c[1]],
                ]
            ],
        },
        coordinate,
    ),  # bow-tie: self-intersecting
    st.builds(
        lambda cs: {"type": "LineString", "coordinates": [list(c) for c in cs]},
        st.lists(coordinate, min_size=2, max_size=4),
    ),
    st.builds(
        lambda cs: {"type": "MultiPoint", "coordinates": [list(c) for c in cs]},
        st.lists(coordinate, max_size=3),
    ),
    st.builds(
        lambda c: {
            "type": "GeometryCollection",
            "geometries": [{"type": "Point", "coordinates": list(c)}],
        },
        coordinate,
    ),
    st.just(None),
    st.just({"type": "Point", "coordinates": []}),
    st.just({"type": "Nonsense", "coordinates": [1, 2]}),
    st.just({"type": "Polygon", "coordinates": "not a list"}),
)

properties = st.one_of(
    st.fixed_dictionaries({"change": change_values}),
    st.fixed_dictionaries({"change": st.sampled_from([0, 1])}, optional={"other": change_values}),
    st.fixed_dictionaries({}, optional={"Change": change_values, "name": st.text(max_size=4)}),
    st.none(),
)

features = st.builds(
    lambda g, p: {"type": "Feature", "geometry": g, "properties": p}, geometries, properties
)

crs_members = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "urn:ogc:def:crs:OGC:1.3:CRS84",
            "EPSG:4326",
            "urn:ogc:def:crs:EPSG::32651",
            "EPSG:999999",
            "not a crs",
            "",
        ]
    ).map(lambda name: {"type": "name", "properties": {"name": name}}),
    st.just({"type": "name"}),
    st.just("EPSG:4326"),
)


def _collection(items: list[dict], crs: object) -> dict:
    doc: dict = {"type": "FeatureCollection", "features": items}
    if crs is not None:
        doc["crs"] = crs
    return doc


def _check_result(frame, field: str = "change") -> None:  # type: ignore[no-untyped-def]
    assert len(frame) > 0
    assert frame.crs == SCENE_CRS
    values = frame[field].to_numpy()
    assert values.dtype == np.int64
    assert set(values.tolist()) <= {0, 1}
    assert frame.geometry.notna().all() and not frame.geometry.is_empty.any()
    left, bottom, right, top = SCENE_BOUNDS
    assert frame.geometry.intersects(_box(left, bottom, right, top)).any()
    # What the jobs do next with checked labels: the touching rule over the scene's tiles.
    tiles = _tiles()
    labels = assign_tile_labels(tiles, frame, field=field)
    assert labels.shape == (len(tiles),) and set(labels.tolist()) <= {-1, 0, 1}
    assert (labels != -1).any(), "a feature inside the scene labels at least one tile"


_TILES: list = []


def _tiles():  # type: ignore[no-untyped-def]
    """The 64 px tile grid of the Taizhou scene (built once: 7 x 7 tiles of 1920 m)."""
    if not _TILES:
        import geopandas as gpd

        size = 64 * 30.0
        left, bottom, right, top = SCENE_BOUNDS
        xs = [min(left + i * size, right - size) for i in range(7)]
        ys = [max(top - (j + 1) * size, bottom) for j in range(7)]
        boxes = [_box(x, y, x + size, y + size) for y in ys for x in xs]
        _TILES.append(
            gpd.GeoDataFrame({"tile_id": range(len(boxes))}, geometry=boxes, crs=SCENE_CRS)
        )
    return _TILES[0]


def _box(left: float, bottom: float, right: float, top: float):  # type: ignore[no-untyped-def]
    from shapely.geometry import box

    return box(left, bottom, right, top)


def _read_text(text: str | bytes, suffix: str = ".geojson", field: str = "change") -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"labels{suffix}"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                frame = read_weak_labels(path, crs=SCENE_CRS, field=field, bounds=SCENE_BOUNDS)
            except LabelError as exc:
                message = str(exc)
                assert message and "\n" not in message, message
                return
        _check_result(frame, field)


@fuzz(80)
@given(items=st.lists(features, max_size=6), crs=crs_members)
def test_fuzz_geojson_features(items: list[dict], crs: object) -> None:
    _read_text(json.dumps(_collection(items, crs)))


@fuzz(30)
@given(items=st.lists(features, min_size=1, max_size=4), cut=st.floats(0, 1))
def test_fuzz_truncated_geojson(items: list[dict], cut: float) -> None:
    text = json.dumps(_collection(items, None))
    _read_text(text[: int(len(text) * cut)])


@fuzz(25)
@given(content=st.binary(max_size=300))
def test_fuzz_random_bytes(content: bytes) -> None:
    for suffix in (".geojson", ".gpkg", ".shp"):
        _read_text(content, suffix)


@fuzz(50)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.floats(),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "type",
                        "features",
                        "geometry",
                        "properties",
                        "coordinates",
                        "crs",
                        "change",
                        "x",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=15,
    )
)
def test_fuzz_json_shapes(doc: object) -> None:
    """Any JSON document at all."""
    _read_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("items", "crs", "message"),
    [
        ([], None, "no features"),
        ([{"type": "Feature", "geometry": None, "properties": {"change": 1}}], None, "no features"),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
                    "properties": {"other": 1},
                }
            ],
            None,
            "no field 'change'",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
                    "properties": {"change": "yes"},
                }
            ],
            None,
            "integers",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
                    "properties": {"change": 0.5},
                }
            ],
            None,
            "integers",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
                    "properties": {"change": 7},
                }
            ],
            None,
            "1 \\(changed\\) or 0",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
                    "properties": {"change": None},
                }
            ],
            None,
            "no feature has a value",
        ),
        (
            [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [10.0, 50.0]},
                    "properties": {"change": 1},
                }
            ],
            None,
            "outside the scene",
        ),
    ],
)
def test_known_bad_labels(items: list[dict], crs: object, message: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.geojson"
        path.write_text(json.dumps(_collection(items, crs)))
        with pytest.raises(LabelError, match=message):
            read_weak_labels(path, crs=SCENE_CRS, bounds=SCENE_BOUNDS)


def test_good_labels_pass_the_checks() -> None:
    """The checker above accepts real, correct labels (so the fuzzing can tell them apart)."""
    items = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_ring((119.9, 32.48), 0.01)]},
            "properties": {"change": 1},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [119.88, 32.46]},
            "properties": {"change": 0},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [119.88, 32.47]},
            "properties": {"change": None},
        },
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.geojson"
        path.write_text(json.dumps(_collection(items, None)))
        frame = read_weak_labels(path, crs=SCENE_CRS, bounds=SCENE_BOUNDS)
    _check_result(frame)
    assert frame["change"].tolist() == [1, 0], "unmarked features are dropped"
    x, y = frame.geometry.iloc[1].x, frame.geometry.iloc[1].y
    assert 203325 < x < 215325 and 3592935 < y < 3604935


# --- manifests -----------------------------------------------------------------------------

cells = st.one_of(
    st.sampled_from(
        [
            "A/taizhou.tif",
            "B/taizhou.tif",
            "missing.tif",
            "",
            " ",
            "..",
            "/",
            "a,b",
            'x"y',
            "label/taizhou.tif",
            "A/nanjing.tif",
        ]
    ),
    st.text(max_size=8),
)
headers = st.one_of(
    st.just(["name", "before", "after", "labels"]),
    st.just(["name", "before", "after"]),
    st.just(["before", "after", "labels"]),
    st.permutations(["name", "before", "after", "labels"]).map(list),
    st.lists(
        st.sampled_from(["name", "before", "after", "labels", " name", "NAME", ""]), max_size=5
    ),
)


@fuzz(150)
@given(
    header=headers,
    rows=st.lists(st.lists(cells, max_size=6), max_size=5),
    bom=st.booleans(),
    junk=st.binary(max_size=8),
)
def test_fuzz_manifest(
    header: list[str], rows: list[list[str]], bom: bool, junk: bytes, shared_data_root: Path
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    if bom:
        data = b"\xef\xbb\xbf" + data
    data += junk
    with tempfile.TemporaryDirectory() as folder:
        # The manifest sits in the real data folder's layout: relative paths resolve to real files.
        path = Path(folder) / "scenes.csv"
        for sub in ("A", "B", "label"):
            (Path(folder) / sub).symlink_to(shared_data_root / sub)
        path.write_bytes(data)
        try:
            specs = read_manifest(path)
        except ManifestError as exc:
            assert str(exc)
            newline_in_input = b'"' in junk or any(
                ch in cell for row in rows for cell in row for ch in "\r\n"
            )
            if not newline_in_input:
                assert "\n" not in str(exc), "one line (unless a file name holds a newline)"
            return
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) > 0
    for spec in specs:
        assert spec.before.is_absolute() and spec.after.is_absolute()
        assert spec.name.strip() == spec.name and spec.name


@pytest.fixture(scope="module")
def shared_data_root(shared_data: Path) -> Path:
    return shared_data / "landsat-taizhou-nanjing"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lacks column"),
        ("name,before,after,labels\n", "lists no scenes"),
        ("before,after\nA/taizhou.tif,B/taizhou.tif\n", "lacks column\\(s\\) name"),
        (
            "name,before,after,labels\nt,A/taizhou.tif,B/missing.tif,\n",
            "after file .* does not exist",
        ),
        ("name,before,after,labels\nt,A/taizhou.tif,B/taizhou.tif,none.gpkg\n", "labels file"),
        (
            "name,before,after,labels\nt,A/taizhou.tif,B/taizhou.tif,\nt,A/nanjing.tif,B/nanjing.tif,\n",
            "duplicate name 't'",
        ),
        ("name,before,after,labels\n,A/taizhou.tif,B/taizhou.tif,\n", "empty name"),
        (
            "name,before,after,labels\n../x,A/taizhou.tif,B/taizhou.tif,\n",
            "cannot be a folder name",
        ),
        ("name,before,after,labels\nt,,B/taizhou.tif,\n", "empty before"),
    ],
)
def test_known_bad_manifests(
    tmp_path: Path, shared_data_root: Path, text: str, message: str
) -> None:
    for sub in ("A", "B"):
        (tmp_path / sub).symlink_to(shared_data_root / sub)
    path = tmp_path / "scenes.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_manifest_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path)
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x01name")
    with pytest.raises(KdmsiError):
        read_manifest(path)


def test_good_manifest(tmp_path: Path, shared_data_root: Path) -> None:
    (tmp_path / "A").symlink_to(shared_data_root / "A")
    (tmp_path / "B").symlink_to(shared_data_root / "B")
    path = tmp_path / "scenes.csv"
    path.write_text(
        "name,before,after,labels\n"
        "taizhou,A/taizhou.tif,B/taizhou.tif,\n"
        f"nanjing,{shared_data_root / 'A/nanjing.tif'},B/nanjing.tif,\n"
    )
    specs = read_manifest(path)
    assert [s.name for s in specs] == ["taizhou", "nanjing"]
    assert specs[0].before == tmp_path / "A" / "taizhou.tif" and specs[0].labels is None
    assert specs[1].before == shared_data_root / "A" / "nanjing.tif"


@fuzz(40)
@given(value=change_values)
def test_fuzz_single_value_types(value: object) -> None:
    """One feature inside the scene with any value: only 0/1 (and integral floats) pass."""
    assume(value is not None)
    item = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [119.9, 32.5]},
        "properties": {"change": value},
    }
    _read_text(json.dumps(_collection([item], None)))
