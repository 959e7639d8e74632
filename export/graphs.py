"""The modules ``torch.onnx.export`` traces: vision and the decoder.

The decoder is ONE network for every chunk: a chunk of T >= 1 tokens after a per-layer cache of any
length (prefill: an empty cache; decode: T = 1; a later chat turn: a longer chunk). Inputs:

* ``inputs_embeds`` [B, T, H], ``seq_lengths`` [B] (rows right-padded), ``past_length`` [B];
* routed artifacts: ``span_start`` [B] (each row's routed span), ``span_length`` and, per MoD layer,
  ``capacity.<l>`` (INT32 [1]: TensorRT shape tensors, so every output shape follows from them;
  the graph computes nothing from data that decides a shape). ``span_length`` 0 routes nothing;
* per layer ``past_key.l`` / ``past_value.l`` [B, Hkv, C_l, d] and ``kv_length.l`` [B].

Outputs: ``logits`` [B, V] of each row's last token; per layer ``present_key.l`` /
``present_value.l`` and ``new_kv_length.l``; per MoD layer ``kept_indices.l`` [B, T - N + k_l].

Three variants share one weights file:

* ``decoder.onnx`` (:class:`DecoderGraph`, ``kv="portable"``): what TensorRT parses. The past
  buffers are only read; attention runs over [past | new] with one softmax across both parts and
  the graph emits only the new entries (``present_key.l`` [B, Hkv, T_l, d]), which the runtime
  writes into its cache.
* ``decoder.ort.onnx`` (``kv="ort"``): ONNX Runtime's, with the same inputs and outputs except the
  KV cache: the buffers are bound whole as both past and present and GroupQueryAttention appends
  in place (RoPE applied before it at the layer's own positions). Prefill gets ORT's fused causal
  attention: no [T, T] mask tensor.
* ``decode.ort.onnx`` (``decode_step=True``): one token per row and no span (no routing ops), for
  ONNX Runtime's decode loop.
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


def cached_attention(q, k, v, past_k, past_v, past_len) -> torch.Tensor:
    """Attention over a layer's cache (the first ``past_len[b]`` of its C slots, C may be 0) and
    the new tokens (causally), with one softmax across both parts. The cache is only read."""
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
    """KV handling in ``decoder.onnx``: reads the past buffers, emits only the new entries."""

    def __init__(self, cfg, past: list[tuple]):
        self.cfg = cfg
        self.past = past
        self.present: dict[int, tuple] = {}

    def length(self, layer: int) -> torch.Tensor:
        return self.past[layer][2]

    def attend(self, layer: int, q, k, v, count):
        attn, (keys, values) = self.compute(layer, q, k, v, count)
        self.present[layer] = (keys, values, self.past[layer][2] + count)
        return attn

    def compute(self, layer: int, q, k, v, count):
        """Side-effect free (an If branch may call it): attention output and the new entries."""
        past_k, past_v, past_len = self.past[layer]
        return cached_attention(q, k, v, past_k, past_v, past_len), (k, v)

    def branch_skipped(self, layer, xs):
        """What a skipped gamma-MoD layer emits as its new entries: zeros (and no count)."""
        shape = (xs.shape[0], self.cfg.num_kv_heads, xs.shape[1], self.cfg.head_dim)
        return xs.new_zeros(shape), xs.new_zeros(shape)


class OrtGraphKV(KVStore):
    """KV handling in the ONNX Runtime graphs: GroupQueryAttention appends into the whole buffers,
    which the runtime binds as both past and present (so the present outputs are the past inputs'
    memory). ``rotary_inside``: one token per row, packed QKV and RoPE inside GQA; otherwise RoPE
    runs first (RotaryEmbedding at the layer's positions) and GQA takes the chunk."""

    fused = True

    def __init__(self, past: list[tuple], cos: torch.Tensor, sin: torch.Tensor, rotary_inside: bool):
        self.past, self.cos, self.sin, self.rotary_inside = past, cos, sin, rotary_inside
        self.present: dict[int, tuple] = {}

    def length(self, layer: int) -> torch.Tensor:
        return self.past[layer][2]

    def attend_fused(self, layer: int, attn, x, positions, count):
        out, (present_k, present_v) = self.compute_fused(layer, attn, x, positions, count)
        self.present[layer] = (present_k, present_v, self.past[layer][2] + count)
        return out

    def compute_fused(self, layer: int, attn, x, positions, count):
        """Side-effect free (an If branch may call it): attention output and the whole buffers."""
        from . import ortops

        cfg = attn.cfg
        qkv = attn.qkv_proj(x) if hasattr(attn, "qkv_proj") else torch.cat(
            [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        past_k, past_v, past_len = self.past[layer]
        total = past_len + count
        seqlens = (total - 1).to(torch.int32)  # the row's last entry after the append
        # the batch's longest row after the append, and at least the chunk's width as GQA requires
        # (a threshold-routed chunk's tail is padding); not the buffer's length: the CPU kernel
        # sizes its work by this bound, and a 4096-entry bound cost a 619-token prompt 6x
        bound = torch.maximum(total.max(), torch.scalar_tensor(x.shape[1], dtype=total.dtype,
                                                                device=x.device)).to(torch.int32)
        if self.rotary_inside:
            out, present_k, present_v = ortops.ort_group_query_attention(
                qkv, None, None, past_k, past_v, seqlens, bound, count.to(torch.int32), self.cos, self.sin,
                positions, cfg.num_heads, cfg.num_kv_heads)
        else:
            q, k, v = qkv.split([cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2, dim=-1)
            q = ortops.ort_rotary_embedding(q, positions, self.cos, self.sin, cfg.num_heads)
            k = ortops.ort_rotary_embedding(k, positions, self.cos, self.sin, cfg.num_kv_heads)
            out, present_k, present_v = ortops.ort_group_query_attention(
                q, k, v, past_k, past_v, seqlens, bound, count.to(torch.int32), None, None, None, cfg.num_heads,
                cfg.num_kv_heads)
        return out, (present_k, present_v)

    def branch_skipped(self, layer, xs):
        """What a skipped gamma-MoD layer leaves: the buffers as they were."""
        past_k, past_v, _ = self.past[layer]
        return past_k, past_v


def _last_logits(model: MoDLlava, hidden: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """Logits of each row's last real token [B, V] (float32): the lm_head runs on B tokens."""
    index = (seq_lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, hidden.shape[-1])
    last = torch.gather(hidden, 1, index)[:, 0]
    return _f32(model.lm_head(last))


class DecoderGraph(nn.Module):
    """The decoder for one chunk (see the module docstring). ``routed``: the artifact routes (it
    takes ``span_start``, ``span_length`` and ``capacity.<l>``); ``kv``: "portable" or "ort";
    ``decode_step``: the ORT decode-step variant (one token, no span)."""

    def __init__(self, model: MoDLlava, routing: str, mod_layers: list[int], kv: str = "portable",
                 max_seq: int = 0, decode_step: bool = False):
        super().__init__()
        self.model = model
        self.routing = routing
        self.mod_layers = list(mod_layers) if routing in ("static", "threshold") and not decode_step else []
        self.kv = kv
        self.decode_step = decode_step
        if kv == "ort":
            cfg = model.config
            dtype = next(model.parameters()).dtype
            device = next(model.parameters()).device
            # RoPE tables, as the weights writer fills them (rope_tables): buffers, so the graph
            # takes them as initializers
            self.register_buffer("rope_cos", torch.empty(max_seq, cfg.head_dim // 2, dtype=dtype, device=device))
            self.register_buffer("rope_sin", torch.empty(max_seq, cfg.head_dim // 2, dtype=dtype, device=device))

    @property
    def routed(self) -> bool:
        return bool(self.mod_layers)

    def input_names(self) -> list[str]:
        names = ["inputs_embeds", "seq_lengths", "past_length"]
        if self.routed:
            names += ["span_start", "span_length"] + [f"capacity.{i}" for i in self.mod_layers]
        for i in range(self.model.config.num_layers):
            names += [f"past_key.{i}", f"past_value.{i}", f"kv_length.{i}"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.model.config.num_layers):
            names += [f"present_key.{i}", f"present_value.{i}", f"new_kv_length.{i}"]
        names += [f"kept_indices.{i}" for i in self.mod_layers]
        if self.routing == "threshold":  # how many span tokens passed the threshold: capacity overflows show
            names += [f"above_threshold.{i}" for i in self.mod_layers]
        return names

    def forward(self, inputs_embeds, seq_lengths, past_length, *rest):
        cfg = self.model.config
        span_start, span_length, capacity = None, 0, {}
        if self.routed:
            # span_length and capacity.<l> are traced as tensors whose SIZE is the value (symbolic
            # sizes, so output shapes follow from them); the exporter then turns them into INT32
            # shape-tensor inputs holding the value (export/exporter.py: shape_inputs_from_sizes)
            span_start, span, *widths = rest[:2 + len(self.mod_layers)]
            rest = rest[2 + len(self.mod_layers):]
            span_length = span.shape[0]
            # each MoD layer's kept WIDTH T - N + k is traced as one symbol (every shape after the
            # selection is then an atom, which keeps tracing fast); k is derived from it here and,
            # in the graph, the width from the capacity.<l> input (shape_inputs_from_sizes)
            t = inputs_embeds.shape[1]
            capacity = {layer: w.shape[0] - t + span_length for layer, w in zip(self.mod_layers, widths)}
        past = [(rest[3 * i], rest[3 * i + 1], rest[3 * i + 2]) for i in range(cfg.num_layers)]
        if self.kv == "ort":
            kv = OrtGraphKV(past, self.rope_cos, self.rope_sin, rotary_inside=self.decode_step)
        else:
            kv = GraphKV(cfg, past)
        step = Step(routing=self.routing, kv=kv, past_length=past_length, valid=seq_lengths,
                    span_start=span_start, span_length=span_length, capacity=capacity)
        step.inverse_frequencies(cfg, inputs_embeds.device)  # once, outside any If branch
        hidden = self.model.forward_chunk(inputs_embeds, step)
        outs = [_last_logits(self.model, hidden, seq_lengths)]
        for i in range(cfg.num_layers):
            outs += list(kv.present[i])
        outs += [step.kept[i] for i in self.mod_layers]
        if self.routing == "threshold":
            outs += [step.above[i] for i in self.mod_layers]
        return tuple(outs)


class VisionGraph(nn.Module):
    """``pixel_values`` [N, 3, S, S] -> projected ``image_features`` [N, image_tokens, hidden]
    (anyres: N tiles). LLaVA-HR's CLIP position embedding, which the eager tower resamples (bicubic,
    antialiased) on every forward, depends on the weights only: here it is a buffer the weights
    writer fills with the resampled table (``vision_extra_weights``), so the graph holds no
    antialiased resize (which TensorRT does not parse)."""

    def __init__(self, model: MoDLlava):
        super().__init__()
        self.model = model
        tower = model.model.vision_tower
        self.multipath = hasattr(tower, "patch_positions")
        if self.multipath:
            weight = tower.clip_model.embeddings.position_embedding.weight
            self.register_buffer("fast_patch_positions", torch.empty(tower.tokens, weight.shape[1], dtype=weight.dtype,
                                                                     device=weight.device))

    def forward(self, pixel_values):
        if self.multipath:
            features = self.model.model.vision_tower(pixel_values, positions=self.fast_patch_positions)
            return self.model.model.mm_projector(features)
        return self.model.encode_images(pixel_values)


def vision_extra_weights(ckpt, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What :class:`VisionGraph`'s buffers hold, computed from the checkpoint's weights as the eager
    model computes them."""
    vision = ckpt.vision
    if vision is None or vision.multipath is None:
        return {}
    from .llava_hr import FAST, resample_positions

    weight = ckpt.weights.tensor(FAST + "vision_model.embeddings.position_embedding.weight", dtype)
    return {"fast_patch_positions": resample_positions(weight, vision.image_tokens)}


def rope_tables(cfg, max_seq: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """cos/sin [max_seq, head_dim/2] exactly as the eager model computes them (float32, then cast)."""
    from .model import inverse_frequencies

    freqs = torch.arange(max_seq).float()[:, None] * inverse_frequencies(cfg, "cpu")
    return {"rope_cos": freqs.cos().to(dtype), "rope_sin": freqs.sin().to(dtype)}
