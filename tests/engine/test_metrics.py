"""Metrics against hand-computed confusion counts; raster evaluation; reprojected truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from kdmsi_engine.cli import main
from kdmsi_engine.errors import InputError, RasterError
from kdmsi_engine.metrics import (
    Confusion,
    confusion,
    evaluate_rasters,
    metrics_from_confusion,
    sweep_confusions,
)


def _write(path, data, *, crs=CRS.from_epsg(32651), transform=None, nodata=None):
    transform = transform or Affine(30, 0, 500000, 0, -30, 3500000)
    profile = dict(
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=str(data.dtype),
        crs=crs,
        transform=transform,
        nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def test_confusion_hand_counts():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], bool)
    truth = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    c = confusion(pred, truth, valid)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 3)


def test_metrics_formulas():
    m = metrics_from_confusion(Confusion(tp=30, fp=10, fn=20, tn=940))
    assert m["oa"] == pytest.approx(970 / 1000)
    assert m["precision"] == pytest.approx(30 / 40)
    assert m["recall"] == pytest.approx(30 / 50)
    assert m["f1"] == pytest.approx(60 / 90)
    assert m["iou"] == pytest.approx(30 / 60)
    assert m["nochange_iou"] == pytest.approx(940 / 970)
    assert m["miou"] == pytest.approx((30 / 60 + 940 / 970) / 2)
    assert m["mean_f1"] == pytest.approx((60 / 90 + 1880 / 1910) / 2)
    assert m["fp_share"] == pytest.approx(10 / 60)
    assert m["fn_share"] == pytest.approx(20 / 60)
    assert m["iou"] + m["fp_share"] + m["fn_share"] == pytest.approx(1.0)
    empty = metrics_from_confusion(Confusion())
    assert empty["iou"] == 0.0 and empty["oa"] == 0.0


def test_sweep_matches_direct_thresholding():
    rng = np.random.default_rng(0)
    prob = rng.random((50, 60)).astype(np.float32)
    prob[0, :5] = [0.05, 0.1, 0.5, 0.95, 0.3]  # values exactly on thresholds: strict '>'
    truth = rng.random((50, 60)) > 0.7
    valid = rng.random((50, 60)) > 0.1
    ts = [0.05, 0.1, 0.3, 0.5, 0.95]
    for t, c in zip(ts, sweep_confusions(prob, truth, valid, ts)):
        assert c == confusion(prob > t, truth, valid)


def test_evaluate_probability_and_classes(tmp_path):
    prob = np.array([[0.9, 0.6, 0.2], [0.4, -1.0, 0.7], [0.1, 0.55, 0.0]], np.float32)
    truth = np.array([[1, 0, 1], [0, 1, 1], [255, 1, 0]], np.uint8)  # 0/1 with nodata 255
    p = _write(tmp_path / "p.tif", prob, nodata=-1.0)
    t = _write(tmp_path / "t.tif", truth, nodata=255)
    r = evaluate_rasters(p, t, threshold=0.5)
    # valid: all but prob nodata (1,1) and truth nodata (2,0) -> 7 pixels
    # pred>0.5: (0,0)T (0,1)F (1,2)T (2,1)T ; truth change: (0,0),(0,2),(1,2),(2,1)
    assert r["counts"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 2}
    assert r["iou"] == pytest.approx(3 / 5)
    assert r["truth_reprojected"] is False
    r2 = evaluate_rasters(p, t, sweep=True)
    assert len(r2["sweep"]) == 19
    best = max(r2["sweep"], key=lambda x: x["iou"])
    assert r2["best"]["iou"] == best["iou"]
    # uint8 class raster (1 change, 255 nodata)
    cls = np.array([[1, 1, 0], [0, 255, 1], [0, 1, 0]], np.uint8)
    c = _write(tmp_path / "c.tif", cls, nodata=255)
    r3 = evaluate_rasters(c, t)
    assert r3["counts"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 2}
    assert r3["pred_kind"] == "classes"
    with pytest.raises(InputError):
        evaluate_rasters(c, t, threshold=0.5)
    # truth as a 0/255 mask without nodata: 255 is change
    t255 = _write(tmp_path / "t255.tif", np.where(truth == 1, 255, 0).astype(np.uint8))
    r4 = evaluate_rasters(p, t255, threshold=0.5)
    assert r4["counts"]["tp"] + r4["counts"]["fn"] == 4
    assert r4["pixels"] == 8


def test_truth_on_other_grid_is_reprojected(shared_data, tmp_path):
    """OSCD truth (EPSG:4326) warped onto a UTM copy of itself gives near-perfect scores."""
    truth_path = shared_data / "oscd" / "label" / "paris.tif"
    from rasterio.vrt import WarpedVRT

    with rasterio.open(truth_path) as src, WarpedVRT(src, crs=CRS.from_epsg(32631)) as vrt:
        utm = vrt.read(1).astype(np.float32)
        valid = vrt.read_masks(1) > 0
        utm[~valid] = -1.0
        pred = _write(tmp_path / "pred.tif", utm, crs=vrt.crs, transform=vrt.transform, nodata=-1.0)
        n_change = int(src.read(1).sum())
    assert n_change > 100
    r = evaluate_rasters(pred, truth_path, threshold=0.5)
    assert r["truth_reprojected"] is True
    assert r["iou"] > 0.95
    assert r["counts"]["tp"] == pytest.approx(n_change, rel=0.1)


def test_evaluate_cli_json_and_errors(tmp_path, capsys):
    prob = np.array([[0.9, 0.2], [0.7, 0.1]], np.float32)
    p = _write(tmp_path / "p.tif", prob, nodata=-1.0)
    t = _write(tmp_path / "t.tif", np.array([[1, 0], [0, 0]], np.uint8))
    assert main(["evaluate", str(p), str(t), "--threshold", "0.5", "--progress", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"tp": 1, "fp": 1, "fn": 0, "tn": 2}
    assert main(["evaluate", str(p), str(t), "--threshold", "1.5", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threshold" in err[0]
    assert main(["evaluate", str(tmp_path / "no.tif"), str(t), "--progress", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(RasterError):
        evaluate_rasters(p, tmp_path / "missing.tif")
    other = _write(tmp_path / "o.tif", np.zeros((3, 3), np.uint8), crs=None)
    nogeo = _write(tmp_path / "g.tif", prob, crs=None, nodata=-1.0)
    with pytest.raises(RasterError):
        evaluate_rasters(nogeo, other)
