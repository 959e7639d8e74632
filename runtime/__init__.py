"""Runtime: torch-free generation from exported artifacts (ONNX Runtime, TensorRT).

    from gammamod.runtime import Pipeline, Generator

This package must never import torch: it runs on devices where torch is absent. It also holds
the input side shared with the PyTorch reference (image preprocessing, tokenizer, prompt
template, kept-count rules), so both sides see identical inputs.
"""

from .generator import Generator
from .pipeline import GenerationResult, Pipeline

__all__ = ["Pipeline", "Generator", "GenerationResult"]
