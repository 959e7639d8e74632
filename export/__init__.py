"""Export: checkpoint -> PyTorch model -> static-capacity ONNX.

Python entry points used by tests and later stages:

* :func:`load_checkpoint` (path, vision_tower=None, dtype=torch.float32, *, vision_tower_slow=None)
  -> model
* :func:`forward_language` (model, inputs_embeds, routable=(start, length), routing=...,
  skip_ratio=None) -> logits, kept indices of every MoD layer, per-layer KV lengths
* :func:`generate_from_embeds` (model, inputs_embeds, routable=..., routing=...,
  max_new_tokens=N) -> greedy tokens and per-layer KV lengths: the runtime's parity oracle.

They load on first use, so importing the package (its command-line wiring, say) loads no torch.
"""

import importlib

_EXPORTS = {"load_checkpoint": "checkpoint", "forward_language": "generate", "generate_from_embeds": "generate",
            "LanguageOutput": "generate", "GenerationOutput": "generate", "MoDLlava": "model",
            "ROUTING_MODES": "model"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
