"""TensorRT's rules for explicit quantization (QuantizeLinear / DequantizeLinear), read statically.

From NVIDIA's "Working with quantized types" (TensorRT 10) and onnx-tensorrt's Q/DQ import:

* scales are build-time constants, zero points constants equal to 0 (TensorRT quantizes
  symmetrically), and the quantized type is INT8, FP8 (e4m3) or INT4, never UINT8;
* per-tensor scales anywhere; per-axis scales (1-D, one per channel of the axis) only on weights
  (a constant input), with as many values as that axis has;
* blocked scales (``block_size``, opset 21) only on DequantizeLinear of constant weights (INT4
  weight-only), of the weight's rank, each dimension the weight's except the blocked one, which is
  ``ceil(dim / block_size)``;
* INT4 tensors pack two values per byte: their last dimension must be even.

ONNX Runtime's CPU kernels fuse only fp32 scales (fp16 scales left int8 MatMuls unfused and slower
than fp32, measured): other scale types are a warning.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
TENSORRT_QUANTIZED_TYPES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8 e4m3", TensorProto.INT4: "INT4"}


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def uses_blocked_or_int4(graph: onnx.GraphProto) -> bool:
    """Whether the graph (or an If branch) needs opset 21 for quantization: blocked Q/DQ or INT4."""
    for init in graph.initializer:
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            return True
    for node in graph.node:
        if node.op_type in QDQ_OPS and "block_size" in _attrs(node):
            return True
        if any(uses_blocked_or_int4(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            return True
    return False


def check_qdq(node, consts: dict, target_name: str, report) -> None:
    """Report what TensorRT would reject in one Q/DQ node. ``consts``: name -> TensorProto of the
    constants visible here (initializers and Constant outputs, outer scopes included)."""
    attrs = _attrs(node)
    x = node.input[0]
    scale = node.input[1] if len(node.input) > 1 else ""
    zero = node.input[2] if len(node.input) > 2 else ""
    if scale not in consts:
        report("error", node, f"scale {scale!r} is computed at run time: TensorRT needs constant Q/DQ scales")
        return
    s = consts[scale]
    if s.data_type != TensorProto.FLOAT:
        report("warning", node, f"scale {scale!r} is {TensorProto.DataType.Name(s.data_type)}: ONNX Runtime fuses "
                                "int8 MatMuls only with float32 scales (others run unfused, slower than fp32)")
    qtype = None
    if zero:
        if zero not in consts:
            report("error", node, f"zero point {zero!r} is computed at run time: TensorRT needs constant zero points of 0")
        else:
            z = consts[zero]
            qtype = z.data_type
            if z.data_location == TensorProto.EXTERNAL:
                report("warning", node, f"zero point {zero!r} is stored outside the graph: not checked (TensorRT needs 0)")
            elif np.any(numpy_helper.to_array(z).astype(np.float32) != 0):
                report("error", node, f"zero point {zero!r} is not 0: TensorRT quantizes symmetrically (zero points 0)")
    if node.op_type == "DequantizeLinear" and x in consts:
        qtype = consts[x].data_type
    if qtype is None and node.op_type == "QuantizeLinear":
        qtype = attrs.get("output_dtype") or TensorProto.UINT8  # ONNX: no zero point, no output_dtype -> uint8
    if qtype is not None and qtype not in TENSORRT_QUANTIZED_TYPES:
        report("error", node, f"quantized type {TensorProto.DataType.Name(qtype)}: TensorRT takes "
                              f"{', '.join(TENSORRT_QUANTIZED_TYPES.values())} only")
    if qtype == TensorProto.FLOAT8E4M3FN and target_name == "10.3":
        report("warning", node, "FP8 needs compute capability 8.9+: Jetson Orin (TensorRT 10.3) cannot run it")
    weight = consts.get(x)
    dims = list(weight.dims) if weight is not None else None
    if qtype == TensorProto.INT4 and dims is not None and dims and dims[-1] % 2:
        report("error", node, f"INT4 weight {x!r} has an odd last dimension ({dims[-1]}): INT4 packs two values per "
                              "byte, TensorRT needs it even")
    scale_dims = list(s.dims)
    if "block_size" in attrs:
        block, axis = int(attrs["block_size"]), int(attrs.get("axis", 1))
        if node.op_type != "DequantizeLinear" or weight is None:
            report("error", node, "blocked quantization on an activation: TensorRT takes blocked scales only on "
                                  "DequantizeLinear of constant weights (weight-only)")
            return
        axis = axis % len(dims) if dims else axis
        want = [math.ceil(d / block) if i == axis else d for i, d in enumerate(dims)]
        if len(scale_dims) != len(dims) or scale_dims != want:
            report("error", node, f"blocked scale of shape {scale_dims} for weight {dims} with block {block} on axis "
                                  f"{axis}: expected {want} (the weight's rank, ceil(dim / block) on the blocked axis)")
        return
    if len(scale_dims) == 0 or (len(scale_dims) == 1 and scale_dims[0] == 1):
        return  # per tensor: anywhere
    if len(scale_dims) != 1:
        report("error", node, f"scale of shape {scale_dims} without block_size: TensorRT takes a scalar (per tensor) "
                              "or a 1-D scale (per axis, weights only)")
        return
    if weight is None:
        report("error", node, f"per-axis scale on {x!r}, which is not a constant: TensorRT quantizes activations per "
                              "tensor only (per-axis is for weights)")
        return
    axis = int(attrs.get("axis", 1)) % max(len(dims), 1)
    if axis >= len(dims) or scale_dims[0] != dims[axis]:
        report("error", node, f"per-axis scale of {scale_dims[0]} values for weight {dims} on axis {axis}: expected one "
                              f"per channel of that axis ({dims[axis] if axis < len(dims) else '?'})")
