"""make-tiny's vision variants of the released checkpoints: ``gamma-mod-hr`` (gamma-MoD on
LLaVA-HR: the CLIP + ConvNeXt tower with its adapters) and ``p-mod-next`` (p-MoD on LLaVA-NeXT:
anyres tiles, ``image_newline``). Same structure and key layout as the releases, tiny sizes:

* gamma-mod-hr: 256-pixel input; a 4-layer CLIP of 42-pixel patches whose 4 x 4 position grid is
  resampled to the 8 x 8 grid of its 336-pixel input (the authors' floor), as CLIP-L/336's 24 x 24
  grid is to 32 x 32 at 1024; a ConvNeXt of 1/1/2/1 blocks, 16/32/48/96 channels, whose last map
  (8 x 8) matches the CLIP grid as at 1024; 64 image tokens. The unused weights the authors'
  modules hold are written too (ConvNeXt's head, CLIP's post-layernorm, transformers 4.31's
  ``position_ids``), as a full save of their model has them.
* p-mod-next: the tiny CLIP (84-pixel tiles, 36 tokens each) on LLaVA-NeXT's grids scaled to 84
  pixels (1x2, 2x1, 2x2, 3x1, 1x3 tiles, in the released order).
"""

from __future__ import annotations

import math
import re

import torch

from gammamod.runtime.anyres import AnyRes

from .checkpoint import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, default_image_processor
from .llava_hr import FAST, SLOW, ConvNeXtSpec, MultiPathSpec, convnext_processor
from .model import MoDLlava, VisionSpec

VISION_RECIPES = {"gamma-mod-hr": "gamma-mod", "p-mod-next": "p-mod"}  # -> the decoder's recipe

HR_INPUT = 256
HR_CLIP = {"image_size": 168, "patch_size": 42, "num_hidden_layers": 4}
HR_CONVNEXT = ConvNeXtSpec(depths=(1, 1, 2, 1), dims=(16, 32, 48, 96), patch=4, kernel=7, mlp=(64, 128, 192, 384))
HR_VISION_TOWER_SLOW = "convnext_large_mlp.clip_laion2b_ft_320"  # as the releases' config names it
NEXT_GRIDS = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]  # LLaVA-NeXT's pinpoints, in tiles (columns, rows)


