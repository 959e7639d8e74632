"""A compact LLaVA (CLIP tower -> mlp2x_gelu projector -> Llama decoder) with Mixture-of-Depths layers.

Parameter names mirror the LLaVA checkpoint keys (``model.layers.3.self_attn.q_proj.weight``,
``model.mm_projector.0.weight``, ``model.vision_tower.vision_tower.vision_model...``,
``lm_head.weight``), so loading is a plain state-dict load after the small, documented key
translation in ``checkpoint.py``.

There is one decoder layer class. Whether and how it routes is read from the
:class:`~gammamod.export.recipes.Recipe`; a :class:`Step` says how this call routes:

* ``reference``: the authors' released inference, data-dependent, batch size 1;
* ``static``: a fixed kept count per MoD layer for a fixed routable span (what the ONNX export
  traces), any batch size, each row routed independently;
* ``threshold`` (gamma-MoD): the released inference inside a static graph: each multi-token chunk
  is routed whole, a capacity's top-k is selected, and the selected tokens at or below the
  prefill threshold are skipped (equal to ``reference`` whenever the count fits the capacity);
* ``dense``: routers ignored.

Every layer keeps its own KV cache and its own length per row: a MoD layer caches only the
tokens it processed, and a gamma-MoD layer that the decode gate skips appends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import routing as R
from .recipes import Recipe

if TYPE_CHECKING:
    from gammamod.runtime.anyres import AnyRes

    from .llava_hr import MultiPathSpec

ROUTING_MODES = ("reference", "static", "threshold", "dense")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class DecoderConfig:
    """Llama decoder geometry, read from the checkpoint's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False


@dataclass
class VisionSpec:
    """How image features reach the decoder (LLaVA's mm_* config fields).

    The tower is a CLIP ViT (LLaVA), or LLaVA-HR's CLIP + ConvNeXt tower when ``multipath`` is set
    (``export/llava_hr.py``; ``tower_config`` is then its CLIP branch). ``anyres`` (LLaVA-NeXT) cuts
    each image into tiles: the tower takes tiles, and each image's features are merged with
    ``image_newline`` (``export/anyres.py``)."""

    projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1024
    select_layer: int = -2
    select_feature: str = "patch"  # patch | cls_patch
    image_aspect_ratio: str = "pad"  # pad | square | anyres
    tower_config: dict | None = None  # CLIPVisionConfig fields; None: no vision tower loaded
    tower_source: str = ""  # where the tower came from, for messages and the manifest
    image_processor: dict = field(default_factory=dict)
    multipath: "MultiPathSpec | None" = None
    anyres: "AnyRes | None" = None

    @property
    def has_tower(self) -> bool:
        return self.tower_config is not None

    @property
    def input_size(self) -> int:
        """Pixels per side of one tower input."""
        return self.multipath.input_size if self.multipath else (self.tower_config or {}).get("image_size", 336)

    @property
    def image_tokens(self) -> int:
        """Tokens per tower input (anyres: per tile; an image's count is ``anyres.tokens(size)``)."""
        cfg = self.tower_config or {}
        pixels = self.multipath.fast_size if self.multipath else cfg.get("image_size", 336)
        grid = pixels // cfg.get("patch_size", 14)
        return grid * grid + (1 if self.select_feature == "cls_patch" and not self.multipath else 0)

    def processor(self):
        """The runtime's image processor for this model (what the PyTorch reference feeds too)."""
        from gammamod.runtime.image import ImageProcessor

        return ImageProcessor(self.image_processor, self.image_aspect_ratio, self.anyres)


# --------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()  # half precision: normalise in float32, as transformers' Llama does
        variance = x.pow(2).mean(-1, keepdim=True) + self.eps
        if torch.compiler.is_exporting():
            # x / sqrt(v): the form ONNX Runtime fuses into one SimplifiedLayerNormalization node
            x = x / torch.sqrt(variance)
        else:
            x = x * torch.rsqrt(variance)  # transformers' form, bit for bit
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


def inverse_frequencies(cfg: "DecoderConfig", device) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    return inv_freq / cfg.rope_linear_factor


