"""LLaVA-HR's multi-path vision tower, as every released gamma-MoD checkpoint holds it.

Read from the authors' code (gamma-MoD's ``multipath_encoder_wapper.py``, ``clip_encoder.py``,
``convnext_encoder.py``, ``convnext.py``); the module names mirror their checkpoint keys:

    model.vision_tower.fast_vision_tower.vision_tower.vision_model.*   CLIP ViT (transformers)
    model.vision_tower.slow_vision_tower.vision_tower.{stem,stages}.*  ConvNeXt (timm's layout)
    model.vision_tower.align_stages_latent.{0,1,2}.*                   the mixture-of-resolution adapters
    model.vision_tower.align_stages.0.{fast_proj,slow_proj}.*          the fusion

One normalised S x S image (S = ``input_image_size``, 1024 in the releases) feeds both branches:

* ConvNeXt (timm's ``convnext_large_mlp`` structure; depths and widths read from the weights): the
  stem and all four stages; only the last stage's map (S/32 per side) is used, by every adapter
  and by the fusion;
* CLIP: the image resized bilinearly with ``align_corners=True`` to ``max(int(S/32*14), 336)``
  pixels (448 for 1024); patch embedding plus CLIP's position embedding resampled bicubically with
  antialias to the patch grid (on every forward); the class token is dropped before the
  pre-layernorm, so it never takes part; then ALL the encoder layers (``mm_vision_select_layer``
  is not used) and no post-layernorm;
* after a quarter, half and three quarters of the CLIP layers (6, 12, 18 of 24) an adapter mixes
  the ConvNeXt map into the CLIP tokens through a tanh gate computed per image from the tokens' mean
  (present when the model was trained with ``freeze_vision: false``, as the releases are);
* the fusion: a Linear on each branch's tokens, summed (no norm, no activation).

Output: [N, (fast size / CLIP patch)^2, CLIP width], which the projector maps to the decoder.
Weights the forward never reads (ConvNeXt's classifier head, CLIP's post-layernorm) are accepted
in a checkpoint and ignored (:data:`UNUSED_KEYS`).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gammamod.errors import GammamodError

PREFIX = "model.vision_tower."
FAST = PREFIX + "fast_vision_tower.vision_tower."
SLOW = PREFIX + "slow_vision_tower.vision_tower."
# held by the authors' modules but never read by their forward: a checkpoint may have them
UNUSED_KEYS = (re.compile(re.escape(SLOW) + r"(head|norm_pre)\."),
               re.compile(re.escape(FAST) + r"vision_model\.post_layernorm\."))
CLIP_FLOOR = 336  # the smallest CLIP input the authors allow (CLIP-L/336's own size)


@dataclass(frozen=True)
class ConvNeXtSpec:
    """timm ConvNeXt geometry, read from the weights (``convnext_large_mlp``: 3/3/27/3 blocks of
    192/384/768/1536 channels, 4-pixel patch stem, 7x7 depthwise kernels, MLP ratio 4)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    patch: int
    kernel: int
    mlp: tuple[int, ...]  # hidden width of each stage's block MLPs
    eps: float = 1e-6  # timm's LayerNorm default; convnext_xxlarge was built with 1e-5

    def grid(self, size: int) -> int:
        """Output map side for a ``size`` input: the stem, then a stride-2 downsample per later stage."""
        side = size // self.patch
        for _ in self.dims[1:]:
            side //= 2
        return side


@dataclass(frozen=True)
class MultiPathSpec:
    input_size: int  # S: both branches' input (config input_image_size)
    adapters: bool  # the three align_stages_latent adapters (config freeze_vision: false)
    convnext: ConvNeXtSpec

    @property
    def fast_size(self) -> int:
        """CLIP's input side: the authors' ``max(int(S/32*14), 336)``."""
        return max(int(self.input_size / 32 * 14), CLIP_FLOOR)


def convnext_from_shapes(shapes: dict[str, tuple], where: str, name: str = "", hint: str = "") -> ConvNeXtSpec:
    """The ConvNeXt branch's geometry from its weights (keys under ``SLOW``); ``hint`` ends the
    error naming a missing one (where else it could come from)."""

    def need(key):
        if SLOW + key not in shapes:
            raise GammamodError(f"{where}: missing key {SLOW}{key} (the LLaVA-HR ConvNeXt branch is incomplete{hint})")
        return shapes[SLOW + key]

    stem = need("stem.0.weight")
    depths, dims, mlp = [], [], []
    for stage in range(4):
        blocks = {int(m.group(1)) for k in shapes
                  if (m := re.match(re.escape(f"{SLOW}stages.{stage}.blocks.") + r"(\d+)\.conv_dw\.weight$", k))}
        if not blocks:
            need(f"stages.{stage}.blocks.0.conv_dw.weight")
        depths.append(max(blocks) + 1)
        dims.append(need(f"stages.{stage}.blocks.0.conv_dw.weight")[0])
        mlp.append(need(f"stages.{stage}.blocks.0.mlp.fc1.weight")[0])
    kernel = need("stages.0.blocks.0.conv_dw.weight")[-1]
    # convnext_xxlarge (LLaVA-HR-X) is the one variant the authors build with LayerNorm eps 1e-5
    return ConvNeXtSpec(tuple(depths), tuple(dims), patch=stem[-1], kernel=kernel, mlp=tuple(mlp),
                        eps=1e-5 if "xxlarge" in name else 1e-6)


