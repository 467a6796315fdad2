"""Atomic outputs: nothing half-written under a final name, nothing overwritten unasked.

Owner: RELIABILITY (issue 6 item 2). The disk-full and read-only cases use real kernel errors: a
64 KiB tmpfs (``ENOSPC``) and a read-only tmpfs (``EROFS``); where mounting is not allowed, the
``/dev/full`` device (``ENOSPC`` from the kernel) and a file standing where the folder should be.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import partial_files, tmpfs

from kdmsi_engine.atomic import (
    PARTIAL_MARK,
    atomic_output,
    check_output,
    check_output_dir,
    partial_path,
    write_text_atomic,
)
from kdmsi_engine.errors import CancelledError, KdmsiError, OutputError

REPO = Path(__file__).resolve().parents[2]


def test_success_renames_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "change.tif"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.suffix == ".tif", "GDAL picks the driver from the extension"
        assert tmp.name.startswith(".") and PARTIAL_MARK in tmp.name
        assert not target.exists(), "the final name must not exist while writing"
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert partial_files(tmp_path) == []


def test_partial_names_are_unique(tmp_path: Path) -> None:
    target = tmp_path / "a.gpkg"
    names = {partial_path(target).name for _ in range(50)}
    assert len(names) == 50


@pytest.mark.parametrize(
    "error", [RuntimeError("bug"), CancelledError("cancelled"), KeyboardInterrupt()]
)
def test_block_raising_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.tif"
    with pytest.raises(type(error)), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        Path(f"{tmp}.aux.xml").write_text("<x/>")
        raise error
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [], "temporary file and its GDAL side files removed"


def test_sqlite_side_files_removed(tmp_path: Path) -> None:
    target = tmp_path / "changes.gpkg"
    with pytest.raises(ValueError), atomic_output(target) as tmp:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").write_bytes(b"x")
        raise ValueError("fail")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_kept_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "model.kdmsi"
    target.write_bytes(b"earlier result")
    with pytest.raises(OutputError, match="already exists.*replacing"), atomic_output(target):
        pytest.fail("the block must not run when the output exists")
    assert target.read_bytes() == b"earlier result"
    with pytest.raises(OutputError, match="already exists"):
        write_text_atomic(target, "new")
    assert target.read_bytes() == b"earlier result"
    assert partial_files(tmp_path) == []


def test_overwrite_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new but failed")
        raise RuntimeError("crash")
    assert target.read_text() == "old", "a failed overwrite keeps the earlier output"
    write_text_atomic(target, "new", overwrite=True)
    assert target.read_text() == "new"


def test_block_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "x.tif"
    with pytest.raises(OutputError, match="nothing was written"), atomic_output(target):
        pass
    assert not target.exists()


def test_output_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path)


def test_missing_parent_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "nope" / "x.tif")


def test_file_in_place_of_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "outdir"
    blocker.write_text("I am a file")
    with pytest.raises(OutputError):
        check_output(blocker / "change.tif")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(blocker)
    with pytest.raises(OutputError, match="cannot create"):
        check_output_dir(blocker / "sub")
    assert blocker.read_text() == "I am a file"


def test_read_only_folder(tmp_path: Path) -> None:
    """Root ignores permission bits, so use a read-only mount (or a file in place of the folder)."""
    with tmpfs(tmp_path, read_only=True) as ro:
        if ro is None:  # no mount here: a folder under a file is just as unwritable
            blocker = tmp_path / "file"
            blocker.write_text("x")
            folder = blocker / "sub"
        else:
            folder = ro
        with pytest.raises(OutputError, match="writable|does not exist|file"):
            check_output(folder / "change.tif")
        with pytest.raises(OutputError):
            check_output_dir(folder)
        with pytest.raises(OutputError):
            check_output_dir(folder / "new-subfolder")
        if ro is not None:
            assert list(ro.iterdir()) == []


def test_disk_full_is_output_error(tmp_path: Path) -> None:
    """A disk that fills up while writing: OutputError naming the file, nothing left behind."""
    with tmpfs(tmp_path, size_kib=64) as small:
        if small is None:
            _disk_full_via_dev_full(tmp_path)
            return
        earlier = small / "earlier.json"
        earlier.write_text("{}")
        target = small / "change.tif"
        with pytest.raises(OutputError, match="disk full") as info, atomic_output(target) as tmp:
            with open(tmp, "wb") as handle:
                for _ in range(64):  # 1 MiB into a 64 KiB file system
                    handle.write(os.urandom(16384))
                    handle.flush()
                    os.fsync(handle.fileno())
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
        assert str(target) in str(info.value)
        assert "\n" not in str(info.value)
        assert not target.exists()
        assert sorted(p.name for p in small.iterdir()) == ["earlier.json"]
        assert earlier.read_text() == "{}"
        # Space is given back: the next write to the same file system succeeds.
        write_text_atomic(target, "ok")
        assert target.read_text() == "ok"


def _disk_full_via_dev_full(tmp_path: Path) -> None:
    target = tmp_path / "change.tif"
    with pytest.raises(OutputError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_bytes(b"start")
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"x" * 4096)
    assert not target.exists()
    assert partial_files(tmp_path) == []


def test_disk_full_real_device(tmp_path: Path) -> None:
    """``/dev/full`` makes the kernel answer every write with ENOSPC: same outcome."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    _disk_full_via_dev_full(tmp_path)


