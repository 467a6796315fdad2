"""``kdmsi suggest``: the unlabelled tiles to label next, on a real scene.

The probability raster is the quick change preview (``kdmsi cva``) of the OSCD Hong Kong pair
(Sentinel-2, 10 m, 540 x 695 px in UTM); tiles of 64 px, as ``make accuracy`` uses. The ranking
is checked against the measure recomputed here from the raster's pixels, independently of the
engine's tile code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from cli_harness import assert_refused, run_cli
from shapely.geometry import box

from kdmsi_engine import defaults
from kdmsi_engine.errors import InputError, LabelError
from kdmsi_engine.suggest import SUGGEST_LAYER, suggest_tiles

TILE = 64
SCENE = "hongkong"


@pytest.fixture(scope="module")
def preview(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The quick change preview of a real scene and its labelling grid (nothing labelled)."""
    from kdmsi_engine.cva import cva_scene
    from kdmsi_engine.data.jobs import write_labelling_grid

    folder = tmp_path_factory.mktemp("suggest")
    before = shared_data / "oscd" / "A" / f"{SCENE}.tif"
    after = shared_data / "oscd" / "B" / f"{SCENE}.tif"
    cva = folder / "cva.tif"
    result = cva_scene(before, after, cva)
    grid = folder / "grid.gpkg"
    write_labelling_grid(before, after, grid, tile_size=TILE)
    return {"cva": cva, "grid": grid, "otsu": result["otsu_threshold"], "before": before}


def _pixels(path: Path) -> tuple[np.ndarray, np.ndarray, rasterio.Affine]:
    with rasterio.open(path) as src:
        values = src.read(1)
        valid = np.isfinite(values) & (values != src.nodata)
        return values, valid, src.transform


