"""Runtime: torch-free generation from exported artifacts (ONNX Runtime, TensorRT).

This package must never import torch: it runs on devices where torch is absent. It also holds
the input side shared with the PyTorch reference (image preprocessing, tokenizer, prompt
template), so both sides see identical inputs.
"""
