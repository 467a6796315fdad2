"""The worker launcher: JSON progress, one-line errors, cancel ends the worker within seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest


def test_grid_progress_events_and_result(plugin, taizhou, tmp_path: Path) -> None:
    from kdmsi_qgis import worker

    events: list[dict] = []
    output = tmp_path / "grid.gpkg"
    argv = worker.engine_command(
        "grid", [taizhou["before"], taizhou["after"], "-o", str(output), "--tile-size", "128"]
    )
    assert argv[:4] == [sys.executable, "-m", "kdmsi_engine", "grid"]
    assert argv[-2:] == ["--progress", "json"]
    result = worker.run_engine(argv, on_event=events.append)
    assert result.success, result.error
    assert result.exit_code == 0 and result.error == ""
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stage" and kinds[-1] == "result"
    assert any(e["event"] == "progress" and e.get("fraction") == 1.0 for e in events)
    assert Path(result.result["grid"]).resolve() == output.resolve()
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(str(output), "grid", "ogr")
    assert layer.isValid() and layer.crs().authid() == result.result["crs"] == "EPSG:32651"
    assert layer.featureCount() == result.result["tiles"] >= 4


def test_missing_interpreter_is_reported(plugin) -> None:
    from kdmsi_qgis import worker

    argv = worker.engine_command("env", [], python="/nonexistent/bin/python3")
    result = worker.run_engine(argv)
    assert not result.success and result.exit_code is None
    assert "/nonexistent/bin/python3" in result.error and "Python" in result.error


def test_missing_module_gives_the_install_command(plugin) -> None:
    from kdmsi_qgis import worker

    code = "import sys; sys.stderr.write(\"ModuleNotFoundError: No module named 'torch'\\n\"); sys.exit(1)"
    result = worker.run_engine([sys.executable, "-c", code])
    assert not result.success and result.exit_code == 1
    assert "torch" in result.error and "pip install torch" in result.error


def test_cancel_kills_a_worker_that_ignores_sigterm(plugin) -> None:
    from kdmsi_qgis import worker

    code = (
        "import json, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print(json.dumps({'event': 'stage', 'stage': 'train'}), flush=True)\n"
        "time.sleep(120)\n"
    )
    started: list[float] = []
    result = worker.run_engine(
        [sys.executable, "-c", code],
        on_event=lambda e: started.append(time.monotonic()),
        is_cancelled=lambda: bool(started),
        grace_s=1.0,
    )
    assert started
    elapsed = time.monotonic() - started[0]
    assert result.cancelled and not result.success
    assert result.exit_code == -9  # SIGKILL after the grace period
    assert elapsed < 5.0
    assert "cancelled" in result.error


def test_environment_check_runs_env_standalone(plugin) -> None:
    from kdmsi_qgis import worker

    argv = worker.engine_command("env", [], device="cpu")
    assert argv[1:3] == ["-m", "kdmsi_engine.cli.env"]
    assert argv[3:] == ["--progress", "json", "--device", "cpu"]


def test_environment_check_names_the_missing_device(plugin) -> None:
    import importlib.util

    from kdmsi_qgis import envcheck

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is needed to ask for a device")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    report = envcheck.check_environment("cuda")
    assert not report["ok"]
    assert any("cuda" in p.lower() for p in report["problems"])


def test_environment_check_names_the_torch_upgrade(plugin, monkeypatch) -> None:
    """A torch older than the engine's floor (2.6, CVE-2025-32434) is a problem the check shows
    with the version found and the command that upgrades it."""
    from kdmsi_engine.cli import env as env_cli
    from kdmsi_qgis import envcheck, worker

    real_version = env_cli._version
    monkeypatch.setattr(
        env_cli,
        "_version",
        lambda module: "2.5.1" if module.__name__ == "torch" else real_version(module),
    )
    engine_report = env_cli.environment_report("cpu")  # what the worker would print
    result = worker.EngineResult(
        success=True, exit_code=0, result=engine_report, command=[sys.executable]
    )
    report = envcheck.check_environment_from_result(result)
    command = f'"{sys.executable}" -m pip install --upgrade "torch>=2.6"'
    assert report["ok"] is False
    (problem,) = report["problems"]
    assert (
        problem.startswith("torch 2.5.1 is too old, the engine needs >=2.6") and command in problem
    )
    assert command in envcheck.format_report(report)
