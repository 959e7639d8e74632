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
