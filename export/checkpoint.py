"""Load the authors' checkpoint directories as they are.

Formats (by ``model_type`` in config.json):

* ``mod_llava_llama`` (gamma-MoD, LLaVA-HR layout): a ``mod`` dict; the shared router is stored
  under one or several ``model.layers.{i}.router.weight`` keys; transformers-4.31 saves carry
  ``rotary_emb.inv_freq`` buffers.
* ``pmod_llava_llama`` (p-MoD): MoD layers wrap the Llama layer, so their keys are
  ``model.layers.{i}.decoder_layer.*`` and ``model.layers.{i}.router.router.{weight,bias}``.
* ``llava_llama`` (original LLaVA) and ``llava`` (the transformers port, old and new key
  layouts): dense baselines. ``llama``: a language model alone.

Key translation to the model's names is the short table in :func:`canonical_key`. Weights come
from ``model.safetensors``, sharded safetensors with an index, or ``pytorch_model*.bin`` read
with ``weights_only=True``. Every problem is a one-line :class:`GammamodError` naming the file
and the key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gammamod.errors import GammamodError

from . import recipes as rc
from .model import DecoderConfig, MoDLlava, VisionSpec

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

FORMATS = {
    "mod_llava_llama": "gamma-mod",
    "pmod_llava_llama": "p-mod",
    "llava_llama": "llava",
    "llava": "llava-hf",
    "llama": "llama",
}

# transformers' LlamaConfig defaults: the llava-hf configs spell out only what differs.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False)

_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"), re.compile(r".*embeddings\.position_ids$"))


@dataclass
class CheckpointInfo:
    path: Path
    format: str  # gamma-mod | p-mod | llava | llava-hf | llama
    config: dict
    weight_files: list[Path]


# --------------------------------------------------------------------------------------------
# config.json


def read_json(path: Path, what: str = "file") -> dict:
    if not path.is_file():
        raise GammamodError(f"{path}: no such {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GammamodError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GammamodError(f"{path}: expected a JSON object")
    return data


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise GammamodError(f"{ckpt}: not a checkpoint directory (expected a folder with config.json)")
    config = read_json(ckpt / "config.json", "config.json (a checkpoint directory holds one)")
    model_type = config.get("model_type")
    if model_type not in FORMATS:
        raise GammamodError(f"{ckpt / 'config.json'}: unknown model_type {model_type!r}, expected one of "
                            f"{', '.join(FORMATS)}")
    return CheckpointInfo(ckpt, FORMATS[model_type], config, weight_files(ckpt))


def weight_files(ckpt: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise GammamodError(f"{index}: expected a non-empty 'weight_map'")
            files = sorted({ckpt / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise GammamodError(f"{f}: shard named in {index_name} is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt / name).is_file():
            return [ckpt / name]
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise GammamodError(f"{ckpt}: no weights found (expected model.safetensors, a sharded "
                        "model.safetensors.index.json, or pytorch_model.bin)")


def decoder_config(info: CheckpointInfo) -> DecoderConfig:
    cfg = info.config
    if info.format == "llava-hf":
        cfg = {**LLAMA_DEFAULTS, **(cfg.get("text_config") or {})}
    else:
        cfg = {**LLAMA_DEFAULTS, **cfg}
    where = info.path / "config.json"
    if cfg.get("hidden_act", "silu") != "silu":
        raise GammamodError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported, expected silu (Llama)")
    rope = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", params.get("rope_type", "default")))
    if kind not in ("default", "linear"):
        raise GammamodError(f"{where}: rope scaling {kind!r} is not supported (expected none or linear)")
    factor = float(rope.get("factor", params.get("factor", 1.0))) if kind == "linear" else 1.0
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return DecoderConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), rms_norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=theta, rope_linear_factor=factor,
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def recipe_for(info: CheckpointInfo, num_layers: int) -> tuple[rc.Recipe, bool]:
    """The checkpoint's recipe and whether its routers carry a bias."""
    cfg, where = info.config, info.path / "config.json"
    if info.format == "gamma-mod":
        mod = cfg.get("mod")
        if not isinstance(mod, dict):
            raise GammamodError(f"{where}: model_type mod_llava_llama needs a 'mod' object "
                                "(mod_mode, mod_layers_idx, capacity_factor)")
        layers = rc.gamma_mod_layers(mod, num_layers)
        if not layers:
            raise GammamodError(f"{where}: mod config selects no MoD layer")
        return rc.gamma_mod(layers, source={"mod": mod}), False
    if info.format == "p-mod":
        for key in ("mod_target_layers", "mod_weight_norm"):
            if not isinstance(cfg.get(key), str):
                raise GammamodError(f"{where}: p-MoD config needs the string field {key!r}")
        # p-MoD's code reads the field with vision_hr as its default, and only on anyres images:
        # without anyres every image token is routable unless it says 'all' (text routable too)
        token_type = cfg.get("mod_target_token_type")
        anyres = cfg.get("image_aspect_ratio") == "anyres"  # their test: anything else takes the LLaVA-1.5 path
        if anyres and token_type in (None, "vision_hr"):
            raise GammamodError(f"{where}: mod_target_token_type {token_type or 'absent (p-MoD reads vision_hr)'}: "
                                "with anyres that leaves the base tile unrouted, which is not supported (expected "
                                "vision_all, every image token routable, as the released NeXT models set)")
        if token_type not in (None, "vision_all", "vision_hr"):
            raise GammamodError(f"{where}: mod_target_token_type {token_type!r} is not supported "
                                "(expected vision_all: every image token routable)")
        factor = float(cfg.get("mod_router_factor", 0.5))
        schedule = rc.p_mod_schedule(cfg["mod_target_layers"], factor, num_layers)
        listed = cfg.get("mod_target_layer_indices")
        if listed is not None and sorted(listed) != sorted(schedule):
            raise GammamodError(f"{where}: mod_target_layer_indices {listed} disagree with "
                                f"mod_target_layers {cfg['mod_target_layers']!r} ({sorted(schedule)})")
        source = {k: cfg.get(k) for k in ("mod_target_layers", "mod_target_token_type", "mod_router_factor",
                                          "mod_weight_norm", "mod_bias_enabled")}
        recipe = rc.p_mod(schedule, rc.ScoreNorm.parse(cfg["mod_weight_norm"]), source=source)
        return recipe, bool(cfg.get("mod_bias_enabled", False))
    return rc.dense(), False


