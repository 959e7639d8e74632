"""Explicit Q/DQ for the decoder graphs: which MatMuls are quantized, and how.

Only the projections of the decoder layers are quantized (``self_attn.*_proj`` and
``mlp.*_proj``: the weights the export stores transposed, ``<name>.weight.T``, as MatMul's B).
Routers, norms, the MoD nodes, attention itself and ``lm_head`` (the logits) stay in full
precision: the routers decide which tokens a layer keeps, and a flipped near-tie there changes
the computation, not just its rounding.

The form is the one TensorRT and ONNX Runtime both take:

* ``int8``: weights per output channel (``DequantizeLinear`` axis 1 of the ``[K, N]`` weight,
  a 1-D fp32 scale of N), activations per tensor (``QuantizeLinear`` -> ``DequantizeLinear`` with a
  scalar fp32 scale), symmetric, every zero point 0. ONNX Runtime fuses each pattern into
  ``MatMulIntegerToFloat`` (fp32 scales: fp16 scales leave it unfused and slower than fp32).
* ``fp8``: the same with float8 e4m3fn (TensorRT on compute capability 8.9+).
* ``int4``: weight-only, blocked along K (``DequantizeLinear`` opset 21 with ``block_size``, fp32
  scales of shape ``[K / block, N]``, no zero point: 0); ONNX Runtime fuses it into ``MatMulNBits``.

The MoD layers of a gamma-MoD graph sit in ``If`` branches (the decode gate); the rewrite and the
calibration outputs reach into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gammamod.errors import GammamodError

# the decoder layers' projections; routers (".router"), norms and lm_head never match
QUANTIZED_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]*proj\.weight\.T$")
DEFAULT_DOMAINS = ("", "ai.onnx")
AMAX_PREFIX = "calib.amax."


@dataclass(frozen=True)
class Scheme:
    precision: str
    weight_type: int  # ONNX element type of the stored weights
    qmax: float  # symmetric range [-qmax, qmax]
    activations: bool  # per-tensor activation Q/DQ (int8, fp8) or weight-only (int4)
    min_opset: int
    scale_dtype: str = "float32"

    @property
    def weight_dtype(self) -> str:
        return {TensorProto.INT8: "int8", TensorProto.INT4: "int4",
                TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}[self.weight_type]


SCHEMES = {
    "int8": Scheme("int8", TensorProto.INT8, 127.0, True, 13),
    "fp8": Scheme("fp8", TensorProto.FLOAT8E4M3FN, 448.0, True, 19),
    "int4": Scheme("int4", TensorProto.INT4, 7.0, False, 21),
}
BLOCK_SIZES = (32, 128)


def is_quantized_matmul(node: onnx.NodeProto, weight_names: set[str]) -> bool:
    """A MatMul whose B is a quantizable projection weight (an initializer of ``weight_names``)."""
    return node.op_type == "MatMul" and node.domain in DEFAULT_DOMAINS and len(node.input) == 2 \
        and node.input[1] in weight_names and QUANTIZED_WEIGHT.match(node.input[1]) is not None


def _main_initializers(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


# -- calibration: expose each quantized activation's absolute maximum --------------------------


def with_amax_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs ``calib.amax.<activation>``: the largest |x| of every
    activation feeding a quantized MatMul, as a float scalar. Values inside If branches come out
    through the If (the branch that does not compute one gives 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = _main_initializers(out)
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"{AMAX_PREFIX}{stem}#{counter[0]}"

    def expose(graph: onnx.GraphProto) -> dict[str, str]:
        """key -> value name in ``graph`` holding that activation's amax."""
        found: dict[str, list[str]] = {}
        nodes = []
        for node in graph.node:
            nodes.append(node)
            if is_quantized_matmul(node, weights):
                key = node.input[0]
                if key not in found:
                    absval, amax = fresh(key + ".abs"), fresh(key)
                    nodes.append(helper.make_node("Abs", [key], [absval]))
                    nodes.append(helper.make_node("ReduceMax", [absval], [amax], keepdims=0))
                    found[key] = [amax]
            if node.op_type == "If":
                branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
                exposed = {name: expose(g) for name, g in branches.items()}
                keys = sorted(set().union(*[set(e) for e in exposed.values()]))
                for name, g in branches.items():
                    for key in keys:
                        value = exposed[name].get(key)
                        if value is None:  # this branch does not run the MatMul: contributes 0
                            value = fresh(key + ".none")
                            g.node.append(helper.make_node("Constant", [], [value], value=numpy_helper.from_array(
                                np.array(0.0, np.float32))))
                        g.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, []))
                for key in keys:
                    value = fresh(key + ".if")
                    node.output.append(value)
                    found.setdefault(key, []).append(value)
        merged = {}
        for key, values in found.items():
            if len(values) > 1:
                value = fresh(key + ".max")
                nodes.append(helper.make_node("Max", values, [value]))
                merged[key] = value
            else:
                merged[key] = values[0]
        copies = [onnx.NodeProto() for _ in nodes]  # detached: the originals go with the old list
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)
        return merged

    exposed = expose(out.graph)
    keys = sorted(exposed)
    for key in keys:
        name = AMAX_PREFIX + key
        out.graph.node.append(helper.make_node("Identity", [exposed[key]], [name]))
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
    return out, keys


