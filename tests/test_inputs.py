"""The input side shared by the reference and the runtime: tokenizer, prompt template, images.

transformers is the oracle here (tests only): its Llama tokenizer and CLIPImageProcessor.
"""

import numpy as np
import pytest
from PIL import Image

from gammamod.errors import GammamodError
from gammamod.runtime.image import ImageProcessor, load_image
from gammamod.runtime.prompt import IMAGE_TOKEN_INDEX, VICUNA_V1, tokenize_with_image
from gammamod.runtime.tokenizer import Tokenizer

TEXTS = ["What is in the picture?", "\nWhat is", "digits 12345 and ünïcode ☃",
         "a</s>USER: hi", "ASSISTANT: The cat.</s>USER: and the dog? ASSISTANT:", ""]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_gamma):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gamma)


@pytest.mark.parametrize("backend", ["tokenizers", "sentencepiece"])
def test_tokenizer_matches_transformers(tiny_gamma, hf_tokenizer, backend, tmp_path):
    import shutil

    src = tmp_path / "tok"
    shutil.copytree(tiny_gamma, src, ignore=shutil.ignore_patterns("*.safetensors", "clip-*"))
    hf_tokenizer.save_pretrained(tmp_path / "hf")  # the fast tokenizer's tokenizer.json, beside tokenizer.model
    shutil.copy(tmp_path / "hf" / "tokenizer.json", src / "tokenizer.json")
    tok = Tokenizer.from_dir(src, prefer=backend)
    assert tok.backend == backend
    for text in TEXTS:
        want = hf_tokenizer(text).input_ids
        assert tok.encode(text) == want, text
        assert tok.decode(want) == hf_tokenizer.decode(want, skip_special_tokens=True), text
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_sentencepiece_backend_is_the_slow_llama_tokenizer(tiny_gamma):
    """On runs of spaces transformers' fast (converted) and slow Llama tokenizers disagree; the
    authors load the slow one (use_fast=False), which is sentencepiece with a dummy prefix."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_gamma / "tokenizer.model"))
    tok = Tokenizer.from_dir(tiny_gamma, prefer="sentencepiece")
    for text in ("  two  spaces", "tabs\tand  more   spaces"):
        assert tok.encode(text) == [1] + sp.encode(text)


def test_tokenizer_model_only_checkpoint_uses_sentencepiece(tiny_gamma):
    assert not (tiny_gamma / "tokenizer.json").exists()  # as the authors' releases
    assert Tokenizer.from_dir(tiny_gamma).backend == "sentencepiece"


def test_tokenizer_missing(tmp_path):
    with pytest.raises(GammamodError, match="no tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_vicuna_v1_prompt_renders_like_llava():
    assert VICUNA_V1.prompt("What is this?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:")
    two = VICUNA_V1.prompt("And that?", history=[("What is this?", "A cat.")])
    assert two.endswith("USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And that? ASSISTANT:")
    assert VICUNA_V1.prompt("Hi", has_image=False).endswith("USER: Hi ASSISTANT:")


def test_tokenize_with_image_is_llavas_chunking(tiny_gamma, hf_tokenizer):
    tok = Tokenizer.from_dir(tiny_gamma)
    prompt = VICUNA_V1.prompt("What is in the picture?")
    ids = tokenize_with_image(tok, prompt)
    before, after = prompt.split("<image>")
    # LLaVA's tokenizer_image_token: each chunk tokenised with BOS, the later BOS dropped
    want = hf_tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + hf_tokenizer(after).input_ids[1:]
    assert ids == want
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1


def _images():
    rng = np.random.default_rng(0)
    yield Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))  # landscape
    yield Image.fromarray(rng.integers(0, 255, (301, 97, 3), dtype=np.uint8))  # tall, odd sizes
    yield Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).convert("L")  # grey, smaller than crop
    yield Image.fromarray(rng.integers(0, 255, (64, 80, 4), dtype=np.uint8), "RGBA")


@pytest.mark.parametrize("size", [84, 336])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_image_processor_matches_clip_image_processor(size, aspect):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from gammamod.export.checkpoint import default_image_processor
    from gammamod.runtime.image import expand_to_square

    config = default_image_processor(size)
    oracle = CLIPImageProcessorPil(**config)
    ours = ImageProcessor(config, aspect=aspect)
    for img in _images():
        src = img.convert("RGB")
        if aspect == "pad":  # LLaVA's expand2square with the mean colour, before the processor
            src = expand_to_square(src, tuple(int(x * 255) for x in oracle.image_mean))
        want = oracle(src, return_tensors="np")["pixel_values"][0]
        got = ours(img)
        assert got.shape == (3, size, size) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_pad_to_square_uses_the_mean_colour():
    from gammamod.runtime.image import expand_to_square

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(img, (122, 116, 104))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((20, 20)) == (255, 0, 0)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(GammamodError, match="x.png: not a readable image"):
        load_image(bad)
    with pytest.raises(GammamodError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
