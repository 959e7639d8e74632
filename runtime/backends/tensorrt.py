"""TensorRT backend: engines built for this GPU by the engines stage, run from Python.

Written against the TensorRT 10/11 Python API: ``Runtime.deserialize_cuda_engine``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``, with CUDA
memory and streams through ``polygraphy.cuda`` (ctypes over libcudart; no pycuda). Our plugin
library, named in the manifest, is loaded into TensorRT's plugin registry first.

An engine runs only where it was built for: the manifest's ``engines`` section records the
TensorRT version, the GPU's compute capability, the hardware-compatibility level and the
plugin version, and :func:`check_engines` refuses a mismatch with the reason.

The decoder is ONE engine with two optimization profiles, ``prefill`` and ``decode`` (the weights
once); :class:`TrtRunner` keeps one execution context per profile and picks it per call. The
span length and kept counts are shape tensors, fed from host memory. The KV cache lives on the
GPU (:class:`DeviceKVCache`): the engine reads each layer's window in place and its new entries
stay on the GPU, copied device to device into the cache (one 2-D copy per layer and row).

Not run here: these machines have no TensorRT and no GPU; names are checked against TensorRT
10.3 and 11.1 with ``shared/tools/trt_api_check.py``.
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
                  plugin_sha256: str | None = None) -> None:
    """Refuse engines built for another TensorRT, GPU or plugin library (one-line reasons), from
    the manifest's ``engines`` section that ``gammamod build`` writes."""
    if not engines or not engines.get("files"):
        raise GammamodError("the artifact has no TensorRT engines for this machine: build them here with 'gammamod build "
                            "ARTIFACT --target auto' (engines are not portable across GPUs or TensorRT versions)")
    built = engines.get("tensorrt", "")
    have, want = _version_tuple(tensorrt_version), _version_tuple(built)
    if engines.get("version_compatible"):
        if not have or not want or have[0] != want[0] or have < want:
            raise GammamodError(f"engines were built by TensorRT {built} (version-compatible): they need TensorRT "
                                f"{want[0] if want else '?'}.x at {built} or later, this machine has {tensorrt_version}")
    elif have[:2] != want[:2] or (len(have) > 2 and len(want) > 2 and have[2] != want[2]):
        raise GammamodError(f"engines were built by TensorRT {built}, this machine has {tensorrt_version}: rebuild them "
                            "(or build version-compatible engines)")
    gpu = engines.get("gpu", {})
    cc = tuple(gpu.get("compute_capability", ()))
    level = engines.get("hardware_compatibility", "none")
    here = f"sm_{compute_capability[0]}{compute_capability[1]}"
    if level == "ampere_plus":
        if tuple(compute_capability) < (8, 0):
            raise GammamodError(f"engines need an Ampere or newer GPU (sm_80+), this GPU is {here}")
    elif cc and tuple(compute_capability) != cc:
        raise GammamodError(f"engines were built for sm_{cc[0]}{cc[1]} ({gpu.get('name', 'GPU')}), "
                            f"this GPU is {here}: rebuild them here")
    plugin = engines.get("plugin") or {}
    if plugin and plugin_sha256 is not None and plugin.get("sha256") != plugin_sha256:
        raise GammamodError(f"{plugin.get('file')}: the plugin library differs from the one the engines were built "
                            "with (sha256): rebuild the engines with this library")


def _host_values(value) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value, dtype=np.int32).reshape(-1))


