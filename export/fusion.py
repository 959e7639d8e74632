"""Export-time fusion of projections that read the same input.

On the meta-device skeleton the export traces, each layer's q/k/v projections become one
``qkv_proj`` and its gate/up projections one ``gate_up_proj``: one matmul where there were three
(or two), which is what decode speed on a CPU is made of (each op costs a dispatch), and one
larger GEMM in prefill. The fused weights do not exist in the checkpoint: the weights writer
concatenates their sources (``sources``) as it streams them. The eager model is untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def _fuse(parent: nn.Module, names: list[str], fused_name: str, prefix: str, sources: dict) -> None:
    parts = [getattr(parent, n) for n in names]
    weight = parts[0].weight
    out_features = sum(p.out_features for p in parts)
    bias = parts[0].bias is not None
    fused = nn.Linear(parts[0].in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)
    setattr(parent, fused_name, fused)
    sources[f"{prefix}.{fused_name}.weight"] = [f"{prefix}.{n}.weight" for n in names]
    if bias:
        sources[f"{prefix}.{fused_name}.bias"] = [f"{prefix}.{n}.bias" for n in names]
    for n in names:
        delattr(parent, n)


def fuse_projections(model) -> dict[str, list[str]]:
    """Fuse in place; returns {fused parameter: [checkpoint parameters, concatenated on dim 0]}."""
    sources: dict[str, list[str]] = {}
    for i, layer in enumerate(model.model.layers):
        _fuse(layer.self_attn, ["q_proj", "k_proj", "v_proj"], "qkv_proj", f"model.layers.{i}.self_attn", sources)
        _fuse(layer.mlp, ["gate_proj", "up_proj"], "gate_up_proj", f"model.layers.{i}.mlp", sources)
    return sources


def fused_tensor(sources: list[str], read) -> torch.Tensor:
    return torch.cat([read(name) for name in sources], dim=0)
