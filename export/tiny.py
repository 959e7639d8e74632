"""``gammamod make-tiny``: seeded, tiny but complete checkpoints in the authors' on-disk formats.

No weights can be downloaded here, so tests, the demo and later stages run on checkpoints this
module writes: config.json in the recipe's own schema, safetensors under the recipe's own keys
(gamma-MoD's shared router under one key and ``rotary_emb.inv_freq`` buffers as transformers
4.31 saved them; p-MoD's ``decoder_layer.*`` / ``router.router.*``; LLaVA's and llava-hf's
layouts), a sentencepiece tokenizer trained here, a tiny CLIP tower and its image processor
config. Routers get non-trivial weights, so routing decisions vary per token.

Sizes: ``tiny`` (hidden 64, 84 px images, 36 image tokens) for tests; ``bench`` (LLaVA-1.5
geometry: 336 px, 576 image tokens; hidden 512, 32 layers, 32000-token vocabulary) so timings
on two cores mean something.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from gammamod.errors import GammamodError
from gammamod.lifecycle import OutputDir, check_replaceable

from . import recipes as rc
from .checkpoint import checkpoint_key, default_image_processor
from .model import DecoderConfig, MoDLlava, VisionSpec

TINY_RECIPES = ("gamma-mod", "p-mod", "llava", "gamma-mod-hr", "p-mod-next")
SIZES = ("tiny", "bench")
TOWER_DIR = "clip-vision-tower"
MARKER = "gammamod-tiny.json"  # how --force recognises a checkpoint make-tiny wrote (loaders ignore it)


def is_tiny_checkpoint(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


@dataclass(frozen=True)
class Geometry:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: dict  # recipe -> decoder layers
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    max_positions: int
    dtype: torch.dtype


GEOMETRY = {
    # p-MoD's schedule hard-codes 32 layers (cos(l * pi / 31)); gamma-MoD's arank_mod keeps
    # layers 0-2 and the last dense, so 8 layers give it four MoD layers.
    "tiny": Geometry(hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=512,
                     layers={"gamma-mod": 8, "p-mod": 32, "llava": 8},
                     vision_hidden=64, vision_layers=2, vision_heads=1, vision_intermediate=128,
                     image_size=84, patch_size=14, max_positions=2048, dtype=torch.float32),
    "bench": Geometry(hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=32000,
                      layers={"gamma-mod": 32, "p-mod": 32, "llava": 32},
                      vision_hidden=256, vision_layers=4, vision_heads=4, vision_intermediate=1024,
                      image_size=336, patch_size=14, max_positions=4096, dtype=torch.float16),
}

_WORDS = (
    "the a an of to in is it that on for with as was at by this be are from or have not what where who how "
    "many which color colour red green blue yellow white black brown orange purple pink gray cat dog car bus "
    "truck tree house roof door window sky sun cloud water river road street table chair sign person people "
    "man woman child boy girl ball picture image photo scene left right top bottom middle front behind near "
    "large small big little round square shape describe detail there here two three four five one many some "
    "yes no please thank you question answer assistant user chat between curious artificial intelligence "
    "gives helpful detailed polite answers questions wheel wheels sitting standing parked under over next "
    "bright dark light shadow field grass garden building wall floor grey text written letters word number"
).split()


def _corpus(size: str, seed: int) -> list[str]:
    """Seeded training text for the tokenizer: English words and the chat template; the bench
    vocabulary (32000 pieces, like Llama's) also needs a large synthetic lexicon to merge."""
    rng = random.Random(seed)
    from gammamod.runtime.prompt import VICUNA_V1

    lines = [VICUNA_V1.prompt(f"What is the {w} in the picture?") + f" The {w} is here.</s>" for w in _WORDS]
    lines += [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 16))) + rng.choice(".?!,")
              + f" {rng.randint(0, 99999)}" for _ in range(4000)]
    if size == "bench":
        cons = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl gr".split()
        vow = "a e i o u ai ea ou io".split()
        lexicon = sorted({"".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.choice([1, 2, 2, 3, 3, 4])))
                          + rng.choice(["", "", "n", "s", "r", "t"]) for _ in range(90000)})
        lines += [" ".join(rng.choice(lexicon) for _ in range(rng.randint(4, 20))) for _ in range(60000)]
    return lines


