"""ONNX Runtime's fused decoder ops, for the ORT-only decode graph (``decode.ort.onnx``).

``com.microsoft.GroupQueryAttention`` does a layer's attention in one op from the packed QKV
projection, RoPE included (from cos/sin tables at explicit ``position_ids``, so gamma-MoD's
renumbered and p-MoD's absolute positions both fit), and, when its past and present KV are bound
to the same buffer, appends the new entries in place: each row attends to its first
``seqlens_k[b] + 1`` entries and writes its new one at ``seqlens_k[b]``. It replaces ~40 small ops
per layer, which is what a decode step on a CPU spends its time on besides reading weights.

As for the MoD ops, each exists as a ``torch.library`` op (with a reference implementation of
the contrib op's semantics) that the exporter translates to the ONNX node.
"""

from __future__ import annotations

import torch

DOMAIN = "com.microsoft"


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, d] rotated at positions [B, S] with cos/sin tables [max_pos, d/2]."""
    d = x.shape[-1]
    c = torch.cat([cos[positions], cos[positions]], dim=-1)[:, None]  # [B, 1, S, d]
    sn = torch.cat([sin[positions], sin[positions]], dim=-1)[:, None]
    return x * c + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sn


@torch.library.custom_op("gammamod::ort_group_query_attention", mutates_args=())
def ort_group_query_attention(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                              seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, positions: torch.Tensor, num_heads: int,
                              kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrib op's semantics: packed qkv [B, S, (H + 2 Hkv) d], RoPE at ``positions`` [B, S],
    past [B, Hkv, M, d], seqlens_k [B] (int32: entries after this call - 1) -> (attention output
    [B, S, H*d], present key, present value [B, Hkv, M, d])."""
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    q, k, v = qkv.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], dim=-1)
    qh = _rotate(q.view(b, s, num_heads, d).transpose(1, 2), positions, cos, sin)
    kh = _rotate(k.view(b, s, kv_num_heads, d).transpose(1, 2), positions, cos, sin)
    vh = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    present_k, present_v = past_key.clone(), past_value.clone()
    out = torch.empty_like(qh)
    for row in range(b):
        end = int(seqlens_k[row]) + 1
        start = end - s
        present_k[row, :, start:end] = kh[row]
        present_v[row, :, start:end] = vh[row]
        keys = present_k[row, :, :end].repeat_interleave(num_heads // kv_num_heads, dim=0)
        values = present_v[row, :, :end].repeat_interleave(num_heads // kv_num_heads, dim=0)
        scores = (qh[row] @ keys.transpose(-1, -2)).float() * d ** -0.5  # [H, S, end]
        causal = torch.arange(end)[None, :] > (start + torch.arange(s))[:, None]
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1).to(qkv.dtype)
        out[row] = probs @ values
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_k, present_v


@ort_group_query_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos, sin, positions, num_heads, kv_num_heads):
    b, s, _ = qkv.shape
    return (qkv.new_empty((b, s, num_heads * past_key.shape[-1])), torch.empty_like(past_key),
            torch.empty_like(past_value))


_registered = False


def register_onnx_schemas() -> None:
    """Declare the two contrib ops to the onnx package (ONNX Runtime has its own definitions)."""
    global _registered
    if _registered:
        return
    from onnx import defs

    fp, attr, t = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
    optional = defs.OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        defs.OpSchema("GroupQueryAttention", DOMAIN, 1, doc="ONNX Runtime's fused attention with KV append",
                      inputs=[fp("query", "T"), fp("key", "T", param_option=optional),
                              fp("value", "T", param_option=optional), fp("past_key", "T"), fp("past_value", "T"),
                              fp("seqlens_k", "tensor(int32)"), fp("total_sequence_length", "tensor(int32)"),
                              fp("cos_cache", "T", param_option=optional), fp("sin_cache", "T", param_option=optional),
                              fp("position_ids", "tensor(int64)", param_option=optional)],
                      outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
                      type_constraints=[("T", floats, "")],
                      attributes=[attr("num_heads", t.INT, ""), attr("kv_num_heads", t.INT, ""),
                                  attr("do_rotary", t.INT, "")]),
    ]
    for schema in schemas:
        try:
            defs.register_schema(schema)
        except Exception:
            pass
    _registered = True


def translation_table() -> dict:
    import onnxscript

    register_onnx_schemas()
    ms = onnxscript.values.Opset(DOMAIN, 1)

    def gqa(qkv, past_key, past_value, seqlens_k, total_length, cos, sin, positions, num_heads: int,
            kv_num_heads: int):
        # packed QKV (key and value left empty), RoPE inside at the given positions
        return ms.GroupQueryAttention(qkv, None, None, past_key, past_value, seqlens_k, total_length, cos, sin,
                                      positions, num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1)

    return {torch.ops.gammamod.ort_group_query_attention.default: gqa}
