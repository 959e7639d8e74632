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
from parity import compare_generation, reference_inputs, rel_err

# --------------------------------------------------------------------------------------------
# numerical parity: logits, kept indices, KV lengths; prefill and 8 decode steps


@pytest.mark.parametrize("rows", [1, 2])
def test_gamma_onnx_equals_pytorch_static(tiny_gamma, art_gamma, prompts_and_image, rows):
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_gamma)
    batch = reference_inputs(model, tiny_gamma, questions[:rows], image)
    if rows == 2:
        assert batch.lengths[0] != batch.lengths[1]  # right padding is exercised
    compare_generation(model, art_gamma, batch)


@pytest.mark.parametrize("recipe", ["gamma", "pmod"])
def test_portable_decode_graph_equals_pytorch_static(recipe, request, prompts_and_image):
    """The same comparison through decode.onnx (standard ops only: what TensorRT builds from)
    rather than ONNX Runtime's fused decode.ort.onnx."""
    questions, image = prompts_and_image
    ckpt, art = request.getfixturevalue(f"tiny_{recipe}"), request.getfixturevalue(f"art_{recipe}")
    model = load_checkpoint(ckpt)
    compare_generation(model, art, reference_inputs(model, ckpt, questions, image), fused=False)


def test_fused_decode_graph_is_onnx_runtimes_own(art_gamma):
    manifest = read_manifest(art_gamma)
    entry = manifest["graphs"]["decode_ort"]
    assert entry["backend"] == "ort" and entry["kv"] == "in-place" and entry["file"] == "decode.ort.onnx"
    model = onnx.load(str(manifest.path(entry["file"])), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == manifest["model"]["num_layers"]
    assert not [n for n in model.graph.node if n.domain == DOMAIN]  # decode routes nothing
    assert "decode_ort" not in manifest["tensorrt"]["targets"]["10.3"]  # TensorRT builds the portable graphs


@pytest.mark.parametrize("rows", [1, 2])
def test_pmod_onnx_equals_pytorch_static(tiny_pmod, art_pmod, prompts_and_image, rows):
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_pmod)
    batch = reference_inputs(model, tiny_pmod, questions[:rows], image)
    compare_generation(model, art_pmod, batch)


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
    assert manifest["routing"]["mode"] == "dense" and manifest.capacities == {}
    for kind in ("prefill", "decode"):
        graph = onnx.load(str(manifest.path(f"{kind}.onnx")), load_external_data=False).graph
        assert not [n for n in graph.node if n.domain == DOMAIN]


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


def _graphs(artifact):
    manifest = read_manifest(artifact)
    for kind, g in manifest["graphs"].items():
        yield kind, onnx.load(str(manifest.path(g["file"])), load_external_data=False)


@pytest.mark.parametrize("fixture", ["art_gamma", "art_pmod"])
def test_no_data_dependent_shapes_and_constant_topk(fixture, request):
    from gammamod.engines.lint import lint_graph
    from gammamod.engines.targets import TARGETS

    for kind, model in _graphs(request.getfixturevalue(fixture)):
        bodies = [n for f in model.functions for n in f.node]
        every = list(model.graph.node) + bodies
        assert not [n.op_type for n in every if n.op_type in ("NonZero", "Unique", "Compress", "NonMaxSuppression")]
        # every TopK (inside MoDSelect's body) takes K from a Constant
        for f in model.functions:
            consts = {o for n in f.node if n.op_type == "Constant" for o in n.output}
            reshaped = {n.output[0]: n.input[0] for n in f.node if n.op_type == "Reshape"}
            for n in f.node:
                if n.op_type == "TopK":
                    assert reshaped.get(n.input[1], n.input[1]) in consts
        # and the static-shape analysis of the linter finds no data-dependent shape in the graph
        errors = [f for f in lint_graph(model, TARGETS["11.x"], kind) if f.severity == "error"]
        assert errors == [], errors


