"""Thresholds without pixel truth (Otsu, quantiles of known negatives), the rarity fusion of
change maps, and the trust report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from kdmsi_engine import defaults
from kdmsi_engine.errors import InputError
from kdmsi_engine.fusion import RarityScale, fuse_maps
from kdmsi_engine.pseudo import TileLabels
from kdmsi_engine.thresholds import (
    Histogram,
    otsu_threshold,
    parse_threshold_spec,
    quantile_threshold,
    raster_threshold,
)
from kdmsi_engine.trust import trust_report


def _write(path: Path, data: np.ndarray) -> Path:
    profile = {
        "driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1,
        "dtype": "float32", "crs": "EPSG:32651", "transform": from_origin(0, 640, 10, 10),
        "nodata": -1.0,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.astype(np.float32), 1)
    return path


def _quadrant_tiles(labels: tuple[int, int, int, int]) -> TileLabels:
    """Four 32 px tiles of a 64 x 64 raster: top-left, top-right, bottom-left, bottom-right."""
    return TileLabels(
        row_off=np.array([0, 0, 32, 32]),
        col_off=np.array([0, 32, 0, 32]),
        height=np.full(4, 32),
        width=np.full(4, 32),
        label=np.array(labels, dtype=np.int8),
    )


def test_otsu_on_a_known_histogram():
    edges = np.linspace(0, 1, 11)
    hist = np.array([0, 50, 50, 0, 0, 0, 0, 30, 30, 0])  # groups around 0.15 and 0.75
    threshold = otsu_threshold(hist, edges)
    assert 0.3 <= threshold <= 0.7
    # two equal spikes: the cut lies between them, on the lower spike's upper edge
    spikes = np.zeros(10)
    spikes[[2, 7]] = 100
    assert otsu_threshold(spikes, edges) == pytest.approx(0.3)
    assert otsu_threshold(np.zeros(10), edges) == 0.5
    assert quantile_threshold(np.array([10, 80, 10]), np.linspace(0, 3, 4), 0.85) == 2.0
    histogram = Histogram()
    histogram.add(np.array([0.1, 0.1, 0.8, np.nan, 2.0]))  # NaN dropped, 2.0 clipped to 1
    assert histogram.total == 4
    assert histogram.quantile(0.5) == pytest.approx(0.101)


def test_threshold_specs_and_raster_thresholds(tmp_path):
    assert parse_threshold_spec("OTSU") == "otsu" and parse_threshold_spec("0.25") == 0.25
    assert parse_threshold_spec("unchanged-q") == "unchanged-q"
    for bad in ("high", 1.0, -0.1, "nan"):
        with pytest.raises(InputError):
            parse_threshold_spec(bad)
    rng = np.random.default_rng(0)
    data = np.where(rng.random((64, 64)) < 0.3, 0.8, 0.2) + rng.normal(0, 0.02, (64, 64))
    data[0, :5] = -1  # nodata is left out
    path = _write(tmp_path / "p.tif", data)
    otsu = raster_threshold(path, "otsu")  # any cut in the gap separates the two groups
    valid = data >= 0
    np.testing.assert_array_equal(data[valid] > otsu, data[valid] > 0.5)
    assert raster_threshold(path, 0.4) == 0.4
    tiles = _quadrant_tiles((0, 1, 1, 1))
    q = raster_threshold(path, "unchanged-q", unchanged=tiles.unchanged_mask, quantile=0.99)
    top_left = data[:32, :32][data[:32, :32] >= 0]
    assert q == pytest.approx(np.quantile(top_left, 0.99), abs=2e-3)
    with pytest.raises(InputError):
        raster_threshold(path, "unchanged-q")  # needs weak labels


def test_rarity_fusion(tmp_path):
    rng = np.random.default_rng(1)
    first = rng.random((64, 64))
    second = rng.random((64, 64))
    first[40:50, 40:50] = 0.999  # rare under both maps
    second[40:50, 40:50] = 0.999
    a, b = _write(tmp_path / "a.tif", first), _write(tmp_path / "b.tif", second)
    tiles = _quadrant_tiles((0, 0, 1, 1))  # calibrate on the top half
    result = fuse_maps([a, b], tmp_path / "fused.tif", tiles.unchanged_mask)
    with rasterio.open(tmp_path / "fused.tif") as ds:
        fused = ds.read(1)
    assert result["calibration_pixels"] == [2 * 32 * 32, 2 * 32 * 32]
    assert 0 <= fused.min() and fused.max() <= 1
    # rare under both maps: the top score; monotone in each map
    assert fused[45, 45] == pytest.approx(fused.max())
    assert fused[45, 45] > np.quantile(fused[:40], 0.99)
    i, j = np.unravel_index(np.argmin(first[:32]), (32, 64))
    k, m = np.unravel_index(np.argmax(first[:32]), (32, 64))
    if second[k, m] >= second[i, j]:
        assert fused[k, m] >= fused[i, j]
    # about 1 % of the calibration pixels lie above their own 99th percentile
    top = fused[:32]
    assert (top > np.quantile(top, 0.99)).mean() == pytest.approx(0.01, abs=0.005)
    scale = RarityScale(_histogram(np.linspace(0, 0.5, 1000)))
    assert scale.rate(np.array([0.0]))[0] == pytest.approx(1.0)
    assert scale.rate(np.array([0.25]))[0] == pytest.approx(0.5, abs=0.01)
    assert scale.rate(np.array([0.9]))[0] == pytest.approx(scale.floor)  # beyond them all


def _histogram(values: np.ndarray) -> Histogram:
    histogram = Histogram(10000)
    histogram.add(values)
    return histogram


def test_trust_report_numbers_and_warnings(tmp_path):
    prob = np.zeros((64, 64))
    prob[:32, 32:][:10, :10] = 0.9  # change in the top-right (changed) tile: 100 / 1024 px
    prob[32:, :32][:2, :2] = 0.9  # a speck in the bottom-left (changed) tile: 4 / 1024 px
    path = _write(tmp_path / "p.tif", prob)
    tiles = _quadrant_tiles((0, 1, 1, 0))
    report = trust_report(path, 0.5, tiles, quantile=0.99, teacher={"auc": 0.9})
    assert report["flag_share"] == pytest.approx(0.04)
    assert report["changed_tiles_found"] == 0.5  # 4 px < 0.5 % of the tile
    assert report["unchanged_tiles_flagged"] == 0.0
    assert report["tile_agreement"] == 0.75
    assert report["change_share_in_changed_tiles"] == pytest.approx((100 + 4) / 2048, abs=1e-4)
    assert report["warnings"] == [] and report["trusted"]
    # a map that marks the unchanged tiles and a teacher near chance are flagged in words
    prob[:32, :32] = 0.9
    prob[32:, 32:] = 0.9
    bad = trust_report(
        _write(tmp_path / "q.tif", prob), 0.5, tiles, quantile=0.99, teacher={"auc": 0.55}
    )
    assert not bad["trusted"]
    text = " ".join(bad["warnings"])
    assert "poorly" in text and "labelled unchanged" in text and "hardly more frequent" in text
    assert bad["unchanged_tiles_flagged"] == 1.0 > defaults.TRUST_MAX_UNCHANGED_FLAGGED


def test_fusion_gate_vetoes_ordinary_spectral_change(tmp_path):
    """Where the gate map is ordinary for unchanged land the fused score is 0; elsewhere it is
    the plain product of rates."""
    rng = np.random.default_rng(3)
    detector = rng.random((64, 64))
    spectral = rng.random((64, 64))
    detector[40:50, 40:50] = 0.999  # the detector sees change...
    spectral[40:45, 40:50] = 0.999  # ...the spectra changed only on half of it
    spectral[45:50, 40:50] = 0.3
    a, b = _write(tmp_path / "d.tif", detector), _write(tmp_path / "s.tif", spectral)
    tiles = _quadrant_tiles((0, 0, 1, 1))
    plain = tmp_path / "plain.tif"
    gated = tmp_path / "gated.tif"
    fuse_maps([a, b], plain, tiles.unchanged_mask)
    result = fuse_maps([a, b], gated, tiles.unchanged_mask, gate=1, gate_rate=0.1)
    with rasterio.open(plain) as ds:
        p = ds.read(1)
    with rasterio.open(gated) as ds:
        g = ds.read(1)
    assert result["gate"]["rate"] == 0.1
    assert result["gate_value"] == pytest.approx(np.quantile(spectral[:32], 0.9), abs=2e-3)
    assert (g[45:50, 40:50] == 0).all() and (g[40:45, 40:50] > 0).all()
    rare = spectral > result["gate_value"] + 1e-3
    np.testing.assert_allclose(g[rare], p[rare])
    assert (g[spectral < result["gate_value"] - 1e-3] == 0).all()


def test_tile_auc_counts_pairs():
    from kdmsi_engine.training.kd import tile_auc

    rng = np.random.default_rng(4)
    scores = np.round(rng.random(60), 1)  # ties on purpose
    labels = (rng.random(60) < 0.4).astype(int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert tile_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert tile_auc(scores, np.ones(60)) is None


def test_fusion_weights(tmp_path):
    """Weight 1 on one map: the score orders pixels as that map does; bad weights are refused."""
    rng = np.random.default_rng(5)
    first, second = rng.random((64, 64)), rng.random((64, 64))
    a, b = _write(tmp_path / "a.tif", first), _write(tmp_path / "b.tif", second)
    tiles = _quadrant_tiles((0, 0, 1, 1))
    result = fuse_maps([a, b], tmp_path / "f.tif", tiles.unchanged_mask, weights=(3, 1))
    assert result["weights"] == [0.75, 0.25]
    fuse_maps([a, b], tmp_path / "only.tif", tiles.unchanged_mask, weights=(1, 0))
    with rasterio.open(tmp_path / "only.tif") as ds:
        only = ds.read(1)
    order = np.argsort(first.ravel())
    assert (np.diff(only.ravel()[order]) >= -1e-6).all()  # non-decreasing along map a
    with pytest.raises(InputError):
        fuse_maps([a, b], tmp_path / "bad.tif", tiles.unchanged_mask, weights=(1,))


def test_fusion_calibrates_each_map_on_its_own_pixels(tmp_path):
    """One mask per map: each map's rate is the share of its own calibration pixels at or above
    the value (the detector on the tiles it did not train on, the spectral map on all)."""
    rng = np.random.default_rng(6)
    first, second = rng.random((64, 64)), rng.random((64, 64))
    a, b = _write(tmp_path / "a.tif", first), _write(tmp_path / "b.tif", second)
    held_out = _quadrant_tiles((0, -1, -1, -1))  # the top-left tile only
    every = _quadrant_tiles((0, 0, 1, 1))  # the top half
    result = fuse_maps(
        [a, b], tmp_path / "f.tif", [held_out.unchanged_mask, every.unchanged_mask], weights=(1, 0)
    )
    assert result["calibration_pixels"] == [32 * 32, 2 * 32 * 32]
    with rasterio.open(tmp_path / "f.tif") as ds:
        score = ds.read(1)
    own = np.sort(first[:32, :32].ravel())
    for row, col in [(5, 40), (50, 10), (60, 60), (20, 20)]:
        rate = max((own >= first[row, col] - 1e-4).mean(), 0.5 / own.size)
        expected = np.log(rate) / np.log(0.5 / own.size)
        assert score[row, col] == pytest.approx(expected, abs=0.02)
    result = fuse_maps(
        [a, b], tmp_path / "g.tif", [every.unchanged_mask, every.unchanged_mask], weights=(0, 1)
    )
    with rasterio.open(tmp_path / "g.tif") as ds:
        other = ds.read(1)
    top = np.sort(second[:32].ravel())
    rate = max((top >= second[50, 50] - 1e-4).mean(), 0.5 / top.size)
    assert other[50, 50] == pytest.approx(np.log(rate) / np.log(0.5 / top.size), abs=0.02)
    with pytest.raises(InputError, match="calibration masks"):
        fuse_maps([a, b], tmp_path / "bad.tif", [every.unchanged_mask])
    assert not (tmp_path / "bad.tif").exists()
