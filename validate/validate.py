"""``gammamod validate ARTIFACT --reference CKPT``: how close the deployed artifact is to PyTorch.

For each sample (seeded random images and prompts, or the user's), every available backend
(ONNX Runtime CPU, ONNX Runtime CUDA, TensorRT) and the PyTorch reference run:

* the vision graph on the same ``pixel_values``;
* the decoder on the same prompt embeddings: prefill, then ``steps`` decode steps fed the
  reference's greedy tokens, so each step compares the same computation;
* the decoder free-running (its own argmax) to find how many greedy tokens match.

Polygraphy's ``Comparator`` runs the runners over the same feeds and its ``SimpleCompareFunc``
gives the per-tensor statistics (max, mean and median absolute and relative error); routing
agreement (identical kept indices per MoD layer), KV lengths and greedy match are compared here.
Pass/fail is against tolerances per dtype; the report is JSON, the summary a table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

DEFAULT_PROMPTS = 6  # validate's prompts: the first six of gammamod.calib.data.PROMPTS, in turn


@dataclass(frozen=True)
class Tolerance:
    logits: float  # max |backend - reference| / max |reference|, per step
    features: float  # the same for the vision graph's image features
    kept: float  # least share of rows with identical kept indices, per MoD layer
    greedy: int | None  # least greedy-token match length (None: every step)
    kv_exact: bool  # KV lengths identical at every step
    kept_overlap: float = 0.0  # least share of the reference's kept tokens also kept, per MoD layer
    # a greedy token may differ where the reference's top-2 margin is at most this share of the
    # logits' scale (a near tie the accepted logits error can flip); 0: never
    greedy_margin: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


TOLERANCES = {
    "float32": Tolerance(logits=1e-4, features=1e-4, kept=1.0, greedy=None, kv_exact=True),
    # half precision: near-ties in the router or the argmax may flip
    "float16": Tolerance(logits=3e-2, features=3e-2, kept=0.8, greedy=4, kv_exact=False),
    "bfloat16": Tolerance(logits=8e-2, features=8e-2, kept=0.6, greedy=2, kv_exact=False),
}

# Quantized artifacts (calib quantize), against the fp32 PyTorch reference; the vision graph stays
# fp32. int8 rounds each weight to 1/254 of its channel's range and each activation to 1/254 of its
# calibrated range; int4 each weight to 1/15 of its block's range (about 9% rms of a Gaussian
# weight: 16x int8's step); fp8 e4m3 keeps 3 mantissa bits (1/16 relative, weights and
# activations). On our seeded random-weight checkpoints (no trained structure: each layer's update
# is as large as the residual stream, so rounding compounds over 32 layers) the logits error,
# as a share of the logits' largest magnitude, measured 0.09 (bench size) and 0.14 to 0.25 (tiny,
# by calibration set) for int8 and 0.42 (bench size) for int4 (block 32); the tolerances sit above
# those. Routing: a router
# reads hidden states that quantized layers produced, so near-tie scores flip: the kept tokens must
# mostly coincide (the share of the reference's kept tokens also kept, per MoD layer; measured
# down to 0.80 for int8 and 0.54 for int4 in p-MoD's last layers, which keep 15% of the image).
# Greedy: every token must match, except where the reference's top-2 margin is within twice the
# logits tolerance (a near tie the accepted error can flip): for int4 that is every step, so its
# greedy match is reported, not gated. fp8 runs emulated here: it gets int4's tolerances.
QUANTIZED_TOLERANCES = {
    "int8": Tolerance(logits=0.3, features=1e-4, kept=0.0, greedy=None, kv_exact=False, kept_overlap=0.75,
                      greedy_margin=0.6),
    "int4": Tolerance(logits=0.5, features=1e-4, kept=0.0, greedy=None, kv_exact=False, kept_overlap=0.5,
                      greedy_margin=1.0),
    "fp8": Tolerance(logits=0.5, features=1e-4, kept=0.0, greedy=None, kv_exact=False, kept_overlap=0.5,
                     greedy_margin=1.0),
}


@dataclass
class BackendReport:
    name: str
    logits: dict = field(default_factory=dict)  # worst statistics over samples and steps
    features: dict = field(default_factory=dict)
    kept_agreement: dict = field(default_factory=dict)  # MoD layer -> least share over samples
    kept_overlap: dict = field(default_factory=dict)  # MoD layer -> least share of the reference's kept tokens kept
    kv_lengths_match: bool = True
    greedy_match: list[int] = field(default_factory=list)  # per sample
    capacity_overflows: dict = field(default_factory=dict)  # threshold routing: MoD layer -> samples overflowed
    greedy_near_tie: list[bool] = field(default_factory=list)  # per sample: its first mismatch was a near tie
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def available_backends(manifest, requested: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(label, backend, device) of every backend this machine can run the artifact on."""
    found = [("ort-cpu", "ort", "cpu")]
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append(("ort-cuda", "ort", "cuda"))
    except ImportError:
        found = []
    try:
        import tensorrt  # noqa: F401

        if manifest.get("engines"):
            found.append(("tensorrt", "tensorrt", "cuda:0"))
    except ImportError:
        pass
    if requested:
        known = {label for label, _, _ in found}
        missing = [r for r in requested if r not in known]
        if missing:
            raise GammamodError(f"backends {missing} are not available here (available: {sorted(known)})")
        found = [f for f in found if f[0] in requested]
    if not found:
        raise GammamodError("no backend to validate: install onnxruntime")
    return found


