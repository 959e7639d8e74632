"""What each TensorRT version's ONNX parser accepts, as far as this project relies on it.

Sources: onnx-tensorrt's ``docs/operators.md`` (10.x branch: TensorRT 10 parses opsets 9 to 20;
operator table below), NVIDIA's ONNX opset guide (TensorRT 11.x: ONNX 1.20, opset up to 25),
and ``shared/spec/targets.md`` (plugin binding by ``plugin_namespace``/``plugin_version``
attributes; up to 10.6 a model-local function named like the plugin wins over the plugin; the
namespace may come from the node's domain from 10.10 on). Three targets are named:

* ``10.3``: JetPack 6 (Jetson Orin), the largest installed base and the floor;
* ``10.x``: any later TensorRT 10 (Thor, JetPack 7, datacenter); checked as its oldest members;
* ``11.x``: TensorRT 11 (strongly typed networks only).
"""

from __future__ import annotations

from dataclasses import dataclass

from gammamod.errors import GammamodError
from gammamod.manifest import SHORT_DTYPE

# Operators the TensorRT 10 ONNX parser supports (default domain). Anything else in the default
# domain is rejected; TensorRT 11 is checked against the same list (a superset may pass there).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Supported, but their output shape depends on data: TensorRT needs an output allocator and runs
# them slowly. Our static-capacity graphs must not contain them.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})

TOPK_MAX_K = 3840  # "K input must be less than 3840"

# ONNX tensor element types TensorRT 10 takes (1 float, 10 float16, 16 bfloat16, 6 int32, 7 int64,
# 9 bool, 3 int8, 2 uint8 (I/O only), 17 float8e4m3fn, 22 int4).
SUPPORTED_TYPES = frozenset({1, 10, 16, 6, 7, 9, 3, 2, 17, 22})


@dataclass(frozen=True)
class Target:
    name: str
    max_opset: int
    max_ir_version: int
    function_shadows_plugin: bool  # a local function named like the plugin is used instead of it
    namespace_from_domain: bool  # the plugin namespace may come from the node's domain
    weakly_typed: bool  # FP16/INT8 builder flags exist (TensorRT 10); 11 is strongly typed only
    notes: str


