"""``kdmsi grid`` and ``kdmsi labels`` end to end, in process and as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest

from kdmsi_engine.cli import main
from kdmsi_engine.data import labels_from_raster


@pytest.fixture()
def taizhou(shared_data: Path) -> tuple[Path, Path, Path]:
    folder = shared_data / "landsat-taizhou-nanjing"
    return (
        folder / "A" / "taizhou.tif",
        folder / "B" / "taizhou.tif",
        folder / "label" / "taizhou.tif",
    )


def test_grid_command_writes_the_labelling_grid(
    tmp_path: Path, taizhou: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    before, after, _ = taizhou
    out = tmp_path / "grid.gpkg"
    args = [
        "grid",
        str(before),
        str(after),
        "-o",
        str(out),
        "--tile-size",
        "100",
        "--progress",
        "none",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"grid: {out}" in printed and "tiles: 16" in printed
    grid = gpd.read_file(out)
    assert len(grid) == 16 and grid["change"].isna().all()
    assert grid.crs.to_epsg() == 32651
    # Refuses to overwrite, then overwrites when asked.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:-2], "--overlap", "50", "--overwrite", "--progress", "none"]) == 0
    assert len(gpd.read_file(out)) == 49
    assert [p.name for p in tmp_path.iterdir()] == ["grid.gpkg"]  # no leftovers


def test_labels_command_with_weak_labels(
    tmp_path: Path, taizhou: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    before, after, label_raster = taizhou
    labels = tmp_path / "samples.gpkg"
    labels_from_raster(label_raster).to_crs("EPSG:4326").to_file(labels, driver="GPKG")
    out = tmp_path / "tiles.csv"
    # JSON progress, as the plugin's worker reads it.
    code = main(
        [
            "labels",
            str(before),
            str(after),
            "--labels",
            str(labels),
            "--tile-size",
            "80",
            "-o",
            str(out),
            "--progress",
            "json",
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    events = [json.loads(line) for line in stdout.splitlines()]
    assert {e["event"] for e in events} >= {"stage", "progress", "result"}
    result = events[-1]["data"]
    table = pd.read_csv(out)
    assert len(table) == 25 == result["tiles"]
    assert result["changed"] == (table.label == 1).sum() > 0
    assert result["unchanged"] == (table.label == 0).sum() > 0
    assert result["unlabelled"] == (table.label == -1).sum()
    assert {"tile_id", "row_off", "col_off", "valid_fraction", "left", "top"} <= set(table.columns)
    # GeoPackage output and the unmarked-unchanged option.
    gpkg = tmp_path / "tiles.gpkg"
    code = main(
        [
            "labels",
            str(before),
            str(after),
            "--labels",
            str(labels),
            "--tile-size",
            "80",
            "--unmarked-unchanged",
            "-o",
            str(gpkg),
            "--progress",
            "none",
        ]
    )
    assert code == 0
    tiles = gpd.read_file(gpkg)
    assert (tiles.label == 1).sum() == result["changed"]
    assert (tiles.label == 0).sum() == result["unchanged"] + result["unlabelled"]


def test_labels_command_on_a_folder_dataset(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "levir.csv"
    code = main(
        [
            "labels",
            "--dataset",
            str(shared_data / "levir-cd-samples"),
            "--tile-size",
            "128",
            "-o",
            str(out),
            "--progress",
            "none",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == 44 and table.scene.nunique() == 11
    assert f"changed: {(table.label == 1).sum()}" in printed
    assert "unlabelled: 0" in printed


def test_labels_command_errors(
    tmp_path: Path, taizhou: tuple[Path, Path, Path], capsys: pytest.CaptureFixture
) -> None:
    before, after, _ = taizhou
    out = tmp_path / "t.csv"
    bad = tmp_path / "bad.geojson"
    bad.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", '
        '"geometry": {"type": "Point", "coordinates": [120, 32.5]}, '
        '"properties": {"klass": 1}}]}'
    )
    cases = [
        (["labels", str(before), str(after), "--labels", str(bad)], "no field 'change'"),
        (["labels", str(before), str(after)], "--labels"),
        (["labels", "--dataset", str(tmp_path)], "no A/"),
        (["labels", str(before)], "BEFORE AFTER"),
    ]
    for args, message in cases:
        assert main([*args, "-o", str(out), "--progress", "none"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not out.exists()
    assert (
        main(
            ["labels", str(before), str(after), "--labels", str(bad), "-o", str(tmp_path / "t.txt")]
        )
        == 2
    )
    assert ".gpkg or .csv" in capsys.readouterr().err
