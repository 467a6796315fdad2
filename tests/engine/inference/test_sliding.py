"""Sliding-window scene inference: coverage, blending, streaming output, nodata, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from kdmsi_engine.errors import CancelledError, InputError, OutputError
from kdmsi_engine.inference.sliding import (
    blend_weights,
    fit_window,
    predict_scene,
    predict_scene_multi,
    scene_windows,
    window_starts,
)
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import PROB_NODATA


@dataclass
class _Grid:
    crs: object
    transform: Affine
    width: int
    height: int


@dataclass
class _Read:
    before: np.ndarray
    after: np.ndarray
    valid: np.ndarray


class ArrayScene:
    """A stand-in ScenePair over in-memory arrays (grid + boundless ``read``)."""

    def __init__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray, grid) -> None:
        self.before, self.after, self.valid, self.grid = before, after, valid, grid
        self.num_bands = before.shape[0]
        self.reads = 0

    def read(self, window: Window) -> _Read:
        self.reads += 1
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        c = self.before.shape[0]
        out_b = np.zeros((c, h, w), np.float32)
        out_a = np.zeros((c, h, w), np.float32)
        valid = np.zeros((h, w), bool)
        hh = max(0, min(h, self.grid.height - r0))
        ww = max(0, min(w, self.grid.width - c0))
        sl = (slice(r0, r0 + hh), slice(c0, c0 + ww))
        valid[:hh, :ww] = self.valid[sl]
        out_b[:, :hh, :ww] = self.before[(slice(None), *sl)] * valid[:hh, :ww]
        out_a[:, :hh, :ww] = self.after[(slice(None), *sl)] * valid[:hh, :ww]
        return _Read(out_b, out_a, valid)


def scene_from_file(before: Path, after: Path) -> ArrayScene:
    """A real uint8 pair on the before raster's grid (same grid for both dates here)."""
    with rasterio.open(before) as b, rasterio.open(after) as a:
        grid = _Grid(b.crs, b.transform, b.width, b.height)
        bb = b.read([1, 2, 3]).astype(np.float32) / 255.0
        aa = a.read([1, 2, 3]).astype(np.float32) / 255.0
    return ArrayScene(bb, aa, np.ones(bb.shape[1:], bool), grid)


