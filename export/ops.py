"""The MoD custom ops: top-k selection, token gather, token scatter.

Each op exists three times, kept in step by the tests:

* a ``torch.library`` custom op (``gammamod::mod_select`` ...): what eager PyTorch runs and
  what ``torch.export`` sees as one opaque node with a shape function;
* an ONNX node of our domain (``gammamod::MoDSelect`` ...) carrying ``plugin_namespace`` and
  ``plugin_version`` attributes, so TensorRT's parser binds it to our plugin;
* an ONNX function body of standard ops attached to the model, so ONNX Runtime, or any other
  consumer, runs the graph unchanged.

Shapes depend only on input shapes and on two integer inputs, never on the scores: ``MoDSelect``
turns scores [B, T], each row's span start [B], the span length N and the kept count k into the
kept indices [B, T - N + k], ascending: the row's tokens before its span, the top-k of the span,
the tokens after it. N and k are 0-d int64 tensors that the graph computes from its INT32
shape-tensor inputs (``span_length``, ``capacity.<layer>``); for TensorRT they are the plugin's
shape inputs (node attribute ``tensorrt_plugin_shape_input_indices``), so its output shape is
an expression of B, T, N and k. N = 0 means no routing: every token is kept.
"""

from __future__ import annotations

import functools

import torch

DOMAIN = "gammamod"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "gammamod"
PLUGIN_VERSION = "1"
NODE_TYPES = ("MoDSelect", "MoDSelectThreshold", "MoDGather", "MoDScatter")
SHAPE_INPUTS = [2, 3]  # MoDSelect's span_length and capacity: TensorRT shape inputs


# --------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("gammamod::mod_select", mutates_args=())
def mod_select(scores: torch.Tensor, span_start: torch.Tensor, span_length: int, k: int) -> torch.Tensor:
    """Kept token indices [B, T - span_length + k], ascending, per row: the tokens before the row's
    span ``[span_start[b], span_start[b] + span_length)``, the k highest-scoring span tokens, the
    tokens after it.

    Equal scores rank the lower index first, as ONNX's TopK specifies (``torch.topk`` leaves the
    order of ties unspecified): a saturated TanhNorm gives many exactly equal weights, and every
    implementation (eager, ONNX function body, TensorRT plugin) must keep the same tokens."""
    b, t = scores.shape
    pos = torch.arange(t, device=scores.device)
    start = span_start[:, None]
    inside = (pos >= start) & (pos < start + span_length)
    key = scores.float().masked_fill(~inside, float("-inf"))
    top = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
    top = torch.sort(top, dim=-1).values  # [B, k] absolute positions, ascending
    j = torch.arange(t - span_length + k, device=scores.device)[None]
    from_top = torch.gather(torch.cat([top, top.new_zeros(b, 1)], 1), 1, (j - start).clamp(0, k))
    return torch.where(j < start, j, torch.where(j < start + k, from_top, j + span_length - k))


@mod_select.register_fake
def _(scores, span_start, span_length, k):
    b, t = scores.shape
    return scores.new_empty((b, t - span_length + k), dtype=torch.int64)


@torch.library.custom_op("gammamod::mod_select_threshold", mutates_args=())
def mod_select_threshold(scores: torch.Tensor, span_start: torch.Tensor, span_length: int, k: int,
                         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma-MoD's released inference in a static graph: :func:`mod_select`'s kept indices
    [B, T - span_length + k], reordered so that the tokens the layer really processes come first,
    ascending (the tokens outside the span, and the selected span tokens scoring above
    ``threshold``), then the selected span tokens at or below it, ascending; and per row the count
    of the first part [B]. The layer treats the rest as padding: skipped, no cache entry."""
    kept = mod_select(scores, span_start, span_length, k)
    start = span_start[:, None]
    inside = (kept >= start) & (kept < start + span_length)
    drop = inside & (torch.gather(scores, 1, kept).float() <= threshold)
    width = kept.shape[1]
    order = torch.argsort(drop.long() * width + torch.arange(width, device=kept.device), dim=1)
    return torch.gather(kept, 1, order), (~drop).sum(1)


@mod_select_threshold.register_fake
def _(scores, span_start, span_length, k, threshold):
    b, t = scores.shape
    return scores.new_empty((b, t - span_length + k), dtype=torch.int64), span_start.new_empty((b,))


@torch.library.custom_op("gammamod::mod_gather", mutates_args=())
def mod_gather(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x [B, T, H], kept [B, K] -> [B, K, H]."""
    return torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1]))


@mod_gather.register_fake
def _(x, kept):
    return x.new_empty((x.shape[0], kept.shape[1], x.shape[2]))