def _expected(path: Path, threshold: float, labelled: set[int] = frozenset()) -> list[tuple]:
    """``(tile_id, uncertainty, share)`` of every unlabelled tile, best first, from the pixels:
    the tiles of ``kdmsi run`` (full 64 px windows from the top left, the last row and column
    moved back inside the raster; at least half their pixels valid)."""
    values, valid, _ = _pixels(path)
    height, width = values.shape

    def offsets(size: int) -> list[int]:
        starts = list(range(0, size - TILE + 1, TILE))
        return starts + ([size - TILE] if starts[-1] + TILE < size else [])

    rows = []
    tile_id = -1
    for row in offsets(height):
        for col in offsets(width):
            tile_id += 1
            inside = valid[row : row + TILE, col : col + TILE]
            if inside.mean() < 0.5 or tile_id in labelled:
                continue
            share = (values[row : row + TILE, col : col + TILE][inside] > threshold).mean()
            rows.append((tile_id, 1.0 - abs(2.0 * share - 1.0), share))
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def _read(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(path, layer=SUGGEST_LAYER)


def _label(frame: gpd.GeoDataFrame, ids: list[int], path: Path) -> Path:
    """Weak labels: the tiles ``ids`` of a suggestions/grid layer, alternately 1 and 0."""
    picked = frame[frame["tile_id"].isin(ids)].copy()
    picked["change"] = [i % 2 for i in range(len(picked))]
    picked[["change", "geometry"]].to_file(path, driver="GPKG", layer="labels")
    return path


def test_ranking_follows_the_measure_recomputed_from_the_pixels(preview, tmp_path) -> None:
    threshold = 0.2
    out = tmp_path / "all.gpkg"
    result = suggest_tiles(
        preview["cva"],
        out,
        tile_size=TILE,
        count=10_000,
        min_gap=0,
        threshold=threshold,
        explore=0,
    )
    frame = _read(out)
    expected = _expected(preview["cva"], threshold)
    assert result["candidates"] == len(expected) == len(frame) > 50
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    assert list(frame["tile_id"]) == [r[0] for r in expected]
    np.testing.assert_allclose(frame["uncertainty"], [r[1] for r in expected], atol=1e-6)
    np.testing.assert_allclose(frame["change_share"], [r[2] for r in expected], atol=1e-6)
    assert frame["uncertainty"].is_monotonic_decreasing
    # the measure spreads: the map is sure of some tiles and unsure of others
    assert frame["uncertainty"].iloc[0] > 0.8 and frame["uncertainty"].iloc[-1] < 0.2


def test_footprints_are_the_tiles_in_the_scene_crs(preview, tmp_path) -> None:
    out = tmp_path / "next.gpkg"
    suggest_tiles(preview["cva"], out, tile_size=TILE, count=5, threshold=0.2)
    frame = _read(out)
    _, _, transform = _pixels(preview["cva"])
    with rasterio.open(preview["cva"]) as src:
        assert frame.crs == src.crs
    res = transform.a
    for _, tile in frame.iterrows():
        left, top = transform * (tile["col_off"], tile["row_off"])
        footprint = box(left, top - TILE * res, left + TILE * res, top)
        assert tile.geometry.symmetric_difference(footprint).area < 1e-6 * footprint.area


def test_only_unlabelled_tiles_are_suggested(preview, tmp_path) -> None:
    first = tmp_path / "first.gpkg"
    suggest_tiles(
        preview["cva"], first, tile_size=TILE, count=6, min_gap=0, threshold=0.2, explore=0
    )
    top = list(_read(first)["tile_id"])
    # the analyst labels exactly the tiles the map was least sure of
    labels = _label(_read(first), top, tmp_path / "labels.gpkg")
    second = tmp_path / "second.gpkg"
    result = suggest_tiles(
        preview["cva"],
        second,
        labels=labels,
        tile_size=TILE,
        count=6,
        min_gap=0,
        threshold=0.2,
        measure="uncertainty",
        explore=0,
    )
    again = list(_read(second)["tile_id"])
    assert not set(again) & set(top)
    assert result["changed"] + result["unchanged"] >= len(top)
    expected = _expected(preview["cva"], 0.2, labelled=set(top))
    assert again == [r[0] for r in expected[:6]]


def _reference_labels(preview: dict[str, Path], ids: list[int], path: Path) -> dict[int, int]:
    """Weak labels of the grid tiles ``ids`` from the city's reference (1 where the tile has a
    change pixel), written as grid cells; returns tile id -> label."""
    grid = gpd.read_file(preview["grid"])
    reference = preview["before"].parents[1] / "label" / preview["before"].name
    with rasterio.open(reference) as src:
        truth = src.read(1)
    cells = grid[grid["tile_id"].isin(ids)].copy()
    cells["change"] = [
        int((truth[r : r + h, c : c + w] == 1).any())
        for r, c, h, w in cells[["row_off", "col_off", "height", "width"]].to_numpy()
    ]
    cells[["tile_id", "change", "geometry"]].to_file(path, driver="GPKG", layer="labels")
    return dict(zip(cells["tile_id"].astype(int), cells["change"].astype(int)))


def test_false_alarms_measure_recomputed_independently(preview, tmp_path) -> None:
    """share * (1 - p_changed), p_changed a ridge logistic fit on the labelled tiles' shares,
    fitted here with a general-purpose optimiser instead of the engine's Newton steps."""
    from scipy.optimize import minimize

    threshold = 0.2
    every = {r[0]: r[2] for r in _expected(preview["cva"], threshold)}
    values = _pixels(preview["cva"])[0]
    grid = gpd.read_file(preview["grid"])
    # a spread of tiles, labelled from the reference; none near the last row or column, whose
    # tiles are moved back inside the scene and overlap their neighbours (the touching rule
    # would label those too)
    inner = grid[
        (grid["row_off"] + 2 * TILE <= values.shape[0])
        & (grid["col_off"] + 2 * TILE <= values.shape[1])
    ]
    ids = sorted(set(inner["tile_id"].astype(int)) & set(every))[::5]
    answers = _reference_labels(preview, ids, tmp_path / "labels.gpkg")
    assert 0 < sum(answers.values()) < len(answers)  # both kinds
    out = tmp_path / "next.gpkg"
    result = suggest_tiles(
        preview["cva"],
        out,
        labels=tmp_path / "labels.gpkg",
        tile_size=TILE,
        count=10_000,
        min_gap=0,
        threshold=threshold,
        measure="false-alarms",
        explore=0,
    )
    assert result["measure"] == "false-alarms"
    frame = _read(out)

    def logit(share: np.ndarray) -> np.ndarray:
        share = np.clip(share, 1e-3, 1 - 1e-3)
        return np.log(share / (1 - share))

    x = logit(np.array([every[i] for i in answers]))
    y = np.array(list(answers.values()), dtype=float)
    center, scale = x.mean(), x.std()

    def loss(w: np.ndarray) -> float:
        z = w[0] + w[1] * (x - center) / scale
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * w[1] ** 2)

    w = minimize(loss, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12}).x
    unlabelled = np.array([i for i in sorted(every) if i not in answers])
    shares = np.array([every[i] for i in unlabelled])
    p_changed = 1 / (1 + np.exp(-(w[0] + w[1] * (logit(shares) - center) / scale)))
    score = shares * (1 - p_changed)
    # every unlabelled tile, each with the score and p_changed recomputed here, best first
    assert sorted(frame["tile_id"]) == list(unlabelled)
    position = {int(t): k for k, t in enumerate(unlabelled)}
    rows = [position[int(t)] for t in frame["tile_id"]]
    np.testing.assert_allclose(frame["score"], score[rows], atol=1e-5)
    np.testing.assert_allclose(frame["p_changed"], p_changed[rows], atol=1e-5)
    assert frame["score"].is_monotonic_decreasing


