"""The torch-free runtime: parity with the PyTorch reference, no torch, bad input, memory."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gammamod.errors import GammamodError
from gammamod.runtime.kvcache import KVCache
from gammamod.runtime.pipeline import Pipeline

QUESTIONS = ["What is in the picture?", "Describe the colours and the shapes you see, please."]


def reference_tokens(ckpt, question, image, routing, n=32):
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_text

    model = load_checkpoint(ckpt)
    return generate_text(ckpt, question, image=image, routing=routing, max_new_tokens=n, model=model).tokens


@pytest.mark.parametrize("recipe,rows", [("gamma", 1), ("gamma", 2), ("pmod", 1), ("pmod", 2), ("llava", 2)])
def test_greedy_tokens_equal_the_reference(recipe, rows, request, test_image_path):
    """32 greedy tokens from the whole runtime path (preprocessing, ORT vision graph, prefill,
    decode) are the reference's (static mode; dense for the plain LLaVA baseline)."""
    ckpt = request.getfixturevalue(f"tiny_{recipe}")
    art = request.getfixturevalue(f"art_{recipe}")
    routing = "dense" if recipe == "llava" else "static"
    pipe = Pipeline.load(art)
    results = pipe.generate([test_image_path] * rows, QUESTIONS[:rows], max_new_tokens=32)
    for row, result in enumerate(results):
        want = reference_tokens(ckpt, QUESTIONS[row], test_image_path, routing)
        assert result.tokens == [t for t in want if t != pipe.tokenizer.eos_id]
        assert len(result.tokens) >= 8  # a real comparison, not an early stop


def test_text_only_prompt_runs_without_routing(tiny_pmod, art_pmod):
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_text

    pipe = Pipeline.load(art_pmod)
    got = pipe.generate(None, ["Tell me about a red car."], max_new_tokens=16)[0]
    want = generate_text(tiny_pmod, "Tell me about a red car.", routing="static", max_new_tokens=16,
                         model=load_checkpoint(tiny_pmod))
    assert got.tokens == [t for t in want.tokens if t != pipe.tokenizer.eos_id]


