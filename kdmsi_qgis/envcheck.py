"""'Check environment': runs ``kdmsi env`` in the configured Python and explains the result."""

from __future__ import annotations

import logging
from typing import Any

from kdmsi_qgis import settings, worker

logger = logging.getLogger(__name__)


def check_environment(device: str = "auto", python: str | None = None) -> dict[str, Any]:
    """Run ``kdmsi env`` and return its report, plus ``ok``, ``summary`` and ``problems``.

    Never raises: a worker that cannot start or import the engine gives a report with the
    reason and the command that fixes it.
    """
    python = python or settings.python_executable()
    argv = worker.engine_command("env", [], device=device, python=python)
    return check_environment_from_result(worker.run_engine(argv))


def check_environment_from_result(result: worker.EngineResult) -> dict[str, Any]:
    """The report of a finished ``kdmsi env`` worker (see :func:`check_environment`)."""
    report: dict[str, Any] = dict(result.result)
    report.setdefault("python", result.command[0] if result.command else "?")
    problems = [
        f"{item['package']} is missing ({item['needed_for']}): {item['command']}"
        for item in report.get("missing", [])
    ]
    problems.extend(
        f"{item['package']} {item['found']} is too old, the engine needs {item['required']} "
        f"({item['problem']}); upgrade it: {item['command']}"
        for item in report.get("upgrade", [])
    )
    if report.get("device_error"):
        problems.append(str(report["device_error"]))
    if not result.success:
        problems.insert(0, result.error)
        report["ok"] = False
    report["problems"] = problems
    report.setdefault("summary", result.error)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as lines of text for a dialog or the dock's log."""
    lines = [f"Python: {report.get('python')} ({report.get('python_version', '?')})"]
    if "engine_version" in report:
        lines.append(f"KD-MSI engine: {report['engine_version']} ({report.get('engine_path')})")
    lines.append(f"torch: {report.get('torch', 'unknown')}")
    cuda = report.get("cuda_available")
    if cuda is not None:
        build = report.get("torch_cuda_build") or "CPU-only build"
        lines.append(f"CUDA available: {'yes' if cuda else 'no'} (torch CUDA: {build})")
    lines.append(f"Device: {report.get('device') or '-'} {report.get('device_description') or ''}")
    lines.append(f"GPU: {report.get('gpu_name') or 'none'}")
    if "rasterio" in report:
        lines.append(f"rasterio: {report['rasterio']} (GDAL {report.get('gdal')})")
    problems = report.get("problems") or []
    if problems:
        lines.append("Problems:")
        lines.extend(f"  - {p}" for p in problems)
    else:
        lines.append("Everything the engine needs is installed.")
    return "\n".join(lines)
