"""The batching gain, measured: ``python -m gammamod.serve.load ARTIFACT [--clients 8] [--requests 32]``.

Serves the artifact on 127.0.0.1 (a free port) and sends the same requests twice: one at a time,
then from ``--clients`` concurrent clients (continuous batching puts them into one decode step).
Each request asks for up to ``--max-tokens`` tokens, greedy, so both runs produce the same answers
and the same token counts. Prints requests/s, tokens/s and p50/p95 latency of each run. Plain HTTP (urllib), so it needs nothing beyond ``gammamod[serve]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

QUESTIONS = ["What is in the picture?", "Describe the colours and the shapes you see, please.", "Is there a car?",
             "What colour is the sky?"]


def _ask(url: str, model: str, question: str, image: str | None, max_tokens: int) -> tuple[float, int]:
    content = [{"type": "text", "text": question}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    return time.perf_counter() - t0, answer["usage"]["completion_tokens"]


def measure(artifact, clients: int = 8, requests: int = 32, max_tokens: int = 32, image: Path | None = None,
            threads: int | None = None) -> dict:
    from gammamod.demo import test_image

    from .server import BackgroundServer, load_app

    picture = "data:image/png;base64," + base64.b64encode(Path(image or test_image()).read_bytes()).decode()
    jobs = [(QUESTIONS[i % len(QUESTIONS)], picture if i % 2 == 0 else None) for i in range(requests)]
    app, config = load_app(artifact, max_batch=clients, threads=threads)
    runs = {}
    with BackgroundServer(app) as url:
        _ask(url, config.model_name, *jobs[0], max_tokens)  # warm-up
        for name, width in (("one at a time", 1), (f"{clients} concurrent clients", clients)):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(width) as pool:
                done = list(pool.map(lambda job: _ask(url, config.model_name, *job, max_tokens), jobs))
            wall = time.perf_counter() - t0
            latency = np.array([d[0] for d in done])
            runs[name] = {"requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
                          "tokens_per_s": sum(d[1] for d in done) / wall, "p50_s": float(np.percentile(latency, 50)),
                          "p95_s": float(np.percentile(latency, 95))}
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gammamod.serve.load", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    runs = measure(args.artifact, args.clients, args.requests, args.max_tokens, threads=args.threads)
    print("| run | requests/s | tokens/s | p50 latency | p95 latency |\n|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