# --------------------------------------------------------------------------------------------
# vision tower


def _tower_config_from_dir(tower_dir: Path) -> dict:
    cfg = read_json(tower_dir / "config.json", "vision tower config.json")
    if "vision_config" in cfg:  # a full CLIPModel directory
        cfg = cfg["vision_config"] or {}
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise GammamodError(f"{tower_dir / 'config.json'}: vision tower model_type {model_type!r} is not "
                            "supported (expected a CLIP vision model)")
    return _clip_fields(cfg)


def _clip_fields(cfg: dict) -> dict:
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "num_channels", "layer_norm_eps", "hidden_act", "projection_dim")
    defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return {**defaults, **{k: cfg[k] for k in keep if k in cfg}}


def _infer_tower_config(shapes: dict[str, tuple]) -> dict:
    """A CLIP vision config from the shapes of the tower weights (heads of 64 channels, as in
    every OpenAI CLIP ViT LLaVA uses)."""
    p = "vision_model."
    hidden, channels, patch_size = shapes[p + "embeddings.patch_embedding.weight"][:3]
    n_pos = shapes[p + "embeddings.position_embedding.weight"][0]
    grid = int(round((n_pos - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(p + r"encoder\.layers\.(\d+)\.", k)))
    inter = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    return _clip_fields(dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), image_size=grid * patch_size,
                             patch_size=patch_size, num_channels=channels))