class TrtRunner:
    """One engine and one execution context per optimization profile. The decoder engine has two,
    ``prefill`` (0) and ``decode`` (1): a call with one token per row and no routed span runs in
    the decode context, any other in the prefill context. Shape-tensor inputs (``span_length``,
    ``capacity.<l>``) live in host memory, as TensorRT reads them; device buffers passed in (the
    KV cache) are bound by address, and outputs named in ``keep_on_device`` are returned as
    device views (the chunk's new KV entries, which the cache copies device to device)."""

    keep_on_device = ("present_key.", "present_value.")

    def __init__(self, kind: str, engine, trt, cuda, stream, profiles: list[str]):
        self.kind, self.engine, self.trt, self.cuda, self.stream = kind, engine, trt, cuda, stream
        if engine.num_optimization_profiles != len(profiles):
            raise GammamodError(f"the {kind} engine has {engine.num_optimization_profiles} optimization profiles, the "
                                f"manifest names {len(profiles)} ({', '.join(profiles)}): rebuild it")
        self.profiles = profiles
        self.contexts = []
        for index in range(len(profiles)):
            ctx = engine.create_execution_context()
            if ctx is None:
                raise GammamodError(f"TensorRT could not create an execution context for the {kind} engine (GPU memory?)")
            if not ctx.set_optimization_profile_async(index, stream.ptr):
                raise GammamodError(f"the {kind} engine rejects optimization profile {index}")
            self.contexts.append(ctx)
        stream.synchronize()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.host_inputs = {n for n in self.input_names if engine.is_shape_inference_io(n)}
        self._buffers: dict[tuple, object] = {}  # device staging per (profile, tensor), grown as needed
        self._host: dict[str, np.ndarray] = {}  # shape-tensor values: alive until the next call

    def profile_for(self, feeds: dict) -> int:
        if "decode" not in self.profiles:
            return 0
        tokens = np.shape(feeds["inputs_embeds"])[1]
        span = int(np.asarray(feeds["span_length"]).reshape(-1)[0]) if "span_length" in feeds else 0
        return self.profiles.index("decode" if tokens == 1 and span == 0 else "prefill")

    def _buffer(self, key, shape, dtype):
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self.cuda.DeviceArray(shape=tuple(shape), dtype=dtype)
        else:
            buf.resize(tuple(shape))
        return buf

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        index = self.profile_for(feeds)
        ctx = self.contexts[index]
        staged = []  # host arrays of asynchronous copies: alive until the stream has run them
        for name in self.input_names:
            value = feeds[name]
            if name in self.host_inputs:  # a shape tensor: TensorRT reads its values from host memory
                host = self._host[name] = _host_values(value)
                shape, ptr = host.shape, host.ctypes.data
            elif isinstance(value, self.cuda.DeviceView):  # already on the GPU (the KV cache): bind by address
                shape, ptr = value.shape, value.ptr
            else:
                host = np.ascontiguousarray(value)
                staged.append(host)
                buf = self._buffer((index, name), host.shape, host.dtype)
                buf.copy_from(host, self.stream)
                shape, ptr = host.shape, buf.ptr
            if not ctx.set_input_shape(name, tuple(shape)):
                raise GammamodError(f"{self.kind} engine ({self.profiles[index]} profile) rejects shape {tuple(shape)} for "
                                    f"{name}: outside its optimization profile; rebuild with larger limits")
            ctx.set_tensor_address(name, ptr)
        results = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self._buffer((index, name), shape, dtype)
            ctx.set_tensor_address(name, buf.ptr)
            results[name] = buf
        if not ctx.execute_async_v3(self.stream.ptr):
            raise GammamodError(f"TensorRT failed to run the {self.kind} engine (see its log above)")
        out = {}
        for name in outputs or self.output_names:
            buf = results[name]
            if name.startswith(self.keep_on_device):
                out[name] = self.cuda.DeviceView(buf.ptr, buf.shape, buf.dtype)
            else:
                out[name] = np.empty(buf.shape, dtype=buf.dtype)
                buf.copy_to(out[name], self.stream)
        self.stream.synchronize()
        return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, manifest, device: str = "cuda:0", plugin_library: str | None = None):
        self.trt = _tensorrt()
        self.cuda = _cuda()
        self.manifest = manifest
        self.device = device
        if not device.startswith("cuda"):
            raise GammamodError(f"device {device!r} for backend 'tensorrt': expected cuda or cuda:N")
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        lib = self.cuda.wrapper().handle
        self.cuda.wrapper().check(lib.cudaSetDevice(ctypes.c_int(index)))
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.cuda.wrapper().check(lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, index))
        self.cuda.wrapper().check(lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_ATTR_CC_MINOR, index))
        self.compute_capability = (major.value, minor.value)
        engines = manifest.get("engines")
        check_engines(engines, self.trt.__version__, self.compute_capability)
        manifest.verify_files(list(engines["files"].values()))
        plugin = engines.get("plugin") or {}
        library = plugin_library or (manifest.path(plugin["file"]) if plugin else None)
        if library is not None:
            from gammamod.manifest import sha256_of

            check_engines(engines, self.trt.__version__, self.compute_capability, sha256_of(library))
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        if library is not None and not engines.get("version_compatible"):  # a version-compatible engine carries it
            if not self.trt.get_plugin_registry().load_library(str(library)):
                raise GammamodError(f"{library}: TensorRT could not load the gammamod plugin library")
        self.runtime = self.trt.Runtime(self.logger)
        if engines.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True
        self.stream = self.cuda.Stream()

    def open(self, kind: str) -> TrtRunner:
        engines = self.manifest["engines"]
        name = engines["files"].get(kind)
        if name is None:
            raise GammamodError(f"{self.manifest.root}: no {kind} engine in the manifest")
        engine = self.runtime.deserialize_cuda_engine(self.manifest.path(name).read_bytes())
        if engine is None:
            raise GammamodError(f"{self.manifest.path(name)}: TensorRT cannot deserialize this engine (built by another "
                                "TensorRT, or damaged)")
        return TrtRunner(kind, engine, self.trt, self.cuda, self.stream, list(engines["profiles"][kind]))

    def kv_store(self, layers, batch, kv_heads, head_dim, max_seq, dtype, full=False):
        engines = self.manifest["engines"]
        if batch > engines["max_batch"]:
            raise GammamodError(f"batch of {batch}: the engines were built for at most {engines['max_batch']} rows "
                                "(gammamod build --max-batch)")
        capacity = engines["kv_capacity"]
        return DeviceKVCache(self.cuda, self.stream, layers, batch, kv_heads, head_dim, max_seq, dtype, capacity)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__} ({self.device}, sm_{self.compute_capability[0]}{self.compute_capability[1]})"