TARGETS = {
    "10.3": Target("10.3", max_opset=20, max_ir_version=10, function_shadows_plugin=True,
                   namespace_from_domain=False, weakly_typed=True,
                   notes="JetPack 6 / Jetson Orin: C++ IPluginV3 plugins only (no Python plugins via the parser)"),
    "10.x": Target("10.x", max_opset=20, max_ir_version=10, function_shadows_plugin=True,
                   namespace_from_domain=False, weakly_typed=True,
                   notes="checked as the oldest 10.x it may be; 10.7+ prefer plugins over local functions, "
                         "10.10+ take the namespace from the domain"),
    "11.x": Target("11.x", max_opset=25, max_ir_version=13, function_shadows_plugin=False,
                   namespace_from_domain=True, weakly_typed=False,
                   notes="strongly typed networks: precision comes from the ONNX dtypes"),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise GammamodError(f"TensorRT version {name!r}: expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


# -- the GPUs engines are built for --------------------------------------------------------------
# An engine is built for one GPU (compute capability) and one TensorRT. The table says, per device
# users deploy on, what a build may ask of it: which parser copy it reads, its precisions, its
# memory. Memory as the vendor lists it (GiB); Jetson memory is shared with the CPU and the OS.

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
QUANTIZED = ("fp8", "int8", "int4")  # need the Q/DQ artifact the calib stage writes
_DATACENTER = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Device:
    name: str
    gpu: str
    compute_capability: tuple[int, int]
    memory_gib: float
    tensorrt: tuple[str, ...]  # parser versions (keys of TARGETS) it runs; the first is the default
    precisions: tuple[str, ...]
    jetpack: str | None = None  # Jetson: engines are built on the device from a bundle
    cuda: str = "12.x or 13.x"

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def cuda_architecture(self) -> str:
        return f"{self.compute_capability[0]}{self.compute_capability[1]}"


def _jetson(name, gpu, memory, jetpack, cuda, tensorrt, cc=(8, 7), fp8=False):
    return Device(name, gpu, cc, memory, tensorrt, _DATACENTER + (("fp8",) if fp8 else ()), jetpack, cuda)


# FP8 needs compute capability 8.9 or newer (not Orin, not A100); INT8 (Q/DQ) and INT4 weight-only
# work from Ampere on.
DEVICES = {d.name: d for d in (
    Device("a100", "NVIDIA A100 80GB", (8, 0), 80, ("10.x", "11.x"), _DATACENTER),
    Device("a100-40", "NVIDIA A100 40GB", (8, 0), 40, ("10.x", "11.x"), _DATACENTER),
    Device("l4", "NVIDIA L4", (8, 9), 24, ("10.x", "11.x"), _DATACENTER + ("fp8",)),
    Device("h100", "NVIDIA H100 80GB", (9, 0), 80, ("10.x", "11.x"), _DATACENTER + ("fp8",)),
    Device("b200", "NVIDIA B200", (10, 0), 180, ("10.x", "11.x"), _DATACENTER + ("fp8",)),
    _jetson("orin-nano-jp6", "Jetson Orin Nano 8GB", 8, "6.x", "12.6", ("10.3",)),
    _jetson("orin-nx-jp6", "Jetson Orin NX 16GB", 16, "6.x", "12.6", ("10.3",)),
    _jetson("orin-agx32-jp6", "Jetson AGX Orin 32GB", 32, "6.x", "12.6", ("10.3",)),
    _jetson("orin-jp6", "Jetson AGX Orin 64GB", 64, "6.x", "12.6", ("10.3",)),
    _jetson("thor-jp7", "Jetson AGX Thor", 128, "7.0/7.1", "13.0", ("10.x",), cc=(11, 0), fp8=True),
)}


def device(name: str) -> Device:
    if name not in DEVICES:
        raise GammamodError(f"--target {name!r}: expected auto or one of {', '.join(DEVICES)}")
    return DEVICES[name]


def device_for(gpu_name: str, compute_capability: tuple[int, int], memory_gib: float) -> Device:
    """The table's device for a GPU found on this machine (``--target auto``): the entry with its
    compute capability and the nearest memory, renamed to the GPU it is."""
    same = [d for d in DEVICES.values() if d.compute_capability == tuple(compute_capability)]
    if not same:
        raise GammamodError(f"--target auto: this GPU ({gpu_name}, sm_{compute_capability[0]}{compute_capability[1]}) "
                            f"is not in the device table; supported: {', '.join(sorted({d.sm for d in DEVICES.values()}))}")
    base = min(same, key=lambda d: abs(d.memory_gib - memory_gib))
    return Device(base.name, gpu_name, base.compute_capability, memory_gib, base.tensorrt, base.precisions,
                  base.jetpack, base.cuda)


def check_precision(dev: Device, precision: str, tensorrt: str, artifact_dtype: str,
                    quantized: str | None) -> str:
    """Whether ``dev`` with TensorRT ``tensorrt`` can build ``precision`` from an artifact of
    ``artifact_dtype`` (quantized: the precision of its Q/DQ nodes, or None). Returns how:
    ``strong`` (the ONNX's own types) or ``flag`` (TensorRT 10's builder flag on an fp32 graph);
    refuses in one line otherwise."""
    short = SHORT_DTYPE[artifact_dtype]
    if precision not in PRECISIONS:
        raise GammamodError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision not in dev.precisions:
        why = "FP8 needs compute capability 8.9 or newer" if precision == "fp8" else "not supported there"
        raise GammamodError(f"--precision {precision}: {dev.name} ({dev.gpu}, {dev.sm}) has no {precision} ({why}); "
                            f"it has {', '.join(dev.precisions)}")
    if precision in QUANTIZED:
        if quantized != precision:
            raise GammamodError(f"--precision {precision} builds from an artifact with {precision} Q/DQ nodes, which "
                                f"'gammamod calib quantize' writes; this artifact is {quantized or short}")
        return "strong"
    if quantized:
        raise GammamodError(f"--precision {precision}: this artifact is quantized ({quantized}); build it "
                            f"--precision {quantized}")
    if precision == short:
        return "strong"
    if short == "fp32" and precision in ("fp16", "bf16") and TARGETS[tensorrt].weakly_typed:
        return "flag"
    if not TARGETS[tensorrt].weakly_typed:
        raise GammamodError(f"--precision {precision}: TensorRT {tensorrt} is strongly typed (the precision comes "
                            f"from the ONNX) and this artifact is {short}: re-export it with --dtype {precision}")
    raise GammamodError(f"--precision {precision}: this artifact is {short}; re-export it with --dtype {precision}")
