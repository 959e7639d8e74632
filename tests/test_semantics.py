"""MoD routing semantics, pinned by hand-computed cases.

The oracle for attention, RoPE, RMSNorm and the MLP is transformers' own Llama layer, loaded
with the same weights; the routing rules (which tokens, which positions, which weights) are
written out here from the spec, independently of ``export/routing.py``.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from gammamod.export import forward_language, generate_from_embeds
from gammamod.export import recipes as rc
from gammamod.export.model import DecoderConfig, MoDLlava, Step

H = 16


def build(recipe, layers=1, seed=0, router_bias=False):
    cfg = DecoderConfig(vocab_size=40, hidden_size=H, intermediate_size=24, num_layers=layers, num_heads=2,
                        num_kv_heads=1, head_dim=8)
    torch.manual_seed(seed)
    model = MoDLlava(cfg, recipe, None, router_bias).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.4 * torch.randn_like(p))
    return model


def oracle(model, layer_idx=0):
    """transformers' LlamaDecoderLayer with the same weights; returns halves(x, positions) -> (h, m)."""
    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta)
    cfg._attn_implementation = "sdpa"
    hf = LlamaDecoderLayer(cfg, layer_idx).eval()
    ours = {k: v for k, v in model.model.layers[layer_idx].state_dict().items() if not k.startswith("router")}
    hf.load_state_dict(ours)
    rope = LlamaRotaryEmbedding(cfg)

    @torch.no_grad()
    def halves(x, positions):
        cos, sin = rope(x, positions)
        h = x + hf.self_attn(hidden_states=hf.input_layernorm(x), position_embeddings=(cos, sin),
                             attention_mask=None)[0]
        return h, hf.mlp(hf.post_attention_layernorm(h))

    return halves


def run_layer(model, x, routing, span=None, capacity=None, cache=None, layer_idx=0):
    b, t, _ = x.shape
    cache = cache or model.new_cache(b)
    step = Step(routing=routing, kv=cache, past_length=cache.seen.clone(), valid=torch.full((b,), t),
                span_start=torch.full((b,), span[0]) if span else None, span_length=span[1] if span else 0,
                capacity=capacity or {})
    with torch.no_grad():
        out = model.model.layers[layer_idx](x, step)
    cache.seen += t
    return out, step.kept.get(layer_idx), cache


def gamma_r(model, x, layer_idx=0):
    """r = softmax(router(input_layernorm(x)))[..., 1], computed by hand."""
    layer = model.model.layers[layer_idx]
    xf = x.float()
    normed = layer.input_layernorm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    logits = normed @ layer.router.weight.T
    return torch.exp(logits[..., 1]) / torch.exp(logits).sum(-1)


# --------------------------------------------------------------------------------------------
# gamma-MoD


def test_gamma_static_kept_count_renumbered_positions_and_mlp_only_scaling():
    model = build(rc.gamma_mod([0]))
    torch.manual_seed(1)
    x = torch.randn(1, 10, H)
    span = (0, 6)  # system + image tokens; 4 question tokens after
    out, kept, cache = run_layer(model, x, "static", span=span, capacity={0: 3})
    r = gamma_r(model, x)[0]
    top3 = sorted(torch.topk(r[:6], 3).indices.tolist())
    expected_kept = top3 + [6, 7, 8, 9]  # all later tokens are always kept
    assert kept[0].tolist() == expected_kept
    h, m = oracle(model)(x[:, expected_kept], torch.arange(7)[None])  # renumbered 0..k-1, causal among kept
    want = x.clone()
    want[0, expected_kept] = h[0] + r[expected_kept, None] * m[0]  # only the MLP branch is scaled
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    skipped = [i for i in range(10) if i not in expected_kept]
    assert torch.equal(out[0, skipped], x[0, skipped])  # skipped tokens pass through exactly
    assert cache.lengths[0].tolist() == [7]  # the layer caches only the tokens it processed


def test_gamma_static_default_skip_ratio_through_forward_language():
    model = build(rc.gamma_mod([1, 2]), layers=3)
    x = torch.randn(1, 12, H)
    out = forward_language(model, x, routable=(0, 9), routing="static")
    # 9 routable: 9 - floor(4.5) = 5 kept, plus the 3 later tokens
    assert {k: v.shape[1] for k, v in out.kept.items()} == {1: 8, 2: 8}
    assert out.kv_lengths[:, 0].tolist() == [12, 8, 8]
    assert out.capacity == {1: 5, 2: 5}
    out = forward_language(model, x, routable=(0, 9), routing="static", skip_ratio=0.34, capacity={2: 2})
    assert out.capacity == {1: 9 - 3, 2: 2}


def test_gamma_decode_gate_skips_without_cache_append():
    model = build(rc.gamma_mod([0]))
    x = torch.randn(1, 6, H)
    new = torch.randn(1, 1, H)
    r_new = float(gamma_r(model, new)[0, 0])
    router = model.model.layers[0].router
    if r_new >= 0.5:  # make the gate close for this token: swap the two router rows
        with torch.no_grad():
            router.weight.copy_(router.weight.flip(0))
    assert float(gamma_r(model, new)[0, 0]) < 0.5
    _, _, cache = run_layer(model, x, "static", span=(0, 4), capacity={0: 2})
    assert cache.lengths[0].tolist() == [4]
    out, _, cache = run_layer(model, new, "static", cache=cache)
    assert torch.equal(out, new)  # output = input
    assert cache.lengths[0].tolist() == [4]  # no key/value appended


