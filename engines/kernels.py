"""The MoD kernels' CPU path: the plugin kernels' own source, run on the host.

``engines/plugins/mod_kernels.h`` holds the kernel bodies as ``__host__ __device__`` code; the
CUDA kernels run them with thread blocks, and ``cpu_harness.cpp`` runs the very same bodies on
the CPU, lane after lane, over the whole index space. :func:`run_cpu` compiles that harness with
the host's C++ compiler (``$CXX``, default ``g++``) on first use into a cache keyed by the
sources' hash (``$XDG_CACHE_HOME/gammamod/kernels``, else ``~/.cache/gammamod/kernels``) and
calls it through ctypes. fp16 and bf16 travel as their bit patterns; numpy's ``float16`` and
``ml_dtypes.bfloat16`` arrays are taken as they are.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

from .plugin_library import CPU_HARNESS, SOURCE_DIR

NODE_INPUTS = {
    "MoDSelect": ("scores", "span_start", "span_length", "capacity"),
    "MoDSelectThreshold": ("scores", "span_start", "span_length", "capacity"),
    "MoDGather": ("x", "kept"),
    "MoDScatter": ("x", "kept", "y"),
}
# Node attributes that only bind the node to its TensorRT plugin.
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version", "tensorrt_plugin_shape_input_indices")
HARNESS_SOURCES = ("mod_kernels.h", CPU_HARNESS)
COMPILE_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror"]
_SCORE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 2}

_loaded: dict[str, ctypes.CDLL] = {}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gammamod" / "kernels"


def harness_path() -> Path:
    """Where the compiled harness for these sources and this compiler lives."""
    compiler = os.environ.get("CXX", "g++")
    digest = hashlib.sha256(" ".join([compiler] + COMPILE_FLAGS).encode())
    for name in HARNESS_SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    return _cache_dir() / f"cpu-harness-{digest.hexdigest()[:16]}.so"


def _build(path: Path) -> None:
    from gammamod.lifecycle import die_with_parent

    compiler = os.environ.get("CXX", "g++")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE_DIR / CPU_HARNESS), "-o", tmp],
                                  capture_output=True, text=True, preexec_fn=die_with_parent)
        except FileNotFoundError:
            raise GammamodError(f"run_cpu compiles the kernels' CPU harness with a C++ compiler: {compiler!r} was "
                                "not found (install g++ or set CXX)") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise GammamodError(f"{SOURCE_DIR / CPU_HARNESS}: {compiler} failed: {first}")
        os.replace(tmp, path)  # whole or absent: a concurrent build replaces it with the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def harness() -> ctypes.CDLL:
    """The compiled harness, built on first use."""
    path = harness_path()
    lib = _loaded.get(str(path))
    if lib is not None:
        return lib
    if not path.is_file():
        _build(path)
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gm_kernels_version.restype = ctypes.c_char_p
    lib.gm_select.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_float]
    lib.gm_gather.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
    lib.gm_scatter.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
    for fn in (lib.gm_select, lib.gm_gather, lib.gm_scatter):
        fn.restype = ctypes.c_int
    _loaded[str(path)] = lib
    return lib


# ---------------------------------------------------------------------------------------------


def _floats(op_type: str, name: str, value, rank: int) -> np.ndarray:
    arr = np.ascontiguousarray(value)
    if arr.dtype.name not in _SCORE_TYPES:
        raise GammamodError(f"{op_type} input {name!r}: expected float32, float16 or bfloat16, got {arr.dtype}")
    if arr.ndim != rank:
        raise GammamodError(f"{op_type} input {name!r}: expected {rank} dimensions, got shape {list(arr.shape)}")
    return arr


def _indices(op_type: str, name: str, value, shape: tuple) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise GammamodError(f"{op_type} input {name!r}: expected int64 indices, got {arr.dtype}")
    if arr.shape != shape:
        raise GammamodError(f"{op_type} input {name!r}: expected shape {list(shape)}, got {list(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _scalar(op_type: str, name: str, value) -> int:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer) or arr.size != 1:
        raise GammamodError(f"{op_type} input {name!r}: expected one int64 value, got {arr.dtype} of shape "
                            f"{list(arr.shape)}")
    return int(arr.reshape(-1)[0])


def _ptr(arr: np.ndarray) -> int:
    return arr.ctypes.data


def _check(status: int, op_type: str) -> None:
    if status != 0:
        raise GammamodError(f"{op_type}: the CPU harness failed (status {status})")


def _select(op_type: str, inputs: dict, attrs: dict):
    scores = _floats(op_type, "scores", inputs["scores"], 2)
    batch, tokens = scores.shape
    starts = _indices(op_type, "span_start", inputs["span_start"], (batch,))
    n = _scalar(op_type, "span_length", inputs["span_length"])
    k = _scalar(op_type, "capacity", inputs["capacity"])
    if not 0 <= n <= tokens:
        raise GammamodError(f"{op_type} input 'span_length': {n} is outside [0, {tokens}] (T = {tokens})")
    if not 0 <= k <= n:
        raise GammamodError(f"{op_type} input 'capacity': {k} is outside [0, {n}] (the span length)")
    bad = np.flatnonzero((starts < 0) | (starts > tokens - n))
    if bad.size:
        raise GammamodError(f"{op_type} input 'span_start': row {bad[0]} starts at {starts[bad[0]]}, a span of {n} "
                            f"needs a start in [0, {tokens - n}]")
    threshold = 0.0
    if op_type == "MoDSelectThreshold":
        if not isinstance(attrs.get("threshold"), (int, float, np.floating, np.integer)):
            raise GammamodError("MoDSelectThreshold attribute 'threshold': expected a number")
        threshold = float(attrs["threshold"])
    kept = np.empty((batch, tokens - n + k), dtype=np.int64)
    count = np.empty((batch,), dtype=np.int64)
    with_count = op_type == "MoDSelectThreshold"
    _check(harness().gm_select(_SCORE_TYPES[scores.dtype.name], _ptr(scores), _ptr(starts), n, k, _ptr(kept),
                               _ptr(count) if with_count else None, batch, tokens, kept.shape[1], int(with_count),
                               threshold), op_type)
    return (kept, count) if with_count else kept


def _rows(op_type: str, inputs: dict):
    x = _floats(op_type, "x", inputs["x"], 3)
    batch, tokens, _ = x.shape
    raw = np.asarray(inputs["kept"])
    if raw.ndim != 2 or raw.shape[0] != batch:
        raise GammamodError(f"{op_type} input 'kept': expected shape [{batch}, K], got {list(raw.shape)}")
    kept = _indices(op_type, "kept", raw, raw.shape)
    if kept.size and (kept.min() < 0 or kept.max() >= tokens):
        raise GammamodError(f"{op_type} input 'kept': indices must lie in [0, {tokens}), got "
                            f"{kept.min()}..{kept.max()}")
    return x, kept


def _gather(op_type: str, inputs: dict) -> np.ndarray:
    x, kept = _rows(op_type, inputs)
    y = np.empty((x.shape[0], kept.shape[1], x.shape[2]), dtype=x.dtype)
    _check(harness().gm_gather(_ptr(x), _ptr(kept), _ptr(y), x.shape[0], x.shape[1], kept.shape[1],
                               x.shape[2] * x.itemsize), op_type)
    return y


def _scatter(op_type: str, inputs: dict) -> np.ndarray:
    x, kept = _rows(op_type, inputs)
    y = _floats(op_type, "y", inputs["y"], 3)
    want = (x.shape[0], kept.shape[1], x.shape[2])
    if y.shape != want or y.dtype != x.dtype:
        raise GammamodError(f"{op_type} input 'y': expected {x.dtype} of shape {list(want)}, got {y.dtype} of shape "
                            f"{list(y.shape)}")
    if any(len(np.unique(row)) != row.size for row in kept):
        raise GammamodError(f"{op_type} input 'kept': a row repeats an index (the rows written back must be distinct)")
    out = np.empty_like(x)
    inverse = np.empty(x.shape[:2], dtype=np.int32)
    _check(harness().gm_scatter(_ptr(x), _ptr(kept), _ptr(y), _ptr(out), _ptr(inverse), x.shape[0], x.shape[1],
                                kept.shape[1], x.shape[2] * x.itemsize), op_type)
    return out


def run_cpu(op_type: str, inputs: dict[str, np.ndarray], attrs: dict | None = None):
    """Run one MoD node with the plugin kernels' source on the CPU.

    ``inputs`` by the node's input names (``scores, span_start, span_length, capacity``;
    ``x, kept``; ``x, kept, y``), ``attrs`` its attributes (``threshold`` for
    MoDSelectThreshold; the plugin-binding ones are ignored). Returns the output array, or
    ``(kept, kept_count)`` for MoDSelectThreshold."""
    if op_type not in NODE_INPUTS:
        raise GammamodError(f"run_cpu: unknown node type {op_type!r}, expected one of {', '.join(NODE_INPUTS)}")
    attrs = dict(attrs or {})
    wanted = NODE_INPUTS[op_type]
    if set(inputs) != set(wanted):
        raise GammamodError(f"{op_type}: expected inputs {', '.join(wanted)}, got {', '.join(sorted(inputs)) or 'none'}")
    known = set(PLUGIN_ATTRIBUTES) | ({"threshold"} if op_type == "MoDSelectThreshold" else set())
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise GammamodError(f"{op_type}: unknown attribute {unknown[0]!r}")
    if op_type in ("MoDSelect", "MoDSelectThreshold"):
        return _select(op_type, inputs, attrs)
    if op_type == "MoDGather":
        return _gather(op_type, inputs)
    return _scatter(op_type, inputs)