def test_false_alarms_measure_waits_for_both_kinds_of_label(preview, tmp_path) -> None:
    every = [r[0] for r in _expected(preview["cva"], 0.2)]
    grid = gpd.read_file(preview["grid"])
    cells = grid[grid["tile_id"].isin(every[:3])].copy()
    cells["change"] = 1
    cells[["change", "geometry"]].to_file(tmp_path / "labels.gpkg", driver="GPKG", layer="labels")
    out = tmp_path / "next.gpkg"
    result = suggest_tiles(
        preview["cva"],
        out,
        labels=tmp_path / "labels.gpkg",
        tile_size=TILE,
        count=4,
        min_gap=0,
        threshold=0.2,
        measure="false-alarms",
        explore=0,
    )
    assert result["measure"] == "uncertainty"
    assert list(_read(out)["tile_id"]) == every[3:7]
    assert _read(out)["p_changed"].isna().all()


def test_count_and_gap_are_respected(preview, tmp_path) -> None:
    close = tmp_path / "close.gpkg"
    spaced = tmp_path / "spaced.gpkg"
    common = {"tile_size": TILE, "count": 12, "threshold": 0.2, "explore": 0}
    suggest_tiles(preview["cva"], close, min_gap=0, **common)
    result = suggest_tiles(preview["cva"], spaced, min_gap=1, **common)
    near, far = _read(close), _read(spaced)
    assert len(near) == len(far) == result["suggested"] == 12
    res = _pixels(preview["cva"])[2].a

    def min_distance(frame: gpd.GeoDataFrame) -> float:
        geoms = list(frame.geometry)
        return min(a.distance(b) for i, a in enumerate(geoms) for b in geoms[i + 1 :])

    # without the gap the most uncertain tiles touch (one blob); with it, a tile apart
    assert min_distance(near) < 1e-6
    assert min_distance(far) >= TILE * res - 1e-6
    # the spaced list is the ranked list with the tiles too close to a better one skipped
    ranked = [r[0] for r in _expected(preview["cva"], 0.2)]
    positions = [ranked.index(t) for t in far["tile_id"]]
    assert positions == sorted(positions) and positions[0] == 0


