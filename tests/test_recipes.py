"""Recipe arithmetic against numbers computed by hand from the papers' code (spec/mod-recipes.md)."""

import pytest

from gammamod.errors import GammamodError
from gammamod.export import recipes as rc

# p-MoD, Vicuna-7B (32 layers), shiftedcos_decay_0.85_0.15, router factor 0.5, 576 image tokens:
# the list in shared/spec/mod-recipes.md.
VICUNA7B_PMOD_K = [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89] + [86] * 8


def vicuna_pmod():
    schedule = rc.p_mod_schedule("shiftedcos_decay_0.85_0.15", 0.5, 32)
    return rc.p_mod(schedule, rc.ScoreNorm.parse("tanh_0.2_1"))


def test_pmod_vicuna7b_layers_and_kept_counts():
    recipe = vicuna_pmod()
    assert recipe.mod_layers == tuple(range(8, 32))
    assert [recipe.kept_count(layer, 576) for layer in recipe.mod_layers] == VICUNA7B_PMOD_K
    assert recipe.kept_count(3, 576) == 576  # a dense layer keeps everything


def test_pmod_average_ratio_is_the_papers_kv_share():
    recipe = vicuna_pmod()
    ratios = [1.0] * 8 + [recipe.layer_ratio(layer) for layer in recipe.mod_layers]
    assert sum(ratios) / 32 == pytest.approx(0.5375)


def test_pmod_other_schedules():
    assert rc.p_mod_schedule("deep_all", 0.5, 32) == {i: 0.5 for i in range(2, 31)}
    assert rc.p_mod_schedule("interleave", 0.3, 8) == {1: 0.3, 3: 0.3, 5: 0.3, 7: 0.3}
    lin = rc.p_mod_schedule("shiftedlinear_decay_0.75_0.25", 0.5, 32)
    # ratio(l) = -l/31 + 0.5 + 0.5 <= 0.75  <=>  l >= 7.75
    assert min(lin) == 8 and lin[31] == 0.25


def test_score_norm_parsing():
    assert rc.ScoreNorm.parse("tanh_0.2_1") == rc.ScoreNorm("tanh", 0.2, 1.0)
    assert rc.ScoreNorm.parse("sigmoid") == rc.ScoreNorm("sigmoid", 1.0, 1.0)
    assert rc.ScoreNorm.parse("none_1_-0.5") == rc.ScoreNorm("none", 1.0, -0.5)
    with pytest.raises(GammamodError, match="mod_weight_norm"):
        rc.ScoreNorm.parse("relu_1_1")


def test_gamma_kept_count_closed_form():
    recipe = rc.gamma_mod(range(3, 31))
    # LLaVA-HR: P = 1024 image + 35 system tokens; skip 0.5 keeps P - floor(529.5) = 530
    assert recipe.kept_count(5, 1059) == 530
    # the 0.34 checkpoints: floor(0.34 * 1059) = floor(360.06) = 360 skipped
    assert recipe.kept_count(5, 1059, skip_ratio=0.34) == 699
    # a decimal ratio is taken as written: 0.57 * 100 = 57 skipped (binary fp says 56.99999)
    assert recipe.kept_count(5, 100, skip_ratio=0.57) == 43
    assert recipe.kept_count(5, 7) == 4  # floor(3.5) = 3 skipped
    assert recipe.kept_count(0, 1059) == 1059  # not a MoD layer


def test_gamma_arank_and_other_layer_modes():
    assert rc.gamma_mod_layers({"mod_mode": "arank_mod"}, 32) == list(range(3, 31))
    assert rc.gamma_mod_layers({"mod_mode": "sparse"}, 6) == [0, 2, 4]
    assert rc.gamma_mod_layers({"mod_layers_idx": [5, 2]}, 8) == [2, 5]
    with pytest.raises(GammamodError, match="mod_layers_idx"):
        rc.gamma_mod_layers({"mod_layers_idx": [9]}, 8)
    with pytest.raises(GammamodError, match="mod_mode"):
        rc.gamma_mod_layers({"mod_mode": "bogus"}, 8)


