"""Change vector analysis: the no-training baseline (``kdmsi cva``) and its calibrated form,
checked on a real crop of the Taizhou Landsat pair against values computed here by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from detect_testutils import crop_sample
from rasterio.windows import Window

from kdmsi_engine.cli import main
from kdmsi_engine.cva import (
    DifferenceStats,
    box_mean3,
    calibrated_cva_scene,
    cva_scene,
    distance_to_unit,
    mahalanobis,
)
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.pseudo import TileLabels

#: 128 x 128 pixels: the scene's sample windows (a 4 x 4 lattice of 32 px) then cover every
#: pixel, so the engine's band percentiles are those of all pixels.
CROP = Window(100, 150, 128, 128)


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> dict[str, Path]:
    return crop_sample(tmp_path_factory.mktemp("cva"), CROP)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read().astype(np.float64)


def _brute_otsu(values: np.ndarray, bins: int = 1000) -> float:
    """Otsu by trying every bin edge (between-class variance), written independently."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_value = -1.0, 0.5
    for k in range(1, bins):
        w0, w1 = hist[:k].sum(), hist[k:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[:k] * centers[:k]).sum() / w0
        m1 = (hist[k:] * centers[k:]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_value = between, edges[k]
    return float(best_value)


def test_cva_and_otsu_match_an_independent_computation(crop, tmp_path):
    before, after = _read(crop["before"]), _read(crop["after"])
    scaled = []
    for data in (before, after):
        bands = []
        for i in range(data.shape[0]):
            both = np.concatenate([before[i].ravel(), after[i].ravel()])
            low, high = np.percentile(both, [2, 98])
            bands.append(np.clip((data[i] - low) / (high - low), 0, 1))
        scaled.append(np.stack(bands))
    expected = np.sqrt(np.mean((scaled[1] - scaled[0]) ** 2, axis=0))
    result = cva_scene(
        crop["before"], crop["after"], tmp_path / "cva.tif", change_path=tmp_path / "change.tif"
    )
    got = _read(tmp_path / "cva.tif")[0]
    assert result["bands"] == [1, 2, 3, 4, 5, 6]  # every band by default
    np.testing.assert_allclose(got, expected, atol=1e-5)
    otsu = _brute_otsu(expected.ravel())
    assert result["threshold"] == pytest.approx(otsu, abs=1e-9)
    assert result["threshold_method"] == "otsu"
    change = _read(tmp_path / "change.tif")[0]
    np.testing.assert_array_equal(change, (got > result["threshold"]).astype(float))
    assert result["changed_fraction"] == pytest.approx(float((got > otsu).mean()), abs=2e-3)


def test_cva_command_line(crop, tmp_path):
    out, change = tmp_path / "cva.tif", tmp_path / "change.tif"
    args = ["cva", str(crop["before"]), str(crop["after"]), "-o", str(out), "--progress", "none"]
    assert main([*args, "--change", str(change), "--threshold", "0.2", "--bands", "3,2,1"]) == 0
    with rasterio.open(out) as ds:
        assert ds.tags()["KDMSI_METHOD"] == "cva" and ds.nodata == -1
        prob = ds.read(1)
    with rasterio.open(change) as ds:
        np.testing.assert_array_equal(ds.read(1), (prob > 0.2).astype(np.uint8))
    stamp = out.stat().st_mtime_ns
    assert main(args) == 2  # an existing output is refused
    assert out.stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite", "--threshold", "high"]) == 2  # not a threshold


def test_mahalanobis_and_smoothing_match_numpy(crop):
    rng = np.random.default_rng(0)
    before = rng.random((3, 20, 30)).astype(np.float32)
    after = before + rng.normal(0, [[[0.05]], [[0.1]], [[0.2]]], (3, 20, 30)).astype(np.float32)
    mask = np.zeros((20, 30), bool)
    mask[:, :15] = True
    stats = DifferenceStats(3)
    stats.add(before, after, mask)
    diff = (after - before).reshape(3, -1).astype(np.float64)
    sample = diff[:, mask.ravel()]
    np.testing.assert_allclose(stats.mean, sample.mean(axis=1), atol=1e-9)
    np.testing.assert_allclose(stats.covariance, np.cov(sample, bias=True), rtol=1e-4, atol=1e-9)
    inverse = np.linalg.inv(np.cov(sample, bias=True))
    centred = diff - sample.mean(axis=1, keepdims=True)
    expected = np.sqrt(np.einsum("in,ij,jn->n", centred, inverse, centred)).reshape(20, 30)
    got = mahalanobis(before, after, stats.mean, stats.whitener())
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # 3 x 3 mean over valid neighbours
    valid = rng.random((20, 30)) > 0.2
    smooth = box_mean3(got, valid)
    r, c = 7, 11
    window = got[r - 1 : r + 2, c - 1 : c + 2][valid[r - 1 : r + 2, c - 1 : c + 2]]
    assert smooth[r, c] == pytest.approx(float(window.mean()), rel=1e-5)
    corner = got[:2, :2][valid[:2, :2]]
    assert smooth[0, 0] == pytest.approx(float(corner.mean()) if corner.size else 0.0, rel=1e-5)
    unit = distance_to_unit(np.array([0.0, np.sqrt(3.0), 100.0]), 3)
    np.testing.assert_allclose(unit, [0.0, 0.5, 10000.0 / 10003.0], rtol=1e-6)


def test_calibrated_cva_uses_the_unchanged_tiles(crop, tmp_path):
    """Calibrated on unchanged tiles, the map is their Mahalanobis distance (3 x 3 mean) and
    flags about 1 % of those tiles' pixels above their 99th percentile."""
    with ScenePair.open(crop["before"], crop["after"]) as scene:
        tiles = TileLabels(
            row_off=np.array([0, 0, 64, 64]),
            col_off=np.array([0, 64, 0, 64]),
            height=np.full(4, 64),
            width=np.full(4, 64),
            label=np.array([0, 1, 0, 1], dtype=np.int8),
        )
        result = calibrated_cva_scene(scene, tiles, tmp_path / "evidence.tif")
        data = scene.read(scene.grid.full_window())
    assert result["calibration"] == "unchanged-tiles"
    assert result["statistics"]["pixels"] == 2 * 64 * 64
    diff = (data.after - data.before).reshape(data.before.shape[0], -1).astype(np.float64)
    left = np.zeros((128, 128), bool)
    left[:, :64] = True
    sample = diff[:, left.ravel()]
    centred = diff - sample.mean(axis=1, keepdims=True)
    inverse = np.linalg.inv(np.cov(sample, bias=True))
    distance = np.sqrt(np.einsum("in,ij,jn->n", centred, inverse, centred)).reshape(128, 128)
    expected = distance_to_unit(box_mean3(distance.astype(np.float32), data.valid), 6)
    got = _read(tmp_path / "evidence.tif")[0]
    np.testing.assert_allclose(got, expected, atol=2e-3)
    q99 = np.quantile(got[left], 0.99)
    assert (got[left] > q99).mean() == pytest.approx(0.01, abs=0.005)
