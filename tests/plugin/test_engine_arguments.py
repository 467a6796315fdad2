"""Every Processing algorithm builds an engine command that the engine's own parser accepts.

Fast (nothing runs): each algorithm's ``build_call`` is given real inputs and its default
parameters, and the argument list the worker would start is parsed by ``kdmsi_engine.cli``. A
flag renamed in the engine, or a value the engine would refuse to parse, fails here, not on a
user's canvas.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

#: Destination parameters by type: the file name each gets in the test folder.
DESTINATION_NAMES = {
    "rasterDestination": "out.tif",
    "vectorDestination": "out.gpkg",
    "folderDestination": "outdir",
}


def _parameters(algorithm, sample: Path, tmp_path: Path) -> dict[str, object]:
    """Real inputs for every input parameter, a fresh path for every output, defaults else."""
    before = str(sample / "taizhou_2000.tif")
    after = str(sample / "taizhou_2003.tif")
    truth = str(sample / "taizhou_truth.tif")
    labels = str(sample / "taizhou_labels.gpkg")
    values: dict[str, object] = {}
    for definition in algorithm.parameterDefinitions():
        name, kind = definition.name(), definition.type()
        if definition.isDestination():
            if kind == "fileDestination":
                extension = ".json" if "json" in definition.fileFilter().lower() else ".kdmsi"
                values[name] = str(tmp_path / f"{name.lower()}{extension}")
            else:
                values[name] = str(tmp_path / f"{name.lower()}_{DESTINATION_NAMES[kind]}")
        elif kind == "raster":
            values[name] = {"BEFORE": before, "AFTER": after}.get(name, truth)
        elif kind == "vector":
            values[name] = labels
        elif kind == "file":
            values[name] = truth  # any existing file: the parser does not open it
    return values


def _algorithms():
    from kdmsi_qgis.algorithms import ALGORITHM_CLASSES

    return ALGORITHM_CLASSES


@pytest.mark.parametrize("index", range(12))
def test_engine_parses_every_algorithms_command(index, plugin, repo_root, tmp_path) -> None:
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

    from kdmsi_engine.cli import build_parser
    from kdmsi_qgis import worker

    classes = _algorithms()
    assert len(classes) == 12, "update the parametrization to the number of algorithms"
    algorithm = classes[index]()
    algorithm.initAlgorithm()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    # a copy: QGIS may write .aux.xml statistics beside the rasters it opens
    sample = tmp_path / "sample"
    shutil.copytree(repo_root / "resources" / "sample", sample)
    parameters = _parameters(algorithm, sample, tmp_path)
    call = algorithm.build_call(parameters, context, QgsProcessingFeedback())
    argv = worker.engine_command(
        call.command, call.arguments, device=call.device, overwrite=True, python="python"
    )
    assert argv[1:3] == ["-m", "kdmsi_engine"]
    try:
        parsed = build_parser().parse_args(argv[3:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{algorithm.name()}: the engine refuses {argv[3:]} (exit {exc.code})")
    assert parsed.command == call.command
    # every path the algorithm reports as an output is one the command writes (except the
    # metrics file of 'evaluate', which the plugin writes from the JSON the engine prints)
    if call.command != "evaluate":
        for path in call.outputs.values():
            assert str(path) in call.arguments, (algorithm.name(), path)
