"""gammamod triton-repo: the model repository checked against Triton's own schema, its ONNX files
run where Triton's ONNX Runtime backend would open them, and the Python-backend generate models
served by a real tritonserver (PyPI's nvidia-pytriton ships one) on 127.0.0.1, asked over HTTP
and streamed over gRPC with tritonclient. Answers must equal the runtime's."""

import importlib.util
import os
import queue
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from gammamod.errors import GammamodError
from gammamod.runtime.pipeline import Pipeline

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

VENV = Path(sys.prefix)
NUMPY1 = VENV / "triton-python"  # NumPy 1.x for pytriton's Python-backend stub (scripts/setup.sh)


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_follow_tritons_schema(art_pmod, tmp_path):
    from gammamod.manifest import read_manifest
    from gammamod.serve.triton_repo import graph_config, write_triton_repo

    out = write_triton_repo(art_pmod, tmp_path / "repo", max_batch=4)
    manifest = read_manifest(art_pmod)
    configs = {p.parent.name: parse(p) for p in out.glob("*/config.pbtxt")}
    assert set(configs) == {"gammamod_generate", "gammamod_generate_once", "vision_onnx", "decoder_onnx"}
    for name in ("gammamod_generate", "gammamod_generate_once"):
        c = configs[name]
        assert c.backend == "python" and c.model_transaction_policy.decoupled == (name == "gammamod_generate")
        assert c.parameters["max_batch"].string_value == "4"
        assert (out / name / "1" / "model.py").is_file()
    assert (out / "gammamod_generate" / configs["gammamod_generate"].parameters["artifact"].string_value
            / "manifest.json").is_file()
    for kind in ("vision", "decoder"):
        c, graph = configs[f"{kind}_onnx"], manifest.graph(kind)
        assert c.platform == "onnxruntime_onnx" and c.max_batch_size == 0
        assert [i.name for i in c.input] == [t["name"] for t in graph["inputs"]]
        assert [o.name for o in c.output] == [t["name"] for t in graph["outputs"]]
        assert [list(i.dims) for i in c.input] == [[d if isinstance(d, int) else -1 for d in t["shape"]]
                                                   for t in graph["inputs"]]
        assert (out / f"{kind}_onnx" / "1" / c.default_model_filename).exists()
    # the TensorRT backend's config (written when the artifact has engines): shape tensors marked
    trt = text_format.Parse(graph_config("decoder_trt", manifest.graph("decoder"), "tensorrt", "decoder.plan",
                                         "KIND_GPU", "libgammamod_plugins.so"), model_config_pb2.ModelConfig())
    shape = {i.name for i in trt.input if i.is_shape_tensor}
    assert shape == {"span_length"} | {t["name"] for t in manifest.graph("decoder")["inputs"]
                                       if t["name"].startswith("capacity.")}
    assert len(shape) > 1
    assert trt.platform == "tensorrt_plan" and list(trt.model_operations.op_library_filename) == ["libgammamod_plugins.so"]
    assert not any(i.is_shape_tensor for i in configs["decoder_onnx"].input)
    # a gammamod repository may be replaced with --force; anything else is refused
    with pytest.raises(GammamodError, match="exists"):
        write_triton_repo(art_pmod, out)
    write_triton_repo(art_pmod, out, force=True, copy=True)
    assert not (out / "vision_onnx" / "1" / "vision.onnx").is_symlink()