def train_tokenizer(size: str, vocab: int, seed: int) -> bytes:
    """A Llama-style sentencepiece BPE model (byte fallback, split digits, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(size, seed)), model_writer=buf, model_type="bpe", vocab_size=vocab,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1000000)
    return buf.getvalue()


def _tower_config(g: Geometry) -> dict:
    return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_size": g.vision_hidden,
            "intermediate_size": g.vision_intermediate, "num_hidden_layers": g.vision_layers,
            "num_attention_heads": g.vision_heads, "image_size": g.image_size, "patch_size": g.patch_size,
            "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": g.vision_hidden}


def _recipe(name: str, layers: int) -> tuple[rc.Recipe, dict, bool]:
    """The recipe, its config.json fields in the authors' schema, and router bias."""
    from .tiny_vision import VISION_RECIPES

    name = VISION_RECIPES.get(name, name)
    if name == "gamma-mod":
        mod = {"mod_enable": True, "mod_mode": "arank_mod", "capacity_factor": 0.5, "router_aux_loss_coef": 0.01}
        mod["mod_layers_idx"] = rc.gamma_mod_layers(mod, layers)
        return rc.gamma_mod(mod["mod_layers_idx"]), {"mod": mod, "is_multipath_encoder": False,
                                                     "freeze_vision": True}, False
    if name == "p-mod":
        fields = {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "vision_all",
                  "mod_router_factor": 0.5, "mod_weight_norm": "tanh_0.2_1", "mod_bias_enabled": True,
                  "mod_special_init": True}
        schedule = rc.p_mod_schedule(fields["mod_target_layers"], 0.5, layers)
        fields["mod_target_layer_indices"] = sorted(schedule)
        return rc.p_mod(schedule, rc.ScoreNorm.parse(fields["mod_weight_norm"])), fields, True
    return rc.dense(), {}, False


