"""calib quantize on tiny artifacts: the Q/DQ it writes, what stays fp32, validate with the stated
tolerances (numbers recorded in the manifest), the runtime running it, and the refusals."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from gammamod.errors import GammamodError

CALIB = dict(random=2, steps=2)


@pytest.fixture(scope="module")
def int8_pmod(art_pmod, tmp_path_factory):
    from gammamod.calib.quantize import quantize_artifact

    return quantize_artifact(art_pmod, tmp_path_factory.mktemp("q") / "int8", "int8", **CALIB)


@pytest.fixture(scope="module")
def int4_pmod(art_pmod, tmp_path_factory):
    from gammamod.calib.quantize import quantize_artifact

    return quantize_artifact(art_pmod, tmp_path_factory.mktemp("q") / "int4", "int4", block_size=32)


def _nodes(graph):
    for node in graph.node:
        yield graph, node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def _matmul_weights(model):
    """B input of every MatMul and Gemm (lm_head) -> whether it comes from a DequantizeLinear."""
    dq = {n.output[0] for _, n in _nodes(model.graph) if n.op_type == "DequantizeLinear"}
    return {n.input[1]: n.input[1] in dq for _, n in _nodes(model.graph) if n.op_type in ("MatMul", "Gemm")}


def _tensorrt_errors(manifest, version):
    """Lint errors of the decoder copy TensorRT ``version`` would parse (function bodies stripped)."""
    from gammamod.engines.lint import lint_graph
    from gammamod.engines.prepare import tensorrt_copy
    from gammamod.engines.targets import TARGETS

    model = onnx.load(str(manifest.path("decoder.onnx")), load_external_data=False)
    return [f for f in lint_graph(tensorrt_copy(model, version), TARGETS[version], "decoder.onnx")
            if f.severity == "error"]


def test_int8_graphs_and_manifest(int8_pmod, art_pmod):
    from gammamod.manifest import read_manifest

    m = read_manifest(int8_pmod.root)
    q = m["quantization"]
    assert q["precision"] == "int8" and q["scales_dtype"] == "float32" and q["activations"]["granularity"] == "per tensor"
    assert any("lm_head" in x for x in q["full_precision"]) and any("routers" in x for x in q["full_precision"])
    m.verify_files()
    for kind in ("decoder", "decoder_ort", "decode_ort"):
        model = onnx.load(str(m.path(m.graph(kind)["file"])), load_external_data=False)
        weights = _matmul_weights(model)
        quantized = {b for b, from_dq in weights.items() if from_dq}
        assert len(quantized) == 4 * m.num_layers, kind  # qkv, o, gate_up, down per layer
        assert weights["lm_head.weight"] is False  # the logits stay fp32
        assert all(not from_dq for b, from_dq in weights.items() if "router" in b)
        qs = [n for _, n in _nodes(model.graph) if n.op_type == "QuantizeLinear"]
        assert qs and all(len(n.input) == 3 for n in qs)  # activations: explicit zero point (int8, 0)
    table = m["weights"]["decoder.weights"]
    assert table["model.layers.0.mlp.down_proj.weight.T.quantized"][2] == "int8"
    # TensorRT's Q/DQ rules hold for the copy it parses
    assert _tensorrt_errors(m, "10.3") == []


def test_int8_validates_and_records_numbers(int8_pmod, tiny_pmod):
    from gammamod.manifest import read_manifest
    from gammamod.validate.validate import QUANTIZED_TOLERANCES, run_validate

    report = run_validate(int8_pmod.root, tiny_pmod, samples=2, steps=6)
    assert report["tolerance"]["logits"] == QUANTIZED_TOLERANCES["int8"].logits
    assert report["passed"], report["backends"]["ort-cpu"]["failures"]
    ort = report["backends"]["ort-cpu"]
    assert 0 < ort["logits"]["max_abs_over_scale"] <= QUANTIZED_TOLERANCES["int8"].logits  # quantized: not exact
    recorded = read_manifest(int8_pmod.root)["quantization"]["validate"]
    assert recorded["passed"] and recorded["backends"]["ort-cpu"]["logits_max_err_over_scale"] == pytest.approx(
        ort["logits"]["max_abs_over_scale"])
    read_manifest(int8_pmod.root).verify_files()  # recording the numbers leaves the hashed files alone


def test_int4_weight_only(int4_pmod, tiny_pmod):
    from gammamod.manifest import read_manifest
    from gammamod.validate.validate import run_validate

    m = read_manifest(int4_pmod.root)
    model = onnx.load(str(m.path("decode.ort.onnx")), load_external_data=False)
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    dqs = [n for _, n in _nodes(model.graph) if n.op_type == "DequantizeLinear"]
    assert dqs and all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["block_size"] == 32
                       for n in dqs)
    assert not [n for _, n in _nodes(model.graph) if n.op_type == "QuantizeLinear"]  # weight-only
    assert m["weights"]["decoder.weights"]["model.layers.0.mlp.down_proj.weight.T.quantized"][2] == "int4"
    assert _tensorrt_errors(m, "10.3") == []  # opset 21 for INT4 Q/DQ: a warning there, not an error
    report = run_validate(int4_pmod.root, tiny_pmod, samples=1, steps=4)
    assert report["passed"], report["backends"]["ort-cpu"]["failures"]


def test_gamma_mod_layers_in_if_branches_are_quantized(art_gamma, tmp_path):
    """gamma-MoD's MoD layers run inside the decode gate's If: calibration and Q/DQ reach them."""
    from gammamod.calib.quantize import quantize_artifact
    from gammamod.runtime.pipeline import Pipeline

    m = quantize_artifact(art_gamma, tmp_path / "int8", "int8", random=1, steps=2)
    model = onnx.load(str(m.path("decode.ort.onnx")), load_external_data=False)
    in_branches = [n for g, n in _nodes(model.graph) if g is not model.graph and n.op_type == "QuantizeLinear"]
    assert in_branches
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(".act_scale")}
    assert scales and all(np.isfinite(s) and s > 0 for s in scales.values())
    pipe = Pipeline.load(m.root)
    out = pipe.generate(None, ["Say something."], max_new_tokens=4)
    assert len(out[0].tokens) >= 1


def test_refusals(art_pmod, int8_pmod, tmp_path):
    from gammamod.calib.quantize import check_request, quantize_artifact
    from gammamod.manifest import Manifest, read_manifest

    m = read_manifest(art_pmod)
    with pytest.raises(GammamodError, match="--compute-capability"):
        check_request(m, "fp8", 32, "ort", None)
    with pytest.raises(GammamodError, match="needs compute capability 8.9"):
        check_request(m, "fp8", 32, "ort", 8.7)  # Jetson Orin
    check_request(m, "fp8", 32, "ort", 9.0)
    with pytest.raises(GammamodError, match="--block-size 64"):
        check_request(m, "int4", 64, "ort", None)
    with pytest.raises(GammamodError, match="already quantized"):
        quantize_artifact(int8_pmod.root, tmp_path / "again", "int8", **CALIB)
    half = Manifest(json.loads(json.dumps(m.data)), m.root)
    half.data["model"]["dtype"] = "float16"
    with pytest.raises(GammamodError, match="fp32 export"):
        check_request(half, "int8", 32, "ort", None)
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        with pytest.raises(GammamodError, match="pip install"):
            check_request(m, "int8", 32, "modelopt", None)
    with pytest.raises(GammamodError, match="--data .* or --random"):
        quantize_artifact(art_pmod, tmp_path / "x", "int8", data=tmp_path, random=2)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_in_one_line(art_pmod, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gammamod", "calib", "quantize", str(art_pmod), "--precision", "fp8",
                        "--random", "1", "--out", str(tmp_path / "fp8")], capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "compute capability" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "fp8").exists()


def test_fp8_is_made_for_compute_capability_8_9_and_runs_emulated_on_ort_cpu(art_pmod, tmp_path):
    from gammamod.calib.quantize import quantize_artifact
    from gammamod.engines.lint import lint_model_file
    from gammamod.runtime.pipeline import Pipeline

    m = quantize_artifact(art_pmod, tmp_path / "fp8", "fp8", compute_capability=8.9, random=1, steps=1)
    assert m["quantization"]["min_compute_capability"] == 8.9
    model = onnx.load(str(m.path("decoder.onnx")), load_external_data=False)
    zero_points = [i for i in model.graph.initializer if i.name.endswith(".zero_point")]
    assert zero_points and all(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in zero_points)
    assert _tensorrt_errors(m, "10.3") == []
    findings = lint_model_file(m.path("decoder.onnx"), "10.3")
    assert any("Orin" in f.message for f in findings)  # FP8 parses on 10.3 but Orin cannot run it
    out = Pipeline.load(m.root).generate(None, ["Say something."], max_new_tokens=2)  # ONNX Runtime CPU emulates it
    assert out[0].tokens