def rotary(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, T, head_dim] for integer positions [B, T] (Llama's rotate-half RoPE)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos[:, None], sin[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Project and rotate with the (cos, sin) tables: q [B, H, T, d], k and v [B, Hkv, T, d]."""
        cfg = self.cfg
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):  # the export's fused projection (see export/fusion.py)
            q, k, v = self.qkv_proj(x).split([cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,
                                             dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # the export's fused projection (see export/fusion.py)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ScalarRouter(nn.Module):
    """p-MoD's ``TokenRouter``: ``router.router`` is Linear(hidden, 1) (bias if ``mod_bias_enabled``)."""

    def __init__(self, hidden: int, bias: bool):
        super().__init__()
        self.router = nn.Linear(hidden, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x).squeeze(-1)


# --------------------------------------------------------------------------------------------
# the per-call routing context and the KV cache


@dataclass
class Step:
    """What one forward call over a chunk of tokens needs to know, shared by all layers.

    The routed span is per row: ``span_start[b]`` and a length ``span_length`` (N) shared by the
    batch; N = 0 (or ``span_start`` None) means the chunk holds no routable token (decode steps,
    later turns, text-only prompts). ``capacity`` is each MoD layer's kept count k. When exporting,
    N and k are symbolic sizes and the graph routes every chunk the same way. ``valid`` is the
    number of real (non-padding) tokens per row; padding sits at the end of a row.
    """

    routing: str
    kv: "KVStore"
    past_length: torch.Tensor  # [B] tokens every dense layer has seen before this chunk
    valid: torch.Tensor  # [B]
    span_start: torch.Tensor | None = None  # [B]
    span_length: int = 0
    capacity: dict[int, int] = field(default_factory=dict)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # out: kept indices per MoD layer
    above: dict[int, torch.Tensor] = field(default_factory=dict)  # out (threshold): span tokens above it [B]
    _tables: dict = field(default_factory=dict)  # RoPE tables shared by the layers of this chunk

    @property
    def routed(self) -> bool:
        """Whether this chunk routes (eager): a non-empty span."""
        return self.span_start is not None and not (isinstance(self.span_length, int) and self.span_length == 0)

    def rope(self, cfg: DecoderConfig, positions: torch.Tensor, dtype, key: str | None = None):
        """(cos, sin) for ``positions``; layers sharing positions (``key``) share the tables."""
        if key is not None and key in self._tables:
            return self._tables[key]
        tables = rotary(positions, self.inverse_frequencies(cfg, positions.device), dtype)
        if key is not None:
            self._tables[key] = tables
        return tables

    def inverse_frequencies(self, cfg: DecoderConfig, device) -> torch.Tensor:
        if "inv_freq" not in self._tables:
            self._tables["inv_freq"] = inverse_frequencies(cfg, device)
        return self._tables["inv_freq"]

    def sequence_positions(self, t: int, device) -> torch.Tensor:
        """Absolute positions [B, T] of this chunk's tokens (dense layers, p-MoD layers)."""
        if "positions" not in self._tables:
            self._tables["positions"] = self.past_length[:, None] + torch.arange(t, device=device)
        return self._tables["positions"]


class KVStore:
    """What a decoder layer needs from a KV cache: append-and-attend, and per-row lengths.
    A ``fused`` store takes the layer's normalised input and does projection-side attention
    itself (``attend_fused``: the ORT decode graph's fused attention)."""

    fused = False

    def length(self, layer: int) -> torch.Tensor:  # [B]
        raise NotImplementedError

    def attend(self, layer: int, q, k, v, count: torch.Tensor) -> torch.Tensor:
        """Append the first ``count[b]`` of the T new k/v rows of row b, attend causally over the
        layer's cache plus the new tokens, and return the attention output [B, H, T, d]."""
        raise NotImplementedError


class KVCache(KVStore):
    """Eager PyTorch cache: one preallocated buffer per layer, written in place, grown by doubling.

    Each layer keeps its own length per row: MoD layers hold fewer entries, and a gamma-MoD
    decode step the gate skips appends nothing to that layer.
    """

    def __init__(self, cfg: DecoderConfig, batch: int, dtype: torch.dtype, device=None, capacity: int = 64):
        self.cfg = cfg
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.lengths = torch.zeros(cfg.num_layers, batch, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # tokens of the sequence

    @property
    def batch(self) -> int:
        return self.lengths.shape[1]

    def length(self, layer: int) -> torch.Tensor:
        return self.lengths[layer]

    def _reserve(self, layer: int, needed: int) -> None:
        cap = self.keys[layer].shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        for store in (self.keys, self.values):
            old = store[layer]
            grown = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
            grown[:, :, :cap] = old
            store[layer] = grown

    def attend(self, layer: int, q, k, v, count):
        cfg = self.cfg
        b, _, t, d = k.shape
        start = self.lengths[layer]  # [B]
        if bool((start == 0).all()) and bool((count == t).all()):
            # First chunk, no padding: plain causal attention over the new tokens (fused SDPA).
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=cfg.num_kv_heads != cfg.num_heads)
            self._reserve(layer, t)
            self.keys[layer][:, :, :t] = k
            self.values[layer][:, :, :t] = v
        else:
            end = int((start + t).max())
            self._reserve(layer, end)
            slots = (start[:, None] + torch.arange(t, device=k.device))  # [B, T]
            index = slots[:, None, :, None].expand(b, k.shape[1], t, d)
            keys, values = self.keys[layer], self.values[layer]
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
            # query t of row b sits at slot start[b] + t and sees slots 0..start[b] + t
            allowed = torch.arange(end, device=k.device)[None, None, :] <= slots[:, :, None]
            attn = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end],
                                                  attn_mask=allowed[:, None],
                                                  enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        self.lengths[layer] += count
        return attn


# --------------------------------------------------------------------------------------------
# the decoder layer: one implementation, routed by the recipe


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, recipe: Recipe, router: nn.Module | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.recipe = recipe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if router is not None:
            self.router = router  # gamma-MoD: the one shared nn.Linear; p-MoD: this layer's own

    @property
    def is_mod(self) -> bool:
        return self.recipe.is_mod_layer(self.layer_idx)

    # -- the two halves of a Llama layer -------------------------------------------------------
    def block(self, x, positions, step: Step, count, shared: str | None = None, record: bool = True):
        """``h = x + attn(norm(x))`` and ``m = mlp(norm(h))``: the caller combines them.
        ``shared`` names positions other layers of the chunk use too (their RoPE is computed once).
        ``record=False`` (an exported If branch, which must be free of side effects): the KV store
        records nothing and the layer's new cache tensors come back as a third value."""
        kv, present = step.kv, None
        if kv.fused:
            args = (self.layer_idx, self.self_attn, self.input_layernorm(x), positions, count)
            attn = kv.attend_fused(*args) if record else None
            if not record:
                attn, present = kv.compute_fused(*args)
            h = x + self.self_attn.o_proj(attn)
        else:
            rope = step.rope(self.self_attn.cfg, positions, x.dtype, shared)
            q, k, v = self.self_attn.qkv(self.input_layernorm(x), rope)
            if record:
                attn = kv.attend(self.layer_idx, q, k, v, count)
            else:
                attn, present = kv.compute(self.layer_idx, q, k, v, count)
            h = x + self.self_attn.out(attn)
        m = self.mlp(self.post_attention_layernorm(h))
        return (h, m) if record else (h, m, present)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw router output per token [B, T]: gamma-MoD's probability r, p-MoD's logit."""
        if self.recipe.router == "shared-binary":
            return F.softmax(self.router(self.input_layernorm(x)), dim=-1)[..., 1]
        return self.router(x)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        t = x.shape[1]
        if not self.is_mod or step.routing == "dense":
            h, m = self.block(x, step.sequence_positions(t, x.device), step, step.valid, shared="sequence")
            return h + m
        if torch.compiler.is_exporting():
            # the decoder graph routes every chunk (an empty span keeps every token); the ORT
            # decode-step graph has no span inputs and takes the no-span rule directly
            return self._continue(x, step) if step.span_start is None else self._routed(x, step)
        if step.routing == "reference" and self.recipe.router == "shared-binary" and t > 1:
            return self._gamma_threshold(x, step)  # the authors threshold every multi-token chunk
        if step.routed:
            if step.routing == "reference":
                return self._pmod_reference(x, step)
            return self._routed(x, step)
        return self._continue(x, step)

    def _routed(self, x, step: Step):
        """Fixed capacity over each row's routed span: the semantics the ONNX export traces. With
        an empty span every token is kept, which is :meth:`_continue`'s rule (gamma-MoD's decode
        gate included), so one graph serves prefill, decode and later turns."""
        recipe, n = self.recipe, step.span_length
        b, t, _ = x.shape
        k = step.capacity[self.layer_idx]
        start = step.span_start if step.span_start is not None else torch.zeros(b, dtype=torch.long, device=x.device)
        score = self.scores(x)
        weight = R.routing_weights(recipe, score, start, n)  # [B, T]
        if step.routing == "threshold":
            # the capacity's top-k with the ones at or below the threshold last: those are padding
            kept, count = R.select_above(weight, start, n, k, recipe.prefill_threshold)
            step.above[self.layer_idx] = ((weight > recipe.prefill_threshold)
                                          & R.span_mask(t, start, n)).sum(-1)
        else:
            kept = R.select_kept(weight, start, n, k)  # [B, K] sorted
            count = step.valid - (n - k)  # padding rows end after the span
        step.kept[self.layer_idx] = kept
        xs = R.gather_tokens(x, kept)
        if recipe.positions == "renumbered":
            positions = self._own_positions(step, kept.shape[1], x.device)
        else:
            positions = step.past_length[:, None] + kept
        mlp_scale, skip_scale = R.output_weights(recipe, weight, kept)
        if recipe.decode == "gate":
            # gamma-MoD's decode gate: a single token with no span runs the layer only when r >= 0.5
            gated = (torch.scalar_tensor(n, device=x.device) == 0) & (torch.scalar_tensor(t, device=x.device) == 1)
            run = ~gated | (score[:, -1] >= recipe.decode_gate)  # [B]
            count = torch.where(run, count, torch.zeros_like(count))
            if torch.compiler.is_exporting():
                y = self._gated_block(xs, positions, step, count, mlp_scale, run)
            else:
                h, m = self.block(xs, positions, step, count)
                y = torch.where(run[:, None, None], h + mlp_scale * m, xs)
        else:
            h, m = self.block(xs, positions, step, count)
            y = h + mlp_scale * m
        if step.routing == "threshold":  # the tail past each row's count is skipped: its input passes
            y = torch.where(torch.arange(kept.shape[1], device=x.device)[None, :, None] < count[:, None, None], y, xs)
        return R.scatter_tokens(x, kept, y, skip_scale)

    def _gated_block(self, xs, positions, step: Step, count, mlp_scale, run):
        """The gated layer as an ONNX ``If`` on "any row runs" (export only): when the gate closes for
        every row, attention and MLP are not computed and the layer's cache is left as it was.
        Traced between markers that ``export.gates.wrap_gates`` turns into the If."""
        from . import gates

        layer, kv, group = self.layer_idx, step.kv, self.layer_idx
        step.inverse_frequencies(self.self_attn.cfg, xs.device)  # shared, so computed outside the region
        cond = run.any()
        xs_in, positions_in, count_in, scale_in, run_in = (gates.gate_enter(t, cond, group)
                                                           for t in (xs, positions, count, mlp_scale, run))
        h, m, (keys, values) = self.block(xs_in, positions_in, step, count_in, record=False)
        y = torch.where(run_in[:, None, None], h + scale_in * m, xs_in)
        skip_keys, skip_values = kv.branch_skipped(layer, xs)
        y = gates.gate_exit(y, xs, cond, group)
        keys = gates.gate_exit(keys, skip_keys, cond, group)
        values = gates.gate_exit(values, skip_values, cond, group)
        kv.present[layer] = (keys, values, kv.length(layer) + count)
        return y

    def _gamma_threshold(self, x, step: Step):
        """gamma-MoD's released inference (EvalMoDLLaVALlamaForCausalLM), batch size 1: keep every
        token with r > 0.005, anywhere in the sequence; renumbered positions; only the MLP is
        scaled; skipped tokens pass through. The routable span plays no part."""
        score = self.scores(x)[0]
        kept = torch.nonzero(score > self.recipe.prefill_threshold).flatten()
        step.kept[self.layer_idx] = kept[None]
        if kept.numel() == 0:
            return x
        positions = self._own_positions(step, kept.numel(), x.device)
        h, m = self.block(x[:, kept], positions, step, kept.new_full((1,), kept.numel()))
        out = x.clone()
        out[:, kept] = h + score[kept][None, :, None] * m
        return out

    def _pmod_reference(self, x, step: Step):
        """p-MoD's ModLayer.forward, batch size 1: boolean masks, top-k over the normalised weights
        of the image tokens, STRing applied in the authors' order."""
        recipe, start, length = self.recipe, int(step.span_start[0]), step.span_length
        score = self.scores(x)[0]
        target = torch.zeros_like(score, dtype=torch.bool)
        target[start:start + length] = True
        weight = R.normalise_masked(recipe, score, target)
        k = step.capacity[self.layer_idx]
        kept = ~target
        kept[torch.topk(weight, k).indices] = True
        idx = torch.nonzero(kept).flatten()
        step.kept[self.layer_idx] = idx[None]
        h, m = self.block(x[:, kept], step.past_length[:, None] + idx[None], step, idx.new_full((1,), idx.numel()))
        out = x.clone()
        out[:, kept] = m
        out[:, target] *= weight[target][:, None]
        out[:, kept] += h
        return out

    def _continue(self, x, step: Step):
        """Tokens after the routed prefill (decode steps, later turns): all text, none routable."""
        recipe, t = self.recipe, x.shape[1]
        if recipe.decode == "dense":
            # p-MoD: text runs densely at absolute positions; the cache holds text + kept image.
            h, m = self.block(x, step.sequence_positions(t, x.device), step, step.valid, shared="sequence")
            return h + m
        # gamma-MoD: positions continue this layer's own (renumbered) cache. A single decoded token
        # runs the layer only when r >= 0.5, else it passes through and appends nothing; a chunk of
        # several text tokens (a later turn) is always kept, as text after the span is in training.
        r = self.scores(x)
        several = torch.scalar_tensor(t, device=x.device) > 1
        run = (r[:, -1] >= recipe.decode_gate) | several  # [B]
        count = torch.where(run, step.valid, torch.zeros_like(step.valid))
        positions = self._own_positions(step, t, x.device)
        if torch.compiler.is_exporting():
            return self._gated_block(x, positions, step, count, r[..., None], run)
        if not bool(run.any()):
            return x  # no row runs the layer: skip its compute entirely
        h, m = self.block(x, positions, step, count)
        return torch.where(run[:, None, None], h + r[..., None] * m, x)

    def _own_positions(self, step: Step, n: int, device) -> torch.Tensor:
        return step.kv.length(self.layer_idx)[:, None] + torch.arange(n, device=device)


