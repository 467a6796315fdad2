"""'Label tiles' in the real QGIS desktop under Xvfb, used by mouse (QTest): a click marks a
tile changed, a right click unchanged, a shift-click clears it, a drag paints every tile it
crosses; the GeoPackage holds each gesture at once; QGIS's own Undo and Redo take it back and
forth; screenshots show the tool in use with no machine path on them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from desktop import missing_programs, run_session


@pytest.fixture(scope="module")
def session(plugin_zip: Path, repo_root: Path, tmp_path_factory) -> dict:
    missing = missing_programs()
    assert not missing, f"the desktop test needs {', '.join(missing)} (make setup installs them)"
    out = tmp_path_factory.mktemp("desktop")
    result = run_session(plugin_zip, repo_root / "resources" / "sample", out, timeout=240)
    assert not result.get("error"), result["error"]
    assert result["exit_code"] == 0
    result["out"] = out
    return result


def tiles(result: dict, step: str) -> dict[str, object]:
    return result["steps"][step]["tiles"]


def test_first_session_defaults_fit_the_sample(session) -> None:
    assert session["pair"] == ["Taizhou 2000", "Taizhou 2003"]
    assert session["tile_size"] == 64 and session["backbone"] == "auto"


def test_label_tiles_makes_the_grid_with_the_algorithm(session) -> None:
    grid = session["grid"]
    assert grid["made_by"] == "kdmsi-output/labelling_grid.gpkg"  # by kdmsi:labellinggrid
    assert grid["tiles"] == 49  # 400 x 400 px in 64 px tiles, the last row and column shifted
    assert grid["active_tool"] and grid["active_layer"] and grid["editable"]


def test_click_right_click_and_shift_click(session) -> None:
    (a,) = tiles(session, "click")
    assert tiles(session, "click") == {a: 1}
    (b,) = tiles(session, "right_click")
    assert tiles(session, "right_click") == {b: 0}
    assert tiles(session, "shift_click") == {a: None}
    assert session["steps"]["shift_click"]["counts"] == "0 changed, 1 unchanged, 48 not labelled"


def test_drags_paint_the_tiles_under_the_pointer_only(session) -> None:
    # an L down a column and along a row: the tiles inside the corner stay unlabelled, so
    # the pointer's path was followed, not the straight line from press to release
    values = list(tiles(session, "drag").values())
    assert values[:5] == [1] * 5 and values[5:] == [None] * 4
    assert set(tiles(session, "right_drag").values()) == {0}
    everything = session["steps"]["right_drag"]["all"]
    assert sum(v == 1 for v in everything.values()) == 5
    assert sum(v == 0 for v in everything.values()) == 5


def test_qgis_undo_and_redo_restore_the_saved_labels(session) -> None:
    assert session["undo_enabled"]
    assert set(tiles(session, "undo").values()) == {None}  # the right drag taken back
    assert set(tiles(session, "undo_twice").values()) == {None}  # and the drag before it
    assert list(tiles(session, "redo").values()) == [1] * 5 + [0] * 4
    # saved as it goes: QGIS has nothing to save and asks nothing when the layer closes
    assert not any(step["modified"] for step in session["steps"].values())


def test_the_saved_grid_is_the_analysts_labels(session) -> None:
    """The file read back after QGIS closed: what the counts in the panel said."""
    grid = Path(session["out"]) / "kdmsi-output" / "labelling_grid.gpkg"
    with sqlite3.connect(str(grid)) as connection:
        values = [v for (v,) in connection.execute("SELECT change FROM tiles")]
    # the last gesture, a drag over three tiles not labelled before, marked them changed
    with sqlite3.connect(str(grid)) as connection:
        closeup = {fid: v for fid, v in connection.execute("SELECT fid, change FROM tiles")}
    assert [closeup[fid] for fid in session["closeup"]] == [1, 1, 1]
    changed, unchanged, empty = values.count(1), values.count(0), values.count(None)
    assert (
        f"{changed} changed, {unchanged} unchanged, {empty} not labelled"
        == (session["final_counts"])
    )
    assert values.count(1) >= 6 and values.count(0) >= 5
    assert session["advice"].startswith("Enough changed and unchanged tiles to train")


def test_tiles_to_label_next_and_next_by_mouse(session) -> None:
    """The button (the quick preview made first), the ranked unlabelled tiles on top of the
    result group; a tile marked by mouse meanwhile is skipped by Next, Label tiles stays on."""
    suggest = session["suggest"]
    assert suggest["success"], suggest["error"]
    assert suggest["steps"] == ["cva", "suggest"]
    # 10 asked; on the 7 x 7 grid with 27 tiles left, fewer keep a tile's width apart
    count = len(suggest["windows"])
    assert suggest["requested"] == 10 and 3 <= count <= 10
    assert suggest["top_of_group"] and suggest["text"].startswith(f"{count} tiles to label next")
    # unlabelled tiles of the grid the analyst was painting (its labels read by sqlite)
    assert suggest["labels_of_suggested"] == [None] * count
    assert suggest["second_label"] == 0  # rank 2's tile, marked unchanged by a right click
    first, second = suggest["next_1"], suggest["next_2"]
    assert first["text"] == f"Tile 1 of {count} ({count - 1} still to label)" and first["contains"]
    assert second["text"] == f"Tile 3 of {count} ({count - 1} still to label)"
    assert second["contains"]
    assert first["tiles_wide"] <= 3.01 and second["tiles_wide"] <= 3.01
    assert first["label_tool"] and second["label_tool"]


def test_screenshots_show_the_tool_without_machine_paths(session, qgis_app) -> None:
    from qgis.PyQt.QtGui import QImage

    assert session["path_leaks"] == []
    shots = Path(session["out"]) / "screenshots"
    for name in ("label_tiles.png", "label_tiles_drag.png", "tiles_to_label_next.png"):
        image = QImage(str(shots / name))
        colours = {
            image.pixel(x, y)
            for x in range(0, image.width(), 5)
            for y in range(0, image.height(), 5)
        }
        assert image.width() >= 600 and len(colours) > 1000, name  # a picture, not a blank
    # QGIS's own notice of our finished task does not stay in the message bar
    assert not any(text.startswith("Executing") for text in session["messages"])
