"""'Export detector to ONNX (Deepness)': the command it builds, and a real run in headless QGIS
on a detector trained by the plugin on the real Taizhou pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qgis_env import run_algorithm as run

TINY = {"BACKBONE": 1, "WEIGHTS": 1, "EPOCHS": 1, "BATCH_SIZE": 4, "DEVICE": "cpu"}


def _build(parameters: dict):
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

    from kdmsi_qgis.algorithms.export import ExportDetectorAlgorithm

    algorithm = ExportDetectorAlgorithm()
    algorithm.initAlgorithm()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return algorithm.build_call(parameters, context, QgsProcessingFeedback())


def _parsed(call):
    from kdmsi_engine.cli import build_parser
    from kdmsi_qgis import worker

    argv = worker.engine_command(
        call.command, call.arguments, device=call.device, overwrite=True, python="python"
    )
    return build_parser().parse_args(argv[3:])


def test_the_command_with_and_without_the_vrt(plugin, taizhou, tmp_path) -> None:
    model = str(Path(taizhou["label"]))  # any existing file: nothing runs
    onnx_path, vrt = str(tmp_path / "d.onnx"), str(tmp_path / "s.vrt")
    call = _build({"MODEL": model, "OUTPUT": onnx_path})
    args = _parsed(call)
    assert (args.command, args.model, args.output) == ("export", model, onnx_path)
    assert (args.vrt, args.tile_size, args.opset, args.overwrite) == (None, None, 18, True)
    assert call.device is None and call.outputs == {"OUTPUT": onnx_path}
    call = _build(
        {
            "MODEL": model,
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "TILE_SIZE": 128,
            "OPSET": 20,
            "OUTPUT": onnx_path,
            "VRT": vrt,
        }
    )
    args = _parsed(call)
    assert args.vrt == [taizhou["before"], taizhou["after"], vrt]
    assert (args.tile_size, args.opset) == (128, 20)
    assert call.outputs == {"OUTPUT": onnx_path, "VRT": vrt}


def test_half_a_vrt_request_is_refused(plugin, taizhou, tmp_path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="before image, the after image and the VRT"):
        _build(
            {
                "MODEL": taizhou["label"],
                "BEFORE": taizhou["before"],
                "OUTPUT": str(tmp_path / "d.onnx"),
            }
        )


@pytest.mark.slow
def test_export_runs_in_qgis_and_the_vrt_loads(plugin, taizhou, tmp_path) -> None:
    """Train a tiny detector with the plugin, export it with the VRT, read both back."""
    import onnx
    from qgis.core import QgsRasterLayer

    detector = run(
        "traindetector",
        {
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "PSEUDO": taizhou["label"],  # the real sparse reference as pseudo labels
            **TINY,
            "TILE_SIZE": 32,  # the reference is sparse: only 32 px tiles are labelled enough
            "OUTPUT": str(tmp_path / "detector.kdmsi"),
        },
    )["OUTPUT"]
    result = run(
        "exportdetector",
        {
            "MODEL": detector,
            "BEFORE": taizhou["before"],
            "AFTER": taizhou["after"],
            "TILE_SIZE": 64,
            "OUTPUT": str(tmp_path / "detector.onnx"),
            "VRT": str(tmp_path / "stack.vrt"),
        },
    )
    assert 0.0 <= result["MAX_DIFFERENCE"] <= 1e-4
    model = onnx.load(result["OUTPUT"])
    metadata = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert metadata["model_type"] == "Segmentor"
    assert metadata["resolution"] == pytest.approx(3000.0)
    layer = QgsRasterLayer(result["VRT"], "stack", "gdal")
    assert layer.isValid() and layer.bandCount() == 12
    assert layer.crs().authid() == "EPSG:32651"


def test_a_kdmsi_model_is_a_processing_error(plugin, taizhou, tmp_path) -> None:
    from qgis.core import QgsProcessingException

    student = tmp_path / "student.kdmsi"
    from kdmsi_engine.modelfile import save_model

    save_model(student, {"kind": "kdmsi"}, {"student": {}})
    with pytest.raises(QgsProcessingException, match="needs a 'detector' model"):
        run("exportdetector", {"MODEL": str(student), "OUTPUT": str(tmp_path / "x.onnx")})
    assert not (tmp_path / "x.onnx").exists()
