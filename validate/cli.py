"""The validate stage's subcommands: validate, bench, inspect."""

from __future__ import annotations

import argparse
from pathlib import Path

from gammamod.cli import positive_int, tower_arguments


def cmd_validate(args) -> int:
    from gammamod.validate.validate import run_validate, summary_table, write_report

    from gammamod.console import StageProgress, console

    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    with StageProgress("validate") as progress:
        report = run_validate(args.artifact, args.reference, samples=args.samples, steps=args.steps, seed=args.seed,
                              images_dir=args.images, prompts_file=args.prompts, backends=backends,
                              save_dir=args.save_dir, vision_tower=args.vision_tower,
                              vision_tower_slow=args.vision_tower_slow, progress=progress)
    artifact = Path(args.artifact)
    path = write_report(report, args.report or artifact.with_name(artifact.name + ".validate.json"))
    console.print(summary_table(report))
    console.print(f"report: {path}" + (f"; Polygraphy run results in {args.save_dir}" if args.save_dir else ""),
                  soft_wrap=True)
    return 0 if report["passed"] else 1


def _sweep_arg(text: str) -> list[float]:
    name, _, values = text.partition("=")
    if name != "skip-ratio" or not values:
        raise argparse.ArgumentTypeError(f"expected skip-ratio=R1,R2,..., got {text!r}")
    try:
        ratios = [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1), got {values!r}") from None
    if not all(0.0 <= r < 1.0 for r in ratios):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1), got {values!r}")
    return ratios


def cmd_bench(args) -> int:
    from gammamod.validate.bench import run_bench

    from gammamod.console import StageProgress, console

    with StageProgress("bench") as progress:
        report = run_bench(args.artifact, reference=args.reference, dense_artifact=args.dense, backend=args.backend,
                           device=args.device, threads=args.threads, tokens=args.tokens, warmup=args.warmup,
                           repeats=args.repeats, out_dir=args.out, sweep=args.sweep, image=args.image,
                           progress=progress, compare=args.compare)
    from rich.markdown import Markdown

    console.print(Markdown(Path(report["outputs"]["bench.md"]).read_text()))
    console.print(f"chart: {report['outputs']['bench.png']}; table: {report['outputs']['bench.md']}; "
                  f"data: {report['outputs']['bench.json']}" +
                  (f"; sweep: {report['outputs']['sweep.png']}" if "sweep.png" in report["outputs"] else ""),
                  soft_wrap=True)
    return 0


def cmd_inspect(args) -> int:
    from gammamod.console import console
    from gammamod.validate.inspect_routing import run_inspect

    routing, png, data = run_inspect(args.source, args.image, args.prompt, args.out, system=args.system,
                                     routing=args.routing, vision_tower=args.vision_tower,
                                     vision_tower_slow=args.vision_tower_slow, force=args.force)
    for layer in sorted(routing.kept):
        c = routing.counts(layer)
        sys_share = f", system prompt {c['routed_text']}/{c['routed_text_total']}" if c["routed_text_total"] else ""
        console.print(f"layer {layer}: kept {c['image']}/{c['image_total']} image patches{sys_share}", markup=False)
    console.print(f"picture: {png}; numbers: {data}", markup=False, soft_wrap=True)
    return 0


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("validate", help="compare an artifact with the PyTorch reference on every backend",
                       description="Run the PyTorch reference and every available backend (ONNX Runtime CPU/CUDA, "
                                   "TensorRT) on the same inputs; report logits and image-feature errors "
                                   "(Polygraphy's comparator), routing agreement per MoD layer, KV lengths and "
                                   "greedy-token match. Exit 1 if a tolerance is missed.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--reference", type=Path, required=True, help="the checkpoint the artifact was exported from")
    p.add_argument("--samples", type=positive_int, default=4, help="random images and prompts (default 4)")
    p.add_argument("--steps", type=positive_int, default=16, help="decode steps compared (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, default=None, help="a directory of images instead of random ones")
    p.add_argument("--prompts", type=Path, default=None, help="a file with one prompt per line")
    p.add_argument("--backends", default=None, help="comma list among ort-cpu, ort-cuda, tensorrt (default: all "
                                                     "available)")
    p.add_argument("--report", type=Path, default=None, help="JSON report path (default ARTIFACT.validate.json, "
                                                              "beside the artifact)")
    p.add_argument("--save-dir", type=Path, default=None, help="save Polygraphy's run results (inputs and outputs)")
    tower_arguments(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("bench", help="time an artifact against its dense twin and PyTorch",
                       description="Time vision, prefill (time to first token), decode and end to end, with peak "
                                   "memory and KV bytes, for the artifact on a backend, the same checkpoint exported "
                                   "dense, the PyTorch reference and transformers' eager Llama, side by side in one "
                                   "run; ratios, the FLOP ratio and the machine's measured limits; JSON, markdown "
                                   "and a PNG chart.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--reference", type=Path, default=None, help="the checkpoint: PyTorch baselines and, unless "
                   "--dense, the dense twin export")
    p.add_argument("--dense", type=Path, default=None, help="the dense twin artifact (export --dense)")
    p.add_argument("--compare", type=Path, action="append", default=None, metavar="ARTIFACT",
                   help="time this artifact too, in the same rounds: a quantized artifact against its fp32 source "
                        "(repeat for more precisions); ratios of each quantized one against the fp32 one")
    p.add_argument("--backend", default="ort", choices=("ort", "tensorrt"))
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=positive_int, default=None, help="threads for every configuration "
                   "(default: physical cores)")
    p.add_argument("--tokens", type=positive_int, default=32, help="greedy decode tokens timed (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2: the first runs "
                   "after loading are slower)")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--image", type=Path, default=None, help="image (default: the bundled test image)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ARTIFACT.bench)")
    p.add_argument("--sweep", type=_sweep_arg, default=None, metavar="skip-ratio=R1,R2,...",
                   help="gamma-MoD: also export and time these skip ratios, and plot speedup against them")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("inspect", help="draw which image patches each MoD layer keeps",
                       description="Run one prompt about one image and draw, per MoD layer, the image patches the "
                                   "router kept (bright) and skipped (dim), with kept tokens and FLOPs per layer. "
                                   "From an artifact: the deployed graph's routing (runtime); from a checkpoint: the "
                                   "PyTorch model's.")
    p.add_argument("source", type=Path, metavar="ARTIFACT|CKPT")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, default=Path("routing.png"), help="the PNG (routing.json beside it)")
    p.add_argument("--system", default=None, help="system prompt in place of the template's")
    p.add_argument("--routing", default="static", choices=("static", "reference"),
                   help="a checkpoint's routing mode (default static, what the export deploys)")
    tower_arguments(p)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_inspect)
