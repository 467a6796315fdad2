"""Run ``kdmsi`` in-process and check the bad-input contract (owner: RELIABILITY).

Contract (issue 2 item 7, issue 6 item 1): exit status 2, exactly one line on stderr that starts
``kdmsi COMMAND: error:``, a JSON ``error`` event last on stdout with ``--progress json``, and
nothing written: the watched folders hold the same files, same sizes, as before.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from reliability_helpers import listing

from kdmsi_engine import cli


@dataclass
class CliRun:
    code: int
    out: str
    err: str

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def run_cli(args: list[str], capfd: pytest.CaptureFixture[str]) -> CliRun:
    previous = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capfd.readouterr()
    try:
        code = cli.main([*args, "--progress", "json"])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for handler in root.handlers[:]:  # main's basicConfig writes to this test's stderr
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    out, err = capfd.readouterr()
    return CliRun(code, out, err)


def assert_refused(
    args: list[str],
    capfd: pytest.CaptureFixture[str],
    message: str,
    *,
    watch: list[Path],
    code: int = 2,
) -> CliRun:
    """Run ``kdmsi ARGS`` and check it was refused with one line matching ``message``."""
    before = {str(folder): listing(folder) for folder in watch}
    run = run_cli(args, capfd)
    command = args[0]
    lines = run.err.splitlines()
    assert run.code == code, f"exit {run.code}, stderr:\n{run.err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{run.err}"
    assert lines[0].startswith(f"kdmsi {command}: error: "), lines[0]
    assert re.search(message, lines[0]), f"{message!r} not in {lines[0]!r}"
    events = run.events
    assert events and events[-1]["event"] == "error", run.out[-500:]
    assert events[-1]["message"] in lines[0]
    after = {str(folder): listing(folder) for folder in watch}
    assert after == before, f"files changed: {before} -> {after}"
    return run
