"""``kdmsi batch``: train once, detect every scene, report a broken one, skip finished ones."""

from __future__ import annotations

import json

import pytest
from detect_testutils import TINY_ARGS, crop_sample
from rasterio.windows import Window

from kdmsi_engine.cli import main


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    a = crop_sample(root / "a", Window(150, 200, 96, 96))
    crop_sample(root / "b", Window(20, 20, 64, 80), labels=False)
    broken = root / "broken.tif"
    broken.write_bytes(a["before"].read_bytes()[:3000])  # a truncated GeoTIFF
    manifest = root / "scenes.csv"
    manifest.write_text(
        "name,before,after,labels\n"
        f"alpha,{a['before']},{a['after']},{a['labels']}\n"
        f"broken,{broken},{a['after']},\n"
        "beta,b/taizhou_2000.tif,b/taizhou_2003.tif,\n",  # relative to the manifest
        encoding="utf-8",
    )
    out = root / "out"
    argv = ["batch", str(manifest), "-o", str(out), "--device", "cpu", "--progress", "json"]
    status = main(argv + TINY_ARGS)
    return argv, out, status


@pytest.mark.slow
def test_broken_scene_is_reported_and_the_others_finish(batch, capsys):
    _, out, status = batch
    assert status == 0
    record = json.loads((out / "batch.json").read_text())
    scenes = {s["name"]: s for s in record["scenes"]}
    assert [s["name"] for s in record["scenes"]] == ["alpha", "broken", "beta"]
    assert scenes["alpha"]["status"] == "complete" and scenes["beta"]["status"] == "complete"
    assert scenes["broken"]["status"] == "failed"
    assert "broken.tif" in scenes["broken"]["error"]
    assert record["status"] == "complete-with-failures"
    assert record["counts"] == {"complete": 2, "skipped": 0, "failed": 1}
    assert record["training"]["scenes"] == ["alpha"]
    for name in ("alpha", "beta"):
        run = json.loads((out / name / "run.json").read_text())
        assert run["status"] == "complete" and run["scene"]["name"] == name
        for key in ("change_probability", "change", "changes"):
            assert (out / name / f"{key}.{'gpkg' if key == 'changes' else 'tif'}").is_file()
    assert (out / "student.kdmsi").is_file() and (out / "detector.kdmsi").is_file()
    assert (out / "alpha" / "pseudo_labels.tif").is_file()
    assert not (out / "beta" / "pseudo_labels.tif").exists()  # detect-only scene


def test_rerun_skips_finished_scenes_and_reuses_models(batch, capsys):
    argv, out, _ = batch
    stamps = {p: p.stat().st_mtime_ns for p in (out / "detector.kdmsi", out / "alpha" / "run.json")}
    capsys.readouterr()
    assert main(argv + TINY_ARGS) == 0
    log = capsys.readouterr().out
    assert "scene broken failed" in log and "already complete" in log
    record = json.loads((out / "batch.json").read_text())
    statuses = {s["name"]: s["status"] for s in record["scenes"]}
    assert statuses == {"alpha": "skipped", "broken": "failed", "beta": "skipped"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
