"""The demo's calibration step: ARank on the tiny gamma-MoD checkpoint, then capacities from the
shipped calibration set feeding a threshold-routed export, checked against gamma-MoD's released
inference (``reference`` routing) on those samples."""

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
