"""Decode speed of one artifact on ONNX Runtime CPU with the runtime's decode graph choices, each
in its own process (its own peak memory): the fused graph with shared weights (the default), the
portable decoder.onnx, and the fused graph with ORT's weight pre-packing (per-session weights).

    .venv/bin/python scripts/decode_variants.py ARTIFACT [--tokens 32] [--repeats 5]

Backs the README's "Where decode's speed comes from"; not a test (timings never are).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

VARIANTS = {
    "fused decode.ort.onnx, shared weights (default)": {},
    "portable decoder.onnx, shared weights": {"fused": False},
    "fused decode.ort.onnx, pre-packed per-session weights": {"share_weights": False},
}


def measure(artifact: str, options: dict, tokens: int, repeats: int) -> dict:
    from gammamod.demo import test_image
    from gammamod.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifact, verify=False, **options)
    image = str(test_image())
    prompt = "What is in the picture?"
    pipe.generate([image], [prompt], max_new_tokens=tokens)  # warm-up
    per_token = []
    for _ in range(repeats):
        pipe.generate([image], [prompt], max_new_tokens=tokens)
        per_token.append(1e3 / pipe.last_stats.tokens_per_s)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {"decode_ms_per_token": statistics.median(per_token), "all": per_token, "peak_rss_mib": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.artifact, json.loads(args.one), args.tokens, args.repeats)))
        return
    for name, options in VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, args.artifact, "--tokens", str(args.tokens), "--repeats",
                              str(args.repeats), "--one", json.dumps(options)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs = ", ".join(f"{x:.1f}" for x in r["all"])
        print(f"{name}: {r['decode_ms_per_token']:.1f} ms/token (runs {runs}), peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
