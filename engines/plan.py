"""The build plan: what `gammamod build` will build for a target, computed from the manifest alone.

No TensorRT and no GPU are needed: ``--dry-run`` prints and writes this plan, and a real build
and a bundle's ``build.sh`` take their profiles from it, so what the plan says is what is built.

* Engines: the vision graph (one profile) and ONE decoder engine from the one decoder graph with
  two optimization profiles, ``prefill`` (chunks of 1 to max_seq tokens, a routed span) and
  ``decode`` (one token per row, no span): the weights are held once.
* Profiles give min/opt/max for every input: dimensions for tensors, values for the shape
  tensors ``span_length`` and ``capacity.<l>`` (INT32 [1]). A layer's KV input is a window of its
  cache buffer (``runtime.kvcache``: windows start at MIN_WINDOW entries and grow), bounded by the
  layer's KV capacity.
* KV capacity per layer at max_seq: a dense layer holds max_seq entries; a MoD layer skips
  ``N - k_l(N)`` tokens of a routed span of N, so it holds ``max_seq - min_N (N - k_l(N))`` over the
  span lengths the engines support (a prompt without a span, or a longer one than the cache
  holds, is refused by the runtime in one line). The dense twin holds max_seq in every layer.
* Memory: the engine weights at the build precision + the KV cache at max batch + the builder
  workspace, against the target's memory. TensorRT's activation memory is known only after a
  build (``ICudaEngine.device_memory_size``) and is not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gammamod.errors import GammamodError
from gammamod.manifest import SHORT_DTYPE
from gammamod.runtime.kvcache import MIN_WINDOW

from .targets import DEVICES, QUANTIZED, TARGETS, Device, check_precision

GIB, MIB = 1 << 30, 1 << 20
PROMPT_TEXT_TOKENS = 64  # a prompt's text around its image: the prefill profile's opt length
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
# bytes per weight element at each build precision: MatMul weights (2-D ``*.weight``) and the rest
# (norms, biases, RoPE tables). Quantized builds keep the rest in fp16; int4 adds one fp16 scale per
# block of 128.
INT4_BLOCK = 128
WEIGHT_BYTES = {"fp32": (4, 4), "fp16": (2, 2), "bf16": (2, 2), "fp8": (1, 2), "int8": (1, 2),
                "int4": (0.5 + 2 / INT4_BLOCK, 2)}
HARDWARE_COMPAT = ("none", "ampere+", "same-cc")
MOD_OPS = ("plugin", "native")


@dataclass
class BuildOptions:
    target: str
    requested_precision: str | None = None  # default: the artifact's dtype
    tensorrt: str | None = None  # parser version (10.3, 10.x, 11.x); default: the target's first
    max_batch: int | None = None  # default: the artifact's
    max_seq: int | None = None
    span_lengths: list[int] | None = None  # default: the artifact's
    timing_cache: str | None = None
    opt_level: int = 3
    workspace_mib: int = 1024
    hardware_compat: str = "none"
    version_compatible: bool = False
    mod_ops: str = "plugin"


def _bounded(name: str, value, default: int, limit: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GammamodError(f"--{name} {value!r}: expected a positive integer")
    if value > limit:
        raise GammamodError(f"--{name} {value}: the artifact was exported for at most {limit} {what}; "
                            f"re-export with a larger --{name}")
    return value


def _capacities(manifest, max_seq: int, span_lengths: list[int]) -> tuple[list[int], dict[int, dict[int, int]]]:
    """Each layer's KV capacity, and the kept counts {span length: {MoD layer: k}}."""
    rule = manifest.capacity_rule()
    caps = [max_seq] * manifest.num_layers
    counts = {n: rule.kept_counts(n) for n in [0] + span_lengths} if rule is not None else {}
    if rule is not None and manifest["routing"]["mode"] == "static":
        for layer in rule.layers:
            caps[layer] = max_seq - min(n - counts[n][layer] for n in span_lengths)
    return caps, counts


def _profile_entry(lo, opt, hi, values=False) -> dict:
    entry = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    if values:
        entry["values"] = True  # a shape tensor: min/opt/max are its values
    return entry


