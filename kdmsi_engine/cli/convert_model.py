"""``kdmsi convert-model OLD.kdmsi NEW.kdmsi``: rewrite an old model file as safetensors.

Model files written before format version 2 are ``torch.save`` pickles; they still load (with a
warning), but only the safetensors format loads without unpickling anything. The conversion keeps
the metadata, the tensors and the checksum exactly, and reads the new file back before it
reports success. NEW is written atomically and only replaces an existing file with
``--overwrite`` (NEW may then be OLD itself).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from kdmsi_engine.progress import Progress

NAME = "convert-model"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``convert-model`` sub-command."""
    parser = subparsers.add_parser(
        NAME,
        parents=[common],
        help="rewrite an old (pickle) .kdmsi model file in the safetensors format",
        description=(
            "Read OLD (a model file of any version this engine reads) and write NEW in the "
            "current safetensors format, with the same metadata, tensors and checksum. Old "
            "pickle files are read with torch's weights-only loader only."
        ),
    )
    parser.add_argument("old", metavar="OLD", help="model file to convert (.kdmsi)")
    parser.add_argument("new", metavar="NEW", help="model file to write (.kdmsi)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, progress: Progress) -> Mapping[str, Any]:
    from kdmsi_engine.modelfile import convert_model

    progress.stage(NAME, total=1, message=f"converting {args.old}")
    result = convert_model(args.old, args.new, overwrite=args.overwrite)
    progress.advance(1)
    return result