def vision_spec(recipe_name: str, clip: dict) -> VisionSpec:
    """The tiny model's VisionSpec (``clip``: the tiny CLIP config make-tiny uses)."""
    spec = VisionSpec(projector_type="mlp2x_gelu", mm_hidden_size=clip["hidden_size"], select_layer=-2,
                      select_feature="patch", image_aspect_ratio="pad", tower_config=dict(clip),
                      image_processor=default_image_processor(clip["image_size"]))
    if recipe_name == "gamma-mod-hr":
        spec.tower_config = hr_clip(clip)
        spec.multipath = MultiPathSpec(HR_INPUT, True, HR_CONVNEXT)
        spec.image_processor = convnext_processor(HR_INPUT)
    elif recipe_name == "p-mod-next":
        tile = clip["image_size"]
        spec.image_aspect_ratio = "anyres"
        spec.anyres = AnyRes([(c * tile, r * tile) for c, r in NEXT_GRIDS], tile, tile // clip["patch_size"])
    return spec


def hr_clip(clip: dict) -> dict:
    return {**clip, **HR_CLIP}


def config_fields(spec: VisionSpec) -> dict:
    """What the released config.json says about the vision side (besides LLaVA's mm_* fields)."""
    if spec.multipath is not None:
        return {"is_multipath_encoder": True, "freeze_vision": False, "input_image_size": spec.multipath.input_size,
                "vision_tower_slow": HR_VISION_TOWER_SLOW, "image_aspect_ratio": "pad"}
    if spec.anyres is not None:
        return {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [list(p) for p in spec.anyres.pinpoints]}
    return {}


def init_weights(model: MoDLlava, gen: torch.Generator) -> None:
    """Seeded, non-trivial weights for what is not CLIP (which keeps transformers' initialisation):
    the ConvNeXt branch, the adapters (non-zero, unlike the authors' zero-initialised projections,
    so they change what the tower computes), the fusion, ``image_newline``."""
    backbone = model.model
    with torch.no_grad():
        if hasattr(backbone, "image_newline"):
            backbone.image_newline.copy_(torch.randn(backbone.image_newline.shape, generator=gen))
        tower = getattr(backbone, "vision_tower", None)
        if tower is None or not hasattr(tower, "slow_vision_tower"):
            return
        for name, p in tower.named_parameters():
            if name.startswith("fast_vision_tower."):
                continue
            if re.search(r"\.blocks\.\d+\.weight$", name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + 0.5)  # ConvNeXt layer scale
            elif p.dim() == 1 and ("norm" in name or name.endswith(("stem.1.weight", "downsample.0.weight"))):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def unused_tensors(spec: VisionSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors the authors' LLaVA-HR modules hold and save but never read: ConvNeXt's classifier
    head (``convnext_large_mlp``: norm, pre-logits MLP, 1000 classes), CLIP's post-layernorm, and
    the CLIP ``position_ids`` buffer transformers 4.31 persisted."""
    if spec.multipath is None:
        return {}
    width, clip = spec.multipath.convnext.dims[-1], spec.tower_config
    positions = (clip["image_size"] // clip["patch_size"]) ** 2 + 1
    return {SLOW + "head.norm.weight": torch.ones(width), SLOW + "head.norm.bias": torch.zeros(width),
            SLOW + "head.pre_logits.fc.weight": torch.randn(width, width, generator=gen) / math.sqrt(width),
            SLOW + "head.pre_logits.fc.bias": torch.zeros(width),
            SLOW + "head.fc.weight": torch.randn(1000, width, generator=gen) / math.sqrt(width),
            SLOW + "head.fc.bias": torch.zeros(1000),
            FAST + "vision_model.post_layernorm.weight": torch.ones(clip["hidden_size"]),
            FAST + "vision_model.post_layernorm.bias": torch.zeros(clip["hidden_size"]),
            FAST + "vision_model.embeddings.position_ids": torch.arange(positions)[None]}


CONVNEXT_LAYOUTS = ("timm", "open_clip")


def split_convnext(ckpt, out_ckpt, out_dir, layout: str = "timm", force: bool = False) -> tuple:
    """A LLaVA-HR checkpoint without its ConvNeXt weights, and those weights as a local ConvNeXt
    directory of ``layout``: what a user has whose checkpoint does not hold the ConvNeXt branch,
    and the timm (or open_clip) download beside it. timm: ``model.safetensors`` (``stem.*``,
    ``stages.*``, block layer scales named ``gamma``, the classifier head) and its ``config.json``;
    open_clip: ``open_clip_pytorch_model.bin`` with the trunk under ``visual.trunk.``, the image
    head and a text tower, and ``open_clip_config.json``. Both outputs are written whole or not at
    all. Returns (out_ckpt, out_dir)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from gammamod.errors import GammamodError
    from gammamod.lifecycle import OutputDir

    if layout not in CONVNEXT_LAYOUTS:
        raise GammamodError(f"layout {layout!r}: expected one of {', '.join(CONVNEXT_LAYOUTS)}")
    ckpt, out_ckpt, out_dir = Path(ckpt), Path(out_ckpt), Path(out_dir)
    if not (ckpt / "model.safetensors").is_file():
        raise GammamodError(f"{ckpt}: expected a make-tiny gamma-mod-hr checkpoint (one model.safetensors)")
    state = load_file(str(ckpt / "model.safetensors"))
    slow = {k[len(SLOW):]: v for k, v in state.items() if k.startswith(SLOW)}
    if not slow:
        raise GammamodError(f"{ckpt}: holds no ConvNeXt weights ({SLOW}*) to split off")
    # timm names a block's layer scale gamma (the authors' copy renamed it weight)
    trunk = {re.sub(r"(blocks\.\d+)\.weight$", r"\1.gamma", k): v.clone() for k, v in slow.items()}
    width = trunk["stem.0.weight"].shape[0]
    with OutputDir(out_ckpt, force=force, inputs=[ckpt], what="checkpoint directory") as part:
        for f in ckpt.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, part / f.name)
            elif f.is_dir():
                shutil.copytree(f, part / f.name)
        save_file({k: v for k, v in state.items() if not k.startswith(SLOW)}, str(part / "model.safetensors"),
                  metadata={"format": "pt"})
    with OutputDir(out_dir, force=force, inputs=[ckpt], what="ConvNeXt weights directory") as part:
        if layout == "timm":
            save_file(trunk, str(part / "model.safetensors"), metadata={"format": "pt"})
            (part / "config.json").write_text(json.dumps({
                "architecture": "convnext_large_mlp", "num_classes": int(trunk["head.fc.weight"].shape[0]),
                "num_features": int(trunk["head.norm.weight"].shape[0]),
                "pretrained_cfg": {"tag": "gammamod_tiny", "input_size": [3, HR_INPUT, HR_INPUT],
                                   "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}}, indent=2))
        else:
            gen = torch.Generator().manual_seed(0)
            heads = {k: v for k, v in trunk.items() if k.startswith("head.")}
            bundle = {"visual.trunk." + k: v for k, v in trunk.items() if not k.startswith("head.")}
            # open_clip keeps the trunk's norm; its own MLP head replaces timm's classifier
            bundle["visual.trunk.head.norm.weight"] = heads["head.norm.weight"]
            bundle["visual.trunk.head.norm.bias"] = heads["head.norm.bias"]
            bundle["visual.head.mlp.fc1.weight"] = torch.randn(width * 4, heads["head.norm.weight"].shape[0],
                                                               generator=gen)
            bundle["visual.head.mlp.fc2.weight"] = torch.randn(8, width * 4, generator=gen)
            bundle["token_embedding.weight"] = torch.randn(50, 8, generator=gen)
            bundle["logit_scale"] = torch.tensor(4.6052)
            torch.save(bundle, part / "open_clip_pytorch_model.bin")
            (part / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
                "embed_dim": 8, "vision_cfg": {"timm_model_name": "convnext_large", "timm_pool": "",
                                               "timm_proj": "mlp", "image_size": HR_INPUT}}}, indent=2))
    return out_ckpt, out_dir
