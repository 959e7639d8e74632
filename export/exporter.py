"""``gammamod export``: a checkpoint -> an artifact directory (ONNX graphs, weights, manifest).

The model is traced on the meta device and the weights are streamed from the checkpoint into
the artifact one tensor at a time, converted to the export dtype on the way: exporting a model
never holds its weights in memory twice (or even once). The artifact appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gammamod import __version__
from gammamod.errors import GammamodError
from gammamod.lifecycle import OutputDir, check_replaceable, is_artifact
from gammamod.manifest import SCHEMA, SCHEMA_VERSION, Manifest, describe_files, now

from . import ops
from .checkpoint import Checkpoint, open_checkpoint
from .fusion import fuse_projections, fused_tensor
from .graphs import DecoderGraph, VisionGraph, rope_tables, vision_extra_weights
from .onnx_graph import WeightsFile, bind_weights, io_spec, prepare_graph, to_proto

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
DECODER_GRAPHS = ("decoder", "decoder_ort", "decode_ort")
NEWLINE_FILE = "image_newline.npy"
GRAPH_FILES = {"vision": "vision.onnx", "decoder": "decoder.onnx", "decoder_ort": "decoder.ort.onnx",
               "decode_ort": "decode.ort.onnx"}


@dataclass
class ExportOptions:
    routing: str = "static"  # static | dense
    dtype: str = "fp32"
    skip_ratio: float | None = None
    # per-layer overrides {layer: {"fraction": "0.3"} | {"count": 100}} (read_capacity_file), and the
    # span length absolute counts hold for
    capacity: dict[int, dict] | None = None
    capacity_span: int | None = None
    span_lengths: list[int] | None = None  # the routed span lengths to support (TensorRT profiles)
    max_batch: int = 8
    max_seq: int | None = None
    vision_tower: str | None = None
    vision_tower_slow: str | None = None  # LLaVA-HR: timm/open_clip ConvNeXt weights
    force: bool = False
    tensorrt: list[str] = field(default_factory=list)
    ort_fused: bool = True  # also write decoder.ort.onnx and decode.ort.onnx (ONNX Runtime's fused attention)


class _Stages:
    """Adapter for an optional progress reporter: ``stage(name, total)`` -> ``advance()``."""

    def __init__(self, progress):
        self.progress = progress

    def __call__(self, name: str, total: int | None = None):
        if self.progress is None:
            return lambda n=1: None
        return self.progress.stage(name, total)


def read_capacity_file(path: str | Path) -> tuple[dict[int, dict], int | None]:
    """``--capacity FILE``: a JSON object {"<MoD layer>": value}, where a decimal number in (0, 1] is
    a fraction of the routed span (k = ceil(r * N), exact in decimal) and an integer an absolute
    kept count, valid for the one span length the file names under "span_length". Calibration's
    file (``gammamod calib capacity``) keeps that map under "capacity". Returns the overrides
    ({layer: {"fraction": "0.3"} | {"count": 100}}) and that span length."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_float=str)  # decimals kept as the user wrote them
    except FileNotFoundError:
        raise GammamodError(f"{path}: no such capacity file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GammamodError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GammamodError(f"{path}: expected a JSON object mapping MoD layer index to a kept fraction or count")
    span = data.pop("span_length", None)
    if data.get("format") == "gammamod-capacity" and "capacity" not in data:
        raise GammamodError(f"{path}: a {data.get('recipe')} capacity report holds no capacity (its kept counts are "
                            "fixed by training; the report is for information)")
    if "capacity" in data:  # calibration's report: the map sits under "capacity"
        data = data["capacity"]
        if not isinstance(data, dict):
            raise GammamodError(f"{path}: 'capacity' must map MoD layer index to a kept fraction")
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 1):
        raise GammamodError(f"{path}: span_length {span!r}: expected a positive integer")
    out = {}
    for k, v in data.items():
        if not str(k).isdigit():
            raise GammamodError(f"{path}: key {k!r}: expected a MoD layer index (or span_length)")
        if isinstance(v, str):  # a decimal number
            from fractions import Fraction

            try:
                r = Fraction(v)
            except (ValueError, ZeroDivisionError):
                raise GammamodError(f"{path}: layer {k}: {v!r}: expected a fraction of the span in (0, 1] or an "
                                    "integer count") from None
            if not 0 < r <= 1:
                raise GammamodError(f"{path}: layer {k}: fraction {v} is not in (0, 1]")
            out[int(k)] = {"fraction": v}
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            if span is None:
                raise GammamodError(f"{path}: layer {k}: an absolute count ({v}) holds for one span length; name it "
                                    "with \"span_length\": N, or give a fraction of the span (e.g. 0.5)")
            if v > span:
                raise GammamodError(f"{path}: layer {k}: count {v} is larger than the span ({span})")
            out[int(k)] = {"count": v}
        else:
            raise GammamodError(f"{path}: layer {k}: {v!r}: expected a fraction of the span in (0, 1] or an integer "
                                "count")
    return out, (span if any("count" in o for o in out.values()) else None)


