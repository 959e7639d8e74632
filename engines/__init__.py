"""Engines: TensorRT engine building from an exported artifact (manifest + ONNX + plugins).

Not built yet: the export and runtime stages come first (see the issue tracker). The runtime's
TensorRT backend reads engines this stage will write.
"""
