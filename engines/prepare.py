"""The ONNX copies TensorRT parses, next to the ONNX Runtime graphs of an artifact.

Per TensorRT version: the MoD ops' function bodies are stripped (the safe rule: from 10.0 to
10.6 a local function named like the plugin is used instead of it, and a plugin-bound copy
needs none), the selection nodes get their span values as execution inputs too (below), the
IR version is lowered to what that version's parser reads, and the copy is linted. The copies
share the artifact's weights file: no weight is written twice.
"""

from __future__ import annotations

import onnx

from gammamod.errors import GammamodError
from gammamod.export import ops

from .lint import lint_graph
from .targets import target


SELECT_NODES = ("MoDSelect", "MoDSelectThreshold")


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def pass_span_values(model: onnx.ModelProto) -> int:
    """Give every selection node its span length and kept count (inputs 2 and 3, TensorRT shape
    inputs) a second time, as inputs 4 and 5: TensorRT hands a plugin's shape inputs to
    getOutputShapes only, never to enqueue, and the kernel needs N and k, not just T - N + k.
    The same tensor may be both a shape and an execution tensor. Returns the nodes changed."""
    changed = 0
    for node in _nodes(model.graph):
        if node.domain == ops.DOMAIN and node.op_type in SELECT_NODES and len(node.input) == 4:
            node.input.extend([node.input[2], node.input[3]])
            changed += 1
    return changed


def tensorrt_copy(model: onnx.ModelProto, version: str) -> onnx.ModelProto:
    tgt = target(version)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ops.strip_functions(copy)
    pass_span_values(copy)
    if copy.ir_version > tgt.max_ir_version:
        copy.ir_version = tgt.max_ir_version  # our graphs use no feature of later IR versions
    return copy


def write_tensorrt_copies(manifest, versions) -> None:
    """Write ``<graph>.trt<version>.onnx`` for each version into the manifest's directory and
    record them under ``tensorrt.targets``; fail on lint errors."""
    for version in versions:
        tgt = target(version)
        entry = {}
        for kind, graph in manifest["graphs"].items():
            if graph.get("backend") == "ort":
                continue  # ONNX Runtime's own variant: TensorRT builds from the portable graphs
            model = onnx.load(str(manifest.path(graph["file"])), load_external_data=False)
            copy = tensorrt_copy(model, version)
            name = graph["file"].replace(".onnx", f".trt{version}.onnx")
            errors = [f for f in lint_graph(copy, tgt, name) if f.severity == "error"]
            if errors:
                raise GammamodError(f"the {kind} graph would not parse with TensorRT {version}: {errors[0]} "
                                    f"({len(errors)} errors in all; run 'gammamod check-onnx')")
            onnx.save(copy, str(manifest.path(name)))
            entry[kind] = name
        entry["notes"] = tgt.notes
        manifest.data["tensorrt"]["targets"][version] = entry
