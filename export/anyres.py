"""LLaVA-NeXT's anyres on the PyTorch side (p-MoD's LLaVA-NeXT models): the config it needs and
the feature merge of the authors' ``prepare_inputs_labels_for_multimodal_mod`` (p-MoD's
``llava/model/llava_arch.py``) in torch, which the runtime's numpy ``AnyRes.assemble`` is checked
against. The geometry (best grid, unpadding) is shared with the runtime: ``runtime/anyres.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gammamod.errors import GammamodError
from gammamod.runtime.anyres import AnyRes, parse_pinpoints, unpadded_extent


def anyres_from_config(cfg: dict, tower: dict, processor: dict, where: Path) -> AnyRes:
    """The anyres geometry of a checkpoint whose ``image_aspect_ratio`` is ``anyres``; refuses, in
    one line, what p-MoD's code does not run or what this port does not reproduce."""
    merge = cfg.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise GammamodError(f"{where}: image_aspect_ratio anyres with mm_patch_merge_type {merge!r}: expected "
                            "spatial_unpad (p-MoD's LLaVA-NeXT; 'flat' and 'spatial' are not implemented there)")
    if cfg.get("max_num_patches") is not None:
        raise GammamodError(f"{where}: max_num_patches {cfg['max_num_patches']!r} (anyres_max: the feature map "
                            "interpolated down) is not supported")
    crop = processor.get("crop_size", tower["image_size"])
    tile = int(crop["height"] if isinstance(crop, dict) else crop)
    if tile != tower["image_size"]:
        raise GammamodError(f"{where}: the image processor's {tile}-pixel crop differs from the vision tower's "
                            f"{tower['image_size']}-pixel input; anyres tiles are both")
    grid = AnyRes(parse_pinpoints(cfg.get("image_grid_pinpoints"), str(where)), tile,
                  tower["image_size"] // tower["patch_size"])
    grid.check(str(where))
    return grid


def merge_anyres(features: torch.Tensor, size: tuple[int, int], anyres: AnyRes, newline: torch.Tensor) -> torch.Tensor:
    """One image's projected tile features [1 + tiles, side * side, C] -> [tokens, C]: the base
    tile, then the grid's feature map, unpadded, each row closed by ``image_newline``."""
    cols, rows = anyres.grid(size)
    side = anyres.side
    base, grid = features[0], features[1:]
    grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    keep_rows, keep_cols = unpadded_extent(grid.shape[1], grid.shape[2], size)
    grid = grid[:, keep_rows, keep_cols]
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)), dim=-1)
    return torch.cat([base, grid.permute(1, 2, 0).flatten(0, 1)])
