"""TensorRT backend: engines built for this GPU by the engines stage, run from Python.

Written against the TensorRT 10/11 Python API: ``Runtime.deserialize_cuda_engine``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``, with CUDA
memory and streams through ``polygraphy.cuda`` (ctypes over libcudart; no pycuda). Our plugin
library, named in the manifest, is loaded into TensorRT's plugin registry first.

An engine runs only where it was built for: the manifest's ``engines`` section records the
TensorRT version, the GPU's compute capability, the hardware-compatibility level and the
plugin version, and :func:`check_engines` refuses a mismatch with the reason.

The KV cache lives on the GPU (:class:`DeviceKVCache`); a decode step writes only its new
entries, with one 2-D copy per layer and row.
"""

from __future__ import annotations

import ctypes

import numpy as np

from gammamod.errors import GammamodError

from .base import Backend

CUDA_MEMCPY_H2D, CUDA_MEMCPY_D2H, CUDA_MEMCPY_D2D = 1, 2, 3
CUDA_ATTR_CC_MAJOR, CUDA_ATTR_CC_MINOR = 75, 76


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise GammamodError("backend 'tensorrt' needs TensorRT's Python package (10.3 or later) and an NVIDIA GPU; "
                            "note that PyPI's 'tensorrt' is a stub outside NVIDIA's own index") from None
    if not hasattr(trt, "Runtime") or int(trt.__version__.split(".")[0]) < 10:
        raise GammamodError(f"backend 'tensorrt' needs TensorRT 10.3 or later (found {getattr(trt, '__version__', '?')})")
    return trt


def _cuda():
    try:
        from polygraphy import cuda
    except ImportError:
        raise GammamodError("backend 'tensorrt' needs polygraphy for CUDA memory and streams "
                            "(pip install polygraphy)") from None
    return cuda


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3] if x.isdigit())


def check_engines(engines: dict | None, tensorrt_version: str, compute_capability: tuple[int, int],
                  plugin_version: str | None = None) -> None:
    """Refuse engines built for another TensorRT, GPU or plugin version (one-line reasons)."""
    if not engines or not engines.get("files"):
        raise GammamodError("the artifact has no TensorRT engines for this machine: build them here with the engines "
                            "stage (engines are not portable across GPUs or TensorRT versions)")
    built = engines.get("tensorrt", "")
    have, want = _version_tuple(tensorrt_version), _version_tuple(built)
    if engines.get("version_compatible"):
        if not have or not want or have[0] != want[0] or have < want:
            raise GammamodError(f"engines were built by TensorRT {built} (version-compatible): they need TensorRT "
                                f"{want[0] if want else '?'}.x at {built} or later, this machine has {tensorrt_version}")
    elif have[:2] != want[:2] or (len(have) > 2 and len(want) > 2 and have[2] != want[2]):
        raise GammamodError(f"engines were built by TensorRT {built}, this machine has {tensorrt_version}: rebuild them "
                            "(or build version-compatible engines)")
    cc = tuple(engines.get("gpu", {}).get("compute_capability", ()))
    level = engines.get("hardware_compatibility", "none")
    if level == "ampere_plus":
        if compute_capability < (8, 0):
            raise GammamodError(f"engines need an Ampere or newer GPU (sm_80+), this GPU is sm_{compute_capability[0]}"
                                f"{compute_capability[1]}")
    elif cc and tuple(compute_capability) != cc:
        raise GammamodError(f"engines were built for sm_{cc[0]}{cc[1]} ({engines.get('gpu', {}).get('name', 'GPU')}), "
                            f"this GPU is sm_{compute_capability[0]}{compute_capability[1]}: rebuild them here")
    plugin = engines.get("plugin") or {}
    if plugin and plugin_version is not None and plugin.get("version") != plugin_version:
        raise GammamodError(f"engines use plugin version {plugin.get('version')}, the plugin library here is "
                            f"{plugin_version}: rebuild the engines or install the matching plugin")


class _Logger:
    def __init__(self, trt):
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)