def absdiff_predict(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Deterministic per-pixel stand-in: mean absolute difference of the bands."""
    return (after - before).abs().mean(dim=1).clamp(0, 1)


def test_window_starts_cover_and_shift_inside():
    assert window_starts(100, 256, 64) == [0]
    assert window_starts(256, 256, 64) == [0]
    assert window_starts(500, 256, 64) == [0, 192, 244]
    assert window_starts(448, 256, 64) == [0, 192]
    strips = scene_windows(500, 300, 256, 64)
    assert len(strips) == 2 and len(strips[0]) == 3
    covered = np.zeros((300, 500), int)
    for strip in strips:
        for w in strip:
            covered[w.row_off : w.row_off + 256, w.col_off : w.col_off + 256] += 1
    assert covered.min() >= 1


def test_blend_weights_positive_and_tapered():
    w = blend_weights(64)
    assert w.min() > 0.0
    assert w.max() <= 1.0 and w[32, 32] > 0.99
    assert w[0, 0] < 0.01
    np.testing.assert_allclose(w, w.T)


def _constant_scene(width, height, value=0.5):
    grid = _Grid(CRS.from_epsg(32618), Affine(30, 0, 1000, 0, -30, 5000), width, height)
    arr = np.full((3, height, width), value, np.float32)
    return ArrayScene(arr, arr, np.ones((height, width), bool), grid)


def test_every_pixel_covered_and_agreeing_windows_unchanged(tmp_path):
    scene = _constant_scene(301, 187)

    def predict(before, after):
        return torch.full(before.shape[:1] + before.shape[2:], 0.37)

    out = predict_scene(scene, predict, tmp_path / "p.tif", tile_size=64, overlap=16, batch_size=3)
    with rasterio.open(out) as src:
        data = src.read(1)
    np.testing.assert_allclose(data, 0.37, atol=1e-6)


def test_blending_equals_single_window_for_pixelwise_predictor(shared_data, tmp_path):
    base = shared_data / "landsat-taizhou-nanjing"
    scene = scene_from_file(base / "A" / "taizhou.tif", base / "B" / "taizhou.tif")
    out = predict_scene(scene, absdiff_predict, tmp_path / "t.tif", tile_size=128, overlap=32)
    expected = np.abs(scene.after - scene.before).mean(axis=0)
    with rasterio.open(out) as src:
        data = src.read(1)
        assert src.crs == scene.grid.crs
        assert src.transform == scene.grid.transform
        assert (src.width, src.height) == (400, 400)
        assert src.nodata == PROB_NODATA
        assert src.dtypes[0] == "float32"
        assert src.profile["compress"] == "deflate"
        assert src.block_shapes[0] == (400, 400) or src.block_shapes[0][0] % 16 == 0
    np.testing.assert_allclose(data, expected, atol=2e-6)
    assert expected.std() > 0.01  # real imagery: the check is not trivial


def test_blending_is_weighted_mean_of_disagreeing_windows(tmp_path):
    """Windows that disagree give the taper-weighted mean of their values."""
    scene = _constant_scene(96, 64)
    calls = []

    def predict(before, after):
        n = before.shape[0]
        vals = torch.tensor([0.2 if len(calls) % 2 == 0 else 0.8] * n)
        calls.append(n)
        return vals[:, None, None].expand(n, 64, 64).clone()

    out = predict_scene(scene, predict, tmp_path / "d.tif", tile_size=64, overlap=32, batch_size=1)
    # windows at columns 0 and 32 (batch of 1): values 0.2 then 0.8
    w = blend_weights(64)[0]
    col = 48  # in both windows: offset 48 in the first, 16 in the second
    expect = (0.2 * w[48] + 0.8 * w[16]) / (w[48] + w[16])
    with rasterio.open(out) as src:
        data = src.read(1)
    assert abs(data[10, col] - expect) < 1e-5
    assert abs(data[10, 5] - 0.2) < 1e-6 and abs(data[10, 90] - 0.8) < 1e-6


def test_nodata_where_input_invalid_and_small_scene_padded(tmp_path):
    scene = _constant_scene(50, 40)
    scene.valid[:, :10] = False  # a nodata edge
    scene.valid[35:, :] = False

    def predict(before, after):
        return (before[:, 0] * 0 + 0.9).clamp(0, 1)

    out = predict_scene(scene, predict, tmp_path / "n.tif", tile_size=64, overlap=16)
    with rasterio.open(out) as src:
        data = src.read(1)
    assert (data[:, :10] == PROB_NODATA).all()
    assert (data[35:, :] == PROB_NODATA).all()
    np.testing.assert_allclose(data[:35, 10:], 0.9, atol=1e-6)


def test_large_grid_streams_in_strips_with_overviews(tmp_path):
    """A scene taller than the 512-row output buffer; every window read once."""
    scene = _constant_scene(130, 1100)
    rows = np.arange(1100, dtype=np.float32)[:, None] / 1100.0
    scene.before = np.broadcast_to(rows, (3, 1100, 130)).copy()
    scene.after = np.zeros_like(scene.before)
    out = predict_scene(scene, absdiff_predict, tmp_path / "s.tif", tile_size=64, overlap=16)
    n_windows = sum(len(s) for s in scene_windows(130, 1100, 64, 16))
    assert scene.reads == n_windows
    with rasterio.open(out) as src:
        data = src.read(1)
        assert src.overviews(1) == [2, 4, 8]
    np.testing.assert_allclose(data, np.broadcast_to(rows, (1100, 130)), atol=2e-6)


def test_multi_output(tmp_path):
    scene = _constant_scene(70, 70, 0.25)

    def predict(before, after):
        p = before[:, :1].clamp(0, 1)
        return torch.cat([1 - p, p], dim=1)

    out = predict_scene_multi(scene, predict, tmp_path / "m.tif", bands=2, tile_size=32, overlap=8)
    with rasterio.open(out) as src:
        assert src.count == 2
        np.testing.assert_allclose(src.read(1), 0.75, atol=1e-6)
        np.testing.assert_allclose(src.read(2), 0.25, atol=1e-6)


def test_errors_write_nothing(tmp_path):
    scene = _constant_scene(70, 70)
    with pytest.raises(InputError):
        predict_scene(scene, absdiff_predict, tmp_path / "e.tif", tile_size=64, overlap=64)
    with pytest.raises(InputError):
        predict_scene(scene, absdiff_predict, tmp_path / "e.tif", batch_size=0)
    existing = tmp_path / "exists.tif"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError):
        predict_scene(scene, absdiff_predict, existing, tile_size=32, overlap=8)
    assert existing.read_bytes() == b"keep"
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(CancelledError):
        predict_scene(
            scene,
            absdiff_predict,
            tmp_path / "c.tif",
            tile_size=32,
            overlap=8,
            batch_size=1,
            progress=Progress(is_cancelled=cancel),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.tif"]


def test_read_ahead_and_msi_chunks_keep_the_map_of_one_window_at_a_time(shared_data, tmp_path):
    """Issue 14: reads in a background thread, in-place blending and MSI cut into chunks.

    The map of a real scene (Landsat Taizhou, 400 x 400, a random-weight resnet18 student, MSI
    at 256 px windows, batch 4, so every scale-2 forward is a chunk of one window) equals the
    map blended here window by window with the plain formula, each window's MSI computed
    alone. Tolerance 1e-5 (float32; batch sizes may pick other convolution kernels).
    """
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.inference.maps import msi_map, prepare_for_inference
    from kdmsi_engine.models.kdmsi import architecture, build_kdmsi_models

    torch.manual_seed(0)
    _, student = build_kdmsi_models(architecture("resnet18", 3))
    student = prepare_for_inference(student)
    scales = (0.5, 1.0, 1.5, 2.0)

    def predict(before, after):
        return msi_map(student, before, after, scales, amp=False)

    base = shared_data / "landsat-taizhou-nanjing"
    tile, overlap = 256, 64
    pair = (base / "A" / "taizhou.tif", base / "B" / "taizhou.tif")
    with ScenePair.open(*pair, bands=(1, 2, 3)) as scene:
        out = predict_scene(
            scene, predict, tmp_path / "m.tif", tile_size=tile, overlap=overlap, batch_size=4
        )
        height, width = scene.grid.height, scene.grid.width
        num = np.zeros((height, width), np.float64)
        den = np.zeros((height, width), np.float64)
        weight = blend_weights(tile)
        for strip in scene_windows(width, height, tile, overlap):
            for window in strip:
                read = scene.read(window)
                with torch.no_grad():
                    p = predict(
                        torch.from_numpy(read.before[None]), torch.from_numpy(read.after[None])
                    )
                r, c = int(window.row_off), int(window.col_off)
                h, w = min(tile, height - r), min(tile, width - c)
                wv = (weight * read.valid)[:h, :w]
                num[r : r + h, c : c + w] += p[0].numpy()[:h, :w] * wv
                den[r : r + h, c : c + w] += wv
    expected = np.where(den > 0, np.clip(num / np.maximum(den, 1e-30), 0, 1), PROB_NODATA)
    with rasterio.open(out) as src:
        data = src.read(1)
    np.testing.assert_allclose(data, expected, atol=1e-5)
    assert expected[den > 0].std() > 1e-4  # the map is not flat


def test_fit_window_computes_least_and_stays_in_bounds():
    # 2048 px at most 512, overlap 16: 432 px windows, 5 per axis, 1.11x the scene's pixels
    assert fit_window(2048, 2048, 128, 512, 16) == 432
    assert fit_window(400, 400, 128, 512, 16) == 400  # one window covers the scene
    assert fit_window(100, 100, 128, 512, 16) == 128  # smaller than the smallest window
    for width, height in ((8192, 8192), (1000, 700), (3000, 517)):
        size = fit_window(width, height, 128, 512, 16)
        assert 128 <= size <= 512 and size % 16 == 0
        windows = len(window_starts(width, size, 16)) * len(window_starts(height, size, 16))
        assert windows * size * size < 1.2 * width * height


class _RecordingDataset:
    """Records ``write`` calls (thread, window, a copy of the array); fails on request."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, int, np.ndarray]] = []
        self.fail_at = fail_at
        self.delay = delay

    def write(self, array: np.ndarray, *, window: Window) -> None:
        import threading
        import time

        time.sleep(self.delay)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise OSError("disk full")
        self.calls.append((threading.current_thread().name, int(window.row_off), array.copy()))


def test_write_behind_writes_in_order_off_the_main_thread_and_raises_its_errors():
    """Issue 14: finished row blocks are written by one background thread, in order; a failed
    write is raised in the caller, and on an error in the caller queued writes are dropped."""
    from kdmsi_engine.inference.sliding import WRITE_BEHIND, _WriteBehind

    dst = _RecordingDataset()
    with _WriteBehind(dst) as writer:
        for row in range(5):
            writer.write(np.full((1, 2, 3), row, np.float32), window=Window(0, row * 2, 3, 2))
            assert len(writer.pending) <= WRITE_BEHIND
    assert [c[1] for c in dst.calls] == [0, 2, 4, 6, 8]
    assert all(c[0].startswith("kdmsi-write") for c in dst.calls)
    assert [int(c[2][0, 0, 0]) for c in dst.calls] == [0, 1, 2, 3, 4]

    failing = _RecordingDataset(fail_at=1)
    with pytest.raises(OSError, match="disk full"):
        with _WriteBehind(failing) as writer:
            for row in range(4):
                writer.write(np.zeros((1, 2, 3), np.float32), window=Window(0, row * 2, 3, 2))
    assert len(failing.calls) == 1

    slow = _RecordingDataset(delay=0.2)
    with pytest.raises(RuntimeError, match="stop"):
        with _WriteBehind(slow) as writer:
            writer.write(np.zeros((1, 2, 3), np.float32), window=Window(0, 0, 3, 2))
            writer.write(np.zeros((1, 2, 3), np.float32), window=Window(0, 2, 3, 2))
            raise RuntimeError("stop")
    assert len(slow.calls) <= 1  # the second, not started, was dropped; the pool is shut down