def default_image_processor(image_size: int) -> dict:
    """CLIPImageProcessor settings of OpenAI's CLIP, which LLaVA inherits from its tower."""
    return {"do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "do_convert_rgb": True}


def _resolve_tower_dir(info: CheckpointInfo, vision_tower: str | os.PathLike | None) -> Path | None:
    if vision_tower is not None:
        d = Path(vision_tower)
        if not (d / "config.json").is_file():
            raise GammamodError(f"--vision-tower {d}: expected a local CLIP vision tower directory with config.json")
        return d
    name = info.config.get("mm_vision_tower") or info.config.get("vision_tower")
    if not isinstance(name, str) or not name:
        return None
    for cand in (Path(name), info.path / name):
        if (cand / "config.json").is_file():
            return cand
    return None


def vision_spec(info: CheckpointInfo, weights: "WeightIndex", vision_tower,
                vision_tower_slow=None) -> VisionSpec | None:
    """How images reach the decoder, and where the tower comes from. None: language model only.
    Tower weights from a tower directory are added to ``weights``."""
    cfg = info.config
    tower_prefix = "model.vision_tower.vision_tower."
    if not any(k.startswith("model.mm_projector.") for k in weights.refs):
        for flag, given in (("--vision-tower", vision_tower), ("--vision-tower-slow", vision_tower_slow)):
            if given is not None:
                raise GammamodError(f"{info.path}: {flag} given, but the checkpoint has no multimodal "
                                    "projector (a language-model-only checkpoint)")
        return None
    if vision_tower_slow is not None and not cfg.get("is_multipath_encoder"):
        raise GammamodError(f"--vision-tower-slow {vision_tower_slow}: {info.path} has no LLaVA-HR multi-path tower "
                            "(is_multipath_encoder), so no ConvNeXt branch to take weights for")
    tower_shapes = {k[len(tower_prefix):]: r.shape for k, r in weights.refs.items() if k.startswith(tower_prefix)}
    if info.format == "llava-hf":
        vcfg = cfg.get("vision_config") or {}
        spec = VisionSpec(
            projector_type="mlp2x_gelu", mm_hidden_size=int(vcfg.get("hidden_size", 1024)),
            select_layer=int(cfg.get("vision_feature_layer", -2)),
            select_feature="patch" if cfg.get("vision_feature_select_strategy", "default") == "default" else "cls_patch",
            image_aspect_ratio="square")
        spec.tower_config = _clip_fields({**dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=336, patch_size=14), **vcfg})
        spec.tower_source = f"{info.path} (vision_config)"
        proc = info.path / "preprocessor_config.json"
        spec.image_processor = read_json(proc) if proc.is_file() else default_image_processor(
            spec.tower_config["image_size"])
        if spec.image_processor.get("do_pad"):
            spec.image_aspect_ratio = "pad"
        return spec

    where = info.path / "config.json"
    if cfg.get("mm_use_im_start_end"):
        raise GammamodError(f"{where}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    merge = cfg.get("mm_patch_merge_type", "flat")
    aspect = cfg.get("image_aspect_ratio", "square")
    spec = VisionSpec(
        projector_type=cfg.get("mm_projector_type", "linear"),
        mm_hidden_size=int(cfg.get("mm_hidden_size", 1024)),
        select_layer=int(cfg.get("mm_vision_select_layer", -1)),
        select_feature=cfg.get("mm_vision_select_feature", "patch"),
        image_aspect_ratio=aspect)
    if spec.select_feature not in ("patch", "cls_patch"):
        raise GammamodError(f"{where}: mm_vision_select_feature {spec.select_feature!r}: expected patch or cls_patch")
    if cfg.get("is_multipath_encoder"):
        return _multipath_spec(info, weights, vision_tower, vision_tower_slow, spec)
    if aspect != "anyres" and (aspect not in ("pad", "square") or merge != "flat"):
        spec.tower_source = (f"image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not supported "
                             "(expected pad or square with flat, or anyres with spatial_unpad)")
        return spec

    tower_dir = _resolve_tower_dir(info, vision_tower)
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if tower_dir is not None:
        spec.tower_config = _tower_config_from_dir(tower_dir)
        spec.tower_source = str(tower_dir)
        proc = tower_dir / "preprocessor_config.json"
        if not proc.is_file():
            proc = info.path / "preprocessor_config.json"
        if not tower_shapes:
            _index_tower_weights(tower_dir, weights, tower_prefix)
    elif tower_shapes:
        spec.tower_config = _infer_tower_config(tower_shapes)
        spec.tower_source = (f"{info.path} (tower weights in the checkpoint; config inferred from their shapes, "
                             "with attention heads of 64 channels as in OpenAI's CLIP)")
        proc = info.path / "preprocessor_config.json"
    else:
        spec.tower_source = (f"the checkpoint names vision tower {name!r}, which is not a local directory and "
                             "cannot be downloaded here; pass --vision-tower DIR with a local copy "
                             "(config.json and weights)")
        return spec
    spec.image_processor = read_json(proc) if proc.is_file() else default_image_processor(
        spec.tower_config["image_size"])
    if aspect == "anyres":
        from .anyres import anyres_from_config

        spec.anyres = anyres_from_config(cfg, spec.tower_config, spec.image_processor, where)
    return spec


def _multipath_spec(info: CheckpointInfo, weights: "WeightIndex", vision_tower, vision_tower_slow,
                    spec: VisionSpec) -> VisionSpec:
    """LLaVA-HR's CLIP + ConvNeXt tower (``is_multipath_encoder``): the CLIP branch's config from the
    tower directory, or inferred from its weights; the ConvNeXt branch's from its weights
    (``vision_tower_slow`` names a timm variant, but the authors' code reads only whether it says
    'xxlarge'); the processor the authors hard-code for the ConvNeXt branch at ``input_image_size``.

    The weights are the checkpoint's. As in the authors' code, where each branch is first built
    with its pretrained weights (CLIP from ``mm_vision_tower``, ConvNeXt from timm) and the
    checkpoint then overwrites whatever it holds, a branch's weights the checkpoint lacks come from
    a local directory: the CLIP directory (``vision_tower``) and the ConvNeXt weights directory
    (``vision_tower_slow``, timm's or open_clip's layout)."""
    from . import llava_hr as hr

    cfg, where = info.config, info.path / "config.json"
    size = cfg.get("input_image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise GammamodError(f"{where}: is_multipath_encoder needs input_image_size, the side in pixels both branches "
                            f"take (1024 in the gamma-MoD releases), got {size!r}")
    if spec.image_aspect_ratio not in ("pad", "square"):
        raise GammamodError(f"{where}: image_aspect_ratio {spec.image_aspect_ratio!r} with the multi-path tower: "
                            "expected pad (the releases) or square")
    slow_name = str(cfg.get("vision_tower_slow") or "")
    slow_dir = _resolve_slow_dir(info, vision_tower_slow)
    sources = [f"{info.path} (checkpoint)"]
    if slow_dir is not None:
        taken = _index_convnext_weights(slow_dir, weights, slow_name)
        sources.append(f"{slow_dir} ({taken} ConvNeXt tensors the checkpoint lacks)" if taken else
                       f"not {slow_dir} (the checkpoint holds every ConvNeXt tensor)")
    tower_dir = _resolve_tower_dir(info, vision_tower)
    if tower_dir is not None:
        taken = _index_tower_weights(tower_dir, weights, hr.FAST, overlay=True)
        if taken:
            sources.append(f"{tower_dir} ({taken} CLIP tensors the checkpoint lacks)")
    shapes = {k: tuple(r.shape) for k, r in weights.refs.items() if k.startswith(hr.PREFIX)}
    convnext = hr.convnext_from_shapes(shapes, str(info.path), slow_name, hint=_missing_hint(hr.SLOW, slow_dir))
    if tower_dir is not None:
        clip = _tower_config_from_dir(tower_dir)
        spec.tower_source = f"{tower_dir} (CLIP config); weights: " + ", ".join(sources)
    else:
        fast = {k[len(hr.FAST):]: s for k, s in shapes.items() if k.startswith(hr.FAST)}
        for key in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                    "vision_model.encoder.layers.0.mlp.fc1.weight"):
            if key not in fast:
                raise GammamodError(f"{info.path}: missing key {hr.FAST}{key} (the LLaVA-HR CLIP branch is incomplete"
                                    f"{_missing_hint(hr.FAST, None)})")
        clip = _infer_tower_config(fast)
        spec.tower_source = ("CLIP config inferred from its weights (heads of 64 channels as in OpenAI's CLIP); "
                             "weights: " + ", ".join(sources))
    # the authors build the adapters only when the tower was trained (freeze_vision false, as released)
    spec.multipath = hr.MultiPathSpec(size, not cfg.get("freeze_vision", True), convnext)
    hr.check_geometry(spec.multipath, clip, str(where))
    spec.tower_config = clip
    spec.image_processor = hr.convnext_processor(size)
    return spec


