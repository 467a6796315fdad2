"""Detection killed with SIGKILL: earlier outputs intact, nothing half-written under a final name.

Owner: RELIABILITY (issue 6 item 2). Real Taizhou Landsat pair, an (untrained) efficientnet-lite0
detector file as ``kdmsi train-detector`` writes it, ``kdmsi detect`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from cli_harness import assert_refused
from reliability_helpers import cached_models, partial_files

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("change_probability.tif", "change.tif", "changes.gpkg", "run.json")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pair(shared_data: Path) -> list[str]:
    root = shared_data / "landsat-taizhou-nanjing"
    return [str(root / "A" / "taizhou.tif"), str(root / "B" / "taizhou.tif")]


@pytest.fixture(scope="module")
def detector(pair, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return cached_models(tmp_path_factory.getbasetemp(), Path(pair[0]), Path(pair[1]))["detector"]


def _detect_args(pair: list[str], model: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdmsi_engine",
        "detect",
        *pair,
        "--model",
        str(model),
        "-o",
        str(out),
        "--batch-size",
        "1",
        # small windows: many of them, so a kill lands while windows are left (the default
        # window is fitted to the scene, one window here)
        "--tile-size",
        "128",
        "--overlap",
        "32",
        "--device",
        "cpu",
        "--progress",
        "json",
    ]


def _digests(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in OUTPUTS
        if (folder / name).exists()
    }


def _check_complete(folder: Path) -> None:
    """Every output under its final name opens and reads to the end."""
    import geopandas as gpd

    with rasterio.open(folder / "change_probability.tif") as ds:
        prob = ds.read(1, masked=True)
        assert ds.dtypes[0] == "float32"
        assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
        for level in ds.overviews(1):
            assert level > 1
    with rasterio.open(folder / "change.tif") as ds:
        classes = ds.read(1)
        assert set(np.unique(classes).tolist()) <= {0, 1, 255}
    polygons = gpd.read_file(folder / "changes.gpkg")
    assert polygons.crs is not None
    record = json.loads((folder / "run.json").read_text())
    assert isinstance(record, dict)


@pytest.fixture(scope="module")
def earlier(pair, detector, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A folder holding one complete, earlier detection."""
    out = tmp_path_factory.mktemp("detect") / "out"
    done = subprocess.run(  # noqa: S603
        _detect_args(pair, detector, out),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _check_complete(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    return out


def _run_and_kill(
    args: list[str], when, log: Path, sig: int = signal.SIGKILL
) -> tuple[int, list[dict]]:  # type: ignore[no-untyped-def]
    """Run ``args``; send ``sig`` when ``when(event)`` is true. Return (exit status, events)."""
    events: list[dict] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(  # noqa: S603
            args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=ENV
        )
    deadline = time.monotonic() + 240
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if when(event):
                os.kill(proc.pid, sig)
                if sig == signal.SIGKILL:
                    break
                when = _never  # keep reading: a cancelled job reports its error event
            assert time.monotonic() < deadline
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode, events


def _never(event: dict) -> bool:
    return False


def test_sigterm_cancels_detection_cleanly(pair, detector, earlier, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM (how the plugin cancels) stops between windows: exit 130, one line, nothing new."""
    before = _digests(earlier)
    partial_before = set(partial_files(earlier))
    args = [*_detect_args(pair, detector, earlier), "--overwrite"]

    def first_window(event: dict) -> bool:
        return event["event"] == "progress" and event["stage"] == "infer"

    log = tmp_path / "stderr.txt"
    code, events = _run_and_kill(args, first_window, log, signal.SIGTERM)
    lines = log.read_text().splitlines()
    assert code == 130, log.read_text()[-2000:]
    assert len(lines) == 1 and "cancel" in lines[0], lines
    assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "CancelledError"
    assert _digests(earlier) == before
    assert set(partial_files(earlier)) <= partial_before, (
        "a cancelled job removes its temporary files"
    )


def test_sigkill_during_detection_keeps_earlier_outputs(pair, detector, earlier, tmp_path) -> None:  # type: ignore[no-untyped-def]
    before = _digests(earlier)
    assert len(before) == 4
    args = [*_detect_args(pair, detector, earlier), "--overwrite"]

    def first_window(event: dict) -> bool:
        return event["event"] == "progress" and event["stage"] == "infer"

    code, events = _run_and_kill(args, first_window, tmp_path / "stderr.txt")
    assert code == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert events[-1]["done"] < events[-1]["total"], "killed while windows were left"
    assert _digests(earlier) == before, "earlier outputs must be untouched"
    assert all(p.name.startswith(".") for p in partial_files(earlier))
    _check_complete(earlier)


@pytest.mark.slow
def test_sigkill_late_in_detection_leaves_only_complete_files(
    pair, detector, earlier, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Killed after the probability raster: every file under a final name is complete."""
    args = [*_detect_args(pair, detector, earlier), "--overwrite"]

    def later_stage(event: dict) -> bool:
        return event["event"] == "stage" and event["stage"] not in ("", "infer")

    code, events = _run_and_kill(args, later_stage, tmp_path / "stderr.txt")
    assert code == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert sorted(p.name for p in earlier.iterdir() if not p.name.startswith(".")) == sorted(
        OUTPUTS
    )
    _check_complete(earlier)
    # A new run over the leftovers (hidden partial files included) completes normally.
    done = subprocess.run(  # noqa: S603
        args, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _check_complete(earlier)
    assert partial_files(earlier) == [], "the new run removed what the killed runs left behind"


def test_detect_refuses_to_overwrite_without_flag(pair, detector, earlier, capfd) -> None:  # type: ignore[no-untyped-def]
    before = _digests(earlier)
    args = _detect_args(pair, detector, earlier)[3:-2]  # in-process: drop python -m ... --progress
    assert_refused(args, capfd, "already exists.*--overwrite", watch=[earlier])
    assert _digests(earlier) == before
