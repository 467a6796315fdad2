"""The "Tiles to label next" algorithm: its engine command parses with the engine's parser, and
it runs through real QGIS headless on a real preview."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdmsi_engine import defaults

TILE = 64


def _call(parameters: dict[str, object]):
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

    from kdmsi_engine.cli import build_parser
    from kdmsi_qgis import worker
    from kdmsi_qgis.algorithms.suggest import SuggestTilesAlgorithm

    algorithm = SuggestTilesAlgorithm()
    algorithm.initAlgorithm()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = QgsProcessingFeedback()
    algorithm.prepareAlgorithm(parameters, context, feedback)
    call = algorithm.build_call(parameters, context, feedback)
    argv = worker.engine_command(
        call.command, call.arguments, device=call.device, overwrite=True, python="python"
    )
    try:
        parsed = build_parser().parse_args(argv[3:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"the engine refuses {argv[3:]} (exit {exc.code})")
    return call, parsed


@pytest.fixture(scope="module")
def preview(taizhou, tmp_path_factory) -> str:
    """The quick change preview of the real Taizhou crop (the engine's own job)."""
    from kdmsi_engine.cva import cva_scene

    path = tmp_path_factory.mktemp("preview") / "cva.tif"
    cva_scene(taizhou["before"], taizhou["after"], path)
    return str(path)


def test_command_without_labels_takes_the_engine_defaults(plugin, preview, tmp_path) -> None:
    out = str(tmp_path / "next.gpkg")
    call, parsed = _call({"PROBABILITY": preview, "OUTPUT": out})
    assert call.command == parsed.command == "suggest"
    assert parsed.probability == preview and parsed.output == out
    assert parsed.labels is None and parsed.tile_size is None
    assert parsed.count == defaults.SUGGEST_COUNT
    assert parsed.threshold == defaults.SUGGEST_THRESHOLD
    assert parsed.min_gap == defaults.SUGGEST_MIN_GAP
    assert call.outputs == {"OUTPUT": out}


def test_command_with_labels_and_options(plugin, preview, weak_labels, tmp_path) -> None:
    out = str(tmp_path / "next.gpkg")
    call, parsed = _call(
        {
            "PROBABILITY": preview,
            "LABELS": weak_labels["file"],
            "LABEL_FIELD": "change",
            "COUNT": 3,
            "TILE_SIZE": TILE,
            "THRESHOLD": "0.25",
            "MIN_GAP": 0,
            "OUTPUT": out,
        }
    )
    assert Path(parsed.labels) == Path(weak_labels["file"]) and parsed.label_field == "change"
    assert (parsed.count, parsed.tile_size, parsed.min_gap) == (3, TILE, 0.0)
    assert float(parsed.threshold) == 0.25


def test_runs_in_qgis_and_suggests_only_unlabelled_tiles(
    plugin, preview, taizhou, grid_gpkg, tmp_path
) -> None:
    import geopandas as gpd
    from qgis_env import run_algorithm

    # the analyst has marked three tiles of the labelling grid so far
    grid = gpd.read_file(grid_gpkg)
    marked = {int(grid["tile_id"].iloc[0]): 1, int(grid["tile_id"].iloc[4]): 0}
    marked[int(grid["tile_id"].iloc[-1])] = 0
    grid["change"] = [marked.get(int(t)) for t in grid["tile_id"]]
    labels = str(tmp_path / "labels.gpkg")
    grid.to_file(labels, driver="GPKG", layer="tiles")
    out = str(tmp_path / "next.gpkg")
    result = run_algorithm(
        "suggesttiles",
        {"PROBABILITY": preview, "LABELS": labels, "COUNT": 20, "MIN_GAP": 0, "OUTPUT": out},
    )
    frame = gpd.read_file(result["OUTPUT"], layer="suggestions")
    # the tile size comes from the grid; every unlabelled tile, ranked
    assert sorted(frame["tile_id"]) == sorted(set(grid["tile_id"]) - set(marked))
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    assert frame["uncertainty"].is_monotonic_decreasing


def test_engine_refusal_reaches_processing(plugin, preview, weak_labels, tmp_path) -> None:
    from qgis.core import QgsProcessingException
    from qgis_env import run_algorithm

    out = tmp_path / "next.gpkg"
    with pytest.raises(QgsProcessingException, match="nothing left to suggest"):
        run_algorithm(
            "suggesttiles",
            {
                "PROBABILITY": preview,
                "LABELS": weak_labels["memory"],
                "TILE_SIZE": TILE,
                "OUTPUT": str(out),
            },
        )
    assert not out.exists()