def test_gamma_decode_gate_open_appends_at_own_position():
    model = build(rc.gamma_mod([0]))
    x = torch.randn(1, 6, H)
    new = torch.randn(1, 1, H)
    router = model.model.layers[0].router
    if float(gamma_r(model, new)[0, 0]) < 0.5:
        with torch.no_grad():
            router.weight.copy_(router.weight.flip(0))
    r_new = float(gamma_r(model, new)[0, 0])
    assert r_new >= 0.5
    _, kept, cache = run_layer(model, x, "static", span=(0, 4), capacity={0: 2})
    kept = kept[0].tolist()  # 2 routable + 2 later tokens: this layer's cache holds 4 entries
    out, _, cache = run_layer(model, new, "static", cache=cache)
    # the decoded token's position in a MoD layer is that layer's cache length (4), not 6
    h, m = oracle(model)(torch.cat([x[:, kept], new], 1), torch.arange(5)[None])
    torch.testing.assert_close(out[0, 0], h[0, -1] + r_new * m[0, -1], rtol=1e-5, atol=1e-5)
    assert cache.lengths[0].tolist() == [5]


def test_gamma_reference_thresholds_any_token_and_ignores_the_span():
    from dataclasses import replace

    x = torch.randn(1, 12, H)
    r = gamma_r(build(rc.gamma_mod([0])), x)[0]
    order = torch.argsort(r)
    low = sorted(order[:2].tolist())
    # the same weights (same seed) with the threshold between the 2nd and 3rd smallest r, so the
    # rule "keep r > threshold" must drop exactly those two, wherever they sit
    threshold = float((r[order[1]] + r[order[2]]) / 2)
    model = build(replace(rc.gamma_mod([0]), prefill_threshold=threshold))
    out, kept, cache = run_layer(model, x, "reference", span=(0, 3))
    expected = [i for i in range(12) if i not in low]
    assert kept[0].tolist() == expected
    h, m = oracle(model)(x[:, expected], torch.arange(10)[None])
    want = x.clone()
    want[0, expected] = h[0] + r[expected, None] * m[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, low], x[0, low])
    assert cache.lengths[0].tolist() == [10]


def test_gamma_reference_default_threshold_is_the_authors():
    assert rc.gamma_mod([1]).prefill_threshold == 0.005
    assert rc.gamma_mod([1]).decode_gate == 0.5


# --------------------------------------------------------------------------------------------
# p-MoD


def pmod_recipe(ratio=0.5):
    return rc.p_mod({0: ratio}, rc.ScoreNorm.parse("tanh_0.2_1"))


def test_pmod_tanhnorm_string_and_original_positions():
    model = build(pmod_recipe(0.5), router_bias=True)
    x = torch.randn(1, 12, H)
    span = (3, 6)  # 3 system tokens, 6 image tokens, 3 question tokens
    out, kept, cache = run_layer(model, x, "static", span=span, capacity={0: 3})
    router = model.model.layers[0].router.router
    logit = (x[0] @ router.weight[0] + router.bias[0])
    w = 0.2 * torch.tanh(logit) + 1  # TanhNorm
    top = sorted((torch.topk(w[3:9], 3).indices + 3).tolist())
    expected = [0, 1, 2] + top + [9, 10, 11]
    assert kept[0].tolist() == expected
    h, m = oracle(model)(x[:, expected], torch.tensor([expected]))  # ORIGINAL positions
    want = torch.empty_like(x)
    for j, i in enumerate(expected):
        if 3 <= i < 9:
            want[0, i] = h[0, j] + w[i] * m[0, j]  # kept image token
        else:
            want[0, i] = h[0, j] + m[0, j]  # text token: unweighted
    for i in range(3, 9):
        if i not in expected:
            want[0, i] = w[i] * x[0, i]  # skipped image token is scaled, not passed
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert cache.lengths[0].tolist() == [9]


def test_pmod_decode_is_dense_at_absolute_positions():
    model = build(pmod_recipe(0.5), router_bias=True)
    x = torch.randn(1, 12, H)
    new = torch.randn(1, 1, H)
    _, kept, cache = run_layer(model, x, "static", span=(3, 6), capacity={0: 3})
    kept = kept[0].tolist()
    out, _, cache = run_layer(model, new, "static", cache=cache)
    # position 12 (the sequence length), attending to the 9 cached text + kept image entries
    h, m = oracle(model)(torch.cat([x[:, kept], new], 1), torch.tensor([kept + [12]]))
    torch.testing.assert_close(out[0, 0], h[0, -1] + m[0, -1], rtol=1e-5, atol=1e-5)
    assert cache.lengths[0].tolist() == [10]