@torch.library.custom_op("gammamod::mod_scatter", mutates_args=())
def mod_scatter(x: torch.Tensor, kept: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, T, H] with rows ``kept`` [B, K] replaced by y [B, K, H]."""
    return x.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), y)


@mod_scatter.register_fake
def _(x, kept, y):
    return torch.empty_like(x)


# --------------------------------------------------------------------------------------------
# ONNX: schemas (so the exporter can emit our nodes), translations, function bodies

def register_schemas(schemas) -> None:
    """Declare node types to the onnx package; one an earlier import already declared stays."""
    from onnx import defs

    for schema in schemas:
        try:
            defs.register_schema(schema)
        except Exception:  # already registered in this process
            pass


@functools.cache
def register_onnx_schemas() -> None:
    """Declare our node types to the onnx package, once per process."""
    from onnx import defs

    fp, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    plugin = [attr("plugin_namespace", defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
              attr("plugin_version", defs.OpSchema.AttrType.STRING, "TensorRT plugin version")]
    shape_inputs = attr("tensorrt_plugin_shape_input_indices", defs.OpSchema.AttrType.INTS,
                        "node inputs TensorRT passes to the plugin as shape inputs (their values)")
    schemas = [
        defs.OpSchema("MoDSelect", DOMAIN, OPSET_VERSION, doc="Kept token indices of a MoD layer.",
                      inputs=[fp("scores", "T"), fp("span_start", "tensor(int64)"), fp("span_length", "tensor(int64)"),
                              fp("capacity", "tensor(int64)")],
                      outputs=[fp("kept", "tensor(int64)")], type_constraints=[("T", floats, "")],
                      attributes=plugin + [shape_inputs]),
        defs.OpSchema("MoDSelectThreshold", DOMAIN, OPSET_VERSION,
                      doc="Kept token indices of a MoD layer, those at or below a threshold last, and their count.",
                      inputs=[fp("scores", "T"), fp("span_start", "tensor(int64)"), fp("span_length", "tensor(int64)"),
                              fp("capacity", "tensor(int64)")],
                      outputs=[fp("kept", "tensor(int64)"), fp("kept_count", "tensor(int64)")],
                      type_constraints=[("T", floats, "")],
                      attributes=plugin + [shape_inputs,
                                           attr("threshold", defs.OpSchema.AttrType.FLOAT, "kept above this score")]),
        defs.OpSchema("MoDGather", DOMAIN, OPSET_VERSION, doc="Gather the kept tokens.",
                      inputs=[fp("x", "T"), fp("kept", "tensor(int64)")], outputs=[fp("y", "T")],
                      type_constraints=[("T", floats, "")], attributes=plugin),
        defs.OpSchema("MoDScatter", DOMAIN, OPSET_VERSION, doc="Write the processed tokens back.",
                      inputs=[fp("x", "T"), fp("kept", "tensor(int64)"), fp("y", "T")], outputs=[fp("out", "T")],
                      type_constraints=[("T", floats, "")], attributes=plugin),
    ]
    register_schemas(schemas)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: our ops -> our domain's nodes."""
    import onnxscript

    register_onnx_schemas()
    gm = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
    plugin = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}

    def select(scores, span_start, span_length, k):
        # span_length and k arrive as 0-d int64 values computed from the graph's shape inputs
        return gm.MoDSelect(scores, span_start, span_length, k, tensorrt_plugin_shape_input_indices=SHAPE_INPUTS,
                            **plugin)

    def select_threshold(scores, span_start, span_length, k, threshold: float):
        return gm.MoDSelectThreshold(scores, span_start, span_length, k, threshold=threshold,
                                     tensorrt_plugin_shape_input_indices=SHAPE_INPUTS, _outputs=2, **plugin)

    def gather(x, kept):
        return gm.MoDGather(x, kept, **plugin)

    def scatter(x, kept, y):
        return gm.MoDScatter(x, kept, y, **plugin)

    return {torch.ops.gammamod.mod_select.default: select,
            torch.ops.gammamod.mod_select_threshold.default: select_threshold,
            torch.ops.gammamod.mod_gather.default: gather, torch.ops.gammamod.mod_scatter.default: scatter}


