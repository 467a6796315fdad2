"""``kdmsi run``: the whole chain on a small real scene; run.json content; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from detect_testutils import crop_sample, tiny_config
from rasterio.windows import Window

from kdmsi_engine.errors import OutputError
from kdmsi_engine.jobs.run import run_scene

FILES = (
    "student.kdmsi", "msi_probability.tif", "change_evidence.tif", "pseudo_labels.tif",
    "detector.kdmsi", "detector_probability.tif", "change_probability.tif", "change.tif",
    "changes.gpkg", "run.json",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    scene = crop_sample(tmp_path_factory.mktemp("scene"), Window(150, 200, 96, 96))
    out = tmp_path_factory.mktemp("run") / "out"
    record = run_scene(
        scene["before"], scene["after"], scene["labels"], out, config=tiny_config(),
        truth=scene["truth"], name="crop", device="cpu",
    )  # fmt: skip
    return scene, out, record


@pytest.mark.slow
def test_every_stage_writes_its_file_on_the_scene_grid(run):
    scene, out, _ = run
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    with rasterio.open(scene["before"]) as ref:
        grid = (ref.crs, ref.transform, ref.width, ref.height)
    for name in (
        "msi_probability.tif",
        "change_evidence.tif",
        "pseudo_labels.tif",
        "detector_probability.tif",
        "change_probability.tif",
        "change.tif",
    ):
        with rasterio.open(out / name) as ds:
            assert (ds.crs, ds.transform, ds.width, ds.height) == grid, name


def test_run_record(run):
    scene, out, record = run
    saved = json.loads((out / "run.json").read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["job"] == "run" and saved["status"] == "complete" and saved["scene"] == "crop"
    assert saved["inputs"]["labels"] == str(scene["labels"].absolute())
    assert saved["inputs"]["truth"] == str(scene["truth"].absolute())
    assert saved["parameters"]["kd_backbone"] == "resnet18"
    assert saved["parameters"]["detector_epochs"] == 1
    for key in ("kd_s", "msi_s", "pseudo_s", "detector_s", "detect_s", "metrics_s", "total_s"):
        assert saved["timings"][key] >= 0, key
    assert set(saved["stages"]) == {"kd", "msi", "pseudo", "detector", "detect"}
    assert saved["stages"]["detector"]["tiles"] > 0
    assert isinstance(saved["stages"]["pseudo"]["threshold"], float)
    assert saved["stages"]["pseudo"]["source"] == "evidence"
    assert saved["stages"]["pseudo"]["evidence"]["calibration"] == "unchanged-tiles"
    detect = saved["stages"]["detect"]["parameters"]
    assert detect["threshold_method"] == "unchanged-q" and 0 <= detect["threshold"] < 1
    assert detect["unchanged_tiles_kept_out"] is True
    trust = saved["trust"]
    assert 0 <= trust["tile_agreement"] <= 1 and isinstance(trust["warnings"], list)
    assert trust["trusted"] == (not trust["warnings"])
    for lib in ("torch", "rasterio", "gdal", "numpy", "shapely", "python"):
        assert saved["versions"][lib], lib
    assert saved["device"].startswith("cpu")
    assert saved["grid"]["crs"] == "EPSG:32651" and saved["grid"]["width"] == 96
    metrics = saved["metrics"]
    for stage in (
        "change",
        "change_probability",
        "detector_probability",
        "change_evidence",
        "msi_probability",
        "pseudo_labels",
    ):
        m = metrics[stage]
        assert 0 <= m["iou"] <= 1 and 0 <= m["oa"] <= 1
        assert m["iou"] + m["fp_share"] + m["fn_share"] == pytest.approx(1) or m["iou"] == 0
    with rasterio.open(scene["truth"]) as ds:
        labelled = int((ds.read(1) != 255).sum())
    assert metrics["change"]["pixels"] == labelled
    assert Path(saved["outputs"]["changes"]) == out / "changes.gpkg"


def test_existing_outputs_refused_before_any_work(run):
    scene, out, _ = run
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputError):
        run_scene(
            scene["before"], scene["after"], scene["labels"], out, config=tiny_config(),
            device="cpu",
        )  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_tiles_labelled_unchanged_stay_unchanged(run):
    """Pseudo labels and the final map never mark change on a tile labelled unchanged; the
    unchanged tiles held out to calibrate the threshold are left out of the detector's labels."""
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.pseudo import TileLabels

    scene, out, record = run
    config = tiny_config()
    with ScenePair.open(scene["before"], scene["after"]) as pair:
        tiles = TileLabels.from_frame(
            labelled_tiles(pair, scene["labels"], tile_size=config.tile_size)
        )
        height, width = pair.grid.height, pair.grid.width
    state = tiles.state(0, height, width)
    assert (state == 0).any() and (state == 1).any()
    held_out = tiles.held_out_split(config.calibration_fraction, config.seed)
    held = tiles.only(held_out).state(0, height, width) == 0
    with rasterio.open(out / "pseudo_labels.tif") as ds:
        pseudo = ds.read(1)
    with rasterio.open(out / "change.tif") as ds:
        change = ds.read(1)
    assert not (pseudo[state == 0] == 1).any()
    assert (pseudo[held] == 255).all()
    assert record["stages"]["pseudo"]["held_out_tiles"] == int(held_out.sum())
    assert not (change[state == 0] == 1).any()


@pytest.fixture(scope="module")
def run_with_held_out_tiles(tmp_path_factory):
    """A crop with 8 changed and 8 unchanged 32 px tiles: 2 unchanged ones are held out."""
    scene = crop_sample(tmp_path_factory.mktemp("scene"), Window(0, 200, 128, 128))
    out = tmp_path_factory.mktemp("run") / "out"
    record = run_scene(
        scene["before"], scene["after"], scene["labels"], out, config=tiny_config(),
        name="crop", device="cpu",
    )  # fmt: skip
    return scene, out, record


@pytest.mark.slow
def test_fusion_calibrates_the_detector_on_held_out_tiles_and_the_rest_on_all(
    run_with_held_out_tiles,
):
    """The detector's rarity scale comes from the unchanged tiles it did not train on; the
    calibrated CVA's scale and the final threshold from every unchanged tile."""
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.pseudo import TileLabels

    scene, out, record = run_with_held_out_tiles
    config = tiny_config()
    with ScenePair.open(scene["before"], scene["after"]) as pair:
        tiles = TileLabels.from_frame(
            labelled_tiles(pair, scene["labels"], tile_size=config.tile_size)
        )
        height, width = pair.grid.height, pair.grid.width
        valid = pair.read_valid(pair.grid.full_window())
    held_out = tiles.held_out_split(config.calibration_fraction, config.seed)
    assert held_out.sum() == 2
    held = (tiles.only(held_out).state(0, height, width) == 0) & valid
    every = (tiles.state(0, height, width) == 0) & valid
    detect = record["stages"]["detect"]
    assert detect["fusion"]["calibration_pixels"] == [int(held.sum()), int(every.sum())]
    with rasterio.open(out / "change_probability.tif") as ds:
        score = ds.read(1)
    threshold = detect["parameters"]["threshold"]
    expected = np.quantile(score[every], config.detect_quantile)
    assert threshold == pytest.approx(expected, abs=2e-3)
