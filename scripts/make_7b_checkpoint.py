"""Write a random checkpoint with the geometry of p-MoD-LLaVA-v1.5-7B (Vicuna-7B decoder, CLIP-L/336
tower), in p-MoD's on-disk layout, fp16, sharded like the release (about 13.5 GB).

It exists to measure what exporting a 7B model costs in memory (scripts/measure_export_rss.sh),
so it writes one shard at a time and never holds the model. Usage:

    .venv/bin/python scripts/make_7b_checkpoint.py OUT [--tokenizer-from DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from gammamod.export import recipes as rc
from gammamod.export.checkpoint import checkpoint_key, default_image_processor
from gammamod.export.model import DecoderConfig, MoDLlava, VisionSpec

SHARD_BYTES = 5 * 2**30  # the release uses about 5 GB shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="copy tokenizer files from this checkpoint (e.g. a make-tiny --size bench one)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=False)
    cfg = DecoderConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)
    tower = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
             "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
             "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
    schedule = rc.p_mod_schedule("shiftedcos_decay_0.85_0.15", 0.5, 32)
    recipe = rc.p_mod(schedule, rc.ScoreNorm.parse("tanh_0.2_1"))
    vision = VisionSpec(mm_hidden_size=1024, select_layer=-2, tower_config=tower)
    with torch.device("meta"):  # names and shapes only
        skeleton = MoDLlava(cfg, recipe, vision, router_bias=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, index, names = 0, {}, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            names.append(name)
            index.update({k: name for k in shard})
            print(f"wrote {name} ({size / 2**30:.2f} GiB)", flush=True)
        shard, size = {}, 0

    for name, p in skeleton.state_dict().items():
        if "position_ids" in name:
            continue
        t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.float16)
        n = t.numel() * 2
        if size + n > SHARD_BYTES:
            flush()
        shard[checkpoint_key("p-mod", name, recipe.mod_layers)] = t
        size += n
    flush()
    total = len(names)
    final = {}
    for i, name in enumerate(names):  # the release's names: model-0000i-of-0000N.safetensors
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out / name).rename(out / new)
        final[name] = new
    weight_map = {k: final[v] for k, v in index.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["PmodLlavaLlamaForCausalLM"], "model_type": "pmod_llava_llama", "hidden_act": "silu",
              "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "vocab_size": 32000, "torch_dtype": "float16", "mm_vision_tower": "clip-vision-tower",
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "vision_all",
              "mod_router_factor": 0.5, "mod_weight_norm": "tanh_0.2_1", "mod_bias_enabled": True,
              "mod_special_init": True, "mod_target_layer_indices": sorted(schedule)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "clip-vision-tower").mkdir()
    (out / "clip-vision-tower" / "config.json").write_text(json.dumps(tower, indent=2))
    (out / "clip-vision-tower" / "preprocessor_config.json").write_text(json.dumps(default_image_processor(336)))
    if args.tokenizer_from:
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
            if (args.tokenizer_from / f).is_file():
                shutil.copy(args.tokenizer_from / f, out / f)


if __name__ == "__main__":
    main()
