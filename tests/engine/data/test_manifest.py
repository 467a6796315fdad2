"""Scene manifests: ``name,before,after,labels`` CSVs with paths relative to the CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdmsi_engine.data import SceneSpec, read_manifest
from kdmsi_engine.errors import ManifestError


def _landsat(shared_data: Path) -> Path:
    return shared_data / "landsat-taizhou-nanjing"


def test_manifest_paths_are_relative_to_the_csv(tmp_path: Path, shared_data: Path) -> None:
    folder = _landsat(shared_data)
    (tmp_path / "labels.gpkg").write_bytes(b"")
    manifest = tmp_path / "scenes.csv"
    manifest.write_text(
        "name,before,after,labels\n"
        f"taizhou,{folder}/A/taizhou.tif,{folder}/B/taizhou.tif,labels.gpkg\n"
        f"nanjing, {folder}/A/nanjing.tif ,{folder}/B/nanjing.tif,\n"
        "\n"
    )
    specs = read_manifest(manifest)
    assert specs == [
        SceneSpec(
            "taizhou", folder / "A/taizhou.tif", folder / "B/taizhou.tif", tmp_path / "labels.gpkg"
        ),
        SceneSpec("nanjing", folder / "A/nanjing.tif", folder / "B/nanjing.tif", None),
    ]


def test_relative_scene_paths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for name in ("a.tif", "b.tif"):
        (tmp_path / "data" / name).write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,before,after\ns1,data/a.tif,data/b.tif\n")
    (spec,) = read_manifest(manifest)
    assert spec.before == tmp_path / "data" / "a.tif" and spec.labels is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,before\nx,a.tif\n", "lacks column"),
        ("name,before,after,labels\n", "lists no scenes"),
        ("name,before,after,labels\nx,a.tif,a.tif,\nx,a.tif,a.tif,\n", "duplicate name"),
        ("name,before,after,labels\n,a.tif,a.tif,\n", "empty name"),
        ("name,before,after,labels\nx/y,a.tif,a.tif,\n", "folder name"),
        ("name,before,after,labels\nx,missing.tif,a.tif,\n", "does not exist"),
        ("name,before,after,labels\nx,a.tif,,\n", "empty after"),
        ("name,before,after,labels\nx,a.tif,a.tif,nolabels.gpkg\n", "labels file"),
    ],
)
def test_manifest_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a.tif").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message) as exc:
        read_manifest(manifest)
    assert "\n" not in str(exc.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")