def test_custom_nodes_carry_plugin_attributes_and_bodies(art_gamma):
    manifest = read_manifest(art_gamma)
    model = onnx.load(str(manifest.path("prefill.onnx")), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in custom} == set(NODE_TYPES)
    assert len(custom) == 3 * len(manifest["recipe"]["mod_layers"])
    for n in custom:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() and attrs["plugin_version"] == b"1"
    select = [n for n in custom if n.op_type == "MoDSelect"][0]
    k = {a.name: a.i for a in select.attribute if a.name in ("start", "length", "k")}
    assert k == {"start": 0, "length": manifest["routing"]["routable_span"][1], "k": manifest.capacities[3]}
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, t) for t in NODE_TYPES}


def _select_session(start: int, length: int, k: int):
    """One MoDSelect node run by ONNX Runtime through its function body."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gammamod.export.ops import function_protos

    node = helper.make_node("MoDSelect", ["scores"], ["kept"], domain=DOMAIN, start=start, length=length, k=k)
    graph = helper.make_graph([node], "select", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info("kept", TensorProto.INT64, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=function_protos(20), ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_mod_select_breaks_ties_by_lower_index_everywhere():
    """A saturated TanhNorm gives many exactly equal weights: eager PyTorch and the ONNX body
    must keep the same tokens (ONNX TopK: the lower index first)."""
    import torch

    from gammamod.export.ops import mod_select

    # by hand: span [1, 5) = [0.5, 1.2, 1.2, 1.2], k = 2 -> the first two 1.2s (positions 2, 3)
    scores = np.array([[9.0, 0.5, 1.2, 1.2, 1.2, 7.0]], np.float32)
    expected = [[0, 2, 3, 5]]
    assert mod_select(torch.from_numpy(scores), 1, 4, 2).tolist() == expected
    assert _select_session(1, 4, 2).run(None, {"scores": scores})[0].tolist() == expected
    # the bench model's geometry: 576 routable tokens, hundreds of them tied
    rng = np.random.default_rng(0)
    scores = (np.tanh(rng.normal(0, 8, (2, 619))) * 0.2 + 1).astype(np.float32)
    assert 619 - len(np.unique(scores[0])) > 200
    for k in (486, 161, 86):
        ours = mod_select(torch.from_numpy(scores), 33, 576, k).numpy()
        np.testing.assert_array_equal(_select_session(33, 576, k).run(None, {"scores": scores})[0], ours)


def test_tensorrt_copies_strip_bodies_and_share_weights(art_gamma):
    from gammamod.engines.lint import lint_artifact

    manifest = read_manifest(art_gamma)
    copies = manifest["tensorrt"]["targets"]["10.3"]
    for kind in ("vision", "prefill", "decode"):
        model = onnx.load(str(manifest.path(copies[kind])), load_external_data=False)
        assert not model.functions and model.ir_version <= 10
        locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
        assert locations <= {"decoder.weights", "vision.weights"}
    findings, files = lint_artifact(art_gamma, "10.3")
    assert files == [copies[k] for k in ("vision", "prefill", "decode")]
    assert [f for f in findings if f.severity == "error"] == []


def test_both_decoder_graphs_share_one_weights_file(art_pmod):
    manifest = read_manifest(art_pmod)
    size = manifest["files"]["decoder.weights"]["bytes"]
    seen = set()
    for kind in ("prefill", "decode"):
        model = onnx.load(str(manifest.path(f"{kind}.onnx")), load_external_data=False)
        for init in model.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            if ext:
                assert ext["location"] == "decoder.weights" and int(ext["offset"]) + int(ext["length"]) <= size
                seen.add((init.name, ext["offset"]))
    # the same tensor sits at one offset for both graphs: weights written once
    names = [n for n, _ in seen]
    assert len(names) == len(set(names))
    # MatMul weights are stored transposed so no runtime transposes (copies) them at load
    assert any(n.endswith(".T") for n in names)


# --------------------------------------------------------------------------------------------
# the manifest


def test_manifest_describes_the_artifact(art_pmod, tiny_pmod):
    manifest = read_manifest(art_pmod)
    manifest.verify_files()
    assert manifest["schema_version"] == 1 and manifest["recipe"]["name"] == "p-mod"
    model = load_checkpoint(tiny_pmod)
    start, length = manifest["routing"]["routable_span"]
    assert length == model.vision.image_tokens == manifest["image"]["tokens"]
    assert manifest.capacities == model.recipe.capacities(length)
    entries = {e["layer"]: e["prefill"] for e in manifest["kv_cache"]["entries"]}
    assert entries[0] == "seq_len" and entries[31] == f"seq_len - {length - manifest.capacities[31]}"
    roles = {i["role"] for i in manifest["graphs"]["decode"]["inputs"]}
    assert {"inputs_embeds", "seq_lengths", "past_length", "past_key.3", "kv_length.31"} <= roles
    outputs = {o["role"] for o in manifest["graphs"]["prefill"]["outputs"]}
    assert {"logits", "present_key.0", "kept_indices.8"} <= outputs and "kept_indices.7" not in outputs
    assert manifest["tokenizer"]["files"] and manifest["prompt"]["template"]["name"] == "vicuna_v1"
    assert manifest["tools"]["torch"].startswith("2.13")
    assert set(manifest["files"]) >= {"prefill.onnx", "decode.onnx", "vision.onnx", "decoder.weights",
                                      "embed_tokens.npy", "tokenizer.model"}


def test_manifest_errors_name_the_field(art_gamma, tmp_path):
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(art_gamma, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for breaks, fragment in [(lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
                             (lambda d: d["routing"].update(mode="dynamic"), "routing.mode"),
                             (lambda d: d["graphs"].pop("decode"), "graphs.decode missing"),
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


def test_capacity_file_sets_kept_counts(tiny_gamma, tmp_path, prompts_and_image):
    cap = tmp_path / "capacity.json"
    cap.write_text(json.dumps({"3": 10, "5": 60}))
    from gammamod.export.exporter import read_capacity_file

    art = export_artifact(tiny_gamma, tmp_path / "art", ExportOptions(capacity=read_capacity_file(cap),
                                                                      skip_ratio=None))
    assert art.capacities == {3: 10, 4: 37, 5: 60, 6: 37}
    questions, image = prompts_and_image
    model = load_checkpoint(tiny_gamma)
    batch = reference_inputs(model, tiny_gamma, questions[:1], image)
    from gammamod.export import generate_from_embeds
    from gammamod.runtime.pipeline import Pipeline

    gen = Pipeline.load(tmp_path / "art").generator(1)
    logits = gen.prefill(batch.inputs_embeds.numpy(), routable=batch.routable, lengths=batch.lengths.numpy())
    ref = generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, max_new_tokens=1,
                               capacity={3: 10, 5: 60}, return_logits=True)
    assert rel_err(logits, ref.logits[:, 0]) < 1e-4
    t = int(batch.lengths[0])
    assert gen.kv_lengths()[:, 0].tolist() == [t, t, t, t - 63, t - 36, t - 13, t - 36, t]


def test_bad_capacity_and_existing_output(tiny_gamma, art_gamma, tmp_path):
    from gammamod.export.exporter import read_capacity_file

    with pytest.raises(GammamodError, match="already exists"):
        export_artifact(tiny_gamma, art_gamma, ExportOptions())
    with pytest.raises(GammamodError, match="layer 1: not a MoD layer"):
        export_artifact(tiny_gamma, tmp_path / "x", ExportOptions(capacity={1: 5}))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    bad = tmp_path / "cap.json"
    bad.write_text('{"3": "ten"}')
    with pytest.raises(GammamodError, match="cap.json: entry '3'"):
        read_capacity_file(bad)


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
    with pytest.raises(GammamodError, match="cannot derive the routable span"):
        export_artifact(ckpt, tmp_path / "art", ExportOptions())
    manifest = export_artifact(ckpt, tmp_path / "art", ExportOptions(routable=(0, 40), max_seq=256))
    assert sorted(manifest["absent"]) == ["tokenizer", "vision"] and "vision" not in manifest["graphs"]
    from gammamod.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tmp_path / "art")
    with pytest.raises(GammamodError, match="no tokenizer"):
        pipe.generate(None, ["hello"])
    gen = pipe.generator(1)
    x = np.random.default_rng(0).standard_normal((1, 50, 64)).astype(np.float32)
    gen.prefill(x, routable=(0, 40))
    assert manifest.capacities[3] == 20
    assert gen.kv_lengths()[:, 0].tolist() == [50, 50, 50, 30, 30, 30, 30, 50]
