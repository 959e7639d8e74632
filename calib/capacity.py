"""``gammamod calib capacity``: how many tokens each MoD layer must keep, measured on data.

gamma-MoD's released inference keeps every token whose router probability is above 0.005, so a
layer's kept count depends on the input. A threshold-routed artifact (``export --routing
threshold``) has a fixed capacity per layer and reproduces that inference exactly whenever the
count fits; here we run the reference routing over the calibration set, record per MoD layer the
kept count as a fraction of the prompt (the span a threshold artifact routes) and how often the
decode gate opens, and choose each layer's capacity as a high quantile of the fractions, rounded
up to four decimals so it holds for every prompt length (``k = ceil(r * N)``).

p-MoD's schedule is fixed by training: for p-MoD the report says, for information, how far the
schedule's kept counts are from the image tokens its routers weight above given values.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError
from gammamod.runtime.capacity import fraction_count

FORMAT = "gammamod-capacity"
QUANTILES = (0.5, 0.9, 0.99, 1.0)
DECIMALS = 4  # capacities are written as decimals of this many places, rounded up


def choose_fraction(fractions, quantile: float) -> str:
    """The capacity for observed kept fractions: their ``quantile`` (an observed value, never an
    interpolation below one), rounded up to ``DECIMALS`` places, at least one step above 0."""
    q = float(np.quantile(np.asarray(fractions, dtype=np.float64), quantile, method="higher"))
    scale = 10 ** DECIMALS
    steps = min(scale, max(1, math.ceil(round(q * scale, 9))))
    return f"{steps / scale:.{DECIMALS}f}"


def _stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), **{f"q{q:g}": float(np.quantile(a, q)) for q in QUANTILES}}


def gamma_capacity(model, samples, quantile: float = 0.99, decode_steps: int = 16) -> dict:
    """Run gamma-MoD's reference routing (prefill and ``decode_steps`` greedy steps) over the
    prepared ``samples`` and choose every MoD layer's capacity."""
    from gammamod.export.generate import generate_from_embeds
    from gammamod.export.model import decoder_flops

    cfg, layers = model.config, list(model.recipe.mod_layers)
    lengths, counts, passes, steps = [], {l: [] for l in layers}, {l: [] for l in layers}, []
    for s in samples:
        out = generate_from_embeds(model, s.embeds, routing="reference", max_new_tokens=decode_steps + 1)
        fed = out.tokens.shape[1] - 1  # the last chosen token is not fed back
        lengths.append(s.length)
        steps.append(fed)
        for l in layers:
            k = int(out.kept[l].shape[1])
            counts[l].append(k)
            passes[l].append(int(out.kv_lengths[l, 0]) - k)
    if not lengths:
        raise GammamodError("the calibration set is empty")
    capacity, per_layer = {}, {}
    for l in layers:
        fractions = [k / n for k, n in zip(counts[l], lengths)]
        cap = choose_fraction(fractions, quantile)
        short = [k > fraction_count(n, Fraction(cap)) for k, n in zip(counts[l], lengths)]
        capacity[str(l)] = float(cap)
        per_layer[str(l)] = {
            "kept_fraction": _stats(fractions), "capacity": cap,
            "shortfall": sum(short) / len(short),
            "decode_gate_pass": sum(passes[l]) / max(1, sum(steps)),
        }
    dense = [decoder_flops(cfg, n) for n in lengths]
    at_capacity = [decoder_flops(cfg, n, {l: fraction_count(n, Fraction(per_layer[str(l)]["capacity"]))
                                          for l in layers}) for n in lengths]
    reference = [decoder_flops(cfg, n, {l: counts[l][i] for l in layers}) for i, n in enumerate(lengths)]
    skipped = sum(1 - per_layer[str(l)]["decode_gate_pass"] for l in layers)
    return {
        "capacity": capacity, "layers": per_layer,
        "flops": {
            # prefill decoder FLOPs saved against dense, averaged over the samples
            "prefill_saving_at_capacity": 1 - float(np.mean(np.divide(at_capacity, dense))),
            "prefill_saving_reference": 1 - float(np.mean(np.divide(reference, dense))),
            # decode: the share of decoder layers a step skips (layers counted as equal cost)
            "decode_saving": skipped / cfg.num_layers,
        },
        "prompt_tokens": _stats(lengths), "decode_steps": sum(steps),
    }


