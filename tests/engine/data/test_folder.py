"""Folder datasets (A/ B/ label/): real LEVIR-CD, DSIFN-CD and AirChange samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from kdmsi_engine.data import (
    dataset_tiles,
    find_pairs,
    make_tile_grid,
    mask_tile_labels,
    open_folder_pair,
    read_mask,
)
from kdmsi_engine.errors import LabelError


def _label_array(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.mark.parametrize(
    ("folder", "count"), [("levir-cd-samples", 11), ("dsifn-cd-samples", 10), ("airchange", 13)]
)
def test_find_pairs(shared_data: Path, folder: str, count: int) -> None:
    pairs = find_pairs(shared_data / folder)
    assert len(pairs) == count
    assert [p.name for p in pairs] == sorted(p.name for p in pairs)
    for pair in pairs:
        assert pair.before.parent.name == "A" and pair.after.parent.name == "B"
        assert pair.label is not None and pair.label.stem == pair.name


@pytest.mark.parametrize("folder", ["levir-cd-samples", "dsifn-cd-samples"])
def test_tile_labels_match_masks(shared_data: Path, folder: str) -> None:
    for pair in find_pairs(shared_data / folder):
        label = _label_array(pair.label)
        assert set(np.unique(label)) <= {0, 255}
        with open_folder_pair(pair) as scene:
            assert scene.grid.crs is None and (scene.grid.width, scene.grid.height) == (256, 256)
            assert scene.scaling.method == "uint8"
            tiles = make_tile_grid(scene, 64)
        labels = mask_tile_labels(pair, tiles)
        assert len(labels) == 16
        for (_, row), got in zip(tiles.iterrows(), labels):
            block = label[row.row_off : row.row_off + 64, row.col_off : row.col_off + 64]
            assert got == int((block > 0).any())
        whole = read_mask(pair, Window(0, 0, 256, 256))
        assert whole.dtype == np.uint8
        assert np.array_equal(whole, (label > 0).astype(np.uint8))


def test_levir_no_change_pair(shared_data: Path) -> None:
    pairs = find_pairs(shared_data / "levir-cd-samples")
    empty = [p for p in pairs if not _label_array(p.label).any()]
    assert len(empty) == 1  # the README's all-zero, no-change pair
    with open_folder_pair(empty[0]) as scene:
        tiles = make_tile_grid(scene, 128)
    assert mask_tile_labels(empty[0], tiles).tolist() == [0, 0, 0, 0]


def test_airchange_pair_of_another_size(shared_data: Path) -> None:
    pairs = find_pairs(shared_data / "airchange")
    sizes = {}
    for pair in pairs:
        with open_folder_pair(pair) as scene:
            sizes[pair.name] = (scene.grid.width, scene.grid.height)
    assert sizes.pop("Archieve") == (1048, 724)
    assert set(sizes.values()) == {(952, 640)}
    pair = next(p for p in pairs if p.name == "Archieve")
    label = _label_array(pair.label)
    with open_folder_pair(pair) as scene:
        tiles = make_tile_grid(scene, 256, overlap=64)
        # Full-size tiles; the last row and column end at the image edge.
        assert set(tiles.width) == {256} and set(tiles.height) == {256}
        assert tiles.col_off.max() == 1048 - 256 and tiles.row_off.max() == 724 - 256
        tile = scene.read(Window(792, 468, 256, 256))
        with rasterio.open(pair.before) as src:
            raw = src.read([1, 2, 3], window=Window(792, 468, 256, 256))
        np.testing.assert_allclose(tile.before, raw / 255.0, atol=1e-6)
    labels = mask_tile_labels(pair, tiles)
    for (_, row), got in zip(tiles.iterrows(), labels):
        block = label[row.row_off : row.row_off + 256, row.col_off : row.col_off + 256]
        assert got == int((block > 0).any())
    # Boundless mask read: outside the image is no change.
    edge = read_mask(pair, Window(1000, 700, 100, 100))
    assert not edge[24:, :].any() and not edge[:, 48:].any()
    assert np.array_equal(edge[:24, :48], (label[700:, 1000:] > 0).astype(np.uint8))


def test_dataset_tiles(shared_data: Path) -> None:
    tiles = dataset_tiles(shared_data / "dsifn-cd-samples", tile_size=128)
    assert len(tiles) == 10 * 4
    assert tiles.crs is None
    assert tiles["scene"].nunique() == 10
    assert set(tiles["label"]) <= {0, 1}
    for name, group in tiles.groupby("scene"):
        label = _label_array(shared_data / "dsifn-cd-samples" / "label" / f"{name}.png")
        for _, row in group.iterrows():
            block = label[row.row_off : row.row_off + 128, row.col_off : row.col_off + 128]
            assert row.label == int((block > 0).any())


def test_bad_layouts(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(LabelError, match="does not exist"):
        find_pairs(tmp_path / "nothing")
    (tmp_path / "A").mkdir()
    with pytest.raises(LabelError, match="no B/"):
        find_pairs(tmp_path)
    (tmp_path / "B").mkdir()
    with pytest.raises(LabelError, match="holds no images"):
        find_pairs(tmp_path)
    source = shared_data / "levir-cd-samples"
    for sub in ("A", "B"):
        for name in ("test_2_0000_0000.png", "test_2_0000_0512.png"):
            shutil.copy(source / sub / name, tmp_path / sub / name)
    (tmp_path / "B" / "test_2_0000_0512.png").unlink()
    with pytest.raises(LabelError, match="test_2_0000_0512 is in only one"):
        find_pairs(tmp_path)
    shutil.copy(source / "B" / "test_2_0000_0512.png", tmp_path / "B")
    pairs = find_pairs(tmp_path)  # no label/ folder: pairs without masks
    assert [p.label for p in pairs] == [None, None]
    with pytest.raises(LabelError, match="label/"):
        find_pairs(tmp_path, require_labels=True)
    with pytest.raises(LabelError, match="no change mask"):
        read_mask(pairs[0], Window(0, 0, 8, 8))
    (tmp_path / "label").mkdir()
    shutil.copy(source / "label" / "test_2_0000_0000.png", tmp_path / "label")
    with pytest.raises(LabelError, match="test_2_0000_0512 has no change mask"):
        find_pairs(tmp_path)


def test_georeferenced_masks_follow_the_scene_grid(shared_data: Path) -> None:
    """OSCD pairs open on a UTM grid; their masks must be read on that grid, not their own."""
    from rasterio.warp import Resampling, reproject

    pair = next(p for p in find_pairs(shared_data / "oscd") if p.name == "abudhabi")
    with open_folder_pair(pair) as scene:
        grid = scene.grid
    assert grid.crs is not None and grid.crs.is_projected
    window = Window(128, 128, 256, 256)
    with rasterio.open(pair.label) as src:
        reference = np.zeros((grid.height, grid.width), dtype=np.uint8)
        reproject(
            (src.read(1) > 0).astype(np.uint8),
            reference,
            src_transform=src.transform,
            src_crs=src.crs,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            resampling=Resampling.nearest,
        )
    expected = reference[128:384, 128:384]
    got = read_mask(pair, window, grid)
    assert expected.sum() > 0
    assert np.mean(got == expected) > 0.995
    # Reading the mask file's own pixels at the scene's indexes would not match.
    assert not np.array_equal(read_mask(pair, window), expected)
