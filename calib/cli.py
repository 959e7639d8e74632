"""The calibration stage's subcommands: ``gammamod calib arank|capacity|quantize``.

Each part has its own ``_register_<part>(sub)`` and handler here; the work lives in the part's
module (``calib/arank.py``, ``calib/capacity.py``, ``calib/quantize.py``), imported when the
command runs."""

from __future__ import annotations


def register(sub) -> None:
    """Add ``gammamod calib ...`` to the command line."""
    p = sub.add_parser("calib", help="calibrate: ARank layer analysis, capacities from data, quantization",
                       description="Calibration before building engines: which layers can be MoD layers (arank), "
                                   "the static capacity each MoD layer needs (capacity), INT8/INT4/FP8 artifacts "
                                   "(quantize).")
    calib_sub = p.add_subparsers(dest="calib_command", metavar="CALIB_COMMAND", required=True)
    for part in PARTS:
        part(calib_sub)



def cmd_quantize(args) -> int:
    from gammamod.calib.quantize import quantize_artifact
    from gammamod.console import StageProgress, console

    with StageProgress("quantize") as progress:
        manifest = quantize_artifact(args.artifact, args.out, args.precision, data=args.data, random=args.random,
                                     steps=args.steps, block_size=args.block_size, backend=args.backend,
                                     compute_capability=args.compute_capability, threads=args.threads,
                                     force=args.force, progress=progress)
    q = manifest["quantization"]
    console.print(f"{args.precision} artifact: {manifest.root} ({q['method']}; {q['quantized']}; full precision: "
                  f"{', '.join(q['full_precision'][:5])}). Check it: gammamod validate {manifest.root} --reference "
                  "CKPT", soft_wrap=True)
    return 0


def _compute_capability(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a compute capability like 8.9, got {text!r}") from None
    if not 1.0 <= value < 20.0:
        raise argparse.ArgumentTypeError(f"expected a compute capability like 8.9, got {text!r}")
    return value


def _register_quantize(sub) -> None:
    from pathlib import Path

    from gammamod.cli import positive_int

    p = sub.add_parser("quantize", help="INT8 / INT4 / FP8 artifact with explicit Q/DQ (ONNX Runtime and TensorRT)",
                       description="Write a quantized copy of an fp32 artifact: the decoder layers' projections get "
                                   "explicit QuantizeLinear/DequantizeLinear (symmetric, zero points 0, per-channel "
                                   "weights, per-tensor activations calibrated on real runtime runs; int4: weight-only "
                                   "blocks, opset 21). Routers, norms, MoD nodes, attention and the logits stay fp32. "
                                   "Validate it with 'gammamod validate OUT --reference CKPT'.")
    p.add_argument("artifact", type=Path, help="an fp32 artifact (gammamod export)")
    p.add_argument("--precision", required=True, choices=("int8", "int4", "fp8"))
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="images and prompts.txt (default: the shipped set)")
    source.add_argument("--random", type=positive_int, default=None, metavar="N", help="N seeded synthetic samples")
    p.add_argument("--out", type=Path, required=True, help="the quantized artifact directory")
    p.add_argument("--steps", type=int, default=8, help="decode steps per sample in calibration (default 8)")
    p.add_argument("--block-size", type=int, default=32, choices=(32, 128), help="int4 block along K (default 32)")
    p.add_argument("--backend", default="ort", choices=("ort", "modelopt"),
                   help="ort (default: ONNX Runtime calibration, scales computed here) or modelopt (optional extra)")
    p.add_argument("--compute-capability", type=_compute_capability, default=None, metavar="X.Y",
                   help="the target GPU's (fp8 needs 8.9+)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--force", action="store_true", help="replace OUT if it is a gammamod artifact")
    p.set_defaults(func=cmd_quantize)


PARTS: list = [_register_quantize]  # each part's _register_<part>, in the order the help lists them
