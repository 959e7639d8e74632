"""The demo's calibration step: ARank on the tiny gamma-MoD checkpoint, then capacities from the
shipped calibration set feeding a threshold-routed export, checked against gamma-MoD's released
inference (``reference`` routing) on those samples; and the quantization step (:func:`quantize_demo`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run(workdir: Path, ckpt: Path) -> None:
    from rich.table import Table

    from gammamod.console import StageProgress, console
    from gammamod.export.exporter import ExportOptions, export_artifact, read_capacity_file
    from gammamod.export.generate import generate_from_embeds
    from gammamod.runtime import Pipeline

    from . import arank, capacity
    from .samples import load_model, prepared_samples

    ranks = arank.analyse(ckpt, random=2)
    console.print(f"[bold]6. Calibrate[/bold] ({ckpt.name}): ARank over 2 samples\n{arank.table(ranks)}")

    report = capacity.calibrate(ckpt, quantile=1.0, decode_steps=8)
    cap_file, _ = capacity.write(report, workdir / "capacity-gamma-mod.json", force=True)
    console.print(capacity.table(report))
    art = workdir / "artifact-gamma-mod-threshold"
    overrides, span = read_capacity_file(cap_file)
    with StageProgress("export gamma-mod --routing threshold") as p:
        export_artifact(ckpt, art, ExportOptions(routing="threshold", capacity=overrides, capacity_span=span,
                                                 force=True), progress=p)

    model = load_model(ckpt)
    pipe = Pipeline.load(art)
    table = Table(title="Threshold-routed artifact (capacities above) on ONNX Runtime vs the released inference, "
                        "shipped calibration set, prefill + 8 decode steps")
    for col in ("sample", "prompt tokens", "tokens kept per MoD layer", "max rel. logit error", "greedy tokens",
                "KV lengths", "capacity overflows"):
        table.add_column(col, overflow="fold")
    for i, s in enumerate(prepared_samples(model, ckpt)):
        ref = generate_from_embeds(model, s.embeds, routing="reference", max_new_tokens=9, return_logits=True)
        gen = pipe.generator(1)
        logits, errors, tokens = gen.prefill(s.embeds.numpy()), [], []
        kept = " ".join(f"{l}:{int(gen.kept_per_row[l][0])}" for l in sorted(gen.kept_per_row))
        for step in range(9):
            want = ref.logits[:, step].numpy()
            errors.append(float(np.abs(logits - want).max() / np.abs(want).max()))
            tokens.append(int(np.argmax(logits)))
            if step < 8:
                logits = gen.decode([tokens[-1]])
        same_kv = np.array_equal(gen.kv_lengths(), ref.kv_lengths.numpy())
        table.add_row(str(i), str(s.length), kept, f"{max(errors):.1e}",
                      "identical" if tokens == ref.tokens[0].tolist() else "DIFFER",
                      "identical" if same_kv else "DIFFER", str(sum(gen.overflows.values())))
    console.print(table)


QUESTION = "What is in the picture?"


def _quantized(artifact: Path, out: Path, precision: str, fresh: bool, **calibration) -> Path:
    from gammamod.calib.quantize import quantize_artifact
    from gammamod.console import StageProgress
    from gammamod.errors import GammamodError
    from gammamod.manifest import read_manifest

    try:
        if not fresh and read_manifest(out).get("quantization", {}).get("source_artifact") == str(artifact):
            return out
    except GammamodError:
        pass
    with StageProgress(f"calib quantize {precision}") as progress:
        quantize_artifact(artifact, out, precision, force=True, progress=progress, **calibration)
    return out


def quantize_demo(workdir: Path, checkpoint: Path, artifact: Path, image: Path, bench=None, fresh: bool = False) -> None:
    """The quantization step: an int8 artifact made from the tiny p-MoD one (check-onnx, validate with
    the int8 tolerances, an answer next to fp32's); with ``bench`` (checkpoint, artifact) of the
    bench-size p-MoD model (not with ``--quick``), an int8 bench-size artifact validated and benched
    next to its fp32 source in one run."""
    from rich.table import Table

    from gammamod.console import StageProgress, console

    from gammamod.engines.lint import lint_artifact
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.validate.validate import run_validate, summary_table

    int8 = _quantized(artifact, workdir / "artifact-p-mod-int8", "int8", fresh, random=2, steps=2)
    findings, _ = lint_artifact(int8, "10.3")
    errors = [f for f in findings if f.severity == "error"]
    table = Table(title="calib quantize int8 (tiny p-MoD): explicit Q/DQ on the projections, routers / norms / MoD "
                        "nodes / logits in fp32")
    for col in ("artifact", "decoder weights MiB", "TensorRT 10.3 Q/DQ lint", "answer"):
        table.add_column(col, overflow="fold")
    for label, art in (("fp32", artifact), ("int8", int8)):
        pipe = Pipeline.load(art)
        text = pipe.generate([str(image)], [QUESTION], max_new_tokens=8)[0].text
        size = (Path(art) / "decoder.weights").stat().st_size / 2**20
        lint = "-" if label == "fp32" else ("passes" if not errors else f"{len(errors)} errors: {errors[0]}")
        table.add_row(label, f"{size:.1f}", lint, repr(text[:40]))
    console.print(table)
    with StageProgress("validate int8") as progress:
        report = run_validate(int8, checkpoint, samples=1, steps=4, progress=progress)
    console.print(summary_table(report))
    if bench is None:
        return
    bench_ckpt, bench_art = bench
    from rich.markdown import Markdown

    from gammamod.validate.bench import run_bench

    bench_int8 = _quantized(bench_art, workdir / "bench-artifact-p-mod-int8", "int8", fresh)
    console.print("[bold]int8 bench-size p-MoD[/bold]: validate against PyTorch, then bench next to fp32 "
                  "(ONNX Runtime CPU)")
    with StageProgress("validate int8") as progress:
        report = run_validate(bench_int8, bench_ckpt, samples=2, steps=8, progress=progress)
    console.print(summary_table(report))
    with StageProgress("bench int8 vs fp32") as progress:
        result = run_bench(bench_int8, compare=[bench_art], tokens=16, warmup=2, repeats=3,
                           out_dir=workdir / "bench-int8-results", image=image, progress=progress)
    console.print(Markdown(Path(result["outputs"]["bench.md"]).read_text()))
