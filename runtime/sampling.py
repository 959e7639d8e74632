"""Next-token choice in numpy: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty (transformers' semantics)."""

from __future__ import annotations

import numpy as np


def apply_repetition_penalty(logits: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: a seen token's logit is divided by ``penalty``
    when positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b, seen in enumerate(history):
        if not seen:
            continue
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        vals = out[b, idx]
        out[b, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def choose(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, history: list[list[int]] | None = None,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Token ids [B] from logits [B, V]."""
    logits = np.asarray(logits, dtype=np.float32)
    if history is not None:
        logits = apply_repetition_penalty(logits, history, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    rng = rng or np.random.default_rng()
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
