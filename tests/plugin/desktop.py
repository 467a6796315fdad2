"""The real QGIS desktop under Xvfb: a fresh profile with the plugin from its zip, and a
scripted session (:mod:`desktop_session`) that uses the plugin by mouse.

Used by ``test_desktop.py``, and to refresh the screenshots of the README::

    .venv/bin/python tests/plugin/desktop.py --screenshots resources/screenshots

Xvfb (Debian package ``xvfb``) gives the desktop a real X screen, so QTest's pointer moves
reach the canvas as the X server's own motion events, as a user's would.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess  # nosec B404
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SESSION = HERE / "desktop_session.py"
SCREEN = "1600x1000x24"
#: QGIS settings of the fresh profile: the plugin on, no start-up questions.
PROFILE_SETTINGS = """[PythonPlugins]
kdmsi_qgis=true

[qgis]
checkVersion=false
showTips=false
allowVersionInformation=false

[core]
NewsFeed\\httpsfeedqgisorg\\disabled=true
"""


def missing_programs() -> list[str]:
    """Programs the desktop tests need that this machine lacks (with their Debian package)."""
    needed = {"Xvfb": "xvfb", "qgis": "qgis"}
    return [f"{name} (apt-get install {package})" for name, package in needed.items()
            if shutil.which(name) is None]  # fmt: skip


@contextmanager
def xvfb() -> Iterator[str]:
    """A private X server on a free display; yields ``:N`` and stops the server after."""
    read_end, write_end = os.pipe()
    server = subprocess.Popen(  # nosec B603 B607 (a fixed program, no shell)
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", SCREEN, "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        number = os.read(read_end, 32).decode().strip() if ready else ""
        if not number:
            raise RuntimeError("Xvfb did not start (no display number within 20 s)")
        yield f":{number}"
    finally:
        os.close(read_end)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def install_profile(profiles: Path, plugin_zip: Path) -> None:
    """A QGIS profile folder with the plugin unpacked (as 'Install from ZIP' does) and on."""
    default = profiles / "profiles" / "default"
    plugins = default / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(plugins)
    (default / "QGIS").mkdir()
    (default / "QGIS" / "QGIS3.ini").write_text(PROFILE_SETTINGS, encoding="utf-8")


def run_session(
    plugin_zip: Path,
    sample: Path,
    out: Path,
    *,
    screenshots: Path | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run :mod:`desktop_session` in the QGIS desktop; return what it recorded.

    ``sample`` is copied into ``out`` first (QGIS writes statistics beside rasters it opens).
    """
    out.mkdir(parents=True, exist_ok=True)
    scene = out / "sample"
    shutil.copytree(sample, scene, dirs_exist_ok=True)
    profiles = out / "profile"
    install_profile(profiles, plugin_zip)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QT_QPA_PLATFORM")}
    env.update(
        QT_QPA_PLATFORM="xcb",
        KDMSI_PYTHON=sys.executable,
        KDMSI_DESKTOP_SAMPLE=str(scene),
        KDMSI_DESKTOP_OUT=str(out),
        KDMSI_DESKTOP_SHOTS=str(screenshots or out / "screenshots"),
        XDG_RUNTIME_DIR=str(out / "runtime"),
    )
    (out / "runtime").mkdir(mode=0o700, exist_ok=True)
    command = [
        shutil.which("qgis") or "qgis",
        "--nologo",
        "--noversioncheck",
        "--profiles-path",
        str(profiles),
        "--code",
        str(SESSION),
    ]
    log = out / "qgis.log"
    with xvfb() as display, log.open("w") as stream:
        env["DISPLAY"] = display
        qgis = subprocess.Popen(  # nosec B603 (argument list, no shell)
            command, cwd=out, env=env, stdout=stream, stderr=subprocess.STDOUT
        )
        try:
            exit_code = qgis.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            qgis.send_signal(signal.SIGUSR1)  # the session writes every thread's stack
            time.sleep(2)
            qgis.kill()
            exit_code = qgis.wait()
    result_file = out / "session.json"
    if not result_file.is_file():
        stacks = out / "stacks.txt"
        tail = log.read_text(errors="replace")[-3000:]
        if stacks.is_file():
            tail += "\n" + stacks.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"QGIS exited ({exit_code}) without a result:\n{tail}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["exit_code"] = exit_code
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, default=REPO / "resources" / "screenshots")
    parser.add_argument("--work", type=Path, help="keep the session's files here (qgis.log)")
    args = parser.parse_args()
    missing = missing_programs()
    if missing:
        raise SystemExit("missing: " + ", ".join(missing))
    sys.path.insert(0, str(REPO))
    from scripts.package import build_zip

    with tempfile.TemporaryDirectory(prefix="kdmsi-desktop-") as temporary:
        work = args.work.resolve() if args.work else Path(temporary)
        plugin_zip = build_zip(work / "kdmsi_qgis.zip")
        result = run_session(
            plugin_zip,
            REPO / "resources" / "sample",
            work / "session",
            screenshots=args.screenshots.resolve(),
        )
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    raise SystemExit(main())
