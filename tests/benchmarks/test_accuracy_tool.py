"""``make accuracy``'s machinery: weak labels made from a reference the way an analyst marks a
scene, the checkerboard of protocol (b), and one scene through the whole benchmark (a tiny
chain on a real crop of the Taizhou pair)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from detect_testutils import TINY_ARGS
from rasterio.windows import Window

from benchmarks.accuracy import (
    Scene,
    checkerboard,
    evaluate_scene,
    find_scenes,
    markdown,
    summarize,
    truth_on_grid,
    weak_labels_from_truth,
)
from kdmsi_engine.data.labels import assign_tile_labels
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.data.tiling import tile_windows, tiles_frame, window_polygon

WINDOW = Window(120, 140, 128, 128)


@pytest.fixture(scope="module")
def site(shared_data: Path, tmp_path_factory) -> Scene:
    """A data folder holding one real 128 x 128 crop of Taizhou (images and sample labels)."""
    root = tmp_path_factory.mktemp("data") / "landsat"
    source = shared_data / "landsat-taizhou-nanjing"
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
        with rasterio.open(source / folder / "taizhou.tif") as src:
            profile = src.profile.copy()
            profile.update(
                width=WINDOW.width, height=WINDOW.height, transform=src.window_transform(WINDOW)
            )
            profile.update(tiled=True, blockxsize=64, blockysize=64)
            with rasterio.open(root / folder / "crop.tif", "w", **profile) as dst:
                dst.write(src.read(window=WINDOW))
    scenes = find_scenes(root.parent)
    assert [s.name for s in scenes] == ["crop"]
    return scenes[0]


def test_weak_labels_follow_the_reference(site):
    with ScenePair.open(site.before, site.after) as scene:
        grid = scene.grid
    truth = truth_on_grid(site.truth, grid)
    with rasterio.open(site.truth) as ds:
        raw = ds.read(1)
    np.testing.assert_array_equal(truth, np.where(raw == 255, -1, raw))  # same grid: as is
    assert (truth == 1).any() and (truth == 0).any() and (truth == -1).any()
    frame = weak_labels_from_truth(truth, grid.transform, grid.crs)
    assert set(frame["change"]) == {0, 1}
    for value in (0, 1):
        area = frame[frame["change"] == value].geometry.area.sum()
        assert area == pytest.approx((truth == value).sum() * 900.0)
    # the engine's touching rule turns them into: changed if any change pixel, unchanged if
    # only no-change pixels, unlabelled without a reference pixel
    windows = tile_windows(grid, 32)
    records = [(i, int(w.row_off), int(w.col_off), 32, 32, 1.0) for i, w in enumerate(windows)]
    tiles = tiles_frame(records, [window_polygon(grid, w) for w in windows], grid.crs)
    labels = assign_tile_labels(tiles, frame)
    for window, label in zip(windows, labels):
        block = truth[window.toslices()]
        expected = 1 if (block == 1).any() else 0 if (block == 0).any() else -1
        assert label == expected
    # protocol (b): only the marked blocks give labels
    marked = checkerboard(grid.height, grid.width, 64)
    assert marked[0, 0] and not marked[0, 64] and marked[64, 64] and marked.mean() == 0.5
    half = weak_labels_from_truth(truth, grid.transform, grid.crs, marked=marked)
    inside = (truth >= 0) & marked
    assert half.geometry.area.sum() == pytest.approx(inside.sum() * 900.0)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["a", "b"])
def test_one_scene_through_the_benchmark(site, protocol, tmp_path):
    extra = [*TINY_ARGS, "--tile-size", "32", "--device", "cpu"]
    record = evaluate_scene(site, protocol, tmp_path, extra=extra, tile_size=32, block_size=64)
    assert "error" not in record, record.get("error")
    maps = record["maps"]
    expected = {"final", "unmasked", "detector", "evidence", "pseudo", "msi_best", "baseline"}
    if protocol == "a":
        expected |= {"baseline_restricted", "trivial"}
    assert set(maps) == expected
    for name, metrics in maps.items():
        assert 0 <= metrics["iou"] <= 1 and 0 <= metrics["f1"] <= 1, name
    assert record["run_seconds"] > 0 and record["minutes_per_megapixel"] > 0
    assert record["trust"]["tile_agreement"] is not None
    # the baseline, recomputed here: the CVA map above its Otsu threshold, on the scored pixels
    folder = tmp_path / protocol / "crop"
    with rasterio.open(folder / "cva.tif") as ds:
        cva = ds.read(1)
    with rasterio.open(site.truth) as ds:
        truth = ds.read(1)
    scored = truth != 255
    if protocol == "b":
        labels = json.loads((folder / "run" / "run.json").read_text())["trust"]["tiles"]
        assert labels["changed"] + labels["unchanged"] > 0
        scored &= ~checkerboard(128, 128, 64)
        assert maps["baseline"]["pixels"] <= int(scored.sum())
    else:
        pred = cva > record["baseline_otsu"]
        tp = int((pred & (truth == 1) & scored).sum())
        fp = int((pred & (truth == 0) & scored).sum())
        fn = int((~pred & (truth == 1) & scored).sum())
        assert maps["baseline"]["iou"] == pytest.approx(tp / (tp + fp + fn))
        # the restricted baseline can only lose pixels of the baseline
        assert maps["baseline_restricted"]["precision"] >= 0
    summary = summarize([record])
    assert summary[protocol]["scenes"] == 1
    # the report's table: every row has as many cells as its header (else it renders as text)
    table = [line for line in markdown([record], summary).splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, delimiter, the scene, the mean
    assert len({line.count("|") for line in table}) == 1
    assert f"{maps['final']['iou']:.3f}" in table[2]
