"""ONNX Runtime's fused decoder ops, for the ORT-only decoder graphs (``decoder.ort.onnx``,
``decode.ort.onnx``).

``com.microsoft.GroupQueryAttention`` does a layer's attention in one op and, when its past and
present KV are bound to the same buffer, appends the new entries in place. With its
``query_seqlens`` input it takes a chunk of any length after a cache of any length, per row: row
b has ``query_seqlens[b]`` new tokens (the rest of the chunk is padding and is not written),
attends to its first ``seqlens_k[b] + 1`` entries and writes the new ones after its past. It is
causal by construction: no [T, T] mask is ever materialised, which is where unfused prefill
attention on a CPU spends as much as its matmuls.

RoPE is applied either inside GQA (one token per row: packed QKV, ``do_rotary=1`` at explicit
``position_ids``) or before it with ``com.microsoft.RotaryEmbedding`` at explicit positions
[B, S], so gamma-MoD's renumbered and p-MoD's gathered original positions both fit.

As for the MoD ops, each exists as a ``torch.library`` op (with a reference implementation of
the contrib op's semantics) that the exporter translates to the ONNX node.
"""

from __future__ import annotations

import functools

import torch

DOMAIN = "com.microsoft"


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, d] rotated at positions [B, S] with cos/sin tables [max_pos, d/2]."""
    d = x.shape[-1]
    c = torch.cat([cos[positions], cos[positions]], dim=-1)[:, None]  # [B, 1, S, d]
    sn = torch.cat([sin[positions], sin[positions]], dim=-1)[:, None]
    return x * c + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sn


@torch.library.custom_op("gammamod::ort_rotary_embedding", mutates_args=())
def ort_rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         num_heads: int) -> torch.Tensor:
    """RotaryEmbedding's semantics (interleaved=0): x [B, S, heads*d] at positions [B, S]."""
    b, s, _ = x.shape
    heads = x.view(b, s, num_heads, -1).transpose(1, 2)
    return _rotate(heads, positions, cos, sin).transpose(1, 2).reshape(b, s, -1)


@ort_rotary_embedding.register_fake
def _(x, positions, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("gammamod::ort_group_query_attention", mutates_args=())
def ort_group_query_attention(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                              past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                              total_length: torch.Tensor, query_seqlens: torch.Tensor | None,
                              cos: torch.Tensor | None, sin: torch.Tensor | None, positions: torch.Tensor | None,
                              num_heads: int, kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrib op's semantics. ``query`` [B, S, H*d] with ``key``/``value`` [B, S, Hkv*d], or
    packed QKV in ``query`` (key and value None); RoPE inside when ``cos`` is given (at
    ``positions``). past [B, Hkv, M, d]; ``seqlens_k`` [B] (int32: the row's entries after this
    call - 1); ``query_seqlens`` [B] (int32: new tokens per row, default all S) -> (output
    [B, S, H*d], present key, present value [B, Hkv, M, d])."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    if key is None:
        q, k, v = query.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], dim=-1)
    else:
        q, k, v = query, key, value
    qh = q.view(b, s, num_heads, d).transpose(1, 2)
    kh = k.view(b, s, kv_num_heads, d).transpose(1, 2)
    vh = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    if cos is not None:
        qh, kh = _rotate(qh, positions, cos, sin), _rotate(kh, positions, cos, sin)
    present_k, present_v = past_key.clone(), past_value.clone()
    out = torch.zeros_like(qh)
    for row in range(b):
        new = s if query_seqlens is None else int(query_seqlens[row])
        if new == 0:
            continue
        end = int(seqlens_k[row]) + 1
        start = end - new
        present_k[row, :, start:end] = kh[row, :, :new]
        present_v[row, :, start:end] = vh[row, :, :new]
        keys = present_k[row, :, :end].repeat_interleave(num_heads // kv_num_heads, dim=0)
        values = present_v[row, :, :end].repeat_interleave(num_heads // kv_num_heads, dim=0)
        scores = (qh[row, :, :new] @ keys.transpose(-1, -2)).float() * d ** -0.5  # [H, new, end]
        causal = torch.arange(end)[None, :] > (start + torch.arange(new))[:, None]
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1).to(query.dtype)
        out[row, :, :new] = probs @ values
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_k, present_v


@ort_group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, query_seqlens, cos, sin, positions,
      num_heads, kv_num_heads):
    b, s, _ = query.shape
    return (query.new_empty((b, s, num_heads * past_key.shape[-1])), torch.empty_like(past_key),
            torch.empty_like(past_value))


@functools.cache
def register_onnx_schemas() -> None:
    """Declare the contrib ops to the onnx package (ONNX Runtime has its own definitions)."""
    from onnx import defs

    from .ops import register_schemas

    fp, attr, t = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
    optional = defs.OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        defs.OpSchema("GroupQueryAttention", DOMAIN, 1, doc="ONNX Runtime's fused attention with KV append",
                      inputs=[fp("query", "T"), fp("key", "T", param_option=optional),
                              fp("value", "T", param_option=optional), fp("past_key", "T"), fp("past_value", "T"),
                              fp("seqlens_k", "tensor(int32)"), fp("total_sequence_length", "tensor(int32)"),
                              fp("cos_cache", "T", param_option=optional), fp("sin_cache", "T", param_option=optional),
                              fp("position_ids", "tensor(int64)", param_option=optional),
                              fp("attention_bias", "T", param_option=optional),
                              fp("head_sink", "T", param_option=optional),
                              fp("k_scale", "tensor(float)", param_option=optional),
                              fp("v_scale", "tensor(float)", param_option=optional),
                              fp("q_norm_weight", "T", param_option=optional),
                              fp("k_norm_weight", "T", param_option=optional),
                              fp("query_seqlens", "tensor(int32)", param_option=optional)],
                      outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
                      type_constraints=[("T", floats, "")],
                      attributes=[attr("num_heads", t.INT, ""), attr("kv_num_heads", t.INT, ""),
                                  attr("do_rotary", t.INT, "")]),
        defs.OpSchema("RotaryEmbedding", DOMAIN, 1, doc="ONNX Runtime's rotary embedding at explicit positions",
                      inputs=[fp("input", "T"), fp("position_ids", "tensor(int64)"), fp("cos_cache", "T"),
                              fp("sin_cache", "T")],
                      outputs=[fp("output", "T")], type_constraints=[("T", floats, "")],
                      attributes=[attr("num_heads", t.INT, ""), attr("interleaved", t.INT, "")]),
    ]
    register_schemas(schemas)


def translation_table() -> dict:
    import onnxscript

    register_onnx_schemas()
    ms = onnxscript.values.Opset(DOMAIN, 1)

    def gqa(query, key, value, past_key, past_value, seqlens_k, total_length, query_seqlens, cos, sin, positions,
            num_heads: int, kv_num_heads: int):
        rotary = int(cos is not None)
        return ms.GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin,
                                      positions, None, None, None, None, None, None, query_seqlens,
                                      num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=rotary)

    def rotary(x, positions, cos, sin, num_heads: int):
        return ms.RotaryEmbedding(x, positions, cos, sin, num_heads=num_heads, interleaved=0)

    return {torch.ops.gammamod.ort_group_query_attention.default: gqa,
            torch.ops.gammamod.ort_rotary_embedding.default: rotary}