def check_geometry(spec: MultiPathSpec, clip: dict, where: str) -> None:
    """Refuse geometries the authors' code would trip over (their asserts), in one line."""
    layers = clip["num_hidden_layers"]
    if layers % 4:
        raise GammamodError(f"{where}: the multi-path tower splits the CLIP layers in four (adapters after each "
                            f"quarter); this CLIP has {layers}")
    fast = (spec.fast_size // clip["patch_size"]) ** 2
    slow = spec.convnext.grid(spec.input_size) ** 2
    if fast % slow and slow % fast or _aligned_side(slow, fast) ** 2 != fast:
        raise GammamodError(f"{where}: input_image_size {spec.input_size} gives a {int(math.sqrt(slow))}-wide "
                            f"ConvNeXt map and {int(math.sqrt(fast))}-wide CLIP grid, which the adapters cannot align")


def _aligned_side(src_tokens: int, dst_tokens: int) -> int:
    src, dst = int(math.sqrt(src_tokens)), int(math.sqrt(dst_tokens))
    return src // (src // dst) if src > dst else dst


# --------------------------------------------------------------------------------------------
# ConvNeXt (timm's module names, so the checkpoint keys load as they are)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, LayerNorm and MLP channels-last, layer scale (the authors' copy of timm names
    the layer-scale parameter ``weight``, not ``gamma``), residual."""

    def __init__(self, dim: int, hidden: int, kernel: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + y * self.weight.reshape(1, -1, 1, 1)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, hidden: int, kernel: int, eps: float, first: bool):
        super().__init__()
        # stage 0 keeps the stem's resolution; every later one halves it first
        self.downsample = nn.Identity() if first else nn.Sequential(LayerNorm2d(in_dim, eps=eps),
                                                                    nn.Conv2d(in_dim, dim, 2, stride=2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, hidden, kernel, eps) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """The stem and the four stages (the classifier head is never used, so not built)."""

    def __init__(self, spec: ConvNeXtSpec):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, spec.dims[0], spec.patch, stride=spec.patch),
                                  LayerNorm2d(spec.dims[0], eps=spec.eps))
        stages, prev = [], spec.dims[0]
        for i, (depth, dim, hidden) in enumerate(zip(spec.depths, spec.dims, spec.mlp)):
            stages.append(ConvNeXtStage(prev, dim, depth, hidden, spec.kernel, spec.eps, first=i == 0))
            prev = dim
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        return self.stages(self.stem(x))


# --------------------------------------------------------------------------------------------
# the adapters and the fusion


def align_tokens(tokens: torch.Tensor, target: int) -> tuple[torch.Tensor, int]:
    """[B, L, C] tokens of a square map brought to ``target`` tokens: bilinear (align_corners) up,
    average pooling down, unchanged when equal (the released 1024-pixel geometry). Returns them
    and the target map's side."""
    b, length, c = tokens.shape
    side = int(math.sqrt(target))
    if length == target:
        return tokens, side
    src = int(math.sqrt(length))
    grid = tokens.transpose(1, 2).reshape(b, c, src, src)
    if length < target:
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=True).to(tokens.dtype)
    else:
        grid = F.avg_pool2d(grid, src // side, src // side)
    return grid.reshape(b, c, -1).transpose(1, 2), side


class StitchAdapter(nn.Module):
    """One mixture-of-resolution adapter (the authors' ``S2FStitchAlignModuleV2``)."""

    def __init__(self, fast_dim: int, slow_dim: int):
        super().__init__()
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(fast_dim * 2, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1))

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        b, d = slow.shape[0], fast.shape[-1]
        s = self.slow_proj(F.gelu(self.slow_conv(slow))).reshape(b, d, -1).transpose(1, 2)
        s, side = align_tokens(s, fast.shape[1])
        f = fast.transpose(1, 2).reshape(b, d, side, side)
        f = (f + self.fast_proj(F.gelu(self.fast_conv(f)))).reshape(b, d, side * side).transpose(1, 2)
        gate = self.gate(torch.cat([f, s], -1).mean(1)).unsqueeze(1)  # [B, 1, 1]: one per image
        return f + s * gate.tanh()


