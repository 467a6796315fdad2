"""``make package``: the installable QGIS plugin zip, ``dist/kdmsi_qgis.zip``.

The zip holds one folder, ``kdmsi_qgis/``, as "Install from ZIP" expects: the plugin's Python
files, ``metadata.txt``, ``LICENSE``, the icons and QML styles (``resources/``) and the engine
(``kdmsi_qgis/kdmsi_engine/``, which the plugin puts on the worker's ``PYTHONPATH``). No
binaries, data, model weights or caches go in. Entries are sorted and dated from
``SOURCE_DATE_EPOCH`` (default 1980-01-01), so the same sources give the same zip.

Usage: ``python -m scripts.package [--output dist/kdmsi_qgis.zip] [--no-overwrite]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kdmsi_engine.atomic import atomic_output
from kdmsi_engine.errors import KdmsiError, OutputError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "kdmsi_qgis"
DEFAULT_OUTPUT = REPO_ROOT / "dist" / f"{PLUGIN_NAME}.zip"

#: File kinds allowed in the zip, per source folder (relative to the repository root).
SOURCES: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("kdmsi_qgis", "", frozenset({".py", ".ui", ".qm"})),
    ("kdmsi_engine", "kdmsi_engine", frozenset({".py", ".typed"})),
    ("resources/icons", "resources/icons", frozenset({".svg", ".png"})),
    ("resources/styles", "resources/styles", frozenset({".qml"})),
)
#: Single files: (source, name inside the plugin folder).
FILES = (("metadata.txt", "metadata.txt"), ("LICENSE", "LICENSE"))
#: Never shipped, whatever their folder.
EXCLUDED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"})
#: Largest file allowed (icons and code are small; anything bigger is data or weights).
MAX_FILE_BYTES = 512 * 1024


def plugin_files(root: Path = REPO_ROOT) -> Iterator[tuple[Path, str]]:
    """``(source file, name in the zip)`` for every file of the plugin, sorted by name."""
    entries: dict[str, Path] = {}
    for source, target, suffixes in SOURCES:
        folder = root / source
        if not folder.is_dir():
            raise OutputError(f"{folder} is missing; run make package from a full checkout")
        for path in folder.rglob("*"):
            relative = path.relative_to(folder)
            if not path.is_file() or EXCLUDED_DIRS.intersection(relative.parts):
                continue
            if any(part.startswith(".") for part in relative.parts):
                continue
            if path.suffix.lower() not in suffixes:
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                raise OutputError(
                    f"{path} is {path.stat().st_size} bytes: too big for the plugin zip "
                    "(data or weights do not ship); move it out of the source folders"
                )
            name = "/".join(p for p in (PLUGIN_NAME, target, relative.as_posix()) if p)
            entries[name] = path
    for source, target in FILES:
        path = root / source
        if not path.is_file():
            raise OutputError(f"{path} is missing; the plugin zip needs it")
        entries[f"{PLUGIN_NAME}/{target}"] = path
    for name in sorted(entries):
        yield entries[name], name


def build_zip(
    output: Path = DEFAULT_OUTPUT, *, overwrite: bool = True, root: Path = REPO_ROOT
) -> Path:
    """Write the plugin zip to ``output``; return its path."""
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))
    stamp = time.gmtime(max(epoch, 315532800))[:6]
    files = list(plugin_files(root))
    with atomic_output(output, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path, name in files:
                info = zipfile.ZipInfo(name, date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, path.read_bytes())
    logger.info("wrote %s (%d files)", output, len(files))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the installable QGIS plugin zip.")
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--no-overwrite", action="store_true", help="refuse to replace an existing zip"
    )
    args = parser.parse_args(argv)
    try:
        path = build_zip(args.output, overwrite=not args.no_overwrite)
    except KdmsiError as exc:
        print(f"package: error: {exc}", file=sys.stderr)
        return exc.exit_code
    with zipfile.ZipFile(path) as archive:
        count = len(archive.namelist())
    print(f"{path} ({count} files, {path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