def pmod_report(model, samples, weights=(1.0,)) -> dict:
    """p-MoD, for information: per MoD layer the schedule's kept fraction of the image tokens next
    to the fraction its router weights above each of ``weights``, in static routing."""
    import torch

    from gammamod.export import routing as R
    from gammamod.export.generate import forward_language

    recipe, layers = model.recipe, list(model.recipe.mod_layers)
    scores, hooks = {}, []
    for l in layers:
        router = model.model.layers[l].router
        hooks.append(router.register_forward_hook(lambda _m, _i, out, l=l: scores.__setitem__(l, out.detach())))
    schedule, above = {l: [] for l in layers}, {l: {w: [] for w in weights} for l in layers}
    try:
        for s in samples:
            if s.routable is None or s.routable[1] == 0:
                continue
            start, n = s.routable
            forward_language(model, s.embeds, routable=s.routable, routing="static")
            for l in layers:
                w = R.routing_weights(recipe, scores[l], torch.tensor([start]), n)[0, start:start + n]
                schedule[l].append(recipe.kept_count(l, n) / n)
                for t in weights:
                    above[l][t].append(float((w > t).float().mean()))
    finally:
        for h in hooks:
            h.remove()
    if not any(schedule.values()):
        raise GammamodError("p-MoD routes image tokens, and no calibration sample has an image")
    per_layer = {}
    for l in layers:
        sched = float(np.mean(schedule[l]))
        per_layer[str(l)] = {"schedule_fraction": sched,
                             "above": {f"{t:g}": {"fraction": float(np.mean(above[l][t])),
                                                  "minus_schedule": float(np.mean(above[l][t])) - sched}
                                       for t in weights}}
    return {"layers": per_layer, "weights": [float(t) for t in weights]}


def calibrate(checkpoint, data=None, random=None, quantile: float = 0.99, decode_steps: int = 16,
              weights=(1.0,), vision_tower=None, seed: int = 0, vision_tower_slow=None) -> dict:
    """The whole ``calib capacity`` report for a checkpoint (see the module docstring)."""
    from .samples import load_model, prepared_samples

    if not 0 < quantile <= 1:
        raise GammamodError(f"--quantile {quantile}: expected a number in (0, 1]")
    model = load_model(checkpoint, vision_tower, vision_tower_slow)
    recipe = model.recipe
    if not recipe.is_mod:
        raise GammamodError(f"{checkpoint}: a {recipe.name} checkpoint has no MoD layers to calibrate")
    samples = list(prepared_samples(model, checkpoint, data, random, seed))
    head = {"format": FORMAT, "version": 1, "checkpoint": str(checkpoint), "recipe": recipe.name,
            "mod_layers": list(recipe.mod_layers), "samples": len(samples)}
    if recipe.kept == "skip-ratio":
        body = gamma_capacity(model, samples, quantile, decode_steps)
        return {**head, "routing": "threshold", "threshold": recipe.prefill_threshold,
                "decode_gate": recipe.decode_gate, "quantile": quantile,
                "span": "the whole prompt (capacities are fractions of it)", **body}
    return {**head, "routing": "static", "note": "p-MoD's kept counts are fixed by its training schedule; "
            "this report is for information and holds no capacity for export", **pmod_report(model, samples, weights)}


