"""The artifact manifest: the one contract between export, engines and runtime.

``manifest.json`` sits in an artifact directory and names every file there with its sha256.
Later stages read only the manifest and the files it names. The schema is versioned and
checked on read; a bad manifest is a one-line error naming the field.

Top-level fields (schema_version 1):

* ``recipe``: the routing recipe (name, MoD layers, router, span, positions, weighting, decode).
* ``routing``: ``mode`` (static | dense), the routable span, per-layer kept counts, image layout.
* ``model``: decoder geometry and dtype. ``kv_cache``: layout and per-layer prefill entries.
* ``graphs``: ``prefill``, ``decode`` and (when present) ``vision``, each a file and its inputs
  and outputs with roles (``inputs_embeds``, ``past_key.3``, ``kv_length.3``, ``logits`` ...);
  ``decode_ort``, when present, is ONNX Runtime's fused variant of ``decode`` (one token per row,
  KV appended in place into buffers bound as both past and present).
* ``embeddings``: the token embedding table (a .npy file), kept outside the decoder graph.
* ``tokenizer``, ``prompt``, ``image``: what turns text and pictures into inputs; None when the
  checkpoint has no tokenizer or no vision tower (see ``absent``).
* ``weights``: per weights file, each tensor's [offset, bytes, dtype, shape], so a runtime can
  map the weights once and hand them to every graph that uses them.
* ``files``: every file with sha256 and size. ``tensorrt``: plugin identity and per-version copies.
* ``tools``: the versions of the tools that wrote the artifact.
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
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_ROLE = re.compile(r"^(inputs_embeds|seq_lengths|past_length|logits|pixel_values|image_features|"
                   r"(past_key|past_value|kv_length|present_key|present_value|new_kv_length|kept_indices)\.\d+)$")
_GRAPH_KINDS = ("prefill", "decode", "vision", "decode_ort")


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
    def capacities(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in (self.data["routing"].get("capacities") or {}).items()}

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
                                            f"(it reads version {SCHEMA_VERSION}); re-export the checkpoint")
    for key, kind in (("recipe", dict), ("routing", dict), ("model", dict), ("kv_cache", dict),
                      ("graphs", dict), ("embeddings", dict), ("files", dict), ("tools", dict),
                      ("absent", list)):
        _need(isinstance(data.get(key), kind), where, f"'{key}' missing or not a {kind.__name__}")
    model = data["model"]
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        _need(isinstance(model.get(key), int) and model[key] > 0, where, f"model.{key} must be a positive integer")
    _need(model.get("dtype") in ("float32", "float16", "bfloat16"), where, "model.dtype must be float32|float16|bfloat16")
    routing = data["routing"]
    _need(routing.get("mode") in ("static", "dense"), where, "routing.mode must be static or dense")
    caps = routing.get("capacities") or {}
    _need(isinstance(caps, dict) and all(str(k).isdigit() and isinstance(v, int) and v > 0 for k, v in caps.items()),
          where, "routing.capacities must map layer indices to positive integers")
    span = routing.get("routable_span")
    if routing["mode"] == "static" and caps:
        _need(isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) and x >= 0 for x in span),
              where, "routing.routable_span must be [start, length]")
    kv = data["kv_cache"]
    for key in ("max_batch", "max_seq"):
        _need(isinstance(kv.get(key), int) and kv[key] > 0, where, f"kv_cache.{key} must be a positive integer")
    files = data["files"]
    for name, entry in files.items():
        _need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int),
              where, f"files[{name!r}] needs sha256 and bytes")
        _need("/" not in name and "\\" not in name and name not in (".", ".."), where,
              f"files[{name!r}]: artifact files live in the artifact directory")
    graphs = data["graphs"]
    for kind in ("prefill", "decode"):
        _need(kind in graphs, where, f"graphs.{kind} missing")
    for kind, g in graphs.items():
        _need(kind in _GRAPH_KINDS, where, f"graphs.{kind}: unknown graph kind")
        _need(isinstance(g, dict) and g.get("file") in files, where, f"graphs.{kind}.file must name a listed file")
        for side in ("inputs", "outputs"):
            io = g.get(side)
            _need(isinstance(io, list) and io, where, f"graphs.{kind}.{side} must be a non-empty list")
            for item in io:
                _need(isinstance(item, dict) and isinstance(item.get("name"), str)
                      and isinstance(item.get("role"), str) and _ROLE.match(item["role"]) is not None,
                      where, f"graphs.{kind}.{side}: bad entry {item!r}")
        for extra in g.get("weights", []):
            _need(extra in files, where, f"graphs.{kind}.weights names {extra!r}, not a listed file")
    for file, table in (data.get("weights") or {}).items():
        _need(file in files and isinstance(table, dict), where, f"weights[{file!r}] must describe a listed file")
        for name, entry in table.items():
            _need(isinstance(entry, list) and len(entry) == 4, where,
                  f"weights[{file!r}][{name!r}] must be [offset, bytes, dtype, shape]")
    emb = data["embeddings"]
    _need(emb.get("file") in files, where, "embeddings.file must name a listed file")
    absent = set(data["absent"])
    _need(absent <= {"vision", "tokenizer"}, where, "absent may list only vision and tokenizer")
    _need(("vision" in graphs) != ("vision" in absent), where, "graphs.vision must exist unless 'vision' is absent")
    if "tokenizer" not in absent:
        tok = data.get("tokenizer")
        _need(isinstance(tok, dict) and tok.get("files") and all(f in files for f in tok["files"]),
              where, "tokenizer.files must name listed files")
