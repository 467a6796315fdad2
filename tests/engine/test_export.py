"""``kdmsi export``: the detector as an ONNX model for Deepness and onnxruntime.

A tiny detector is trained on the real Taizhou pair and exported with the stacked VRT; the ONNX
model, fed a real tile of that VRT the way Deepness feeds it (raw values / 255, then the
model's standardisation), gives the torch detector's probabilities within :data:`TOLERANCE`.
A second detector with the percentile scaling of a real uint16 Sentinel-2 pair checks the
scaling's clip in the graph. Bad inputs write nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import rasterio
import torch
from rasterio.windows import Window
from reliability_helpers import make_detector_model, make_kdmsi_model, scene_scaling

from kdmsi_engine.cli import main
from kdmsi_engine.data.scaling import BandScaling
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.errors import InputError, RasterError
from kdmsi_engine.export import export_detector, write_stack_vrt
from kdmsi_engine.modelfile import load_model, save_model
from kdmsi_engine.models.deeplab import change_probability, load_detector
from kdmsi_engine.training.detector import train_detector

#: Largest |probability| difference accepted between onnxruntime and torch (float32, no
#: autocast) on a real tile; measured about 1e-7 (README).
TOLERANCE = 1e-4
TILE = 64
WINDOW = Window(150, 200, TILE, TILE)  # col, row: a part of the pair with changes


@pytest.fixture(scope="module")
def taizhou(shared_data: Path) -> dict[str, Path]:
    root = shared_data / "landsat-taizhou-nanjing"
    return {
        "before": root / "A" / "taizhou.tif",
        "after": root / "B" / "taizhou.tif",
        "pseudo": root / "label" / "taizhou.tif",
    }


@pytest.fixture(scope="module")
def detector(taizhou, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detector") / "detector.kdmsi"
    train_detector(
        taizhou["before"], taizhou["after"], taizhou["pseudo"], out, backbone="resnet18",
        weights="none", tile_size=32, epochs=1, batch_size=4, max_tiles=4, min_labelled=0.3,
        device="cpu",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exported(taizhou, detector, tmp_path_factory) -> dict[str, Path]:
    """``kdmsi export`` through the command line, with the stacked VRT."""
    folder = tmp_path_factory.mktemp("export")
    onnx_path, vrt = folder / "detector.onnx", folder / "stack.vrt"
    argv = ["export", str(detector), "-o", str(onnx_path), "--tile-size", str(TILE)]
    argv += ["--vrt", str(taizhou["before"]), str(taizhou["after"]), str(vrt)]
    assert main([*argv, "--progress", "none"]) == 0
    return {"onnx": onnx_path, "vrt": vrt}


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _metadata(session: onnxruntime.InferenceSession) -> dict[str, object]:
    """The metadata as Deepness reads it: each value JSON-decoded."""
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}


def _as_deepness_feeds_it(tile_hwc: np.ndarray, metadata: dict) -> np.ndarray:
    """Deepness's preprocessing of an (H, W, C) tile of raw band values: divide by 255, then
    (x - standardization_mean) / standardization_std, then NCHW."""
    x = np.float32(tile_hwc[None] * 1.0 / 255.0)
    mean = np.array(metadata["standardization_mean"], dtype=np.float32)
    std = np.array(metadata["standardization_std"], dtype=np.float32)
    return np.transpose((x - mean) / std, (0, 3, 1, 2))


def _torch_probabilities(net, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(2, H, W): the torch detector's probabilities of unchanged and changed (float32)."""
    with torch.no_grad():
        change = change_probability(
            net, torch.from_numpy(before[None]), torch.from_numpy(after[None])
        )
    change = change[0].numpy()
    return np.stack([1.0 - change, change])


