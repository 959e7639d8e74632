"""Engines: TensorRT from an exported artifact (manifest + ONNX + plugins).

``check-onnx`` (what a TensorRT version's parser takes), the ONNX copies it parses
(``prepare``: ``--mod-ops plugin|native``), the device table (``targets``), the build plan
(``plan``: profiles and device memory, no TensorRT needed), ``build`` (engines on this GPU, needs
TensorRT) and ``bundle`` (a folder that builds and runs on a Jetson).
"""