class DeviceKVCache:
    """:class:`gammamod.runtime.kvcache.KVCache` on the GPU: the same windows and lengths, the
    buffers device memory, each layer's buffer its KV capacity from the engines' plan (a MoD
    layer holds its kept share), the new entries written with one 2-D copy per layer, row and
    tensor: device to device from the engine's outputs, host to device from arrays."""

    def __init__(self, cuda, stream, layers, batch, kv_heads, head_dim, max_seq, dtype, capacity=None):
        from gammamod.runtime.kvcache import MIN_WINDOW

        self.cuda, self.stream = cuda, stream
        self.layers, self.batch, self.kv_heads, self.head_dim = layers, batch, kv_heads, head_dim
        self.max_seq, self.dtype = max_seq, np.dtype(dtype)
        self.capacity = list(capacity or [max_seq] * layers)
        lib = cuda.wrapper().handle
        self._keys, self._values = [], []
        for layer in range(layers):
            nbytes = batch * kv_heads * self.capacity[layer] * head_dim * self.dtype.itemsize
            for store in (self._keys, self._values):
                buf = cuda.DeviceArray.raw((nbytes,))
                cuda.wrapper().check(lib.cudaMemset(ctypes.c_void_p(buf.ptr), 0, ctypes.c_size_t(nbytes)))
                store.append(buf)
        self._min_window = MIN_WINDOW
        self.windows = [min(MIN_WINDOW, c) for c in self.capacity]
        self.lengths = np.zeros((layers, batch), dtype=np.int64)

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

        cap = self.capacity[layer]
        if needed > cap and cap < self.max_seq:
            raise GammamodError(f"the sequence needs {needed} cache entries in layer {layer}, whose engine KV capacity is "
                                f"{cap} (the build's --max-seq, less a MoD layer's skipped share at its span lengths): "
                                "shorten the request or rebuild the engines with a larger --max-seq")
        old = self.windows[layer]
        new = grown_window(layer, old, needed, cap)
        if new is None:
            return
        row = self.head_dim * self.dtype.itemsize
        scratch = None
        for buf in (self._keys[layer], self._values[layer]):
            for r in range(self.batch * self.kv_heads - 1, 0, -1):
                src, dst = buf.ptr + r * old * row, buf.ptr + r * new * row
                if dst < src + old * row:  # overlapping move (window capped at the capacity): via a scratch row
                    scratch = scratch or self.cuda.DeviceArray.raw((old * row,))
                    self._copy(scratch.ptr, src, old * row, CUDA_MEMCPY_D2D)
                    src = scratch.ptr
                self._copy(dst, src, old * row, CUDA_MEMCPY_D2D)
        self.stream.synchronize()
        if scratch is not None:
            scratch.free()
        self.windows[layer] = new

    def write(self, layer, keys, values, start=None):
        """Write a chunk's new entries [B, Hkv, T, d] after each row's cached ones; device views
        (the engine's outputs) are copied device to device, arrays host to device."""
        start = self.lengths[layer] if start is None else start
        t = keys.shape[2]
        self.reserve(layer, int(start.max()) + t)
        lib = self.cuda.wrapper().handle
        item = self.dtype.itemsize
        window = self.windows[layer]
        width = t * self.head_dim * item
        staged = []  # host arrays of asynchronous copies: alive until the stream has run them
        for new, buf in ((keys, self._keys[layer]), (values, self._values[layer])):
            if isinstance(new, self.cuda.DeviceView):
                src_base, kind = new.ptr, CUDA_MEMCPY_D2D
            else:
                new = np.ascontiguousarray(new, self.dtype)
                staged.append(new)
                src_base, kind = new.ctypes.data, CUDA_MEMCPY_H2D
            for b in range(self.batch):
                dst = buf.ptr + ((b * self.kv_heads) * window + int(start[b])) * self.head_dim * item
                src = src_base + b * self.kv_heads * width
                self.cuda.wrapper().check(lib.cudaMemcpy2DAsync(
                    ctypes.c_void_p(dst), ctypes.c_size_t(window * self.head_dim * item), ctypes.c_void_p(src),
                    ctypes.c_size_t(width), ctypes.c_size_t(width), ctypes.c_size_t(self.kv_heads),
                    kind, ctypes.c_void_p(self.stream.ptr)))
        self.stream.synchronize()

    def reset(self):
        self.lengths[:] = 0
        self.windows = [min(self._min_window, c) for c in self.capacity]

    def entry_bytes(self):
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def bytes_used(self):
        return self.lengths.sum(axis=1) * self.entry_bytes()

    def bytes_reserved(self):
        return self.batch * self.entry_bytes() * sum(self.capacity)