@pytest.mark.slow
def test_onnx_in_deepness_matches_torch_on_a_real_tile(taizhou, detector, exported) -> None:
    session = _session(exported["onnx"])
    metadata = _metadata(session)
    with rasterio.open(exported["vrt"]) as stack:
        raw = stack.read(window=WINDOW)  # (12, H, W): before bands 1-6, then after bands 1-6
    (onnx_out,) = session.run(
        None, {"input": _as_deepness_feeds_it(raw.transpose(1, 2, 0), metadata)}
    )
    (raw_out,) = session.run(None, {"input": raw[None].astype(np.float32)})
    net, meta = load_detector(detector)
    with ScenePair.open(
        taizhou["before"], taizhou["after"], bands=meta["bands"], scaling=meta["scaling"]
    ) as scene:
        window = scene.read(WINDOW)
    assert window.valid.all()  # the engine masks nothing here, so both see the same pixels
    expected = _torch_probabilities(net, window.before, window.after)
    difference = float(np.abs(onnx_out[0] - expected).max())
    print(f"max |onnxruntime (Deepness input) - torch| probability: {difference:.3g}")
    assert onnx_out.shape == (1, 2, TILE, TILE)
    assert difference <= TOLERANCE
    assert float(np.abs(raw_out[0] - expected).max()) <= TOLERANCE  # onnxruntime users: raw in
    assert np.allclose(onnx_out.sum(axis=1), 1.0, atol=1e-5)
    # a trained (if tiny) model: the probabilities vary over the tile, so the check has teeth
    assert float(expected[1].std()) > 1e-3


def test_the_metadata_deepness_reads(taizhou, exported) -> None:
    session = _session(exported["onnx"])
    metadata = _metadata(session)
    assert metadata["model_type"] == "Segmentor"
    assert metadata["class_names"] == {"0": "unchanged", "1": "changed"}
    assert metadata["resolution"] == pytest.approx(3000.0)  # 30 m Landsat, in cm per pixel
    assert metadata["tile_size"] == metadata["tiles_size"] == TILE
    assert metadata["tiles_overlap"] == 25
    assert metadata["seg_thresh"] == 0.5
    assert metadata["standardization_mean"] == [0.0] * 12
    assert metadata["standardization_std"] == pytest.approx([1 / 255] * 12)
    assert metadata["kdmsi_bands"][:2] == ["before band 1", "before band 2"]
    assert metadata["kdmsi_bands"][6] == "after band 1"
    assert metadata["kdmsi_scaling"]["method"] == "uint8"
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "probabilities")
    assert inp.shape[1:] == [12, TILE, TILE] and out.shape[1:] == [2, TILE, TILE]
    assert isinstance(inp.shape[0], str)  # any batch size
    # Deepness's checks: one input; output (B, C, H, W) with H == W
    assert len(out.shape) == 4 and out.shape[2] == out.shape[3]


def test_the_vrt_stacks_before_then_after_on_the_scene_grid(taizhou, exported) -> None:
    with rasterio.open(exported["vrt"]) as stack, rasterio.open(taizhou["before"]) as b:
        with rasterio.open(taizhou["after"]) as a:
            assert stack.count == 12
            assert stack.crs == b.crs and stack.transform == b.transform
            assert stack.descriptions[0] == "before band 1"
            assert stack.descriptions[11] == "after band 6"
            assert np.array_equal(stack.read(range(1, 7), window=WINDOW), b.read(window=WINDOW))
            assert np.array_equal(stack.read(range(7, 13), window=WINDOW), a.read(window=WINDOW))


@pytest.mark.slow
def test_percentile_scaling_is_clipped_in_the_graph(shared_data, tmp_path) -> None:
    """uint16 Sentinel-2: the 2-98 % scaling clips values; the graph must clip them too."""
    before = shared_data / "oscd" / "A" / "aguasclaras.tif"
    after = shared_data / "oscd" / "B" / "aguasclaras.tif"
    scaling = scene_scaling(before, after, bands=(1, 2, 3, 4))
    assert scaling["method"] == "percentile-2-98"
    model = make_detector_model(
        tmp_path / "s2.kdmsi", scaling, bands=(1, 2, 3, 4), backbone="resnet18"
    )
    result = export_detector(model, tmp_path / "s2.onnx", tile_size=TILE)
    assert result["verified_max_abs_diff"] <= TOLERANCE
    assert result["resolution_cm"] is None  # no training grid in this model file
    session = _session(tmp_path / "s2.onnx")
    assert "resolution" not in _metadata(session)
    window = Window(200, 200, TILE, TILE)
    with rasterio.open(before) as b, rasterio.open(after) as a:
        raw_b, raw_a = b.read(window=window), a.read(window=window)
    band_scaling = BandScaling.from_dict(scaling)
    low = np.array(band_scaling.low)[:, None, None]
    high = np.array(band_scaling.high)[:, None, None]
    assert ((raw_b < low) | (raw_b > high)).any()  # the clip matters on this tile
    stacked = np.concatenate([raw_b, raw_a])[None].astype(np.float32)
    (onnx_out,) = session.run(None, {"input": stacked})
    net, _meta = load_detector(model)
    expected = _torch_probabilities(net, band_scaling.apply(raw_b), band_scaling.apply(raw_a))
    difference = float(np.abs(onnx_out[0] - expected).max())
    print(f"max |onnxruntime - torch| probability, uint16 percentile scaling: {difference:.3g}")
    assert difference <= TOLERANCE