def test_routable_spans():
    # gamma-MoD routes the system prompt and the image; p-MoD the image alone
    assert rc.gamma_mod([3]).routable_span(35, 1024) == (0, 1059)
    assert vicuna_pmod().routable_span(35, 576) == (35, 576)


def test_capacity_overrides_and_their_errors():
    recipe = rc.gamma_mod([3, 4])
    assert recipe.capacities(10, overrides={4: 2}) == {3: 5, 4: 2}
    with pytest.raises(GammamodError, match="layer 7: not a MoD layer"):
        recipe.capacities(10, overrides={7: 2})
    with pytest.raises(GammamodError, match=r"integer in \[0, 10\]"):
        recipe.capacities(10, overrides={3: 11})
    with pytest.raises(GammamodError, match="skip ratio"):
        recipe.kept_count(3, 10, skip_ratio=1.5)


def test_runtime_rule_equals_the_pytorch_recipes_for_every_span_length():
    """The runtime computes kept counts from the manifest's rule; they must be what the authors'
    PyTorch arithmetic gives: p-MoD's torch.trunc(int32 lengths * ratio) in float32, gamma-MoD's
    P - floor(skip * P) (exact: integer arithmetic on the decimal ratio)."""
    import torch

    from gammamod.runtime.capacity import CapacityRule

    pmod = vicuna_pmod()
    rule = CapacityRule(pmod.capacity_rule())
    lengths = torch.arange(1, 4097, dtype=torch.int32)
    want = {layer: torch.trunc(lengths * pmod.layer_ratio(layer)).to(torch.int64).tolist() for layer in pmod.mod_layers}
    got = [rule.kept_counts(n) for n in range(1, 4097)]
    for layer in pmod.mod_layers:
        assert [g[layer] for g in got] == want[layer], layer
    for skip, (num, den) in ((None, (1, 2)), (0.34, (34, 100)), (0.57, (57, 100))):
        gamma = rc.gamma_mod([3, 4])
        rule = CapacityRule(gamma.capacity_rule(skip_ratio=skip))
        assert [rule.kept_counts(n)[3] for n in range(1, 4097)] == [n - (num * n) // den for n in range(1, 4097)]
    assert CapacityRule(pmod.capacity_rule()).kept_counts(0) == {layer: 0 for layer in pmod.mod_layers}


def test_capacity_overrides_as_fractions_and_counts():
    from gammamod.runtime.capacity import CapacityRule

    gamma = rc.gamma_mod([3, 4, 5])
    rule = CapacityRule(gamma.capacity_rule(overrides={3: {"fraction": "0.3"}, 4: {"fraction": "1"}}))
    # ceil(r * N), exact as written: 0.3 * 10 is 3 (binary floating point says 3.0000000000000004)
    assert rule.kept_counts(10) == {3: 3, 4: 10, 5: 5}
    assert rule.kept_counts(7) == {3: 3, 4: 7, 5: 4}  # ceil(2.1) = 3
    counted = CapacityRule(gamma.capacity_rule(overrides={5: {"count": 40}}, count_span=100))
    assert counted.kept_counts(100) == {3: 50, 4: 50, 5: 40}
    with pytest.raises(GammamodError, match="absolute count .*span of 100 tokens; this prompt's span has 90"):
        counted.kept_counts(90)
    with pytest.raises(GammamodError, match="need count_span_length"):
        gamma.capacity_rule(overrides={5: {"count": 40}})
    with pytest.raises(GammamodError, match="capacity fraction 1.5"):
        CapacityRule(gamma.capacity_rule(overrides={3: {"fraction": "1.5"}})).kept_counts(10)
    with pytest.raises(GammamodError, match="--skip-ratio applies to gamma-MoD"):
        vicuna_pmod().capacity_rule(skip_ratio=0.3)