def test_gap_larger_than_the_scene_gives_fewer_tiles(preview, tmp_path) -> None:
    out = tmp_path / "few.gpkg"
    result = suggest_tiles(preview["cva"], out, tile_size=TILE, count=10, min_gap=20, threshold=0.2)
    assert result["suggested"] == len(_read(out)) == 1 and result["requested"] == 10


def test_empty_labelling_grid_gives_its_tile_size_and_every_tile(preview, tmp_path) -> None:
    out = tmp_path / "next.gpkg"
    result = suggest_tiles(preview["cva"], out, labels=preview["grid"])
    assert result["tile_size"] == TILE
    assert result["changed"] == result["unchanged"] == 0
    assert result["threshold_method"] == "otsu"
    assert result["threshold"] == pytest.approx(preview["otsu"], abs=1e-6)
    assert result["suggested"] == defaults.SUGGEST_COUNT
    grid = gpd.read_file(preview["grid"])
    assert result["candidates"] == len(grid)


def test_auto_threshold_is_the_runs_own(preview, tmp_path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    probability = folder / defaults.PROBABILITY_NAME
    shutil.copy(preview["cva"], probability)
    record = {
        "outputs": {"change_probability": str(probability)},
        "stages": {"detect": {"parameters": {"threshold": 0.31}}},
    }
    (folder / defaults.RECORD_NAME).write_text(json.dumps(record), encoding="utf-8")
    out = tmp_path / "next.gpkg"
    result = suggest_tiles(probability, out, tile_size=TILE, count=4, min_gap=0, explore=0)
    assert (result["threshold"], result["threshold_method"]) == (0.31, "run")
    expected = [r[0] for r in _expected(probability, 0.31)]
    assert list(_read(out)["tile_id"]) == expected[:4]


def test_unchanged_q_needs_unchanged_tiles(preview, tmp_path) -> None:
    with pytest.raises(LabelError, match="unchanged"):
        suggest_tiles(preview["cva"], tmp_path / "x.gpkg", tile_size=TILE, threshold="unchanged-q")
    assert not list(tmp_path.iterdir())


def test_cli_writes_the_layer(preview, tmp_path, capfd) -> None:
    out = tmp_path / "next.gpkg"
    run = run_cli(
        ["suggest", str(preview["cva"]), "-o", str(out), "--tile-size", "64", "-n", "3"], capfd
    )
    assert run.code == 0, run.err
    assert run.events[-1]["event"] == "result" and run.events[-1]["data"]["suggested"] == 3
    assert len(_read(out)) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-n", "0"], "at least 1"),
        (["--min-gap", "-1"], "minimum gap"),
        (["--threshold", "often"], "threshold 'often'"),
        (["--tile-size", "4096"], "smaller than one"),
        (["--labels", "missing.gpkg"], "does not exist"),
        (["--labels", "GRID", "--label-field", "changed"], "no field 'changed'"),
    ],
)
def test_bad_options_write_nothing(preview, tmp_path, capfd, extra, message) -> None:
    extra = [str(preview["grid"]) if e == "GRID" else e for e in extra]
    out = tmp_path / "next.gpkg"
    args = ["suggest", str(preview["cva"]), "-o", str(out), "--tile-size", "64", *extra]
    if "--tile-size" in extra:
        args = ["suggest", str(preview["cva"]), "-o", str(out), *extra]
    assert_refused(args, capfd, message, watch=[tmp_path])
    assert not out.exists()