def _missing_hint(prefix: str, given: Path | None) -> str:
    """Where a missing LLaVA-HR branch weight could have come from, for the error naming it."""
    from . import llava_hr as hr

    if prefix == hr.SLOW:
        return (f"; not in {given} either" if given is not None else
                "; give timm's ConvNeXt weights with --vision-tower-slow DIR if the checkpoint does not hold them")
    if prefix == hr.FAST:
        return (f"; not in {given} either" if given is not None else
                "; give the CLIP directory with its weights with --vision-tower DIR if the checkpoint does not "
                "hold them")
    return ""


# weight files of a ConvNeXt directory, first found wins: timm's (hub ``timm/convnext_large_mlp.*``,
# among them the default tag the authors' code downloads) or open_clip's (hub
# ``laion/CLIP-convnext_large_d_320.*``, what the config's ``vision_tower_slow`` tag points at)
CONVNEXT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                  "open_clip_pytorch_model.bin")


def _resolve_slow_dir(info: CheckpointInfo, vision_tower_slow) -> Path | None:
    """The ConvNeXt weights: the given directory (or weight file), else the config's
    ``vision_tower_slow`` when it names a local directory (as ``mm_vision_tower`` may), else None."""
    if vision_tower_slow is not None:
        d = Path(vision_tower_slow)
        if not d.exists():
            raise GammamodError(f"--vision-tower-slow {d}: no such directory (expected timm's or open_clip's "
                                "ConvNeXt weights)")
        return d
    name = info.config.get("vision_tower_slow")
    if isinstance(name, str) and name:
        for cand in (Path(name), info.path / name):
            if cand.is_dir() and any((cand / f).is_file() for f in CONVNEXT_FILES):
                return cand
    return None


