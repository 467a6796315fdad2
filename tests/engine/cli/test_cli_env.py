"""``kdmsi env``: what the environment has, and the exact command for what is missing."""

from __future__ import annotations

import importlib
import json
import sys

from kdmsi_engine.cli import env as env_cli
from kdmsi_engine.cli import main


def test_env_json_reports_python_torch_device_and_gdal(capsys) -> None:
    assert main(["env", "--progress", "json", "--device", "cpu"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "result"
    report = events[-1]["data"]
    assert report["python"] == sys.executable
    assert report["torch"].split("+")[0].count(".") == 2
    assert report["device"] == "cpu" and report["gpu_name"] is None
    assert report["gdal"].startswith("3.") and report["rasterio"] != "missing"
    assert report["ok"] is True and report["missing"] == [] and report["upgrade"] == []
    assert report["min_torch"] == "2.6" and report["versions"]["safetensors"]


def test_env_names_the_install_command_for_a_missing_package(monkeypatch) -> None:
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "torch":
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(env_cli.importlib, "import_module", fake_import)
    report = env_cli.environment_report("auto")
    assert report["ok"] is False and report["torch"] == "missing"
    (torch,) = [m for m in report["missing"] if m["package"] == "torch"]
    assert torch["required"] == "yes"
    assert torch["command"].startswith(f'"{sys.executable}" -m pip install "torch>=2.6"')
    assert "torch" in report["summary"] and "pip install" in report["summary"]
    assert report["device_description"] == "none (torch is missing)"


def test_env_reports_an_unavailable_device_without_failing() -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    report = env_cli.environment_report("cuda:0")
    assert report["ok"] is False and "cuda" in report["device_error"].lower()


def test_env_runs_standalone_without_the_other_commands() -> None:
    """``python -m kdmsi_engine.cli.env`` must not import the other sub-commands (their
    dependencies may be the very thing that is missing)."""
    import subprocess

    code = (
        "import sys, runpy\n"
        "sys.argv = ['kdmsi env', '--progress', 'json', '--device', 'cpu']\n"
        "try:\n"
        "    runpy.run_module('kdmsi_engine.cli.env', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "others = [m for m in sys.modules if m.startswith('kdmsi_engine.cli.')]\n"
        "assert others in ([], ['kdmsi_engine.cli.env']), others\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])["data"]
    assert report["device"] == "cpu" and report["python"] == sys.executable


def test_env_names_the_upgrade_for_a_torch_older_than_the_floor(monkeypatch) -> None:
    """torch before 2.6 has a known bypass of its weights-only loader (CVE-2025-32434): the
    report names the version found and the command that upgrades it."""
    real_version = env_cli._version

    def old_torch(module) -> str:  # type: ignore[no-untyped-def]
        return "2.5.1+cpu" if module.__name__ == "torch" else real_version(module)

    monkeypatch.setattr(env_cli, "_version", old_torch)
    report = env_cli.environment_report("cpu")
    assert report["ok"] is False and report["missing"] == []
    (item,) = report["upgrade"]
    command = f'"{sys.executable}" -m pip install --upgrade "torch>=2.6"'
    assert item["package"] == "torch" and item["found"] == "2.5.1+cpu"
    assert item["required"] == ">=2.6" and item["command"] == command
    assert "CVE-2025-32434" in item["problem"]
    assert "torch 2.5.1+cpu is too old" in report["summary"] and command in report["summary"]


def test_the_torch_floor_is_the_one_pyproject_requires(repo_root) -> None:  # type: ignore[no-untyped-def]
    """One floor: ``defaults.MIN_TORCH`` and the dependency in pyproject.toml agree."""
    import re

    from kdmsi_engine.defaults import MIN_TORCH

    text = (repo_root / "pyproject.toml").read_text(encoding="utf-8")
    assert re.findall(r'"torch>=([0-9.]+)"', text) == [MIN_TORCH]
    assert re.search(r'"safetensors>=0\.[4-9]', text), "model files need safetensors"
