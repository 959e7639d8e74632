"""Loading the authors' checkpoint layouts, and one-line errors for damaged ones."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gammamod.errors import GammamodError
from gammamod.export import forward_language, load_checkpoint
from gammamod.export.checkpoint import canonical_key, checkpoint_key


def logits_of(model, tokens=24, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens))
    return forward_language(model, model.embed(ids), routable=(0, 12), routing="static").logits


# --------------------------------------------------------------------------------------------
# formats


def test_gamma_checkpoint_is_in_the_authors_format(tiny_gamma):
    cfg = json.loads((tiny_gamma / "config.json").read_text())
    assert cfg["model_type"] == "mod_llava_llama" and cfg["mod"]["mod_layers_idx"] == [3, 4, 5, 6]
    keys = set(load_file(tiny_gamma / "model.safetensors"))
    # safetensors keeps the shared router under one key only; 4.31 saves carry inv_freq buffers
    assert [k for k in keys if k.endswith("router.weight")] == ["model.layers.3.router.weight"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in keys
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in keys)
    model = load_checkpoint(tiny_gamma)
    assert model.recipe.name == "gamma-mod" and model.recipe.mod_layers == (3, 4, 5, 6)
    routers = {id(model.model.layers[i].router) for i in (3, 4, 5, 6)}
    assert len(routers) == 1  # one Linear shared by every MoD layer
    assert model.has_vision


def test_pmod_checkpoint_is_in_the_authors_format(tiny_pmod):
    cfg = json.loads((tiny_pmod / "config.json").read_text())
    assert cfg["model_type"] == "pmod_llava_llama"
    keys = set(load_file(tiny_pmod / "model.safetensors"))
    assert "model.layers.8.decoder_layer.self_attn.q_proj.weight" in keys
    assert "model.layers.8.router.router.weight" in keys and "model.layers.8.router.router.bias" in keys
    assert "model.layers.7.self_attn.q_proj.weight" in keys  # plain layers keep plain keys
    model = load_checkpoint(tiny_pmod)
    assert model.recipe.mod_layers == tuple(range(8, 32))


def test_bench_size_has_llava_geometry_and_routers_that_rank(tmp_path, monkeypatch, test_image_path):
    """The bench model: LLaVA-1.5 geometry, and p-MoD routers that rank image tokens rather than
    saturate TanhNorm (saturated weights tie exactly, and the kept set is then decided by ties and
    rounding: an ONNX Runtime run and PyTorch would keep different tokens)."""
    import gammamod.export.routing as routing
    from gammamod.export.generate import generate_from_embeds
    from gammamod.export.tiny import make_tiny
    from gammamod.validate.parity import reference_batch

    ckpt = make_tiny(tmp_path / "bench", "p-mod", size="bench")
    model = load_checkpoint(ckpt)
    assert (model.config.num_layers, model.config.hidden_size, model.vision.image_tokens) == (32, 512, 576)
    weights = {}
    select = routing.select_kept
    monkeypatch.setattr(routing, "select_kept", lambda w, start, length, k: (
        weights.setdefault(len(weights), w[0, start:start + length].clone()), select(w, start, length, k))[1])
    batch = reference_batch(model, ckpt, ["What is in the picture?"], test_image_path)
    generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, routing="static", max_new_tokens=1)
    assert len(weights) == len(model.recipe.mod_layers)
    norm = model.recipe.score_norm  # TanhNorm: tanh(logit) * 0.2 + 1, bounds 0.8 and 1.2
    low, high = torch.tensor(-norm.scale + norm.bias), torch.tensor(norm.scale + norm.bias)
    for layer, w in weights.items():
        at_bound = ((w == low) | (w == high)).float().mean().item()
        assert at_bound <= 0.05, f"MoD layer {layer}: {at_bound:.0%} of image tokens saturate TanhNorm"


def test_gamma_bin_save_with_router_under_every_key(tiny_gamma, copy_ckpt):
    """.bin saves (read with weights_only=True) store the shared router under every MoD layer."""
    ckpt = copy_ckpt(tiny_gamma)
    state = load_file(ckpt / "model.safetensors")
    for i in (4, 5, 6):
        state[f"model.layers.{i}.router.weight"] = state["model.layers.3.router.weight"].clone()
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    torch.testing.assert_close(logits_of(load_checkpoint(ckpt)), logits_of(load_checkpoint(tiny_gamma)))


def test_sharded_safetensors_with_index(tiny_root, tiny_gamma):
    from gammamod.export.tiny import make_tiny

    out = make_tiny(tiny_root / "gamma-sharded", "gamma-mod", shard_mb=0.05)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(logits_of(load_checkpoint(out)), logits_of(load_checkpoint(tiny_gamma)))


def test_llava_original_takes_its_tower_from_the_tower_directory(tiny_llava):
    keys = set(load_file(tiny_llava / "model.safetensors"))
    assert not any(k.startswith("model.vision_tower.") for k in keys)  # as LLaVA-1.5 releases
    model = load_checkpoint(tiny_llava)
    assert model.recipe.name == "dense" and model.has_vision
    assert model.vision.tower_source.endswith("clip-vision-tower")


def test_llava_hf_layout_equals_original(tiny_llava, tiny_llava_hf):
    hf_model, model = load_checkpoint(tiny_llava_hf), load_checkpoint(tiny_llava)
    torch.testing.assert_close(logits_of(hf_model), logits_of(model))
    pixels = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(hf_model.encode_images(pixels), model.encode_images(pixels))


def test_llava_hf_matches_transformers_llava(tiny_llava_hf):
    """Our LLaVA (tower feature layer -2, patch features, mlp2x_gelu, splice) against transformers'
    LlavaForConditionalGeneration on the same checkpoint."""
    from transformers import LlavaForConditionalGeneration

    from gammamod.export.model import Step

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_llava_hf).eval()
    ours = load_checkpoint(tiny_llava_hf)
    image_id = hf.config.image_token_index
    n_img = ours.vision.image_tokens
    torch.manual_seed(0)
    before, after = torch.randint(3, 400, (1, 7)), torch.randint(3, 400, (1, 9))
    ids = torch.cat([before, torch.full((1, n_img), image_id), after], 1)
    pixels = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        embeds = torch.cat([ours.embed(before), ours.encode_images(pixels), ours.embed(after)], 1)
    got = forward_language(ours, embeds, routing="dense").logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    del Step


def test_llava_hf_layout_of_transformers_4_52(tiny_llava_hf, copy_ckpt):
    """transformers 4.52-4.57 saved llava as model.language_model.*, model.vision_tower.*, lm_head."""
    ckpt = copy_ckpt(tiny_llava_hf)
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    state = {}
    for k, v in load_file(ckpt / "model.safetensors").items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        state[k] = v
    save_file(state, ckpt / "model.safetensors")
    torch.testing.assert_close(logits_of(load_checkpoint(ckpt)), logits_of(load_checkpoint(tiny_llava_hf)))


def test_key_translation_round_trips():
    for fmt, name in [("p-mod", "model.layers.9.mlp.up_proj.weight"), ("p-mod", "model.layers.9.router.router.bias"),
                      ("llava-hf", "model.mm_projector.2.bias"), ("llava-hf", "lm_head.weight"),
                      ("llava-hf", "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"),
                      ("gamma-mod", "model.layers.3.router.weight")]:
        assert canonical_key(fmt, checkpoint_key(fmt, name, mod_layers=range(8, 32))) == name


def test_language_model_only_checkpoint_loads_and_refuses_images(tiny_pmod, copy_ckpt):
    ckpt = copy_ckpt(tiny_pmod)
    state = {k: v for k, v in load_file(ckpt / "model.safetensors").items()
             if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    save_file(state, ckpt / "model.safetensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    for k in [k for k in cfg if k.startswith("mm_")]:
        del cfg[k]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = load_checkpoint(ckpt)
    assert not model.has_vision
    logits_of(model)
    from gammamod.export.generate import generate_text

    with pytest.raises(GammamodError, match="cannot take images"):
        generate_text(ckpt, "what?", image=__import__("gammamod.demo", fromlist=["x"]).test_image(), model=model)


def test_hub_tower_name_without_local_copy(tiny_llava, copy_ckpt, test_image_path):
    ckpt = copy_ckpt(tiny_llava)
    tower = ckpt / "clip-vision-tower"
    moved = ckpt.parent / "local-clip"
    tower.rename(moved)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = load_checkpoint(ckpt)
    assert not model.has_vision
    from gammamod.export.generate import generate_text

    with pytest.raises(GammamodError, match="openai/clip-vit-large-patch14-336.*--vision-tower"):
        generate_text(ckpt, "what?", image=test_image_path, model=model)
    model = load_checkpoint(ckpt, vision_tower=moved)  # the local copy, given explicitly
    assert model.has_vision


def test_tower_config_inferred_from_weights_in_the_checkpoint(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    import shutil

    shutil.rmtree(ckpt / "clip-vision-tower")
    model, ref = load_checkpoint(ckpt), load_checkpoint(tiny_gamma)
    assert model.has_vision and "inferred" in model.vision.tower_source
    pixels = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels), ref.encode_images(pixels))


# --------------------------------------------------------------------------------------------
# errors: one line, naming the file and the key


def damage(ckpt, fn):
    path = ckpt / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)
    return path


def expect_error(ckpt, *patterns):
    with pytest.raises(GammamodError) as info:
        load_checkpoint(ckpt)
    msg = str(info.value)
    assert "\n" not in msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_error_missing_directory_and_config(tmp_path):
    with pytest.raises(GammamodError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(GammamodError, match="config.json"):
        load_checkpoint(tmp_path)


def test_error_unknown_model_type_and_bad_json(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    expect_error(ckpt, "config.json", "unknown model_type 'mixtral'")
    (ckpt / "config.json").write_text("{not json")
    expect_error(ckpt, "config.json", "not valid JSON")


def test_error_missing_and_extra_keys(tiny_pmod, copy_ckpt):
    ckpt = copy_ckpt(tiny_pmod)
    damage(ckpt, lambda s: s.pop("model.layers.9.decoder_layer.mlp.up_proj.weight"))
    expect_error(ckpt, "missing key model.layers.9.decoder_layer.mlp.up_proj.weight")
    ckpt = copy_ckpt(tiny_pmod, "extra")
    damage(ckpt, lambda s: s.__setitem__("model.layers.2.router.router.weight", torch.zeros(1, 64)))
    expect_error(ckpt, "model.safetensors", "unexpected key model.layers.2.router.router.weight")


def test_error_shape_mismatch_and_nan(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    damage(ckpt, lambda s: s.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(10, 64)))
    expect_error(ckpt, "model.safetensors", "model.layers.1.mlp.up_proj.weight has shape [10, 64], expected [176, 64]")
    ckpt = copy_ckpt(tiny_gamma, "nan")

    def poison(s):
        s["model.norm.weight"][3] = float("nan")

    damage(ckpt, poison)
    expect_error(ckpt, "model.safetensors", "model.norm.weight holds NaN or inf")


def test_error_router_copies_disagree_or_missing(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    damage(ckpt, lambda s: s.__setitem__("model.layers.5.router.weight", torch.zeros(2, 64)))
    expect_error(ckpt, "model.layers.5.router.weight differs from model.layers.3.router.weight")
    ckpt = copy_ckpt(tiny_gamma, "norouter")
    damage(ckpt, lambda s: s.pop("model.layers.3.router.weight"))
    expect_error(ckpt, "missing the shared gamma-MoD router")


def test_error_missing_weights_and_shards(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, "no weights found")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    expect_error(ckpt, "model-00001-of-00002.safetensors", "missing")


def test_error_corrupt_weight_file(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    expect_error(ckpt, "model.safetensors", "cannot read weights")


def test_error_inv_freq_disagrees_with_rope_theta(tiny_gamma, copy_ckpt):
    ckpt = copy_ckpt(tiny_gamma)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_theta": 500000.0}))
    expect_error(ckpt, "rotary_emb.inv_freq does not match rope_theta")


def test_error_pmod_config_fields(tiny_pmod, copy_ckpt):
    ckpt = copy_ckpt(tiny_pmod)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mod_target_layer_indices": [1, 2]}))
    expect_error(ckpt, "mod_target_layer_indices [1, 2] disagree")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mod_target_token_type": "all"}))
    expect_error(ckpt, "mod_target_token_type 'all' is not supported")
    # without anyres, p-MoD's code routes every image token under vision_hr or no field at all
    (ckpt / "config.json").write_text(json.dumps({**cfg, "mod_target_token_type": "vision_hr"}))
    assert load_checkpoint(ckpt).recipe.mod_layers
    # with anyres, its default (vision_hr) keeps the base tile out of routing: refused, not guessed
    anyres = {k: v for k, v in cfg.items() if k != "mod_target_token_type"}
    (ckpt / "config.json").write_text(json.dumps({**anyres, "image_aspect_ratio": "anyres"}))
    expect_error(ckpt, "mod_target_token_type absent (p-MoD reads vision_hr): with anyres that leaves the base tile")
