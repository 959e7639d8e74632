"""``gammamod demo``: the pipeline end to end on seeded tiny checkpoints.

1. make tiny gamma-MoD and p-MoD checkpoints (the authors' formats);
2. generate from the bundled test image with the PyTorch reference in every routing mode
   (reference, static, dense): kept tokens per MoD layer, decoder FLOPs against dense;
3. export both to static-capacity ONNX (with the TensorRT 10.3 copies), lint them for TensorRT,
   and check the exported decoder on ONNX Runtime against the PyTorch static mode; run the
   TensorRT plugins' kernels (on CPU) on the router scores ONNX Runtime saw, same kept tokens;
4. generate through the torch-free runtime (a batch of two prompts about the image, and a chat
   turn that reuses the cached image): time to first token, tokens/s, KV cache per layer;
5. one artifact, several prompt layouts: a custom system prompt and text before the image move
   the routed span; the runtime finds it and answers as PyTorch does;
6. what gammamod refuses: real attempts at destroying files and feeding garbage, each one line;
7. calibrate: ARank on the tiny gamma-MoD checkpoint; capacities from the shipped calibration set
   feeding a threshold-routed export that equals gamma-MoD's released inference on it;
8. the released checkpoints' vision (not with --quick): tiny LLaVA-HR gamma-MoD and LLaVA-NeXT
   p-MoD models exported and run on images of three aspect ratios against PyTorch;
9. on a bench-size p-MoD model (LLaVA-1.5 geometry: 576 image tokens, 32 layers): export, validate
   against PyTorch, and bench against its dense twin and the PyTorch baselines, with the chart;
10. int8 quantization (``calib quantize``): the tiny p-MoD artifact linted, run and validated; without
   ``--quick`` the bench-size one validated and benched next to fp32;
11. engines without TensorRT: `build --dry-run` plans for an H100 and a Jetson AGX Orin (profiles,
   device memory next to the dense twin's) and a bundle for the Orin (with 9.: the bench-size model too);
12. serving: the routing picture (``inspect``) and a ``serve`` round trip with the ``openai`` client.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from .console import StageProgress, console, stage_progress

DEMO_RECIPES = ("gamma-mod", "p-mod")
DEMO_PROMPT = "What is in the picture?"
DEMO_QUESTIONS = [DEMO_PROMPT, "Describe the colours and the shapes you see, please."]


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


def run_demo(workdir: Path, fresh: bool = False, quick: bool = False) -> int:
    from gammamod.engines.build_demo import engines_step
    from gammamod.engines.demo import kernels_step

    workdir.mkdir(parents=True, exist_ok=True)
    image = test_image()
    console.print(f"[bold]gammamod demo[/bold]: tiny checkpoints in {workdir}, image {image.name}")
    checkpoints = {recipe: _checkpoint(workdir, recipe, fresh) for recipe in DEMO_RECIPES}
    _reference_table(checkpoints, image)
    artifacts = _export_table(workdir, checkpoints, image, fresh)
    kernels_step(artifacts, image, DEMO_QUESTIONS, "2b. The TensorRT plugins' kernels (their CUDA source, run on CPU) "
                 "on each MoD layer's real router scores, against ONNX Runtime's kept tokens")
    _runtime_table(artifacts, image)
    _layouts_table(checkpoints, artifacts, image)
    _refusals_table(workdir, checkpoints, artifacts)
    bench = None
    if not quick:
        from gammamod.calib.demo import run as calibrate
        from gammamod.export.vision_demo import released_vision_table

        calibrate(workdir, checkpoints["gamma-mod"])
        released_vision_table(workdir, image, fresh, checkpoint=_checkpoint, current=_current)
        bench = _bench_size(workdir, image, fresh)
    from gammamod.calib.demo import quantize_demo
    from gammamod.serve.demo import serving_demo

    quantize_demo(workdir, checkpoints["p-mod"], artifacts["p-mod"], image, bench, fresh)
    engines_step({**artifacts, **({} if quick else {"bench-size p-mod": workdir / "bench-artifact-p-mod"})}, workdir)
    serving_demo(workdir, artifacts["p-mod"], image, routing_of=None if quick else workdir / "bench-artifact-p-mod")
    return 0


def _current(artifact: Path) -> bool:
    """An artifact this gammamod reads (a re-run reuses it; one of an older schema is re-exported)."""
    from gammamod.errors import GammamodError
    from gammamod.manifest import read_manifest

    try:
        read_manifest(artifact)
        return True
    except GammamodError:
        return False


def _checkpoint(workdir: Path, recipe: str, fresh: bool) -> Path:
    from gammamod.export.tiny import make_tiny

    ckpt = workdir / f"tiny-{recipe}"
    if fresh or not (ckpt / "config.json").is_file():
        with stage_progress(f"make-tiny {recipe}") as tick:
            make_tiny(ckpt, recipe, size="tiny", seed=0, force=True, progress=tick)
    return ckpt


def _reference_table(checkpoints: dict[str, Path], image: Path) -> None:
    from rich.table import Table

    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_text

    table = Table(title=f"1. PyTorch reference: {DEMO_PROMPT!r} about {image.name}, greedy, 16 new tokens")
    for col in ("recipe", "mode", "kept tokens per MoD layer", "FLOPs vs dense", "KV entries", "text"):
        table.add_column(col, overflow="fold")
    for recipe, ckpt in checkpoints.items():
        model = load_checkpoint(ckpt)
        for mode in ("reference", "static", "dense"):
            res = generate_text(ckpt, DEMO_PROMPT, image=image, routing=mode, max_new_tokens=16, model=model)
            table.add_row(recipe, mode, f"{_kept_text(res.kept_counts, res.seq_len)} of {res.seq_len}",
                          f"{res.flop_ratio:.2f}x", str(sum(res.kv_lengths)), res.text[:32])
    console.print(table)


def _export_table(workdir: Path, checkpoints: dict[str, Path], image: Path, fresh: bool) -> dict[str, Path]:
    from rich.table import Table

    from gammamod.engines.lint import lint_artifact
    from gammamod.export import load_checkpoint
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.manifest import read_manifest
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.validate.parity import decoder_parity, reference_batch

    table = Table(title="2. Export to static-capacity ONNX; the decoder on ONNX Runtime vs PyTorch static "
                        "(2 prompts, prefill + 8 decode steps)")
    for col in ("recipe", "export", "artifact", "TensorRT 10.3 lint", "max rel. logit error", "kept indices",
                "KV lengths"):
        table.add_column(col, overflow="fold")
    artifacts = {}
    for recipe, ckpt in checkpoints.items():
        art = workdir / f"artifact-{recipe}"
        if fresh or not _current(art):
            t0 = time.perf_counter()
            with StageProgress(f"export {recipe}") as progress:
                export_artifact(ckpt, art, ExportOptions(force=True, tensorrt=["10.3"]), progress=progress)
            took = f"{time.perf_counter() - t0:.0f} s"
        else:
            took = "(cached)"
        artifacts[recipe] = art
        manifest = read_manifest(art)
        findings, _ = lint_artifact(art, "10.3")
        errors = sum(f.severity == "error" for f in findings)
        model = load_checkpoint(ckpt)
        parity = decoder_parity(model, Pipeline.load(art), reference_batch(model, ckpt, DEMO_QUESTIONS, image))
        size = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
        kept = "identical" if all(v == 1.0 for v in parity.kept_match.values()) else str(parity.kept_match)
        table.add_row(recipe, took, f"{size:.1f} MiB, {len(manifest['files'])} files", f"{errors} errors",
                      f"{parity.max_rel_err:.1e}", f"{kept} ({len(parity.kept_match)} MoD layers)",
                      "identical" if parity.kv_lengths_match else "DIFFER")
    console.print(table)
    return artifacts


def _runtime_table(artifacts: dict[str, Path], image: Path) -> None:
    from rich.table import Table

    from gammamod.runtime.chat import Chat
    from gammamod.runtime.pipeline import Pipeline

    table = Table(title="3. The torch-free runtime on ONNX Runtime (CPU): 2 prompts about the image, 24 new tokens "
                        "each, then a chat turn that reuses the cached image")
    for col in ("recipe", "answers", "time to first token", "decode", "KV cache (MoD layer / dense layer)",
                "chat turn 2"):
        table.add_column(col, overflow="fold")
    for recipe, art in artifacts.items():
        pipe = Pipeline.load(art)
        pipe.generate([image], [DEMO_PROMPT], max_new_tokens=4)  # warm-up
        results = pipe.generate([image, image], DEMO_QUESTIONS, max_new_tokens=24)
        stats = pipe.last_stats
        per_layer = stats.kv_bytes_per_layer
        mod_layers = pipe.manifest["recipe"]["mod_layers"]
        dense = [b for i, b in enumerate(per_layer) if i not in mod_layers]
        mod = [b for i, b in enumerate(per_layer) if i in mod_layers]
        chat = Chat(pipe, image=image)
        chat.ask(DEMO_PROMPT, max_new_tokens=12)
        second = chat.ask("What colour is the car?", max_new_tokens=12)
        table.add_row(recipe, " | ".join(repr(r.text[:24]) for r in results),
                      f"{stats.ttft_s * 1000:.0f} ms (vision {stats.vision_s * 1000:.0f} ms)",
                      f"{stats.tokens_per_s:.0f} tokens/s (batch 2)",
                      f"{min(mod) / 1024:.1f} / {max(dense) / 1024:.1f} KiB" if mod else "-",
                      f"{pipe.last_stats.prefill_s * 1000:.1f} ms to first token: {second.text[:20]!r}")
    console.print(table)


LAYOUTS = [("default prompt", DEMO_PROMPT, None),
           ("own system prompt", DEMO_PROMPT, "You are a terse assistant. Answer in a few words."),
           ("text before the image", "Look closely at this photo: <image>\nWhat is in it?", None)]


def _layouts_table(checkpoints: dict[str, Path], artifacts: dict[str, Path], image: Path) -> None:
    """One exported artifact per recipe answers prompts whose routed span sits elsewhere, with the
    kept counts computed for each span, and the tokens PyTorch's static mode gives."""
    from rich.table import Table

    from gammamod.export import generate_from_embeds, load_checkpoint
    from gammamod.export.generate import prepare_prompts
    from gammamod.runtime.image import load_image
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.runtime.prompt import VICUNA_V1
    from gammamod.runtime.tokenizer import Tokenizer

    table = Table(title="4. One artifact, several prompt layouts: the runtime finds the routed span in each prompt "
                        "and computes the kept counts for it (12 greedy tokens)")
    for col in ("recipe", "layout", "routed span (start, length)", "kept per MoD layer", "answer", "= PyTorch"):
        table.add_column(col, overflow="fold")
    for recipe, art in artifacts.items():
        pipe = Pipeline.load(art)
        model = load_checkpoint(checkpoints[recipe])
        tok = Tokenizer.from_dir(checkpoints[recipe])
        pixels = model.vision.processor().process([load_image(image)])
        for name, question, system in LAYOUTS:
            prepared = pipe.prepare([image], [question], system=system)
            start, length = prepared.routable[0]
            counts = pipe.generator(1).kept_counts(length)
            [got] = pipe.generate([image], [question], max_new_tokens=12, system=system)
            batch = prepare_prompts(model, tok, [VICUNA_V1.prompt(question, system=system)], pixels)
            ref = generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, max_new_tokens=12,
                                       eos_token_id=tok.eos_id)
            same = got.tokens == [t for t in ref.tokens[0].tolist() if t != tok.eos_id]
            table.add_row(recipe, name, f"({start}, {length})", f"{min(counts.values())}..{max(counts.values())}",
                          repr(got.text[:24]), "identical" if same else "DIFFER")
    console.print(table)


