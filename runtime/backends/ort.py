"""ONNX Runtime backend (``onnxruntime`` for CPU, ``onnxruntime-gpu`` for CUDA).

On CPU it runs the artifact's ORT graphs (``decoder.ort.onnx`` for chunks, ``decode.ort.onnx``
for single-token steps: fused attention, the KV cache appended in place); with ``fused=False``, or
on CUDA, the portable ``decoder.onnx``. The decoder graphs share one weights file. On CPU each weight is memory-mapped once and
handed to both sessions with ``SessionOptions.add_initializer``, so the weights are held once
(with pre-packing off: ONNX Runtime would otherwise repack each MatMul weight per session).
Inputs are bound with IOBinding over the caller's arrays, so the KV cache is never copied.
"""

from __future__ import annotations

import os

import numpy as np

from gammamod.errors import GammamodError

from .base import Backend


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise GammamodError("backend 'ort' needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu "
                            "for CUDA; never both)") from None
    return ort


class OrtRunner:
    def __init__(self, kind: str, session, device: str):
        self.kind = kind
        self.session = session
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
            into: dict | None = None) -> dict[str, np.ndarray]:
        """Run; ``into`` binds outputs to caller buffers (OrtValues) that are written in place and
        not returned (the KV cache, when the graph appends in place)."""
        ort = _ort()
        io = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))  # no copy for contiguous arrays
        names = [n for n in (outputs or self.output_names) if n not in (into or {})]
        for name in names:  # bound first: IOBinding returns outputs in binding order
            io.bind_output(name, "cpu")
        for name, value in (into or {}).items():
            io.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(io)
        values = io.get_outputs()
        return {n: values[i].numpy() for i, n in enumerate(names)}


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, manifest, device: str = "cpu", threads: int | None = None, share_weights: bool = True,
                 optimization: str = "all", profile_dir: str | None = None, fused: bool = True):
        ort = _ort()
        self.manifest = manifest
        self.device = device
        if device == "cpu":
            self.providers = ["CPUExecutionProvider"]
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise GammamodError("device 'cuda': this onnxruntime has no CUDA provider (install onnxruntime-gpu "
                                    "in place of onnxruntime)")
            index = int(device.split(":")[1]) if ":" in device else 0
            self.providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            raise GammamodError(f"device {device!r} for backend 'ort': expected cpu, cuda or cuda:N")
        self.threads = threads or _physical_cores()
        # numpy has no bfloat16: such weights are left to ONNX Runtime's own loading. Quantized
        # artifacts load their own too: their fused kernels need pre-packing (MatMulNBits without it
        # dequantizes the whole weight on every call: 38 ms instead of 0.1 ms for a 2048x2048 GEMV,
        # measured), and each session's packed int8/int4 copy is a quarter or an eighth of fp32
        self.share_weights = share_weights and device == "cpu" and manifest["model"]["dtype"] != "bfloat16" \
            and not manifest.get("quantization")
        self.optimization = optimization
        self.fused = fused  # use decode.ort.onnx for one-token steps when the artifact has it
        self.profile_dir = profile_dir
        self._mapped: dict[str, np.memmap] = {}
        self._values: dict[tuple[str, str], object] = {}

    def _options(self, kind: str):
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.optimization]
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if self.profile_dir:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(self.profile_dir, f"ort_{kind}")
        graph = self.manifest.graph(kind)
        if self.share_weights:
            so.add_session_config_entry("session.disable_prepacking", "1")
            for file in graph.get("weights", []):
                table = self.manifest["weights"][file]
                for name in graph.get("initializers", []):
                    so.add_initializer(name, self._value(file, name, table[name]))
        return so

    def _value(self, file: str, name: str, entry):
        """One weight as an OrtValue over the memory-mapped weights file (made once, shared)."""
        ort = _ort()
        key = (file, name)
        if key not in self._values:
            if file not in self._mapped:
                self._mapped[file] = np.memmap(self.manifest.path(file), mode="r")
            offset, nbytes, dtype, shape = entry
            arr = self._mapped[file][offset:offset + nbytes].view(np.dtype(dtype)).reshape(shape)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(arr)
        return self._values[key]

    def open(self, kind: str) -> OrtRunner:
        from gammamod.manifest import check_graph_io

        ort = _ort()
        graph = self.manifest.graph(kind)
        if graph is None:
            raise GammamodError(f"{self.manifest.root}: the artifact has no {kind} graph")
        path = str(self.manifest.path(graph["file"]))
        try:
            session = ort.InferenceSession(path, self._options(kind), providers=self.providers)
        except Exception as e:  # a damaged graph: say which file, in one line
            raise GammamodError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None

        def described(values):
            return [(v.name, _ORT_TYPES.get(v.type, v.type), list(v.shape)) for v in values]

        check_graph_io(self.manifest, kind, described(session.get_inputs()), described(session.get_outputs()))
        return OrtRunner(kind, session, self.device)

    def inplace_decode(self) -> bool:
        return self.fused and self.device == "cpu" and "decoder_ort" in self.manifest["graphs"]

    def graphs_used(self) -> list[str]:
        kinds = ["vision"] + (["decoder_ort", "decode_ort"] if self.inplace_decode() else ["decoder"])
        return [k for k in kinds if k in self.manifest["graphs"]]

    def bind(self, array):
        return _ort().OrtValue.ortvalue_from_numpy(array)  # shares the array's memory (CPU)

    def describe(self) -> str:
        fused = ", fused decode" if self.inplace_decode() else ""
        return f"ort ({self.device}, {self.threads} threads{fused})"


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1
