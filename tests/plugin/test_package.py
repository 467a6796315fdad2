"""``make package``: one plugin folder with the engine and LICENSE, nothing else."""

from __future__ import annotations

import zipfile
from pathlib import Path


def test_zip_holds_plugin_engine_and_license_only(plugin_zip: Path, tmp_path: Path) -> None:
    from scripts.package import build_zip

    with zipfile.ZipFile(plugin_zip) as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    assert all(n.startswith("kdmsi_qgis/") for n in names)
    for required in (
        "kdmsi_qgis/__init__.py",
        "kdmsi_qgis/metadata.txt",
        "kdmsi_qgis/LICENSE",
        "kdmsi_qgis/resources/icons/kdmsi.svg",
        "kdmsi_qgis/resources/styles/probability.qml",
        "kdmsi_qgis/resources/styles/changes.qml",
        "kdmsi_qgis/kdmsi_engine/__init__.py",
        "kdmsi_qgis/kdmsi_engine/__main__.py",
        "kdmsi_qgis/kdmsi_engine/cli/__init__.py",
    ):
        assert required in names, required
    allowed = (".py", ".svg", ".png", ".qml", ".txt", ".typed")
    bad = [n for n in names if not (n.endswith(allowed) or n.endswith("/LICENSE"))]
    assert bad == []
    assert not [n for n in names if "__pycache__" in n or "/." in n]
    # same sources, same bytes (two builds now: others may edit the tree meanwhile)
    first = build_zip(tmp_path / "first.zip").read_bytes()
    assert build_zip(tmp_path / "again.zip").read_bytes() == first


def test_zip_refuses_large_files(tmp_path: Path, repo_root: Path) -> None:
    import shutil

    import pytest

    from kdmsi_engine.errors import OutputError
    from scripts.package import build_zip

    fake = tmp_path / "repo"
    for part in ("kdmsi_qgis", "kdmsi_engine", "resources/icons", "resources/styles"):
        (fake / part).mkdir(parents=True)
    for name in ("metadata.txt", "LICENSE"):
        shutil.copy(repo_root / name, fake / name)
    (fake / "kdmsi_engine" / "__init__.py").write_text("")
    (fake / "kdmsi_engine" / "weights.py").write_bytes(b"#" * (600 * 1024))
    (fake / "kdmsi_engine" / "model.pt").write_bytes(b"x")  # not shipped: not a source kind
    with pytest.raises(OutputError, match="too big"):
        build_zip(tmp_path / "x.zip", root=fake)
    (fake / "kdmsi_engine" / "weights.py").unlink()
    with zipfile.ZipFile(build_zip(tmp_path / "y.zip", root=fake)) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".pt")]
