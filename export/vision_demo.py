"""The demo's step for the released checkpoints' vision: a tiny gamma-MoD on LLaVA-HR's CLIP +
ConvNeXt tower and a tiny p-MoD on LLaVA-NeXT anyres, made, exported, linted for TensorRT and run
through the torch-free runtime on crops of the test image of three aspect ratios, against PyTorch."""

from __future__ import annotations

import time
from pathlib import Path

VISION_RECIPES = ("gamma-mod-hr", "p-mod-next")
CROPS = {"wide": (0.0, 0.25, 1.0, 0.6), "tall": (0.3, 0.0, 0.55, 1.0), "square": (0.2, 0.2, 0.7, 0.7)}
QUESTION = "What is in the picture?"


def released_vision_table(workdir: Path, image: Path, fresh: bool, checkpoint, current) -> None:
    """``checkpoint(workdir, recipe, fresh)`` makes (or reuses) a tiny checkpoint; ``current(art)``
    says whether an artifact can be reused (the demo's own helpers)."""
    from PIL import Image
    from rich.table import Table

    from gammamod.console import StageProgress, console
    from gammamod.engines.lint import lint_artifact
    from gammamod.export import load_checkpoint
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.export.generate import generate_text
    from gammamod.runtime.pipeline import Pipeline

    picture = Image.open(image).convert("RGB")
    crops = {}
    for name, (x0, y0, x1, y1) in CROPS.items():
        w, h = picture.size
        crops[name] = workdir / f"crop-{name}.png"
        picture.crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h))).save(crops[name])
    table = Table(title=f"7. The released checkpoints' vision: LLaVA-HR's CLIP + ConvNeXt tower (gamma-MoD) and "
                        f"LLaVA-NeXT anyres (p-MoD), {QUESTION!r} about three crops, 12 greedy tokens")
    for col in ("model", "export, TensorRT 10.3 lint", "image", "tower inputs", "image tokens", "kept (first MoD layer)",
                "vision features vs PyTorch", "runtime vs PyTorch tokens", "text"):
        table.add_column(col, overflow="fold")
    ckpts = {}
    for recipe in VISION_RECIPES:
        ckpt = ckpts[recipe] = checkpoint(workdir, recipe, fresh)
        art = workdir / f"artifact-{recipe}"
        took = "(cached)"
        if fresh or not current(art):
            t0 = time.perf_counter()
            with StageProgress(f"export {recipe}") as progress:
                export_artifact(ckpt, art, ExportOptions(force=True, tensorrt=["10.3"]), progress=progress)
            took = f"{time.perf_counter() - t0:.0f} s"
        findings, _ = lint_artifact(art, "10.3")
        errors = sum(f.severity == "error" for f in findings)
        model = load_checkpoint(ckpt)
        pipe = Pipeline.load(art)
        for name, path in crops.items():
            batch = model.vision.processor().process([Image.open(path)])
            want = generate_text(ckpt, QUESTION, image=path, routing="static", max_new_tokens=12, model=model)
            ours, rel, got, same = runtime_vs_pytorch(pipe, path, model.image_features(batch)[0], want.tokens)
            first = min(want.kept_counts) if want.kept_counts else None
            size = Image.open(path).size
            inputs = len(batch.pixels)
            grid = model.vision.anyres.grid(size) if model.vision.anyres is not None else None
            table.add_row(recipe, f"{took}, {errors} errors", f"{name} {size[0]}x{size[1]}",
                          f"{inputs} ({grid[0]}x{grid[1]} tiles + base)" if grid else f"{inputs} (one image)",
                          str(ours.shape[0]), f"{want.kept_counts[first]} of {want.seq_len}" if first is not None else "-",
                          f"{rel:.1e} max rel.", "identical" if same else "DIFFER", repr(got.text[:20]))
    console.print(table)
    convnext_directory_table(workdir, ckpts["gamma-mod-hr"], crops)


