"""The artifact manifest: the one contract between export, engines and runtime.

``manifest.json`` sits in an artifact directory and names every file there with its sha256.
Later stages read only the manifest and the files it names. The schema is versioned and
checked on read; a bad manifest is a one-line error naming the field.

Top-level fields (schema_version 2):

* ``recipe``: the routing recipe (name, MoD layers, router, span, positions, weighting, decode).
* ``routing``: ``mode`` (static | threshold | dense); for static routing ``span`` (where a
  prompt's routed tokens are: ``prefix`` or ``image``; threshold routing: ``chunk``, every
  multi-token chunk routed whole, tokens at or below ``threshold`` skipped), ``capacity`` (the rule the runtime turns into each MoD
  layer's kept count for any span length: ``runtime.capacity.CapacityRule``) and ``span_lengths``
  (the lengths to support: the bounds of TensorRT's profiles).
* ``model``: decoder geometry and dtype. ``kv_cache``: layout, max batch and sequence.
* ``graphs``: ``decoder`` (the one decoder graph: any chunk after any cache, the routed span and
  kept counts as inputs), ``vision`` when present, and ONNX Runtime's variants ``decoder_ort``
  (any chunk, KV appended in place into buffers bound as both past and present) and
  ``decode_ort`` (one token per row, no span), each a file and its inputs and outputs with roles
  (``inputs_embeds``, ``span_length``, ``capacity.8``, ``past_key.3``, ``logits`` ...).
* ``embeddings``: the token embedding table (a .npy file), kept outside the decoder graph.
* ``tokenizer``, ``prompt``, ``image``: what turns text and pictures into inputs; None when the
  checkpoint has no tokenizer or no vision tower (see ``absent``).
* ``weights``: per weights file, each tensor's [offset, bytes, dtype, shape], so a runtime can
  map the weights once and hand them to every graph that uses them.
* ``files``: every file with sha256 and size. ``tensorrt``: plugin identity and per-version copies.
* ``engines`` (written by ``gammamod build`` on the GPU they are for; absent before): TensorRT
  version, GPU name and compute capability, hardware-compatibility level, version-compatible,
  precision, MoD ops (plugin | native), the plugin library (file, sha256, sources' sha256), the
  plan's profiles, KV capacity per layer, max batch and sequence, the options, build time, and
  the engine files (``engines/<kind>.engine``, listed under ``files``). The runtime's
  ``check_engines`` reads it.
* ``quantization`` (optional, the calib stage): ``precision`` of the Q/DQ nodes (int8, fp8, int4).
* ``tools``: the versions of the tools that wrote the artifact.
* ``quantization`` (only in artifacts ``gammamod calib quantize`` wrote): precision, method, the
  weights' and activations' dtype and granularity, the scales' dtype, what stayed in full
  precision, the calibration, the tolerances ``validate`` holds it to and (once run) its numbers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path

from gammamod.errors import GammamodError

SCHEMA = "gammamod-artifact"
SCHEMA_VERSION = 2
MAX_SEQ_LIMIT = 1 << 20  # a bound no real artifact reaches: an edited max_seq must not allocate terabytes
MANIFEST = "manifest.json"
ENGINES_DIR = "engines"
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")

_ROLE = re.compile(r"^(inputs_embeds|seq_lengths|past_length|span_start|span_length|logits|pixel_values|"
                   r"image_features|(past_key|past_value|kv_length|present_key|present_value|new_kv_length|"
                   r"kept_indices|above_threshold|capacity)\.\d+)$")
_GRAPH_KINDS = ("decoder", "vision", "decoder_ort", "decode_ort")
_DTYPES = ("float32", "float16", "bfloat16")
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # model.dtype -> its precision name
_STORED_DTYPES = _DTYPES + ("int64", "int32", "int8", "uint8", "int4", "float8e4m3fn")  # quantized weights too
_PRECISIONS = ("int8", "int4", "fp8")
ROUTED_MODES = ("static", "threshold")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, names) -> dict:
    return {name: {"sha256": sha256_of(root / name), "bytes": (root / name).stat().st_size} for name in sorted(names)}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Manifest:
    """A validated manifest; ``data`` is the JSON object, ``root`` the artifact directory."""

    def __init__(self, data: dict, root: Path):
        self.data = data
        self.root = Path(root)

    # -- access ------------------------------------------------------------------------------
    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def path(self, name: str) -> Path:
        return self.root / name

    def graph(self, kind: str) -> dict | None:
        return self.data["graphs"].get(kind)

    @property
    def num_layers(self) -> int:
        return int(self.data["model"]["num_layers"])

    @property
    def routed(self) -> bool:
        """Whether the decoder takes a routed span (static or threshold routing)."""
        return self.data["routing"]["mode"] in ROUTED_MODES

    def capacity_rule(self):
        """The routing's kept-count rule (None for a dense artifact)."""
        from gammamod.runtime.capacity import CapacityRule

        return CapacityRule(self.data["routing"]["capacity"]) if self.routed else None

    def verify_files(self, names=None) -> None:
        """Check the named files (default: all) against their sha256 and size."""
        files = self.data["files"]
        for name in names or files:
            entry = files.get(name)
            if entry is None:
                raise GammamodError(f"{self.root / MANIFEST}: {name} is not listed under 'files'")
            path = self.root / name
            if not path.is_file():
                raise GammamodError(f"{path}: missing (named in {MANIFEST})")
            if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
                raise GammamodError(f"{path}: sha256 differs from {MANIFEST} (file changed or damaged)")

    # -- writing -------------------------------------------------------------------------------
    def write(self) -> Path:
        validate(self.data, self.root / MANIFEST)
        path = self.root / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate ``root/manifest.json`` (an artifact directory or the manifest itself)."""
    root = Path(root)
    path = root if root.name == MANIFEST else root / MANIFEST
    if not path.is_file():
        raise GammamodError(f"{path}: no such file (expected an artifact directory written by 'gammamod export')")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GammamodError(f"{path}: not valid JSON ({e})") from None
    validate(data, path)
    return Manifest(data, path.parent)


def _need(cond: bool, where: Path, msg: str) -> None:
    if not cond:
        raise GammamodError(f"{where}: {msg}")


def validate(data, where: Path) -> None:
    """Structural checks of a manifest; raises a one-line GammamodError naming the field."""
    _need(isinstance(data, dict), where, "expected a JSON object")
    _need(data.get("schema") == SCHEMA, where, f"'schema' is {data.get('schema')!r}, expected {SCHEMA!r}")
    version = data.get("schema_version")
    _need(isinstance(version, int), where, "'schema_version' must be an integer")
    _need(version == SCHEMA_VERSION, where, f"schema_version {version} is not supported by this gammamod "
                                            f"(it reads version {SCHEMA_VERSION}"
                                            f"{': one decoder graph with the routed span as inputs' if version == 1 else ''}"
                                            "); re-export the checkpoint with 'gammamod export'")
    for key, kind in (("recipe", dict), ("routing", dict), ("model", dict), ("kv_cache", dict),
                      ("graphs", dict), ("embeddings", dict), ("files", dict), ("tools", dict),
                      ("absent", list)):
        _need(isinstance(data.get(key), kind), where, f"'{key}' missing or not a {kind.__name__}")
    model = data["model"]
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                "max_position_embeddings"):
        _need(_positive(model.get(key)), where, f"model.{key} must be a positive integer")
    _need(model.get("dtype") in _DTYPES, where, "model.dtype must be float32|float16|bfloat16")
    _need(model["num_heads"] % model["num_kv_heads"] == 0, where, "model.num_heads must be a multiple of num_kv_heads")
    kv = data["kv_cache"]
    for key in ("max_batch", "max_seq"):
        _need(_positive(kv.get(key)), where, f"kv_cache.{key} must be a positive integer")
    _need(kv["max_seq"] <= min(model["max_position_embeddings"], MAX_SEQ_LIMIT), where,
          f"kv_cache.max_seq {kv['max_seq']} exceeds the model's max_position_embeddings "
          f"{model['max_position_embeddings']}")
    _need(kv.get("dtype", model["dtype"]) == model["dtype"], where, "kv_cache.dtype must equal model.dtype")
    files = data["files"]
    for name, entry in files.items():
        _need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _count(entry.get("bytes")),
              where, f"files[{name!r}] needs sha256 and bytes")
        flat = name[len(ENGINES_DIR) + 1:] if name.startswith(ENGINES_DIR + "/") else name
        _need("/" not in flat and "\\" not in flat and flat not in (".", "..", ""), where,
              f"files[{name!r}]: artifact files live in the artifact directory (engines in {ENGINES_DIR}/)")
    _check_routing(data, where)
    graphs = data["graphs"]
    _need("decoder" in graphs, where, "graphs.decoder missing (the one decoder graph)")
    for kind, g in graphs.items():
        _need(kind in _GRAPH_KINDS, where, f"graphs.{kind}: unknown graph kind")
        _need(isinstance(g, dict) and g.get("file") in files, where, f"graphs.{kind}.file must name a listed file")
        for side in ("inputs", "outputs"):
            io = g.get(side)
            _need(isinstance(io, list) and io, where, f"graphs.{kind}.{side} must be a non-empty list")
            for item in io:
                _need(isinstance(item, dict) and isinstance(item.get("name"), str)
                      and isinstance(item.get("role"), str) and _ROLE.match(item["role"]) is not None
                      and isinstance(item.get("shape"), list) and isinstance(item.get("dtype"), str),
                      where, f"graphs.{kind}.{side}: bad entry {item!r}")
        for extra in g.get("weights", []):
            _need(extra in files, where, f"graphs.{kind}.weights names {extra!r}, not a listed file")
        if kind != "vision":
            _check_decoder_io(data, kind, g, where)
    for file, table in (data.get("weights") or {}).items():
        _need(file in files and isinstance(table, dict), where, f"weights[{file!r}] must describe a listed file")
        for name, entry in table.items():
            _need(isinstance(entry, list) and len(entry) == 4 and _count(entry[0]) and _count(entry[1])
                  and entry[0] + entry[1] <= files[file]["bytes"] and entry[2] in _STORED_DTYPES,
                  where, f"weights[{file!r}][{name!r}] must be [offset, bytes, dtype, shape] inside the file")
    quant = data.get("quantization")
    if quant is not None:
        _need(isinstance(quant, dict) and quant.get("precision") in _PRECISIONS, where,
              f"quantization.precision must be one of {', '.join(_PRECISIONS)}")
        _need(model["dtype"] == "float32", where, "a quantized artifact keeps float32 for what is not quantized")
        _need(isinstance(quant.get("tolerance"), dict), where, "quantization.tolerance must state validate's tolerances")
    emb = data["embeddings"]
    _need(emb.get("file") in files, where, "embeddings.file must name a listed file")
    _need(emb.get("shape") == [model["vocab_size"], model["hidden_size"]], where,
          f"embeddings.shape must be [vocab_size, hidden_size] = {[model['vocab_size'], model['hidden_size']]}")
    if data.get("engines") is not None:
        _check_engines(data, where)
    absent = set(data["absent"])
    _need(absent <= {"vision", "tokenizer"}, where, "absent may list only vision and tokenizer")
    _need(("vision" in graphs) != ("vision" in absent), where, "graphs.vision must exist unless 'vision' is absent")
    if "vision" in graphs:
        _check_image(data, where)
    if "tokenizer" not in absent:
        tok = data.get("tokenizer")
        _need(isinstance(tok, dict) and tok.get("files") and all(f in files for f in tok["files"]),
              where, "tokenizer.files must name listed files")
        for key in ("bos_id", "eos_id"):
            _need(tok.get(key) is None or (_count(tok[key]) and tok[key] < model["vocab_size"]), where,
                  f"tokenizer.{key} must be a token id below vocab_size")


def _check_image(data: dict, where: Path) -> None:
    """The vision graph's output is [rows, image.tokens, hidden]: a row per image, or with anyres a row
    per tile, whose features the runtime merges into a number of tokens that depends on the image's
    size (image.anyres: the grids, the tile, the tower's patches per side, the newline embedding)."""
    image, model, files = data.get("image"), data["model"], data["files"]
    _need(isinstance(image, dict) and _positive(image.get("tokens")), where, "image.tokens must be a positive integer")
    out = {o["role"]: o for o in data["graphs"]["vision"]["outputs"]}.get("image_features")
    _need(out is not None and out["shape"][1:] == [image["tokens"], model["hidden_size"]], where,
          "graphs.vision's image_features must be [rows, image.tokens, model.hidden_size]")
    _need(image.get("max_rows") is None or _positive(image["max_rows"]), where, "image.max_rows must be a positive integer")
    _need(image.get("aspect") in ("pad", "square", "anyres"), where, "image.aspect must be pad, square or anyres")
    anyres = image.get("anyres")
    _need((image["aspect"] == "anyres") == isinstance(anyres, dict), where,
          "image.anyres must describe the grids exactly when image.aspect is anyres")
    if anyres is None:
        return
    tile, side = anyres.get("tile"), anyres.get("patches_per_side")
    _need(_positive(tile) and _positive(side) and side * side == image["tokens"], where,
          "image.anyres.tile and patches_per_side must be positive, patches_per_side squared image.tokens")
    points = anyres.get("grid_pinpoints")
    _need(isinstance(points, list) and points and all(
        isinstance(p, list) and len(p) == 2 and all(_positive(v) and v % tile == 0 for v in p) for p in points),
        where, "image.anyres.grid_pinpoints must be [width, height] pairs, multiples of image.anyres.tile")
    _need(anyres.get("merge") == "spatial_unpad", where, "image.anyres.merge must be spatial_unpad")
    _need(anyres.get("newline") in files, where, "image.anyres.newline must name a listed file")


def _positive(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_routing(data: dict, where: Path) -> None:
    from gammamod.runtime.capacity import CapacityRule

    routing, model, recipe = data["routing"], data["model"], data["recipe"]
    _need(routing.get("mode") in ROUTED_MODES + ("dense",), where, "routing.mode must be static, threshold or dense")
    mod_layers = recipe.get("mod_layers")
    _need(isinstance(mod_layers, list) and all(_count(i) and i < model["num_layers"] for i in mod_layers), where,
          f"recipe.mod_layers must be layer indices below model.num_layers ({model['num_layers']})")
    if routing["mode"] == "dense":
        return
    if routing["mode"] == "threshold":
        _need(recipe.get("router") == "shared-binary", where, "routing.mode threshold is gamma-MoD's")
        _need(routing.get("span") == "chunk", where, "threshold routing routes whole chunks: routing.span must be chunk")
        t = routing.get("threshold")
        _need(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1, where,
              "routing.threshold must be a number in [0, 1)")
    else:
        _need(routing.get("span") in ("prefix", "image"), where, "routing.span must be prefix or image")
    rule = routing.get("capacity")
    _need(isinstance(rule, dict), where, "routing.capacity must describe the kept-count rule")
    try:
        parsed = CapacityRule(rule)
    except GammamodError as e:
        raise GammamodError(f"{where}: routing.capacity: {e}") from None
    _need(parsed.layers == mod_layers, where, "routing.capacity.mod_layers must equal recipe.mod_layers")
    lengths = routing.get("span_lengths")
    max_seq = data["kv_cache"]["max_seq"]
    _need(isinstance(lengths, list) and all(_positive(n) and n < max_seq for n in lengths), where,
          f"routing.span_lengths must be span lengths below kv_cache.max_seq ({max_seq})")
    if parsed.count_span is not None:
        _need(parsed.count_span < max_seq, where, "routing.capacity.count_span_length must be below kv_cache.max_seq")
        _need(all(o["count"] <= parsed.count_span for o in parsed.overrides.values() if "count" in o), where,
              "routing.capacity: an absolute count larger than the span it holds for")


def _check_engines(data: dict, where: Path) -> None:
    eng, files = data["engines"], data["files"]
    _need(isinstance(eng, dict), where, "engines must be an object")
    _need(isinstance(eng.get("tensorrt"), str) and re.match(r"^\d+\.\d+", eng["tensorrt"]) is not None, where,
          "engines.tensorrt must be the TensorRT version that built them")
    gpu = eng.get("gpu")
    _need(isinstance(gpu, dict) and isinstance(gpu.get("name"), str) and isinstance(gpu.get("compute_capability"), list)
          and len(gpu["compute_capability"]) == 2 and all(_count(x) for x in gpu["compute_capability"]), where,
          "engines.gpu must be {name, compute_capability: [major, minor]}")
    _need(eng.get("hardware_compatibility") in HARDWARE_LEVELS, where,
          f"engines.hardware_compatibility must be one of {', '.join(HARDWARE_LEVELS)}")
    _need(isinstance(eng.get("version_compatible"), bool), where, "engines.version_compatible must be true or false")
    _need(eng.get("mod_ops") in ("plugin", "native", "none"), where, "engines.mod_ops must be plugin, native or none")
    plugin = eng.get("plugin")
    _need(plugin is None or (isinstance(plugin, dict) and plugin.get("file") in files
                             and isinstance(plugin.get("sha256"), str)), where,
          "engines.plugin must be null or name a listed library file with its sha256")
    _need(isinstance(eng.get("files"), dict) and "decoder" in eng["files"]
          and all(k in ("decoder", "vision") and f in files and f.startswith(ENGINES_DIR + "/")
                  for k, f in eng["files"].items()), where,
          f"engines.files must name the listed decoder (and vision) engines in {ENGINES_DIR}/")
    _need(isinstance(eng.get("profiles"), dict) and set(eng["profiles"]) == set(eng["files"])
          and {"prefill", "decode"} <= set(eng["profiles"]["decoder"]), where,
          "engines.profiles must give each engine's profiles (the decoder: prefill and decode)")
    max_seq = data["kv_cache"]["max_seq"]
    caps = eng.get("kv_capacity")
    _need(isinstance(caps, list) and len(caps) == data["model"]["num_layers"]
          and all(_positive(c) and c <= max_seq for c in caps), where,
          "engines.kv_capacity must give each layer's KV entries per row, at most kv_cache.max_seq")
    _need(_positive(eng.get("max_batch")) and eng["max_batch"] <= data["kv_cache"]["max_batch"], where,
          "engines.max_batch must be a positive integer within kv_cache.max_batch")
    _need(isinstance(eng.get("built"), str) and isinstance(eng.get("options"), dict), where,
          "engines.built (time) and engines.options must be present")


def _check_decoder_io(data: dict, kind: str, graph: dict, where: Path) -> None:
    """A decoder graph's inputs and outputs must be the model's: one set per layer, the declared
    geometry in every static dimension, span inputs exactly when the artifact routes."""
    model, routed = data["model"], data["routing"]["mode"] in ROUTED_MODES
    layers, mod_layers = model["num_layers"], data["recipe"]["mod_layers"]
    ins = {i["role"]: i for i in graph["inputs"]}
    outs = {o["role"]: o for o in graph["outputs"]}
    want_in = {"inputs_embeds", "seq_lengths", "past_length"} | {f"{p}.{i}" for i in range(layers)
                                                                 for p in ("past_key", "past_value", "kv_length")}
    want_out = {"logits"} | {f"{p}.{i}" for i in range(layers) for p in ("present_key", "present_value", "new_kv_length")}
    if routed and kind != "decode_ort":
        want_in |= {"span_start", "span_length"} | {f"capacity.{i}" for i in mod_layers}
        want_out |= {f"kept_indices.{i}" for i in mod_layers}
        if data["routing"]["mode"] == "threshold":
            want_out |= {f"above_threshold.{i}" for i in mod_layers}
    for side, have, want in (("inputs", ins, want_in), ("outputs", outs, want_out)):
        missing, extra = sorted(want - set(have)), sorted(set(have) - want)
        _need(not missing and not extra, where, f"graphs.{kind}.{side} do not match the model's {layers} layers"
              f"{' and its routing' if routed else ''} (missing {missing[:3]}, unexpected {extra[:3]})")
    hidden, kv_heads, head_dim = model["hidden_size"], model["num_kv_heads"], model["head_dim"]

    def static(item, index, value, what):
        dim = item["shape"][index] if index < len(item["shape"]) else None
        _need(len(item["shape"]) > index and (not isinstance(dim, int) or dim == value), where,
              f"graphs.{kind}: {item['name']} has {what} {dim}, the manifest's model says {value}")

    static(ins["inputs_embeds"], 2, hidden, "hidden size")
    static(outs["logits"], 1, model["vocab_size"], "vocabulary size")
    for i in range(layers):
        for role in (f"past_key.{i}", f"past_value.{i}"):
            static(ins[role], 1, kv_heads, "key/value heads")
            static(ins[role], 3, head_dim, "head size")
    for role in ("span_length",) + tuple(f"capacity.{i}" for i in mod_layers):
        if role in ins:
            _need(ins[role]["dtype"] == "int32" and ins[role]["shape"] == [1], where,
                  f"graphs.{kind}: {role} must be an int32 [1] shape input")
    _need(ins["inputs_embeds"]["dtype"] == model["dtype"], where,
          f"graphs.{kind}: inputs_embeds is {ins['inputs_embeds']['dtype']}, the model is {model['dtype']}")


def check_graph_io(manifest: "Manifest", kind: str, inputs: list[tuple], outputs: list[tuple]) -> None:
    """Compare a graph as a backend opened it — (name, numpy dtype name, shape with None or str
    for dynamic dims) of each input and output — with what the manifest says of it, in one line."""
    entry = manifest.graph(kind)
    where = manifest.root / MANIFEST
    for side, actual, declared in (("inputs", inputs, entry["inputs"]), ("outputs", outputs, entry["outputs"])):
        have = {name: (dtype, shape) for name, dtype, shape in actual}
        want = {d["name"]: d for d in declared}
        if set(have) != set(want):
            diff = sorted(set(have) ^ set(want))
            raise GammamodError(f"{where}: graphs.{kind}.{side} do not match {entry['file']} (differ in {diff[:4]}); "
                                "the manifest was edited or the graph replaced: re-export")
        for name, d in want.items():
            dtype, shape = have[name]
            if dtype != d["dtype"] or len(shape) != len(d["shape"]) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, d["shape"])):
                raise GammamodError(f"{where}: graphs.{kind}: {name} is {dtype} {list(shape)} in {entry['file']}, the "
                                    f"manifest says {d['dtype']} {d['shape']}: re-export")
