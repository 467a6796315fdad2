"""Helpers shared by the reliability tests (owner: RELIABILITY).

Small, real file systems for the failure modes that matter: a tiny tmpfs that fills up (a real
``ENOSPC`` from the kernel) and a read-only mount (``EROFS``; root ignores permission bits, not a
read-only mount). When mounting is not allowed, callers fall back to other real OS errors.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

MOUNT = shutil.which("mount") or "/bin/mount"
UMOUNT = shutil.which("umount") or "/bin/umount"


def _run(args: list[str]) -> bool:
    try:
        done = subprocess.run(args, capture_output=True, timeout=20, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def tmpfs(base: Path, *, size_kib: int = 64, read_only: bool = False) -> Iterator[Path | None]:
    """Mount a tmpfs of ``size_kib`` under ``base``; yield its path, or ``None`` if not allowed."""
    point = base / f"mnt-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    if not _run([MOUNT, "-t", "tmpfs", "-o", options, "tmpfs", str(point)]):
        point.rmdir()
        yield None
        return
    try:
        yield point
    finally:
        if not _run([UMOUNT, str(point)]):
            _run([UMOUNT, "-l", str(point)])
        with contextlib.suppress(OSError):
            point.rmdir()


def partial_files(folder: Path) -> list[Path]:
    """Temporary files that :mod:`kdmsi_engine.atomic` left in ``folder`` (recursively)."""
    return [p for p in folder.rglob("*") if ".partial-" in p.name]


def listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: a snapshot to compare before and after a job."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_raster(source: Path, target: Path, **changes: object) -> Path:
    """Copy a real raster, changing profile entries (crs, transform, nodata) and/or its pixels.

    ``changes`` may hold ``fill`` (a value written over every pixel) besides profile keys.
    """
    import numpy as np
    import rasterio

    fill = changes.pop("fill", None)
    with rasterio.open(source) as src:
        profile = src.profile.copy()
        data = src.read()
    profile.update(changes)
    if fill is not None:
        data = np.full_like(data, fill)
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
    return target


def scene_scaling(before: Path, after: Path, bands: tuple[int, ...] = (1, 2, 3)) -> dict:
    """The band scaling the engine computes for a real pair (as stored in model files)."""
    from kdmsi_engine.data.scene import ScenePair

    with ScenePair.open(before, after, bands=bands) as scene:
        return scene.scaling.to_dict()


def make_kdmsi_model(
    path: Path,
    scaling: dict,
    *,
    bands: tuple[int, ...] = (1, 2, 3),
    backbone: str = "efficientnet-lite0",
    tile_size: int = 64,
) -> Path:
    """An untrained KD-MSI model file as ``kdmsi train`` writes it (for refusal tests)."""
    import torch

    from kdmsi_engine.modelfile import save_model
    from kdmsi_engine.models.kdmsi import MODEL_KIND, build_kdmsi_models

    torch.manual_seed(0)
    architecture = {
        "backbone": backbone,
        "in_channels": len(bands),
        "teacher_combination": "diff",
        "student_combination": "diff",
    }
    teacher, student = build_kdmsi_models({"architecture": architecture})
    metadata = {
        "kind": MODEL_KIND,
        "architecture": architecture,
        "bands": list(bands),
        "scaling": scaling,
        "tile_size": tile_size,
    }
    tensors = {"teacher": teacher.state_dict(), "student": student.state_dict()}
    return save_model(path, metadata, tensors)


def make_detector_model(
    path: Path,
    scaling: dict,
    *,
    bands: tuple[int, ...] = (1, 2, 3),
    backbone: str = "efficientnet-lite0",
    tile_size: int = 64,
) -> Path:
    """An untrained detector model file as ``kdmsi train-detector`` writes it."""
    import torch

    from kdmsi_engine.modelfile import save_model
    from kdmsi_engine.models.deeplab import DETECTOR_KIND, architecture_dict, build_detector

    torch.manual_seed(0)
    model = build_detector(backbone, in_channels=len(bands))
    metadata = {
        "kind": DETECTOR_KIND,
        "architecture": architecture_dict(backbone, len(bands)),
        "bands": list(bands),
        "scaling": scaling,
        "scalings": {},
        "tile_size": tile_size,
        "backbone_weights": "none",
        "training": {},
    }
    return save_model(path, metadata, {"detector": model.state_dict()})


def cached_models(base: Path, before: Path, after: Path) -> dict[str, Path]:
    """KD-MSI and detector model files for the Taizhou pair, built once per test session.

    ``base`` is pytest's session temp folder (``tmp_path_factory.getbasetemp()``), shared by
    every module that asks.
    """
    folder = base / "reliability-models"
    paths = {"kdmsi": folder / "kdmsi.kdmsi", "detector": folder / "detector.kdmsi"}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(exist_ok=True)
    scaling = scene_scaling(before, after)
    if not paths["kdmsi"].is_file():
        make_kdmsi_model(paths["kdmsi"], scaling)
    if not paths["detector"].is_file():
        make_detector_model(paths["detector"], scaling)
    return paths
