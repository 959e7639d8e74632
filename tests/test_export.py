"""The exported ONNX against the PyTorch static mode, run on ONNX Runtime (CPU)."""

import json

import numpy as np
import onnx
import pytest

from gammamod.errors import GammamodError
from gammamod.export import load_checkpoint
from gammamod.export.exporter import ExportOptions, export_artifact
from gammamod.export.ops import DOMAIN, NODE_TYPES, PLUGIN_NAMESPACE
from gammamod.manifest import read_manifest
from parity import compare_chunks, compare_generation, reference_inputs, rel_err

# --------------------------------------------------------------------------------------------
# numerical parity: one artifact, any prompt layout


def _embeds(model, rows: int, t: int, seed: int = 0) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (rows, t), generator=g)
    return model.embed(ids).detach().numpy()


# (span per row, row lengths): spans at several positions and lengths, batches whose rows have
# their spans at different places, a span that covers the whole prompt (gamma-MoD's released
# inference routes every position), and no span at all (a text-only prompt)
LAYOUTS = {
    "gamma-mod": [([(0, 40)], [60]), ([(0, 73)], [90]), ([(0, 12)], [30]), ([(0, 50)], [50]),
                  ([(0, 40), (0, 40)], [70, 55]), (None, [20])],
    "p-mod": [([(10, 36)], [60]), ([(33, 36)], [80]), ([(0, 20)], [30]), ([(5, 7)], [25]),
              ([(3, 36), (17, 36)], [70, 61]), (None, [20])],
}


@pytest.mark.parametrize("recipe", ["gamma", "pmod"])
@pytest.mark.parametrize("fused", [True, False], ids=["ort", "portable"])
def test_one_artifact_serves_every_prompt_layout(recipe, fused, request):
    """ONNX Runtime against the PyTorch static mode, from ONE artifact per recipe: spans at several
    positions and lengths, batches of 1 and 2 with the rows' spans at different places, prefill then
    8 decode steps and a later chat turn; logits within 1e-4 relative, kept indices and every
    layer's KV lengths identical. ``portable``: decoder.onnx, the graph TensorRT builds."""
    from gammamod.runtime.pipeline import Pipeline

    ckpt, art = request.getfixturevalue(f"tiny_{recipe}"), request.getfixturevalue(f"art_{recipe}")
    model = load_checkpoint(ckpt)
    pipe = Pipeline.load(art, fused=fused)
    assert pipe.backend.inplace_decode() == fused
    for i, (spans, lengths) in enumerate(LAYOUTS[model.recipe.name]):
        x = _embeds(model, len(lengths), max(lengths), seed=i)
        compare_chunks(model, pipe, x, spans, lengths, steps=8)


def test_prompts_with_images_equal_pytorch(tiny_gamma, art_gamma, tiny_pmod, art_pmod, prompts_and_image):
    questions, image = prompts_and_image
    for ckpt, art in ((tiny_gamma, art_gamma), (tiny_pmod, art_pmod)):
        model = load_checkpoint(ckpt)
        batch = reference_inputs(model, ckpt, questions, image)
        assert batch.lengths[0] != batch.lengths[1]  # right padding is exercised
        compare_generation(model, art, batch)


def test_fused_graphs_are_onnx_runtimes_own(art_gamma):
    manifest = read_manifest(art_gamma)
    layers, mod_layers = manifest["model"]["num_layers"], manifest["recipe"]["mod_layers"]
    for kind, file in (("decoder_ort", "decoder.ort.onnx"), ("decode_ort", "decode.ort.onnx")):
        entry = manifest["graphs"][kind]
        assert entry["backend"] == "ort" and entry["kv"] == "in-place" and entry["file"] == file
        model = onnx.load(str(manifest.path(file)), load_external_data=False)
        nodes = _all_nodes(model.graph)
        assert [n.op_type for n in nodes].count("GroupQueryAttention") == layers
        assert kind not in manifest["tensorrt"]["targets"]["10.3"]  # TensorRT builds the portable graph
    step = onnx.load(str(manifest.path("decode.ort.onnx")), load_external_data=False)
    assert not [n for n in _all_nodes(step.graph) if n.domain == DOMAIN]  # a decode step routes nothing


