"""Scene inference on real pairs: stand-in predictor end to end, a real model file, errors."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from kdmsi_engine.cli import main
from kdmsi_engine.data.scaling import BandScaling
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.errors import ModelFileError, OutputError, RasterError
from kdmsi_engine.inference.maps import student_map
from kdmsi_engine.inference.scene import infer_scene
from kdmsi_engine.inference.sliding import predict_scene
from kdmsi_engine.modelfile import save_model
from kdmsi_engine.models.kdmsi import MODEL_KIND, architecture, build_kdmsi_models
from kdmsi_engine.rasterio_out import PROB_NODATA


def _absdiff(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (after - before).abs().mean(dim=1).clamp(0, 1)


def test_oscd_city_end_to_end_matches_direct_computation(shared_data, tmp_path):
    """OSCD (EPSG:4326, warped to UTM by the data layer): streamed output == direct map."""
    a = shared_data / "oscd" / "A" / "paris.tif"
    b = shared_data / "oscd" / "B" / "paris.tif"
    with ScenePair.open(a, b) as scene:
        out = predict_scene(scene, _absdiff, tmp_path / "p.tif", tile_size=128, overlap=32)
        grid = scene.grid
        whole = scene.read(Window(0, 0, grid.width, grid.height))
    expected = np.abs(whole.after - whole.before).mean(axis=0)
    expected[~whole.valid] = PROB_NODATA
    with rasterio.open(out) as src:
        assert src.crs == grid.crs and src.crs.is_projected  # UTM, not EPSG:4326
        assert src.transform.almost_equals(grid.transform)
        assert (src.width, src.height) == (grid.width, grid.height)
        data = src.read(1)
        assert src.tags()["KDMSI_TILE_SIZE"] == "128"
    assert (~whole.valid).any()  # the warped OSCD scene has nodata corners
    np.testing.assert_allclose(data, expected, atol=1e-5)
    assert expected[whole.valid].std() > 0.01


def _model(path, *, in_channels=3, bands=(1, 2, 3), tile_size=64):
    arch = architecture("resnet18", in_channels)
    torch.manual_seed(0)
    teacher, student = build_kdmsi_models(arch)
    meta = {
        "kind": MODEL_KIND,
        "architecture": arch,
        "bands": list(bands),
        "num_bands": in_channels,
        "scaling": BandScaling.uint8(in_channels).to_dict(),
        "tile_size": tile_size,
    }
    tensors = {"teacher": teacher.state_dict(), "student": student.state_dict()}
    return save_model(path, meta, tensors), student


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A random-weight resnet18 KD-MSI model file on bands 1,2,3 (uint8 scaling, 64 px)."""
    return _model(tmp_path_factory.mktemp("model") / "m.kdmsi")


def test_infer_scene_with_model_file_equals_student_map(shared_data, tmp_path, rgb_model):
    """One window over the whole Landsat pair: the raster is the student's map, exactly."""
    base = shared_data / "landsat-taizhou-nanjing"
    a, b = base / "A" / "taizhou.tif", base / "B" / "taizhou.tif"
    model, student = rgb_model
    out = tmp_path / "prob.tif"
    result = infer_scene(
        a, b, model, out, method="student", tile_size=400, overlap=0, batch_size=1, device="cpu"
    )
    assert result["output"] == str(out) and result["tile_size"] == 400
    with ScenePair.open(a, b, bands=(1, 2, 3), scaling=BandScaling.uint8(3)) as scene:
        w = scene.read(Window(0, 0, 400, 400))
    student.eval()
    with torch.no_grad():
        direct = student_map(
            student, torch.from_numpy(w.before)[None], torch.from_numpy(w.after)[None]
        )
    with rasterio.open(out) as src:
        data = src.read(1)
        assert src.tags()["KDMSI_METHOD"] == "student"
    np.testing.assert_allclose(data, direct[0].numpy(), atol=2e-3)
    assert data.std() > 1e-4


def test_infer_cli_msi_and_errors(shared_data, tmp_path, capsys, rgb_model):
    base = shared_data / "landsat-taizhou-nanjing"
    a, b = base / "A" / "taizhou.tif", base / "B" / "taizhou.tif"
    model, _ = rgb_model
    out = tmp_path / "msi.tif"
    args = ["infer", str(a), str(b), "--model", str(model), "-o", str(out), "--progress", "none"]
    code = main([*args, "--scales", "0.5", "--tile-size", "256", "--device", "cpu"])
    assert code == 0
    with rasterio.open(out) as src:
        data = src.read(1)
        assert src.tags()["KDMSI_SCALES"] == "0.5"
    assert data.min() >= 0.0 and data.max() <= 1.0
    capsys.readouterr()
    # exists without --overwrite
    assert main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    # wrong band count: a 6-band model on the 3-band RGB raster
    six, _ = _model(tmp_path / "six.kdmsi", in_channels=6, bands=(1, 2, 3, 4, 5, 6))
    rgb = shared_data / "rasterio-rgb-byte" / "RGB.byte.tif"
    bad_out = tmp_path / "bad.tif"
    with pytest.raises(ModelFileError):
        infer_scene(rgb, rgb, six, bad_out, device="cpu")
    with pytest.raises(RasterError):
        infer_scene(tmp_path / "none.tif", b, model, bad_out, device="cpu")
    with pytest.raises(OutputError):
        infer_scene(a, b, model, out, device="cpu")
    assert (
        main(
            [
                "infer",
                str(a),
                str(b),
                "--model",
                str(tmp_path / "x.kdmsi"),
                "-o",
                str(bad_out),
                "--progress",
                "none",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not bad_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msi.tif", "six.kdmsi"]
