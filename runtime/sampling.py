"""Next-token choice in numpy: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty (transformers' semantics)."""

from __future__ import annotations

import math

import numpy as np

from gammamod.errors import GammamodError


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                   stop=None, max_new_tokens: int | None = None) -> None:
    """Refuse sampling settings that have no meaning, in one line naming the parameter."""

    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise GammamodError(f"{name} {value!r}: expected a number")
        if not math.isfinite(float(value)):
            raise GammamodError(f"{name} {value}: expected a finite number")
        return float(value)

    if number("temperature", temperature) < 0:
        raise GammamodError(f"temperature {temperature}: expected 0 (greedy) or more")
    if not 0.0 < number("top_p", top_p) <= 1.0:
        raise GammamodError(f"top_p {top_p}: expected a number in (0, 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise GammamodError(f"top_k {top_k!r}: expected an integer, 0 (off) or more")
    if number("repetition_penalty", repetition_penalty) <= 0:
        raise GammamodError(f"repetition_penalty {repetition_penalty}: expected a number above 0 (1 is off)")
    if stop is not None:
        if isinstance(stop, str) or not all(isinstance(x, str) for x in stop):
            raise GammamodError(f"stop {stop!r}: expected a list of strings")
        if any(x == "" for x in stop):
            raise GammamodError("stop: an empty stop string would end every answer at once")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                                       or max_new_tokens < 1):
        raise GammamodError(f"max_new_tokens {max_new_tokens!r}: expected a positive integer")


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