def function_protos(opset: int) -> list:
    """ONNX function bodies of standard ops for our node types (what ONNX Runtime runs)."""
    import onnx
    import onnxscript
    from onnxscript import opset20 as op

    if opset < 20:
        raise ValueError(f"function bodies are written for opset 20, the graph has {opset}")
    gm = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)

    @onnxscript.script(gm, default_opset=op)
    def MoDSelect(scores, span_start, span_length, capacity):
        # A per-row span: the scores outside it are masked to -inf, so one TopK over the row picks
        # the span's top-k (ties: lower index first); a second puts them in sequence order. Output
        # position j is j before the span, the (j - start)-th kept span token inside, and
        # j + N - k after it.
        one_d = op.Constant(value_ints=[1])
        zero, step = op.Constant(value_int=0), op.Constant(value_int=1)
        t = op.Squeeze(op.Slice(op.Shape(scores), one_d, op.Constant(value_ints=[2])))
        pos = op.Unsqueeze(op.Range(zero, t, step), op.Constant(value_ints=[0]))  # [1, T]
        start = op.Unsqueeze(span_start, op.Constant(value_ints=[1]))  # [B, 1]
        end = op.Add(start, span_length)
        inside = op.And(op.GreaterOrEqual(pos, start), op.Less(pos, end))
        low = op.CastLike(op.Constant(value_float=float("-inf")), scores)
        key = op.Where(inside, scores, low)
        kk = op.Reshape(capacity, one_d)
        _, top = op.TopK(key, kk, axis=-1, largest=1, sorted=1)
        ordered, _ = op.TopK(top, kk, axis=-1, largest=0, sorted=1)  # [B, k] ascending positions
        padded = op.Concat(ordered, op.Slice(start, op.Constant(value_ints=[0]), one_d, one_d, one_d), axis=1)
        width = op.Add(op.Sub(t, span_length), capacity)
        j = op.Unsqueeze(op.Range(zero, width, step), op.Constant(value_ints=[0]))  # [1, K]
        inner = op.Clip(op.Sub(j, start), zero, capacity)
        from_top = op.GatherElements(padded, inner, axis=1)
        after = op.Sub(op.Add(j, span_length), capacity)
        return op.Where(op.Less(j, start), op.Expand(j, op.Shape(inner)),
                        op.Where(op.Less(j, op.Add(start, capacity)), from_top, after))

    @onnxscript.script(gm, default_opset=op)
    def MoDSelectThreshold(scores, span_start, span_length, capacity, threshold: float):
        # MoDSelect's kept indices, then a stable partition: processed tokens first (a key of j),
        # the selected span tokens at or below the threshold after them (a key of width + j)
        kept = gm.MoDSelect(scores, span_start, span_length, capacity)
        start = op.Unsqueeze(span_start, op.Constant(value_ints=[1]))
        inside = op.And(op.GreaterOrEqual(kept, start), op.Less(kept, op.Add(start, span_length)))
        low = op.LessOrEqual(op.Cast(op.GatherElements(scores, kept, axis=1), to=1), op.Constant(value_float=threshold))
        drop = op.And(inside, low)
        width = op.Reshape(op.Shape(kept, start=1, end=2), op.Constant(value_ints=[1]))
        j = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(width), op.Constant(value_int=1)),
                         op.Constant(value_ints=[0]))
        key = op.Add(op.Mul(op.Cast(drop, to=7), width), j)
        _, order = op.TopK(key, width, axis=-1, largest=0, sorted=1)
        count = op.ReduceSum(op.Cast(op.Not(drop), to=7), op.Constant(value_ints=[1]), keepdims=0)
        return op.GatherElements(kept, order, axis=1), count

    # Rows, not elements: GatherND/ScatterND index [B, K, ...] token rows, where the element-wise
    # GatherElements/ScatterElements would need an int64 index expanded to [B, K, H].
    @onnxscript.script(gm, default_opset=op)
    def MoDGather(x, kept):
        return op.GatherND(x, op.Unsqueeze(kept, op.Constant(value_ints=[-1])), batch_dims=1)

    @onnxscript.script(gm, default_opset=op)
    def MoDScatter(x, kept, y):
        shape = op.Shape(kept)  # [B, K]
        b = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
        rows = op.Range(op.Constant(value_int=0), op.Squeeze(b), op.Constant(value_int=1))
        rows = op.Expand(op.Unsqueeze(rows, op.Constant(value_ints=[1])), shape)  # [B, K]: the batch index
        index = op.Concat(op.Unsqueeze(rows, op.Constant(value_ints=[-1])),
                          op.Unsqueeze(kept, op.Constant(value_ints=[-1])), axis=-1)  # [B, K, 2]
        return op.ScatterND(x, index, y)

    protos = []
    for fn in (MoDSelect, MoDSelectThreshold, MoDGather, MoDScatter):
        proto = fn.to_function_proto()
        # declared so the node's plugin attributes are valid on the function; the body ignores them
        proto.attribute.extend(["plugin_namespace", "plugin_version"]
                               + (["tensorrt_plugin_shape_input_indices"] if fn in (MoDSelect, MoDSelectThreshold)
                                  else []))
        protos.append(proto)
    return protos


def attach_functions(model) -> None:
    """Add the function bodies for the node types a ``ModelProto`` uses (idempotent; the
    threshold selection's body calls MoDSelect's, so that one comes along)."""
    used = {n.op_type for n in _nodes(model.graph) if n.domain == DOMAIN}
    if "MoDSelectThreshold" in used:
        used.add("MoDSelect")
    have = {(f.domain, f.name) for f in model.functions}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for proto in function_protos(opset):
        if proto.name in used and (DOMAIN, proto.name) not in have:
            model.functions.append(proto)


def _nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == a.GRAPH:
                yield from _nodes(a.g)


def strip_functions(model) -> int:
    """Remove our function bodies (the copy TensorRT parses binds the nodes to the plugin)."""
    keep = [f for f in model.functions if f.domain != DOMAIN]
    removed = len(model.functions) - len(keep)
    del model.functions[:]
    model.functions.extend(keep)
    return removed