def test_pmod_reference_equals_static():
    """The authors' boolean-mask implementation and our static gather/scatter agree exactly."""
    recipe = rc.p_mod({1: 0.7, 2: 0.4, 3: 0.2}, rc.ScoreNorm.parse("tanh_0.2_1"))
    model = build(recipe, layers=5, router_bias=True)
    x = torch.randn(1, 30, H)
    ref = forward_language(model, x, routable=(4, 20), routing="reference")
    sta = forward_language(model, x, routable=(4, 20), routing="static")
    assert {k: v.tolist() for k, v in ref.kept.items()} == {k: v.tolist() for k, v in sta.kept.items()}
    assert {k: v.shape[1] for k, v in sta.kept.items()} == {1: 10 + 14, 2: 10 + 8, 3: 10 + 4}
    torch.testing.assert_close(ref.logits, sta.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(ref.kv_lengths, sta.kv_lengths)


# --------------------------------------------------------------------------------------------
# batches, caches, modes


@pytest.mark.parametrize("recipe", [rc.gamma_mod([1, 2]), rc.p_mod({1: 0.6, 2: 0.3}, rc.ScoreNorm())])
def test_batch_rows_are_routed_independently(recipe):
    model = build(recipe, layers=3, router_bias=recipe.router == "per-layer-scalar")
    x = torch.randn(2, 16, H)
    span = (0, 10) if recipe.name == "gamma-mod" else (2, 10)
    both = generate_from_embeds(model, x, routable=span, routing="static", max_new_tokens=6, return_logits=True)
    for b in range(2):
        one = generate_from_embeds(model, x[b:b + 1], routable=span, routing="static", max_new_tokens=6,
                                   return_logits=True)
        assert torch.equal(both.tokens[b], one.tokens[0])
        for layer in both.kept:
            assert both.kept[layer][b].tolist() == one.kept[layer][0].tolist()
        assert both.kv_lengths[:, b].tolist() == one.kv_lengths[:, 0].tolist()
        torch.testing.assert_close(both.logits[b], one.logits[0], rtol=1e-5, atol=1e-5)
    # different rows choose different tokens: the routing really is per row
    assert any(both.kept[layer][0].tolist() != both.kept[layer][1].tolist() for layer in both.kept)


@pytest.mark.parametrize("recipe", [rc.gamma_mod([1, 2]), rc.p_mod({1: 0.6, 2: 0.3}, rc.ScoreNorm())])
def test_rows_with_spans_at_different_positions(recipe):
    """One batch, each row its own span start (one length): every row equals that row alone."""
    model = build(recipe, layers=3, router_bias=recipe.router == "per-layer-scalar")
    x = torch.randn(2, 18, H)
    spans = [(1, 9), (6, 9)] if recipe.name == "p-mod" else [(0, 9), (0, 9)]
    if recipe.name == "gamma-mod":  # gamma-MoD routes a prefix: different prompts end it at different places
        spans = [(0, 9), (0, 9)]
    both = generate_from_embeds(model, x, routable=spans, routing="static", max_new_tokens=5, return_logits=True)
    for b in range(2):
        one = generate_from_embeds(model, x[b:b + 1], routable=spans[b], routing="static", max_new_tokens=5,
                                   return_logits=True)
        assert torch.equal(both.tokens[b], one.tokens[0])
        for layer in both.kept:
            assert both.kept[layer][b].tolist() == one.kept[layer][0].tolist()
            # the row's tokens outside its own span are all kept
            start, n = spans[b]
            assert set(range(start)) | set(range(start + n, 18)) <= set(both.kept[layer][b].tolist())
        torch.testing.assert_close(both.logits[b], one.logits[0], rtol=1e-5, atol=1e-5)


def test_right_padded_rows_match_unpadded():
    model = build(rc.gamma_mod([1]), layers=2)
    a, b = torch.randn(1, 14, H), torch.randn(1, 11, H)
    padded = torch.zeros(2, 14, H)
    padded[0], padded[1, :11] = a[0], b[0]
    both = generate_from_embeds(model, padded, routable=(0, 8), routing="static", max_new_tokens=5,
                                lengths=[14, 11])
    only_b = generate_from_embeds(model, b, routable=(0, 8), routing="static", max_new_tokens=5)
    assert torch.equal(both.tokens[1], only_b.tokens[0])
    assert both.kv_lengths[:, 1].tolist() == only_b.kv_lengths[:, 0].tolist()


def test_dense_mode_ignores_routers():
    model = build(rc.gamma_mod([0, 1]), layers=2)
    plain = build(rc.dense(), layers=2)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".router" not in k})
    x = torch.randn(1, 9, H)
    torch.testing.assert_close(forward_language(model, x, routable=(0, 5), routing="dense").logits,
                               forward_language(plain, x, routable=(0, 5), routing="static").logits)


def test_reference_mode_refuses_batches():
    from gammamod.errors import GammamodError

    model = build(rc.gamma_mod([0]))
    with pytest.raises(GammamodError, match="batch size 1"):
        forward_language(model, torch.randn(2, 5, H), routable=(0, 3), routing="reference")