def is_capacity_report(path: Path) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def table(report: dict) -> str:
    """The report as the text table the command prints."""
    rows = []
    if report["routing"] == "threshold":
        rows.append(f"{'layer':>5} {'mean':>7} {'q0.5':>7} {'q0.99':>7} {'max':>7} {'capacity':>9} "
                    f"{'short':>6} {'gate':>6}")
        for l, s in report["layers"].items():
            f = s["kept_fraction"]
            rows.append(f"{l:>5} {f['mean']:7.3f} {f['q0.5']:7.3f} {f['q0.99']:7.3f} {f['q1']:7.3f} "
                        f"{s['capacity']:>9} {s['shortfall']:6.1%} {s['decode_gate_pass']:6.1%}")
        fl = report["flops"]
        rows.append(f"{report['samples']} samples, quantile {report['quantile']}: prefill FLOPs saved "
                    f"{fl['prefill_saving_at_capacity']:.1%} at these capacities "
                    f"({fl['prefill_saving_reference']:.1%} by the reference routing); decode skips "
                    f"{fl['decode_saving']:.1%} of layer passes")
        return "\n".join(rows)
    weights = report["weights"]
    rows.append(f"{'layer':>5} {'schedule':>9} " + " ".join(f"{'w>' + format(t, 'g'):>9}" for t in weights))
    for l, s in report["layers"].items():
        rows.append(f"{l:>5} {s['schedule_fraction']:9.3f} "
                    + " ".join(f"{s['above'][format(t, 'g')]['fraction']:9.3f}" for t in weights))
    rows.append(f"{report['samples']} samples; p-MoD's schedule is fixed by training (information only)")
    return "\n".join(rows)


def plot(report: dict) -> bytes:
    """A PNG: per MoD layer the kept fractions (gamma-MoD: quantile band, mean, chosen capacity,
    decode-gate pass rate; p-MoD: schedule against router weights above the given values)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(l) for l in report["layers"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 4))
    if report["routing"] == "threshold":
        s = [report["layers"][str(l)] for l in layers]
        lo = [x["kept_fraction"]["q0.5"] for x in s]
        hi = [x["kept_fraction"]["q1"] for x in s]
        ax.vlines(layers, lo, hi, color="0.6", lw=4, label="kept fraction, median to max")
        ax.plot(layers, [x["kept_fraction"]["mean"] for x in s], "o", color="C0", label="mean kept fraction")
        ax.plot(layers, [float(x["capacity"]) for x in s], "_", color="C3", ms=14, mew=2,
                label=f"capacity (quantile {report['quantile']})")
        ax.plot(layers, [x["decode_gate_pass"] for x in s], "s", color="C2", ms=4, label="decode gate open")
        ax.set_title(f"{report['recipe']}: kept tokens per MoD layer ({report['samples']} samples)")
    else:
        s = [report["layers"][str(l)] for l in layers]
        ax.plot(layers, [x["schedule_fraction"] for x in s], "o-", label="schedule")
        for t in report["weights"]:
            ax.plot(layers, [x["above"][format(t, "g")]["fraction"] for x in s], ".--", label=f"router weight > {t:g}")
        ax.set_title(f"{report['recipe']}: kept image tokens per MoD layer (information)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction of the routed span")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write(report: dict, out: Path, force: bool = False) -> tuple[Path, Path]:
    """``out`` (the JSON that ``export --capacity`` reads) and the PNG beside it, each whole or not at all."""
    from gammamod.lifecycle import check_file_replaceable, write_file

    out = Path(out)
    if out.suffix != ".json":
        raise GammamodError(f"--out {out}: expected a .json path (the picture goes beside it as .png)")
    png = out.with_suffix(".png")
    # both are checked before either is written, so a refusal leaves nothing half done; the
    # picture beside a capacity report of ours is ours
    check_file_replaceable(out, force, is_capacity_report, "capacity report")
    check_file_replaceable(png, force, lambda _p: is_capacity_report(out), "capacity report's picture")
    picture = plot(report)
    write_file(out, (json.dumps(report, indent=2) + "\n").encode(), force, is_capacity_report, "capacity report")
    write_file(png, picture, True, lambda _p: True, "capacity report's picture")
    return out, png
