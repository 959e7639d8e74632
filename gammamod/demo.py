"""``gammamod demo``: the pipeline end to end on seeded tiny checkpoints.

1. make tiny gamma-MoD and p-MoD checkpoints (the authors' formats);
2. generate from the bundled test image with the PyTorch reference in every routing mode
   (reference, static, dense) and tabulate kept tokens per MoD layer and decoder FLOPs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .console import console, stage_progress

DEMO_RECIPES = ("gamma-mod", "p-mod")
DEMO_PROMPT = "What is in the picture?"


def test_image() -> Path:
    return Path(str(resources.files("gammamod") / "assets" / "test_image.png"))


def _kept_text(counts: dict[int, int], seq_len: int) -> str:
    if not counts:
        return f"all {seq_len}"
    layers = sorted(counts)
    if len(layers) <= 4:
        return " ".join(f"L{layer}:{counts[layer]}" for layer in layers)
    return (f"L{layers[0]}:{counts[layers[0]]} L{layers[1]}:{counts[layers[1]]} ... "
            f"L{layers[-1]}:{counts[layers[-1]]} ({len(layers)} layers)")


def run_demo(workdir: Path, fresh: bool = False) -> int:
    from rich.table import Table

    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_text
    from gammamod.export.tiny import make_tiny

    workdir.mkdir(parents=True, exist_ok=True)
    image = test_image()
    console.print(f"[bold]gammamod demo[/bold]: tiny checkpoints in {workdir}, image {image.name}")
    table = Table(title=f"PyTorch reference: {DEMO_PROMPT!r} about {image.name}, greedy, 16 new tokens")
    for col in ("recipe", "mode", "kept tokens per MoD layer", "FLOPs vs dense", "KV entries", "text"):
        table.add_column(col, overflow="fold")
    for recipe in DEMO_RECIPES:
        ckpt = workdir / f"tiny-{recipe}"
        if fresh or not (ckpt / "config.json").is_file():
            with stage_progress(f"make-tiny {recipe}") as tick:
                make_tiny(ckpt, recipe, size="tiny", seed=0, force=True, progress=tick)
        model = load_checkpoint(ckpt)
        for mode in ("reference", "static", "dense"):
            res = generate_text(ckpt, DEMO_PROMPT, image=image, routing=mode, max_new_tokens=16, model=model)
            table.add_row(recipe, mode, f"{_kept_text(res.kept_counts, res.seq_len)} of {res.seq_len}",
                          f"{res.flop_ratio:.2f}x", str(sum(res.kv_lengths)), res.text[:32])
    console.print(table)
    return 0
