"""The demo's quantization step: an int8 artifact made from the tiny p-MoD one (check-onnx, validate
with the int8 tolerances, an answer next to fp32's); without ``--quick``, an int8 bench-size
artifact validated and benched next to its fp32 source in one run."""

from __future__ import annotations

from pathlib import Path

from gammamod.console import StageProgress, console

QUESTION = "What is in the picture?"


def _quantized(artifact: Path, out: Path, precision: str, fresh: bool, **calibration) -> Path:
    from gammamod.calib.quantize import quantize_artifact
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
    """``bench``: (checkpoint, artifact) of the bench-size p-MoD model, or None (``--quick``)."""
    from rich.table import Table

    from gammamod.engines.lint import lint_artifact
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.validate.validate import run_validate, summary_table

    int8 = _quantized(artifact, workdir / "artifact-p-mod-int8", "int8", fresh, random=2, steps=2)
    findings, _ = lint_artifact(int8, "10.3")
    errors = [f for f in findings if f.severity == "error"]
    table = Table(title="7. calib quantize int8 (tiny p-MoD): explicit Q/DQ on the projections, routers / norms / MoD "
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
    console.print("[bold]8. int8 bench-size p-MoD[/bold]: validate against PyTorch, then bench next to fp32 "
                  "(ONNX Runtime CPU)")
    with StageProgress("validate int8") as progress:
        report = run_validate(bench_int8, bench_ckpt, samples=2, steps=8, progress=progress)
    console.print(summary_table(report))
    with StageProgress("bench int8 vs fp32") as progress:
        result = run_bench(bench_int8, compare=[bench_art], tokens=16, warmup=2, repeats=3,
                           out_dir=workdir / "bench-int8-results", image=image, progress=progress)
    console.print(Markdown(Path(result["outputs"]["bench.md"]).read_text()))