def decoder_profiles(manifest, max_batch: int, max_seq: int, span_lengths: list[int], caps: list[int],
                     counts: dict) -> dict[str, dict]:
    """min/opt/max of every decoder input for the ``prefill`` and ``decode`` profiles."""
    model = manifest["model"]
    hidden, kv_heads, head_dim = model["hidden_size"], model["num_kv_heads"], model["head_dim"]
    routed = manifest.routed
    span_max = max(span_lengths) if routed else 0
    image_tokens = (manifest.get("image") or {}).get("tokens", 0)
    prompt_opt = min(max_seq, (span_max if routed else image_tokens) + PROMPT_TEXT_TOKENS)
    profiles = {}
    for name, chunk, batch_opt in (("prefill", (1, prompt_opt, max_seq), 1), ("decode", (1, 1, 1), 1)):
        p = {}
        for item in manifest.graph("decoder")["inputs"]:
            role, kind = item["role"], item["role"].split(".")[0]
            if role == "inputs_embeds":
                p[item["name"]] = _profile_entry([1, chunk[0], hidden], [batch_opt, chunk[1], hidden],
                                                 [max_batch, chunk[2], hidden])
            elif kind in ("seq_lengths", "past_length", "span_start", "kv_length"):
                p[item["name"]] = _profile_entry([1], [batch_opt], [max_batch])
            elif role == "span_length":
                v = (0, span_max, span_max) if name == "prefill" else (0, 0, 0)
                p[item["name"]] = _profile_entry([v[0]], [v[1]], [v[2]], values=True)
            elif kind == "capacity":
                layer = int(role.split(".")[1])
                v = ((counts[0][layer], counts[span_max][layer], counts[span_max][layer]) if name == "prefill"
                     else (counts[0][layer],) * 3)
                p[item["name"]] = _profile_entry([v[0]], [v[1]], [v[2]], values=True)
            elif kind in ("past_key", "past_value"):
                cap = caps[int(role.split(".")[1])]
                first = min(MIN_WINDOW, cap)  # a fresh cache's window
                opt = first if name == "prefill" else cap
                p[item["name"]] = _profile_entry([1, kv_heads, first, head_dim], [batch_opt, kv_heads, opt, head_dim],
                                                 [max_batch, kv_heads, cap, head_dim])
            else:
                raise GammamodError(f"{manifest.root}: decoder input {item['name']} ({role}) has no profile rule")
        profiles[name] = p
    return profiles


def vision_profile(manifest, max_batch: int) -> dict:
    inp = manifest.graph("vision")["inputs"][0]
    static = [d for d in inp["shape"][1:]]
    return {inp["name"]: _profile_entry([1] + static, [1] + static, [max_batch] + static)}


def weight_bytes(manifest, precision: str) -> dict[str, int]:
    """Bytes of each graph's weights at ``precision`` (from the manifest's weight tables)."""
    matrix, other = WEIGHT_BYTES[precision]
    out = {}
    for kind in ("decoder", "vision"):
        graph = manifest.graph(kind)
        if graph is None:
            continue
        total = 0.0
        for file in graph.get("weights", []):
            for name, (_, _, dtype, shape) in manifest["weights"][file].items():
                if dtype not in DTYPE_BYTES or dtype.startswith("int"):
                    continue
                elements = math.prod(shape)
                if precision in QUANTIZED and kind == "vision":
                    total += elements * 2  # quantization is the decoder's: the tower stays fp16
                else:  # MatMul weights take the precision; norms, biases and RoPE tables stay
                    total += elements * (matrix if len(shape) >= 2 and ".weight" in name else other)
        out[kind] = int(math.ceil(total))
    return out


def kv_bytes(manifest, caps: list[int], max_batch: int) -> list[int]:
    model = manifest["model"]
    entry = 2 * model["num_kv_heads"] * model["head_dim"] * DTYPE_BYTES[manifest["kv_cache"].get("dtype", model["dtype"])]
    return [entry * max_batch * c for c in caps]


def memory_plan(manifest, dev: Device, precision: str, max_batch: int, max_seq: int, caps: list[int],
                workspace: int) -> dict:
    weights = weight_bytes(manifest, precision)
    kv = kv_bytes(manifest, caps, max_batch)
    dense_kv = kv_bytes(manifest, [max_seq] * len(caps), max_batch)
    total = sum(weights.values()) + sum(kv) + workspace
    device_bytes = int(dev.memory_gib * GIB)
    plan = {"weights": weights, "kv_cache": sum(kv), "kv_per_layer": kv, "kv_cache_dense_twin": sum(dense_kv),
            "workspace": workspace, "total": total, "total_dense_twin": total - sum(kv) + sum(dense_kv),
            "device": device_bytes, "fits": total <= device_bytes, "advice": None,
            "not_counted": "TensorRT's activation memory (known after the build: engine.device_memory_size)"}
    if not plan["fits"]:
        plan["advice"] = _advice(manifest, plan, dev, precision, max_batch, max_seq, caps)
    return plan


