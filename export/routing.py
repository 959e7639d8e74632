"""Static-capacity routing: routing weights, top-k selection, gather and weighted scatter.

Selection, gather and scatter run through the MoD custom ops (``ops.py``), so eager PyTorch and
the exported graph execute the same operations. Every shape depends only on the input shapes, the
span length N and the kept count k, never on the scores. Each row has its own span start.
"""

from __future__ import annotations

import torch

from . import ops
from .recipes import Recipe


def _apply_norm(recipe: Recipe, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    norm = recipe.score_norm
    if norm.kind == "tanh":
        act = torch.tanh(logits)
    elif norm.kind == "sigmoid":
        act = torch.sigmoid(logits)
    elif norm.kind == "softmax":
        act = torch.softmax(logits, dim=dim)
    else:
        act = logits
    return act * norm.scale + norm.bias


def span_mask(t: int, start: torch.Tensor, length) -> torch.Tensor:
    """[B, T]: True on each row's routable span ``[start[b], start[b] + length)``."""
    pos = torch.arange(t, device=start.device)
    return (pos >= start[:, None]) & (pos < start[:, None] + length)


def routing_weights(recipe: Recipe, score: torch.Tensor, start: torch.Tensor, length) -> torch.Tensor:
    """Per token [B, T]: the weight that ranks routable tokens and scales kept MLPs.

    gamma-MoD: the router probability r of every token (text tokens too: their MLP is scaled by
    r). p-MoD: the normalised router weight on the routable span (TanhNorm by default; a softmax
    runs over the span only, as the authors' -inf masking of other tokens makes it), 1 elsewhere.
    """
    if recipe.score_norm is None:
        return score
    inside = span_mask(score.shape[1], start, length)
    if recipe.score_norm.kind == "softmax":
        weight = _apply_norm(recipe, score.masked_fill(~inside, float("-inf")))
    else:
        weight = _apply_norm(recipe, score)
    return torch.where(inside, weight, torch.ones_like(weight))


def normalise_masked(recipe: Recipe, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """p-MoD's reference normalisation over a full row [T]: non-target logits set to -inf first."""
    masked = logits.masked_fill(~target, float("-inf"))
    return _apply_norm(recipe, masked, dim=0)


def select_kept(weight: torch.Tensor, start: torch.Tensor, length, k) -> torch.Tensor:
    """Indices [B, T - length + k] of the tokens a MoD layer processes, in sequence order: each
    row's tokens before its span, the k highest-weighted span tokens, the tokens after the span."""
    return ops.mod_select(weight, start, length, k)


def select_above(weight: torch.Tensor, start: torch.Tensor, length, k, threshold: float):
    """gamma-MoD's threshold routing with a static capacity: :func:`select_kept`'s indices with the
    selected span tokens at or below ``threshold`` moved last, and how many come before them [B]."""
    return ops.mod_select_threshold(weight, start, length, k, threshold)


def gather_tokens(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return ops.mod_gather(x, kept)


def scatter_tokens(x: torch.Tensor, kept: torch.Tensor, y: torch.Tensor,
                   skip_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Write the processed tokens back; the others keep x, scaled by ``skip_scale`` if given."""
    base = x if skip_scale is None else x * skip_scale
    return ops.mod_scatter(base, kept, y)


def output_weights(recipe: Recipe, weight: torch.Tensor, kept: torch.Tensor):
    """The scale of each kept token's MLP branch [B, K, 1], and of each skipped token [B, T, 1]
    or None.

    gamma-MoD: every kept token's MLP is scaled by its r; skipped tokens pass unchanged.
    p-MoD STRing: kept image tokens scale the MLP by w, text tokens by 1; skipped image tokens
    become w * x.
    """
    mlp_scale = torch.gather(weight, 1, kept)[..., None]
    if recipe.weighting == "mlp":
        return mlp_scale, None
    return mlp_scale, weight[..., None]
