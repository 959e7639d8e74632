"""From a traced ONNX program to an artifact graph: weights by reference, MoD function bodies.

The model is traced on the meta device, so no weight is in memory. This module then:

1. names each weight initializer after its model parameter;
2. folds ``Transpose(weight)`` into the weight itself (stored transposed, ``<name>.T``): a
   runtime would otherwise transpose, and so copy, every weight at load;
3. folds constants and removes dead and duplicate nodes with the weights turned into graph
   inputs, so folding simplifies shape arithmetic but never touches (or copies) a weight;
4. points every weight at an external data file that several graphs share, written one tensor
   at a time by :class:`WeightsFile`;
5. attaches the ONNX function bodies of the MoD custom ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import ops

ALIGN = 4096  # page-aligned tensors can be memory-mapped by the runtime
ALIGN_LARGE = 65536


@dataclass(frozen=True)
class WeightSpec:
    """One initializer of an exported graph and where its bytes come from."""

    name: str  # initializer name in the graph
    source: str  # model parameter or buffer name
    transpose: bool  # stored as source.T
    shape: tuple
    dtype: ir.DataType


def prepare_graph(model: ir.Model, prefix: str) -> list[WeightSpec]:
    """Rename weights to their parameter names (dropping the wrapper's ``prefix``), fold weight
    transposes, and optimise the graph without touching the weights. Returns the weights used."""
    graph = model.graph
    sources: dict[str, str] = {}
    for value in list(graph.initializers.values()):
        name = value.name[len(prefix):] if value.name.startswith(prefix) else value.name
        sources[name] = name
        if name != value.name:
            graph.initializers.pop(value.name)
            value.name = name
            graph.register_initializer(value)
    transposed = _fold_weight_transposes(graph)
    specs = []
    for value in graph.initializers.values():
        source, t = transposed.get(value.name, (value.name, False))
        specs.append(WeightSpec(value.name, source, t, tuple(int(d) for d in value.shape), value.dtype))
    _optimize_around_weights(model)  # may add small folded constants: those are not weights
    used = {v.name for v in graph.initializers.values()}
    return [s for s in specs if s.name in used]


def _fold_weight_transposes(graph: ir.Graph) -> dict[str, tuple[str, bool]]:
    """Replace ``Transpose(W)`` (2-D weights) by an initializer ``W.T`` holding the transposed layout."""
    out: dict[str, tuple[str, bool]] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.name not in graph.initializers or len(src.shape) != 2:
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        name = f"{src.name}.T"
        if name not in graph.initializers:
            t = ir.Value(name=name, shape=ir.Shape([src.shape[1], src.shape[0]]), type=src.type)
            t.const_value = src.const_value  # placeholder; bound to the file later
            graph.register_initializer(t)
            out[name] = (src.name, True)
        node.outputs[0].replace_all_uses_with(graph.initializers[name])
        graph.remove(node, safe=True)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return out


def _optimize_around_weights(model: ir.Model) -> None:
    """Constant folding, dead-node removal and common-subexpression elimination: nearly all the
    simplification of onnxscript's full optimizer at a tenth of its time (its rewrite rules add
    ~10 s a graph for a 32-layer model and remove a few percent more nodes)."""
    from onnxscript.optimizer import _constant_folding

    graph = model.graph
    weights = list(graph.initializers.values())
    values = {v.name: v.const_value for v in weights}
    for v in weights:
        graph.initializers.pop(v.name)
        v.const_value = None  # an input with no value: nothing can fold it
        graph.inputs.append(v)
    _constant_folding.fold_constants(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.ClearMetadataAndDocStringPass()(model)  # torch's per-node stack traces: 90% of the file
    for v in weights:
        graph.inputs.remove(v)
        v.const_value = values[v.name]
        if v.uses() or v.is_graph_output():
            graph.register_initializer(v)


class WeightsFile:
    """An external-data file written sequentially, one aligned tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.placements: dict[str, tuple[int, int]] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array)
        align = ALIGN_LARGE if data.nbytes >= (1 << 20) else ALIGN
        pos = self._f.tell()
        pad = (-pos) % align
        if pad:
            self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(memoryview(data).cast("B"))
        self.placements[name] = (offset, data.nbytes)

    def close(self) -> None:
        self._f.close()


def bind_weights(model: ir.Model, file: Path, placements: dict[str, tuple[int, int]]) -> None:
    """Point every weight of ``model`` at its bytes in ``file`` (same directory). Constants the
    optimizer folded (small shape and index tables) stay inside the graph."""
    for value in model.graph.initializers.values():
        if value.name not in placements:
            continue
        offset, length = placements[value.name]
        value.const_value = ir.ExternalTensor(
            os.path.basename(file), offset, length, value.dtype, shape=value.shape, name=value.name,
            base_dir=str(Path(file).parent))


def to_proto(model: ir.Model, doc: str) -> onnx.ModelProto:
    """Serialise (weights stay external) and attach the MoD ops' function bodies."""
    proto = ir.serde.serialize_model(model)
    proto.doc_string = doc
    proto.producer_name = "gammamod"
    ops.attach_functions(proto)
    if ops.DOMAIN not in {o.domain for o in proto.opset_import} and proto.functions:
        proto.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    return proto


def io_spec(model: onnx.ModelProto, roles: dict[str, str] | None = None) -> dict:
    """Inputs and outputs of a graph for the manifest: name, role, dtype, shape (str for symbols)."""

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "role": (roles or {}).get(v.name, v.name),
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [describe(v) for v in model.graph.input if v.name not in inits],
            "outputs": [describe(v) for v in model.graph.output]}