# --------------------------------------------------------------------------------------------
# LLaVA


class VisionTower(nn.Module):
    """LLaVA's ``CLIPVisionTower``: ``.vision_tower`` is a transformers ``CLIPVisionModel``, whose
    parameters sit under ``vision_model.*`` as in the checkpoints LLaVA's authors saved."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(**spec.tower_config)
        cfg._attn_implementation = "eager"  # traces cleanly; the tower is a small share of the work
        clip = CLIPVisionModel(cfg)
        if hasattr(clip, "vision_model"):  # transformers 4: the keys already read vision_model.*
            self.vision_tower = clip
        else:  # transformers 5 flattened the module: hold it under the name the checkpoints use
            self.vision_tower = nn.Module()
            self.vision_tower.vision_model = clip
        self.clip = [clip]  # not a submodule: the callable, whatever its nesting
        self.select_layer = spec.select_layer
        self.select_feature = spec.select_feature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        clip = self.clip[0]
        dtype = next(clip.parameters()).dtype
        out = clip(pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.select_feature == "patch" else feats


def build_projector(spec: VisionSpec, hidden: int) -> nn.Module:
    import re

    if spec.projector_type == "linear":
        return nn.Linear(spec.mm_hidden_size, hidden)
    m = re.fullmatch(r"mlp(\d+)x_gelu", spec.projector_type)
    if not m:
        from gammamod.errors import GammamodError

        raise GammamodError(f"mm_projector_type {spec.projector_type!r}: expected linear or mlp<N>x_gelu")
    mods: list[nn.Module] = [nn.Linear(spec.mm_hidden_size, hidden)]
    for _ in range(1, int(m.group(1))):
        mods += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*mods)


class LlavaBackbone(nn.Module):
    """The ``model.*`` half of the checkpoint: embeddings, layers, final norm, projector, tower."""

    def __init__(self, cfg: DecoderConfig, recipe: Recipe, vision: VisionSpec | None,
                 router_bias: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        shared = None
        if recipe.router == "shared-binary":
            shared = nn.Linear(cfg.hidden_size, 2, bias=False)
        layers = []
        for i in range(cfg.num_layers):
            router = None
            if i in recipe.mod_layers:
                router = shared if shared is not None else ScalarRouter(cfg.hidden_size, router_bias)
            layers.append(DecoderLayer(cfg, i, recipe, router))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if vision is not None:
            self.mm_projector = build_projector(vision, cfg.hidden_size)
            if vision.has_tower:
                if vision.multipath is not None:
                    from .llava_hr import MultiPathTower

                    self.vision_tower = MultiPathTower(vision)
                else:
                    self.vision_tower = VisionTower(vision)
            if vision.anyres is not None:  # LLaVA-NeXT's spatial_unpad: the embedding closing each row
                self.image_newline = nn.Parameter(torch.empty(cfg.hidden_size))


class MoDLlava(nn.Module):
    """LLaVA with MoD layers. ``forward_chunk`` runs the decoder over one chunk of embeddings."""

    def __init__(self, cfg: DecoderConfig, recipe: Recipe, vision: VisionSpec | None,
                 router_bias: bool = False):
        super().__init__()
        self.config = cfg
        self.recipe = recipe
        self.vision = vision
        self.model = LlavaBackbone(cfg, recipe, vision, router_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.source: dict = {}  # checkpoint path, format, tokenizer files: set by the loader

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def has_vision(self) -> bool:
        return hasattr(self.model, "vision_tower") and hasattr(self.model, "mm_projector")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected image features [N, image_tokens, hidden] (anyres: N tiles)."""
        return self.model.mm_projector(self.model.vision_tower(pixel_values))

    def image_features(self, images) -> list[torch.Tensor]:
        """A ``runtime.image.ImageBatch`` -> what the decoder sees of each image, [tokens, hidden]
        (anyres: the base tile, then the unpadded feature map row by row, each row ending with
        ``image_newline``)."""
        pixels = torch.as_tensor(images.pixels)
        features = self.encode_images(pixels) if pixels.shape[0] else pixels.new_zeros(0, 0, self.config.hidden_size)
        rows = images.split(features)
        if self.vision.anyres is None:
            return [r[0] for r in rows]
        from .anyres import merge_anyres

        return [merge_anyres(r, size, self.vision.anyres, self.model.image_newline)
                for r, size in zip(rows, images.sizes)]

    def forward_chunk(self, inputs_embeds: torch.Tensor, step: Step) -> torch.Tensor:
        """Run every decoder layer over one chunk; returns the final-norm hidden states."""
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, step)
        return self.model.norm(x)

    def new_cache(self, batch: int, capacity: int = 64) -> KVCache:
        return KVCache(self.config, batch, self.dtype, self.lm_head.weight.device, capacity)