class FusionAlign(nn.Module):
    """The fusion after the last CLIP layer (the authors' ``MultiPathAlignModule``)."""

    def __init__(self, fast_dim: int, slow_dim: int):
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        b, c = slow.shape[:2]
        s, _ = align_tokens(slow.reshape(b, c, -1).transpose(1, 2), fast.shape[1])
        return self.fast_proj(fast) + self.slow_proj(s)


# --------------------------------------------------------------------------------------------
# the tower


def resample_positions(position_embedding: torch.Tensor, tokens: int) -> torch.Tensor:
    """CLIP's position embedding [1 + P, C] -> the patch positions [tokens, C] of a larger grid:
    the class position dropped (its token is), the grid resized bicubically with antialias in
    float32, as the authors' ``resample_pos_embed`` does on every forward."""
    patches = position_embedding[1:]
    if patches.shape[0] == tokens:
        return patches
    old, new, c = int(math.sqrt(patches.shape[0])), int(math.sqrt(tokens)), patches.shape[-1]
    grid = patches.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[new, new], mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(new * new, c).to(position_embedding.dtype)


def _layer_call(layer: nn.Module):
    """CLIP encoder layers take (hidden, attention_mask, causal_attention_mask) and return a tuple in
    transformers 4, (hidden, attention_mask) and a tensor in 5: call either with no masks."""
    params = inspect.signature(type(layer).forward).parameters
    if "causal_attention_mask" in params:
        return lambda x: layer(x, None, None)[0]
    return lambda x: layer(x, None)


class MultiPathTower(nn.Module):
    def __init__(self, spec):
        super().__init__()
        from .model import VisionTower

        mp: MultiPathSpec = spec.multipath
        self.spec = mp
        self.fast_vision_tower = VisionTower(spec)
        # the forward never reads CLIP's post-layernorm: not a parameter here (a checkpoint's copy is ignored)
        self.clip_model.post_layernorm = nn.Identity()
        self.slow_vision_tower = nn.Module()
        self.slow_vision_tower.vision_tower = ConvNeXt(mp.convnext)
        fast_dim, slow_dim = spec.tower_config["hidden_size"], mp.convnext.dims[-1]
        if mp.adapters:
            self.align_stages_latent = nn.ModuleList([StitchAdapter(fast_dim, slow_dim) for _ in range(3)])
        self.align_stages = nn.ModuleList([FusionAlign(fast_dim, slow_dim)])
        self.patch = spec.tower_config["patch_size"]

    @property
    def clip_model(self) -> nn.Module:
        """The module holding CLIP's embeddings, pre_layrnorm and encoder (transformers 4 and 5)."""
        return self.fast_vision_tower.vision_tower.vision_model

    @property
    def tokens(self) -> int:
        return (self.spec.fast_size // self.patch) ** 2

    def patch_positions(self) -> torch.Tensor:
        return resample_positions(self.clip_model.embeddings.position_embedding.weight, self.tokens)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens, CLIP width]. ``positions``: the patch positions, when they are
        given precomputed (the exported graph: they depend on the weights only)."""
        clip, fast = self.clip_model, self.spec.fast_size
        dtype = clip.embeddings.patch_embedding.weight.dtype
        x = pixel_values.to(dtype)
        y = F.interpolate(x.float(), size=(fast, fast), mode="bilinear", align_corners=True).to(dtype)
        y = clip.embeddings.patch_embedding(y).flatten(2).transpose(1, 2)
        # the authors prepend the class token, add positions and drop it again before the
        # pre-layernorm: the patch tokens come out the same without it
        y = clip.pre_layrnorm(y + (self.patch_positions() if positions is None else positions))
        slow = self.slow_vision_tower.vision_tower(x)
        layers = clip.encoder.layers
        quarter = len(layers) // 4
        for i, layer in enumerate(layers):
            y = _layer_call(layer)(y)
            if hasattr(self, "align_stages_latent") and (i + 1) % quarter == 0 and i + 1 < len(layers):
                y = self.align_stages_latent[(i + 1) // quarter - 1](y, slow)
        return self.align_stages[0](y, slow)


def convnext_processor(size: int) -> dict:
    """The image processor the authors feed the whole tower with: the ConvNeXt branch's
    (``convnext_encoder.py``), not CLIP's. OpenAI CLIP's mean and std, bicubic, ``size`` the bare
    integer ``input_image_size`` (transformers reads it as the shortest edge), a centre crop of
    that size. After the pad to a square in the mean colour the resize is exact and the crop a no-op."""
    from .checkpoint import default_image_processor

    return {**default_image_processor(size), "size": size}
