"""The ``gammamod`` command line.

Each subcommand parses its arguments and calls one stage's entry point; heavy imports (torch)
happen inside the handlers, so ``gammamod --help`` and the runtime commands start fast.
User errors are :class:`GammamodError` and are printed once, here, on one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gammamod import __version__
from gammamod.errors import GammamodError

DTYPES = ("fp32", "fp16", "bf16")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


# --------------------------------------------------------------------------------------------
# make-tiny


def cmd_make_tiny(args) -> int:
    from gammamod.export.tiny import make_tiny

    from .console import stage_progress

    with stage_progress(f"make-tiny {args.recipe} ({args.size})") as tick:
        out = make_tiny(args.out, args.recipe, size=args.size, seed=args.seed, layout=args.layout,
                        shard_mb=args.shard_mb, force=args.force, progress=tick)
    print(f"wrote {args.recipe} checkpoint ({args.size}, seed {args.seed}) to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    from .console import console, token_progress
    from gammamod.export.generate import generate_text

    with token_progress(args.max_new_tokens, "generating") as on_token:
        result = generate_text(
            args.checkpoint, prompt=args.prompt, image=args.image, routing=args.routing,
            max_new_tokens=args.max_new_tokens, vision_tower=args.vision_tower, dtype=_torch_dtype(args.dtype),
            skip_ratio=args.skip_ratio, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, on_token=on_token)
    console.print(result.text, markup=False, highlight=False, soft_wrap=True)
    console.print(result.summary, markup=False, highlight=False, style="dim", soft_wrap=True)
    return 0


# --------------------------------------------------------------------------------------------
# export, check-onnx


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

    from .console import StageProgress, console

    capacity, capacity_span = read_capacity_file(args.capacity) if args.capacity else (None, None)
    opts = ExportOptions(
        routing="dense" if args.dense else "static", dtype=args.dtype, skip_ratio=args.skip_ratio,
        capacity=capacity, capacity_span=capacity_span, span_lengths=args.span_lengths, max_batch=args.max_batch,
        max_seq=args.max_seq, vision_tower=args.vision_tower, force=args.force, tensorrt=args.for_tensorrt or [])
    with StageProgress("export") as progress:
        manifest = export_artifact(args.checkpoint, args.out, opts, progress=progress)
    routing = manifest["routing"]
    what = "dense"
    if manifest.routed:
        lengths = routing["span_lengths"]
        counts = manifest.capacity_rule().kept_counts(lengths[0]) if lengths else {}
        what = (f"static routing: the span and kept counts are inputs; for a {lengths[0]}-token span each MoD layer "
                f"keeps {min(counts.values())}..{max(counts.values())}" if counts else
                "static routing: the span and kept counts are inputs")
    size = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    console.print(f"exported {manifest['recipe']['name']} ({what}, {manifest['model']['dtype']}) to {args.out} "
                  f"({size:.1f} MiB, graphs: {', '.join(manifest['graphs'])})", soft_wrap=True)
    for version in manifest["tensorrt"]["targets"]:
        console.print(f"TensorRT {version} copies: {', '.join(v for k, v in manifest['tensorrt']['targets'][version].items() if k != 'notes')}",
                      soft_wrap=True)
    return 0


def cmd_check_onnx(args) -> int:
    from gammamod.engines.lint import lint_artifact, lint_model_file

    from .console import console

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


# --------------------------------------------------------------------------------------------
# run (torch-free)


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "repetition_penalty": args.repetition_penalty, "stop": args.stop or None, "seed": args.seed}


def _stats_line(stats, pipe) -> str:
    per_layer = stats.kv_bytes_per_layer
    kv = (f", KV cache {stats.kv_bytes / 2**20:.2f} MiB ({min(per_layer) / 2**10:.0f}-{max(per_layer) / 2**10:.0f} "
          f"KiB per layer)") if per_layer else ""
    return (f"time to first token {stats.ttft_s * 1000:.0f} ms (vision {stats.vision_s * 1000:.0f} ms), "
            f"decode {stats.tokens_per_s:.1f} tokens/s over {stats.steps} steps{kv}")


def cmd_run(args) -> int:
    import sys as _sys

    from gammamod.runtime.pipeline import Pipeline

    from .console import console, is_interactive

    pipe = Pipeline.load(args.artifact, backend=args.backend, device=args.device, threads=args.threads,
                         verify=not args.no_verify)
    if args.image is not None and not args.image.exists():
        from gammamod.errors import GammamodError

        raise GammamodError(f"{args.image}: no such image file")
    if args.chat or (args.prompt is None and is_interactive()):
        return _chat(pipe, args, console)
    if args.prompt is None:
        from gammamod.errors import GammamodError

        raise GammamodError("--prompt is required (or --chat for a conversation)")

    def stream(row, text):
        _sys.stdout.write(text)
        _sys.stdout.flush()

    images = [args.image] if args.image is not None else None  # the prompt may place it with <image>
    results = pipe.generate(images, [args.prompt], max_new_tokens=args.max_new_tokens,
                            stream=stream if args.stream else None, system=args.system, **_sampling(args))
    if args.stream:
        _sys.stdout.write("\n")
    else:
        console.print(results[0].text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"[{pipe.backend.describe()}] {_stats_line(pipe.last_stats, pipe)}; {len(results[0].tokens)} "
                  f"tokens, stopped by {results[0].finish_reason}", style="dim", markup=False, soft_wrap=True)
    return 0


def _chat(pipe, args, console) -> int:
    import sys as _sys

    from gammamod.runtime.chat import Chat

    chat = Chat(pipe, image=args.image, system=args.system, **_sampling(args))
    console.print(f"chat with {args.artifact} ({pipe.backend.describe()}); the image and the KV cache stay between "
                  "turns. An empty line or Ctrl-D ends it.", style="dim", markup=False)
    while True:
        try:
            question = input("you> ") if _sys.stdin.isatty() else _sys.stdin.readline()
        except EOFError:
            break
        if not question or not question.strip() or question.strip() in ("exit", "quit"):
            break
        _sys.stdout.write("assistant> ")

        def stream(row, text):
            _sys.stdout.write(text)
            _sys.stdout.flush()

        chat.ask(question.strip(), max_new_tokens=args.max_new_tokens, stream=stream)
        _sys.stdout.write("\n")
        console.print(_stats_line(pipe.last_stats, pipe), style="dim", markup=False, soft_wrap=True)
    return 0


# --------------------------------------------------------------------------------------------
# validate, bench


def cmd_validate(args) -> int:
    from gammamod.validate.validate import run_validate, summary_table, write_report

    from .console import StageProgress, console

    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    with StageProgress("validate") as progress:
        report = run_validate(args.artifact, args.reference, samples=args.samples, steps=args.steps, seed=args.seed,
                              images_dir=args.images, prompts_file=args.prompts, backends=backends,
                              save_dir=args.save_dir, vision_tower=args.vision_tower, progress=progress)
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

    from .console import StageProgress, console

    with StageProgress("bench") as progress:
        report = run_bench(args.artifact, reference=args.reference, dense_artifact=args.dense, backend=args.backend,
                           device=args.device, threads=args.threads, tokens=args.tokens, warmup=args.warmup,
                           repeats=args.repeats, out_dir=args.out, sweep=args.sweep, image=args.image,
                           progress=progress)
    from rich.markdown import Markdown

    console.print(Markdown(Path(report["outputs"]["bench.md"]).read_text()))
    console.print(f"chart: {report['outputs']['bench.png']}; table: {report['outputs']['bench.md']}; "
                  f"data: {report['outputs']['bench.json']}" +
                  (f"; sweep: {report['outputs']['sweep.png']}" if "sweep.png" in report["outputs"] else ""),
                  soft_wrap=True)
    return 0


# --------------------------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir), fresh=args.fresh, quick=args.quick)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from gammamod.engines.targets import TARGETS

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

    p = sub.add_parser("make-tiny", help="write a seeded tiny checkpoint in a recipe's exact on-disk format",
                       description="Write a seeded, tiny but complete checkpoint (config.json, safetensors, "
                                   "tokenizer, image processor config, tiny CLIP tower) in the recipe's own "
                                   "format, with non-trivial router weights.")
    p.add_argument("out", type=Path, help="output checkpoint directory")
    p.add_argument("--recipe", required=True, choices=("gamma-mod", "p-mod", "llava"))
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
    p.add_argument("--routing", default="static", choices=("reference", "static", "dense"),
                   help="reference: the authors' released inference (batch 1); static: fixed capacity per MoD "
                        "layer, what the export traces (default); dense: routers ignored")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--skip-ratio", type=_ratio, default=None, help="gamma-MoD static skip ratio (default 0.5)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--vision-tower", type=Path, default=None,
                   help="local CLIP vision tower directory, when the checkpoint names a hub id")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a checkpoint to static-capacity ONNX with a manifest",
                       description="Export a gamma-MoD, p-MoD or LLaVA checkpoint to an artifact directory: "
                                   "vision, prefill and decode ONNX graphs (MoD ops as custom nodes with ONNX "
                                   "function bodies, so ONNX Runtime runs them), shared external weights, token "
                                   "embeddings, tokenizer and manifest.json.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="artifact directory to create")
    p.add_argument("--vision-tower", type=Path, default=None,
                   help="local CLIP vision tower directory, when the checkpoint names a hub id")
    p.add_argument("--dense", action="store_true", help="ignore the routers: the dense baseline of this checkpoint")
    p.add_argument("--span-lengths", type=_lengths, default=None, metavar="N[,N...]",
                   help="routed span lengths to support: the bounds of TensorRT's profiles (default: the default "
                        "prompt's, from the tower's image tokens). ONNX Runtime takes any span")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--skip-ratio", type=_ratio, default=None, help="gamma-MoD: share of routable tokens each "
                     "MoD layer skips (default 0.5)")
    cap.add_argument("--capacity", type=Path, default=None,
                     help="JSON file {\"<MoD layer>\": fraction of the span in (0, 1] (k = ceil(r*N)) or an integer "
                          "count (valid for the file's \"span_length\")}, or what 'calib capacity' writes")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--max-batch", type=_positive_int, default=8)
    p.add_argument("--max-seq", type=_positive_int, default=None,
                   help="longest sequence (default: the model's max positions, at most 4096)")
    p.add_argument("--for-tensorrt", action="append", choices=tuple(TARGETS), metavar="VERSION",
                   help="also write the copies TensorRT VERSION parses (10.3, 10.x or 11.x; repeatable)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check-onnx", help="lint an artifact or ONNX file for a TensorRT version's parser",
                       description="Read the graphs statically and report what that TensorRT version's ONNX parser "
                                   "would reject: unsupported ops, TopK K >= 3840 or not constant, custom nodes "
                                   "without plugin attributes, function bodies that would shadow the plugin, "
                                   "data-dependent shapes. Exit 1 on errors.")
    p.add_argument("path", type=Path, help="artifact directory or .onnx file")
    p.add_argument("--tensorrt", required=True, choices=tuple(TARGETS))
    p.set_defaults(func=cmd_check_onnx)

    p = sub.add_parser("run", help="generate from an exported artifact (no torch)",
                       description="Generate from an artifact with the torch-free runtime: LLaVA prompt template, "
                                   "image preprocessing, the exported graphs on ONNX Runtime or TensorRT. --chat "
                                   "keeps the image and the KV cache between turns.")
    p.add_argument("artifact", type=Path, help="artifact directory written by 'gammamod export'")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--backend", default="ort", choices=("ort", "tensorrt"))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu for ort, cuda:0 for tensorrt)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--system", default=None, help="system prompt in place of the template's (the routed span "
                   "follows the prompt)")
    p.add_argument("--chat", action="store_true", help="a conversation (default when no --prompt on a terminal)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="compare an artifact with the PyTorch reference on every backend",
                       description="Run the PyTorch reference and every available backend (ONNX Runtime CPU/CUDA, "
                                   "TensorRT) on the same inputs; report logits and image-feature errors "
                                   "(Polygraphy's comparator), routing agreement per MoD layer, KV lengths and "
                                   "greedy-token match. Exit 1 if a tolerance is missed.")
    p.add_argument("artifact", type=Path)
    p.add_argument("--reference", type=Path, required=True, help="the checkpoint the artifact was exported from")
    p.add_argument("--samples", type=_positive_int, default=4, help="random images and prompts (default 4)")
    p.add_argument("--steps", type=_positive_int, default=16, help="decode steps compared (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=Path, default=None, help="a directory of images instead of random ones")
    p.add_argument("--prompts", type=Path, default=None, help="a file with one prompt per line")
    p.add_argument("--backends", default=None, help="comma list among ort-cpu, ort-cuda, tensorrt (default: all "
                                                     "available)")
    p.add_argument("--report", type=Path, default=None, help="JSON report path (default ARTIFACT.validate.json, "
                                                              "beside the artifact)")
    p.add_argument("--save-dir", type=Path, default=None, help="save Polygraphy's run results (inputs and outputs)")
    p.add_argument("--vision-tower", type=Path, default=None)
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
    p.add_argument("--backend", default="ort", choices=("ort", "tensorrt"))
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=_positive_int, default=None, help="threads for every configuration "
                   "(default: physical cores)")
    p.add_argument("--tokens", type=_positive_int, default=32, help="greedy decode tokens timed (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2: the first runs "
                   "after loading are slower)")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--image", type=Path, default=None, help="image (default: the bundled test image)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ARTIFACT.bench)")
    p.add_argument("--sweep", type=_sweep_arg, default=None, metavar="skip-ratio=R1,R2,...",
                   help="gamma-MoD: also export and time these skip ratios, and plot speedup against them")
    p.set_defaults(func=cmd_bench)

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