# -- weights -------------------------------------------------------------------------------------


def quantize_weight(name: str, w: np.ndarray, scheme: Scheme, block_size: int) -> dict[str, onnx.TensorProto]:
    """The stored tensors of one ``[K, N]`` weight: ``<name>.quantized``, ``<name>.scale`` and
    (int8, fp8) ``<name>.zero_point``, all symmetric (zero points 0)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise GammamodError(f"weight {name}: expected a 2-D MatMul weight, got shape {list(w.shape)}")
    k, n = w.shape
    if scheme.precision == "int4":
        import ml_dtypes

        if n % 2:
            raise GammamodError(f"weight {name}: int4 needs an even last dimension, got {n}")
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), np.float32)
        padded[:k] = w
        amax = np.abs(padded.reshape(blocks, block_size, n)).max(axis=1)
        scale = np.where(amax > 0, amax / scheme.qmax, 1.0).astype(np.float32)  # [blocks, N]
        q = np.clip(np.rint(w / np.repeat(scale, block_size, axis=0)[:k]), -8, 7).astype(ml_dtypes.int4)
        return {f"{name}.quantized": numpy_helper.from_array(q, f"{name}.quantized"),
                f"{name}.scale": numpy_helper.from_array(scale, f"{name}.scale")}
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / scheme.qmax, 1.0).astype(np.float32)  # [N]: per output channel
    if scheme.precision == "int8":
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        zero = np.zeros(n, np.int8)
    else:
        import ml_dtypes

        q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
        zero = np.zeros(n, ml_dtypes.float8_e4m3fn)
    return {f"{name}.quantized": numpy_helper.from_array(q, f"{name}.quantized"),
            f"{name}.scale": numpy_helper.from_array(scale, f"{name}.scale"),
            f"{name}.zero_point": numpy_helper.from_array(zero, f"{name}.zero_point")}


# -- the rewrite ---------------------------------------------------------------------------------


def quantize_model(model: onnx.ModelProto, amax: dict[str, float], scheme: Scheme, block_size: int,
                   weight_tensors) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of ``model`` with explicit Q/DQ on its projection MatMuls. ``amax``: each
    activation's calibrated absolute maximum (int8, fp8); ``weight_tensors(name)``: the stored
    tensors of a weight (shared by every graph of the artifact). Returns the model and the names
    of the weight tensors it uses."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = _main_initializers(out)
    used: set[str] = set()
    act_inits: dict[str, onnx.TensorProto] = {}
    counter = [0, 0]  # names made, MatMuls quantized

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"{stem}#{counter[0]}"

    def rewrite(graph: onnx.GraphProto) -> None:
        """Q/DQ before each target MatMul of ``graph`` (once per value in this scope), and the same
        in its If branches."""
        scope: dict[tuple[str, str], str] = {}
        order = []
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rewrite(a.g)
            if is_quantized_matmul(node, names):
                counter[1] += 1
                weight, act = node.input[1], node.input[0]
                if ("w", weight) not in scope:
                    tensors = weight_tensors(weight)
                    used.update(tensors)
                    inputs = [f"{weight}.quantized", f"{weight}.scale"] + (
                        [f"{weight}.zero_point"] if f"{weight}.zero_point" in tensors else [])
                    attrs = {"axis": 0, "block_size": block_size} if scheme.precision == "int4" else {"axis": 1}
                    value = fresh(f"{weight}.dequantized")
                    order.append(helper.make_node("DequantizeLinear", inputs, [value], name=value, **attrs))
                    scope[("w", weight)] = value
                if scheme.activations and ("a", act) not in scope:
                    if act not in amax:
                        raise GammamodError(f"activation {act!r} was never reached by the calibration runs; use "
                                            "more or longer samples")
                    scale_name, zero_name = f"{act}.act_scale", f"{act}.act_zero_point"
                    if scale_name not in act_inits:
                        a = float(amax[act])
                        act_inits[scale_name] = numpy_helper.from_array(
                            np.array(a / scheme.qmax if a > 0 else 1.0, np.float32), scale_name)
                        act_inits[zero_name] = helper.make_tensor(zero_name, scheme.weight_type, [], [0])
                    q, dq = fresh(f"{act}.quantized"), fresh(f"{act}.dequantized")
                    order.append(helper.make_node("QuantizeLinear", [act, scale_name, zero_name], [q], name=q))
                    order.append(helper.make_node("DequantizeLinear", [q, scale_name, zero_name], [dq], name=dq))
                    scope[("a", act)] = dq
                if scheme.activations:
                    node.input[0] = scope[("a", act)]
                node.input[1] = scope[("w", weight)]
            order.append(node)
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)

    rewrite(out.graph)
    if not counter[1]:
        raise GammamodError("no decoder projection MatMul found to quantize (expected B inputs named "
                            "model.layers.<l>.(self_attn|mlp).<x>_proj.weight.T)")

    still_used = _names_used(out.graph)
    kept = [i for i in out.graph.initializer if i.name in still_used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.initializer.extend(act_inits.values())
    for opset in out.opset_import:
        if opset.domain in DEFAULT_DOMAINS and opset.version < scheme.min_opset:
            opset.version = scheme.min_opset
    return out, used


def _names_used(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _names_used(a.g)
    return used