def _tokenizer(ckpt: Checkpoint):
    from gammamod.runtime.tokenizer import Tokenizer

    d = ckpt.info.path
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        return None
    return Tokenizer.from_dir(d)


def default_span_lengths(ckpt: Checkpoint, tokenizer) -> list[int]:
    """The routed spans of the default prompt (the vicuna_v1 template, one image): p-MoD's image
    tokens, gamma-MoD's system prompt and image. Anyres images take a number of tokens that depends
    on their size: one span per grid, for an image of the grid's exact shape (its largest). None
    without tokenizer or vision tower."""
    from gammamod.runtime.prompt import IMAGE_TOKEN_INDEX, VICUNA_V1, routable_span, tokenize_with_image

    if tokenizer is None or ckpt.vision is None or not ckpt.vision.has_tower:
        return []
    ids = tokenize_with_image(tokenizer, VICUNA_V1.prompt(""))
    return [routable_span(ckpt.recipe.span, [(ids.index(IMAGE_TOKEN_INDEX), n)])[1]
            for n in _image_token_counts(ckpt.vision)]


def _image_token_counts(vision) -> list[int]:
    """One image's token counts: fixed, or with anyres the largest of each grid."""
    return vision.anyres.token_range() if vision.anyres is not None else [vision.image_tokens]


def vision_rows(ckpt: Checkpoint, opts: ExportOptions) -> int:
    """The most tower inputs one vision call takes (TensorRT's profile): a row per image, or with
    anyres the base tile and the largest grid's tiles of each of --max-batch images."""
    anyres = ckpt.vision.anyres
    per_image = max(anyres.rows(p) for p in anyres.pinpoints) if anyres is not None else 1
    return opts.max_batch * per_image


def default_prompt_lengths(ckpt: Checkpoint, tokenizer) -> list[int]:
    """The default prompt's lengths with an empty question (the vicuna_v1 template and one image,
    anyres: one per grid as above): what threshold routing routes whole, at least."""
    from gammamod.runtime.prompt import VICUNA_V1, tokenize_with_image

    if tokenizer is None or ckpt.vision is None or not ckpt.vision.has_tower:
        return []
    ids = tokenize_with_image(tokenizer, VICUNA_V1.prompt(""))
    return [len(ids) - 1 + n for n in _image_token_counts(ckpt.vision)]