def validation_inputs(samples: int, seed: int, images_dir=None, prompts_file=None, with_images=True):
    """[(image, prompt)]: the user's files, or seeded random images (varied aspect ratios, to
    exercise pad-to-square) and prompts (``gammamod.calib.data``, shared with calibration)."""
    from gammamod.calib.data import PROMPTS as CALIB_PROMPTS
    from gammamod.calib.data import list_images, random_samples, read_prompts

    prompts = read_prompts(Path(prompts_file)) if prompts_file is not None else \
        [CALIB_PROMPTS[i % DEFAULT_PROMPTS] for i in range(samples)]
    if not with_images:
        return [(None, p) for p in prompts[:samples]]
    if images_dir is not None:
        files = list_images(Path(images_dir), "--images")
        n = max(len(files), len(prompts))
        return [(str(files[i % len(files)]), prompts[i % len(prompts)]) for i in range(n)]
    return [(s.image, prompts[i % len(prompts)]) for i, s in enumerate(random_samples(samples, seed))]


def _stats(result, scale: float) -> dict:
    """Polygraphy's OutputCompareResult as a dict, with the error normalised by the reference."""
    return {"max_abs": float(result.max_absdiff), "mean_abs": float(result.mean_absdiff),
            "median_abs": float(result.median_absdiff), "max_rel": float(result.max_reldiff),
            "mean_rel": float(result.mean_reldiff), "median_rel": float(result.median_reldiff),
            "max_abs_over_scale": float(result.max_absdiff) / scale if scale else float("inf")}


def _worst(a: dict, b: dict) -> dict:
    return {k: max(a.get(k, 0.0), v) for k, v in b.items()} if a else dict(b)


def _compare(runners, feeds, output: str, tolerance: float, save_to: Path | None):
    """Run the runners over the feeds (Polygraphy's Comparator), compare ``output`` of each
    backend with the first runner's (the reference) at every feed, and return (run results,
    {backend: [statistics per feed]}). The threshold is ``tolerance`` times the reference's
    largest magnitude over the feeds."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    with np.errstate(divide="ignore", invalid="ignore"):  # relative errors of exact zeros
        results = Comparator.run(runners, data_loader=feeds)
    if save_to is not None:
        results.save(str(save_to))
    scale = max(float(np.abs(it[output]).max()) for it in results[0][1])
    func = SimpleCompareFunc(check_error_stat="max", atol={output: tolerance * scale}, rtol={output: 0.0},
                             find_output_func=lambda name, index, result: [name] if name == output else [])
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = Comparator.compare_accuracy(results, comparisons=[(0, k) for k in range(1, len(results))],
                                               compare_func=func)[0]
    stats = {}
    for (_, name), iterations in accuracy.items():
        stats[name] = [_stats(it[output], scale) for it in iterations]
    return results, stats


def _overlap(ours, reference) -> float:
    """The least share, over rows, of the reference's kept token indices that ``ours`` keeps too."""
    if ours is None or ours.shape[0] != reference.shape[0]:
        return 0.0
    return float(min(len(np.intersect1d(ours[b], reference[b])) / max(reference.shape[1], 1)
                     for b in range(reference.shape[0])))