def _refusals_table(workdir: Path, checkpoints: dict[str, Path], artifacts: dict[str, Path]) -> None:
    """Real attempts, each answered in one line, with what they leave behind checked."""
    import json
    import shutil

    import numpy as np
    from PIL import Image
    from rich.table import Table

    from gammamod.errors import GammamodError
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.runtime.image import load_image
    from gammamod.runtime.pipeline import Pipeline

    scratch = workdir / "refusals"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    ckpt = checkpoints["gamma-mod"]
    before = sorted(p.name for p in ckpt.iterdir())
    edited = scratch / "edited-artifact"
    shutil.copytree(artifacts["gamma-mod"], edited)
    data = json.loads((edited / "manifest.json").read_text())
    data["routing"]["capacity"]["overrides"] = {"3": {"fraction": "1.5"}}
    (edited / "manifest.json").write_text(json.dumps(data))
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(scratch / "gray16.png")
    cases = [
        ("export the checkpoint over itself (--force)",
         lambda: export_artifact(ckpt, ckpt, ExportOptions(force=True))),
        ("export over a folder of the user's (--force)",
         lambda: export_artifact(ckpt, scratch, ExportOptions(force=True))),
        ("load a manifest edited to keep 150% of the span", lambda: Pipeline.load(edited)),
        ("sample at temperature NaN",
         lambda: Pipeline.load(artifacts["gamma-mod"]).generate(None, ["hi"], temperature=float("nan"))),
    ]
    table = Table(title="5. What gammamod refuses (real attempts; each is one line and leaves every file as it was)")
    for col in ("attempt", "answer"):
        table.add_column(col, overflow="fold")
    for what, attempt in cases:
        try:
            attempt()
            answer = "ACCEPTED (a bug)"
        except GammamodError as e:
            answer = str(e)
        table.add_row(what, answer)
    gray = np.asarray(load_image(scratch / "gray16.png"))[..., 0]
    table.add_row("read a 16-bit grayscale PNG (Pillow alone makes it 99% white)",
                  f"scaled to 8 bits: mean {gray.mean():.0f} of 255, as the image's mean {ramp.mean() / 257:.0f}")
    assert sorted(p.name for p in ckpt.iterdir()) == before  # the checkpoint is untouched
    console.print(table)