def _init_weights(model: MoDLlava, recipe: rc.Recipe, seed: int) -> None:
    """Seeded weights with the spread of a trained model: unit-scale residual stream, logits with
    a spread of a few units (no near-ties for greedy decoding), routers whose decisions vary."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config

    def normal(t: torch.Tensor, std: float, mean: float = 0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    for name, p in model.named_parameters():
        if name.startswith("model.vision_tower.") or name == "model.image_newline":
            continue  # CLIP's own initialisation; the rest of the vision side: tiny_vision.init_weights
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            normal(p, 0.05, 1.0)
        elif name == "model.embed_tokens.weight":
            normal(p, 1.0)
        elif name == "lm_head.weight":
            normal(p, 4.0 / math.sqrt(cfg.hidden_size))
        elif ".router." in name or name.endswith(".router.weight"):
            continue
        elif p.dim() == 2:
            normal(p, 1.0 / math.sqrt(p.shape[1]))
        else:
            normal(p, 0.02)
    with torch.no_grad():
        # A trained model rarely emits control or byte-fallback pieces (ids 0..258 of a Llama-style
        # vocabulary): damp their logits so tiny models print words, but keep </s> reachable.
        model.lm_head.weight[3:259] *= 0.25
    if recipe.router == "shared-binary":
        # r = softmax(router(norm(x)))[1]: a logit gap of spread ~4 puts r on both sides of the
        # decode gate (0.5) and a few tokens under the prefill threshold (0.005).
        normal(model.model.layers[recipe.mod_layers[0]].router.weight, 0.35)
    elif recipe.router == "per-layer-scalar":
        for i in recipe.mod_layers:
            router = model.model.layers[i].router.router
            normal(router.weight, 1.5 / math.sqrt(cfg.hidden_size))
            normal(router.bias, 0.3)
        _calibrate_routers(model, recipe, gen)


def _calibrate_routers(model: MoDLlava, recipe: rc.Recipe, gen: torch.Generator) -> None:
    """p-MoD's routers read the raw residual stream, whose scale and common direction grow with
    depth: seeded weights alone put most image tokens' logits deep in TanhNorm's saturation,
    where many weights are exactly equal and the top-k is decided by ties and rounding, which
    trained routers do not do. Rescale each router so its logits over the image tokens of a
    sample prompt (the bundled test image between random text) spread with std 1.5 around a
    seeded offset of std 0.5."""
    from gammamod.demo import test_image
    from gammamod.runtime.image import load_image

    from .generate import forward_language

    images = model.vision.processor().process([load_image(test_image())])
    vocab = model.config.vocab_size
    with torch.no_grad():
        image = model.image_features(images)[0][None]
        before = model.embed(torch.randint(3, vocab, (1, 32), generator=gen))
        after = model.embed(torch.randint(3, vocab, (1, 16), generator=gen))
        x = torch.cat([before, image, after], dim=1)
        span = (32, image.shape[1])
        routers = {i: model.model.layers[i].router.router for i in recipe.mod_layers}
        offsets = {i: float(torch.randn(1, generator=gen)) * 0.5 for i in routers}
        seen: dict[int, torch.Tensor] = {}
        hooks = [r.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0][0, 32:32 + span[1]]))
                 for i, r in routers.items()]
        try:
            # a router changes what later layers see: a few static passes settle every scale
            for _ in range(3):
                forward_language(model, x, routable=span, routing="static")
                for i, router in routers.items():
                    logits = router(seen[i])[:, 0]
                    scale = 1.5 / float(logits.std())
                    router.weight.mul_(scale)
                    if router.bias is not None:
                        router.bias.mul_(scale).add_(offsets[i] - float(logits.mean()) * scale)
        finally:
            for h in hooks:
                h.remove()


def _tokenizer_files(sp_model: bytes, max_length: int) -> dict[str, str | bytes]:
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<unk>", "legacy": False, "model_max_length": max_length,
           "padding_side": "right", "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
           "sp_model_kwargs": {}}
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return {"tokenizer.model": sp_model, "tokenizer_config.json": json.dumps(cfg, indent=2),
            "special_tokens_map.json": json.dumps(specials, indent=2)}


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int | None) -> list[str]:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": "pt"}
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    if not shard_bytes or total <= shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def make_tiny(out: str | Path, recipe_name: str, size: str = "tiny", seed: int = 0, layout: str = "original",
              shard_mb: float | None = None, force: bool = False, progress=None) -> Path:
    """Write a seeded checkpoint of ``recipe_name`` (gamma-mod | p-mod | llava) to ``out``.

    ``layout`` is ``original`` (the authors' layout) or ``hf`` (llava only: the transformers
    ``llava`` layout). ``gamma-mod-hr`` and ``p-mod-next`` are the released checkpoints' vision
    (LLaVA-HR's tower, LLaVA-NeXT's anyres: ``tiny_vision.py``), tiny only. The directory appears
    whole or not at all.
    """
    from . import tiny_vision

    if recipe_name not in TINY_RECIPES:
        raise GammamodError(f"--recipe {recipe_name!r}: expected one of {', '.join(TINY_RECIPES)}")
    if size not in SIZES:
        raise GammamodError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    if size != "tiny" and recipe_name in tiny_vision.VISION_RECIPES:
        raise GammamodError(f"--recipe {recipe_name} comes in --size tiny only")
    if layout not in ("original", "hf") or (layout == "hf" and recipe_name != "llava"):
        raise GammamodError(f"--layout {layout!r}: expected original, or hf for --recipe llava")
    out = Path(out)
    check_replaceable(out, force, is_ours=is_tiny_checkpoint, what="make-tiny checkpoint")
    tick = progress or (lambda msg: None)
    g = GEOMETRY[size]
    decoder_recipe = tiny_vision.VISION_RECIPES.get(recipe_name, recipe_name)
    layers = g.layers[decoder_recipe]
    recipe, recipe_fields, router_bias = _recipe(recipe_name, layers)
    cfg = DecoderConfig(vocab_size=g.vocab, hidden_size=g.hidden, intermediate_size=g.intermediate,
                        num_layers=layers, num_heads=g.heads, num_kv_heads=g.kv_heads, head_dim=g.hidden // g.heads,
                        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=g.max_positions)
    vision = tiny_vision.vision_spec(recipe_name, _tower_config(g))
    recipe_fields = {**recipe_fields, **tiny_vision.config_fields(vision)}

    tick("tokenizer")
    sp_model = train_tokenizer(size, g.vocab, seed)
    tick("weights")
    torch.manual_seed(seed + 1)  # CLIP tower: transformers' own initialisation, seeded
    model = MoDLlava(cfg, recipe, vision, router_bias)
    vision_gen = torch.Generator().manual_seed(seed + 3)
    tiny_vision.init_weights(model, vision_gen)
    _init_weights(model, recipe, seed + 2)
    state = {k: v.detach().to(g.dtype) for k, v in model.state_dict().items()}
    state.update({k: v if v.dtype == torch.int64 else v.to(g.dtype)
                  for k, v in tiny_vision.unused_tensors(vision, vision_gen).items()})
    fmt = decoder_recipe
    if layout == "hf":
        fmt = "llava-hf"
    tower_state = {k[len("model.vision_tower.vision_tower."):]: v for k, v in state.items()
                   if k.startswith("model.vision_tower.vision_tower.")}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if recipe_name == "llava" and layout == "original" and name.startswith("model.vision_tower."):
            continue  # original LLaVA-1.5 saves no tower weights: they come from the tower directory
        if recipe.router == "shared-binary" and name.endswith(".router.weight") \
                and name != f"model.layers.{recipe.mod_layers[0]}.router.weight":
            continue  # safetensors keeps the shared router under one key only
        tensors[checkpoint_key(fmt, name, recipe.mod_layers)] = value
    if decoder_recipe == "gamma-mod":  # transformers 4.31 persisted the rotary buffers
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
        for i in range(layers):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()

    tick("writing")
    with OutputDir(out, force=force, is_ours=is_tiny_checkpoint, what="make-tiny checkpoint") as tmp:
        dtype_name = {torch.float32: "float32", torch.float16: "float16"}[g.dtype]
        shard_bytes = int(shard_mb * 2**20) if shard_mb else None
        _save_safetensors(tensors, tmp, shard_bytes)
        for name, content in _tokenizer_files(sp_model, g.max_positions).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
        processor = {**default_image_processor(vision.tower_config["image_size"]),
                     "image_processor_type": "CLIPImageProcessor"}
        generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": g.max_positions}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if layout == "hf":
            _write_hf_extras(tmp, cfg, g, processor)
        else:
            tower = tmp / TOWER_DIR
            tower.mkdir()
            (tower / "config.json").write_text(json.dumps(vision.tower_config, indent=2))
            (tower / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
            if recipe_name == "llava":
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tower_state.items()}, str(tower / "model.safetensors"))
            config = _llava_config(decoder_recipe, cfg, g, recipe_fields, dtype_name)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / MARKER).write_text(json.dumps({"recipe": recipe_name, "size": size, "seed": seed, "layout": layout},
                                             indent=2) + "\n")
    return out


def _llava_config(recipe_name: str, cfg: DecoderConfig, g: Geometry, recipe_fields: dict, dtype_name: str) -> dict:
    arch, model_type = {
        "gamma-mod": ("MoDLLaVALlamaForCausalLM", "mod_llava_llama"),
        "p-mod": ("PmodLlavaLlamaForCausalLM", "pmod_llava_llama"),
        "llava": ("LlavaLlamaForCausalLM", "llava_llama"),
    }[recipe_name]
    config = {
        "_name_or_path": f"gammamod-tiny-{recipe_name}", "architectures": [arch], "model_type": model_type,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "torch_dtype": dtype_name,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "attention_bias": False,
        "mm_vision_tower": TOWER_DIR, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": g.vision_hidden,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "tokenizer_model_max_length": g.max_positions, "tokenizer_padding_side": "right",
        "transformers_version": "4.37.2",
    }
    config.update(recipe_fields)
    return config


def _write_hf_extras(tmp: Path, cfg: DecoderConfig, g: Geometry, processor: dict) -> None:
    """The transformers ``llava`` layout: nested text/vision configs, an ``<image>`` token."""
    text = {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
            "torch_dtype": "float32"}
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "image_token_index": cfg.vocab_size - 1, "projector_hidden_act": "gelu", "ignore_index": -100,
              "text_config": text, "vision_config": _tower_config(g), "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
              "transformers_version": "4.39.3"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