def _margin(logits) -> float:
    """The reference's top-2 logit margin (row 0)."""
    top = np.sort(np.asarray(logits, dtype=np.float64)[0])
    return float(top[-1] - top[-2])


def _logits_scale(iterations) -> float:
    return max(float(np.abs(it["logits"]).max()) for it in iterations)


def _greedy_match(pipeline, batch, ref_tokens: np.ndarray, routable) -> int:
    gen = pipeline.generator(batch_size=1)
    logits = gen.prefill(batch.inputs_embeds.numpy(), routable=routable, lengths=batch.lengths.numpy())
    for i, want in enumerate(ref_tokens):
        token = int(np.asarray(logits).argmax(-1)[0])
        if token != int(want):
            return i
        if i + 1 < len(ref_tokens):
            logits = gen.decode(np.array([token]))
    return len(ref_tokens)


def run_validate(artifact, reference, samples: int = 4, steps: int = 16, seed: int = 0, images_dir=None,
                 prompts_file=None, backends: list[str] | None = None, save_dir=None, vision_tower=None,
                 vision_tower_slow=None, progress=None) -> dict:
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_from_embeds
    from gammamod.manifest import read_manifest
    from gammamod.runtime.pipeline import Pipeline

    from .parity import reference_batch
    from .runners import (RuntimeDecoderRunner, RuntimeVisionRunner, TorchDecoderRunner, TorchVisionRunner,
                          decode_feed, prefill_feed)

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-output failures: our table says them once
    G_LOGGER.colors = False
    stage = progress.stage if progress is not None else (lambda name, total=None: (lambda n=1: None))
    manifest = read_manifest(artifact)
    model = load_checkpoint(reference, vision_tower=vision_tower, vision_tower_slow=vision_tower_slow)
    _check_same_model(manifest, model, reference)
    dtype = manifest["model"]["dtype"]
    quantized = manifest.get("quantization")
    tol = Tolerance(**quantized["tolerance"]) if quantized else TOLERANCES[dtype]
    routing = manifest["routing"]["mode"]
    # a threshold artifact is gamma-MoD's released inference in a static graph: its reference is that inference
    ref_routing = "reference" if routing == "threshold" else routing
    labels = available_backends(manifest, backends)
    pipelines = {label: Pipeline.load(artifact, backend=name, device=device) for label, name, device in labels}
    has_vision = "vision" in manifest["graphs"] and model.has_vision
    inputs = validation_inputs(samples, seed, images_dir, prompts_file, with_images=has_vision)
    save_dir = Path(save_dir) if save_dir else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    reports = {label: BackendReport(label) for label, _, _ in labels}
    advance = stage("validating", len(inputs))
    any_pipe = next(iter(pipelines.values()))
    for i, (image, prompt) in enumerate(inputs):
        # vision graph: identical pixel_values for every runner
        if image is not None:
            from gammamod.runtime.image import load_image

            picture = load_image(image) if isinstance(image, (str, os.PathLike)) else image
            pixels = any_pipe.image_processor.process([picture]).pixels  # anyres: the image's tiles
            runners = [TorchVisionRunner(model)] + [RuntimeVisionRunner(p, label) for label, p in pipelines.items()]
            _, stats = _compare(runners, [{"pixel_values": pixels}], "image_features", tol.features,
                                save_dir / f"vision-{i}.json" if save_dir else None)
            for label, per in stats.items():
                reports[label].features = _worst(reports[label].features, per[0])
        # decoder: identical embeddings, the reference's tokens fed back
        batch = reference_batch(model, reference, [prompt], image if image is not None else None)
        ref = generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, routing=ref_routing,
                                   max_new_tokens=steps + 1, lengths=batch.lengths)
        hidden = manifest["model"]["hidden_size"]
        feeds = [prefill_feed(batch.inputs_embeds.numpy(), batch.lengths.numpy())]
        feeds += [decode_feed(ref.tokens[:, s].numpy(), hidden) for s in range(steps)]
        runners = [TorchDecoderRunner(model, batch.routable, ref_routing)]
        runners += [RuntimeDecoderRunner(p, batch.routable, label) for label, p in pipelines.items()]
        results, stats = _compare(runners, feeds, "logits", tol.logits, save_dir / f"decoder-{i}.json" if save_dir else None)
        reference_iterations = results[0][1]
        for runner in runners[1:]:
            for layer, n in runner.gen.overflows.items():
                if n:
                    reports[runner.name].capacity_overflows[layer] = reports[runner.name].capacity_overflows.get(layer, 0) + 1
        for label, per in stats.items():
            r = reports[label]
            for s in per:
                r.logits = _worst(r.logits, s)
            iterations = dict(results)[label]
            for key, value in reference_iterations[0].items():
                if key.startswith("kept_indices."):
                    layer = int(key.split(".")[1])
                    ours = iterations[0][key] if key in iterations[0] else None
                    share = 0.0 if ours is None or ours.shape != value.shape else float(
                        np.mean([np.array_equal(ours[b], value[b]) for b in range(value.shape[0])]))
                    r.kept_agreement[layer] = min(r.kept_agreement.get(layer, 1.0), share)
                    r.kept_overlap[layer] = min(r.kept_overlap.get(layer, 1.0), _overlap(ours, value))
            same_kv = all(np.array_equal(a["kv_lengths"], b["kv_lengths"])
                          for a, b in zip(reference_iterations, iterations))
            r.kv_lengths_match = r.kv_lengths_match and same_kv
            matched = _greedy_match(pipelines[label], batch, ref.tokens[0].numpy()[:steps], batch.routable)
            r.greedy_match.append(matched)
            r.greedy_near_tie.append(matched < steps and _margin(reference_iterations[matched]["logits"]) <=
                                     tol.greedy_margin * _logits_scale(reference_iterations))
        advance()
    for label, r in reports.items():
        if r.logits.get("max_abs_over_scale", 0.0) > tol.logits:
            r.failures.append(f"logits error {r.logits['max_abs_over_scale']:.2e} > {tol.logits:.2g}")
        if r.features and r.features.get("max_abs_over_scale", 0.0) > tol.features:
            r.failures.append(f"image features error {r.features['max_abs_over_scale']:.2e} > {tol.features:.0e}")
        low = {layer: share for layer, share in r.kept_agreement.items() if share < tol.kept}
        if low:
            r.failures.append(f"kept indices differ in MoD layers {sorted(low)} (agreement {min(low.values()):.2f} < "
                              f"{tol.kept})")
        if r.capacity_overflows:
            r.failures.append(f"more tokens passed the threshold than the capacity holds in MoD layers "
                              f"{sorted(r.capacity_overflows)} ({max(r.capacity_overflows.values())} of {len(inputs)} "
                              "samples): calibrate a larger capacity (gammamod calib capacity --quantile)")
        low = {layer: share for layer, share in r.kept_overlap.items() if share < tol.kept_overlap}
        if low:
            r.failures.append(f"kept tokens overlap the reference's too little in MoD layers {sorted(low)} "
                              f"({min(low.values()):.3f} < {tol.kept_overlap})")
        if tol.kv_exact and not r.kv_lengths_match:
            r.failures.append("KV lengths differ")
        need = steps if tol.greedy is None else min(tol.greedy, steps)
        short = [m for m, tie in zip(r.greedy_match, r.greedy_near_tie) if m < need and not tie]
        if short:
            r.failures.append(f"greedy tokens match for {min(short)} of {steps} steps (need {need}"
                              + (f", or a near tie within {tol.greedy_margin:g} of the logits' scale" if tol.greedy_margin
                                 else "") + ")")
    report = {"artifact": str(artifact), "reference": str(reference), "dtype": dtype, "routing": routing,
              "quantization": quantized["precision"] if quantized else None,
              "samples": len(inputs), "steps": steps, "seed": seed, "tolerance": asdict(tol),
              "backends": {label: {**asdict(r), "passed": r.passed} for label, r in reports.items()},
              "passed": all(r.passed for r in reports.values())}
    if quantized:
        record_in_manifest(manifest, report)
    return report