def _convnext_file(d: Path) -> Path:
    if d.is_file():
        if d.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise GammamodError(f"--vision-tower-slow {d}: expected a directory, or a .safetensors or .bin weight file")
        return d
    for name in CONVNEXT_FILES:
        if (d / name).is_file():
            return d / name
    raise GammamodError(f"--vision-tower-slow {d}: no ConvNeXt weights (expected one of {', '.join(CONVNEXT_FILES)})")


def _index_convnext_weights(d: Path, weights: "WeightIndex", slow_name: str) -> int:
    """Index a timm or open_clip ConvNeXt's stem and stages under the checkpoint's ConvNeXt keys,
    for each tensor the checkpoint does not hold (its own win). Returns how many were taken."""
    from . import llava_hr as hr

    arch = None
    if d.is_dir() and (d / "config.json").is_file():
        arch = read_json(d / "config.json", "timm config.json").get("architecture")
        if arch is not None and (not isinstance(arch, str) or not arch.startswith("convnext")):
            raise GammamodError(f"{d / 'config.json'}: architecture {arch!r} is not a ConvNeXt (expected "
                                "convnext_large_mlp, the LLaVA-HR releases' ConvNeXt)")
        if isinstance(arch, str) and ("xxlarge" in arch) != ("xxlarge" in slow_name):
            raise GammamodError(f"{d / 'config.json'}: architecture {arch!r} while the checkpoint's vision_tower_slow "
                                f"is {slow_name!r}; the authors build the ConvNeXt from vision_tower_slow")
    f = _convnext_file(d)
    listed = weights.list_file(f)
    keys = [k for k, _, _ in listed]
    if any(k.startswith("visual.trunk.") for k in keys):
        prefix = "visual.trunk."  # open_clip's CLIP model: the image tower's timm trunk
    elif any(k.startswith(("stem.", "stages.")) for k in keys):
        prefix = ""  # timm's own layout
    elif any(k.startswith("downsample_layers.") for k in keys):
        raise GammamodError(f"{f}: Facebook's original ConvNeXt layout (downsample_layers.*) is not read; expected "
                            "timm's (stem.*, stages.*) or open_clip's (visual.trunk.*)")
    else:
        raise GammamodError(f"{f}: no ConvNeXt weights found (expected timm's stem.* and stages.* keys, or "
                            "open_clip's visual.trunk.*)")
    taken = 0
    for key, shape, dtype in listed:
        if not key.startswith(prefix):
            continue  # open_clip: the text tower and the image head
        name = key[len(prefix):]
        if not name.startswith(("stem.", "stages.")):
            continue  # the classifier head (head.*, norm_pre), which the tower never reads
        # timm calls a block's layer scale ``gamma``; the authors' copy of timm calls it ``weight``
        name = re.sub(r"(blocks\.\d+)\.gamma$", r"\1.weight", name)
        taken += weights.add_missing(hr.SLOW + name, TensorRef(f, key, shape, dtype))
    return taken


def _has_weights(d: Path) -> bool:
    try:
        weight_files(d)
        return True
    except GammamodError:
        return False


