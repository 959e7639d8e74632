"""``gammamod calib arank``: gamma-MoD's ARank, and which layers could be MoD layers.

gamma-MoD measures a layer's redundancy by the rank of its attention maps: per head, the causal
softmax map with its diagonal zeroed (the causal map itself is lower triangular with a positive
diagonal, so always full rank), averaged over heads and then over samples. A low rank says the
layer's tokens attend to few patterns, so it can skip tokens. The authors compute it on fp16
attention in float32 with torch's default tolerance, one sample at a time, and hard-code the
layers they keep dense (``arank_mod``: 0, 1, 2 and the last). Here the ranks come from the dense
forward of the checkpoint (routers ignored), every head of a layer in one batched call, in float32
or float64 with the tolerance recorded, over all tokens or the image block only; a stated rule turns
them into a proposal for ``mod_layers_idx``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

FORMAT = "gammamod-arank"
DTYPES = ("float32", "float64")


def authors_mod_layers(num_layers: int) -> list[int]:
    """The authors' ``arank_mod`` mode: every layer but 0, 1, 2 and the last is a MoD layer."""
    return [i for i in range(num_layers) if i not in {0, 1, 2, num_layers - 1}]


def propose(mean_ranks, keep_dense: int | None = None, threshold: float | None = None) -> tuple[list[int], str]:
    """MoD layers from per-layer mean ranks, and the rule in words. The first and last layers stay
    dense always; then either the ``keep_dense`` layers of highest rank in all (ties: the lower
    index stays dense) or every layer whose mean rank reaches ``threshold``."""
    n = len(mean_ranks)
    if n < 3:
        raise GammamodError(f"a model of {n} layers has no layer between its first and last to make a MoD layer")
    middle = list(range(1, n - 1))
    if threshold is not None:
        dense = {0, n - 1} | {i for i in middle if mean_ranks[i] >= threshold}
        rule = f"dense: first, last, and every layer of mean rank >= {threshold:g}"
    else:
        keep = 4 if keep_dense is None else keep_dense
        if not 2 <= keep <= n:
            raise GammamodError(f"--keep-dense {keep}: expected 2..{n} (the first and last layers always stay dense)")
        ranked = sorted(middle, key=lambda i: (-mean_ranks[i], i))
        dense = {0, n - 1} | set(ranked[:keep - 2])
        rule = f"dense: first, last, and the {keep - 2} other layers of highest mean rank ({keep} in all)"
    return [i for i in range(n) if i not in dense], rule


def layer_inputs(model, embeds):
    """Every decoder layer's input hidden states [1, T, hidden] in the dense forward."""
    from gammamod.export.generate import forward_language

    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach())))
    try:
        forward_language(model, embeds, routing="dense")
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(model.model.layers))]


def attention_maps(layer, x):
    """The layer's causal softmax attention [H, T, T] (float32) for input ``x`` [1, T, hidden] at
    positions 0..T-1, with the diagonal zeroed."""
    import torch

    from gammamod.export.model import inverse_frequencies, rotary

    cfg = layer.self_attn.cfg
    t = x.shape[1]
    rope = rotary(torch.arange(t)[None], inverse_frequencies(cfg, x.device), x.dtype)
    with torch.no_grad():
        q, k, _ = layer.self_attn.qkv(layer.input_layernorm(x), rope)
    k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2))[0] / cfg.head_dim ** 0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return probs * (~torch.eye(t, dtype=torch.bool))


def ranks(maps, dtype: str, rtol: float | None):
    """Rank of each map [H, n, n] in ``dtype``; ``rtol`` relative to the largest singular value
    (None: torch's default, max(n, n) * eps(dtype))."""
    import torch

    a = maps.to(getattr(torch, dtype))
    return torch.linalg.matrix_rank(a, rtol=rtol).tolist()