def _bench_size(workdir: Path, image: Path, fresh: bool) -> tuple[Path, Path]:
    from rich.markdown import Markdown

    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.export.tiny import make_tiny
    from gammamod.validate.bench import run_bench
    from gammamod.validate.validate import run_validate, summary_table, write_report

    ckpt, art = workdir / "bench-p-mod", workdir / "bench-artifact-p-mod"
    if fresh or not (ckpt / "config.json").is_file():
        with stage_progress("make-tiny p-mod --size bench") as tick:
            make_tiny(ckpt, "p-mod", size="bench", seed=0, shard_mb=200, force=True, progress=tick)
    if fresh or not _current(art):
        with StageProgress("export bench-size p-mod") as progress:
            export_artifact(ckpt, art, ExportOptions(force=True), progress=progress)
    console.print("[bold]8. Bench-size p-MoD[/bold] (336 px, 576 image tokens, 32 layers): validate, then bench")
    with StageProgress("validate") as progress:
        report = run_validate(art, ckpt, samples=2, steps=8, progress=progress)
    write_report(report, workdir / "bench-validate.json")
    console.print(summary_table(report))
    with StageProgress("bench") as progress:
        bench = run_bench(art, reference=ckpt, tokens=16, warmup=2, repeats=3, out_dir=workdir / "bench-results",
                          image=image, progress=progress)
    console.print(Markdown((workdir / "bench-results" / "bench.md").read_text()))
    console.print(f"[bold]chart:[/bold] {bench['outputs']['bench.png']}  (table {bench['outputs']['bench.md']}, "
                  f"data {bench['outputs']['bench.json']})", soft_wrap=True)
    return ckpt, art