def _index_tower_weights(tower_dir: Path, weights: "WeightIndex", prefix: str, overlay: bool = False) -> int:
    """A CLIP directory's ``vision_model.*`` weights under ``prefix``; with ``overlay`` only those
    the checkpoint lacks (its own win), and none from a directory that holds only the config.
    Returns how many were taken."""
    try:
        files = weight_files(tower_dir)
    except GammamodError:
        if overlay:
            return 0
        raise GammamodError(f"{tower_dir}: the checkpoint holds no vision tower weights and this tower directory "
                            "has none either (expected model.safetensors or pytorch_model.bin)") from None
    found = taken = 0
    for f in files:
        for key, shape, dtype in weights.list_file(f):
            if any(p.match(key) for p in _IGNORED):
                continue  # the position_ids buffer older transformers saved
            if key.startswith("vision_model."):
                name = key
            elif key.split(".")[0] in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
                name = "vision_model." + key  # saved by transformers 5, which dropped the prefix
            else:
                continue  # e.g. a full CLIPModel's text tower
            found += 1
            if overlay:
                taken += weights.add_missing(prefix + name, TensorRef(f, key, shape, dtype))
            else:
                weights.add(prefix + name, TensorRef(f, key, shape, dtype))
                taken += 1
    if not found:
        raise GammamodError(f"{tower_dir}: no 'vision_model.*' weights found")
    return taken


# --------------------------------------------------------------------------------------------
# weights: indexed from file headers, read one tensor at a time


@dataclass(frozen=True)
class TensorRef:
    file: Path
    key: str
    shape: tuple
    dtype: str


def _bin_state(path: Path) -> dict:
    """A .bin state dict, memory-mapped (weights_only=True: no code runs on load)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights one level down
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GammamodError(f"{path}: expected a state dict of tensors")
    return state


class WeightIndex:
    """Model parameter name -> where its tensor lives. Reads lazily, one tensor at a time."""

    def __init__(self):
        self.refs: dict[str, TensorRef] = {}
        self._bin: tuple[Path, dict] | None = None  # the one .bin file kept memory-mapped

    def _bin_file(self, path: Path) -> dict:
        if self._bin is None or self._bin[0] != path:
            self._bin = (path, _bin_state(path))
        return self._bin[1]

    def list_file(self, path: Path) -> list[tuple[str, tuple, str]]:
        """(key, shape, dtype) of every tensor in one weight file, without reading the data."""
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    out = []
                    for key in f.keys():
                        sl = f.get_slice(key)
                        out.append((key, tuple(sl.get_shape()), str(sl.get_dtype())))
                    return out
            return [(k, tuple(v.shape), str(v.dtype)) for k, v in self._bin_file(path).items()]
        except GammamodError:
            raise
        except Exception as e:  # corrupt or foreign files: say which, in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GammamodError(f"{path}: cannot read weights ({msg})") from None

    def add_missing(self, name: str, ref: TensorRef) -> bool:
        """Index ``ref`` under ``name`` unless a tensor already is (the checkpoint's own win over a
        tower directory's); whether it was added."""
        if name in self.refs:
            return False
        self.refs[name] = ref
        return True

    def add(self, name: str, ref: TensorRef) -> None:
        if name in self.refs:
            other = self.refs[name]
            raise GammamodError(f"{ref.file}: key {ref.key} appears twice (also in {other.file})")
        self.refs[name] = ref

    def read(self, name: str) -> torch.Tensor:
        ref = self.refs[name]
        try:
            if ref.file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(ref.file), framework="pt") as f:
                    return f.get_tensor(ref.key)
            return self._bin_file(ref.file)[ref.key]
        except GammamodError:
            raise
        except Exception as e:
            raise GammamodError(f"{ref.file}: cannot read {ref.key} ({str(e).splitlines()[0][:120]})") from None

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, refusing NaN/inf, converted to ``dtype``."""
        value = self.read(name)
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                ref = self.refs[name]
                raise GammamodError(f"{ref.file}: {ref.key} holds NaN or inf values")
            if dtype is not None:
                value = value.to(dtype)
        return value


def canonical_key(fmt: str, key: str) -> str:
    """Checkpoint key -> model parameter name. The only renames there are."""
    if fmt == "p-mod":
        return re.sub(r"^(model\.layers\.\d+)\.decoder_layer\.", r"\1.", key)
    if fmt == "llava-hf":
        for old, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                         ("language_model.lm_head.", "lm_head."),
                         ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("model.vision_tower.", "model.vision_tower.vision_tower."),
                         ("vision_tower.", "model.vision_tower.vision_tower.")):
            if key.startswith(old):
                return new + key[len(old):]
    return key


def checkpoint_key(fmt: str, name: str, mod_layers=()) -> str:
    """Model parameter name -> key in the authors' layout (make-tiny writes these)."""
    if fmt == "p-mod":
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) in mod_layers and not m.group(2).startswith("router."):
            return f"model.layers.{m.group(1)}.decoder_layer.{m.group(2)}"
    if fmt == "llava-hf":
        for ours, theirs in (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                             ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
                             ("model.vision_tower.vision_tower.", "vision_tower."),
                             ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
            if name.startswith(ours):
                return theirs + name[len(ours):]
    return name


def _check_inv_freq(path: Path, key: str, value: torch.Tensor, cfg: DecoderConfig) -> None:
    d = cfg.head_dim
    expected = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)) / cfg.rope_linear_factor
    if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=1e-3):
        raise GammamodError(f"{path}: {key} does not match rope_theta={cfg.rope_theta} and head_dim={d} "
                            "from config.json (a rope scaling the config does not declare?)")