def test_gamma_decode_gate_is_an_if_that_skips_the_layer(art_gamma, art_pmod):
    """gamma-MoD's gated layers sit in an If on "any row runs": when the gate closes for every
    row, the layer's attention and MLP are not computed. p-MoD decodes densely: no If."""
    manifest = read_manifest(art_gamma)
    mod_layers = manifest["recipe"]["mod_layers"]
    for file in ("decoder.onnx", "decoder.ort.onnx", "decode.ort.onnx"):
        graph = onnx.load(str(manifest.path(file)), load_external_data=False).graph
        ifs = [n for n in graph.node if n.op_type == "If"]
        assert len(ifs) == len(mod_layers), file
        for n in ifs:
            branches = {a.name: a.g for a in n.attribute}
            run = [m.op_type for m in branches["then_branch"].node]
            assert "MatMul" in run and ("GroupQueryAttention" in run or "Softmax" in run)
            assert {m.op_type for m in branches["else_branch"].node} == {"Identity"}
    pmod = read_manifest(art_pmod)
    graph = onnx.load(str(pmod.path("decoder.onnx")), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "If"]


def test_dense_baseline_exports(tiny_llava, art_llava, prompts_and_image):
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_llava)
    compare_generation(model, art_llava, reference_inputs(model, tiny_llava, questions, image), routing="dense")
    assert read_manifest(art_llava)["routing"]["mode"] == "dense"


def test_dense_flag_ignores_the_routers(tiny_gamma, art_gamma_dense, prompts_and_image):
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_gamma)
    compare_generation(model, art_gamma_dense, reference_inputs(model, tiny_gamma, questions, image),
                       routing="dense")
    manifest = read_manifest(art_gamma_dense)
    assert manifest["routing"]["mode"] == "dense" and manifest.capacity_rule() is None
    graph = onnx.load(str(manifest.path("decoder.onnx")), load_external_data=False).graph
    assert not [n for n in graph.node if n.domain == DOMAIN]
    assert "span_length" not in {i.name for i in graph.input}


def test_fp16_export_halves_the_weights_and_validates(tiny_gamma, art_gamma, art_gamma_fp16, prompts_and_image):
    full, half = read_manifest(art_gamma), read_manifest(art_gamma_fp16)
    assert half["model"]["dtype"] == "float16"
    payload = [sum(e[1] for e in m["weights"]["decoder.weights"].values()) for m in (half, full)]
    assert payload[0] * 2 == payload[1]  # every tensor halves; the file adds page-alignment padding
    assert half["files"]["decoder.weights"]["bytes"] < 0.6 * full["files"]["decoder.weights"]["bytes"]
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_gamma)
    compare_generation(model, art_gamma_fp16, reference_inputs(model, tiny_gamma, questions[:1], image), tol=2e-2)


# --------------------------------------------------------------------------------------------
# graph structure


def _all_nodes(graph):
    """Every node of a graph and of its If branches."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _all_nodes(a.g)
    return out


def _graphs(artifact):
    manifest = read_manifest(artifact)
    for kind, g in manifest["graphs"].items():
        yield kind, onnx.load(str(manifest.path(g["file"])), load_external_data=False)


@pytest.mark.parametrize("fixture", ["art_gamma", "art_pmod"])
def test_no_data_dependent_shapes(fixture, request):
    """No NonZero and friends anywhere; every shape follows from the input shapes and the INT32
    shape inputs (span_length, capacity.<l>), as the linter's static analysis confirms."""
    from gammamod.engines.lint import lint_graph
    from gammamod.engines.targets import TARGETS

    for kind, model in _graphs(request.getfixturevalue(fixture)):
        every = _all_nodes(model.graph) + [n for f in model.functions for n in f.node]
        assert not [n.op_type for n in every if n.op_type in ("NonZero", "Unique", "Compress", "NonMaxSuppression")]
        if kind in ("decoder", "vision"):
            errors = [f for f in lint_graph(model, TARGETS["11.x"], kind) if f.severity == "error"]
            assert errors == [], errors


