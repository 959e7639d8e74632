"""The engines stage's subcommands: check-onnx."""

from __future__ import annotations

from pathlib import Path

from gammamod.engines.targets import TARGETS


def cmd_check_onnx(args) -> int:
    from gammamod.engines.lint import lint_artifact, lint_model_file

    from gammamod.console import console

    path = Path(args.path)
    if path.is_dir():
        findings, files = lint_artifact(path, args.tensorrt)
    else:
        findings, files = lint_model_file(path, args.tensorrt), [path.name]
    errors = [f for f in findings if f.severity == "error"]
    for f in findings:
        console.print(str(f), markup=False, soft_wrap=True, style="red" if f.severity == "error" else "yellow")
    console.print(f"TensorRT {args.tensorrt}: checked {', '.join(files)}: {len(errors)} errors, "
                  f"{len(findings) - len(errors)} warnings", soft_wrap=True)
    return 1 if errors else 0


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("check-onnx", help="lint an artifact or ONNX file for a TensorRT version's parser",
                       description="Read the graphs statically and report what that TensorRT version's ONNX parser "
                                   "would reject: unsupported ops (in If branches too), TopK K >= 3840 or computed from data, custom nodes "
                                   "without plugin attributes, function bodies that would shadow the plugin, "
                                   "data-dependent shapes. Exit 1 on errors.")
    p.add_argument("path", type=Path, help="artifact directory or .onnx file")
    p.add_argument("--tensorrt", required=True, choices=tuple(TARGETS))
    p.set_defaults(func=cmd_check_onnx)
