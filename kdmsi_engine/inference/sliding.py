"""Whole-scene inference with overlapping, blended windows, streamed to a GeoTIFF.

:func:`predict_scene` runs a batch predictor over every window of a scene pair and writes one
float32 change-probability GeoTIFF on the scene's grid. :func:`predict_scene_multi` does the
same for predictors that return several maps per window (class probabilities of a detector).

How the scene is covered:
    * Windows of ``tile_size`` pixels start every ``tile_size - overlap`` pixels; the last
      window of each row/column is shifted inside the scene so it ends on the border. A scene
      smaller than one tile gets one window that reads past the border (boundless read: padding
      is invalid, zero-valued input).
    * Each window's prediction is weighted by a separable taper ``w(i) = floor + (1 - floor) *
      sin^2(pi (i + 0.5) / tile_size)`` (:func:`blend_weights`), a Hann window lifted above
      zero (``floor`` = 0.01), so borders of windows count little where another window covers
      the pixel, yet every pixel has a positive weight even at the scene border. The output is
      ``sum(w p) / sum(w)`` over windows covering the pixel: where overlapping windows agree it
      equals their prediction exactly.
    * Weights are multiplied by the scene's valid mask: pixels invalid in the input (nodata in
      either date, outside the intersection) are written as :data:`PROB_NODATA` (-1).

Streaming and memory bound:
    Windows are blended one strip (one row of windows) at a time; batches of ``batch_size``
    windows run across strips, so no strip ends in a short batch. Two accumulators of
    ``tile_size`` rows x scene width (weighted sum and weight, float32) hold the strip being
    blended; rows that no later window touches are moved to an output buffer of
    :data:`~kdmsi_engine.rasterio_out.BLOCK_SIZE` (512) rows x width, handed to the GeoTIFF
    each time it holds a full row of 512 x 512 tiles. Both ends of the model run in background
    threads: one reads (and scales) the next :data:`READ_AHEAD` batches while the model runs on
    the current one, another writes (and, once GDAL's cache is full, compresses) finished rows,
    at most :data:`WRITE_BEHIND` row blocks behind; windows are weighted in place as they are
    blended. Peak memory is therefore ``(1 + READ_AHEAD) * batch_size`` windows of input,
    ``batch_size`` of output, plus about ``(2 * tile_size + (1 + WRITE_BEHIND) * 512) * width *
    4 * bands`` bytes of buffers (``width = 8192``, ``tile_size = 256``, one band: 48 MB) and a
    GDAL block cache bounded to 64 MB; it does not depend on the scene's height, and only these
    row buffers grow with its width.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rasterio.windows import Window

from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.errors import InputError
from kdmsi_engine.progress import Progress
from kdmsi_engine.rasterio_out import (
    BLOCK_SIZE,
    PROB_NODATA,
    add_overviews,
    bounded_gdal_cache,
    create_geotiff,
)

logger = logging.getLogger(__name__)

#: lowest blending weight (relative to a window's centre); never zero, so every pixel counts.
WEIGHT_FLOOR = 0.01
#: batches read ahead of the one the model runs on (each holds ``batch_size`` windows)
READ_AHEAD = 2
#: finished 512-row blocks that may wait for the writer thread before blending waits for it
WRITE_BEHIND = 2

PredictBatch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def window_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of windows along one axis (last one shifted inside the scene).

    Args:
        length: scene size along the axis (pixels).
        tile_size: window size.
        overlap: overlap between neighbouring windows (``0 <= overlap < tile_size``).
    """
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def scene_windows(width: int, height: int, tile_size: int, overlap: int) -> list[list[Window]]:
    """Windows of the whole grid, grouped by strip (one list per row of windows)."""
    cols = window_starts(width, tile_size, overlap)
    return [
        [Window(c, r, tile_size, tile_size) for c in cols]
        for r in window_starts(height, tile_size, overlap)
    ]


