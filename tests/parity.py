"""Assertions over gammamod.validate.parity for the tests."""

from gammamod.runtime.pipeline import Pipeline
from gammamod.validate.parity import decoder_parity, reference_batch, rel_err  # noqa: F401


def reference_inputs(model, ckpt, questions, image):
    return reference_batch(model, ckpt, questions, image)


def compare_generation(model, artifact, batch, routing="static", steps=8, tol=1e-4, fused=True):
    """Prefill and ``steps`` decode steps (the reference's tokens fed back): logits within ``tol``
    (relative), kept indices and per-layer KV lengths identical. ``fused=False`` decodes with the
    portable decode graph instead of ONNX Runtime's fused one."""
    pipe = Pipeline.load(artifact, fused=fused)
    assert pipe.backend.inplace_decode() == (fused and "decode_ort" in pipe.manifest["graphs"])
    result = decoder_parity(model, pipe, batch, routing=routing, steps=steps)
    assert result.prefill_rel_err <= tol, f"prefill logits differ by {result.prefill_rel_err}"
    for i, err in enumerate(result.decode_rel_err):
        assert err <= tol, f"decode step {i} logits differ by {err}"
    assert all(share == 1.0 for share in result.kept_match.values()), result.kept_match
    assert result.kv_lengths_match
    return result.max_rel_err
