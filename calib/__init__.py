"""Calibration: ARank layer analysis, per-layer capacities, INT8/FP8.

Not built yet. Its output is a capacity file (JSON: MoD layer index -> kept count) that
``gammamod export --capacity FILE`` already accepts.
"""
