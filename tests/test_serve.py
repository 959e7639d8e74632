"""gammamod serve: continuous batching in the Generator, and the OpenAI-compatible server, tested
with the official openai client over loopback (127.0.0.1, a free port the kernel picks)."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gammamod.errors import GammamodError
from gammamod.runtime.pipeline import Pipeline

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

QUESTIONS = ["What is in the picture?", "Describe the colours and the shapes you see, please.",
             "Is there a car?", "What colour is the sky?"]


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def user(text, image=None):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return [{"role": "user", "content": parts}]


# -- the Generator's rows as slots ------------------------------------------------------------------
@pytest.mark.parametrize("recipe,fused", [("gamma", True), ("pmod", True), ("pmod", False)])
def test_requests_joining_a_running_batch_get_their_lone_answers(recipe, fused, request, test_image_path):
    """Rows of a batch generator as slots: each request is prefilled alone and placed into a free
    row, joins at the next step while the others decode, rows that hold nothing are idle; each
    row's greedy tokens equal Pipeline.generate's for that request alone. fused=False runs the
    portable graph (what TensorRT builds), whose new entries the runtime writes."""
    pipe = Pipeline.load(request.getfixturevalue(f"art_{recipe}"), fused=fused)
    n = 16
    lone = [pipe.generate([test_image_path] if i % 2 == 0 else None, [q], max_new_tokens=n)[0].tokens
            for i, q in enumerate(QUESTIONS[:3])]
    batch, one = pipe.generator(4), pipe.generator(1)
    chosen: dict[int, list[int]] = {}

    def join(slot, i):
        p = pipe.prepare([test_image_path] if i % 2 == 0 else None, [QUESTIONS[i]])
        logits = one.prefill(p.inputs_embeds, routable=p.routable, lengths=p.lengths)
        batch.place(slot, one)
        assert (batch.kv_lengths()[:, slot] == one.kv_lengths()[:, 0]).all()
        chosen[slot] = [int(logits[0].argmax())]

    join(2, 0)  # slots 0, 1 and 3 idle
    for step in range(3 * n):
        if step == 3:
            join(0, 1)  # joins while slot 2 is decoding
        if step == 6:
            join(3, 2)
        active = np.array([len(chosen.get(s, [])) in range(1, n) for s in range(4)])
        if not active.any():
            break
        before = batch.kv_lengths()
        ids = np.array([chosen[s][-1] if s in chosen else 0 for s in range(4)])
        logits = batch.decode(ids, active=active)
        assert (batch.kv_lengths()[:, ~active] == before[:, ~active]).all()  # idle rows untouched
        for s in np.flatnonzero(active):
            chosen[s].append(int(logits[s].argmax()))
        if step == 4 * n // 3:
            batch.release(2)  # a finished request leaves; its row reads empty
            assert (batch.kv_lengths()[:, 2] == 0).all()
    eos = pipe.tokenizer.eos_id
    for slot, i in ((2, 0), (0, 1), (3, 2)):
        got = chosen[slot][:chosen[slot].index(eos)] if eos in chosen[slot] else chosen[slot]
        assert got == lone[i], (slot, i)
    assert len({tuple(t) for t in lone}) > 1  # the requests' answers differ: a mix-up would show


def test_generator_idle_rows_are_checked(art_pmod):
    pipe = Pipeline.load(art_pmod)
    gen, one = pipe.generator(2), pipe.generator(1)
    x = np.zeros((2, 1, 64), np.float32)
    with pytest.raises(GammamodError, match="before prefill"):
        gen.decode(np.array([1, 2]), active=np.array([True, False]))
    with pytest.raises(GammamodError, match="holds no sequence"):
        gen.place(0, one)
    one.prefill(np.ones((1, 5, 64), np.float32))
    gen.place(1, one)
    with pytest.raises(GammamodError, match="at least one above 0"):
        gen.extend(x, lengths=[0, 0])
    with pytest.raises(GammamodError, match="active: expected 2 booleans"):
        gen.decode(np.array([1, 2]), active=[1, 0])
    with pytest.raises(GammamodError, match="place: row 5"):
        gen.place(5, one)


# -- the server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(art_pmod):
    """The tiny p-MoD artifact served on 127.0.0.1 (a free port) for this module's tests."""
    from gammamod.serve.server import BackgroundServer, load_app

    app, config = load_app(art_pmod, max_batch=4, max_tokens=64, default_max_tokens=16, max_body_bytes=2 * 2**20)
    with BackgroundServer(app) as url:
        yield url, config.model_name
    # leaving the block stopped the server and its batcher thread


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(url, method, path, body=None, data=None):
    """(status, parsed JSON body) of a request sent without the openai client."""
    payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=payload, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text), text
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        return e.code, json.loads(text), text


