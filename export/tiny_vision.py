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

from .checkpoint import default_image_processor
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