def test_bad_rasters_and_outputs_write_nothing(preview, tmp_path, capfd) -> None:
    out = tmp_path / "next.gpkg"
    # an image is not a probability map
    assert_refused(
        ["suggest", str(preview["before"]), "-o", str(out), "--tile-size", "64"],
        capfd,
        "not a probability map",
        watch=[tmp_path],
    )
    assert_refused(
        ["suggest", str(tmp_path / "none.tif"), "-o", str(out)],
        capfd,
        "does not exist",
        watch=[tmp_path],
    )
    assert_refused(
        ["suggest", str(preview["cva"]), "-o", str(tmp_path / "next.csv")],
        capfd,
        "GeoPackage",
        watch=[tmp_path],
    )
    out.write_bytes(b"keep me")
    assert_refused(
        ["suggest", str(preview["cva"]), "-o", str(out)], capfd, "--overwrite", watch=[tmp_path]
    )
    assert out.read_bytes() == b"keep me"


def test_everything_labelled_writes_nothing(preview, tmp_path, capfd) -> None:
    grid = gpd.read_file(preview["grid"])
    grid["change"] = 0
    labels = tmp_path / "all.gpkg"
    grid.to_file(labels, driver="GPKG", layer="tiles")
    assert_refused(
        ["suggest", str(preview["cva"]), "-o", str(tmp_path / "n.gpkg"), "--labels", str(labels)],
        capfd,
        "nothing left to suggest",
        watch=[tmp_path],
    )


def test_change_odds_are_monotone_and_bounded_on_separable_labels() -> None:
    from kdmsi_engine.suggest import ChangeOdds, expected_false_alarms

    # four unchanged tiles with few pixels called change, four changed ones with many:
    # separable, where an unpenalised fit would make p_changed a step
    shares = np.array([0.01, 0.02, 0.03, 0.05, 0.2, 0.3, 0.5, 0.9])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    odds = ChangeOdds.fit(shares, labels)
    assert odds is not None and 0 < odds.slope < 10
    grid = np.linspace(0.0, 1.0, 101)
    p = odds(grid)
    assert np.all(np.diff(p) >= 0) and p[2] < 0.5 < p[40]
    assert 0.0 < p.min() and p.max() < 1.0
    score = expected_false_alarms(grid, p)
    # the most likely false alarms lie between the two kinds, not at either end
    assert 0.02 < grid[np.argmax(score)] < 0.9
    assert ChangeOdds.fit(shares[:4], labels[:4]) is None


def test_explore_draws_a_share_at_random_after_the_ranked_tiles(preview, tmp_path) -> None:
    ranked = [r[0] for r in _expected(preview["cva"], 0.2)]
    common = {"tile_size": TILE, "count": 6, "min_gap": 0, "threshold": 0.2}
    first, again = tmp_path / "first.gpkg", tmp_path / "again.gpkg"
    result = suggest_tiles(preview["cva"], first, explore=0.5, **common)
    suggest_tiles(preview["cva"], again, explore=0.5, **common)
    frame = _read(first)
    assert result["random_tiles"] == 3 and result["explore"] == 0.5
    assert list(frame["picked_by"]) == ["uncertainty"] * 3 + ["random"] * 3
    assert list(frame["tile_id"][:3]) == ranked[:3]
    drawn = list(frame["tile_id"][3:])
    assert len(set(drawn)) == 3 and not set(drawn) & set(ranked[:3])
    assert set(drawn) <= set(ranked)  # unlabelled tiles of the scene
    assert list(_read(again)["tile_id"]) == list(frame["tile_id"])  # seeded: repeatable
    # drawn from the whole scene, not from the top of the ranking
    everything = tmp_path / "all.gpkg"
    suggest_tiles(preview["cva"], everything, explore=1.0, **{**common, "count": 30})
    positions = [ranked.index(t) for t in _read(everything)["tile_id"]]
    assert max(positions) > len(ranked) // 2 and min(positions) < len(ranked) // 2
    with pytest.raises(InputError, match="random tiles"):
        suggest_tiles(preview["cva"], tmp_path / "bad.gpkg", explore=1.5, **common)
    assert not (tmp_path / "bad.gpkg").exists()