def _quiet():
    """torch.onnx prints its progress and warns about internals: keep the user's terminal clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _trace(module, args, dynamic_shapes, input_names, output_names):
    import logging

    from . import gates, ortops

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with _quiet():
        program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False,
                                    custom_translation_table={**ops.translation_table(),
                                                              **ortops.translation_table(),
                                                              **gates.translation_table()},
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names)
    return program.model


def _trace_vision(model, ckpt: Checkpoint, opts: ExportOptions):
    dtype = next(model.parameters()).dtype
    size = ckpt.vision.input_size
    images = torch.export.Dim("images", min=1, max=max(2, vision_rows(ckpt, opts)))
    return _trace(VisionGraph(model), (torch.zeros(2, 3, size, size, dtype=dtype, device="meta"),),
                  ({0: images},), ["pixel_values"], ["image_features"])


def _trace_decoder(model, ckpt: Checkpoint, opts: ExportOptions, max_seq: int, kv: str = "portable",
                   decode_step: bool = False):
    """decoder.onnx (``kv="portable"``), decoder.ort.onnx (``kv="ort"``) or decode.ort.onnx
    (``decode_step``). The span length and kept counts are traced as the sizes of placeholder
    inputs, then become INT32 shape-tensor inputs (:func:`shape_inputs_from_sizes`); gamma-MoD's
    gated layers become If nodes (:func:`gates.wrap_gates`)."""
    from .gates import wrap_gates

    cfg, dtype, Dim = ckpt.config, next(model.parameters()).dtype, torch.export.Dim
    graph = DecoderGraph(model, opts.routing, list(ckpt.recipe.mod_layers) if ckpt.recipe.is_mod else [], kv=kv,
                         max_seq=max_seq, decode_step=decode_step)
    batch = Dim("batch", min=1, max=opts.max_batch)
    lengths = torch.zeros(2, dtype=torch.long, device="meta")
    t = 1 if decode_step else 60  # example sizes: distinct, so no two symbols are taken for one
    args = [torch.zeros(2, t, cfg.hidden_size, dtype=dtype, device="meta"), lengths, lengths.clone()]
    dims: list = [{0: batch} if decode_step else {0: batch, 1: Dim("chunk", min=1, max=max_seq)}, {0: batch},
                  {0: batch}]
    sizes = []
    if graph.routed:
        args += [lengths.clone(), torch.zeros(50, device="meta")]
        dims += [{0: batch}, {0: Dim("span", min=0, max=max_seq)}]
        sizes.append("span_length")
        for i, layer in enumerate(graph.mod_layers):  # kept widths T - N + k: 60 - 50 + (2 + i)
            args.append(torch.zeros(12 + i, device="meta"))
            dims.append({0: Dim(f"kept_{layer}", min=1, max=max_seq)})
            sizes.append(f"capacity.{layer}")
    capacity = Dim("kv_capacity", min=2, max=max_seq) if kv == "ort" else None
    cache = []
    for i in range(cfg.num_layers):
        entries = 64 if kv == "ort" else 3
        c = capacity if kv == "ort" else Dim(f"cache_{i}", min=0, max=max_seq)  # each layer its own length
        keys = torch.zeros(2, cfg.num_kv_heads, entries, cfg.head_dim, dtype=dtype, device="meta")
        args += [keys, keys.clone(), lengths.clone()]
        cache += [{0: batch, 2: c}, {0: batch, 2: c}, {0: batch}]
    # forward(inputs_embeds, seq_lengths, past_length, *rest): the shapes follow that structure
    traced = _trace(graph, tuple(args), (*dims[:3], tuple(dims[3:]) + tuple(cache)), graph.input_names(),
                    graph.output_names())
    shape_inputs_from_sizes(traced, sizes)
    wrap_gates(traced)
    return traced


def shape_inputs_from_sizes(model, names: list[str]) -> None:
    """Each named graph input was traced as a placeholder whose size carries the value (for
    ``capacity.<l>``: the layer's kept width T - N + k); the graph reads it only through ``Shape``.
    Replace it with an INT32 [1] input holding the value (a TensorRT shape tensor; INT32 as
    TensorRT 10.3's profiles and trtexec take them) and the Shape nodes with what they stood for,
    computed from the inputs."""
    import onnx_ir as ir

    graph = model.graph

    def whole_shape(node) -> bool:
        start, end = node.attributes.get("start"), node.attributes.get("end")
        return (node.op_type == "Shape" and node.graph is graph and (start is None or start.as_int() == 0)
                and (end is None or end.as_int() >= 1))

    inputs = {v.name: v for v in graph.inputs}
    new_nodes, values = [], {}
    for name in names:
        new = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT32))
        cast = ir.node("Cast", [new], {"to": ir.DataType.INT64}, name=f"{name}_value")
        new_nodes.append(cast)
        values[name] = (new, cast.outputs[0])
    if any(n.startswith("capacity.") for n in names):
        chunk = ir.node("Shape", [inputs["inputs_embeds"]], {"start": 1, "end": 2}, name="chunk_length")
        removed = ir.node("Sub", [chunk.outputs[0], values["span_length"][1]], name="chunk_minus_span")
        new_nodes += [chunk, removed]
        for name in names:
            if name.startswith("capacity."):
                width = ir.node("Add", [removed.outputs[0], values[name][1]], name=f"{name}_width")
                new_nodes.append(width)
                values[name] = (values[name][0], width.outputs[0])
    graph.insert_before(next(iter(graph)), new_nodes)
    for name in names:
        old = inputs[name]
        users = [use.node for use in old.uses()]
        if not users or not all(whole_shape(node) for node in users):
            raise RuntimeError(f"{name}: the traced graph must read the placeholder only through Shape")
        for node in users:
            node.outputs[0].replace_all_uses_with(values[name][1])
            graph.remove(node, safe=True)
        old.name = f"{name}.placeholder"
        graph.inputs[graph.inputs.index(old)] = values[name][0]


CHILD_TRACE_LIMIT_S = 1200  # a traced graph takes 1 to 3 minutes on 2 cores; far past that, the child is stuck


class _Forked:
    """Run ``job`` (-> traced and prepared ir.Model, weight specs) in a forked process: tracing is
    single-threaded Python, so two graphs trace in about the time of one on two cores. Without
    fork (or if the child fails) the job runs here when ``result()`` is asked for."""

    def __init__(self, job):
        import multiprocessing as mp

        self.job = job
        self.proc = None
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self.conn, child_conn = ctx.Pipe(duplex=False)
            self.proc = ctx.Process(target=self._child, args=(child_conn,), daemon=True)
            # Garbage from before the fork is freed here, and what lives on is kept out of the
            # child's collector: a child that frees an ONNX Runtime session (the demo's, a test's)
            # destroys a thread pool whose threads did not survive the fork, and hangs for ever in
            # pthread_cond_destroy (seen, with gdb).
            gc.collect()
            gc.freeze()
            try:
                self.proc.start()
            finally:
                gc.unfreeze()
            child_conn.close()

    def _child(self, conn) -> None:
        import onnx_ir as ir

        from gammamod.lifecycle import die_with_parent

        die_with_parent()
        try:
            import torch

            # a forked child must not enter the OpenMP pool the parent's threads left behind (a
            # libgomp team is not fork-safe); tracing needs no threads
            torch.set_num_threads(1)
            model = self.job()
            specs = prepare_graph(model, prefix="model.")
            weights = {s.name for s in specs}
            for value in model.graph.initializers.values():
                if value.name in weights:  # meta tensors do not serialise: a placeholder, rebound later
                    value.const_value = ir.ExternalTensor("pending", 0, 0, value.dtype, shape=value.shape,
                                                          name=value.name)
            conn.send((ir.serde.serialize_model(model).SerializeToString(), specs))
        except BaseException as e:  # the parent falls back to tracing itself
            conn.send((None, repr(e)))
        finally:
            conn.close()

    def result(self):
        import onnx
        import onnx_ir as ir

        if self.proc is not None:
            data, specs = None, "child exited"
            # a child that neither answers nor exits within the limit is stuck: trace here instead
            deadline = time.monotonic() + CHILD_TRACE_LIMIT_S
            while self.proc.is_alive() and not self.conn.poll(1.0) and time.monotonic() < deadline:
                pass
            if self.conn.poll(0):
                try:
                    data, specs = self.conn.recv()
                except EOFError:
                    pass
            self.stop()
            self.proc.join()
            if data is not None:
                return ir.serde.deserialize_model(onnx.load_from_string(data)), specs
        model = self.job()
        return model, prepare_graph(model, prefix="model.")

    def stop(self) -> None:
        """Kill the child if it still runs (the export failed or was interrupted)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def trace_graphs(model, ckpt: Checkpoint, opts: ExportOptions, max_seq: int, stages):
    """Trace vision (when present) and the decoder graphs on the meta device and prepare them
    (``onnx_graph.prepare_graph``) -> ({kind: ir.Model}, {kind: weight specs}). The ORT decoder
    variants trace in forked processes while this one traces the rest."""
    stages("tracing the decoder graphs")()
    children: list[_Forked] = []
    try:
        if _wants_fused(opts):
            children.append(_Forked(lambda: _trace_decoder(model, ckpt, opts, max_seq, kv="ort")))
            children.append(_Forked(lambda: _trace_decoder(model, ckpt, opts, max_seq, kv="ort", decode_step=True)))
        graphs, specs = {}, {}
        if ckpt.vision is not None and ckpt.vision.has_tower:
            graphs["vision"] = _trace_vision(model, ckpt, opts)
            specs["vision"] = prepare_graph(graphs["vision"], prefix="model.")
        graphs["decoder"] = _trace_decoder(model, ckpt, opts, max_seq)
        specs["decoder"] = prepare_graph(graphs["decoder"], prefix="model.")
        for kind, child in zip(("decoder_ort", "decode_ort"), children):
            graphs[kind], specs[kind] = child.result()
        return graphs, specs
    finally:
        for child in children:
            child.stop()


def _wants_fused(opts: ExportOptions) -> bool:
    # ONNX Runtime's CPU kernels for the fused ops take float32 and float16
    return opts.ort_fused and opts.dtype in ("fp32", "fp16")


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_weights(ckpt: Checkpoint, specs, path: Path, dtype: torch.dtype, stages, fused: dict | None = None,
                  extra: dict | None = None) -> dict:
    advance = stages(f"writing {path.name}", len(specs))
    out = WeightsFile(path)
    fused, extra = fused or {}, extra or {}
    try:
        for spec in specs:
            if spec.source in extra:
                tensor = extra[spec.source]
            elif spec.source in ckpt.weights.refs:
                tensor = ckpt.weights.tensor(spec.source, dtype)
            elif spec.source in fused:
                tensor = fused_tensor(fused[spec.source], lambda name: ckpt.weights.tensor(name, dtype))
            else:
                tensor = ckpt.buffer_value(spec.source)
            if spec.transpose:
                tensor = tensor.t()
            if tuple(tensor.shape) != spec.shape:
                raise RuntimeError(f"{spec.name}: shape {tuple(tensor.shape)} != graph {spec.shape}")
            out.add(spec.name, _tensor_bytes(tensor))
            advance()
    finally:
        out.close()
    return out.placements


def _np_dtype_name(dtype) -> str:
    import onnx_ir as ir

    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
            ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}[dtype]


def _merge_specs(*lists):
    seen = {}
    for specs in lists:
        for s in specs:
            if s.name in seen and seen[s.name] != s:
                raise RuntimeError(f"weight {s.name} differs between graphs")
            seen[s.name] = s
    return list(seen.values())


def export_artifact(checkpoint, out, opts: ExportOptions | None = None, progress=None) -> Manifest:
    """Export ``checkpoint`` to the artifact directory ``out``; returns its manifest."""
    opts = opts or ExportOptions()
    stages = _Stages(progress)
    out = Path(out)
    if opts.routing not in ("static", "threshold", "dense"):
        raise GammamodError(f"routing {opts.routing!r}: expected static, threshold or dense")
    if opts.dtype not in DTYPES:
        raise GammamodError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    check_replaceable(out, opts.force, [checkpoint, opts.vision_tower, opts.vision_tower_slow], is_artifact,
                      "artifact directory")
    stages("reading checkpoint")()
    ckpt = open_checkpoint(checkpoint, opts.vision_tower, opts.vision_tower_slow)
    dtype = DTYPES[opts.dtype]
    cfg = ckpt.config
    max_seq = opts.max_seq or min(cfg.max_position_embeddings, 4096)
    if max_seq < 2:
        raise GammamodError(f"--max-seq {max_seq}: expected at least 2")
    if opts.max_batch < 1:
        raise GammamodError(f"--max-batch {opts.max_batch}: expected at least 1")
    tokenizer = _tokenizer(ckpt)
    routing = opts.routing
    rule, span_lengths = None, []
    if routing == "threshold" and ckpt.recipe.router != "shared-binary":
        raise GammamodError(f"--routing threshold is gamma-MoD's released inference; {ckpt.info.path} is a "
                            f"{ckpt.recipe.name} checkpoint (it routes with static capacity)")
    if routing == "threshold" and opts.skip_ratio is not None:
        raise GammamodError("--routing threshold keeps the tokens above the threshold up to a capacity: give the "
                            "capacity with --capacity (e.g. from 'gammamod calib capacity'), not --skip-ratio")
    if routing in ("static", "threshold") and ckpt.recipe.is_mod:
        overrides = opts.capacity
        if routing == "threshold" and not overrides:  # no capacity: the whole chunk, the threshold decides alone
            overrides = {layer: {"fraction": "1"} for layer in ckpt.recipe.mod_layers}
        rule = ckpt.recipe.capacity_rule(opts.skip_ratio, overrides, opts.capacity_span)
        defaults = (default_span_lengths(ckpt, tokenizer) if routing == "static"
                    else default_prompt_lengths(ckpt, tokenizer))
        span_lengths = sorted(set(opts.span_lengths or [])) or defaults
        if opts.capacity_span is not None:
            if opts.span_lengths and span_lengths != [opts.capacity_span]:
                raise GammamodError(f"--capacity gives absolute counts for a span of {opts.capacity_span} tokens; "
                                    f"--span-lengths {span_lengths} asks for others (give fractions of the span instead)")
            span_lengths = [opts.capacity_span]
        for n in span_lengths:
            if not 1 <= n < max_seq:
                raise GammamodError(f"span length {n}: expected 1 to {max_seq - 1} (below --max-seq, with room for the "
                                    "question)")
    elif opts.capacity or opts.skip_ratio is not None or opts.span_lengths:
        raise GammamodError("--capacity, --skip-ratio and --span-lengths apply to static routing of a MoD checkpoint")

    with OutputDir(out, force=opts.force, inputs=[checkpoint, opts.vision_tower, opts.vision_tower_slow],
                   is_ours=is_artifact, what="artifact directory") as partial:
        model = ckpt.skeleton(dtype, "meta")
        fused = fuse_projections(model)
        graphs, specs = trace_graphs(model, ckpt, opts, max_seq, stages)
        decoder_specs = _merge_specs(*(specs[k] for k in DECODER_GRAPHS if k in specs))
        placements = {"decoder.weights": write_weights(ckpt, decoder_specs, partial / "decoder.weights", dtype, stages,
                                                       fused, rope_tables(cfg, max_seq, dtype))}
        if "vision" in graphs:
            placements["vision.weights"] = write_weights(ckpt, specs["vision"], partial / "vision.weights", dtype,
                                                         stages, extra=vision_extra_weights(ckpt, dtype))
        stages("writing graphs, embeddings, tokenizer, manifest")()
        import onnx

        graph_entries = {}
        for kind, g in graphs.items():
            weights = "vision.weights" if kind == "vision" else "decoder.weights"
            bind_weights(g, partial / weights, placements[weights])
            proto = to_proto(g, doc=f"gammamod {kind} graph ({ckpt.recipe.name}, {routing} routing)")
            name = GRAPH_FILES[kind]
            onnx.save(proto, str(partial / name))
            graph_entries[kind] = {"file": name, "weights": [weights], **io_spec(proto),
                                   "initializers": sorted(s.name for s in specs[kind])}
            if kind in ("decoder_ort", "decode_ort"):
                graph_entries[kind].update(
                    backend="ort", tokens=1 if kind == "decode_ort" else "any", kv="in-place",
                    note="ONNX Runtime contrib ops (GroupQueryAttention, RotaryEmbedding); bind present_key.l/"
                         "present_value.l to the past_key.l/past_value.l buffers (whole, max_seq long)")
        weight_tables = {file: {s.name: [*placements[file][s.name], _np_dtype_name(s.dtype), list(s.shape)]
                                for s in (decoder_specs if file == "decoder.weights" else specs["vision"])}
                         for file in placements}
        embed = ckpt.weights.tensor("model.embed_tokens.weight", dtype)
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
        np.save(partial / "embed_tokens.npy", _tensor_bytes(embed).view(np_dtype).reshape(tuple(embed.shape)))
        del embed
        if "vision" in graphs and ckpt.vision.anyres is not None:  # LLaVA-NeXT's row end, in the decoder's space
            newline = ckpt.weights.tensor("model.image_newline", dtype)
            np.save(partial / NEWLINE_FILE, _tensor_bytes(newline).view(np_dtype).reshape(tuple(newline.shape)))
        copied = [f for f in TOKENIZER_FILES if (ckpt.info.path / f).is_file()]
        for f in copied:
            shutil.copy(ckpt.info.path / f, partial / f)
        data = _manifest_data(ckpt, opts, routing, rule, span_lengths, dtype, max_seq, graph_entries, tokenizer,
                              copied)
        data["weights"] = weight_tables
        manifest = Manifest(data, partial)
        if opts.tensorrt:
            from gammamod.engines.prepare import write_tensorrt_copies

            stages("writing TensorRT copies")()
            write_tensorrt_copies(manifest, opts.tensorrt)
        manifest.data["files"] = describe_files(partial, [p.name for p in partial.iterdir() if p.name != "manifest.json"])
        manifest.write()
    manifest.root = out
    return manifest


def _manifest_data(ckpt: Checkpoint, opts: ExportOptions, routing: str, rule: dict | None, span_lengths: list[int],
                   dtype: torch.dtype, max_seq: int, graphs: dict, tokenizer, tokenizer_files: list[str]) -> dict:
    import onnx
    import onnxscript
    import transformers

    from gammamod.engines.plugin_library import plugin_identity
    from gammamod.runtime.prompt import IMAGE_TOKEN, VICUNA_V1

    cfg, recipe = ckpt.config, ckpt.recipe
    routed = rule is not None
    routing_entry = {"mode": routing if routed else "dense", "span": recipe.span if routed else None,
                     "capacity": rule, "span_lengths": span_lengths}
    if routed and routing == "threshold":
        routing_entry.update(span="chunk", threshold=recipe.prefill_threshold)
    entries = [{"layer": i, "prefill": f"seq_len - (span_length - capacity.{i})" if routed and i in recipe.mod_layers
                else "seq_len"} for i in range(cfg.num_layers)]
    absent = []
    if "vision" not in graphs:
        absent.append("vision")
    if tokenizer is None:
        absent.append("tokenizer")
    image = None
    if "vision" in graphs:
        vision = ckpt.vision
        size = vision.input_size
        image = {"processor": vision.image_processor, "aspect": vision.image_aspect_ratio,
                 "size": [size, size], "tokens": vision.image_tokens, "max_rows": vision_rows(ckpt, opts),
                 "tower": "llava-hr" if vision.multipath is not None else "clip"}
        if vision.anyres is not None:
            image["anyres"] = {**vision.anyres.to_dict(), "newline": NEWLINE_FILE}
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": now(),
        "source": {"checkpoint": str(ckpt.info.path), "format": ckpt.info.format,
                   "model_type": ckpt.info.config.get("model_type"), "tower": ckpt.vision.tower_source
                   if ckpt.vision is not None else None},
        "recipe": {"name": recipe.name, "mod_layers": list(recipe.mod_layers), "router": recipe.router,
                   "router_input": recipe.router_input, "score_norm": str(recipe.score_norm) if recipe.score_norm else None,
                   "span": recipe.span, "kept": recipe.kept, "positions": recipe.positions,
                   "weighting": recipe.weighting, "decode": recipe.decode, "decode_gate": recipe.decode_gate,
                   "layer_ratios": {str(k): v for k, v in recipe.layer_ratios}},
        "routing": routing_entry,
        "model": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "intermediate_size": cfg.intermediate_size, "dtype": DTYPE_NAMES[dtype],
                  "max_position_embeddings": cfg.max_position_embeddings},
        "kv_cache": {"layout": ["batch", "kv_heads", "tokens", "head_dim"], "dtype": DTYPE_NAMES[dtype],
                     "max_batch": opts.max_batch, "max_seq": max_seq, "entries": entries,
                     "decode_appends": "new_kv_length.<layer> - kv_length.<layer> of the chunk's entries"},
        "graphs": graphs,
        "embeddings": {"file": "embed_tokens.npy", "dtype": DTYPE_NAMES[dtype],
                       "shape": [cfg.vocab_size, cfg.hidden_size]},
        "tokenizer": None if tokenizer is None else {
            "files": tokenizer_files, "backend": tokenizer.backend, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id},
        "prompt": {"template": VICUNA_V1.to_dict(), "image_token": IMAGE_TOKEN},
        "image": image,
        "absent": absent,
        "tensorrt": {"plugin": {"namespace": ops.PLUGIN_NAMESPACE, "version": ops.PLUGIN_VERSION,
                                "domain": ops.DOMAIN, "ops": list(ops.NODE_TYPES), **plugin_identity()},
                     "targets": {}},
        "files": {},
        "tools": {"gammamod": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxscript": onnxscript.__version__, "transformers": transformers.__version__},
    }
