"""The export stage's subcommands: make-tiny, generate (the PyTorch reference), export.

The handlers import torch when they run, never when the command line is built."""

from __future__ import annotations

import argparse
from pathlib import Path

from gammamod.cli import DTYPES, positive_int, ratio, torch_dtype, tower_arguments
from gammamod.engines.targets import TARGETS


def cmd_make_tiny(args) -> int:
    from gammamod.export.tiny import make_tiny

    from gammamod.console import stage_progress

    with stage_progress(f"make-tiny {args.recipe} ({args.size})") as tick:
        out = make_tiny(args.out, args.recipe, size=args.size, seed=args.seed, layout=args.layout,
                        shard_mb=args.shard_mb, force=args.force, progress=tick)
    print(f"wrote {args.recipe} checkpoint ({args.size}, seed {args.seed}) to {out}")
    return 0


def cmd_generate(args) -> int:
    from gammamod.console import console, token_progress
    from gammamod.export.generate import generate_text

    with token_progress(args.max_new_tokens, "generating") as on_token:
        result = generate_text(
            args.checkpoint, prompt=args.prompt, image=args.image, routing=args.routing,
            max_new_tokens=args.max_new_tokens, vision_tower=args.vision_tower,
            vision_tower_slow=args.vision_tower_slow, dtype=torch_dtype(args.dtype),
            skip_ratio=args.skip_ratio, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, on_token=on_token)
    console.print(result.text, markup=False, highlight=False, soft_wrap=True)
    console.print(result.summary, markup=False, highlight=False, style="dim", soft_wrap=True)
    return 0


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected span lengths N[,N...], got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive span lengths, got {text!r}")
    return values


def cmd_export(args) -> int:
    from gammamod.export.exporter import ExportOptions, export_artifact, read_capacity_file

    from gammamod.console import StageProgress, console

    capacity, capacity_span = read_capacity_file(args.capacity) if args.capacity else (None, None)
    opts = ExportOptions(
        routing="dense" if args.dense else args.routing, dtype=args.dtype, skip_ratio=args.skip_ratio,
        capacity=capacity, capacity_span=capacity_span, span_lengths=args.span_lengths, max_batch=args.max_batch,
        max_seq=args.max_seq, vision_tower=args.vision_tower, vision_tower_slow=args.vision_tower_slow,
        force=args.force, tensorrt=args.for_tensorrt or [])
    with StageProgress("export") as progress:
        manifest = export_artifact(args.checkpoint, args.out, opts, progress=progress)
    routing = manifest["routing"]
    what = "dense"
    if manifest.routed:
        lengths = routing["span_lengths"]
        counts = manifest.capacity_rule().kept_counts(lengths[0]) if lengths else {}
        mode = routing["mode"]
        what = (f"{mode} routing: the span and kept counts are inputs; for a {lengths[0]}-token span each MoD layer "
                f"keeps {'up to ' if mode == 'threshold' else ''}{min(counts.values())}..{max(counts.values())}"
                if counts else f"{mode} routing: the span and kept counts are inputs")
    size = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    console.print(f"exported {manifest['recipe']['name']} ({what}, {manifest['model']['dtype']}) to {args.out} "
                  f"({size:.1f} MiB, graphs: {', '.join(manifest['graphs'])})", soft_wrap=True)
    for version in manifest["tensorrt"]["targets"]:
        console.print(f"TensorRT {version} copies: {', '.join(v for k, v in manifest['tensorrt']['targets'][version].items() if k != 'notes')}",
                      soft_wrap=True)
    return 0


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("make-tiny", help="write a seeded tiny checkpoint in a recipe's exact on-disk format",
                       description="Write a seeded, tiny but complete checkpoint (config.json, safetensors, "
                                   "tokenizer, image processor config, tiny CLIP tower) in the recipe's own "
                                   "format, with non-trivial router weights.")
    p.add_argument("out", type=Path, help="output checkpoint directory")
    p.add_argument("--recipe", required=True, choices=("gamma-mod", "p-mod", "llava", "gamma-mod-hr", "p-mod-next"),
                   help="gamma-mod-hr / p-mod-next: the released checkpoints' vision (LLaVA-HR's CLIP + ConvNeXt tower; "
                        "LLaVA-NeXT anyres), tiny")
    p.add_argument("--size", default="tiny", choices=("tiny", "bench"),
                   help="tiny: for tests (default); bench: LLaVA-1.5 geometry (336 px, 576 image tokens), "
                        "a 32-layer decoder big enough to time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="original", choices=("original", "hf"),
                   help="original: the authors' layout (default); hf: transformers' llava layout (llava only)")
    p.add_argument("--shard-mb", type=float, default=None, help="split the weights into safetensors shards of "
                   "this many MiB, with an index (as released 7B checkpoints are)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_make_tiny)
    p = sub.add_parser("generate", help="generate with the PyTorch reference model",
                       description="Generate from a checkpoint with the PyTorch model, using LLaVA's vicuna_v1 "
                                   "template and <image> expansion; prints the text and a one-line routing "
                                   "summary (kept tokens per MoD layer, decoder FLOPs vs dense).")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (gamma-MoD, p-MoD or LLaVA)")
    p.add_argument("--prompt", required=True, help="the user's question")
    p.add_argument("--image", type=Path, default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--routing", default="static", choices=("reference", "static", "threshold", "dense"),
                   help="reference: the authors' released inference (batch 1); static: fixed capacity per MoD "
                        "layer, what the export traces (default); threshold (gamma-MoD): the released inference in "
                        "a static graph (no capacity here: the whole prompt); dense: routers ignored")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--skip-ratio", type=ratio, default=None, help="gamma-MoD static skip ratio (default 0.5)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    tower_arguments(p)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="export a checkpoint to static-capacity ONNX with a manifest",
                       description="Export a gamma-MoD, p-MoD or LLaVA checkpoint to an artifact directory: "
                                   "vision, prefill and decode ONNX graphs (MoD ops as custom nodes with ONNX "
                                   "function bodies, so ONNX Runtime runs them), shared external weights, token "
                                   "embeddings, tokenizer and manifest.json.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="artifact directory to create")
    tower_arguments(p)
    p.add_argument("--dense", action="store_true", help="ignore the routers: the dense baseline of this checkpoint")
    p.add_argument("--routing", default="static", choices=("static", "threshold"),
                   help="static: a kept count per MoD layer from the recipe (default); threshold (gamma-MoD): the "
                        "released inference, tokens above 0.005 kept up to --capacity (from 'calib capacity')")
    p.add_argument("--span-lengths", type=_lengths, default=None, metavar="N[,N...]",
                   help="routed span lengths to support: the bounds of TensorRT's profiles (default: the default "
                        "prompt's, from the tower's image tokens). ONNX Runtime takes any span")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--skip-ratio", type=ratio, default=None, help="gamma-MoD: share of routable tokens each "
                     "MoD layer skips (default 0.5)")
    cap.add_argument("--capacity", type=Path, default=None,
                     help="JSON file {\"<MoD layer>\": fraction of the span in (0, 1] (k = ceil(r*N)) or an integer "
                          "count (valid for the file's \"span_length\")}, or what 'calib capacity' writes")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--max-batch", type=positive_int, default=8)
    p.add_argument("--max-seq", type=positive_int, default=None,
                   help="longest sequence (default: the model's max positions, at most 4096)")
    p.add_argument("--for-tensorrt", action="append", choices=tuple(TARGETS), metavar="VERSION",
                   help="also write the copies TensorRT VERSION parses (10.3, 10.x or 11.x; repeatable)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
