"""The ONNX copies TensorRT parses, next to the ONNX Runtime graphs of an artifact.

Per TensorRT version, in one of two forms (``--mod-ops``):

* ``plugin``: the MoD nodes stay, bound to our plugin library by their attributes; their function
  bodies are stripped (the safe rule: from 10.0 to 10.6 a local function named like the plugin
  is used instead of it, and a plugin-bound copy needs none), and the selection nodes get their
  span values as execution inputs too (:func:`pass_span_values`);
* ``native``: the function bodies are inlined, so TensorRT's own TopK / GatherND / ScatterND run
  and no plugin library is needed (TopK's K < 3840): the fallback that builds anywhere.

The IR version is lowered to what that version's parser reads and the copy is linted. The copies
share the artifact's weights file: no weight is written twice.
"""

from __future__ import annotations

import onnx
import onnx.inliner

from gammamod.errors import GammamodError

from .lint import lint_graph
from .targets import target


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of ``graph`` and of its subgraphs (If branches)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == a.GRAPH:
                yield from _all_nodes(a.g)


SELECT_NODES = ("MoDSelect", "MoDSelectThreshold")


def pass_span_values(model: onnx.ModelProto, domain: str = "gammamod") -> int:
    """Give every selection node its span length and kept count (inputs 2 and 3, TensorRT shape
    inputs) a second time, as inputs 4 and 5: TensorRT hands a plugin's shape inputs to
    getOutputShapes only, never to enqueue, and the kernel needs N and k, not just T - N + k.
    The same tensor may be both a shape and an execution tensor. Returns the nodes changed."""
    changed = 0
    for node in _all_nodes(model.graph):
        if node.domain == domain and node.op_type in SELECT_NODES and len(node.input) == 4:
            node.input.extend([node.input[2], node.input[3]])
            changed += 1
    return changed


def tensorrt_copy(model: onnx.ModelProto, version: str, mod_ops: str = "plugin",
                  domain: str = "gammamod") -> onnx.ModelProto:
    """The copy TensorRT ``version`` parses; ``domain`` is our nodes' (the manifest's
    ``tensorrt.plugin.domain``). Reads no torch: the engines stage runs where the runtime does."""
    tgt = target(version)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if mod_ops == "native":
        ours = [(f.domain, f.name) for f in copy.functions if f.domain == domain]
        inlined = onnx.inliner.inline_selected_functions(copy, ours)
        copy = onnx.ModelProto()
        copy.CopyFrom(inlined)
        left = [n.op_type for n in _all_nodes(copy.graph) if n.domain == domain]
        if left:
            raise GammamodError(f"--mod-ops native: {left[0]} nodes have no function body to inline (the graph was "
                                "written without them)")
        del copy.opset_import[:]
        copy.opset_import.extend(o for o in inlined.opset_import if o.domain != domain)
    elif mod_ops == "plugin":
        pass_span_values(copy, domain)
    else:
        raise GammamodError(f"--mod-ops {mod_ops!r}: expected plugin or native")
    keep = [f for f in copy.functions if f.domain != domain]  # our bodies would shadow the plugin
    del copy.functions[:]
    copy.functions.extend(keep)
    if copy.ir_version > tgt.max_ir_version:
        copy.ir_version = tgt.max_ir_version  # our graphs use no feature of later IR versions
    return copy


def copy_name(graph_file: str, version: str, mod_ops: str = "plugin") -> str:
    return graph_file.replace(".onnx", f".trt{version}{'.native' if mod_ops == 'native' else ''}.onnx")


def checked_copy(manifest, kind: str, version: str, mod_ops: str = "plugin") -> onnx.ModelProto:
    """The copy of graph ``kind`` TensorRT ``version`` parses (weights stay external); fails on
    lint errors."""
    graph = manifest.graph(kind)
    model = onnx.load(str(manifest.path(graph["file"])), load_external_data=False)
    copy = tensorrt_copy(model, version, mod_ops, manifest["tensorrt"]["plugin"]["domain"])
    name = copy_name(graph["file"], version, mod_ops)
    errors = [f for f in lint_graph(copy, target(version), name) if f.severity == "error"]
    if errors:
        raise GammamodError(f"the {kind} graph would not parse with TensorRT {version}: {errors[0]} "
                            f"({len(errors)} errors in all; run 'gammamod check-onnx')")
    return copy


def write_tensorrt_copies(manifest, versions) -> None:
    """Write ``<graph>.trt<version>.onnx`` for each version into the manifest's directory and
    record them under ``tensorrt.targets``; fail on lint errors."""
    for version in versions:
        entry = {}
        for kind, graph in manifest["graphs"].items():
            if graph.get("backend") == "ort":
                continue  # ONNX Runtime's own variant: TensorRT builds from the portable graphs
            name = copy_name(graph["file"], version)
            onnx.save(checked_copy(manifest, kind, version), str(manifest.path(name)))
            entry[kind] = name
        entry["notes"] = target(version).notes
        manifest.data["tensorrt"]["targets"][version] = entry