def record_in_manifest(manifest, report: dict) -> None:
    """A quantized artifact keeps its latest validate numbers in its manifest (``quantization.validate``):
    the manifest is not among the files it hashes, so the artifact stays intact."""
    from gammamod.manifest import now

    manifest.data["quantization"]["validate"] = {
        "date": now(), "reference": report["reference"], "samples": report["samples"], "steps": report["steps"],
        "seed": report["seed"], "passed": report["passed"],
        "backends": {label: {"logits_max_err_over_scale": r["logits"].get("max_abs_over_scale"),
                             "logits_mean_abs": r["logits"].get("mean_abs"),
                             "kept_rows_identical": min(r["kept_agreement"].values()) if r["kept_agreement"] else None,
                             "kept_overlap": min(r["kept_overlap"].values()) if r["kept_overlap"] else None,
                             "kept_overlap_per_layer": {str(k): v for k, v in r["kept_overlap"].items()},
                             "greedy_match": r["greedy_match"], "greedy_near_tie": r["greedy_near_tie"],
                             "passed": r["passed"], "failures": r["failures"]}
                     for label, r in report["backends"].items()}}
    manifest.write()


def _check_same_model(manifest, model, reference) -> None:
    m, c = manifest["model"], model.config
    mine = (m["hidden_size"], m["num_layers"], m["num_heads"], m["vocab_size"], manifest["recipe"]["name"])
    theirs = (c.hidden_size, c.num_layers, c.num_heads, c.vocab_size, model.recipe.name)
    if mine != theirs:
        raise GammamodError(f"--reference {reference}: not the checkpoint this artifact was exported from "
                            f"(artifact {mine}, checkpoint {theirs})")