def test_span_and_capacities_are_int32_shape_inputs(art_pmod):
    manifest = read_manifest(art_pmod)
    model = onnx.load(str(manifest.path("decoder.onnx")), load_external_data=False)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    for name in ["span_length"] + [f"capacity.{layer}" for layer in manifest["recipe"]["mod_layers"]]:
        assert inputs[name].elem_type == onnx.TensorProto.INT32
        assert [d.dim_value for d in inputs[name].shape.dim] == [1]
    assert inputs["span_start"].elem_type == onnx.TensorProto.INT64  # data: one start per row
    # the MoD selection reads the span length and its kept count as its shape inputs
    from gammamod.engines.lint import _static_values

    static = _static_values(model.graph)
    selects = [n for n in model.graph.node if n.op_type == "MoDSelect"]
    assert len(selects) == len(manifest["recipe"]["mod_layers"])
    for n in selects:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["tensorrt_plugin_shape_input_indices"] == [2, 3]
        assert n.input[2] in static and n.input[3] in static and n.input[0] not in static


def test_custom_nodes_carry_plugin_attributes_and_bodies(art_gamma):
    manifest = read_manifest(art_gamma)
    model = onnx.load(str(manifest.path("decoder.onnx")), load_external_data=False)
    custom = [n for n in _all_nodes(model.graph) if n.domain == DOMAIN]
    # static routing: select, gather, scatter per MoD layer; MoDSelectThreshold is threshold routing's
    assert {n.op_type for n in custom} == set(NODE_TYPES) - {"MoDSelectThreshold"}
    assert len(custom) == 3 * len(manifest["recipe"]["mod_layers"])
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == b"1"
    # every custom node has its function body, and only the used ones ship
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, n.op_type) for n in custom}


def _select_session():
    """One MoDSelect node run by ONNX Runtime through its function body."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gammamod.export.ops import function_protos, register_onnx_schemas

    register_onnx_schemas()
    node = helper.make_node("MoDSelect", ["scores", "start", "n", "k"], ["kept"], domain=DOMAIN)
    graph = helper.make_graph([node], "select", [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info("start", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=function_protos(20), ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda scores, start, n, k: session.run(None, {"scores": scores, "start": np.asarray(start, np.int64),
                                                          "n": np.array(n), "k": np.array(k)})[0]


def test_mod_select_per_row_spans_and_ties_everywhere():
    """A saturated TanhNorm gives many exactly equal weights: eager PyTorch and the ONNX body
    must keep the same tokens (ONNX TopK: the lower index first), for each row's own span."""
    import torch

    from gammamod.export.ops import mod_select

    select = _select_session()
    # by hand: row 0's span [1, 5) = [0.5, 1.2, 1.2, 1.2], k = 2 -> the first two 1.2s (2, 3);
    # row 1's span [2, 6) = [1.2, 1.2, 7.0, 0.1] -> 4 and 2
    scores = np.array([[9.0, 0.5, 1.2, 1.2, 1.2, 7.0], [1.0, 1.0, 1.2, 1.2, 7.0, 0.1]], np.float32)
    expected = [[0, 2, 3, 5], [0, 1, 2, 4]]
    assert mod_select(torch.from_numpy(scores), torch.tensor([1, 2]), 4, 2).tolist() == expected
    assert select(scores, [1, 2], 4, 2).tolist() == expected
    # no span: every token; k = 0: the span's tokens are all dropped
    assert select(scores, [0, 0], 0, 0).tolist() == [list(range(6))] * 2
    assert select(scores, [1, 2], 4, 0).tolist() == [[0, 5], [0, 1]]
    # the bench model's geometry: 576 routable tokens, hundreds of them tied
    rng = np.random.default_rng(0)
    scores = (np.tanh(rng.normal(0, 8, (2, 619))) * 0.2 + 1).astype(np.float32)
    assert 619 - len(np.unique(scores[0])) > 200
    for k in (486, 161, 86):
        ours = mod_select(torch.from_numpy(scores), torch.tensor([33, 10]), 576, k).numpy()
        np.testing.assert_array_equal(select(scores, [33, 10], 576, k), ours)