class TrtRunner:
    def __init__(self, kind: str, engine, trt, cuda, stream):
        self.kind = kind
        self.engine = engine
        self.trt = trt
        self.cuda = cuda
        self.stream = stream
        self.context = engine.create_execution_context()
        if self.context is None:
            raise GammamodError(f"TensorRT could not create an execution context for the {kind} engine (GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers: dict[str, object] = {}  # device staging per tensor, grown as needed

    def _buffer(self, name: str, shape, dtype):
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = self.cuda.DeviceArray(shape=tuple(shape), dtype=dtype)
        else:
            buf.resize(tuple(shape))
        return buf

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        ctx = self.context
        for name in self.input_names:
            value = feeds[name]
            if isinstance(value, self.cuda.DeviceView):  # already on the GPU (the KV cache): bind by address
                shape, ptr = value.shape, value.ptr
            else:
                host = np.ascontiguousarray(value)
                buf = self._buffer(name, host.shape, host.dtype)
                buf.copy_from(host, self.stream)
                shape, ptr = host.shape, buf.ptr
            if not ctx.set_input_shape(name, tuple(shape)):
                raise GammamodError(f"{self.kind} engine rejects shape {tuple(shape)} for {name} (outside its "
                                    "optimization profile; rebuild with larger limits)")
            ctx.set_tensor_address(name, ptr)
        results = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self._buffer(name, shape, dtype)
            ctx.set_tensor_address(name, buf.ptr)
            results[name] = buf
        if not ctx.execute_async_v3(self.stream.ptr):
            raise GammamodError(f"TensorRT failed to run the {self.kind} engine (see its log above)")
        host = {}
        for name in outputs or self.output_names:
            buf = results[name]
            host[name] = np.empty(buf.shape, dtype=buf.dtype)
            buf.copy_to(host[name], self.stream)
        self.stream.synchronize()
        return host


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, manifest, device: str = "cuda:0", plugin_library: str | None = None):
        self.trt = _tensorrt()
        self.cuda = _cuda()
        self.manifest = manifest
        self.device = device
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        if not device.startswith("cuda"):
            raise GammamodError(f"device {device!r} for backend 'tensorrt': expected cuda or cuda:N")
        lib = self.cuda.wrapper().handle
        self.cuda.wrapper().check(lib.cudaSetDevice(ctypes.c_int(index)))
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.cuda.wrapper().check(lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, index))
        self.cuda.wrapper().check(lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_ATTR_CC_MINOR, index))
        self.compute_capability = (major.value, minor.value)
        engines = manifest.get("engines")
        plugin = (engines or {}).get("plugin") or {}
        library = plugin_library or plugin.get("library")
        check_engines(engines, self.trt.__version__, self.compute_capability,
                      plugin.get("version") if library else None)
        self.logger = _Logger(self.trt).logger
        self.trt.init_libnvinfer_plugins(self.logger, "")
        if library:
            path = manifest.path(library) if not str(library).startswith("/") else library
            if not self.trt.get_plugin_registry().load_library(str(path)):
                raise GammamodError(f"{path}: TensorRT could not load the gammamod plugin library")
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = self.cuda.Stream()

    def open(self, kind: str) -> TrtRunner:
        name = self.manifest["engines"]["files"].get(kind)
        if name is None:
            raise GammamodError(f"{self.manifest.root}: no {kind} engine in the manifest")
        engine = self.runtime.deserialize_cuda_engine(self.manifest.path(name).read_bytes())
        if engine is None:
            raise GammamodError(f"{self.manifest.path(name)}: TensorRT cannot deserialize this engine (built by another "
                                "TensorRT, or damaged)")
        return TrtRunner(kind, engine, self.trt, self.cuda, self.stream)

    def kv_store(self, layers, batch, kv_heads, head_dim, max_seq, dtype):
        return DeviceKVCache(self.cuda, self.stream, layers, batch, kv_heads, head_dim, max_seq, dtype)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__} ({self.device}, sm_{self.compute_capability[0]}{self.compute_capability[1]})"


