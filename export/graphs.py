"""The modules ``torch.onnx.export`` traces: vision, prefill, decode.

The decoder is exported as two graphs that share one weights file:

* ``prefill``: ``inputs_embeds`` [B, T, H] and ``seq_lengths`` [B] (rows right-padded) ->
  ``logits`` [B, V] at each row's last token, and per layer the keys/values it cached
  (``present_key.l`` [B, Hkv, N_l, d]; N_l = T for dense layers, T - span + k_l for MoD
  layers; row b holds ``seq_lengths[b] - (T - N_l)`` real entries), and ``kept_indices.l`` for
  MoD layers. The routable span and
  the kept counts are constants of the graph: every shape is static given T.
* ``decode``: a chunk of T >= 1 new tokens (one per step when generating; a later chat turn is
  a longer chunk) with ``past_length`` [B] and, per layer, the cache buffers
  ``past_key.l`` / ``past_value.l`` [B, Hkv, C_l, d] and their valid lengths ``kv_length.l``.
  It returns logits and only the new entries (``present_key.l`` [B, Hkv, T, d]) with
  ``new_kv_length.l``; the runtime writes them into its buffers in place. The past buffers are
  only read: attention runs over [past | new] with one softmax across both parts, so no
  full-cache concatenation or copy happens per step.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import KVStore, MoDLlava, Step


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, d] -> [B, Hkv, G, T, d]: query heads grouped by their key/value head (GQA).
    With one query head per key/value head (multi-head attention) q stays 4-D: no reshapes."""
    b, h, t, d = q.shape
    if h == kv_heads:
        return q
    return q.reshape(b, kv_heads, h // kv_heads, t, d)


def _kv(x: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """Keys/values [B, Hkv, S, d] broadcast against the grouped queries."""
    return x if grouped.dim() == 4 else x.unsqueeze(2)


def _ungroup(out: torch.Tensor, b, h, t, d) -> torch.Tensor:
    return out if out.dim() == 4 else out.reshape(b, h, t, d)


def _masked(scores: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(drop, torch.finfo(scores.dtype).min)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Scores and softmax in float32 whatever the model's precision (as transformers' Llama)."""
    return x if x.dtype == torch.float32 else x.float()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def causal_attention(q, k, v) -> torch.Tensor:
    """Causal attention over the new tokens alone (prefill): q [B,H,T,d], k/v [B,Hkv,T,d]."""
    b, h, t, d = q.shape
    qg = _grouped(q * d ** -0.5, k.shape[1])
    scores = _f32(qg @ _kv(k, qg).transpose(-1, -2))  # [B, Hkv, (G,) T, T]
    pos = torch.arange(t, device=q.device)
    scores = _masked(scores, pos[None, :] > pos[:, None])
    probs = _as(torch.softmax(scores, dim=-1), q.dtype)
    return _ungroup(probs @ _kv(v, qg), b, h, t, d)


def cached_attention(q, k, v, past_k, past_v, past_len) -> torch.Tensor:
    """Attention over a layer's cache (the first ``past_len[b]`` of its C slots) and the new
    tokens (causally), with one softmax across both parts. The cache is only read."""
    b, h, t, d = q.shape
    qg = _grouped(q * d ** -0.5, k.shape[1])
    past = _f32(qg @ _kv(past_k, qg).transpose(-1, -2))  # [B, Hkv, (G,) T, C]
    cap = past.shape[-1]
    slot = torch.arange(cap, device=q.device)
    stale = slot[None, :] >= past_len[:, None]  # [B, C]: slots past this row's length
    past = _masked(past, stale.reshape((b,) + (1,) * (past.dim() - 2) + (cap,)))
    new = _f32(qg @ _kv(k, qg).transpose(-1, -2))  # [B, Hkv, (G,) T, T]
    pos = torch.arange(t, device=q.device)
    new = _masked(new, pos[None, :] > pos[:, None])
    probs = _as(torch.softmax(torch.cat([past, new], dim=-1), dim=-1), q.dtype)
    out = probs[..., :cap] @ _kv(past_v, qg) + probs[..., cap:] @ _kv(v, qg)
    return _ungroup(out, b, h, t, d)


class GraphKV(KVStore):
    """KV handling inside an exported graph: reads past buffers, emits only the new entries."""

    def __init__(self, zeros: torch.Tensor, past: list[tuple] | None = None):
        self.zeros = zeros  # [B] int64
        self.past = past
        self.present: dict[int, tuple] = {}

    def length(self, layer: int) -> torch.Tensor:
        return self.zeros if self.past is None else self.past[layer][2]

    def attend(self, layer: int, q, k, v, count):
        if self.past is None:
            attn = causal_attention(q, k, v)
            length = count
        else:
            past_k, past_v, past_len = self.past[layer]
            attn = cached_attention(q, k, v, past_k, past_v, past_len)
            length = past_len + count
        self.present[layer] = (k, v, length)
        return attn


def _last_logits(model: MoDLlava, hidden: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """Logits of each row's last real token [B, V] (float32): the lm_head runs on B tokens."""
    index = (seq_lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, hidden.shape[-1])
    last = torch.gather(hidden, 1, index)[:, 0]
    return _f32(model.lm_head(last))


class PrefillGraph(nn.Module):
    def __init__(self, model: MoDLlava, routing: str, span: tuple[int, int] | None, capacity: dict[int, int]):
        super().__init__()
        self.model = model
        self.routing = routing
        self.span = span
        self.capacity = dict(capacity)
        self.mod_layers = sorted(capacity) if routing == "static" else []

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.model.config.num_layers):
            names += [f"present_key.{i}", f"present_value.{i}"]
        return names + [f"kept_indices.{i}" for i in self.mod_layers]

    def forward(self, inputs_embeds, seq_lengths):
        zeros = torch.zeros_like(seq_lengths)
        kv = GraphKV(zeros)
        step = Step(routing=self.routing, kv=kv, past_length=zeros, valid=seq_lengths, span=self.span,
                    capacity=self.capacity)
        hidden = self.model.forward_chunk(inputs_embeds, step)
        outs = [_last_logits(self.model, hidden, seq_lengths)]
        for i in range(self.model.config.num_layers):
            outs += list(kv.present[i][:2])  # entries per row follow from the capacities (manifest)
        outs += [step.kept[i] for i in self.mod_layers]
        return tuple(outs)


class DecodeGraph(nn.Module):
    def __init__(self, model: MoDLlava, routing: str):
        super().__init__()
        self.model = model
        self.routing = routing

    def input_names(self) -> list[str]:
        names = ["inputs_embeds", "seq_lengths", "past_length"]
        for i in range(self.model.config.num_layers):
            names += [f"past_key.{i}", f"past_value.{i}", f"kv_length.{i}"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.model.config.num_layers):
            names += [f"present_key.{i}", f"present_value.{i}", f"new_kv_length.{i}"]
        return names

    def _store(self, seq_lengths, past) -> KVStore:
        return GraphKV(torch.zeros_like(seq_lengths), past)

    def forward(self, inputs_embeds, seq_lengths, past_length, *cache):
        layers = self.model.config.num_layers
        past = [(cache[3 * i], cache[3 * i + 1], cache[3 * i + 2]) for i in range(layers)]
        kv = self._store(seq_lengths, past)
        step = Step(routing=self.routing, kv=kv, past_length=past_length, valid=seq_lengths)
        hidden = self.model.forward_chunk(inputs_embeds, step)
        outs = [_last_logits(self.model, hidden, seq_lengths)]
        for i in range(layers):
            outs += list(kv.present[i])
        return tuple(outs)


class VisionGraph(nn.Module):
    """``pixel_values`` [N, 3, S, S] -> projected ``image_features`` [N, image_tokens, hidden]."""

    def __init__(self, model: MoDLlava):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_images(pixel_values)


class FusedGraphKV(KVStore):
    """Attention through ONNX Runtime's GroupQueryAttention, appending in place: the past buffers
    come back as the present outputs (the runtime binds both to the same memory)."""

    fused = True

    def __init__(self, zeros: torch.Tensor, past: list[tuple], cos: torch.Tensor, sin: torch.Tensor):
        self.zeros, self.past, self.cos, self.sin = zeros, past, cos, sin
        self.present: dict[int, tuple] = {}

    def length(self, layer: int) -> torch.Tensor:
        return self.past[layer][2]

    def attend_fused(self, layer: int, attn, x, positions, count):
        from . import ortops

        cfg = attn.cfg
        if hasattr(attn, "qkv_proj"):
            qkv = attn.qkv_proj(x)
        else:
            qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        past_k, past_v, past_len = self.past[layer]
        t = x.shape[1]
        seqlens = (past_len + (t - 1)).to(torch.int32)  # the last entry's index after the append
        total = (past_len.max() + t).to(torch.int32)
        out, present_k, present_v = ortops.ort_group_query_attention(
            qkv, past_k, past_v, seqlens, total, self.cos, self.sin, positions, cfg.num_heads, cfg.num_kv_heads)
        self.present[layer] = (present_k, present_v, past_len + count)
        return out


class FusedDecodeGraph(DecodeGraph):
    """The decode graph for ONNX Runtime on CPU: one token per row, attention and RoPE as its fused
    contrib ops, the KV cache updated in place. Inputs and outputs as :class:`DecodeGraph`, except
    that ``present_key.l``/``present_value.l`` are the whole buffers (bound to the past ones)."""

    def __init__(self, model: MoDLlava, routing: str, max_seq: int):
        super().__init__(model, routing)
        cfg = model.config
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        # RoPE tables, as the weights writer fills them (rope_tables): registered as buffers so the
        # graph takes them as initializers
        self.register_buffer("rope_cos", torch.empty(max_seq, cfg.head_dim // 2, dtype=dtype, device=device))
        self.register_buffer("rope_sin", torch.empty(max_seq, cfg.head_dim // 2, dtype=dtype, device=device))

    def _store(self, seq_lengths, past) -> KVStore:
        return FusedGraphKV(torch.zeros_like(seq_lengths), past, self.rope_cos, self.rope_sin)


def rope_tables(cfg, max_seq: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """cos/sin [max_seq, head_dim/2] exactly as the eager model computes them (float32, then cast)."""
    from .model import inverse_frequencies

    freqs = torch.arange(max_seq).float()[:, None] * inverse_frequencies(cfg, "cpu")
    return {"rope_cos": freqs.cos().to(dtype), "rope_sin": freqs.sin().to(dtype)}