def test_threshold_selection_moves_low_scores_last():
    """gamma-MoD's released inference in a static graph: the capacity's top-k, the selected span
    tokens at or below the threshold moved after the ones the layer processes, and their count;
    eager PyTorch and the ONNX body (which calls MoDSelect's) agree with a hand-computed case and
    with each other on ties and on scores exactly at the threshold."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from gammamod.export.ops import attach_functions, mod_select_threshold, register_onnx_schemas

    register_onnx_schemas()
    node = helper.make_node("MoDSelectThreshold", ["s", "st", "n", "k"], ["kept", "count"], domain=DOMAIN,
                            threshold=0.25)
    graph = helper.make_graph([node], "t", [
        helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info("st", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, [None, None]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    attach_functions(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # by hand: span [1, 6) scores [0.9, 0.1, 0.25, 0.7, 0.2], k = 4 keeps 1, 3, 4, 5 (0.1 is dropped by
    # the top-k); 0.25 and 0.2 are at or below the threshold: processed 0, 1, 4, 6; then 3, 5
    scores = np.array([[0.0, 0.9, 0.1, 0.25, 0.7, 0.2, 0.0]], np.float32)
    kept, count = mod_select_threshold(torch.from_numpy(scores), torch.tensor([1]), 5, 4, 0.25)
    assert kept.tolist() == [[0, 1, 4, 6, 3, 5]] and count.tolist() == [4]
    rng = np.random.default_rng(0)
    for trial in range(50):
        s = (np.round(rng.random((2, 30)) * 4) / 4).astype(np.float32)  # ties and exact 0.25s
        st, n = rng.integers(0, 10, 2), int(rng.integers(0, 21))
        k = int(rng.integers(0, n + 1))
        ek, ec = mod_select_threshold(torch.from_numpy(s), torch.from_numpy(st), n, k, 0.25)
        bk, bc = session.run(None, {"s": s, "st": st, "n": np.array(n), "k": np.array(k)})
        assert np.array_equal(bk, ek.numpy()) and np.array_equal(bc, ec.numpy()), trial


@pytest.mark.parametrize("version", ["10.3", "11.x"])
def test_tensorrt_copies_parse_and_hold_one_set_of_weights(art_gamma, version):
    from gammamod.engines.lint import lint_artifact

    manifest = read_manifest(art_gamma)
    copies = manifest["tensorrt"]["targets"][version]
    assert set(copies) - {"notes"} == {"vision", "decoder"}
    for kind in ("vision", "decoder"):
        model = onnx.load(str(manifest.path(copies[kind])), load_external_data=False)
        assert not model.functions and model.ir_version <= (10 if version == "10.3" else 13)
        locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
        assert locations == {f"{kind}.weights"}
    # the decoder copy: every weight once (one initializer per tensor, one place in the file)
    decoder = onnx.load(str(manifest.path(copies["decoder"])), load_external_data=False)
    placed = [(i.name, {e.key: e.value for e in i.external_data}) for i in decoder.graph.initializer
              if i.external_data]
    names = [n for n, _ in placed]
    offsets = [ext["offset"] for _, ext in placed]
    assert len(names) == len(set(names)) and len(offsets) == len(set(offsets))
    table = manifest["weights"]["decoder.weights"]
    assert {n: int(ext["offset"]) for n, ext in placed} == {n: table[n][0] for n in names}
    findings, files = lint_artifact(art_gamma, version)
    assert files == [copies[k] for k in ("vision", "decoder")]
    assert [f for f in findings if f.severity == "error"] == []


def test_decoder_graphs_share_one_weights_file(art_pmod):
    manifest = read_manifest(art_pmod)
    size = manifest["files"]["decoder.weights"]["bytes"]
    seen = {}
    for file in ("decoder.onnx", "decoder.ort.onnx", "decode.ort.onnx"):
        model = onnx.load(str(manifest.path(file)), load_external_data=False)
        for init in model.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            if ext:
                assert ext["location"] == "decoder.weights" and int(ext["offset"]) + int(ext["length"]) <= size
                assert seen.setdefault(init.name, ext["offset"]) == ext["offset"]  # one place per tensor
    # MatMul weights are stored transposed so no runtime transposes (copies) them at load
    assert any(n.endswith(".T") for n in seen)


# --------------------------------------------------------------------------------------------
# the manifest


def test_manifest_describes_the_artifact(art_pmod, tiny_pmod):
    manifest = read_manifest(art_pmod)
    manifest.verify_files()
    assert manifest["schema_version"] == 2 and manifest["recipe"]["name"] == "p-mod"
    model = load_checkpoint(tiny_pmod)
    routing = manifest["routing"]
    assert routing["mode"] == "static" and routing["span"] == "image"
    assert routing["span_lengths"] == [model.vision.image_tokens] == [manifest["image"]["tokens"]]
    assert routing["capacity"]["rule"] == "layer-ratio"  # the rule, not a table
    for n in (1, 36, 576, 2000):
        assert manifest.capacity_rule().kept_counts(n) == model.recipe.capacities(n)
    entries = {e["layer"]: e["prefill"] for e in manifest["kv_cache"]["entries"]}
    assert entries[0] == "seq_len" and entries[31] == "seq_len - (span_length - capacity.31)"
    roles = {i["role"] for i in manifest["graphs"]["decoder"]["inputs"]}
    assert {"inputs_embeds", "seq_lengths", "past_length", "span_start", "span_length", "capacity.8", "past_key.3",
            "kv_length.31"} <= roles and "capacity.7" not in roles
    outputs = {o["role"] for o in manifest["graphs"]["decoder"]["outputs"]}
    assert {"logits", "present_key.0", "new_kv_length.0", "kept_indices.8"} <= outputs
    assert "kept_indices.7" not in outputs
    assert manifest["tokenizer"]["files"] and manifest["prompt"]["template"]["name"] == "vicuna_v1"
    assert manifest["tools"]["torch"].startswith("2.13")
    assert set(manifest["files"]) >= {"decoder.onnx", "decoder.ort.onnx", "decode.ort.onnx", "vision.onnx",
                                      "decoder.weights", "embed_tokens.npy", "tokenizer.model"}
    assert not {"prefill.onnx", "decode.onnx"} & set(manifest["files"])


def test_manifest_errors_name_the_field(art_gamma, tmp_path):
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(art_gamma, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for breaks, fragment in [(lambda d: d.update(schema_version=1), "schema_version 1 is not supported.*re-export"),
                             (lambda d: d["routing"].update(mode="dynamic"), "routing.mode"),
                             (lambda d: d["graphs"].pop("decoder"), "graphs.decoder missing"),
                             (lambda d: d["model"].update(hidden_size=-1), "model.hidden_size")]:
        broken = json.loads(json.dumps(data))
        breaks(broken)
        (dst / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(GammamodError, match=fragment):
            read_manifest(dst)
    (dst / "manifest.json").write_text("{")
    with pytest.raises(GammamodError, match="not valid JSON"):
        read_manifest(dst)


# --------------------------------------------------------------------------------------------
# options and bad input


def test_capacity_file_fractions_hold_for_any_span(tiny_gamma, tmp_path):
    from gammamod.export.exporter import read_capacity_file
    from gammamod.runtime.pipeline import Pipeline

    cap = tmp_path / "capacity.json"
    cap.write_text('{"3": 0.3, "5": 1.0}')
    overrides, span = read_capacity_file(cap)
    assert overrides == {3: {"fraction": "0.3"}, 5: {"fraction": "1.0"}} and span is None
    art = export_artifact(tiny_gamma, tmp_path / "art", ExportOptions(capacity=overrides, span_lengths=[40, 73]))
    assert art["routing"]["span_lengths"] == [40, 73]
    model = load_checkpoint(tiny_gamma)
    pipe = Pipeline.load(tmp_path / "art")
    for n in (20, 40, 73):
        want = {3: -(-3 * n // 10), 4: n - n // 2, 5: n, 6: n - n // 2}
        assert pipe.generator(1).kept_counts(n) == want
        x = _embeds(model, 1, n + 12)
        gen = pipe.generator(1)
        gen.prefill(x, routable=(0, n))
        assert {layer: idx.shape[1] for layer, idx in gen.kept.items()} == {k: 12 + v for k, v in want.items()}
    # the reference computes the same counts from the same file's fractions
    import torch

    from gammamod.export.generate import forward_language

    x = _embeds(model, 1, 52)
    ours = pipe.generator(1)
    logits = ours.prefill(x, routable=(0, 40))
    ref = forward_language(model, torch.from_numpy(x), routable=(0, 40), capacity=ours.kept_counts(40))
    assert rel_err(logits, ref.logits[:, -1]) < 1e-4


def test_capacity_file_counts_hold_for_their_one_span(tiny_gamma, tmp_path):
    from gammamod.export.exporter import read_capacity_file
    from gammamod.runtime.pipeline import Pipeline

    cap = tmp_path / "capacity.json"
    cap.write_text('{"span_length": 73, "3": 10, "5": 60}')
    overrides, span = read_capacity_file(cap)
    assert span == 73
    art = export_artifact(tiny_gamma, tmp_path / "art", ExportOptions(capacity=overrides, capacity_span=span))
    assert art["routing"]["span_lengths"] == [73] and art["routing"]["capacity"]["count_span_length"] == 73
    gen = Pipeline.load(tmp_path / "art").generator(1)
    assert gen.kept_counts(73) == {3: 10, 4: 37, 5: 60, 6: 37}
    x = _embeds(load_checkpoint(tiny_gamma), 1, 90)
    gen.prefill(x, routable=(0, 73))
    with pytest.raises(GammamodError, match="absolute count .* 73 tokens; this prompt's span has 60"):
        gen.prefill(x, routable=(0, 60))
    gen.prefill(x)  # no span: nothing routed, fine
    for text, fragment in (('{"3": 10}', "holds for one span length"), ('{"3": 1.5}', r"not in \(0, 1\]"),
                           ('{"span_length": 5, "3": 10}', "larger than the span"), ('{"x": 0.5}', "key 'x'"),
                           ('{"3": "half"}', "expected a fraction")):
        cap.write_text(text)
        with pytest.raises(GammamodError, match=fragment):
            read_capacity_file(cap)


def test_bad_capacity_and_existing_output(tiny_gamma, art_gamma, tmp_path):
    with pytest.raises(GammamodError, match="already exists"):
        export_artifact(tiny_gamma, art_gamma, ExportOptions())
    with pytest.raises(GammamodError, match="layer 1: not a MoD layer"):
        export_artifact(tiny_gamma, tmp_path / "x", ExportOptions(capacity={1: {"fraction": "0.5"}}))
    with pytest.raises(GammamodError, match="span length 5000"):
        export_artifact(tiny_gamma, tmp_path / "x", ExportOptions(span_lengths=[5000]))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_failed_export_leaves_no_directory(tiny_gamma, tmp_path, monkeypatch):
    from gammamod.export import exporter

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "write_weights", boom)
    with pytest.raises(OSError):
        export_artifact(tiny_gamma, tmp_path / "out", ExportOptions())
    assert list(tmp_path.iterdir()) == []


def test_language_model_only_checkpoint(tiny_gamma, tmp_path):
    """No tower, projector or tokenizer: decoder and embeddings export; the manifest says what is
    absent; the runtime takes embeddings only."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "lm"
    shutil.copytree(tiny_gamma, ckpt, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                   "clip-vision-tower"))
    state = {k: v for k, v in load_file(ckpt / "model.safetensors").items()
             if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    save_file(state, ckpt / "model.safetensors")
    manifest = export_artifact(ckpt, tmp_path / "art", ExportOptions(max_seq=256))
    assert sorted(manifest["absent"]) == ["tokenizer", "vision"] and "vision" not in manifest["graphs"]
    assert manifest["routing"]["span_lengths"] == []  # no tokenizer and no tower: no default prompt
    from gammamod.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "art")
    with pytest.raises(GammamodError, match="no tokenizer"):
        pipe.generate(None, ["hello"])
    gen = pipe.generator(1)
    x = np.random.default_rng(0).standard_normal((1, 50, 64)).astype(np.float32)
    gen.prefill(x, routable=(0, 40))
    assert gen.kept_counts(40)[3] == 20
    assert gen.kv_lengths()[:, 0].tolist() == [50, 50, 50, 30, 30, 30, 30, 50]