def test_other_os_error_is_output_error(tmp_path: Path) -> None:
    target = tmp_path / "x.tif"
    with pytest.raises(OutputError, match="cannot write"), atomic_output(target) as tmp:
        tmp.write_bytes(b"x")
        os.rmdir(tmp_path / "does-not-exist")  # FileNotFoundError from the OS
    assert not target.exists()
    assert partial_files(tmp_path) == []


def test_output_errors_are_kdmsi_errors() -> None:
    assert issubclass(OutputError, KdmsiError)
    assert OutputError.exit_code == 2
    assert CancelledError.exit_code == 130


_WRITER = """
import sys, time
from kdmsi_engine.atomic import atomic_output
with atomic_output(sys.argv[1], overwrite=True) as tmp:
    with open(tmp, "wb") as handle:
        handle.write(b"x" * 100000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_sigkill_while_writing_keeps_earlier_output(tmp_path: Path) -> None:
    """A killed writer leaves the earlier file untouched and nothing new under the final name."""
    target = tmp_path / "change.tif"
    target.write_bytes(b"earlier complete output")
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", _WRITER, str(target)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "writing"
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"earlier complete output"
    leftovers = partial_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")
    assert leftovers[0].stat().st_size == 100000
    # The next write of the same output removes what the killed writer left behind.
    write_text_atomic(target, "new", overwrite=True)
    assert target.read_text() == "new"
    assert partial_files(tmp_path) == []


def test_stale_partials_of_live_or_other_writers_kept(tmp_path: Path) -> None:
    """Only partials of dead writers on this host are removed; others may be in progress."""
    import socket

    target = tmp_path / "change.tif"
    own = partial_path(target)  # this (live) process
    own.write_bytes(b"in progress")
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())
    other_host = tmp_path / f".change{PARTIAL_MARK}another-machine-1-abcdef.tif"
    other_host.write_bytes(b"written over the network")
    dead = tmp_path / f".change{PARTIAL_MARK}{host}-{_dead_pid()}-abcdef.tif"
    dead.write_bytes(b"left by a killed job")
    Path(f"{dead}.aux.xml").write_text("<x/>")
    unrelated = tmp_path / f".change_probability{PARTIAL_MARK}{host}-{_dead_pid()}-abcdef.tif"
    unrelated.write_bytes(b"another output's partial")
    write_text_atomic(target, "done")
    assert own.exists() and other_host.exists() and unrelated.exists()
    assert not dead.exists() and not Path(f"{dead}.aux.xml").exists()


def _dead_pid() -> int:
    """A process id that is not running (a child that has exited and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    proc.wait()
    return proc.pid


def test_disk_full_gdal_geotiff(tmp_path: Path) -> None:
    """GDAL reports ENOSPC at close without raising: the truncated GeoTIFF must not be renamed."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with tmpfs(tmp_path, size_kib=64) as small:
        if small is None:
            pytest.skip("cannot mount a small file system here")
        target = small / "change_probability.tif"
        data = np.random.default_rng(0).random((1, 512, 512), dtype=np.float32)
        with pytest.raises(OutputError, match="disk full"), atomic_output(target) as tmp:
            profile = {
                "driver": "GTiff",
                "width": 512,
                "height": 512,
                "count": 1,
                "dtype": "float32",
                "crs": "EPSG:32651",
                "transform": from_origin(203325, 3604935, 30, 30),
                "tiled": True,
            }
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(data)
        assert not target.exists()
        assert list(small.iterdir()) == []


def test_disk_full_gdal_geopackage(tmp_path: Path) -> None:
    """SQLite's 'database or disk is full' arrives as a RuntimeError from fiona."""
    import geopandas as gpd
    from shapely.geometry import box

    frame = gpd.GeoDataFrame(
        {"tile_id": range(3000)},
        geometry=[box(i, 0, i + 1, 1) for i in range(3000)],
        crs="EPSG:32651",
    )
    with tmpfs(tmp_path, size_kib=64) as small:
        if small is None:
            pytest.skip("cannot mount a small file system here")
        target = small / "changes.gpkg"
        with pytest.raises(OutputError, match="disk full"), atomic_output(target) as tmp:
            frame.to_file(tmp, driver="GPKG", layer="changes")
        assert not target.exists()
        assert list(small.iterdir()) == []
