"""Assertions over gammamod.validate.parity for the tests."""

import numpy as np
import torch

from gammamod.runtime.pipeline import Pipeline
from gammamod.validate.parity import decoder_parity, reference_batch, rel_err  # noqa: F401


def reference_inputs(model, ckpt, questions, image):
    return reference_batch(model, ckpt, questions, image)


def compare_generation(model, artifact, batch, routing="static", steps=8, tol=1e-4, fused=True):
    """Prefill and ``steps`` decode steps (the reference's tokens fed back): logits within ``tol``
    (relative), kept indices and per-layer KV lengths identical. ``fused=False`` runs the portable
    decoder.onnx (what TensorRT builds from) instead of ONNX Runtime's graphs."""
    pipe = Pipeline.load(artifact, fused=fused)
    assert pipe.backend.inplace_decode() == (fused and "decoder_ort" in pipe.manifest["graphs"])
    result = decoder_parity(model, pipe, batch, routing=routing, steps=steps)
    assert result.prefill_rel_err <= tol, f"prefill logits differ by {result.prefill_rel_err}"
    for i, err in enumerate(result.decode_rel_err):
        assert err <= tol, f"decode step {i} logits differ by {err}"
    assert all(share == 1.0 for share in result.kept_match.values()), result.kept_match
    assert result.kv_lengths_match
    return result.max_rel_err


def compare_chunks(model, pipe, x, spans, lengths=None, steps=8, turn=5, tol=1e-4, routing="static"):
    """One artifact through a whole conversation against the PyTorch reference: a prefill whose
    routed spans are ``spans`` (one (start, length) per row, or None), ``steps`` greedy decode
    steps, then a later turn (a chunk of ``turn`` tokens) and two more steps. At every call:
    logits within ``tol`` relative, kept indices of every MoD layer and every layer's KV length
    per row identical. Returns the worst error."""
    from gammamod.export.generate import forward_language

    b = x.shape[0]
    lengths = np.full(b, x.shape[1], np.int64) if lengths is None else np.asarray(lengths)
    gen = pipe.generator(b)
    worst = 0.0

    def check(ours, ref_logits, ref_cache, what):
        nonlocal worst
        err = rel_err(ours, ref_logits)
        worst = max(worst, err)
        assert err <= tol, f"{what}: logits differ by {err:.2e}"
        assert np.array_equal(gen.kv_lengths(), ref_cache.lengths.numpy()), f"{what}: KV lengths differ"

    ref = forward_language(model, torch.from_numpy(x), routable=spans, routing=routing,
                           lengths=torch.from_numpy(lengths))
    ours = gen.prefill(x, routable=spans, lengths=lengths)
    last = torch.from_numpy(lengths - 1)
    check(ours, ref.logits[torch.arange(b), last], ref.cache, "prefill")
    for layer, idx in ref.kept.items():
        assert np.array_equal(gen.kept[layer], idx.numpy()), f"kept indices of MoD layer {layer} differ"
    cache = ref.cache
    logits = ref.logits[torch.arange(b), last]
    rng = np.random.default_rng(1)
    for i in range(steps + 2 + 1):
        if i == steps:  # a later turn: a chunk of several tokens, no span
            chunk = rng.integers(3, model.config.vocab_size, (b, turn))
            emb = model.embed(torch.from_numpy(chunk)).detach()
            ref = forward_language(model, emb, routing=routing, cache=cache)
            ours = gen.extend(emb.numpy())
            logits = ref.logits[:, -1]
            check(ours, logits, cache, "later turn")
            continue
        token = logits.argmax(-1)
        ref = forward_language(model, model.embed(token[:, None]).detach(), routing=routing, cache=cache)
        ours = gen.decode(token.numpy())
        logits = ref.logits[:, -1]
        check(ours, logits, cache, f"step {i}")
    return worst