def mod_layer_flops(cfg: DecoderConfig, tokens: int, context: int) -> float:
    """Multiply-accumulate FLOPs (x2) of one decoder layer over ``tokens`` queries attending to
    ``context`` keys on average: projections, attention scores and values, SwiGLU MLP."""
    h, d = cfg.hidden_size, cfg.head_dim
    proj = 2 * tokens * h * (cfg.num_heads * d * 2 + cfg.num_kv_heads * d * 2)
    attn = 2 * 2 * tokens * context * cfg.num_heads * d
    mlp = 2 * tokens * 3 * h * cfg.intermediate_size
    return float(proj + attn + mlp)


def decoder_flops(cfg: DecoderConfig, seq_len: int, kept: dict[int, int] | None = None) -> float:
    """Prefill FLOPs of the decoder layers for a causal sequence of ``seq_len`` tokens when MoD
    layer ``l`` processes ``kept[l]`` of them (all tokens where absent)."""
    total = 0.0
    for layer in range(cfg.num_layers):
        n = (kept or {}).get(layer, seq_len)
        total += mod_layer_flops(cfg, n, (n + 1) / 2)
    return total


__all__ = ["DecoderConfig", "VisionSpec", "MoDLlava", "KVCache", "KVStore", "Step", "ROUTING_MODES",
           "decoder_flops"]
