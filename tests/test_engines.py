"""The engines stage without TensorRT: device table, precision rules, the build plan (profiles and
memory against hand-computed values), ONNX preparation for --mod-ops, the bundle, refusals."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from gammamod.engines.plan import BuildOptions, make_plan, weight_bytes
from gammamod.engines.targets import DEVICES, Device, check_precision
from gammamod.errors import GammamodError
from gammamod.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]

# The tiny gamma-MoD model (make-tiny: hidden 64, 8 layers, 4 heads, 2 KV heads of 16, MLP 176,
# vocabulary 512, MoD layers 3-6, skip ratio 0.5), exported with max batch 8 and max sequence 2048;
# its default prompt routes a span of 73 tokens (system prompt + 36 image tokens).
H, LAYERS, KV_HEADS, HEAD_DIM, INTER, VOCAB, MAX_POS = 64, 8, 2, 16, 176, 512, 2048
MOD_LAYERS, SPAN, MAX_BATCH, MAX_SEQ = (3, 4, 5, 6), 73, 8, 2048
KEPT = SPAN - SPAN // 2  # k = N - floor(0.5 N) = 37
# MatMul weights per layer: fused QKV, O, fused gate/up, down; plus lm_head and the shared router
MATRICES = LAYERS * (H * (H + 2 * KV_HEADS * HEAD_DIM) + H * H + H * 2 * INTER + INTER * H) + VOCAB * H + H * 2
OTHERS = LAYERS * 2 * H + H + 2 * MAX_POS * HEAD_DIM // 2  # RMSNorms, final norm, RoPE cos/sin tables


def _geometry_is_the_hand_model(manifest):
    model, kv = manifest["model"], manifest["kv_cache"]
    assert (model["hidden_size"], model["num_layers"], model["num_kv_heads"], model["head_dim"], model["vocab_size"],
            model["intermediate_size"]) == (H, LAYERS, KV_HEADS, HEAD_DIM, VOCAB, INTER)
    assert (kv["max_batch"], kv["max_seq"]) == (MAX_BATCH, MAX_SEQ)
    assert manifest["recipe"]["mod_layers"] == list(MOD_LAYERS) and manifest["routing"]["span_lengths"] == [SPAN]


# --------------------------------------------------------------------------------------------
# device table and precision rules


def test_device_table_holds_what_the_issue_names():
    sms = {name: d.compute_capability for name, d in DEVICES.items()}
    assert sms["a100"] == (8, 0) and sms["l4"] == (8, 9) and sms["h100"] == (9, 0) and sms["b200"] == (10, 0)
    assert sms["orin-jp6"] == (8, 7) and sms["thor-jp7"] == (11, 0)
    assert {DEVICES[n].memory_gib for n in ("orin-nano-jp6", "orin-nx-jp6", "orin-agx32-jp6", "orin-jp6")} == {8, 16, 32, 64}
    assert DEVICES["thor-jp7"].memory_gib == 128
    assert DEVICES["orin-jp6"].tensorrt == ("10.3",) and DEVICES["orin-jp6"].cuda == "12.6"
    for name, dev in DEVICES.items():  # FP8 exactly where compute capability >= 8.9
        assert ("fp8" in dev.precisions) == (dev.compute_capability >= (8, 9)), name


def test_precision_rules():
    orin, h100 = DEVICES["orin-jp6"], DEVICES["h100"]
    with pytest.raises(GammamodError, match="orin-jp6 .* has no fp8 \\(FP8 needs compute capability 8.9"):
        check_precision(orin, "fp8", "10.3", "float16", "fp8")
    with pytest.raises(GammamodError, match="a100 .* has no fp8"):
        check_precision(DEVICES["a100"], "fp8", "10.x", "float16", "fp8")
    assert check_precision(h100, "fp8", "11.x", "float16", "fp8") == "strong"
    with pytest.raises(GammamodError, match="Q/DQ nodes, which 'gammamod calib quantize' writes"):
        check_precision(h100, "int8", "10.x", "float16", None)
    assert check_precision(orin, "fp16", "10.3", "float32", None) == "flag"  # TensorRT 10's builder flag
    assert check_precision(orin, "fp16", "10.3", "float16", None) == "strong"
    with pytest.raises(GammamodError, match="TensorRT 11.x is strongly typed .* re-export it with --dtype fp16"):
        check_precision(h100, "fp16", "11.x", "float32", None)
    assert check_precision(h100, "bf16", "11.x", "bfloat16", None) == "strong"
    with pytest.raises(GammamodError, match="this artifact is quantized \\(int8\\)"):
        check_precision(h100, "fp16", "10.x", "float16", "int8")


# --------------------------------------------------------------------------------------------
# the plan, from a real artifact


def test_plan_profiles_from_the_artifact(art_gamma):
    manifest = read_manifest(art_gamma)
    _geometry_is_the_hand_model(manifest)
    plan = make_plan(manifest, BuildOptions(target="orin-jp6", requested_precision="fp16"))
    assert plan["tensorrt"] == "10.3" and plan["typing_mode"] == "flag" and plan["mod_ops"] == "plugin"
    assert plan["engines"]["decoder"]["onnx"] == "decoder.trt10.3.onnx"
    prefill, decode = (plan["engines"]["decoder"]["profiles"][p] for p in ("prefill", "decode"))
    names = [i["name"] for i in manifest.graph("decoder")["inputs"]]
    assert list(prefill) == names and list(decode) == names  # every input, both profiles
    cap = [MAX_SEQ - (SPAN - KEPT) if layer in MOD_LAYERS else MAX_SEQ for layer in range(LAYERS)]
    assert cap[3] == 2012 and plan["kv_capacity"] == cap
    assert prefill["inputs_embeds"] == {"min": [1, 1, H], "opt": [1, SPAN + 64, H], "max": [MAX_BATCH, MAX_SEQ, H]}
    assert decode["inputs_embeds"] == {"min": [1, 1, H], "opt": [1, 1, H], "max": [MAX_BATCH, 1, H]}
    assert prefill["span_length"] == {"min": [0], "opt": [SPAN], "max": [SPAN], "values": True}
    assert decode["span_length"] == {"min": [0], "opt": [0], "max": [0], "values": True}
    for layer in MOD_LAYERS:
        assert prefill[f"capacity.{layer}"] == {"min": [0], "opt": [KEPT], "max": [KEPT], "values": True}
        assert decode[f"capacity.{layer}"]["max"] == [0]
    for layer in range(LAYERS):
        assert prefill[f"past_key.{layer}"] == {"min": [1, KV_HEADS, 64, HEAD_DIM], "opt": [1, KV_HEADS, 64, HEAD_DIM],
                                                "max": [MAX_BATCH, KV_HEADS, cap[layer], HEAD_DIM]}
        assert decode[f"past_value.{layer}"]["opt"] == [1, KV_HEADS, cap[layer], HEAD_DIM]
        assert prefill[f"kv_length.{layer}"] == {"min": [1], "opt": [1], "max": [MAX_BATCH]}
    vision = plan["engines"]["vision"]["profiles"]["default"]["pixel_values"]
    assert vision == {"min": [1, 3, 84, 84], "opt": [1, 3, 84, 84], "max": [MAX_BATCH, 3, 84, 84]}
    # --max-batch, --max-seq and --span-lengths move the bounds
    small = make_plan(manifest, BuildOptions(target="h100", max_batch=2, max_seq=512, span_lengths=[40, 73]))
    p = small["engines"]["decoder"]["profiles"]["prefill"]
    assert p["inputs_embeds"]["max"] == [2, 512, H] and p["span_length"]["max"] == [73]
    assert small["kv_capacity"][3] == 512 - min(40 - 20, SPAN - KEPT)  # the smallest skip bounds the capacity
    with pytest.raises(GammamodError, match="--max-seq 4096: the artifact was exported for at most 2048"):
        make_plan(manifest, BuildOptions(target="h100", max_seq=4096))
    assert make_plan(manifest, BuildOptions(target="h100", mod_ops="native"))["plugin"] is None
    with pytest.raises(GammamodError, match="same-cc needs TensorRT 10.9"):
        make_plan(manifest, BuildOptions(target="orin-jp6", hardware_compat="same-cc"))


def test_plan_memory_against_hand_computed_values(art_gamma):
    manifest = read_manifest(art_gamma)
    _geometry_is_the_hand_model(manifest)
    assert weight_bytes(manifest, "fp32")["decoder"] == 4 * (MATRICES + OTHERS)
    assert weight_bytes(manifest, "fp16")["decoder"] == 2 * (MATRICES + OTHERS)
    assert weight_bytes(manifest, "int8")["decoder"] == MATRICES + 2 * OTHERS
    assert weight_bytes(manifest, "int4")["decoder"] == int(np.ceil(MATRICES * (0.5 + 2 / 128) + 2 * OTHERS))
    plan = make_plan(manifest, BuildOptions(target="orin-jp6", requested_precision="fp16", workspace_mib=256))
    mem = plan["memory"]
    entry = 2 * KV_HEADS * HEAD_DIM * 4  # K and V of one token, fp32 KV (the artifact's dtype)
    mod_kv = MAX_BATCH * entry * (4 * MAX_SEQ + 4 * (MAX_SEQ - (SPAN - KEPT)))
    dense_kv = MAX_BATCH * entry * LAYERS * MAX_SEQ
    assert (mod_kv, dense_kv) == (33_259_520, 33_554_432)
    assert mem["kv_cache"] == mod_kv and mem["kv_cache_dense_twin"] == dense_kv
    assert mem["total"] == 2 * (MATRICES + OTHERS) + mem["weights"]["vision"] + mod_kv + (256 << 20)
    assert mem["fits"] and mem["device"] == 64 << 30
    # a device too small for the KV at max batch: the plan says how far to lower it
    tiny = Device("test-20mib", "test GPU", (8, 7), 20 / 1024, ("10.3",), DEVICES["orin-jp6"].precisions)
    plan = make_plan(manifest, BuildOptions(target="test-20mib", requested_precision="fp16", workspace_mib=1), dev=tiny)
    mem = plan["memory"]
    free = (20 << 20) - sum(mem["weights"].values()) - (1 << 20)
    assert not mem["fits"] and f"--max-batch {free // (mod_kv // MAX_BATCH)}" in mem["advice"]
    plan = make_plan(manifest, BuildOptions(target="orin-nano-jp6", workspace_mib=9000))
    assert not plan["memory"]["fits"] and "lower --workspace" in plan["memory"]["advice"]


# --------------------------------------------------------------------------------------------
# ONNX copies for --mod-ops plugin|native


def _ours(model):
    from gammamod.export import ops

    return [n.op_type for n in ops._nodes(model.graph) if n.domain == ops.DOMAIN]


@pytest.mark.parametrize("version", ["10.3", "11.x"])
def test_mod_ops_copies(art_gamma, version):
    from gammamod.engines.lint import lint_graph
    from gammamod.engines.prepare import checked_copy
    from gammamod.engines.targets import target

    manifest = read_manifest(art_gamma)
    plugin = checked_copy(manifest, "decoder", version, "plugin")
    native = checked_copy(manifest, "decoder", version, "native")
    assert not plugin.functions and set(_ours(plugin)) == {"MoDSelect", "MoDGather", "MoDScatter"}
    assert not native.functions and not _ours(native)
    assert not [o for o in native.opset_import if o.domain == "gammamod"]
    for model in (plugin, native):
        assert not [f for f in lint_graph(model, target(version), "copy") if f.severity == "error"]
    assert "TopK" in {n.op_type for n in native.graph.node} | {n.op_type for n in _subgraph_nodes(native)}


def _subgraph_nodes(model):
    from gammamod.export import ops

    return list(ops._nodes(model.graph))


def test_native_copy_computes_what_the_decoder_computes(art_gamma, tmp_path):
    """The inlined copy runs on ONNX Runtime and matches decoder.onnx output for output."""
    import onnxruntime as ort

    from gammamod.engines.prepare import checked_copy

    manifest = read_manifest(art_gamma)
    native = checked_copy(manifest, "decoder", "10.3", "native")
    # a copy beside the graph (ORT refuses external data outside the model's folder); a hard link
    # would poison the session's artifact for the onnx package, which refuses multiply-linked data
    shutil.copy(manifest.path("decoder.weights"), tmp_path / "decoder.weights")
    onnx.save(native, str(tmp_path / "native.onnx"))
    rng = np.random.default_rng(0)
    t, window, past = 90, 64, 5
    feeds = {}
    for item in manifest.graph("decoder")["inputs"]:
        role, kind = item["role"], item["role"].split(".")[0]
        if role == "inputs_embeds":
            feeds[item["name"]] = rng.standard_normal((2, t, H)).astype(np.float32)
        elif kind in ("seq_lengths",):
            feeds[item["name"]] = np.array([t, t - 3])
        elif kind in ("past_length", "kv_length"):
            feeds[item["name"]] = np.array([past, past])
        elif role == "span_start":
            feeds[item["name"]] = np.array([2, 9])
        elif role == "span_length":
            feeds[item["name"]] = np.array([SPAN], np.int32)
        elif kind == "capacity":
            feeds[item["name"]] = np.array([KEPT], np.int32)
        else:
            feeds[item["name"]] = rng.standard_normal((2, KV_HEADS, window, HEAD_DIM)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref = ort.InferenceSession(str(manifest.path("decoder.onnx")), opts, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp_path / "native.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    for name, a, b in zip(names, ref.run(None, feeds), got.run(None, feeds)):
        if a.dtype.kind in "iu":
            assert np.array_equal(a, b), name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------------
# the command line: dry run, refusals


def _gammamod(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gammamod", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_build_dry_run_and_refusals(art_gamma, tmp_path):
    before = _snapshot(art_gamma)
    plan_file = tmp_path / "plan.json"
    proc = _gammamod("build", art_gamma, "--target", "h100", "--dry-run", "--precision", "fp16", "--plan", plan_file)
    assert proc.returncode == 0, proc.stderr
    assert "profile prefill" in proc.stdout and "profile decode" in proc.stdout and "fits" in proc.stdout
    plan = json.loads(plan_file.read_text())
    assert plan["target"]["name"] == "h100" and plan["memory"]["kv_cache"] == 33_259_520
    for args, fragment in [(("--target", "orin-jp6", "--precision", "fp8", "--dry-run"), "has no fp8"),
                           (("--target", "h100"), "pip install tensorrt-cu12"),
                           (("--target", "auto", "--dry-run"), "needs an NVIDIA GPU")]:
        proc = _gammamod("build", art_gamma, *args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr, \
            proc.stderr
    assert _snapshot(art_gamma) == before  # nothing written into the artifact
    assert not list(art_gamma.parent.glob(f"{art_gamma.name}.build-plan*"))


# --------------------------------------------------------------------------------------------
# the bundle


def test_bundle_for_orin(art_gamma, tmp_path):
    from gammamod.engines.plugin_library import library_sources

    out = tmp_path / "bundle"
    proc = _gammamod("bundle", art_gamma, out, "--target", "orin-jp6", "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    bundle = read_manifest(out)
    bundle.verify_files()
    assert bundle["tensorrt"]["targets"]["10.3"]["decoder"] == "decoder.trt10.3.onnx"
    assert bundle["tensorrt"]["targets"]["10.3"]["decoder_native"] == "decoder.trt10.3.native.onnx"
    lint = _gammamod("check-onnx", out, "--tensorrt", "10.3")
    assert lint.returncode == 0 and "decoder.trt10.3.onnx" in lint.stdout, lint.stdout
    assert not _ours(onnx.load(str(out / "decoder.trt10.3.native.onnx"), load_external_data=False))
    plugin_copy = onnx.load(str(out / "decoder.trt10.3.onnx"), load_external_data=False)
    assert _ours(plugin_copy) and not plugin_copy.functions
    assert not list(out.glob("*.trt11.x.onnx"))  # only the target's TensorRT
    for src in library_sources():
        assert (out / "plugins" / src.name).read_bytes() == src.read_bytes()
    for name in ("tokenizer.model", "embed_tokens.npy", "decoder.weights", "vision.weights", "smoke.png", "plan.json"):
        assert (out / name).is_file(), name
    # the bundle's weights are copies: the onnx package refuses external data with several hard links
    assert (art_gamma / "decoder.weights").stat().st_nlink == 1 and (out / "decoder.weights").stat().st_nlink == 1
    script = out / "build.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in text and "/usr/src/tensorrt/bin/trtexec" in text
    assert "gammamod build . --target orin-jp6 --precision fp16" in text and "gammamod run . --image smoke.png" in text
    decoder_line = next(line for line in text.splitlines() if "--onnx=decoder.trt10.3.onnx" in line)
    assert "--profile=0" in decoder_line and "--profile=1" in decoder_line and "--fp16" in decoder_line
    assert f"span_length:{SPAN}" in decoder_line and "--dynamicPlugins=\"$PLUGIN\"" in decoder_line
    assert f"past_key.3:{MAX_BATCH}x{KV_HEADS}x2012x{HEAD_DIM}" in decoder_line
    # a second bundle onto it needs --force, and --force replaces only a bundle
    assert _gammamod("bundle", art_gamma, out, "--target", "orin-jp6").returncode == 2
    assert _gammamod("bundle", art_gamma, out, "--target", "thor-jp7", "--force").returncode == 0
    assert "-DCMAKE_CUDA_ARCHITECTURES=110" in script.read_text()


@pytest.mark.skipif(not os.environ.get("TENSORRT_INCLUDE_DIR") or not shutil.which("nvcc"),
                    reason="needs nvcc and TensorRT's headers (set TENSORRT_INCLUDE_DIR to an include/ of "
                           "github NVIDIA/TensorRT); builds for minutes on 2 cores")
def test_bundle_cmake_step_builds_the_plugin_library(art_gamma, tmp_path):
    out = tmp_path / "bundle"
    assert _gammamod("bundle", art_gamma, out, "--target", "orin-jp6").returncode == 0
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", out / "plugins", "-B", build, f"-DTENSORRT_INCLUDE_DIR={os.environ['TENSORRT_INCLUDE_DIR']}",
                 "-DCMAKE_CUDA_ARCHITECTURES=87", "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", build, "-j", "2"]):
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lib = next(build.rglob("libgammamod_plugins.so"))
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert "getCreators" in symbols and "setLoggerFinder" in symbols


# --------------------------------------------------------------------------------------------
# the manifest's engines section


def _with_engines(art, tmp_path) -> Path:
    """A copy of the artifact with an engines section as a build writes it (the engine files are
    placeholders: nothing here reads them as engines)."""
    from gammamod.manifest import describe_files

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = read_manifest(copy)
    plan = make_plan(manifest, BuildOptions(target="h100"))
    (copy / "engines").mkdir()
    for kind in plan["engines"]:
        (copy / "engines" / f"{kind}.engine").write_bytes(b"engine")
    (copy / "engines" / "libgammamod_plugins.so").write_bytes(b"library")
    manifest.data["files"].update(describe_files(copy, ["engines/decoder.engine", "engines/vision.engine",
                                                       "engines/libgammamod_plugins.so"]))
    manifest.data["engines"] = {
        "tensorrt": "10.8.0", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]},
        "hardware_compatibility": "none", "version_compatible": False, "precision": "fp32", "typing": "strong",
        "mod_ops": "plugin", "plugin": {**plan["plugin"], "sha256": manifest.data["files"]["engines/libgammamod_plugins.so"]["sha256"]},
        "files": {k: e["file"] for k, e in plan["engines"].items()},
        "profiles": {k: e["profiles"] for k, e in plan["engines"].items()},
        "kv_capacity": plan["kv_capacity"], "max_batch": 8, "max_seq": 2048, "span_lengths": [73],
        "options": plan["options"], "built": "2026-01-01T00:00:00+00:00", "build_seconds": 1.0}
    manifest.write()
    return copy


def test_manifest_engines_section(art_gamma, tmp_path):
    from gammamod.runtime.backends.tensorrt import check_engines

    art = _with_engines(art_gamma, tmp_path)
    manifest = read_manifest(art)
    manifest.verify_files()
    engines = manifest["engines"]
    check_engines(engines, "10.8.0", (9, 0), engines["plugin"]["sha256"])
    with pytest.raises(GammamodError, match="built for sm_90 \\(NVIDIA H100 80GB HBM3\\), this GPU is sm_87"):
        check_engines(engines, "10.8.0", (8, 7))
    with pytest.raises(GammamodError, match="differs from the one the engines were built with"):
        check_engines(engines, "10.8.0", (9, 0), "0" * 64)
    data = json.loads((art / "manifest.json").read_text())
    for edit, fragment in [(lambda e: e.update(hardware_compatibility="any"), "engines.hardware_compatibility"),
                           (lambda e: e["profiles"]["decoder"].pop("decode"), "engines.profiles"),
                           (lambda e: e["kv_capacity"].__setitem__(0, 4096), "engines.kv_capacity"),
                           (lambda e: e["files"].update(decoder="../x.engine"), "engines.files")]:
        bad = json.loads(json.dumps(data))
        edit(bad["engines"])
        (art / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(GammamodError, match=fragment):
            read_manifest(art)


def test_plan_and_bundle_load_no_torch(art_gamma, tmp_path):
    """A Jetson has the runtime, not torch: planning, preparing copies and bundling import none."""
    code = (f"import sys; from gammamod.engines.bundle import write_bundle; from gammamod.engines.plan import BuildOptions; "
            f"write_bundle({str(art_gamma)!r}, {str(tmp_path / 'b')!r}, BuildOptions(target='thor-jp7', mod_ops='native')); "
            f"assert 'torch' not in sys.modules, 'torch loaded'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "b" / "decoder.trt10.x.native.onnx").is_file()


class _FakeTensorRT:
    """TensorRT's Python API as far as engines/build.py calls it, recording the calls: what is
    tested is our side (profiles and flags handed over, files and manifest written), not TensorRT."""

    __version__ = "10.3.0"

    def __init__(self):
        self.calls = []
        fake = self

        class _Enum:
            def __init__(self, *names):
                for n in names:
                    setattr(self, n, n)

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        self.NetworkDefinitionCreationFlag = _Enum("STRONGLY_TYPED")
        self.MemoryPoolType = _Enum("WORKSPACE")
        self.BuilderFlag = _Enum("FP16", "BF16", "VERSION_COMPATIBLE")
        self.HardwareCompatibilityLevel = _Enum("AMPERE_PLUS")

        class Profile:
            def __init__(self):
                self.shapes, self.values = {}, {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (list(lo), list(opt), list(hi))

            def set_shape_input(self, name, lo, opt, hi):
                self.values[name] = (list(lo), list(opt), list(hi))

        class Cache:
            def serialize(self):
                return b"timing"

        class Config:
            def __init__(self):
                self.flags, self.profiles = [], []

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore):
                pass

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, data, path):
                fake.calls.append(("parse", Path(path).name, len(data)))
                return True

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", config.flags, config.profiles))
                return b"serialized engine"

        self.Builder, self.OnnxParser = Builder, Parser


def test_build_writes_engines_and_the_manifest_section(art_gamma, tmp_path, monkeypatch):
    from gammamod.engines.build import build_engines
    from gammamod.engines.gpu import LocalGPU
    from gammamod.runtime.backends.tensorrt import check_engines

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    art = tmp_path / "art"
    shutil.copytree(art_gamma, art)
    library = tmp_path / "libgammamod_plugins.so"
    library.write_bytes(b"a library")
    fake.get_plugin_registry = lambda: type("R", (), {"load_library": lambda s, p: fake.calls.append(("load", p)) or True})()
    manifest = read_manifest(art)
    plan = make_plan(manifest, BuildOptions(target="orin-jp6", requested_precision="fp16", workspace_mib=64,
                                            timing_cache=str(tmp_path / "timing.cache")))
    record = build_engines(manifest, plan, LocalGPU("Orin", (8, 7), 61.4), plugin_library=str(library))
    builds = [c for c in fake.calls if c[0] == "build"]
    assert len(builds) == 2 and ("workspace", 64 << 20) in fake.calls
    decoder_flags, decoder_profiles = builds[0][1], builds[0][2]
    assert decoder_flags == ["FP16"] and len(decoder_profiles) == 2  # TensorRT 10's weak typing; prefill, decode
    prefill = decoder_profiles[0]
    assert prefill.values["span_length"] == ([0], [SPAN], [SPAN]) and prefill.values["capacity.3"] == ([0], [KEPT], [KEPT])
    assert prefill.shapes["past_key.3"][2] == [MAX_BATCH, KV_HEADS, MAX_SEQ - (SPAN - KEPT), HEAD_DIM]
    assert [c[1] for c in fake.calls if c[0] == "parse"] == ["decoder.onnx", "vision.onnx"]  # weights found beside them
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"
    again = read_manifest(art)
    again.verify_files()
    assert again["engines"] == record and record["files"] == {"decoder": "engines/decoder.engine",
                                                               "vision": "engines/vision.engine"}
    assert (art / "engines" / "libgammamod_plugins.so").read_bytes() == b"a library"
    check_engines(record, "10.3.0", (8, 7), record["plugin"]["sha256"])