def test_runtime_never_loads_torch(art_gamma, test_image_path, tmp_path, no_torch_prelude):
    """In a fresh interpreter where importing torch fails outright, a full generation runs, and
    no torch module is loaded."""
    script = tmp_path / "no_torch.py"
    script.write_text(no_torch_prelude + f"""
import gammamod.runtime
from gammamod.runtime.pipeline import Pipeline
from gammamod.runtime.chat import Chat
pipe = Pipeline.load({str(art_gamma)!r})
out = pipe.generate([{str(test_image_path)!r}], ["What is in the picture?"], max_new_tokens=5)
Chat(pipe, image={str(test_image_path)!r}).ask("hi", max_new_tokens=3)
assert len(out[0].tokens) == 5, out
loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
assert not loaded, loaded
print("ok")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cli_run_never_loads_torch(art_gamma, test_image_path):
    code = ("import sys, runpy; sys.argv=['gammamod','run',%r,'--image',%r,'--prompt','hi','--max-new-tokens','3'];"
            "from gammamod.cli import main; rc = main(); assert rc == 0;"
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; print('ok')"
            % (str(art_gamma), str(test_image_path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_streamed_text_is_the_final_text(art_pmod, test_image_path):
    pipe = Pipeline.load(art_pmod)
    pieces = []
    result = pipe.generate([test_image_path], ["What is in the picture?"], max_new_tokens=24,
                           stream=lambda row, text: pieces.append(text))[0]
    assert "".join(pieces) == result.text and len(pieces) > 1


def test_stop_strings_and_sampling_are_seeded(art_gamma, test_image_path):
    pipe = Pipeline.load(art_gamma)
    greedy = pipe.generate([test_image_path], ["What is in the picture?"], max_new_tokens=20)[0]
    stop = greedy.text[5:8]
    cut = pipe.generate([test_image_path], ["What is in the picture?"], max_new_tokens=20, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(stop)]
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.3, seed=11)
    a = pipe.generate([test_image_path], ["What is in the picture?"], **kw)[0]
    b = pipe.generate([test_image_path], ["What is in the picture?"], **kw)[0]
    c = pipe.generate([test_image_path], ["What is in the picture?"], **{**kw, "seed": 12})[0]
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_chat_keeps_the_image_and_cache_between_turns(tiny_gamma, art_gamma, test_image_path):
    """Turn two feeds only its new text after the cached answer; the PyTorch reference doing the
    same (its cache continued with the same ids) produces the same tokens."""
    import torch

    from gammamod.export import forward_language, load_checkpoint
    from gammamod.export.generate import prepare_prompts, sample_next
    from gammamod.export.model import Step
    from gammamod.runtime.chat import Chat
    from gammamod.runtime.image import ImageProcessor, load_image
    from gammamod.runtime.prompt import VICUNA_V1
    from gammamod.runtime.tokenizer import Tokenizer

    pipe = Pipeline.load(art_gamma)
    chat = Chat(pipe, image=test_image_path)
    first = chat.ask("What is in the picture?", max_new_tokens=10)
    past = int(chat.generator.past_length[0])
    second = chat.ask("And what colour is it?", max_new_tokens=10)
    assert chat.generator.past_length[0] > past  # the second turn continued the same cache

    model = load_checkpoint(tiny_gamma)
    tok = Tokenizer.from_dir(tiny_gamma)
    proc = ImageProcessor(model.vision.image_processor, model.vision.image_aspect_ratio)
    batch = prepare_prompts(model, tok, [VICUNA_V1.prompt("What is in the picture?")],
                            torch.from_numpy(proc.batch([load_image(test_image_path)])))

    def greedy(out_logits, cache, n):
        tokens, logits = [], out_logits
        for _ in range(n):
            t = sample_next(logits)
            tokens.append(int(t))
            if int(t) == tok.eos_id or len(tokens) == n:
                break
            step = Step("static", cache, cache.seen.clone(), torch.ones(1, dtype=torch.long))
            hidden = model.forward_chunk(model.embed(t[:, None]), step)
            cache.seen += 1
            logits = model.lm_head(hidden[:, -1]).float()
        return tokens

    out = forward_language(model, batch.inputs_embeds, routable=batch.routable)
    turn1 = greedy(out.logits[:, -1], out.cache, 10)
    assert [t for t in turn1 if t != tok.eos_id] == first.tokens
    pending = [] if turn1[-1] == tok.eos_id else [turn1[-1]]
    ids = pending + tok.encode(VICUNA_V1.continuation("And what colour is it?"), add_bos=False)
    out2 = forward_language(model, model.embed(torch.tensor([ids])), cache=out.cache)
    turn2 = greedy(out2.logits[:, -1], out.cache, 10)
    assert [t for t in turn2 if t != tok.eos_id] == second.tokens


def test_generator_interface(art_pmod):
    pipe = Pipeline.load(art_pmod)
    m = pipe.manifest
    gen = pipe.generator(batch_size=2)
    start, length = 14, 36
    x = np.random.default_rng(0).standard_normal((2, start + length + 9, 64)).astype(np.float32)
    logits = gen.prefill(x, routable=(start, length), lengths=[start + length + 9, start + length + 4])
    assert logits.shape == (2, m["model"]["vocab_size"])
    kv = gen.kv_lengths()
    k31 = gen.kept_counts(length)[31]
    assert kv.shape == (32, 2) and kv[0].tolist() == [start + length + 9, start + length + 4]
    assert kv[31].tolist() == [start + 9 + k31, start + 4 + k31]
    logits = gen.decode(np.array([5, 7]))
    assert (gen.kv_lengths() == kv + 1).all()  # p-MoD decodes densely: every layer appends
    bytes_per_layer = gen.kv_bytes()
    assert bytes_per_layer[31] < bytes_per_layer[0]  # the MoD layers' KV saving, measured
    # any span per call, or one per row
    gen.prefill(x, routable=[(start, length), (start + 5, length)], lengths=[start + length + 9, start + length + 6])
    assert gen.kept[31][1, :start + 5].tolist() == list(range(start + 5))
    with pytest.raises(GammamodError, match="different lengths"):
        gen.prefill(x, routable=[(0, 20), (0, 21)])
    with pytest.raises(GammamodError, match="must lie inside each row"):
        gen.prefill(x, routable=(40, 36))
    with pytest.raises(GammamodError, match="inputs_embeds of shape"):
        gen.prefill(x[:1])
    with pytest.raises(GammamodError, match="batch_size 99"):
        pipe.generator(batch_size=99)


def test_one_artifact_answers_any_prompt_layout(tiny_gamma, art_gamma, tiny_pmod, art_pmod, test_image_path):
    """The runtime finds the recipe's routed span in the prompt it builds: a custom system prompt
    and text before the image move it, and one artifact answers all of them as PyTorch does."""
    import torch

    from gammamod.export import generate_from_embeds, load_checkpoint
    from gammamod.export.generate import prepare_prompts
    from gammamod.runtime.image import ImageProcessor, load_image
    from gammamod.runtime.prompt import VICUNA_V1
    from gammamod.runtime.tokenizer import Tokenizer

    layouts = [("What is in the picture?", None),
               ("What is in the picture?", "You are a terse assistant. Answer in few words."),
               ("Look closely at this photo: <image>\nWhat is in it?", None)]
    for ckpt, art in ((tiny_gamma, art_gamma), (tiny_pmod, art_pmod)):
        pipe = Pipeline.load(art)
        model = load_checkpoint(ckpt)
        tok = Tokenizer.from_dir(ckpt)
        pixels = torch.from_numpy(ImageProcessor(model.vision.image_processor, "pad").batch([load_image(test_image_path)]))
        spans = set()
        for question, system in layouts:
            [got] = pipe.generate([test_image_path], [question], max_new_tokens=12, system=system)
            prepared = pipe.prepare([test_image_path], [question], system=system)
            spans.add(tuple(prepared.routable[0]))
            batch = prepare_prompts(model, tok, [VICUNA_V1.prompt(question, system=system)], pixels)
            assert [tuple(s) for s in batch.routable] == prepared.routable
            ref = generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, max_new_tokens=12,
                                       eos_token_id=tok.eos_id)
            assert got.tokens == [t for t in ref.tokens[0].tolist() if t != tok.eos_id]
        assert len(spans) == 3  # three layouts, three different spans, one artifact


def test_kv_cache_windows_grow_in_place():
    cache = KVCache(layers=1, batch=2, kv_heads=3, head_dim=4, max_seq=600, dtype=np.float32)
    rng = np.random.default_rng(0)
    written = []
    for _ in range(10):  # 10 chunks of 30 entries: the window grows 64 -> 128 -> 256 -> 512
        k = rng.standard_normal((2, 3, 30, 4)).astype(np.float32)
        cache.write(0, k, -k)
        cache.lengths[0] += 30
        written.append(k)
    assert cache.windows[0] == 512
    everything = np.concatenate(written, axis=2)
    assert np.array_equal(cache.keys(0)[:, :, :300], everything)
    assert np.array_equal(cache.values(0)[:, :, :300], -everything)
    assert cache.keys(0).flags.c_contiguous  # bound to the graph with no copy
    with pytest.raises(GammamodError, match="max_seq 600"):
        cache.write(0, np.zeros((2, 3, 301, 4), np.float32), np.zeros((2, 3, 301, 4), np.float32))


def test_long_generation_holds_memory_steady(art_gamma):
    """1000 decode steps on the tiny model: with the KV buffers committed up front, resident memory
    does not grow (a leak of 1 KiB per step would add 800 KiB between the two readings)."""
    import psutil

    pipe = Pipeline.load(art_gamma, verify=False)
    gen = pipe.generator(1)
    gen.cache.commit()
    x = np.random.default_rng(0).standard_normal((1, 80, 64)).astype(np.float32)
    logits = gen.prefill(x, routable=(0, 73))
    proc = psutil.Process()
    rss = []
    for step in range(1000):
        logits = gen.decode(logits.argmax(-1))
        if step in (199, 999):
            rss.append(proc.memory_info().rss)
    growth = rss[1] - rss[0]
    assert growth < 512 * 2**10, growth


# --------------------------------------------------------------------------------------------
# bad input: one-line errors


def copy_artifact(src, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def test_missing_or_tampered_files(art_gamma, tmp_path):
    art = copy_artifact(art_gamma, tmp_path)
    with open(art / "decoder.weights", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(GammamodError, match=r"decoder.weights: sha256 differs"):
        Pipeline.load(art)
    (art / "decoder.ort.onnx").unlink()
    with pytest.raises(GammamodError, match=r"decoder.ort.onnx: missing"):
        Pipeline.load(art, verify=False)
    with pytest.raises(GammamodError, match="no such file"):
        Pipeline.load(tmp_path / "nothing")


def test_prompt_longer_than_max_seq(art_gamma, test_image_path):
    pipe = Pipeline.load(art_gamma)
    long_question = "please describe " * 1500
    with pytest.raises(GammamodError, match="more than the artifact's max_seq"):
        pipe.generate([test_image_path], [long_question])


def test_unreadable_image_and_wrong_backend(art_gamma, tmp_path):
    pipe = Pipeline.load(art_gamma)
    bad = tmp_path / "x.jpg"
    bad.write_text("not a jpeg")
    with pytest.raises(GammamodError, match="x.jpg: not a readable image"):
        pipe.generate([bad], ["what?"])
    with pytest.raises(GammamodError, match="backend 'vulkan'"):
        Pipeline.load(art_gamma, backend="vulkan")
    with pytest.raises(GammamodError, match="device 'tpu'"):
        Pipeline.load(art_gamma, device="tpu")


def test_cli_errors_are_one_line(art_gamma, tmp_path, test_image_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gammamod", "run", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    for args, fragment in [((tmp_path / "none", "--prompt", "x"), "no such file"),
                           ((art_gamma, "--prompt", "x", "--image", tmp_path / "no.png"), "no.png: no such image"),
                           ((art_gamma, "--prompt", "x", "--backend", "tensorrt"), "tensorrt")]:
        proc = run(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr, \
            proc.stderr
    proc = run(art_gamma, "--image", test_image_path, "--prompt", "What is in the picture?", "--stream",
               "--max-new-tokens", "6")
    assert proc.returncode == 0 and "time to first token" in proc.stdout and "tokens/s" in proc.stdout


# --------------------------------------------------------------------------------------------
# TensorRT


def test_tensorrt_backend_runs_engines(art_gamma):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (PyPI's tensorrt wheels are stubs "
                                                 "without NVIDIA's index)")
    if not hasattr(trt, "Runtime"):
        pytest.skip("the installed tensorrt is a stub package")
    from gammamod.manifest import read_manifest

    if not read_manifest(art_gamma).get("engines"):
        pytest.skip("no engines in the artifact: building them is the engines stage, which needs TensorRT and a GPU")
    Pipeline.load(art_gamma, backend="tensorrt", device="cuda:0")


def test_tensorrt_engine_compatibility_rules():
    from gammamod.runtime.backends.tensorrt import check_engines

    engines = {"tensorrt": "10.3.0", "gpu": {"name": "Orin", "compute_capability": [8, 7]},
               "plugin": {"file": "engines/libgammamod_plugins.so", "sha256": "a" * 64}, "files": {"decoder": "d.engine"}}
    check_engines(engines, "10.3.0", (8, 7), "a" * 64)
    with pytest.raises(GammamodError, match="built by TensorRT 10.3.0, this machine has 10.7.0"):
        check_engines(engines, "10.7.0", (8, 7))
    with pytest.raises(GammamodError, match="built for sm_87 \\(Orin\\), this GPU is sm_90"):
        check_engines(engines, "10.3.0", (9, 0))
    with pytest.raises(GammamodError, match="plugin library differs from the one the engines were built with"):
        check_engines(engines, "10.3.0", (8, 7), "b" * 64)
    check_engines({**engines, "version_compatible": True}, "10.8.1", (8, 7))
    with pytest.raises(GammamodError, match="need TensorRT 10.x at 10.3.0 or later"):
        check_engines({**engines, "version_compatible": True}, "11.0.0", (8, 7))
    check_engines({**engines, "hardware_compatibility": "ampere_plus"}, "10.3.0", (9, 0))
    with pytest.raises(GammamodError, match="Ampere or newer"):
        check_engines({**engines, "hardware_compatibility": "ampere_plus"}, "10.3.0", (7, 5), "1")
    with pytest.raises(GammamodError, match="no TensorRT engines"):
        check_engines(None, "10.3.0", (8, 7))


def test_sampling_rules():
    from gammamod.runtime.sampling import apply_repetition_penalty, choose

    logits = np.array([[1.0, 3.0, 2.0, -1.0]], dtype=np.float32)
    assert choose(logits).tolist() == [1]
    assert apply_repetition_penalty(logits, [[1, 3]], 2.0).tolist() == [[1.0, 1.5, 2.0, -2.0]]
    rng = np.random.default_rng(0)
    # top-k 1 and top-p tiny both collapse to the argmax, whatever the temperature
    assert all(choose(logits, 5.0, top_k=1, rng=rng)[0] == 1 for _ in range(20))
    assert all(choose(logits, 5.0, top_p=0.01, rng=rng)[0] == 1 for _ in range(20))
    draws = [int(choose(logits, 1.0, top_k=2, rng=rng)[0]) for _ in range(200)]
    assert set(draws) == {1, 2}
