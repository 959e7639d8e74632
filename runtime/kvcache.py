"""A per-layer KV cache in host memory, written in place.

Each layer owns one buffer for keys and one for values, reserved at the manifest's maximum
length when the generator is made (zero-filled pages cost memory only once written). Each
layer keeps its own length per row: MoD layers hold fewer entries, and a gamma-MoD decode step
the gate skips appends nothing.

The graphs take a layer's cache as [B, Hkv, C, d] with C the layer's current window; the view
of the first B*Hkv*C*d elements of the buffer is contiguous, so it is bound with no copy. A
decode step writes only its new entries (``write``). When a layer outgrows its window, the
window grows (doubling up to 256 entries, then by steps of 256) and the rows move apart inside
the same buffer: a copy once per 256 steps at most, never one per step. Small steps keep the
masked slots the graphs read (the window past the length) few.
"""

from __future__ import annotations

import numpy as np

from gammamod.errors import GammamodError

MIN_WINDOW = 64
GROW_STEP = 256  # past one step, windows grow by whole steps: masked slots the graphs read stay few


def grown_window(layer: int, old: int, needed: int, max_seq: int) -> int | None:
    """A layer's next window (entries per row) when ``needed`` exceeds ``old``, else None: doubling
    while small, then whole GROW_STEPs, never past ``max_seq`` (asking for more is an error)."""
    if needed <= old:
        return None
    if needed > max_seq:
        raise GammamodError(f"the sequence needs {needed} cache entries in layer {layer}, more than the "
                            f"artifact's max_seq {max_seq} (re-export with a larger --max-seq)")
    return min(max(2 * old if old < GROW_STEP else 0, -(-needed // GROW_STEP) * GROW_STEP, needed), max_seq)

class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_seq: int, dtype,
                 full: bool = False):
        self.layers, self.batch, self.kv_heads, self.head_dim = layers, batch, kv_heads, head_dim
        self.max_seq = max_seq
        self.dtype = np.dtype(dtype)
        self.full = full  # windows fixed at max_seq: for graphs that append in place (decode.ort.onnx)
        size = batch * kv_heads * max_seq * head_dim
        # zero-filled (calloc: pages still cost memory only once written): the graphs read whole
        # windows and zero the masked slots' weights, and 0 * NaN from stale memory would be NaN
        self._keys = [np.zeros(size, self.dtype) for _ in range(layers)]
        self._values = [np.zeros(size, self.dtype) for _ in range(layers)]
        self.windows = [self._first_window()] * layers
        self.lengths = np.zeros((layers, batch), dtype=np.int64)

    def _first_window(self) -> int:
        return self.max_seq if self.full else min(MIN_WINDOW, self.max_seq)

    # -- views the graphs bind ---------------------------------------------------------------
    def _view(self, flat: np.ndarray, window: int) -> np.ndarray:
        n = self.batch * self.kv_heads * window * self.head_dim
        return flat[:n].reshape(self.batch, self.kv_heads, window, self.head_dim)

    def keys(self, layer: int) -> np.ndarray:
        return self._view(self._keys[layer], self.windows[layer])

    def values(self, layer: int) -> np.ndarray:
        return self._view(self._values[layer], self.windows[layer])

    # -- growth and writes ---------------------------------------------------------------------
    def reserve(self, layer: int, needed: int) -> None:
        """Make room for ``needed`` entries per row in ``layer`` (doubling its window)."""
        old = self.windows[layer]
        new = grown_window(layer, old, needed, self.max_seq)
        if new is None:
            return
        row = self.head_dim
        for flat in (self._keys[layer], self._values[layer]):
            # rows (b, h) move from stride old*d to stride new*d, last first so none is overwritten
            for r in range(self.batch * self.kv_heads - 1, 0, -1):
                flat[r * new * row:r * new * row + old * row] = flat[r * old * row:(r + 1) * old * row].copy()
        self.windows[layer] = new

    def write(self, layer: int, keys: np.ndarray, values: np.ndarray, start: np.ndarray | None = None) -> None:
        """Write a chunk's new entries [B, Hkv, T, d] at each row's current length (or ``start``).
        Entries past a row's valid count are written too and ignored: the length says what counts."""
        start = self.lengths[layer] if start is None else start
        t = keys.shape[2]
        self.reserve(layer, int(start.max()) + t)
        kv, vv = self.keys(layer), self.values(layer)
        for b in range(self.batch):
            s = int(start[b])
            kv[b, :, s:s + t] = keys[b]
            vv[b, :, s:s + t] = values[b]

    def copy_row(self, layer: int, row: int, source: "KVCache", source_row: int) -> None:
        """Take ``source``'s entries of ``layer`` in ``source_row`` (another cache of the same
        geometry) into ``row``: a sequence prefilled alone joins a batch."""
        n = int(source.lengths[layer, source_row])
        self.reserve(layer, n)
        self.keys(layer)[row, :, :n] = source.keys(layer)[source_row, :, :n]
        self.values(layer)[row, :, :n] = source.values(layer)[source_row, :, :n]
        self.lengths[layer, row] = n

    def commit(self) -> None:
        """Touch every page of the reserved buffers now, so memory is fixed from the start (no page
        faults, no growth while generating)."""
        for flat in self._keys + self._values:
            flat[::max(1, 4096 // self.dtype.itemsize)] = 0

    def reset(self) -> None:
        self.lengths[:] = 0
        self.windows = [self._first_window()] * self.layers

    # -- reporting -----------------------------------------------------------------------------
    def entry_bytes(self) -> int:
        """Bytes of one cached token in one layer (keys and values)."""
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_used(self) -> np.ndarray:
        """[layers] bytes of valid entries, summed over rows."""
        return self.lengths.sum(axis=1) * self.entry_bytes()

    def bytes_reserved(self) -> int:
        return 2 * sum(f.nbytes for f in self._keys)
