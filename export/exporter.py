"""``gammamod export``: a checkpoint -> an artifact directory (ONNX graphs, weights, manifest).

The model is traced on the meta device and the weights are streamed from the checkpoint into
the artifact one tensor at a time, converted to the export dtype on the way: exporting a model
never holds its weights in memory twice (or even once). The artifact appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
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
from .graphs import DecodeGraph, FusedDecodeGraph, PrefillGraph, VisionGraph, rope_tables
from .onnx_graph import WeightsFile, bind_weights, io_spec, prepare_graph, to_proto

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
MAX_TOPK = 3840  # TensorRT's TopK limit: K must stay below it


@dataclass
class ExportOptions:
    routing: str = "static"  # static | dense
    dtype: str = "fp32"
    skip_ratio: float | None = None
    capacity: dict[int, int] | None = None
    routable: tuple[int, int] | None = None
    image_tokens: int | None = None
    image_start: int | None = None
    max_batch: int = 8
    max_seq: int | None = None
    vision_tower: str | None = None
    force: bool = False
    tensorrt: list[str] = field(default_factory=list)
    ort_fused: bool = True  # also write decode.ort.onnx (ONNX Runtime's fused attention, KV in place)


@dataclass
class Layout:
    """Where the image and the routable tokens sit in a prompt."""

    image_start: int | None
    image_tokens: int | None
    routable: tuple[int, int] | None


class _Stages:
    """Adapter for an optional progress reporter: ``stage(name, total)`` -> ``advance()``."""

    def __init__(self, progress):
        self.progress = progress

    def __call__(self, name: str, total: int | None = None):
        if self.progress is None:
            return lambda n=1: None
        return self.progress.stage(name, total)


def read_capacity_file(path: str | Path) -> dict[int, int]:
    """``--capacity FILE``: a JSON object {MoD layer index: kept count}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GammamodError(f"{path}: no such capacity file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GammamodError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GammamodError(f"{path}: expected a JSON object mapping MoD layer index to kept count")
    out = {}
    for k, v in data.items():
        if not str(k).isdigit() or not isinstance(v, int) or isinstance(v, bool):
            raise GammamodError(f"{path}: entry {k!r}: {v!r}: expected \"<layer index>\": <integer kept count>")
        out[int(k)] = v
    return out


def _tokenizer(ckpt: Checkpoint):
    from gammamod.runtime.tokenizer import Tokenizer

    d = ckpt.info.path
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        return None
    return Tokenizer.from_dir(d)


def prompt_layout(ckpt: Checkpoint, tokenizer, opts: ExportOptions) -> Layout:
    """The image's place in the vicuna_v1 prompt and the recipe's routable span, unless overridden."""
    from gammamod.runtime.prompt import IMAGE_TOKEN_INDEX, VICUNA_V1, tokenize_with_image

    image_tokens = opts.image_tokens
    if image_tokens is None and ckpt.vision is not None and ckpt.vision.has_tower:
        image_tokens = ckpt.vision.image_tokens
    image_start = opts.image_start
    if image_start is None and tokenizer is not None:
        ids = tokenize_with_image(tokenizer, VICUNA_V1.prompt(""))
        image_start = ids.index(IMAGE_TOKEN_INDEX)
    routable = opts.routable
    if routable is None and image_start is not None and image_tokens is not None:
        routable = ckpt.recipe.routable_span(image_start, image_tokens)
    return Layout(image_start, image_tokens, routable)


def _quiet():
    """torch.onnx prints its progress and warns about internals: keep the user's terminal clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _trace(module, args, dynamic_shapes, input_names, output_names):
    import logging

    from . import ortops

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with _quiet():
        program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False,
                                    custom_translation_table={**ops.translation_table(),
                                                              **ortops.translation_table()},
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names)
    return program.model


def _trace_vision(model, ckpt: Checkpoint, opts: ExportOptions):
    dtype = next(model.parameters()).dtype
    size = ckpt.vision.tower_config["image_size"]
    images = torch.export.Dim("images", min=1, max=opts.max_batch)
    return _trace(VisionGraph(model), (torch.zeros(2, 3, size, size, dtype=dtype, device="meta"),),
                  ({0: images},), ["pixel_values"], ["image_features"])


def _trace_prefill(model, ckpt: Checkpoint, opts: ExportOptions, span, capacity: dict[int, int], max_seq: int):
    cfg, dtype, Dim = ckpt.config, next(model.parameters()).dtype, torch.export.Dim
    batch = Dim("batch", min=1, max=opts.max_batch)
    prefill = PrefillGraph(model, opts.routing, span, capacity)
    min_seq = max(2, span[0] + span[1] + 1) if span else 2  # the question follows the span
    example_len = min(max_seq, min_seq + 3)
    return _trace(
        prefill, (torch.zeros(2, example_len, cfg.hidden_size, dtype=dtype, device="meta"),
                  torch.zeros(2, dtype=torch.long, device="meta")),
        ({0: batch, 1: Dim("seq", min=min_seq, max=max_seq)}, {0: batch}),
        ["inputs_embeds", "seq_lengths"], prefill.output_names())


def _trace_decode(model, ckpt: Checkpoint, opts: ExportOptions, max_seq: int):
    cfg, dtype, Dim = ckpt.config, next(model.parameters()).dtype, torch.export.Dim
    batch = Dim("batch", min=1, max=opts.max_batch)
    decode = DecodeGraph(model, opts.routing)
    lengths = torch.zeros(2, dtype=torch.long, device="meta")
    cache_args, cache_dims = [], []
    for i in range(cfg.num_layers):
        cap = Dim(f"cache_{i}", min=1, max=max_seq)  # each layer its own cache length
        kv = torch.zeros(2, cfg.num_kv_heads, 3, cfg.head_dim, dtype=dtype, device="meta")
        cache_args += [kv, kv.clone(), lengths.clone()]
        cache_dims += [{0: batch, 2: cap}, {0: batch, 2: cap}, {0: batch}]
    return _trace(
        decode, (torch.zeros(2, 2, cfg.hidden_size, dtype=dtype, device="meta"), lengths, lengths.clone(),
                 *cache_args),
        ({0: batch, 1: Dim("chunk", min=1, max=max_seq)}, {0: batch}, {0: batch}, tuple(cache_dims)),
        decode.input_names(), decode.output_names())


def _trace_fused_decode(model, ckpt: Checkpoint, opts: ExportOptions, max_seq: int):
    """decode.ort.onnx: one token per row (static), the cache buffers whole (one capacity)."""
    cfg, dtype, Dim = ckpt.config, next(model.parameters()).dtype, torch.export.Dim
    batch = Dim("batch", min=1, max=opts.max_batch)
    capacity = Dim("kv_capacity", min=2, max=max_seq)
    graph = FusedDecodeGraph(model, opts.routing, max_seq)
    lengths = torch.zeros(2, dtype=torch.long, device="meta")
    cache_args, cache_dims = [], []
    for _ in range(cfg.num_layers):
        kv = torch.zeros(2, cfg.num_kv_heads, 4, cfg.head_dim, dtype=dtype, device="meta")
        cache_args += [kv, kv.clone(), lengths.clone()]
        cache_dims += [{0: batch, 2: capacity}, {0: batch, 2: capacity}, {0: batch}]
    return _trace(
        graph, (torch.zeros(2, 1, cfg.hidden_size, dtype=dtype, device="meta"), lengths, lengths.clone(), *cache_args),
        ({0: batch}, {0: batch}, {0: batch}, tuple(cache_dims)), graph.input_names(), graph.output_names())


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
            self.proc.start()
            child_conn.close()

    def _child(self, conn) -> None:
        import onnx_ir as ir

        from gammamod.lifecycle import die_with_parent

        die_with_parent()
        try:
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
            try:
                data, specs = self.conn.recv()
            except EOFError:
                data, specs = None, "child exited"
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


def trace_graphs(model, ckpt: Checkpoint, opts: ExportOptions, layout: Layout, capacity: dict[int, int],
                 max_seq: int, stages):
    """Trace vision (when present), prefill and decode on the meta device and prepare them
    (``onnx_graph.prepare_graph``) -> ({kind: ir.Model}, {kind: weight specs})."""
    span = layout.routable if opts.routing == "static" and ckpt.recipe.is_mod else None
    stages("tracing prefill and decode graphs")()
    children: list[_Forked] = []
    try:
        decode = _Forked(lambda: _trace_decode(model, ckpt, opts, max_seq))
        children.append(decode)
        fused = _Forked(lambda: _trace_fused_decode(model, ckpt, opts, max_seq)) if _wants_fused(opts) else None
        children.append(fused)
        graphs, specs = {}, {}
        if ckpt.vision is not None and ckpt.vision.has_tower:
            graphs["vision"] = _trace_vision(model, ckpt, opts)
            specs["vision"] = prepare_graph(graphs["vision"], prefix="model.")
        graphs["prefill"] = _trace_prefill(model, ckpt, opts, span, capacity, max_seq)
        specs["prefill"] = prepare_graph(graphs["prefill"], prefix="model.")
        graphs["decode"], specs["decode"] = decode.result()
        if fused is not None:
            graphs["decode_ort"], specs["decode_ort"] = fused.result()
        return graphs, specs
    finally:
        for child in children:
            if child is not None:
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
    if opts.routing not in ("static", "dense"):
        raise GammamodError(f"routing {opts.routing!r}: expected static or dense")
    if opts.dtype not in DTYPES:
        raise GammamodError(f"--dtype {opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    check_replaceable(out, opts.force, [checkpoint, opts.vision_tower], is_artifact, "artifact directory")
    stages("reading checkpoint")()
    ckpt = open_checkpoint(checkpoint, opts.vision_tower)
    dtype = DTYPES[opts.dtype]
    cfg = ckpt.config
    max_seq = opts.max_seq or min(cfg.max_position_embeddings, 4096)
    if max_seq < 2:
        raise GammamodError(f"--max-seq {max_seq}: expected at least 2")
    if opts.max_batch < 1:
        raise GammamodError(f"--max-batch {opts.max_batch}: expected at least 1")
    tokenizer = _tokenizer(ckpt)
    layout = prompt_layout(ckpt, tokenizer, opts)
    capacity: dict[int, int] = {}
    routing = opts.routing
    if routing == "static" and ckpt.recipe.is_mod:
        if layout.routable is None:
            raise GammamodError(f"{ckpt.info.path}: cannot derive the routable span (no tokenizer or no vision tower); "
                                "pass --routable START:LEN, or --image-start and --image-tokens")
        start, length = layout.routable
        if start + length >= max_seq:
            raise GammamodError(f"--routable {start}:{length} ends at {start + length}, beyond --max-seq {max_seq}")
        capacity = ckpt.recipe.capacities(length, opts.skip_ratio, opts.capacity)
        big = {layer: k for layer, k in capacity.items() if k >= MAX_TOPK}
        if big:
            raise GammamodError(f"capacities {big} reach TensorRT's TopK limit ({MAX_TOPK}); "
                                "lower them with --capacity or --skip-ratio")
    elif opts.capacity or opts.skip_ratio is not None:
        raise GammamodError("--capacity and --skip-ratio apply to static routing of a MoD checkpoint")

    with OutputDir(out, force=opts.force, inputs=[checkpoint, opts.vision_tower], is_ours=is_artifact,
                   what="artifact directory") as partial:
        model = ckpt.skeleton(dtype, "meta")
        fused = fuse_projections(model)
        graphs, specs = trace_graphs(model, ckpt, opts, layout, capacity, max_seq, stages)
        decoder_specs = _merge_specs(*(specs[k] for k in ("prefill", "decode", "decode_ort") if k in specs))
        placements = {"decoder.weights": write_weights(ckpt, decoder_specs, partial / "decoder.weights", dtype, stages,
                                                       fused, rope_tables(cfg, max_seq, dtype))}
        if "vision" in graphs:
            placements["vision.weights"] = write_weights(ckpt, specs["vision"], partial / "vision.weights", dtype,
                                                         stages)
        stages("writing graphs, embeddings, tokenizer, manifest")()
        import onnx

        graph_entries = {}
        for kind, g in graphs.items():
            weights = "vision.weights" if kind == "vision" else "decoder.weights"
            bind_weights(g, partial / weights, placements[weights])
            proto = to_proto(g, doc=f"gammamod {kind} graph ({ckpt.recipe.name}, {routing} routing)")
            name = "decode.ort.onnx" if kind == "decode_ort" else f"{kind}.onnx"
            onnx.save(proto, str(partial / name))
            graph_entries[kind] = {"file": name, "weights": [weights], **io_spec(proto),
                                   "initializers": sorted(s.name for s in specs[kind])}
            if kind == "decode_ort":
                graph_entries[kind].update(
                    backend="ort", tokens=1, kv="in-place",
                    note="ONNX Runtime contrib ops (GroupQueryAttention, RotaryEmbedding); bind present_key.l/"
                         "present_value.l to the past_key.l/past_value.l buffers (whole, max_seq long)")
        weight_tables = {file: {s.name: [*placements[file][s.name], _np_dtype_name(s.dtype), list(s.shape)]
                                for s in (decoder_specs if file == "decoder.weights" else specs["vision"])}
                         for file in placements}
        embed = ckpt.weights.tensor("model.embed_tokens.weight", dtype)
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
        np.save(partial / "embed_tokens.npy", _tensor_bytes(embed).view(np_dtype).reshape(tuple(embed.shape)))
        del embed
        copied = [f for f in TOKENIZER_FILES if (ckpt.info.path / f).is_file()]
        for f in copied:
            shutil.copy(ckpt.info.path / f, partial / f)
        data = _manifest_data(ckpt, opts, routing, layout, capacity, dtype, max_seq, graph_entries, tokenizer, copied)
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


def _manifest_data(ckpt: Checkpoint, opts: ExportOptions, routing: str, layout: Layout, capacity: dict,
                   dtype: torch.dtype, max_seq: int, graphs: dict, tokenizer, tokenizer_files: list[str]) -> dict:
    import onnx
    import onnxscript
    import transformers

    from gammamod.runtime.prompt import IMAGE_TOKEN, VICUNA_V1

    cfg, recipe = ckpt.config, ckpt.recipe
    span = list(layout.routable) if layout.routable else None
    entries = []
    for i in range(cfg.num_layers):
        if i in capacity:
            entries.append({"layer": i, "prefill": f"seq_len - {span[1] - capacity[i]}"})
        else:
            entries.append({"layer": i, "prefill": "seq_len"})
    absent = []
    if "vision" not in graphs:
        absent.append("vision")
    if tokenizer is None:
        absent.append("tokenizer")
    image = None
    if "vision" in graphs:
        size = ckpt.vision.tower_config["image_size"]
        image = {"processor": ckpt.vision.image_processor, "aspect": ckpt.vision.image_aspect_ratio,
                 "size": [size, size], "tokens": ckpt.vision.image_tokens}
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": now(),
        "source": {"checkpoint": str(ckpt.info.path), "format": ckpt.info.format,
                   "model_type": ckpt.info.config.get("model_type"), "tower": ckpt.vision.tower_source
                   if ckpt.vision is not None else None},
        "recipe": {"name": recipe.name, "mod_layers": list(recipe.mod_layers), "router": recipe.router,
                   "router_input": recipe.router_input, "score_norm": str(recipe.score_norm) if recipe.score_norm else None,
                   "span": recipe.span, "kept": recipe.kept, "positions": recipe.positions,
                   "weighting": recipe.weighting, "decode": recipe.decode, "decode_gate": recipe.decode_gate,
                   "skip_ratio": opts.skip_ratio if opts.skip_ratio is not None else recipe.skip_ratio,
                   "layer_ratios": {str(k): v for k, v in recipe.layer_ratios}},
        "routing": {"mode": routing if recipe.is_mod else "dense", "routable_span": span,
                    "capacities": {str(k): v for k, v in sorted(capacity.items())},
                    "image_start": layout.image_start, "image_tokens": layout.image_tokens},
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
                                "domain": ops.DOMAIN, "ops": list(ops.NODE_TYPES)}, "targets": {}},
        "files": {},
        "tools": {"gammamod": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxscript": onnxscript.__version__, "transformers": transformers.__version__},
    }
