"""Our compact decoder against transformers' LlamaForCausalLM on the same weights (dense, fp32)."""

import pytest
import torch

from gammamod.export import forward_language, generate_from_embeds
from gammamod.validate.bench import transformers_twin


def hf_twin(model):
    return transformers_twin(model, attention="eager")


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
