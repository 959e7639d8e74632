"""The Mixture-of-Depths recipes as data.

One MoD layer implementation (``model.DecoderLayer``) reads a :class:`Recipe` and nothing else
to decide how it routes. The fields below are the seven ways the two papers differ; see
``shared/spec/mod-recipes.md`` for where each value comes from in the authors' code.

* gamma-MoD (arXiv 2410.13859): one binary router shared by every MoD layer, reading the
  layer's input RMSNorm; score ``r = softmax(router(norm(x)))[..., 1]``; the routable span is
  the system prompt plus the image tokens; a static layer keeps ``P - floor(skip * P)`` of the
  ``P`` routable tokens; kept tokens get renumbered positions ``0..k-1``; only the MLP branch
  is scaled by ``r``; decode skips a layer (no cache append) when ``r < 0.5``.
* p-MoD (arXiv 2412.04449): a scalar router per layer on the raw hidden state, TanhNorm
  ``w = 0.2 * tanh(logit) + 1``; only image tokens are routable; layer ``l`` keeps
  ``trunc(N * ratio_l)`` of ``N`` image tokens (progressive ratio decay); original positions;
  STRing weighting (kept image ``h + w*mlp(h)``, skipped image ``w*x``); dense decode.
* dense: the same decoder with the routers ignored (plain LLaVA, or a MoD checkpoint run as
  its own dense baseline).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from gammamod.errors import GammamodError
from gammamod.runtime import capacity

GAMMA_MOD = "gamma-mod"
P_MOD = "p-mod"
DENSE = "dense"
RECIPES = (GAMMA_MOD, P_MOD, DENSE)

# gamma-MoD's released inference (EvalMoDLLaVALlamaForCausalLM): prefill keeps every token whose
# router probability exceeds this, decode runs a layer only when the probability reaches the gate.
GAMMA_PREFILL_THRESHOLD = 0.005
GAMMA_DECODE_GATE = 0.5
GAMMA_DEFAULT_SKIP_RATIO = 0.5


@dataclass(frozen=True)
class ScoreNorm:
    """p-MoD's router weight normalisation ``scale * act(logit) + bias`` (``mod_weight_norm``)."""

    kind: str = "tanh"  # tanh | sigmoid | softmax | none
    scale: float = 0.2
    bias: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "ScoreNorm":
        # The authors' regex: "{act}_{scale}_{bias}", e.g. "tanh_0.2_1"; a bare name means scale 1, bias 1.
        m = re.fullmatch(r"(\w+?)_(\d+\.\d+|\d+)_(-?\d+\.\d+|-?\d+)", text)
        kind, scale, bias = (m.group(1), float(m.group(2)), float(m.group(3))) if m else (text, 1.0, 1.0)
        if kind not in ("tanh", "sigmoid", "softmax", "none"):
            raise GammamodError(f"mod_weight_norm {text!r}: expected tanh|sigmoid|softmax|none[_scale_bias]")
        return cls(kind, scale, bias)

    def __str__(self) -> str:
        return f"{self.kind}_{self.scale:g}_{self.bias:g}"