def fit_window(width: int, height: int, smallest: int, largest: int, overlap: int) -> int:
    """The window size, a multiple of 16 in ``[smallest, largest]``, that computes least.

    Computed pixels are ``windows * size^2``: a window that fits the scene badly makes the last
    window of every row and column mostly repeat its neighbour (512 px windows on 2048 px: 5 per
    axis, 1.56x the scene; 432 px: also 5, 1.11x). Ties go to the larger window. A scene
    smaller than ``smallest`` gets one window of ``smallest``.
    """
    first = max(16, -(-smallest // 16) * 16, overlap + 16)
    best, best_cost = first, math.inf
    for size in range(first, max(first, largest) + 1, 16):
        cost = len(window_starts(width, size, overlap)) * len(window_starts(height, size, overlap))
        cost *= size * size
        if cost <= best_cost:
            best, best_cost = size, cost
    return best


def blend_weights(tile_size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """Separable tapered weight window (tile_size, tile_size), max 1, min ``floor`` > 0."""
    i = np.arange(tile_size, dtype=np.float64)
    taper = floor + (1.0 - floor) * np.sin(math.pi * (i + 0.5) / tile_size) ** 2
    return np.outer(taper, taper).astype(np.float32)


def check_window_params(tile_size: int, overlap: int, batch_size: int) -> None:
    if not isinstance(tile_size, int) or tile_size < 16:
        raise InputError(f"tile size {tile_size!r} is too small; use at least 16 (e.g. 256)")
    if not isinstance(overlap, int) or overlap < 0 or overlap >= tile_size:
        raise InputError(
            f"overlap {overlap!r} must be >= 0 and smaller than the tile size {tile_size}; "
            "use e.g. a quarter of the tile size"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size {batch_size!r} must be a positive integer")


class _StripBlender:
    """Blends strips of windows and writes finished rows in 512-row blocks.

    ``dst`` is anything with rasterio's ``write(array, window=...)`` (a dataset or a
    :class:`_WriteBehind`); each block handed to it is a new array, never written to again.
    """

    def __init__(self, dst: Any, width: int, height: int, tile_size: int, bands: int) -> None:
        self.dst = dst
        self.width = width
        self.height = height
        self.tile = tile_size
        self.bands = bands
        # accumulator rows [base, base + tile) of the scene
        self.base = 0
        self.num = np.zeros((bands, tile_size, width), np.float32)
        self.den = np.zeros((tile_size, width), np.float32)
        # output buffer rows [out_start, out_start + out_len)
        self.out = np.full((bands, BLOCK_SIZE, width), PROB_NODATA, np.float32)
        self.out_start = 0
        self.out_len = 0

    def add(self, window: Window, pred: np.ndarray, weight: np.ndarray) -> None:
        """Accumulate ``pred`` (bands, t, t) weighted by ``weight`` (t, t), clipped to the grid.

        ``pred`` is overwritten (weighted in place): no temporary window-sized copies.
        """
        r0 = int(window.row_off) - self.base
        c0 = int(window.col_off)
        h = min(self.tile, self.height - int(window.row_off))
        w = min(self.tile, self.width - c0)
        pred = pred[:, :h, :w]
        pred *= weight[None, :h, :w]  # in place: the prediction is not used again
        self.num[:, r0 : r0 + h, c0 : c0 + w] += pred
        self.den[r0 : r0 + h, c0 : c0 + w] += weight[:h, :w]

    def finish_rows(self, upto: int) -> None:
        """Rows ``[base, upto)`` are final: move them to the output buffer, shift the strip."""
        n = upto - self.base
        if n <= 0:
            return
        num, den = self.num[:, :n], self.den[:n]
        done = np.full((self.bands, n, self.width), PROB_NODATA, np.float32)
        covered = den > 0
        np.divide(num, den[None], out=done, where=covered[None])
        np.clip(done, 0.0, 1.0, out=done, where=covered[None])
        self._buffer(done)
        keep = self.tile - n
        if keep > 0:
            self.num[:, :keep] = self.num[:, n:]
            self.den[:keep] = self.den[n:]
        self.num[:, max(keep, 0) :] = 0.0
        self.den[max(keep, 0) :] = 0.0
        self.base = upto

    def _buffer(self, rows: np.ndarray) -> None:
        pos = 0
        while pos < rows.shape[1]:
            take = min(BLOCK_SIZE - self.out_len, rows.shape[1] - pos)
            self.out[:, self.out_len : self.out_len + take] = rows[:, pos : pos + take]
            self.out_len += take
            pos += take
            if self.out_len == BLOCK_SIZE:
                self.flush()

    def flush(self) -> None:
        if self.out_len == 0:
            return
        window = Window(0, self.out_start, self.width, self.out_len)
        self.dst.write(self.out[:, : self.out_len], window=window)
        # the block now belongs to the writer (it may still be writing it): start a new one
        self.out = np.full_like(self.out, PROB_NODATA)
        self.out_start += self.out_len
        self.out_len = 0


class _SerialThread:
    """One background thread that runs submitted calls in order, and the futures not yet
    collected. Leaving it shuts the thread down; queued calls are dropped first when
    :meth:`drop_pending` is called (an error or a cancel in the caller)."""

    def __init__(self, name: str) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args, **kwargs))

    def collect(self) -> Any:
        """The result of the oldest pending call (waits; raises its error)."""
        return self.pending.popleft().result()

    def drop_pending(self) -> None:
        for future in self.pending:
            future.cancel()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


class _WriteBehind(_SerialThread):
    """Writes row blocks to a dataset in order in one background thread.

    GDAL compresses a block when it leaves its cache, inside ``write`` once the cache is full
    (scenes larger than the cache) and otherwise when the dataset is flushed; rasterio releases
    the GIL meanwhile, so the writes and compression of finished rows overlap with the model's
    work on the next windows. At most :data:`WRITE_BEHIND` blocks wait; the dataset is used by
    this thread only while the block is open. On leaving the block normally every write is
    finished (and its error raised); on an error, writes not yet started are dropped.
    """

    def __init__(self, dst: Any) -> None:
        super().__init__("kdmsi-write")
        self.dst = dst

    def __enter__(self) -> _WriteBehind:
        return self

    def write(self, array: np.ndarray, *, window: Window) -> None:
        """Queue ``array`` (not modified afterwards by the caller) for ``window``."""
        while len(self.pending) >= WRITE_BEHIND:
            self.collect()
        self.submit(self.dst.write, array, window=window)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self.collect()
            else:
                self.drop_pending()
        finally:
            self.shutdown()


def _batches(windows: Sequence[Window], size: int) -> Iterator[list[Window]]:
    for i in range(0, len(windows), size):
        yield list(windows[i : i + size])


def predict_scene_multi(
    scene: Any,
    predict_batch: PredictBatch,
    out_path: str | os.PathLike[str],
    *,
    bands: int,
    tile_size: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    band_descriptions: Sequence[str] | None = None,
    stage: str = "infer",
    tags: dict[str, Any] | None = None,
) -> Path:
    """Like :func:`predict_scene` for a predictor returning ``(B, bands, H, W)`` maps in [0, 1].

    Writes a ``bands``-band float32 GeoTIFF (e.g. class probabilities of a detector); nodata is
    :data:`PROB_NODATA` in every band where the input was invalid.
    """
    progress = progress or Progress()
    check_window_params(tile_size, overlap, batch_size)
    target = check_output(out_path, overwrite=overwrite)
    device = torch.device(device)
    grid = scene.grid
    strips = scene_windows(grid.width, grid.height, tile_size, overlap)
    total = sum(len(s) for s in strips)
    weight = blend_weights(tile_size)
    progress.stage(
        stage,
        total=total,
        message=f"{total} windows of {tile_size} px, overlap {overlap}, on {device}",
    )
    with (
        bounded_gdal_cache(),
        atomic_output(target, overwrite=overwrite) as tmp,
        create_geotiff(tmp, grid, count=bands, dtype="float32", nodata=PROB_NODATA) as dst,
    ):
        dst.update_tags(KDMSI_TILE_SIZE=str(tile_size), KDMSI_OVERLAP=str(overlap), **(tags or {}))
        if band_descriptions:
            for i, text in enumerate(band_descriptions[:bands], start=1):
                dst.set_band_description(i, text)
        # batches run across strips (no short batch at the end of every strip); a strip's
        # finished rows leave the accumulator as soon as its last window is blended
        row_ends = {
            id(strip[-1]): min(int(strips[k + 1][0].row_off), grid.height)
            for k, strip in enumerate(strips[:-1])
        }
        row_ends[id(strips[-1][-1])] = grid.height
        batches = list(_batches([w for strip in strips for w in strip], batch_size))
        with _WriteBehind(dst) as writer, _ReadAhead(scene, batches) as reads:
            blender = _StripBlender(writer, grid.width, grid.height, tile_size, bands)
            for batch, read in zip(batches, reads):
                progress.check_cancelled()
                pred = _predict(batch, read, predict_batch, device, bands)
                for i, window in enumerate(batch):
                    if pred is not None:
                        _blend(blender, window, pred[i], weight, read.valid[i])
                    if id(window) in row_ends:
                        blender.finish_rows(row_ends[id(window)])
                progress.advance(len(batch))
            blender.flush()
        progress.check_cancelled()
        add_overviews(dst, "average")
    return target


class _BatchRead(NamedTuple):
    """The stacked input of a batch of windows (``None`` where no pixel is valid)."""

    before: np.ndarray | None
    after: np.ndarray | None
    valid: list[np.ndarray]


def _read_batch(scene: Any, batch: list[Window]) -> _BatchRead:
    reads = [scene.read(window) for window in batch]
    valid = [r.valid for r in reads]
    if not any(v.any() for v in valid):
        return _BatchRead(None, None, valid)
    before = np.stack([r.before for r in reads]).astype(np.float32, copy=False)
    after = np.stack([r.after for r in reads]).astype(np.float32, copy=False)
    return _BatchRead(before, after, valid)


class _ReadAhead(_SerialThread):
    """Reads the batches in order in one background thread, :data:`READ_AHEAD` batches ahead.

    GDAL and NumPy release the GIL, so reading and scaling the next windows overlaps with the
    model's forward pass on the current ones (issue 14: they added 29 % to the model's time when
    done in turn). One thread does every read: the scene's datasets are never used by two
    threads at once. Leaving the block early (an error, a cancel) stops the reads.
    """

    def __init__(self, scene: Any, batches: list[list[Window]]) -> None:
        super().__init__("kdmsi-read")
        self.scene = scene
        self.batches = batches

    def __enter__(self) -> Iterator[_BatchRead]:
        return self._reads()

    def _reads(self) -> Iterator[_BatchRead]:
        queue = iter(self.batches)
        for batch in itertools.islice(queue, READ_AHEAD):
            self.submit(_read_batch, self.scene, batch)
        while self.pending:
            read = self.collect()
            following = next(queue, None)
            if following is not None:
                self.submit(_read_batch, self.scene, following)
            yield read

    def __exit__(self, *exc: object) -> None:
        self.drop_pending()
        self.shutdown()


def _predict(
    batch: list[Window],
    read: _BatchRead,
    predict_batch: PredictBatch,
    device: torch.device,
    bands: int,
) -> np.ndarray | None:
    """The predictions (B, bands, t, t) of a batch; ``None`` when no pixel is valid."""
    if read.before is None or read.after is None:
        return None
    before = torch.from_numpy(read.before).to(device)
    after = torch.from_numpy(read.after).to(device)
    with torch.no_grad():
        out = predict_batch(before, after)
    out = out.detach().float().cpu().contiguous()  # own memory: weighted in place when blended
    if out.ndim == 3:
        out = out[:, None]
    expected = (len(batch), bands, before.shape[-2], before.shape[-1])
    if tuple(out.shape) != expected:
        raise RuntimeError(f"predictor returned shape {tuple(out.shape)}, expected {expected}")
    return np.nan_to_num(out.numpy(), nan=0.0, copy=False)


def _blend(
    blender: _StripBlender, window: Window, pred: np.ndarray, weight: np.ndarray, valid: np.ndarray
) -> None:
    if valid.all():
        blender.add(window, pred, weight)
    elif valid.any():
        blender.add(window, pred, weight * valid)


def predict_scene(
    scene: Any,
    predict_batch: PredictBatch,
    out_path: str | os.PathLike[str],
    *,
    tile_size: int = 256,
    overlap: int = 64,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    tags: dict[str, Any] | None = None,
) -> Path:
    """Predict a change probability over a whole scene and write it as a GeoTIFF.

    Args:
        scene: an open :class:`~kdmsi_engine.data.scene.ScenePair` (``grid`` and
            ``read(window)`` are used).
        predict_batch: ``(before (B,C,H,W), after) -> (B,H,W)`` change probability in [0, 1];
            called under ``torch.no_grad()`` with tensors on ``device``.
        out_path: output GeoTIFF (float32, tiled 512, DEFLATE, overviews, nodata -1).
        tile_size: window size in pixels.
        overlap: overlap of neighbouring windows in pixels.
        batch_size: windows per call of ``predict_batch``.
        device: where input tensors are put.
        overwrite: replace an existing output.
        progress: progress and cancellation.
        tags: extra GeoTIFF metadata tags (``KDMSI_TILE_SIZE`` and ``KDMSI_OVERLAP`` are
            always written).

    Returns:
        the output path.

    Raises:
        InputError: bad tile size, overlap or batch size.
        OutputError: the output exists (without ``overwrite``) or cannot be written.
        CancelledError: cancelled; nothing is written.
    """
    return predict_scene_multi(
        scene,
        predict_batch,
        out_path,
        bands=1,
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
        progress=progress,
        band_descriptions=("change probability",),
        tags=tags,
    )
