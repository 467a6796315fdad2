"""The active-learning benchmark's analyst (``benchmarks/active_learning.py``), without training:
the reference answers by the touching rule, and each strategy asks only about tiles it may."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.accuracy import find_scenes
from benchmarks.active_learning import (
    DEFAULT_RUNS,
    random_tiles,
    scene_truth,
    seed_labels,
    simulations,
    suggested_tiles,
    write_labels,
)


@pytest.fixture(scope="module")
def bercy(shared_data: Path):
    scene = next(s for s in find_scenes(shared_data) if s.name == "bercy")
    return scene_truth(scene)


def test_answers_are_the_reference_by_the_touching_rule(bercy) -> None:
    # a tile is changed when the reference has a change pixel in it, else unchanged
    answers = bercy.tiles["answer"].to_numpy()
    for index, tile in bercy.tiles.iterrows():
        r, c = int(tile["row_off"]), int(tile["col_off"])
        window = bercy.truth[r : r + int(tile["height"]), c : c + int(tile["width"])]
        expected = 1 if (window == 1).any() else (0 if (window == 0).any() else -1)
        assert answers[index] == expected, tile["tile_id"]
    assert {0, 1} <= set(answers)


def test_seed_and_random_tiles_ask_only_what_they_may(bercy) -> None:
    answers = bercy.tiles["answer"].to_numpy()
    rng = np.random.default_rng(0)
    labels = seed_labels(answers, 3, rng)
    assert sorted(labels.values()) == [0, 0, 0, 1, 1, 1]
    assert all(answers[i] == v for i, v in labels.items())
    drawn = random_tiles(bercy, labels, 10, rng)
    assert len(drawn) == len(set(drawn)) == 10
    assert not set(drawn) & set(labels) and all(answers[i] >= 0 for i in drawn)
    # the same seed draws the same tiles (both analysts start alike, runs can be reused)
    again = random_tiles(bercy, labels, 10, np.random.default_rng(0))
    assert again == random_tiles(bercy, labels, 10, np.random.default_rng(0))


def test_suggested_tiles_follow_kdmsi_suggest(bercy, tmp_path) -> None:
    import geopandas as gpd

    from kdmsi_engine.cva import cva_scene
    from kdmsi_engine.suggest import suggest_tiles

    run = tmp_path / "run"
    run.mkdir()
    preview = run / "change_probability.tif"
    cva_scene(bercy.scene.before, bercy.scene.after, preview)
    answers = bercy.tiles["answer"].to_numpy()
    labels = seed_labels(answers, 2, np.random.default_rng(1))
    write_labels(bercy.tiles, labels, tmp_path / "labels.gpkg")
    picked = suggested_tiles(bercy, labels, run, 5, tmp_path)
    assert len(picked) == 5 and not set(picked) & set(labels)
    ranked = tmp_path / "ranked.gpkg"
    suggest_tiles(preview, ranked, labels=tmp_path / "labels.gpkg", tile_size=64, count=5)
    ids = list(gpd.read_file(ranked)["tile_id"])
    assert [int(bercy.tiles["tile_id"].iloc[i]) for i in picked] == ids
    shutil.rmtree(run)


def test_default_runs_and_scene_lists(shared_data: Path) -> None:
    scenes = find_scenes(shared_data)
    default = argparse.Namespace(runs=DEFAULT_RUNS, scenes=None, seeds=None)
    assert [(s.name, seed) for s, seed in simulations(scenes, default)] == [
        ("beihai", 0),
        ("abudhabi", 0),
        ("mumbai", 0),
        ("abudhabi", 1),
        ("mumbai", 1),
        ("beihai", 1),
        ("hongkong", 0),
        ("saclay_e", 0),
        ("mumbai", 2),
        ("abudhabi", 2),
    ]
    product = argparse.Namespace(runs=DEFAULT_RUNS, scenes="paris,bercy", seeds="0,2")
    assert [(s.name, seed) for s, seed in simulations(scenes, product)] == [
        ("paris", 0),
        ("paris", 2),
        ("bercy", 0),
        ("bercy", 2),
    ]