@dataclass(frozen=True)
class Recipe:
    """How a checkpoint routes tokens. Each field is one axis on which the recipes differ."""

    name: str
    mod_layers: tuple[int, ...] = ()
    # Router: "shared-binary" (Linear(h, 2) shared by all MoD layers, probability of class 1)
    # or "per-layer-scalar" (Linear(h, 1) per layer, then `score_norm`).
    router: str = "none"
    # What the router reads: "input-norm" (the layer's input RMSNorm of x) or "hidden" (raw x).
    router_input: str = "hidden"
    score_norm: ScoreNorm | None = None
    # Routable span: "prefix" (system prompt + image tokens) or "image" (image tokens only).
    span: str = "image"
    # Kept count: "skip-ratio" (P - floor(skip * P)) or "layer-ratio" (trunc(N * ratio_l)).
    kept: str = "layer-ratio"
    skip_ratio: float = GAMMA_DEFAULT_SKIP_RATIO
    layer_ratios: tuple[tuple[int, float], ...] = ()
    # Positions of kept tokens in a MoD layer: "renumbered" (0..k-1) or "original".
    positions: str = "original"
    # Output weighting: "mlp" (kept: h + r*mlp(h), skipped: x) or "string" (p-MoD's STRing).
    weighting: str = "mlp"
    # Decode: "gate" (layer runs only when r >= decode_gate, else no cache append) or "dense".
    decode: str = "dense"
    prefill_threshold: float = GAMMA_PREFILL_THRESHOLD
    decode_gate: float = GAMMA_DECODE_GATE
    # The checkpoint's own words, kept for the manifest and error messages.
    source: dict = field(default_factory=dict, compare=False)

    @property
    def is_mod(self) -> bool:
        return self.name != DENSE and bool(self.mod_layers)

    def is_mod_layer(self, layer: int) -> bool:
        return self.name != DENSE and layer in self.mod_layers

    def layer_ratio(self, layer: int) -> float:
        for idx, ratio in self.layer_ratios:
            if idx == layer:
                return ratio
        raise KeyError(layer)

    def routable_span(self, image_start: int, image_len: int) -> tuple[int, int]:
        """The (start, length) of the routable tokens for a prompt whose image sits at
        ``[image_start, image_start + image_len)``: gamma-MoD routes the system prompt and the
        image (everything before the question), p-MoD the image."""
        from gammamod.runtime.prompt import routable_span

        return routable_span(self.span, [(image_start, image_len)])

    def kept_count(self, layer: int, span_len: int, skip_ratio: float | None = None) -> int:
        """Static capacity: how many of the ``span_len`` routable tokens MoD layer ``layer`` keeps
        (the closed forms live in ``gammamod.runtime.capacity``, shared with the runtime)."""
        if not self.is_mod_layer(layer):
            return span_len
        if self.kept == "skip-ratio":
            return capacity.skip_ratio_count(span_len, self.skip_ratio if skip_ratio is None else skip_ratio)
        return capacity.layer_ratio_count(span_len, self.layer_ratio(layer))

    def capacities(self, span_len: int, skip_ratio: float | None = None,
                   overrides: dict[int, int] | None = None) -> dict[int, int]:
        """Kept count of every MoD layer for a span of ``span_len`` tokens, with optional per-layer
        absolute counts (the Python API's ``capacity={layer: k}``)."""
        if skip_ratio is not None and self.kept != "skip-ratio":
            raise GammamodError(f"a skip ratio applies to gamma-MoD; this {self.name} checkpoint keeps counts from "
                                "its own layer schedule (use --capacity to override layers)")
        caps = {layer: self.kept_count(layer, span_len, skip_ratio) for layer in self.mod_layers}
        for layer, k in (overrides or {}).items():
            self._check_layer(layer)
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= span_len:
                raise GammamodError(
                    f"capacity for layer {layer}: expected an integer in [0, {span_len}] "
                    f"(the routable span), got {k!r}")
            caps[layer] = k
        return caps

    def _check_layer(self, layer: int) -> None:
        if layer not in self.mod_layers:
            raise GammamodError(f"capacity for layer {layer}: not a MoD layer of this {self.name} checkpoint "
                                f"(MoD layers: {list(self.mod_layers)})")

    def capacity_rule(self, skip_ratio=None, overrides: dict | None = None, count_span: int | None = None) -> dict:
        """The manifest's ``routing.capacity``: this recipe's rule, the skip ratio (gamma-MoD) and
        per-layer overrides ({layer: {"fraction": "0.3"} | {"count": 100}}), which the runtime
        evaluates for any span length (``runtime.capacity.CapacityRule``)."""
        if skip_ratio is not None and self.kept != "skip-ratio":
            raise GammamodError(f"--skip-ratio applies to gamma-MoD; this {self.name} checkpoint keeps counts from "
                                "its own layer schedule (use --capacity to override layers)")
        for layer in overrides or {}:
            self._check_layer(layer)
        data = {"rule": self.kept, "mod_layers": list(self.mod_layers),
                "overrides": {str(k): v for k, v in sorted((overrides or {}).items())},
                "count_span_length": count_span}
        if self.kept == "skip-ratio":
            data["skip_ratio"] = _decimal_text(self.skip_ratio if skip_ratio is None else skip_ratio)
        else:
            data["layer_ratios"] = {str(k): v for k, v in self.layer_ratios}
        capacity.CapacityRule(data)  # validates
        return data

    def as_dense(self) -> "Recipe":
        return replace(self, name=DENSE)


