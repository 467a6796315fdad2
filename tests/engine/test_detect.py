"""Detection over a whole scene: georeferenced outputs, nodata, polygons, record, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from kdmsi_engine.cli import main
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.detect import detect_scene, make_detector_predictor
from kdmsi_engine.device import CPU_PRECISION_ENV, autocast
from kdmsi_engine.errors import OutputError
from kdmsi_engine.models.deeplab import build_detector
from kdmsi_engine.training.detector import train_detector

HOLE = (slice(40, 140), slice(250, 400))  # rows, cols without data in the before raster


@pytest.fixture(scope="module")
def scene(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The real Taizhou pair; the before date gets a nodata block (synthetic edit)."""
    root = shared_data / "landsat-taizhou-nanjing"
    folder = tmp_path_factory.mktemp("scene")
    before = folder / "before.tif"
    with rasterio.open(root / "A" / "taizhou.tif") as src:
        profile = src.profile.copy()
        data = src.read()
    data[:, HOLE[0], HOLE[1]] = 0
    profile.update(nodata=0)
    with rasterio.open(before, "w", **profile) as dst:
        dst.write(data)
    return {
        "before": before,
        "after": root / "B" / "taizhou.tif",
        "pseudo": root / "label" / "taizhou.tif",
    }


@pytest.fixture(scope="module")
def detector(scene, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "detector.kdmsi"
    train_detector(
        scene["before"], scene["after"], scene["pseudo"], out, backbone="resnet18",
        weights="none", tile_size=32, epochs=1, batch_size=4, max_tiles=4, min_labelled=0.3,
        device="cpu",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def detection(scene, detector, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("detect") / "out"
    record = detect_scene(
        scene["before"], scene["after"], detector, out, tile_size=128, overlap=32, device="cpu",
        threshold=_median_probability(scene, detector),
    )  # fmt: skip
    return out, record


def _median_probability(scene, detector) -> float:
    """A threshold that makes about half of one window change (the model is barely trained)."""
    from rasterio.windows import Window

    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.models.deeplab import load_detector

    net, meta = load_detector(detector)
    with ScenePair.open(scene["before"], scene["after"], bands=meta["bands"]) as pair:
        win = pair.read(Window(0, 200, 128, 128))
    prob = make_detector_predictor(net)(
        torch.from_numpy(win.before[None]), torch.from_numpy(win.after[None])
    )
    return round(float(prob.median()), 6)


def test_outputs_on_the_scene_grid_with_nodata(scene, detection):
    out, _ = detection
    with rasterio.open(scene["after"]) as ref:
        crs, transform, shape = ref.crs, ref.transform, (ref.height, ref.width)
    with rasterio.open(out / "change_probability.tif") as prob_ds:
        assert (prob_ds.crs, prob_ds.transform) == (crs, transform)
        assert prob_ds.shape == shape and prob_ds.dtypes[0] == "float32"
        assert prob_ds.nodata == -1 and prob_ds.profile["tiled"]
        assert prob_ds.compression is not None and prob_ds.overviews(1)
        prob = prob_ds.read(1)
    with rasterio.open(out / "change.tif") as ch_ds:
        assert (ch_ds.crs, ch_ds.transform, ch_ds.shape) == (crs, transform, shape)
        assert ch_ds.dtypes[0] == "uint8" and ch_ds.nodata == 255
        assert ch_ds.overviews(1) and ch_ds.compression is not None
        assert ch_ds.colormap(1)[1][:3] == (230, 25, 25)
        change = ch_ds.read(1)
    assert (prob[HOLE] == -1).all() and (change[HOLE] == 255).all()
    outside = np.ones(shape, bool)
    outside[HOLE] = False
    assert ((prob[outside] >= 0) & (prob[outside] <= 1)).all()
    assert set(np.unique(change[outside])) <= {0, 1}
    threshold = detection[1]["parameters"]["threshold"]
    np.testing.assert_array_equal(change[outside], (prob[outside] > threshold).astype(np.uint8))
    assert 0 < change[outside].mean() < 1


def test_polygons_and_record(detection):
    out, record = detection
    with rasterio.open(out / "change.tif") as ds:
        change_pixels = int((ds.read(1) == 1).sum())
    polygons = gpd.read_file(out / "changes.gpkg", layer="changes")
    assert len(polygons) == record["polygons"]
    assert int(polygons["pixels"].sum()) == change_pixels
    assert len(polygons) > 0
    np.testing.assert_allclose(polygons.area, polygons["pixels"].astype(float) * 900.0)
    assert polygons.crs.to_epsg() == 32651
    threshold = record["parameters"]["threshold"]
    assert (polygons["mean_prob"] > threshold).all() and (polygons["max_prob"] <= 1).all()
    assert (polygons["scene"] == "before").all()
    saved = json.loads((out / "run.json").read_text())
    assert saved["status"] == "complete" and saved["job"] == "detect"
    assert saved["grid"]["crs"] == "EPSG:32651" and saved["grid"]["width"] == 400
    assert saved["parameters"]["tile_size"] == 128 and saved["parameters"]["overlap"] == 32
    for lib in ("torch", "rasterio", "gdal", "kdmsi"):
        assert saved["versions"][lib]
    assert saved["device"].startswith("cpu")
    assert set(saved["timings"]) >= {"predict_s", "vectorize_s", "total_s"}
    assert Path(saved["outputs"]["changes"]) == out / "changes.gpkg"


def test_existing_outputs_are_refused(scene, detector, detection):
    out, _ = detection
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputError):
        detect_scene(scene["before"], scene["after"], detector, out, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    status = main(
        [
            "detect", str(scene["before"]), str(scene["after"]), "--model", str(detector),
            "-o", str(out), "--progress", "none", "--device", "cpu",
        ]
    )  # fmt: skip
    assert status == 2


#: Agreement of two computations of one probability map: fp32 differs only by summation order;
#: under bf16 autocast the backbone carries about three significant digits, and the predictor's
#: channels-last layout rounds differently from the reference's default layout.
PRECISION_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-3}


#: bf16 against fp32 on one real tile, through an ImageNet encoder: the backbone's bf16 rounding
#: (about 3 significant digits per layer) moves a probability by at most a few hundredths and by
#: well under one hundredth on average (measured: max 0.034, mean 0.0065); the last layers and
#: the softmax run in float32, so nothing is rounded below that.
BF16_MAX_DIFFERENCE = 0.06
BF16_MEAN_DIFFERENCE = 0.015


def test_bf16_and_fp32_probabilities_agree_on_a_real_tile(repo_root, monkeypatch):
    sample = repo_root / "resources" / "sample"
    with ScenePair.open(sample / "taizhou_2000.tif", sample / "taizhou_2003.tif") as scene:
        tile = scene.read(Window(96, 96, 128, 128))
    before = torch.from_numpy(np.ascontiguousarray(tile.before))[None].float()
    after = torch.from_numpy(np.ascontiguousarray(tile.after))[None].float()
    torch.manual_seed(0)
    net = build_detector("efficientnet-lite0", in_channels=before.shape[1], weights="imagenet")
    predict = make_detector_predictor(net.eval(), flip=True)
    maps = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setenv(CPU_PRECISION_ENV, precision)
        maps[precision] = predict(before, after)
        assert maps[precision].dtype == torch.float32
    difference = (maps["fp32"] - maps["bf16"]).abs()
    assert float(difference.max()) < BF16_MAX_DIFFERENCE
    assert float(difference.mean()) < BF16_MEAN_DIFFERENCE
    # the two really are different computations (else this test would prove nothing)
    assert float(difference.max()) > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_test_time_augmentation_is_the_mean_of_the_variants(precision, monkeypatch):
    monkeypatch.setenv(CPU_PRECISION_ENV, precision)
    torch.manual_seed(0)
    net = build_detector("resnet18", in_channels=3, weights="none").eval()
    b, a = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    tolerance = PRECISION_TOLERANCE[precision]

    def soft(x, y):
        with torch.no_grad(), autocast(torch.device("cpu")):
            return torch.softmax(net(x, y).float(), 1)[:, 1]

    plain = make_detector_predictor(net)(b, a)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, soft(b, a), atol=tolerance, rtol=0)
    flipped = make_detector_predictor(net, flip=True)(b, a)
    expected = (soft(b, a) + soft(b.flip(-1), a.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(flipped, expected, atol=tolerance, rtol=0)
    multi = make_detector_predictor(net, scales=(0.5, 1.0), flip=True)(b, a)
    assert multi.shape == (1, 64, 64) and 0 <= float(multi.min()) <= float(multi.max()) <= 1
