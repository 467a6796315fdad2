"""``qgis_process`` (the binary: Debian's wrapper passes an option 3.22 rejects) sees and runs
the provider from the unpacked zip in a clean profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"


@pytest.fixture(scope="module")
def qgis_process_env(plugins_dir: Path, tmp_path_factory) -> dict[str, str]:
    if not Path(QGIS_PROCESS).is_file():
        raise RuntimeError(f"{QGIS_PROCESS} not found; install the qgis package")
    home = tmp_path_factory.mktemp("home")  # a clean QGIS profile
    env = dict(os.environ, HOME=str(home), QGIS_PLUGINPATH=str(plugins_dir))
    env.update(QT_QPA_PLATFORM="offscreen", KDMSI_PYTHON=sys.executable)
    env["XDG_RUNTIME_DIR"] = str(home)
    done = subprocess.run(
        [QGIS_PROCESS, "plugins", "enable", "kdmsi_qgis"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env


def test_qgis_process_lists_the_provider(qgis_process_env) -> None:
    done = subprocess.run(
        [QGIS_PROCESS, "list"], env=qgis_process_env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    listed = {
        line.split()[0] for line in done.stdout.splitlines() if line.strip().startswith("kdmsi:")
    }
    assert listed == {
        "kdmsi:labellinggrid",
        "kdmsi:quickpreview",
        "kdmsi:trainmodel",
        "kdmsi:changeprobability",
        "kdmsi:pseudolabels",
        "kdmsi:traindetector",
        "kdmsi:detectchanges",
        "kdmsi:runchain",
        "kdmsi:vectorize",
        "kdmsi:evaluate",
        "kdmsi:suggesttiles",
    }


def test_qgis_process_runs_the_grid(qgis_process_env, taizhou, tmp_path: Path) -> None:
    output = tmp_path / "grid.gpkg"
    done = subprocess.run(
        [
            QGIS_PROCESS,
            "run",
            "kdmsi:labellinggrid",
            "--",
            f"BEFORE={taizhou['before']}",
            f"AFTER={taizhou['after']}",
            "TILE_SIZE=128",
            f"OUTPUT={output}",
        ],
        env=qgis_process_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert output.is_file()
    assert f"OUTPUT:\t{output}" in done.stdout
