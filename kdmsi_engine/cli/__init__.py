"""The ``kdmsi`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers,
common)``, which adds an ``argparse`` parser (with ``parents=[common]``) whose ``handler`` default
is a function ``handler(args, progress) -> dict | None``. The handler calls one engine job; the
returned dictionary is the job's result (paths written, metrics), printed as a ``result`` event
with ``--progress json`` and as ``key: value`` lines otherwise.

Every command takes ``--device``, ``--progress {bar,json,none}`` and ``--overwrite``. Bad input
ends with exit status 2 and one line on stderr that says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from typing import Any

from kdmsi_engine import __version__
from kdmsi_engine.environment import GDAL_CACHE_MB, configure_process, torchrun_process
from kdmsi_engine.errors import CancelledError, InputError, KdmsiError
from kdmsi_engine.progress import BarReporter, CancelFlag, JsonReporter, Progress, ProgressEvent

logger = logging.getLogger(__name__)

#: Sub-command modules, in the order ``kdmsi --help`` lists them.
COMMAND_MODULES = (
    "grid",
    "labels",
    "cva",
    "train",
    "infer",
    "pseudo",
    "evaluate",
    "train_detector",
    "detect",
    "vectorize",
    "run",
    "suggest",
    "batch",
    "convert_model",
    "export",
    "env",
)

#: Commands that train as one job over several processes started by ``torchrun``.
DISTRIBUTED_COMMANDS = ("train", "train-detector")


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument(
        "--device",
        default="auto",
        help="compute device: auto (CUDA if available, else CPU), cpu, cuda or cuda:N",
    )
    group.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="progress display: a bar on stderr, one JSON object a line on stdout, or nothing",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace outputs that already exist"
    )
    group.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    return common


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error."""

    #: Set by :func:`main` when the arguments ask for JSON progress, so usage errors are events too.
    json_errors = False

    def error(self, message: str) -> None:  # type: ignore[override]
        if _Parser.json_errors:
            print(ProgressEvent("error", message=message, data={"type": "UsageError"}).to_json())
        self.exit(2, f"kdmsi {self.prog.split(' ')[-1]}: error: {message}\n")


class _GdalNoise(logging.Filter):
    """GDAL messages relayed by rasterio/fiona (loggers ``*._env``) show with --verbose only.

    The engine turns GDAL failures into one clear error line; GDAL's own record is noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.endswith("._env")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdmsi",
        description="Weakly supervised change detection (KD-MSI) for georeferenced image pairs.",
    )
    parser.add_argument("--version", action="version", version=f"kdmsi {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    common = _common_parser()
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"kdmsi_engine.cli.{name}")
        module.register(subparsers, common)
    return parser


def _print_result(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key}: {value}")


def _gdal_env() -> Any:
    """GDAL settings for the whole job: the block-cache cap applies even after GDAL started.

    Without it, decoded blocks fill GDAL's default cache (5 % of RAM) and peak memory grows
    with the scene (measured: ``detect`` +55 % from 2048 to 8192 px). ``kdmsi env`` must run
    where rasterio is missing, so rasterio is optional here.
    """
    try:
        import rasterio
    except ImportError:
        return contextlib.nullcontext()
    try:
        megabytes = int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB))
    except ValueError:
        megabytes = int(GDAL_CACHE_MB)
    return rasterio.Env(GDAL_CACHEMAX=megabytes * 2**20)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    configure_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = "--progress=json" in argv or any(
        a == "--progress" and b == "json" for a, b in zip(argv, argv[1:])
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_GdalNoise())
    cancel = CancelFlag()
    cancel.install_signal_handlers()
    reporter: Any
    rank, world = torchrun_process()
    if rank > 0:
        reporter = None  # one job: rank 0 reports its progress and result
    elif args.progress == "json":
        reporter = JsonReporter()
    elif args.progress == "bar":
        reporter = BarReporter()
    else:
        reporter = None
    progress = Progress(reporter, cancel)
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS:
        return _fail(
            args,
            reporter,
            InputError(
                f"{args.command} runs in one process; only {' and '.join(DISTRIBUTED_COMMANDS)} "
                "run over several processes started by torchrun"
            ),
        )
    try:
        with _gdal_env():
            result = args.handler(args, progress)
    except KeyboardInterrupt:
        return _fail(args, reporter, CancelledError("cancelled by the user; nothing was written"))
    except KdmsiError as exc:
        return _fail(args, reporter, exc, parser)
    if result is not None and rank == 0:
        if args.progress == "json":
            reporter(ProgressEvent("result", progress.current_stage, data=result))
        else:
            if isinstance(reporter, BarReporter):
                reporter.finish()
            _print_result(result)
    return 0


def option_flags(parser: argparse.ArgumentParser, command: str, names: Any) -> list[str]:
    """The command-line flags of engine parameters ``names`` in sub-command ``command``.

    Engine errors name the parameters they are about (:class:`KdmsiError` ``parameters``), by
    the job's keyword names, which are the parsers' ``dest`` names.
    """
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    sub = subparsers.choices.get(command)
    if sub is None:
        return []
    flags = []
    for name in names:
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if action.dest == name and long:
                flags.append(long[0])
                break
    return flags


def _fail(
    args: argparse.Namespace,
    reporter: Any,
    exc: KdmsiError,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    parameters = list(getattr(exc, "parameters", ()))
    if args.progress == "json" and reporter is not None:
        data = {"type": type(exc).__name__, "parameters": parameters}
        reporter(ProgressEvent("error", message=message, data=data))
    flags = option_flags(parser, args.command, parameters) if parser is not None else []
    if flags:
        message = f"{message} [{', '.join(flags)}]"
    if isinstance(reporter, BarReporter):
        reporter.finish()
    print(f"kdmsi {args.command}: error: {message}", file=sys.stderr)
    return exc.exit_code