@pytest.mark.slow
def test_a_multi_scene_detector_takes_the_scaling_of_the_given_pair(
    taizhou, detector, tmp_path
) -> None:
    loaded = load_model(detector)
    multi = save_model(
        tmp_path / "multi.kdmsi", {**loaded.metadata, "scaling": None}, loaded.tensors
    )
    with pytest.raises(InputError, match="several scenes.*VRT"):
        export_detector(multi, tmp_path / "multi.onnx", tile_size=TILE)
    assert not (tmp_path / "multi.onnx").exists()
    result = export_detector(
        multi, tmp_path / "multi.onnx", tile_size=TILE,
        vrt=(taizhou["before"], taizhou["after"], tmp_path / "multi.vrt"),
    )  # fmt: skip
    assert result["scaling"].startswith("scene taizhou.tif")
    assert result["probe"] == "centre of the VRT"
    assert result["verified_max_abs_diff"] <= TOLERANCE


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--progress", "none"])
    return code, capsys.readouterr().err


def test_a_kdmsi_student_model_is_refused_and_nothing_written(taizhou, tmp_path, capsys) -> None:
    scaling = BandScaling.uint8(6).to_dict()
    student = make_kdmsi_model(
        tmp_path / "student.kdmsi", scaling, bands=tuple(range(1, 7)), backbone="resnet18"
    )
    out, vrt = tmp_path / "x.onnx", tmp_path / "x.vrt"
    code, err = _cli(
        capsys, "export", str(student), "-o", str(out),
        "--vrt", str(taizhou["before"]), str(taizhou["after"]), str(vrt),
    )  # fmt: skip
    assert code == 2
    assert "needs a 'detector' model" in err and "kdmsi train-detector" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.kdmsi"]


def test_an_existing_output_is_kept_without_overwrite(taizhou, detector, tmp_path, capsys) -> None:
    out, vrt = tmp_path / "x.onnx", tmp_path / "x.vrt"
    out.write_text("mine")
    code, err = _cli(
        capsys, "export", str(detector), "-o", str(out),
        "--vrt", str(taizhou["before"]), str(taizhou["after"]), str(vrt),
    )  # fmt: skip
    assert code == 2 and "already exists" in err and "[--overwrite]" in err
    assert out.read_text() == "mine" and not vrt.exists()


def test_bad_options_write_nothing(detector, tmp_path, capsys) -> None:
    out = tmp_path / "x.onnx"
    code, err = _cli(capsys, "export", str(detector), "-o", str(out), "--opset", "13")
    assert code == 2 and "opset 13 is too old" in err
    code, err = _cli(capsys, "export", str(detector), "-o", str(out), "--tile-size", "100")
    assert code == 2 and "multiple of 16" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_export_packages_name_the_install_command(
    detector, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now fails
    out = tmp_path / "x.onnx"
    code, err = _cli(capsys, "export", str(detector), "-o", str(out))
    assert code == 2
    assert "needs the Python package(s) onnxscript" in err and "-m pip install onnxscript" in err
    assert not out.exists()


def test_a_pair_off_the_grid_gets_the_warp_command(shared_data, tmp_path) -> None:
    """A geographic pair works on a UTM grid in the engine; a VRT cannot warp, so it says how."""
    oscd = shared_data / "oscd"
    with pytest.raises(RasterError, match="gdalwarp -r bilinear -t_srs EPSG:327"):
        write_stack_vrt(
            oscd / "A" / "aguasclaras.tif",
            oscd / "B" / "aguasclaras.tif",
            tmp_path / "s.vrt",
            bands=[1, 2, 3],
        )
    assert not (tmp_path / "s.vrt").exists()
