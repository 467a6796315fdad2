"""Scene manifests: a CSV with the header ``name,before,after,labels`` (labels may be empty).

Relative paths are taken from the CSV's folder. An optional ``pseudo`` column names each scene's
pseudo-label raster (detector training on several scenes). Every job reads manifests here:
``kdmsi batch``, multi-scene KD-MSI training and multi-scene detector training.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kdmsi_engine.atomic import write_text_atomic
from kdmsi_engine.errors import ManifestError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("name", "before", "after", "labels")


@dataclass
class SceneSpec:
    """One scene of a manifest.

    Attributes:
        name: unique scene name (used for output folders).
        before: raster of the first date.
        after: raster of the second date.
        labels: weak-label vector file, or ``None`` for scenes to detect only.
        pseudo: pseudo-label raster from the optional ``pseudo`` column (not checked here: only
            detector training uses it), or ``None``.
    """

    name: str
    before: Path
    after: Path
    labels: Path | None
    pseudo: Path | None = None


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def is_gdal_path(path: Path) -> bool:
    """Whether ``path`` is on one of GDAL's virtual file systems (``/vsis3/bucket/key.tif``)."""
    return str(path).startswith("/vsi")


def read_manifest(path: str | os.PathLike[str], *, check_files: bool = True) -> list[SceneSpec]:
    """Read and check a manifest.

    Raises:
        ManifestError: missing file, missing columns, empty, duplicate or bad names, or (with
            ``check_files``) files that do not exist.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist; give a CSV file")
    base = manifest.absolute().parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"manifest {manifest} cannot be read as CSV: {exc}") from exc
    missing = [c for c in ("name", "before", "after") if c not in header]
    if missing:
        raise ManifestError(
            f"manifest {manifest.name} lacks column(s) {', '.join(missing)}; the header must be "
            "name,before,after,labels"
        )
    specs: list[SceneSpec] = []
    seen: set[str] = set()
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        name = row.get("name", "")
        if not name:
            raise ManifestError(
                f"manifest {manifest.name} line {line}: empty name; name every scene"
            )
        if any(ch in name for ch in '/\\:*?"<>|') or name in (".", ".."):
            raise ManifestError(
                f"manifest {manifest.name} line {line}: name {name!r} cannot be a folder name; "
                "use letters, digits, - and _"
            )
        if name in seen:
            raise ManifestError(f"manifest {manifest.name} line {line}: duplicate name {name!r}")
        seen.add(name)
        paths = {}
        for key in ("before", "after"):
            if not row.get(key):
                raise ManifestError(f"manifest {manifest.name} line {line}: empty {key} path")
            paths[key] = _resolve(row[key], base)
        labels = _resolve(row["labels"], base) if row.get("labels") else None
        if check_files:
            for key, value in (*paths.items(), ("labels", labels)):
                # GDAL's virtual file systems (/vsis3/, /vsigs/, /vsiaz/ ...) are checked when
                # the scene opens them (on a cluster's worker, with its credentials)
                if value is not None and not is_gdal_path(value) and not value.exists():
                    raise ManifestError(
                        f"manifest {manifest.name} line {line}: {key} file {value} does not exist"
                    )
        pseudo = _resolve(row["pseudo"], base) if row.get("pseudo") else None
        specs.append(SceneSpec(name, paths["before"], paths["after"], labels, pseudo))
    if not specs:
        raise ManifestError(f"manifest {manifest.name} lists no scenes; add one row per scene")
    return specs


def write_manifest(path: Path, specs: list[SceneSpec]) -> None:
    """Write ``specs`` as a manifest with absolute paths (atomically, replacing ``path``)."""
    rows = [("name", "before", "after", "labels")]
    rows += [
        (
            s.name,
            str(Path(s.before).absolute()),
            str(Path(s.after).absolute()),
            str(Path(s.labels).absolute()) if s.labels is not None else "",
        )
        for s in specs
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buffer.getvalue(), overwrite=True)
