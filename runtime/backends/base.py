"""One small backend interface, in the spirit of Polygraphy's runners.

A backend opens the graphs of an artifact (``open(kind)`` for ``vision``, ``decoder``, and
ONNX Runtime's ``decoder_ort`` / ``decode_ort``) as runners. A runner has ``input_names``/``output_names`` and ``run(feeds,
outputs)`` with name -> array dicts, so ONNX Runtime and TensorRT are interchangeable and any
two can be compared tensor by tensor. Large inputs that must not be copied (the KV cache) are
passed as the backend's own buffers: :meth:`Backend.kv_buffer` makes them, and the runner binds
them by address.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    kind: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; ``feeds`` maps input names to arrays (or backend buffers)."""


class Backend:
    name = "base"
    device = "cpu"

    def open(self, kind: str) -> Runner:
        raise NotImplementedError

    def kv_store(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_seq: int, dtype,
                 full: bool = False):
        """The KV cache this backend decodes from (host memory by default). ``full``: every layer's
        window is its whole buffer (for graphs that append in place)."""
        from gammamod.runtime.kvcache import KVCache

        return KVCache(layers, batch, kv_heads, head_dim, max_seq, dtype, full=full)

    def inplace_decode(self) -> bool:
        """Whether this backend runs the artifact's ORT graphs (KV appended in place)."""
        return False

    def graphs_used(self) -> list[str]:
        """The graph kinds this backend runs (opened when a Pipeline loads)."""
        return [k for k in ("vision", "decoder") if k in self.manifest["graphs"]]

    def bind(self, array):
        """A buffer the runners can take as an input and write as an output (in-place decode)."""
        return array

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} ({self.device})"
