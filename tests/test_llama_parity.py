"""Our compact decoder against transformers' LlamaForCausalLM on the same weights (dense, fp32)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gammamod.export import forward_language, generate_from_embeds


def hf_twin(model):
    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not (".router" in k or k.startswith(("model.vision_tower.", "model.mm_projector.")))}
    hf.load_state_dict(state, strict=True)  # the same names: ours mirror the checkpoint keys
    return hf


@pytest.mark.parametrize("recipe", ["llava", "gamma-mod", "p-mod"])
def test_dense_logits_match_llama_for_causal_lm(tiny_models, recipe):
    model = tiny_models[recipe]
    hf = hf_twin(model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    got = forward_language(model, model.embed(ids), routing="dense").logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, rel


def test_decode_with_kv_cache_matches_llama_generate(tiny_models):
    model = tiny_models["llava"]  # GQA: 4 query heads, 2 key/value heads
    assert model.config.num_kv_heads < model.config.num_heads
    hf = hf_twin(model)
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, 25))
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got = generate_from_embeds(model, model.embed(ids), routing="dense", max_new_tokens=12, return_logits=True)
    assert got.tokens[0].tolist() == want.sequences[0, 25:].tolist()
    hf_logits = torch.stack(want.logits, 1)
    rel = ((got.logits - hf_logits).abs().max() / hf_logits.abs().max()).item()
    assert rel <= 1e-5, rel
