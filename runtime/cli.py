"""The runtime's subcommand: run (no torch)."""

from __future__ import annotations

from pathlib import Path

from gammamod.cli import positive_int
from gammamod.errors import GammamodError


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

    from gammamod.console import console, is_interactive

    pipe = Pipeline.load(args.artifact, backend=args.backend, device=args.device, threads=args.threads,
                         verify=not args.no_verify)
    if args.image is not None and not args.image.exists():
        raise GammamodError(f"{args.image}: no such image file")
    if args.chat or (args.prompt is None and is_interactive()):
        return _chat(pipe, args, console)
    if args.prompt is None:
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


def register(sub) -> None:
    """Add this stage's subcommands to the command line."""
    p = sub.add_parser("run", help="generate from an exported artifact (no torch)",
                       description="Generate from an artifact with the torch-free runtime: LLaVA prompt template, "
                                   "image preprocessing, the exported graphs on ONNX Runtime or TensorRT. --chat "
                                   "keeps the image and the KV cache between turns.")
    p.add_argument("artifact", type=Path, help="artifact directory written by 'gammamod export'")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--backend", default="ort", choices=("ort", "tensorrt"))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu for ort, cuda:0 for tensorrt)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--system", default=None, help="system prompt in place of the template's (the routed span "
                   "follows the prompt)")
    p.add_argument("--chat", action="store_true", help="a conversation (default when no --prompt on a terminal)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    p.set_defaults(func=cmd_run)
