"""``kdmsi batch --cluster``: the same scenes on a local Dask cluster of 2 worker processes.

Small real crops of the Taizhou sample (one with weak labels, two without) and one bad scene: a
real Sentinel-2 (OSCD) crop with 4 bands, which the 6-band detector refuses when the scene's
task runs on a worker. Workers run torch with their share of the cores (1 thread each here), the
sequential run with the test's 2 threads: the maps agree to float rounding (1e-6), the change
rasters and polygons exactly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from cli_harness import run_cli
from detect_testutils import SAMPLE, TINY_ARGS, crop_sample, tiny_config
from rasterio.windows import Window

from kdmsi_engine.cli import main
from kdmsi_engine.errors import InputError
from kdmsi_engine.jobs.batch import batch_scenes
from kdmsi_engine.jobs.cluster import ClusterSpec, _restore_environment, parse_cluster

distributed = pytest.importorskip("distributed")

#: the tiny chain's tile sizes (the labels' tile grid and the detection windows)
SIZES = ["--tile-size", "32", "--detect-tile-size", "64"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    """Crops, manifests and a tiny detector trained by a sequential batch on the good scenes."""
    root = tmp_path_factory.mktemp("cluster")
    alpha = crop_sample(root / "alpha", Window(150, 200, 96, 96))
    beta = crop_sample(root / "beta", Window(20, 20, 64, 80), labels=False)
    bad = {}
    for folder, key in (("A", "before"), ("B", "after")):
        with rasterio.open(shared_data / "oscd" / folder / "beihai.tif") as src:
            window = Window(0, 0, 64, 64)
            profile = {**src.profile, "width": 64, "height": 64}
            profile["transform"] = src.window_transform(window)
            bad[key] = root / f"bad_{key}.tif"
            with rasterio.open(bad[key], "w", **profile) as out:
                out.write(src.read(window=window))
    rows = {
        "alpha": f"alpha,{alpha['before']},{alpha['after']},{alpha['labels']}",
        "bad": f"bad,{bad['before']},{bad['after']},",
        "beta": f"beta,{beta['before']},{beta['after']},",
        # the whole 400 x 400 sample: long enough to be killed in the middle of
        "gamma": f"gamma,{SAMPLE / 'taizhou_2000.tif'},{SAMPLE / 'taizhou_2003.tif'},",
    }

    def manifest(name: str, *keys: str) -> Path:
        path = root / f"{name}.csv"
        path.write_text("\n".join(["name,before,after,labels", *(rows[k] for k in keys)]) + "\n")
        return path

    train = manifest("train", "alpha", "beta")
    trained = root / "trained"
    argv = ["batch", str(train), "-o", str(trained), "--device", "cpu", "--progress", "none"]
    assert main(argv + TINY_ARGS) == 0
    return {
        "root": root,
        "detector": trained / "detector.kdmsi",
        "three": manifest("three", "alpha", "bad", "beta"),
        "four": manifest("four", "alpha", "bad", "beta", "gamma"),
        "train_and_bad": manifest("train_and_bad", "alpha", "bad", "beta"),
        "trained": trained,
    }


def _batch(
    capfd: pytest.CaptureFixture[str], manifest: Path, out: Path, *extra: str
) -> tuple[int, list[dict[str, Any]]]:
    run = run_cli(["batch", str(manifest), "-o", str(out), "--device", "cpu", *extra], capfd)
    return run.code, run.events


def _same_outputs(a: Path, b: Path) -> None:
    """The scene folders ``a`` and ``b`` hold the same maps and polygons."""
    finals = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert finals == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in finals:
        if name.endswith(".tif"):
            with rasterio.open(a / name) as x, rasterio.open(b / name) as y:
                first, second = x.read(), y.read()
            if name == "change.tif":
                assert np.array_equal(first, second), name
            else:
                np.testing.assert_allclose(first, second, atol=1e-6, err_msg=name)
    polygons = gpd.read_file(a / "changes.gpkg"), gpd.read_file(b / "changes.gpkg")
    assert len(polygons[0]) == len(polygons[1])
    assert polygons[0].geometry.equals(polygons[1].geometry)
    runs = [json.loads((folder / "run.json").read_text()) for folder in (a, b)]
    assert runs[0]["parameters"]["threshold"] == runs[1]["parameters"]["threshold"]


def test_cluster_values_are_parsed_and_bad_ones_refused(tmp_path: Path) -> None:
    assert parse_cluster("local:3") == ClusterSpec(workers=3)
    assert parse_cluster("local").workers >= 1
    assert parse_cluster("tcp://10.0.0.5:8786") == ClusterSpec(address="tcp://10.0.0.5:8786")
    for text in ("local:0", "local:x", "10.0.0.5:8786", "tcp://host"):
        with pytest.raises(InputError, match="local:N") as caught:
            parse_cluster(text)
        assert caught.value.parameters == ("cluster",)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"name,before,after,labels\na,{SAMPLE / 'taizhou_2000.tif'},"
                        f"{SAMPLE / 'taizhou_2003.tif'},\n")  # fmt: skip
    with pytest.raises(InputError, match="local:N"):
        batch_scenes(manifest, tmp_path / "out", cluster="remote", config=tiny_config())
    with pytest.raises(InputError, match="does not exist"):
        batch_scenes(manifest, tmp_path / "out", model=tmp_path / "none.kdmsi")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_object_store_paths_are_left_to_gdal(tmp_path: Path) -> None:
    """A manifest may name /vsis3/ (or /vsigs/, /vsiaz/) rasters: the workers read them."""
    from kdmsi_engine.data.manifest import read_manifest
    from kdmsi_engine.errors import ManifestError

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "name,before,after,labels\ns3,/vsis3/bucket/a.tif,/vsis3/bucket/b.tif,\n"
        f"local,{tmp_path / 'missing.tif'},{tmp_path / 'missing.tif'},\n"
    )
    with pytest.raises(ManifestError, match="missing.tif does not exist"):
        read_manifest(manifest)
    manifest.write_text("name,before,after,labels\ns3,/vsis3/bucket/a.tif,/vsis3/bucket/b.tif,\n")
    (spec,) = read_manifest(manifest)
    assert str(spec.before) == "/vsis3/bucket/a.tif"


@pytest.mark.slow
def test_two_workers_detect_like_the_sequential_run_and_report_the_bad_scene(
    scenes: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(scenes["detector"]), *SIZES]
    status, _ = _batch(capfd, scenes["three"], tmp_path / "seq", *model)
    assert status == 0
    environment = dict(os.environ)
    status, events = _batch(
        capfd, scenes["three"], tmp_path / "dask", *model, "--cluster", "local:2"
    )
    assert status == 0
    record = json.loads((tmp_path / "dask" / "batch.json").read_text())
    by_name = {s["name"]: s for s in record["scenes"]}
    assert record["counts"] == {"complete": 2, "skipped": 0, "failed": 1}
    assert "trained on 6 band(s)" in by_name["bad"]["error"] and "has 4" in by_name["bad"]["error"]
    assert by_name["bad"]["stage"] == "detect"  # it failed on a worker, the others went on
    cluster = record["cluster"]
    assert cluster["workers"] == 2 and cluster["dashboard"].startswith("http")
    per_worker = cluster["scenes_per_worker"]
    assert sum(c["complete"] for c in per_worker.values()) == 2
    assert sum(c["failed"] for c in per_worker.values()) == 1
    for name in ("alpha", "beta"):
        _same_outputs(tmp_path / "seq" / name, tmp_path / "dask" / name)
    # progress: the dashboard first, one "scenes" stage advanced by each scene, the result
    logs = [e for e in events if e["event"] == "log"]
    assert any(e.get("data", {}).get("dashboard") == cluster["dashboard"] for e in logs)
    advances = [e for e in events if e["event"] == "progress" and e["stage"] == "scenes"]
    assert [e["done"] for e in advances] == [1, 2, 3] and advances[-1]["total"] == 3
    # Dask's settings for its workers (OMP_NUM_THREADS=1, ...) do not stay in this process
    assert dict(os.environ) == environment
    result = next(e["data"] for e in events if e["event"] == "result")
    assert result["counts"]["failed"] == 1 and result["cluster"]["workers"] == 2
    # resume: a rerun skips the finished scenes
    status, _ = _batch(capfd, scenes["three"], tmp_path / "dask", *model, "--cluster", "local:2")
    statuses = {s["name"]: s["status"] for s in json.loads(
        (tmp_path / "dask" / "batch.json").read_text())["scenes"]}  # fmt: skip
    assert statuses == {"alpha": "skipped", "bad": "failed", "beta": "skipped"}


@pytest.mark.slow
def test_training_runs_on_a_worker_and_reports_its_progress(
    scenes: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chain"
    status, events = _batch(capfd, scenes["train_and_bad"], out, *TINY_ARGS, "--cluster", "local:2")
    assert status == 0
    record = json.loads((out / "batch.json").read_text())
    assert record["counts"] == {"complete": 2, "skipped": 0, "failed": 1}
    assert (out / "student.kdmsi").is_file() and (out / "detector.kdmsi").is_file()
    assert (out / "alpha" / "pseudo_labels.tif").is_file()
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert "train" in stages and "train-detector" in stages  # forwarded from the worker
    assert record["training"]["stages"]["kd"]["model"] == str(out / "student.kdmsi")


@pytest.mark.slow
def test_a_killed_worker_does_not_lose_its_scene(scenes: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL the worker that runs a scene: the scene is done again elsewhere, nothing lost."""
    environment = dict(os.environ)  # Dask's nanny sets OMP_NUM_THREADS=1 etc. here: undone below
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    client = distributed.Client(cluster)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["record"] = batch_scenes(
                scenes["four"], tmp_path / "out", config=tiny_config(),
                model=scenes["detector"], cluster=cluster.scheduler_address, device="cpu",
            )  # fmt: skip
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    try:
        thread = threading.Thread(target=run)
        thread.start()
        killed = _kill_a_busy_worker(client, deadline=time.monotonic() + 120)
        thread.join(timeout=300)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    finally:
        client.close()
        cluster.close()
        _restore_environment(environment)
    record = outcome["record"]
    by_name = {s["name"]: s for s in record["scenes"]}
    assert record["counts"] == {"complete": 3, "skipped": 0, "failed": 1}
    for name in ("alpha", "beta", "gamma"):
        assert by_name[name]["status"] == "complete"
        assert by_name[name]["worker"] != killed  # finished by a live worker
        for final in ("change.tif", "change_probability.tif", "changes.gpkg", "run.json"):
            assert (tmp_path / "out" / name / final).is_file()
        with rasterio.open(tmp_path / "out" / name / "change.tif") as src:
            assert src.read().size > 0  # complete files under final names
        # what the killed worker had half written was under temporary names, since removed
        assert not [p.name for p in (tmp_path / "out" / name).iterdir() if ".partial-" in p.name]
    assert by_name["bad"]["status"] == "failed"


