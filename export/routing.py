"""Static-capacity routing: score normalisation, top-k selection, gather and weighted scatter.

These are the pieces the ONNX export turns into MoD custom ops. Shapes depend only on the input
shapes and the constants (span start, span length, kept count k), never on data:

* ``select_kept``: [B, T] scores -> [B, T - length + k] kept token indices, ascending;
  every token outside the routable span is kept, plus the top-k of the span.
* ``gather_tokens``: [B, T, H] x [B, K] -> [B, K, H].
* ``scatter_tokens``: x [B, T, H], kept [B, K], y [B, K, H] (and a per-token scale for the
  tokens that skip) -> [B, T, H].
"""

from __future__ import annotations

import torch

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


def normalise(recipe: Recipe, score: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """The routing weight of each routable token [B, length].

    gamma-MoD's probability is already its weight. p-MoD normalises its router logit
    (TanhNorm by default); a softmax normalisation runs over the routable tokens only, as the
    authors' -inf masking of the other tokens makes it.
    """
    span = score[:, start:start + length]
    if recipe.score_norm is None:
        return span
    return _apply_norm(recipe, span)


def normalise_masked(recipe: Recipe, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """p-MoD's reference normalisation over a full row [T]: non-target logits set to -inf first."""
    masked = logits.masked_fill(~target, float("-inf"))
    return _apply_norm(recipe, masked, dim=0)


def select_kept(weight: torch.Tensor, start: int, length: int, k: int, seq_len: int) -> torch.Tensor:
    """Indices [B, seq_len - length + k] of the tokens a MoD layer processes, in sequence order:
    the tokens before the span, the k highest-weighted span tokens, the tokens after the span."""
    b = weight.shape[0]
    device = weight.device
    top = torch.topk(weight, k, dim=-1).indices
    top = torch.sort(top, dim=-1).values + start
    before = torch.arange(start, device=device).expand(b, start)
    after = torch.arange(start + length, seq_len, device=device).expand(b, seq_len - start - length)
    return torch.cat([before, top, after], dim=1)


def gather_tokens(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, kept: torch.Tensor, y: torch.Tensor,
                   skip_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Write the processed tokens back; the others keep x, scaled by ``skip_scale`` if given."""
    base = x if skip_scale is None else x * skip_scale
    return base.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), y)


def output_weights(recipe: Recipe, score: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor,
                   start: int, length: int):
    """Per kept token, the scale of its MLP branch [B, K, 1]; per token, the scale of a skipped
    token [B, T, 1] or None.

    gamma-MoD: every kept token's MLP is scaled by its r (text tokens too); skipped tokens pass.
    p-MoD STRing: kept image tokens scale the MLP by w, text tokens are unweighted, skipped
    image tokens become w * x.
    """
    if recipe.weighting == "mlp":
        return torch.gather(score, 1, kept)[..., None], None
    full = torch.ones_like(score)
    full[:, start:start + length] = weight
    return torch.gather(full, 1, kept)[..., None], full[..., None]