def analyse(checkpoint, data=None, random=None, tokens: str = "all", dtype: str = "float64",
            rtol: float | None = None, keep_dense: int | None = None, threshold: float | None = None,
            vision_tower=None, seed: int = 0, vision_tower_slow=None) -> dict:
    """Per layer and head ranks over the calibration samples, and the proposal."""
    import torch

    from .samples import load_model, prepared_samples

    if tokens not in ("all", "image"):
        raise GammamodError(f"--tokens {tokens}: expected all or image")
    if dtype not in DTYPES:
        raise GammamodError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if rtol is not None and not 0 < rtol < 1:
        raise GammamodError(f"--rtol {rtol}: expected a number in (0, 1)")
    if keep_dense is not None and threshold is not None:
        raise GammamodError("give --keep-dense N or --rank-threshold R, not both")
    model = load_model(checkpoint, vision_tower, vision_tower_slow)
    if tokens == "image" and not model.has_vision:
        raise GammamodError(f"--tokens image: {checkpoint} takes no images")
    per_sample, sizes = [], []
    with torch.no_grad():
        for s in prepared_samples(model, checkpoint, data, random, seed):
            lo, hi = (0, s.length) if tokens == "all" else (s.image_span[0], s.image_span[0] + s.image_span[1])
            sizes.append(hi - lo)
            heads = []
            for layer, x in zip(model.model.layers, layer_inputs(model, s.embeds)):
                heads.append(ranks(attention_maps(layer, x)[:, lo:hi, lo:hi], dtype, rtol))
            per_sample.append(heads)  # [layers][heads]
    if not per_sample:
        raise GammamodError("the calibration set is empty")
    r = np.asarray(per_sample, dtype=np.float64)  # [samples, layers, heads]
    mean = r.mean(axis=(0, 2))
    # a strictly lower triangular n x n map has rank at most n - 1
    fraction = (r.mean(axis=2) / np.maximum(1, np.asarray(sizes)[:, None] - 1)).mean(axis=0)
    proposal, rule = propose(mean.tolist(), keep_dense, threshold)
    eps = float(np.finfo(dtype).eps)
    n_layers = len(mean)
    return {
        "format": FORMAT, "version": 1, "checkpoint": str(checkpoint), "recipe": model.recipe.name,
        "samples": len(per_sample), "tokens": tokens, "map_size": {"min": min(sizes), "max": max(sizes)},
        "dtype": dtype,
        "tolerance": {"rtol": rtol if rtol is not None else "max(n, n) * eps", "eps": eps,
                      "relative_to": "the largest singular value of each map"},
        "layers": [{"layer": i, "mean_rank": float(mean[i]), "rank_fraction": float(fraction[i]),
                    "heads_mean": r[:, i].mean(axis=0).tolist()} for i in range(n_layers)],
        "proposal": {"mod_layers_idx": proposal, "rule": rule},
        "authors": {"mod_layers_idx": authors_mod_layers(n_layers),
                    "rule": "hard-coded arank_mod: dense layers 0, 1, 2 and the last"},
        "checkpoint_mod_layers": list(model.recipe.mod_layers),
    }


def table(report: dict) -> str:
    proposed, authors = set(report["proposal"]["mod_layers_idx"]), set(report["authors"]["mod_layers_idx"])
    rows = [f"{'layer':>5} {'mean rank':>10} {'of n-1':>7}  proposed  authors"]
    for e in report["layers"]:
        i = e["layer"]
        rows.append(f"{i:>5} {e['mean_rank']:10.2f} {e['rank_fraction']:7.3f}  "
                    f"{'MoD' if i in proposed else 'dense':>8}  {'MoD' if i in authors else 'dense':>7}")
    tol = report["tolerance"]
    rows.append(f"{report['samples']} samples, {report['tokens']} tokens (maps {report['map_size']['min']}.."
                f"{report['map_size']['max']}), {report['dtype']} ranks, rtol {tol['rtol']} (eps {tol['eps']:.3g})")
    rows.append(f"proposed mod_layers_idx {report['proposal']['mod_layers_idx']}  ({report['proposal']['rule']})")
    rows.append(f"authors' arank_mod      {report['authors']['mod_layers_idx']}  ({report['authors']['rule']})")
    return "\n".join(rows)


def plot(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [e["layer"] for e in report["layers"]]
    mean = [e["mean_rank"] for e in report["layers"]]
    mod = set(report["proposal"]["mod_layers_idx"])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 3), 3.6))
    ax.bar(layers, mean, color=["C1" if i in mod else "C0" for i in layers])
    ax.bar([], [], color="C0", label="dense (proposed)")
    ax.bar([], [], color="C1", label="MoD (proposed)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean attention rank")
    ax.set_title(f"ARank, {report['tokens']} tokens, {report['samples']} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def is_arank_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "arank.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write(report: dict, out: Path, force: bool = False, inputs=()) -> Path:
    """``out/arank.json``, ``out/arank.png`` and ``out/arank.txt`` (the table), atomically."""
    from gammamod.lifecycle import OutputDir

    with OutputDir(out, force=force, inputs=inputs, is_ours=is_arank_dir, what="arank output directory") as tmp:
        (tmp / "arank.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "arank.png").write_bytes(plot(report))
        (tmp / "arank.txt").write_text(table(report) + "\n")
    return Path(out)
