"""Validate and bench: accuracy and latency of an exported artifact against the PyTorch baseline."""
