"""The ``gammamod`` command line.

An index: each stage wires its own subcommands (``export/cli.py``, ``engines/cli.py``,
``runtime/cli.py``, ``validate/cli.py``, ``serve/cli.py``) and this module assembles them, holds the argument types
they share, and is the one place errors are printed. Heavy imports (torch) happen inside the
handlers, so ``gammamod --help`` and the runtime commands start fast.
User errors are :class:`GammamodError` and are printed once, here, on one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gammamod import __version__
from gammamod.errors import GammamodError

DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def tower_arguments(p) -> None:
    """``--vision-tower`` and ``--vision-tower-slow``: local copies of what a checkpoint's config
    names on the hub, for every command that opens a checkpoint."""
    p.add_argument("--vision-tower", type=Path, default=None, metavar="DIR",
                   help="local CLIP vision tower directory (config.json, preprocessor_config.json; its weights are "
                        "used for those the checkpoint lacks), when the checkpoint names a hub id")
    p.add_argument("--vision-tower-slow", type=Path, default=None, metavar="DIR",
                   help="LLaVA-HR: local directory (or weight file) of timm's or open_clip's ConvNeXt, for the "
                        "ConvNeXt weights the checkpoint lacks")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = True, what: str | None = None):
    """An argparse type: a float within [low, high) (or the other bounds asked), refused in one
    line naming the interval (or ``what``, the thing expected)."""
    what = what or f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


ratio = number_in(0.0, 1.0)  # skip ratios: [0, 1)


# --------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir), fresh=args.fresh, quick=args.quick)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gammamod",
        description="Deploy Mixture-of-Depths LLaVA models (gamma-MoD, p-MoD): make test checkpoints, "
                    "generate with the PyTorch reference, export static-capacity ONNX, run it without torch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'gammamod COMMAND --help' for a command's options. 'gammamod demo' runs the whole "
               "pipeline on seeded tiny checkpoints.")
    parser.add_argument("--version", action="version", version=f"gammamod {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # the stages in pipeline order, each wiring its own subcommands
    from gammamod.calib import cli as calib_cli
    from gammamod.engines import cli as engines_cli
    from gammamod.export import cli as export_cli
    from gammamod.runtime import cli as runtime_cli
    from gammamod.serve import cli as serve_cli
    from gammamod.validate import cli as validate_cli

    for stage in (export_cli, calib_cli, engines_cli, runtime_cli, validate_cli, serve_cli):
        stage.register(sub)
    p = sub.add_parser("demo", help="run the pipeline end to end on seeded tiny checkpoints",
                       description="Make tiny gamma-MoD and p-MoD checkpoints, generate from the bundled test "
                                   "image in every routing mode, export both to ONNX and check them on ONNX "
                                   "Runtime, generate through the torch-free runtime, then export, validate and "
                                   "bench a bench-size p-MoD model.")
    p.add_argument("--workdir", default="gammamod-demo", help="where checkpoints and artifacts go "
                   "(default ./gammamod-demo)")
    p.add_argument("--fresh", action="store_true", help="rebuild everything in the workdir")
    p.add_argument("--quick", action="store_true", help="stop before the bench-size model (its export, "
                   "validate and bench take a few minutes)")
    p.set_defaults(func=cmd_demo)
    return parser


class _Interrupted:
    """SIGINT and SIGTERM end a command the same way: KeyboardInterrupt raised in the main thread,
    cleanup on the way out, one line. torch's exporter wraps exceptions raised inside it into its
    own; the flag tells the handler below that such an error is really the interrupt."""

    signal_name: str | None = None

    @classmethod
    def install(cls) -> None:
        import signal

        def handler(signum, frame):
            cls.signal_name = signal.Signals(signum).name
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "command", None) in ("run", "bench") and args.device is None:
        args.device = "cuda:0" if args.backend == "tensorrt" else "cpu"
    _Interrupted.install()
    name = f"gammamod {args.command}"
    try:
        return int(args.func(args) or 0)
    except GammamodError as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted{' (' + _Interrupted.signal_name + ')' if _Interrupted.signal_name else ''}",
              file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no: a full disk, a permission, a missing file
        if _Interrupted.signal_name:
            print(f"{name}: interrupted ({_Interrupted.signal_name})", file=sys.stderr)
            return 130
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{name}: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if _Interrupted.signal_name:
            print(f"{name}: interrupted ({_Interrupted.signal_name})", file=sys.stderr)
            return 130
        if args.debug:
            raise
        print(f"{name}: internal error: {type(e).__name__}: {_one_line(e)} (a bug: run again with --debug for "
              "the traceback and report it)", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
