"""The calibration stage's subcommands: ``gammamod calib arank|capacity|quantize``.

Each part has its own ``_register_<part>(sub)`` and handler here; the work lives in the part's
module (``calib/arank.py``, ``calib/capacity.py``, ``calib/quantize.py``), imported when the
command runs."""

from __future__ import annotations

from pathlib import Path

from gammamod.cli import number_in, positive_int, tower_arguments


def register(sub) -> None:
    """Add ``gammamod calib ...`` to the command line."""
    p = sub.add_parser("calib", help="calibrate: ARank layer analysis, capacities from data, quantization",
                       description="Calibration before building engines: which layers can be MoD layers (arank), "
                                   "the static capacity each MoD layer needs (capacity), INT8/INT4/FP8 artifacts "
                                   "(quantize).")
    calib_sub = p.add_subparsers(dest="calib_command", metavar="CALIB_COMMAND", required=True)
    for part in PARTS:
        part(calib_sub)


def _data_args(p) -> None:
    """The calibration set: --data DIR, --random N, or (neither) the shipped set."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=None, metavar="DIR",
                     help="images and a prompts.txt (one prompt per line), paired in turn")
    src.add_argument("--random", type=positive_int, default=None, metavar="N", help="N seeded synthetic samples")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    tower_arguments(p)


def _weights(text: str) -> list[float]:
    import argparse

    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# -- arank --------------------------------------------------------------------------------------
def cmd_arank(args) -> int:
    from .arank import analyse, table, write

    report = analyse(args.checkpoint, args.data, args.random, args.tokens, args.dtype, args.rtol,
                     args.keep_dense, args.rank_threshold, args.vision_tower, args.seed,
                     vision_tower_slow=args.vision_tower_slow)
    write(report, args.out, args.force, inputs=[args.checkpoint, args.data])
    print(table(report))
    print(f"wrote {args.out}/arank.json, arank.png, arank.txt")
    return 0


def _register_arank(sub) -> None:
    p = sub.add_parser("arank", help="attention rank per layer, and which layers could be MoD layers",
                       description="gamma-MoD's ARank: per decoder layer and head, the rank of the causal attention "
                                   "map with its diagonal zeroed, in the dense forward, averaged over heads and "
                                   "samples; proposes mod_layers_idx by a stated rule, next to the authors' set.")
    p.add_argument("checkpoint", type=Path)
    _data_args(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (arank.json, arank.png, arank.txt)")
    p.add_argument("--tokens", choices=("all", "image"), default="all", help="rank over all tokens or the image "
                   "block only (default all)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="precision of the rank "
                   "computation (default float64; the authors used float32)")
    p.add_argument("--rtol", type=float, default=None, help="singular values below rtol * the largest count as "
                   "zero (default: torch's, max(n, n) * eps of --dtype)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--keep-dense", type=positive_int, default=None, metavar="N",
                      help="keep the first, the last and the N-2 other highest-rank layers dense (default N=4, as "
                           "many as the authors')")
    rule.add_argument("--rank-threshold", type=float, default=None, metavar="R",
                      help="keep dense the first, the last and every layer of mean rank >= R")
    p.add_argument("--force", action="store_true", help="replace an arank output directory gammamod wrote")
    p.set_defaults(func=cmd_arank)


# -- capacity -----------------------------------------------------------------------------------
def cmd_capacity(args) -> int:
    from .capacity import calibrate, table, write

    report = calibrate(args.checkpoint, args.data, args.random, args.quantile, args.decode_steps, args.weights,
                       args.vision_tower, args.seed, vision_tower_slow=args.vision_tower_slow)
    out, png = write(report, args.out, args.force)
    print(table(report))
    print(f"wrote {out} and {png}" + (f"; export with: gammamod export {args.checkpoint} OUT --routing threshold "
                                      f"--capacity {out}" if report["routing"] == "threshold" else ""))
    return 0


def _register_capacity(sub) -> None:
    p = sub.add_parser("capacity", help="each MoD layer's static capacity, from the trained model's routing on data",
                       description="gamma-MoD: run the released (threshold) routing over the calibration set and "
                                   "choose each MoD layer's capacity as a quantile of its kept fraction, for "
                                   "'gammamod export --routing threshold --capacity FILE'. p-MoD: how far the "
                                   "fixed schedule is from the router weights (information).")
    p.add_argument("checkpoint", type=Path)
    _data_args(p)
    p.add_argument("--out", type=Path, required=True, help="the JSON report (a PNG is written beside it)")
    p.add_argument("--quantile", type=number_in(0.0, 1.0, low_open=True, high_open=False), default=0.99,
                   help="capacity = this quantile of the kept fractions (default 0.99)")
    p.add_argument("--decode-steps", type=positive_int, default=16, help="greedy decode steps per sample for the "
                   "decode-gate statistics (default 16)")
    p.add_argument("--weights", type=_weights, default=[1.0], help="p-MoD: router weights to compare the schedule "
                   "with (comma list, default 1.0)")
    p.add_argument("--force", action="store_true", help="replace a capacity report gammamod wrote")
    p.set_defaults(func=cmd_capacity)


# -- quantize -----------------------------------------------------------------------------------
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


def _register_quantize(sub) -> None:
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
    p.add_argument("--compute-capability", type=number_in(1.0, 20.0, what="a compute capability like 8.9"),
                   default=None, metavar="X.Y",
                   help="the target GPU's (fp8 needs 8.9+)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--force", action="store_true", help="replace OUT if it is a gammamod artifact")
    p.set_defaults(func=cmd_quantize)


PARTS: list = [_register_arank, _register_capacity, _register_quantize]  # each part's _register_<part>, in the order the help lists them