class DeviceKVCache:
    """:class:`gammamod.runtime.kvcache.KVCache` on the GPU: the same windows and lengths, the
    buffers device memory, the new entries written with one 2-D copy per layer, row and tensor."""

    def __init__(self, cuda, stream, layers, batch, kv_heads, head_dim, max_seq, dtype):
        from gammamod.runtime.kvcache import MIN_WINDOW

        self.cuda, self.stream = cuda, stream
        self.layers, self.batch, self.kv_heads, self.head_dim = layers, batch, kv_heads, head_dim
        self.max_seq, self.dtype = max_seq, np.dtype(dtype)
        nbytes = batch * kv_heads * max_seq * head_dim * self.dtype.itemsize
        lib = cuda.wrapper().handle
        self._keys, self._values = [], []
        for _ in range(layers):
            for store in (self._keys, self._values):
                buf = cuda.DeviceArray.raw((nbytes,))
                cuda.wrapper().check(lib.cudaMemset(ctypes.c_void_p(buf.ptr), 0, ctypes.c_size_t(nbytes)))
                store.append(buf)
        self.windows = [min(MIN_WINDOW, max_seq)] * layers
        self.lengths = np.zeros((layers, batch), dtype=np.int64)
        self._min_window = MIN_WINDOW

    def _view(self, buf, window):
        return self.cuda.DeviceView(buf.ptr, (self.batch, self.kv_heads, window, self.head_dim), self.dtype)

    def keys(self, layer):
        return self._view(self._keys[layer], self.windows[layer])

    def values(self, layer):
        return self._view(self._values[layer], self.windows[layer])

    def _copy(self, dst, src, nbytes, kind):
        lib = self.cuda.wrapper().handle
        self.cuda.wrapper().check(lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                                      ctypes.c_size_t(nbytes), kind, ctypes.c_void_p(self.stream.ptr)))

    def reserve(self, layer, needed):
        from gammamod.runtime.kvcache import grown_window

        old = self.windows[layer]
        new = grown_window(layer, old, needed, self.max_seq)
        if new is None:
            return
        row = self.head_dim * self.dtype.itemsize
        scratch = None
        for buf in (self._keys[layer], self._values[layer]):
            for r in range(self.batch * self.kv_heads - 1, 0, -1):
                src, dst = buf.ptr + r * old * row, buf.ptr + r * new * row
                if dst < src + old * row:  # overlapping move (window capped at max_seq): via a scratch row
                    scratch = scratch or self.cuda.DeviceArray.raw((old * row,))
                    self._copy(scratch.ptr, src, old * row, CUDA_MEMCPY_D2D)
                    src = scratch.ptr
                self._copy(dst, src, old * row, CUDA_MEMCPY_D2D)
        self.stream.synchronize()
        if scratch is not None:
            scratch.free()
        self.windows[layer] = new

    def write(self, layer, keys, values, start=None):
        start = self.lengths[layer] if start is None else start
        t = keys.shape[2]
        self.reserve(layer, int(start.max()) + t)
        lib = self.cuda.wrapper().handle
        item = self.dtype.itemsize
        window = self.windows[layer]
        for host, buf in ((np.ascontiguousarray(keys, self.dtype), self._keys[layer]),
                          (np.ascontiguousarray(values, self.dtype), self._values[layer])):
            for b in range(self.batch):
                dst = buf.ptr + ((b * self.kv_heads) * window + int(start[b])) * self.head_dim * item
                src = host[b].ctypes.data
                width = t * self.head_dim * item
                self.cuda.wrapper().check(lib.cudaMemcpy2DAsync(
                    ctypes.c_void_p(dst), ctypes.c_size_t(window * self.head_dim * item), ctypes.c_void_p(src),
                    ctypes.c_size_t(width), ctypes.c_size_t(width), ctypes.c_size_t(self.kv_heads),
                    CUDA_MEMCPY_H2D, ctypes.c_void_p(self.stream.ptr)))
        self.stream.synchronize()

    def reset(self):
        self.lengths[:] = 0
        self.windows = [min(self._min_window, self.max_seq)] * self.layers

    def entry_bytes(self):
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_used(self):
        return self.lengths.sum(axis=1) * self.entry_bytes()

    def bytes_reserved(self):
        return 2 * self.layers * self.batch * self.kv_heads * self.max_seq * self.head_dim * self.dtype.itemsize
