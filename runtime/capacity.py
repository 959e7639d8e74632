"""Static capacity: how many of a routed span's N tokens each MoD layer keeps.

A kept count is a function of the span length alone, never of the router's scores, so every shape
is known before a graph runs. The artifact's manifest carries the rule (``routing.capacity``), not
a table: the runtime computes the counts for whatever span a prompt has, and the PyTorch recipe
(``gammamod.export.recipes``) computes them with these same functions.

* ``skip-ratio`` (gamma-MoD): ``k = N - floor(skip * N)``, the skip ratio read as the decimal the
  user wrote (0.57 * 100 is 56.99999 in binary floating point, 57 in decimal);
* ``layer-ratio`` (p-MoD): ``k = trunc(N * ratio_l)`` evaluated in float32, as the authors'
  ``torch.trunc(int32 lengths * python float)`` does;
* per-layer overrides (``--capacity FILE``): a fraction ``0 < r <= 1`` gives ``k = ceil(r * N)``,
  exact in decimal; an absolute count holds for the one span length the file names.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from gammamod.errors import GammamodError


def decimal_fraction(value) -> Fraction:
    """A ratio as the decimal a person wrote it: '0.57' and 0.57 both give 57/100."""
    if isinstance(value, Fraction):
        return value
    text = value if isinstance(value, str) else repr(float(value))
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise GammamodError(f"ratio {value!r}: expected a decimal number") from None


def skip_ratio_count(span: int, skip) -> int:
    skip = decimal_fraction(skip)
    if not 0 <= skip < 1:
        raise GammamodError(f"skip ratio {float(skip):g}: expected a number in [0, 1)")
    return span - math.floor(skip * span)


def layer_ratio_count(span: int, ratio: float) -> int:
    return int(np.trunc(np.float32(span) * np.float32(ratio)))


def fraction_count(span: int, fraction) -> int:
    r = decimal_fraction(fraction)
    if not 0 < r <= 1:
        raise GammamodError(f"capacity fraction {float(r):g}: expected a number in (0, 1]")
    return math.ceil(r * span)


class CapacityRule:
    """The manifest's ``routing.capacity``: kept counts per MoD layer for any span length."""

    def __init__(self, data: dict):
        self.data = data
        self.kind = data.get("rule")
        if self.kind not in ("skip-ratio", "layer-ratio"):
            raise GammamodError(f"capacity rule {self.kind!r}: expected skip-ratio or layer-ratio")
        self.layers = [int(x) for x in data.get("mod_layers", [])]
        self.skip_ratio = data.get("skip_ratio")
        self.layer_ratios = {int(k): float(v) for k, v in (data.get("layer_ratios") or {}).items()}
        self.overrides = {int(k): v for k, v in (data.get("overrides") or {}).items()}
        self.count_span = data.get("count_span_length")
        if self.kind == "skip-ratio":
            decimal_fraction(self.skip_ratio)
        elif set(self.layer_ratios) != set(self.layers):
            raise GammamodError("capacity rule: layer_ratios must name every MoD layer")
        for layer, o in self.overrides.items():
            if layer not in self.layers or not isinstance(o, dict) or len(o) != 1 or not ({"fraction", "count"} & set(o)):
                raise GammamodError(f"capacity override for layer {layer}: expected {{'fraction': r}} or "
                                    "{'count': k} for a MoD layer")
        if any("count" in o for o in self.overrides.values()) and not isinstance(self.count_span, int):
            raise GammamodError("capacity overrides with absolute counts need count_span_length")
        for layer, o in self.overrides.items():
            if "fraction" in o:
                fraction_count(1, o["fraction"])  # in (0, 1]
            elif isinstance(o["count"], bool) or not isinstance(o["count"], int) or not 0 <= o["count"] <= self.count_span:
                raise GammamodError(f"capacity override for layer {layer}: count {o['count']!r} must lie in "
                                    f"[0, {self.count_span}] (the span it holds for)")

    def kept_counts(self, span: int) -> dict[int, int]:
        """{MoD layer: kept count} for a routed span of ``span`` tokens (0: no routing, all 0)."""
        if not isinstance(span, (int, np.integer)) or span < 0:
            raise GammamodError(f"span length {span!r}: expected an integer >= 0")
        span = int(span)
        counts = {}
        for layer in self.layers:
            o = self.overrides.get(layer)
            if o is not None and "count" in o:
                if span not in (0, self.count_span):
                    raise GammamodError(
                        f"the artifact's capacity for MoD layer {layer} is an absolute count ({o['count']}) that holds "
                        f"for a routed span of {self.count_span} tokens; this prompt's span has {span}. Re-export "
                        "with capacities as fractions of the span to serve other prompt layouts")
                counts[layer] = 0 if span == 0 else int(o["count"])
            elif o is not None:
                counts[layer] = fraction_count(span, o["fraction"])
            elif self.kind == "skip-ratio":
                counts[layer] = skip_ratio_count(span, self.skip_ratio)
            else:
                counts[layer] = layer_ratio_count(span, self.layer_ratios[layer])
        return counts
