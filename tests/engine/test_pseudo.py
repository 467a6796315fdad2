"""Pseudo labels: tile rules, nodata, labels from a vector file on a real grid, auto threshold."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from kdmsi_engine.cli import main
from kdmsi_engine.data.labels import labels_from_raster
from kdmsi_engine.errors import InputError, LabelError, OutputError
from kdmsi_engine.pseudo import (
    TileLabels,
    choose_threshold,
    make_pseudo_labels,
    otsu_threshold,
    parse_threshold,
)
from kdmsi_engine.rasterio_out import CLASS_NODATA, PROB_NODATA


def _write_prob(path, prob, *, crs=CRS.from_epsg(32651), transform=None):
    transform = transform or Affine(30, 0, 500000, 0, -30, 3500000)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=prob.shape[1],
        height=prob.shape[0],
        count=1,
        dtype="float32",
        crs=crs,
        transform=transform,
        nodata=PROB_NODATA,
    ) as dst:
        dst.write(prob.astype(np.float32), 1)
    return path


def _tiles(labels, size=4, per_row=3):
    n = len(labels)
    rows = np.array([(i // per_row) * size for i in range(n)])
    cols = np.array([(i % per_row) * size for i in range(n)])
    full = np.full(n, size)
    return TileLabels(rows, cols, full, full, np.asarray(labels, np.int8))


def test_rules_changed_unchanged_unlabelled_nodata(tmp_path):
    prob = np.full((8, 12), 0.2, np.float32)
    prob[0:2, 0:2] = 0.9  # change in tile 0 (changed)
    prob[0:2, 4:6] = 0.9  # high values in tile 1 (unchanged): must stay 0
    prob[0:2, 8:10] = 0.9  # tile 2 unlabelled: 255
    prob[3, 3] = PROB_NODATA  # nodata inside the changed tile
    prob[3, 2] = 0.3  # exactly at the threshold: not change (strict >)
    p = _write_prob(tmp_path / "p.tif", prob)
    # tiles (4x4): 0 changed, 1 unchanged, 2 unlabelled, 3 changed, 4 unchanged, 5 unlabelled
    tiles = _tiles([1, 0, -1, 1, 0, -1])
    r = make_pseudo_labels(p, tmp_path / "o.tif", tile_labels=tiles, threshold=0.3)
    with rasterio.open(tmp_path / "o.tif") as src:
        out = src.read(1)
        assert src.nodata == CLASS_NODATA and src.dtypes[0] == "uint8"
        assert src.colormap(1)[1][:3] == (230, 25, 25)
        assert src.crs == CRS.from_epsg(32651)
    expect = np.full((8, 12), 255, np.uint8)
    expect[:, 0:4] = 0
    expect[0:2, 0:2] = 1
    expect[3, 3] = 255
    expect[:, 4:8] = 0
    assert (out == expect).all()
    assert r["pixels"] == {"change": 4, "background": 59, "ignore": 33}
    assert r["tiles"] == {"changed": 2, "unchanged": 2, "unlabelled": 2}


def test_unchanged_tile_wins_where_tiles_overlap(tmp_path):
    p = _write_prob(tmp_path / "p.tif", np.full((4, 6), 0.8, np.float32))
    # changed tile cols 0-3, unchanged tile cols 2-5 (shifted edge tile)
    tiles = TileLabels(
        np.array([0, 0]),
        np.array([0, 2]),
        np.array([4, 4]),
        np.array([4, 4]),
        np.array([1, 0], np.int8),
    )
    make_pseudo_labels(p, tmp_path / "o.tif", tile_labels=tiles, threshold=0.5)
    with rasterio.open(tmp_path / "o.tif") as src:
        out = src.read(1)
    assert (out[:, :2] == 1).all() and (out[:, 2:] == 0).all()


def test_labels_file_on_real_grid(shared_data, tmp_path):
    """Landsat Taizhou sample labels as points; tiles of 100 px on the 400 x 400 grid."""
    base = shared_data / "landsat-taizhou-nanjing"
    points = labels_from_raster(base / "label" / "taizhou.tif", geometry="points")
    gpkg = tmp_path / "labels.gpkg"
    points.to_file(gpkg, driver="GPKG")
    with (
        rasterio.open(base / "A" / "taizhou.tif") as a,
        rasterio.open(base / "B" / "taizhou.tif") as b,
    ):
        prob = np.abs(a.read(4).astype(np.float32) - b.read(4)) / 255.0
        crs, transform = a.crs, a.transform
    p = _write_prob(tmp_path / "p.tif", prob, crs=crs, transform=transform)
    r = make_pseudo_labels(p, tmp_path / "o.tif", labels=gpkg, tile_size=100, threshold=0.1)
    with rasterio.open(tmp_path / "o.tif") as src:
        out = src.read(1)
    # expected from the tile rule, computed directly from the points
    expect = np.full((400, 400), 255, np.uint8)
    for r0 in range(0, 400, 100):
        for c0 in range(0, 400, 100):
            col = (points.geometry.x - transform.c) / transform.a
            row = (points.geometry.y - transform.f) / transform.e
            inside = (col >= c0) & (col < c0 + 100) & (row >= r0) & (row < r0 + 100)
            vals = points["change"][inside]
            if (vals == 1).any():
                expect[r0 : r0 + 100, c0 : c0 + 100] = prob[r0 : r0 + 100, c0 : c0 + 100] > 0.1
            elif len(vals):
                expect[r0 : r0 + 100, c0 : c0 + 100] = 0
    assert (out == expect).all()
    assert r["tiles"]["changed"] > 0 and r["tiles"]["unchanged"] > 0
    assert r["pixels"]["change"] > 0
    # via the command line, auto threshold, and 'unmarked unchanged'
    out2 = tmp_path / "auto.tif"
    code = main(
        [
            "pseudo",
            str(p),
            "-o",
            str(out2),
            "--labels",
            str(gpkg),
            "--tile-size",
            "100",
            "--threshold",
            "auto",
            "--unmarked-unchanged",
            "--progress",
            "none",
        ]
    )
    assert code == 0
    with rasterio.open(out2) as src:
        assert CLASS_NODATA not in np.unique(src.read(1))


def test_otsu_and_auto_threshold():
    edges = np.linspace(0, 1, 1001)
    rng = np.random.default_rng(1)
    changed = np.concatenate([rng.normal(0.15, 0.03, 5000), rng.normal(0.7, 0.05, 2000)])
    unchanged = rng.uniform(0.0, 0.2, 8000)
    hc = np.histogram(np.clip(changed, 0, 1), edges)[0]
    hu = np.histogram(unchanged, edges)[0]
    otsu = otsu_threshold(hc, edges)
    assert 0.25 < otsu < 0.55  # between the modes (0.15 + 3 sd, 0.7 - 3 sd)
    value, info = choose_threshold("auto", hc, hu, edges)
    assert value == pytest.approx(otsu)
    assert info["unchanged_q"] == pytest.approx(0.198, abs=0.005)
    # noisy unchanged tiles push auto above Otsu: false positives stay bounded
    hu_noisy = np.histogram(rng.uniform(0.0, 0.8, 8000), edges)[0]
    value2, info2 = choose_threshold("auto", hc, hu_noisy, edges)
    assert value2 == pytest.approx(info2["unchanged_q"]) and value2 > 0.75
    # no changed tile: otsu impossible, auto falls back to the quantile
    v3, _ = choose_threshold("auto", np.zeros(1000, np.int64), hu, edges)
    assert v3 == pytest.approx(0.198, abs=0.005)
    with pytest.raises(LabelError):
        choose_threshold("otsu", np.zeros(1000, np.int64), hu, edges)


def test_auto_threshold_on_raster(tmp_path):
    rng = np.random.default_rng(2)
    prob = rng.uniform(0.0, 0.1, (8, 12)).astype(np.float32)
    prob[0:2, 0:3] = 0.8  # change inside the changed tile 0
    p = _write_prob(tmp_path / "p.tif", prob)
    tiles = _tiles([1, 0, 0, 0, 0, -1])
    r = make_pseudo_labels(p, tmp_path / "o.tif", tile_labels=tiles, threshold="auto")
    assert r["threshold_method"] == "auto"
    assert 0.09 <= r["threshold"] < 0.8
    assert r["pixels"]["change"] == 6


def test_errors_write_nothing(tmp_path, capsys):
    p = _write_prob(tmp_path / "p.tif", np.zeros((8, 12), np.float32))
    tiles = _tiles([1, 0, -1, 1, 0, -1])
    for bad in ("high", 1.0, -0.1, "1.5"):
        with pytest.raises(InputError):
            make_pseudo_labels(p, tmp_path / "o.tif", tile_labels=tiles, threshold=bad)
    assert parse_threshold("0.25") == 0.25 and parse_threshold("AUTO") == "auto"
    with pytest.raises(InputError):
        make_pseudo_labels(p, tmp_path / "o.tif", threshold=0.3)  # no labels
    (tmp_path / "exists.tif").write_bytes(b"x")
    with pytest.raises(OutputError):
        make_pseudo_labels(p, tmp_path / "exists.tif", tile_labels=tiles)
    code = main(
        [
            "pseudo",
            str(p),
            "-o",
            str(tmp_path / "o.tif"),
            "--labels",
            str(tmp_path / "missing.gpkg"),
            "--progress",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    code = main(
        [
            "pseudo",
            str(tmp_path / "nope.tif"),
            "-o",
            str(tmp_path / "o.tif"),
            "--labels",
            str(tmp_path / "missing.gpkg"),
            "--progress",
            "none",
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["exists.tif", "p.tif"]