def index_weights(info: CheckpointInfo, cfg: DecoderConfig) -> WeightIndex:
    """Every checkpoint tensor under its model name (rotary buffers checked and dropped)."""
    index = WeightIndex()
    for f in info.weight_files:
        for key, shape, dtype in index.list_file(f):
            if any(p.match(key) for p in _IGNORED):
                if key.endswith("inv_freq"):
                    index.refs["__inv_freq__"] = TensorRef(f, key, shape, dtype)
                    _check_inv_freq(f, key, index.read("__inv_freq__"), cfg)
                    del index.refs["__inv_freq__"]
                continue
            index.add(canonical_key(info.format, key), TensorRef(f, key, shape, dtype))
    return index


def _fold_shared_router(info: CheckpointInfo, weights: WeightIndex, recipe: rc.Recipe) -> None:
    """gamma-MoD stores its one router under one or several MoD layers: check the copies agree."""
    keys = [f"model.layers.{i}.router.weight" for i in recipe.mod_layers]
    present = [k for k in keys if k in weights.refs]
    if not present:
        raise GammamodError(f"{info.weight_files[0]}: missing the shared gamma-MoD router: none of "
                            f"{keys[0]} ... {keys[-1]} is stored")
    first = weights.read(present[0])
    for k in present[1:]:
        other = weights.read(k)
        if other.shape != first.shape or not torch.equal(other, first):
            raise GammamodError(f"{weights.refs[k].file}: {k} differs from {present[0]}; gamma-MoD's router is one "
                                "Linear shared by every MoD layer")
    for k in keys:
        weights.refs.setdefault(k, weights.refs[present[0]])