def write_report(report: dict, path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def summary_table(report: dict):
    from rich.table import Table

    tol = report["tolerance"]
    precision = f"{report['quantization']} quantized" if report.get("quantization") else report["dtype"]
    table = Table(title=f"validate: {report['artifact']} vs {report['reference']} ({precision}, "
                        f"{report['routing']} routing, {report['samples']} samples x {report['steps']} steps)")
    for col in ("backend", "logits max err / scale", "logits mean abs", "image features max err / scale",
                "kept indices agree", "KV lengths", "greedy match", "result"):
        table.add_column(col, overflow="fold")
    for label, r in report["backends"].items():
        kept, overlap = r["kept_agreement"], r.get("kept_overlap") or {}
        table.add_row(
            label, f"{r['logits'].get('max_abs_over_scale', 0):.1e} (tol {tol['logits']:.2g})",
            f"{r['logits'].get('mean_abs', 0):.1e}",
            f"{r['features']['max_abs_over_scale']:.1e}" if r["features"] else "-",
            (f"{min(kept.values()):.2f} over {len(kept)} MoD layers" if kept else "-")
            + (f"; tokens in common {min(overlap.values()):.3f}" if overlap and report.get("quantization") else ""),
            "identical" if r["kv_lengths_match"] else "differ",
            f"{min(r['greedy_match'])}/{report['steps']} steps" if r["greedy_match"] else "-",
            "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"]))
    return table