def declared_body(url, length):
    """(status, parsed JSON body) of a POST whose headers declare ``length`` bytes and send none:
    a server that refuses from the headers answers at once (urllib would still be sending a body
    the server no longer reads, and fail with a broken pipe)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_plain_and_streamed_answers_equal_pipeline_generate(served, art_pmod, test_image_path):
    url, model = served
    pipe = Pipeline.load(art_pmod)
    c = client(url)
    assert [m.id for m in c.models.list().data] == [model]
    for question, image in ((QUESTIONS[0], test_image_path), (QUESTIONS[1], None)):
        want = pipe.generate([image] if image else None, [question], max_new_tokens=24)[0]
        plain = c.chat.completions.create(model=model, messages=user(question, image), max_tokens=24, temperature=0,
                                          extra_body={"return_token_ids": True})
        choice = plain.choices[0]
        assert choice.model_extra["token_ids"] == want.tokens and choice.message.content == want.text
        assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reason]
        assert plain.usage.prompt_tokens == want.prompt_tokens and plain.usage.completion_tokens == len(want.tokens)
        chunks = list(c.chat.completions.create(model=model, messages=user(question, image), max_tokens=24,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        tokens = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra.get("token_ids") or [])]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert tokens == want.tokens and text == want.text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.completion_tokens == len(want.tokens)  # include_usage: the last chunk
    # stop strings and a system message, as Pipeline.generate takes them
    want = pipe.generate([test_image_path], [QUESTIONS[0]], max_new_tokens=24, system="Be brief.")[0]
    stop = want.text[3:6]
    want_stopped = pipe.generate([test_image_path], [QUESTIONS[0]], max_new_tokens=24, system="Be brief.",
                                 stop=[stop])[0]
    got = c.chat.completions.create(model=model, temperature=0, max_tokens=24, stop=stop,
                                    messages=[{"role": "system", "content": "Be brief."}] + user(QUESTIONS[0],
                                                                                                  test_image_path))
    assert got.choices[0].message.content == want_stopped.text and got.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_each_get_their_own_answer(served, art_pmod, test_image_path):
    """32 clients at once, each its own question and token budget: every answer arrives, each is
    the one that request gets alone, and the server decoded several requests per step."""
    url, model = served
    pipe = Pipeline.load(art_pmod)
    jobs = [(QUESTIONS[i % 4] + " " * (i // 8), test_image_path if i % 3 else None, 4 + i) for i in range(32)]
    want = [pipe.generate([img] if img else None, [q], max_new_tokens=n)[0] for q, img, n in jobs]

    def ask(i):
        q, img, n = jobs[i]
        r = client(url).chat.completions.create(model=model, messages=user(q, img), max_tokens=n, temperature=0,
                                                extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"], r.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32), timeout=600))
    assert [g[0] for g in got] == [w.tokens for w in want]
    assert [g[1] for g in got] == [w.text for w in want]
    assert len({tuple(w.tokens) for w in want}) > 16  # distinct answers: a mix-up could not go unseen
    status, health, _ = raw(url, "GET", "/health")
    assert status == 200 and health["busiest_step"] >= 2 and health["active"] == 0 and health["waiting"] == 0


def test_bad_requests_get_one_line_json_errors(served, test_image_path, tmp_path):
    url, model = served
    ok = user(QUESTIONS[0], test_image_path)
    cases = [
        ({"model": model, "messages": ok, "temprature": 0}, 400, "unknown_field", "temprature"),
        ({"model": model, "messages": user("Look: <image> what is it?")}, 400, "image_missing", "messages[0]"),
        ({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         400, "image_missing", "messages[0].content[0].image_url"),
        ({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]},
         400, "invalid_image", "messages[0].content[0].image_url"),
        ({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "invalid_image", None),
        ({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(test_image_path)}}]}]}, 400, "invalid_image", None),
        ({"model": model, "messages": user("word " * 3000)}, 400, "context_length_exceeded", "messages"),
        ({"model": model, "messages": ok, "max_tokens": 65}, 400, "max_tokens_exceeded", "max_tokens"),
        ({"model": model, "messages": ok, "temperature": -1}, 400, None, "temperature"),
        ({"model": "gpt-4o", "messages": ok}, 404, "model_not_found", "model"),
        ({"model": model, "messages": [{"role": "assistant", "content": "hi"}]}, 400, None, "messages"),
    ]
    for body, status, code, param in cases:
        got, answer, text = raw(url, "POST", "/v1/chat/completions", body)
        assert got == status, (body, text)
        assert text.count("\n") == 1 and text.endswith("\n"), text  # one line
        error = answer["error"]
        assert error["message"] and (code is None or error["code"] == code), (code, text)
        assert param is None or error["param"] == param, (param, text)
    got, answer = declared_body(url, 2 * 2**20 + 1)  # refused from its headers, before any byte is read
    assert got == 413 and answer["error"]["code"] == "body_too_large"
    got, answer, _ = raw(url, "POST", "/v1/chat/completions", data=b"{")
    assert got == 400 and answer["error"]["code"] == "invalid_json"
    assert raw(url, "GET", "/v1/chat/completions")[0] == 405
    assert raw(url, "GET", "/v2/nothing")[0] == 404
    with pytest.raises(openai.BadRequestError, match="unknown field"):  # through the client too
        client(url).chat.completions.create(model=model, messages=ok, extra_body={"best_of": 2})


def test_local_files_only_when_allowed(art_pmod, test_image_path):
    from gammamod.serve.server import BackgroundServer, load_app

    app, config = load_app(art_pmod, max_batch=1, allow_local_files=True)
    pipe = Pipeline.load(art_pmod)
    want = pipe.generate([test_image_path], [QUESTIONS[0]], max_new_tokens=8)[0]
    with BackgroundServer(app) as url:
        messages = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]},
                                                 {"type": "image_url", "image_url": {"url": f"file://{test_image_path}"}}]}]
        got = client(url).chat.completions.create(model=config.model_name, messages=messages, max_tokens=8,
                                                  temperature=0)
        assert got.choices[0].message.content == want.text
        messages[0]["content"][1]["image_url"]["url"] = "relative.png"
        status, answer, _ = raw(url, "POST", "/v1/chat/completions", {"model": config.model_name, "messages": messages})
        assert status == 400 and "absolute path" in answer["error"]["message"]


def test_serve_cli_runs_without_torch_and_stops_on_sigterm(art_pmod, tmp_path, no_torch_prelude):
    """`gammamod serve` in its own process, torch blocked: it answers on 127.0.0.1, then SIGTERM
    ends it cleanly. The port is one the kernel just handed out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve_no_torch.py"
    script.write_text(no_torch_prelude + f"""
from gammamod.cli import main
sys.exit(main(["serve", {str(art_pmod)!r}, "--port", "{port}", "--max-batch", "2", "--model-name", "tiny"]))
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        answer = client(url).chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and "serving 'tiny'" in out