def _advice(manifest, plan, dev, precision, max_batch, max_seq, caps) -> str:
    free = plan["device"] - sum(plan["weights"].values()) - plan["workspace"]
    if free <= 0:
        lower = [p for p in ("int8", "int4") if p in dev.precisions and p != precision]
        return (f"the weights and workspace alone need {_gib(plan['total'] - plan['kv_cache'])} of {_gib(plan['device'])}: "
                f"lower --workspace, or build a quantized artifact ({' or '.join(lower) or 'none on this device'}), "
                "or use a larger device")
    per_row = plan["kv_cache"] // max_batch
    tips = []
    if free // per_row >= 1:
        tips.append(f"--max-batch {free // per_row}")
    skipped = sum(max_seq - c for c in caps)
    per_entry = per_row // sum(caps)
    seq = (free // (max_batch * per_entry) + skipped) // len(caps)
    if seq >= 1:
        tips.append(f"--max-seq {min(seq, max_seq)} at --max-batch {max_batch}")
    return "does not fit: lower " + " or ".join(tips) if tips else "does not fit: use a larger device"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def make_plan(manifest, opts: BuildOptions, dev: Device | None = None) -> dict:
    """The build plan for ``manifest`` on the target (refuses what the target cannot do)."""
    dev = dev or DEVICES.get(opts.target)
    if dev is None:
        from .targets import device

        dev = device(opts.target)
    tensorrt = opts.tensorrt or dev.tensorrt[0]
    if tensorrt not in dev.tensorrt and not (tensorrt == "10.3" and "10.x" in dev.tensorrt):
        raise GammamodError(f"--tensorrt {tensorrt}: {dev.name} runs TensorRT {' or '.join(dev.tensorrt)}")
    model, kv = manifest["model"], manifest["kv_cache"]
    quantized = (manifest.get("quantization") or {}).get("precision")
    precision = opts.requested_precision or quantized or SHORT_DTYPE[model["dtype"]]
    typing = check_precision(dev, precision, tensorrt, model["dtype"], quantized)
    if opts.mod_ops not in MOD_OPS:
        raise GammamodError(f"--mod-ops {opts.mod_ops!r}: expected plugin or native")
    if opts.hardware_compat not in HARDWARE_COMPAT:
        raise GammamodError(f"--hardware-compat {opts.hardware_compat!r}: expected {', '.join(HARDWARE_COMPAT)}")
    if opts.hardware_compat == "same-cc" and tensorrt == "10.3":
        raise GammamodError("--hardware-compat same-cc needs TensorRT 10.9 or later; TensorRT 10.3 has none or ampere+")
    if not 0 <= opts.opt_level <= 5:
        raise GammamodError(f"--opt-level {opts.opt_level}: expected 0 to 5")
    if opts.workspace_mib < 1:
        raise GammamodError(f"--workspace {opts.workspace_mib}: expected MiB >= 1")
    max_batch = _bounded("max-batch", opts.max_batch, kv["max_batch"], kv["max_batch"], "rows")
    max_seq = _bounded("max-seq", opts.max_seq, kv["max_seq"], kv["max_seq"], "tokens")
    routed = manifest.routed
    span_lengths = sorted(set(opts.span_lengths or (manifest["routing"].get("span_lengths") or []))) if routed else []
    for n in span_lengths:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < max_seq:
            raise GammamodError(f"--span-lengths: {n!r} must be a span length in [1, {max_seq})")
    caps, counts = _capacities(manifest, max_seq, span_lengths)
    if routed and opts.mod_ops == "native":
        from .targets import TOPK_MAX_K

        widest = max((k for c in counts.values() for k in c.values()), default=0)
        if widest >= TOPK_MAX_K:
            raise GammamodError(f"--mod-ops native: a MoD layer keeps {widest} tokens, and TensorRT's TopK takes "
                                f"K < {TOPK_MAX_K}: use --mod-ops plugin or shorter --span-lengths")
    uses_ops = routed and opts.mod_ops == "plugin"
    from .prepare import copy_name

    form = opts.mod_ops if routed else "plugin"  # a dense artifact has no MoD nodes: one form
    onnx_name = lambda kind: copy_name(manifest.graph(kind)["file"], tensorrt, form if kind == "decoder" else "plugin")  # noqa: E731
    engines = {"decoder": {"onnx": onnx_name("decoder"), "file": "engines/decoder.engine",
                           "profiles": decoder_profiles(manifest, max_batch, max_seq, span_lengths, caps, counts)}}
    if manifest.graph("vision") is not None:
        engines["vision"] = {"onnx": onnx_name("vision"), "file": "engines/vision.engine",
                             "profiles": {"default": vision_profile(manifest, max_batch)}}
    plugin = None
    if uses_ops:
        from .plugin_library import plugin_identity

        ident = plugin_identity()  # reads and hashes the plugin sources: once
        plugin = {**ident, **{k: manifest["tensorrt"]["plugin"][k] for k in ("namespace", "version")},
                  "file": "engines/" + ident["library"]}
    workspace = opts.workspace_mib * MIB
    return {
        "target": {**asdict(dev), "sm": dev.sm, "cuda_architecture": dev.cuda_architecture},
        "tensorrt": tensorrt, "precision": precision,
        "typing": "strong (types from the ONNX)" if typing == "strong" else f"weak (builder flag {precision.upper()})",
        "typing_mode": typing,
        "mod_ops": opts.mod_ops if routed else "none", "plugin": plugin,
        "max_batch": max_batch, "max_seq": max_seq, "span_lengths": span_lengths,
        "kept_counts": {str(n): {str(k): v for k, v in c.items()} for n, c in counts.items()},
        "kv_capacity": caps,
        "engines": engines,
        "options": {"timing_cache": opts.timing_cache, "opt_level": opts.opt_level, "workspace_mib": opts.workspace_mib,
                    "hardware_compat": opts.hardware_compat, "version_compatible": opts.version_compatible},
        "memory": memory_plan(manifest, dev, precision, max_batch, max_seq, caps, workspace),
        "parser_notes": TARGETS[tensorrt].notes,
    }


def format_plan(plan: dict) -> str:
    """The plan as a person reads it."""
    t, mem = plan["target"], plan["memory"]
    lines = [f"target {t['name']}: {t['gpu']} ({t['sm']}, {t['memory_gib']:g} GiB"
             f"{', JetPack ' + t['jetpack'] if t['jetpack'] else ''}), TensorRT {plan['tensorrt']}",
             f"precision {plan['precision']}: {plan['typing']}; MoD ops: {plan['mod_ops']}"
             + (f" (plugin library {plan['plugin']['library']}, kernels {plan['plugin']['kernels_version']})"
                if plan["plugin"] else ""),
             f"max batch {plan['max_batch']}, max sequence {plan['max_seq']}, span lengths "
             f"{plan['span_lengths'] or '-'}"]
    for kind, eng in plan["engines"].items():
        lines.append(f"{kind} engine <- {eng['onnx']}: {len(eng['profiles'])} profile(s)")
        for pname, prof in eng["profiles"].items():
            lines.append(f"  profile {pname}:")
            for name, e in _collapse(prof):
                tag = " (values)" if e.get("values") else ""
                lines.append(f"    {name:<28} min {_dims(e['min'])}  opt {_dims(e['opt'])}  max {_dims(e['max'])}{tag}")
    lines.append("device memory:")
    for kind, n in mem["weights"].items():
        lines.append(f"  {kind + ' weights':<28} {_gib(n):>12}")
    lines.append(f"  {'KV cache (MoD kept share)':<28} {_gib(mem['kv_cache']):>12}   dense twin {_gib(mem['kv_cache_dense_twin'])}")
    lines.append(f"  {'workspace':<28} {_gib(mem['workspace']):>12}")
    lines.append(f"  {'total':<28} {_gib(mem['total']):>12}   dense twin {_gib(mem['total_dense_twin'])}"
                 f"   of {_gib(mem['device'])}: {'fits' if mem['fits'] else 'DOES NOT FIT'}")
    if mem["advice"]:
        lines.append(f"  {mem['advice']}")
    lines.append(f"  (not counted: {mem['not_counted']})")
    return "\n".join(lines)


def _dims(d) -> str:
    return "x".join(str(x) for x in d)


def _collapse(profile: dict):
    """Per-layer inputs with equal ranges in consecutive layers shown once (``past_key.0-2``),
    grouped by name in the graph's order."""
    stems: dict[str, list] = {}
    for name, e in profile.items():
        stem, _, idx = name.rpartition(".")
        if not idx.isdigit():
            stem, idx = name, None
        runs = stems.setdefault(stem, [])
        if idx is not None and runs and runs[-1][2] == e and runs[-1][1] == int(idx) - 1:
            runs[-1][1] = int(idx)
        else:
            runs.append([None if idx is None else int(idx), None if idx is None else int(idx), e])
    for stem, runs in stems.items():
        for first, last, e in runs:
            yield (stem if first is None else f"{stem}.{first}" if first == last else f"{stem}.{first}-{last}"), e