@dataclass
class Checkpoint:
    """A checkpoint opened and checked, its weights indexed but not read."""

    info: CheckpointInfo
    config: DecoderConfig
    recipe: rc.Recipe
    router_bias: bool
    vision: VisionSpec | None
    weights: WeightIndex

    def skeleton(self, dtype: torch.dtype = torch.float32, device: str = "meta") -> MoDLlava:
        """The model's modules with parameters on ``device`` (meta: no memory, for tracing)."""
        with torch.device(device):
            model = MoDLlava(self.config, self.recipe, self.vision, self.router_bias)
        model.to(dtype)
        model.source = {"path": str(self.info.path), "format": self.info.format, "config": self.info.config,
                        "weight_files": [str(f) for f in self.info.weight_files]}
        return model.eval()

    def parameter_names(self) -> dict[str, tuple]:
        """Every parameter the model needs (shared and tied ones once) and its shape."""
        model = self.skeleton()
        return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}

    def buffer_value(self, name: str) -> torch.Tensor:
        """Values of the non-persistent buffers (not in the checkpoint)."""
        if name.endswith("embeddings.position_ids"):
            cfg = self.vision.tower_config
            n = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
            return torch.arange(n).expand((1, -1))
        raise KeyError(name)

    def load(self, dtype: torch.dtype = torch.float32) -> MoDLlava:
        model = self.skeleton(dtype)
        state = {}
        for name in dict(model.state_dict(keep_vars=True)):
            if name in self.weights.refs:
                state[name] = self.weights.tensor(name, dtype)
        model.load_state_dict(state, assign=True, strict=False)
        _materialize_buffers(model)
        if self.recipe.router == "shared-binary":  # assign=True gave each layer its own copy: share again
            shared = model.model.layers[self.recipe.mod_layers[0]].router
            for i in self.recipe.mod_layers:
                model.model.layers[i].router = shared
        if self.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def open_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                    vision_tower_slow: str | os.PathLike | None = None) -> Checkpoint:
    """Read config.json, index the weights from the file headers, and check names and shapes
    against the architecture the config describes, before any weight is read."""
    info = inspect_checkpoint(path)
    cfg = decoder_config(info)
    recipe, router_bias = recipe_for(info, cfg.num_layers)
    weights = index_weights(info, cfg)
    if recipe.router == "shared-binary":
        _fold_shared_router(info, weights, recipe)
    vision = vision_spec(info, weights, vision_tower, vision_tower_slow)
    if vision is not None and not vision.has_tower:
        weights.refs = {k: v for k, v in weights.refs.items()
                        if not k.startswith("model.vision_tower.") and k != "model.image_newline"}
    if vision is not None and vision.multipath is not None:
        from .llava_hr import UNUSED_KEYS

        weights.refs = {k: v for k, v in weights.refs.items() if not any(p.match(k) for p in UNUSED_KEYS)}
    if cfg.tie_word_embeddings:
        weights.refs.pop("lm_head.weight", None)
    ckpt = Checkpoint(info, cfg, recipe, router_bias, vision, weights)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoDLlava(cfg, recipe, vision, router_bias).state_dict().items()
                    if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    extra = sorted(set(weights.refs) - set(expected))
    if extra:
        ref = weights.refs[extra[0]]
        raise GammamodError(f"{ref.file}: unexpected key {ref.key} ({len(extra)} unexpected in all) "
                            f"for a {info.format} checkpoint")
    missing = sorted(set(expected) - set(weights.refs))
    if missing:
        hint = ""
        if vision is not None and vision.multipath is not None:
            from . import llava_hr as hr

            if missing[0].startswith(hr.SLOW):
                hint = _missing_hint(hr.SLOW, _resolve_slow_dir(info, vision_tower_slow))
            elif missing[0].startswith(hr.FAST):
                tower_dir = _resolve_tower_dir(info, vision_tower)
                hint = _missing_hint(hr.FAST, tower_dir if tower_dir is not None and _has_weights(tower_dir) else None)
        raise GammamodError(f"{info.path}: missing key {checkpoint_key(info.format, missing[0], recipe.mod_layers)} "
                            f"({len(missing)} missing in all{hint})")
    for name, shape in expected.items():
        ref = weights.refs[name]
        if tuple(ref.shape) != shape:
            raise GammamodError(f"{ref.file}: {ref.key} has shape {list(ref.shape)}, expected {list(shape)} "
                                "from config.json")
        if _dtype_name(ref.dtype) not in FLOAT_DTYPES:
            raise GammamodError(f"{ref.file}: {ref.key} holds {_dtype_name(ref.dtype)} values, expected floating "
                                "point weights (float32, float16 or bfloat16; quantized checkpoints are not read)")
    return ckpt


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _dtype_name(dtype: str) -> str:
    """A tensor's dtype as listed by safetensors ('F16') or torch ('torch.float16') -> 'float16'."""
    return _SAFETENSORS_DTYPES.get(dtype, dtype.removeprefix("torch."))


def load_checkpoint(path: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, *,
                    vision_tower_slow: str | os.PathLike | None = None) -> MoDLlava:
    """Load a gamma-MoD, p-MoD or LLaVA checkpoint directory into a :class:`MoDLlava`.

    ``vision_tower`` is a local CLIP directory, used when the checkpoint's tower is not a local
    path (original LLaVA checkpoints name a hub id). The tower weights come from the checkpoint
    when it holds them, else from that directory. ``vision_tower_slow`` (LLaVA-HR only) is a local
    directory, or weight file, of timm's or open_clip's ConvNeXt, for the ConvNeXt weights the
    checkpoint does not hold. A checkpoint without projector or tower loads as a language model;
    image input is then refused with the reason in ``model.vision.tower_source``.
    """
    return open_checkpoint(path, vision_tower, vision_tower_slow).load(dtype)


def _materialize_buffers(model: MoDLlava) -> None:
    """Non-persistent buffers are not in the checkpoint; the model was built on the meta device."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name == "position_ids" and hasattr(module, "num_positions"):  # CLIP embeddings
                module.register_buffer(name, torch.arange(module.num_positions).expand((1, -1)), persistent=False)
            else:
                raise RuntimeError(f"buffer {module_name}.{name} was not materialised after loading")
