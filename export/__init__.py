"""Export: checkpoint -> PyTorch model -> static-capacity ONNX.

Python entry points used by tests and later stages:

* :func:`load_checkpoint` (path, vision_tower=None, dtype=torch.float32) -> model
* :func:`forward_language` (model, inputs_embeds, routable=(start, length), routing=...,
  skip_ratio=None) -> logits, kept indices of every MoD layer, per-layer KV lengths
* :func:`generate_from_embeds` (model, inputs_embeds, routable=..., routing=...,
  max_new_tokens=N) -> greedy tokens and per-layer KV lengths: the runtime's parity oracle.
"""

from .checkpoint import load_checkpoint
from .generate import GenerationOutput, LanguageOutput, forward_language, generate_from_embeds
from .model import ROUTING_MODES, MoDLlava

__all__ = ["load_checkpoint", "forward_language", "generate_from_embeds", "LanguageOutput",
           "GenerationOutput", "MoDLlava", "ROUTING_MODES"]