def _decimal_text(value) -> str:
    """A ratio as the decimal text the rule stores ("0.5"), exactly as given."""
    return value if isinstance(value, str) else repr(float(value))


def gamma_mod(mod_layers, skip_ratio: float = GAMMA_DEFAULT_SKIP_RATIO, source: dict | None = None) -> Recipe:
    return Recipe(
        name=GAMMA_MOD, mod_layers=tuple(sorted(mod_layers)), router="shared-binary",
        router_input="input-norm", span="prefix", kept="skip-ratio", skip_ratio=skip_ratio,
        positions="renumbered", weighting="mlp", decode="gate", source=source or {})


def p_mod(layer_ratios: dict[int, float], score_norm: ScoreNorm, source: dict | None = None) -> Recipe:
    return Recipe(
        name=P_MOD, mod_layers=tuple(sorted(layer_ratios)), router="per-layer-scalar",
        router_input="hidden", score_norm=score_norm, span="image", kept="layer-ratio",
        layer_ratios=tuple(sorted(layer_ratios.items())), positions="original",
        weighting="string", decode="dense", source=source or {})


def dense() -> Recipe:
    return Recipe(name=DENSE)


# --- the authors' layer schedules -------------------------------------------------------------

def gamma_mod_layers(mod_cfg: dict, num_layers: int) -> list[int]:
    """gamma-MoD's ``mod`` config dict -> MoD layer indices (``initialize_mod_modules``)."""
    idx = mod_cfg.get("mod_layers_idx")
    if idx is not None:
        bad = [i for i in idx if not (isinstance(i, int) and 0 <= i < num_layers)]
        if bad:
            raise GammamodError(f"mod.mod_layers_idx {bad}: expected layer indices in [0, {num_layers})")
        return sorted(idx)
    mode = mod_cfg.get("mod_mode", "sparse")
    n = num_layers
    modes = {
        "first_half": list(range(0, n // 2)),
        "second_half": list(range(n // 2, n - 1)),
        "sparse": list(range(n))[::2],
        "dense": list(range(n)),
        "first_last_dense": list(range(1, n - 1)),
        "last_two_thirds": list(range(n // 3 + 2, n - 1)),
        "first_five_dense": list(range(5, n - 1)),
        "arank_mod": [i for i in range(n) if i not in {0, 1, 2, n - 1}],
    }
    if mode not in modes:
        raise GammamodError(f"mod.mod_mode {mode!r}: expected one of {sorted(modes)}")
    return modes[mode]


def _shifted_cos(factor: float, layer: int) -> float:
    return math.cos(layer * math.pi / 31) / 2 + factor  # 31 is hard-coded by the authors


def _shifted_linear(factor: float, layer: int) -> float:
    return (-layer / 31 + 0.5) + factor


def p_mod_schedule(target_layers: str, router_factor: float, num_layers: int) -> dict[int, float]:
    """p-MoD's ``mod_target_layers`` -> {MoD layer: keep ratio} (``build_mod_layers``)."""
    m = re.fullmatch(r"(\w+)_decay_(\d+\.\d+)_(\d+\.\d+)", target_layers)
    if m:
        decay = {"shiftedcos": _shifted_cos, "shiftedlinear": _shifted_linear}.get(m.group(1))
        if decay is None:
            raise GammamodError(f"mod_target_layers {target_layers!r}: unknown decay {m.group(1)!r}, "
                                "expected shiftedcos or shiftedlinear")
        max_ratio, min_ratio = float(m.group(2)), float(m.group(3))
        return {i: max(decay(router_factor, i), min_ratio)
                for i in range(num_layers) if decay(router_factor, i) <= max_ratio}
    fixed = {
        "deep_all": range(2, num_layers - 1),
        "deep_all_include_last": range(2, num_layers),
        "interleave": range(1, num_layers, 2),
    }
    if target_layers not in fixed:
        raise GammamodError(f"mod_target_layers {target_layers!r}: expected <decay>_decay_<max>_<min>, "
                            "deep_all, deep_all_include_last or interleave")
    return {i: router_factor for i in fixed[target_layers]}