@pytest.mark.slow
def test_cancel_stops_the_running_scenes_without_files(
    scenes: dict[str, Any], tmp_path: Path
) -> None:
    """Cancelled once the scenes start: every task stops at its next check, nothing is left."""
    from kdmsi_engine.errors import CancelledError
    from kdmsi_engine.progress import Progress

    started: dict[str, float] = {}

    def watch(event: Any) -> None:
        if event.kind == "stage" and event.stage == "scenes":
            started["at"] = time.monotonic()

    def cancelled() -> bool:  # a second after the scenes went out to the workers
        return "at" in started and time.monotonic() - started["at"] > 1.0

    manifest = tmp_path / "big.csv"
    row = f"{SAMPLE / 'taizhou_2000.tif'},{SAMPLE / 'taizhou_2003.tif'},"
    manifest.write_text("name,before,after,labels\n" + "".join(f"g{i},{row}\n" for i in (1, 2, 3)))
    with pytest.raises(CancelledError):
        batch_scenes(
            manifest, tmp_path / "out", config=tiny_config(), model=scenes["detector"],
            cluster="local:2", device="cpu", progress=Progress(watch, cancelled),
        )  # fmt: skip
    # the tasks stopped themselves before the cluster closed: no temporary file is left, and a
    # file under its final name is complete
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [p.name for p in files if ".partial-" in p.name]
    for path in files:
        if path.suffix == ".tif":
            with rasterio.open(path) as src:
                assert src.read().size > 0


def _kill_a_busy_worker(client: Any, deadline: float) -> str:
    """Wait until a worker runs one of the batch's scene tasks; SIGKILL its process."""
    while time.monotonic() < deadline:
        busy = {
            worker: keys
            for worker, keys in client.processing().items()
            if any(str(key).startswith("kdmsi-") for key in keys)
        }
        if busy:
            worker = next(iter(busy))
            pid = client.run(os.getpid, workers=[worker])[worker]
            os.kill(pid, signal.SIGKILL)
            return worker
        time.sleep(0.02)
    raise AssertionError("no worker ran a scene task in time")
