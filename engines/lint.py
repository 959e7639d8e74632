"""``gammamod check-onnx``: what a TensorRT version's ONNX parser would reject, read statically.

No TensorRT is needed: the graph is read with the ``onnx`` package and checked against
:mod:`gammamod.engines.targets`. Errors are what would stop the parse (or, for data-dependent
shapes, what static-capacity deployment must not contain); warnings are what parses but deserves
a look. Explicit quantization (Q/DQ) is checked against TensorRT's rules in :mod:`.qdq_rules`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gammamod.errors import GammamodError

from .qdq_rules import QDQ_OPS, check_qdq, uses_blocked_or_int4
from .targets import DATA_DEPENDENT_OPS, SUPPORTED_OPS, SUPPORTED_TYPES, TOPK_MAX_K, Target, target

DEFAULT_DOMAINS = ("", "ai.onnx")

# For these ops, the listed inputs decide an output shape: they must come from constants or from
# shapes (Shape/Size and arithmetic on them), never from data.
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Range": (0, 1, 2), "Slice": (1, 2, 3, 4), "Tile": (1,),
                "ConstantOfShape": (0,), "TopK": (1,), "Pad": (1,), "Split": (1,), "OneHot": (1,),
                "Resize": (2, 3), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,),
                "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,)}
# Ops that keep a value static when all their inputs are static (shape arithmetic).
_STATIC_PRESERVING = {"Add", "Sub", "Mul", "Div", "Mod", "Concat", "Gather", "Slice", "Squeeze", "Unsqueeze",
                      "Cast", "CastLike", "Reshape", "Identity", "Max", "Min", "Neg", "Abs", "Equal", "Where",
                      "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Range", "Expand",
                      "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Floor", "Ceil", "Sqrt", "Clip", "Tile",
                      "ConstantOfShape"}


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning
    where: str  # file, and node when there is one
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def _constant_values(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = a.t
                elif a.name in ("value_int", "value_ints"):
                    values[node.output[0]] = numpy_helper.from_array(
                        np.array(onnx.helper.get_attribute_value(a), dtype=np.int64))
    return values


def shape_tensor_inputs(graph: onnx.GraphProto) -> set[str]:
    """Graph inputs TensorRT takes as shape tensors: INT32/INT64, 0-D or 1-D of a fixed size (at most
    64 values): their values are given per optimization profile, so what they decide is static."""
    out = set()
    for i in graph.input:
        t = i.type.tensor_type
        dims = list(t.shape.dim)
        if t.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64) and len(dims) <= 1 and \
                all(d.HasField("dim_value") and d.dim_value <= 64 for d in dims):
            out.add(i.name)
    return out


def _static_values(graph: onnx.GraphProto, inputs_static: bool = False, outer: set[str] = frozenset()) -> set[str]:
    """Names whose values are known without running the graph's data path (constants, shapes,
    shape-tensor inputs, and values computed from them)."""
    static = {init.name for init in graph.initializer} | set(outer) | shape_tensor_inputs(graph)
    if inputs_static:
        static |= {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type == "Constant" or node.op_type in ("Shape", "Size"):
            static.update(node.output)
        elif node.op_type in _STATIC_PRESERVING and all((not i) or i in static for i in node.input):
            static.update(node.output)
    return static


def lint_graph(model: onnx.ModelProto, tgt: Target, where: str) -> list[Finding]:
    out: list[Finding] = []

    def report(severity, node, message):
        name = f"{where} [{node.op_type} '{node.name}']" if node is not None else where
        out.append(Finding(severity, name, message))

    functions = {(f.domain, f.name): f for f in model.functions}

    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset == 21 and tgt.max_opset == 20 and uses_blocked_or_int4(model.graph):
        # INT4 weight-only needs opset 21 (INT4, block_size); TensorRT takes it from 10.0 on
        # (shared/spec/tensorrt-plugins.md); every other op is still checked against its table
        report("warning", None, f"opset 21 (for INT4 blocked DequantizeLinear) is above the {tgt.max_opset} TensorRT "
                                f"{tgt.name}'s parser lists; TensorRT reads INT4 weight-only Q/DQ from 10.0 on")
    elif opset is None or opset > tgt.max_opset:
        report("error", None, f"opset {opset} is above TensorRT {tgt.name}'s maximum ({tgt.max_opset})")
    if model.ir_version > tgt.max_ir_version:
        report("error", None, f"IR version {model.ir_version} is above what TensorRT {tgt.name}'s parser reads "
                              f"({tgt.max_ir_version}); 'gammamod export --for-tensorrt {tgt.name}' writes a copy it reads")
    graph = model.graph
    for t in list(graph.input) + list(graph.output):
        elem = t.type.tensor_type.elem_type
        if elem and elem not in SUPPORTED_TYPES:
            kind = "warning" if elem == onnx.TensorProto.DOUBLE else "error"
            report(kind, None, f"tensor {t.name!r} has type {onnx.TensorProto.DataType.Name(elem)}, which TensorRT "
                               f"{'casts down to FLOAT' if kind == 'warning' else 'does not support'}")
    _lint_nodes(graph, tgt, functions, report, frozenset(), {})
    return out


def _lint_nodes(graph: onnx.GraphProto, tgt: Target, functions: dict, report, outer: frozenset,
                outer_consts: dict) -> None:
    """Lint a graph's nodes, and the branches of its If nodes (which see the outer static values
    and constants)."""
    consts = {**outer_consts, **_constant_values(graph)}
    static = _static_values(graph, outer=outer)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _lint_nodes(a.g, tgt, functions, report, frozenset(static), consts)
        if node.op_type in QDQ_OPS and node.domain in DEFAULT_DOMAINS:
            check_qdq(node, consts, tgt.name, report)
        custom = node.domain not in DEFAULT_DOMAINS
        if custom:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if "plugin_namespace" not in attrs and not tgt.namespace_from_domain:
                report("error", node, f"custom op {node.domain}::{node.op_type} has no plugin_namespace attribute: "
                                      f"TensorRT {tgt.name} cannot bind it to a plugin")
            elif "plugin_namespace" not in attrs:
                report("warning", node, f"custom op {node.domain}::{node.op_type} has no plugin_namespace; "
                                        "TensorRT takes the namespace from the domain")
            for idx in attrs.get("tensorrt_plugin_shape_input_indices", []):
                if idx < len(node.input) and node.input[idx] and node.input[idx] not in static:
                    report("error", node, f"input {idx} ({node.input[idx]!r}) is a plugin shape input but is computed "
                                          "from data: a data-dependent shape")
            if (node.domain, node.op_type) in functions:
                if tgt.function_shadows_plugin:
                    report("error", node, f"the model carries a function body for {node.op_type}: TensorRT "
                                          f"{tgt.name} would inline it instead of using the plugin (strip it: "
                                          f"'gammamod export --for-tensorrt {tgt.name}')")
                else:
                    report("warning", node, f"function body for {node.op_type} present; TensorRT {tgt.name} uses "
                                            "the plugin, the body is dead weight")
            continue
        if node.op_type not in SUPPORTED_OPS:
            report("error", node, f"{node.op_type} is not supported by TensorRT {tgt.name}'s ONNX parser")
            continue
        if node.op_type in DATA_DEPENDENT_OPS:
            report("error", node, f"{node.op_type} has a data-dependent output shape (TensorRT needs an output "
                                  "allocator and runs it slowly); static-capacity graphs must not contain it")
        if node.op_type == "TopK":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sorted", 1) != 1:
                report("error", node, "TopK with sorted=0 is not supported (sorted must be 1)")
            k_name = node.input[1] if len(node.input) > 1 else ""
            if k_name in consts:
                k = int(numpy_helper.to_array(consts[k_name]).reshape(-1)[0])
                if k >= TOPK_MAX_K:
                    report("error", node, f"TopK K={k}: TensorRT needs K < {TOPK_MAX_K}")
            elif k_name in static:
                report("warning", node, f"TopK K comes from shape inputs: TensorRT needs it below {TOPK_MAX_K} "
                                        "in every optimization profile")
            else:
                report("error", node, "TopK K is computed from data: the kept count must be static "
                                      f"(a constant or from shape inputs, and below {TOPK_MAX_K} for TensorRT)")
        for idx in SHAPE_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in static:
                report("error", node, f"input {idx} ({node.input[idx]!r}) decides an output shape and is computed "
                                      "from data: a data-dependent shape")


def lint_model_file(path: str | os.PathLike, version: str) -> list[Finding]:
    path = Path(path)
    if not path.is_file():
        raise GammamodError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise GammamodError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    return lint_graph(model, target(version), path.name)


def lint_artifact(root: str | os.PathLike, version: str) -> tuple[list[Finding], list[str]]:
    """Lint what TensorRT ``version`` would parse from an artifact: its prepared copies for that
    version when the export wrote them, else the ONNX Runtime graphs. Returns findings and the
    files checked."""
    from gammamod.manifest import read_manifest

    manifest = read_manifest(root)
    tgt = target(version)
    copies = (manifest.get("tensorrt") or {}).get("targets", {}).get(version)
    findings: list[Finding] = []
    if copies:
        files = [copies[k] for k in ("vision", "decoder") if k in copies]
    else:
        files = [g["file"] for k, g in manifest["graphs"].items() if g.get("backend") != "ort"]
        findings.append(Finding("warning", str(manifest.root), f"no copy prepared for TensorRT {version}: checking the "
                                f"ONNX Runtime graphs (re-export with --for-tensorrt {version})"))
    for name in files:
        model = onnx.load(str(manifest.path(name)), load_external_data=False)
        findings += lint_graph(model, tgt, name)
    return findings, files