def runtime_vs_pytorch(pipe, path: Path, ref, want_tokens: list[int]):
    """The runtime's image features and greedy tokens for one image against PyTorch's (features
    ``ref`` [tokens, hidden], tokens ``want_tokens``): (features, max relative difference, the
    runtime's result, whether the tokens are identical)."""
    [ours] = pipe.encode_images([path])
    ref = ref.detach().numpy()
    rel = float(abs(ours - ref).max() / abs(ref).max())
    [got] = pipe.generate([path], [QUESTION], max_new_tokens=12)
    return ours, rel, got, got.tokens == [t for t in want_tokens if t != pipe.tokenizer.eos_id]


def convnext_directory_table(workdir: Path, ckpt: Path, crops: dict[str, Path]) -> None:
    """7b: a LLaVA-HR checkpoint that lacks the ConvNeXt branch's weights, with them from a local
    timm or open_clip directory (``--vision-tower-slow``): the same image features and tokens in
    PyTorch, and (timm's layout) exported and run through the torch-free runtime."""
    import re

    import torch
    from PIL import Image
    from rich.table import Table

    from gammamod.console import StageProgress, console
    from gammamod.errors import GammamodError
    from gammamod.export import load_checkpoint
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.export.generate import generate_text
    from gammamod.export.tiny_vision import CONVNEXT_LAYOUTS, split_convnext
    from gammamod.runtime.pipeline import Pipeline

    table = Table(title="7b. LLaVA-HR without the ConvNeXt weights in the checkpoint: them from a local timm or "
                        "open_clip directory (--vision-tower-slow), against the whole checkpoint, 12 greedy tokens")
    for col in ("ConvNeXt weights from", "files", "without the directory", "PyTorch features vs whole",
                "PyTorch tokens vs whole", "exported, runtime vs whole"):
        table.add_column(col, overflow="fold")
    whole = load_checkpoint(ckpt)
    kw = dict(routing="static", max_new_tokens=12)
    with torch.no_grad():  # the whole checkpoint's features and tokens per crop, once
        batches = {name: whole.vision.processor().process([Image.open(path)]) for name, path in crops.items()}
        refs = {name: (whole.image_features(batches[name])[0],
                       generate_text(ckpt, QUESTION, image=path, model=whole, **kw).tokens)
                for name, path in crops.items()}
    for layout in CONVNEXT_LAYOUTS:
        part, convnext = split_convnext(ckpt, workdir / f"hr-without-convnext-{layout}",
                                        workdir / f"convnext-{layout}", layout, force=True)
        try:
            load_checkpoint(part)
            refused = "loaded (unexpected)"
        except GammamodError as e:
            missing = re.search(r"missing key (\S+)", str(e))
            refused = (f"refused, naming the missing ...slow_vision_tower.vision_tower."
                       f"{missing.group(1).split('vision_tower.')[-1]}" if missing else f"refused: {e}")
        model = load_checkpoint(part, vision_tower_slow=convnext)
        diff, same = 0.0, True
        for name, path in crops.items():
            with torch.no_grad():
                got = model.image_features(batches[name])[0]
            diff = max(diff, float((got - refs[name][0]).abs().max()))
            same &= generate_text(part, QUESTION, image=path, model=model, **kw).tokens == refs[name][1]
        ran = "-"
        if layout == "timm":
            art = workdir / "artifact-hr-convnext-dir"
            t0 = time.perf_counter()
            with StageProgress("export gamma-mod-hr --vision-tower-slow") as progress:
                export_artifact(part, art, ExportOptions(force=True, vision_tower_slow=str(convnext)), progress=progress)
            pipe = Pipeline.load(art)
            results = [runtime_vs_pytorch(pipe, path, *refs[name]) for name, path in crops.items()]
            ran = (f"export {time.perf_counter() - t0:.0f} s; features {max(r[1] for r in results):.1e} max rel., "
                   "tokens " + ("identical" if all(r[3] for r in results) else "DIFFER"))
        table.add_row(layout, ", ".join(sorted(f.name for f in convnext.iterdir())), refused,
                      f"max abs diff {diff:.1e} over {len(crops)} crops", "identical" if same else "DIFFER", ran)
    console.print(table)
