"""Backends the runtime runs graphs on: ``ort`` (ONNX Runtime, CPU or CUDA) and ``tensorrt``."""