def test_repository_onnx_models_open_where_triton_looks(art_pmod, tmp_path, test_image_path):
    """Triton's ONNX Runtime backend opens <model>/1/<default_model_filename>; its external weights
    must resolve from there. Run the vision model from the repository and compare with the runtime."""
    import onnxruntime as ort

    from gammamod.runtime.image import load_image
    from gammamod.serve.triton_repo import write_triton_repo

    out = write_triton_repo(art_pmod, tmp_path / "repo")
    pipe = Pipeline.load(art_pmod)
    pixels = pipe.image_processor.batch([load_image(test_image_path)])
    c = parse(out / "vision_onnx" / "config.pbtxt")
    session = ort.InferenceSession(str(out / "vision_onnx" / "1" / c.default_model_filename),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["image_features"], {"pixel_values": pixels})[0]
    want = pipe.runner("vision").run({"pixel_values": pixels})["image_features"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _tritonserver():
    spec = importlib.util.find_spec("pytriton")  # found, not imported (its own proxy needs more packages)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no tritonserver: pip install --no-deps nvidia-pytriton (scripts/setup.sh does)")
    root = Path(list(spec.submodule_search_locations)[0])
    server = root / "tritonserver" / "bin" / "tritonserver"
    stub = root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not server.is_file() or not stub.is_file():
        pytest.skip("no tritonserver: pip install --no-deps nvidia-pytriton (scripts/setup.sh does)")
    if not (NUMPY1 / "numpy").is_dir():
        pytest.skip(f"no NumPy 1.x for Triton's Python backend stub in {NUMPY1} (scripts/setup.sh installs it)")
    return root / "tritonserver", stub


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_tritonserver_generates_what_the_runtime_does(art_pmod, tmp_path, test_image_path):
    """A real tritonserver on 127.0.0.1 serves the repository's Python-backend models: HTTP infer
    (one response) and a gRPC stream (a response per token) answer as Pipeline.generate does."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from gammamod.serve.triton_repo import write_triton_repo

    dist, stub = _tritonserver()
    # this environment's packages (gammamod, onnxruntime, ...) for the backend's isolated interpreter
    repo = write_triton_repo(art_pmod, tmp_path / "repo", max_batch=2,
                             python_site=[sysconfig.get_paths()["purelib"]])
    # the backend directory: pytriton's Python backend with the stub for this Python, NumPy 1.x beside it
    # (the stub's interpreter is isolated and sees only its own directories first)
    backend = tmp_path / "backends" / "python"
    backend.mkdir(parents=True)
    for item in ("libtriton_python.so", "triton_python_backend_utils.py"):
        os.symlink(dist / "backends" / "python" / item, backend / item)
    os.symlink(stub, backend / "triton_python_backend_stub")
    for item in ("numpy", "numpy.libs"):
        if (NUMPY1 / item).exists():
            os.symlink(NUMPY1 / item, backend / item)
    http_port, grpc_port = _free_ports(2)
    log = open(tmp_path / "triton.log", "w")
    proc = subprocess.Popen([str(dist / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={backend.parent}", "--model-control-mode=explicit",
                             "--load-model=gammamod_generate", "--load-model=gammamod_generate_once",
                             "--http-address=127.0.0.1", f"--http-port={http_port}", "--grpc-address=127.0.0.1",
                             f"--grpc-port={grpc_port}", "--allow-metrics=false"], stdout=log, stderr=subprocess.STDOUT)
    try:
        h = http.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if h.is_server_ready():
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        assert proc.poll() is None and h.is_model_ready("gammamod_generate_once"), (tmp_path / "triton.log").read_text()[-3000:]
        pipe = Pipeline.load(art_pmod)
        image = np.frombuffer(Path(test_image_path).read_bytes(), dtype=np.uint8)

        def inputs(mod, prompt, n, with_image):
            items = [("prompt", np.array([prompt.encode()], dtype=object), "BYTES"),
                     ("max_tokens", np.array([n], np.int32), "INT32")]
            if with_image:
                items.append(("image", image, "UINT8"))
            result = []
            for name, value, kind in items:
                t = mod.InferInput(name, list(value.shape), kind)
                t.set_data_from_numpy(value)
                result.append(t)
            return result

        for prompt, with_image in (("What is in the picture?", True), ("Describe the colours, please.", False)):
            want = pipe.generate([test_image_path] if with_image else None, [prompt], max_new_tokens=12)[0]
            r = h.infer("gammamod_generate_once", inputs(http, prompt, 12, with_image))
            assert r.as_numpy("token_ids").tolist() == want.tokens
            assert r.as_numpy("text")[0].decode() == want.text
            assert r.as_numpy("finish_reason")[0].decode() == {"eos": "stop"}.get(want.finish_reason, want.finish_reason)
            # streamed over gRPC: one response per token, the last one says why it ended
            g = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            responses: queue.Queue = queue.Queue()
            g.start_stream(callback=lambda result, error: responses.put((result, error)))
            g.async_stream_infer("gammamod_generate", inputs(grpc, prompt, 12, with_image), request_id="1")
            tokens, text, finish = [], "", ""
            while not finish:
                result, error = responses.get(timeout=120)
                assert error is None, error
                tokens += result.as_numpy("token_ids").tolist()
                text += result.as_numpy("text")[0].decode()
                finish = result.as_numpy("finish_reason")[0].decode()
            g.stop_stream()
            assert tokens == want.tokens and text == want.text
        # bad input is the request's error, and the model keeps serving
        bad = inputs(http, "What is this?", 4, False)
        t = http.InferInput("image", [9], "UINT8")
        t.set_data_from_numpy(np.frombuffer(b"not a png", dtype=np.uint8))
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="input image"):
            h.infer("gammamod_generate_once", bad + [t])
        assert h.is_model_ready("gammamod_generate_once")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
