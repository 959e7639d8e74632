"""The plugin kernels' own source (engines/plugins/mod_kernels.h), run on the CPU through the
harness (gammamod.engines.kernels.run_cpu), against the eager ops of export/ops.py and, for a
few cases, ONNX Runtime running the nodes' function bodies."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from gammamod.engines.kernels import run_cpu
from gammamod.errors import GammamodError
from gammamod.export import ops
from mod_nodes import THRESHOLD, selection_model

# p-MoD's kept counts for Vicuna-7B's 24 MoD layers and a 576-token image (tests/test_recipes.py)
PMOD_7B_K = [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89] + [86] * 8
TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype({"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype])


def _torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == ml_dtypes.bfloat16:  # torch reads no ml_dtypes array: go through the bits
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _bits(values) -> np.ndarray:
    """The bit patterns of a numpy array or a torch tensor: copies must be exact."""
    if isinstance(values, torch.Tensor):
        return values.view(torch.int32 if values.element_size() == 4 else torch.int16).numpy()
    return values.view(np.int32 if values.itemsize == 4 else np.int16)


def _select_inputs(scores, starts, n, k):
    return {"scores": scores, "span_start": np.asarray(starts, dtype=np.int64),
            "span_length": np.array(n, dtype=np.int64), "capacity": np.array(k, dtype=np.int64)}


def _check_select(scores: np.ndarray, starts, n: int, k: int, threshold: float | None = None):
    """run_cpu against the eager op, for MoDSelect and (with a threshold) MoDSelectThreshold."""
    inputs = _select_inputs(scores, starts, n, k)
    eager_args = (_torch(scores), torch.as_tensor(np.asarray(starts, dtype=np.int64)), n, k)
    want = ops.mod_select(*eager_args).numpy()
    got = run_cpu("MoDSelect", inputs, {})
    assert got.dtype == np.int64 and got.shape == (scores.shape[0], scores.shape[1] - n + k)
    np.testing.assert_array_equal(got, want)
    if threshold is not None:
        want_kept, want_count = (t.numpy() for t in ops.mod_select_threshold(*eager_args, threshold))
        got_kept, got_count = run_cpu("MoDSelectThreshold", inputs, {"threshold": threshold})
        np.testing.assert_array_equal(got_kept, want_kept)
        np.testing.assert_array_equal(got_count, want_count)
    return got


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("batch,tokens,n,k", [
    (1, 1, 1, 1), (1, 7, 7, 3), (2, 40, 30, 0), (2, 40, 30, 30), (3, 40, 0, 0), (2, 100, 64, 1),
    (4, 300, 257, 129), (1, 1100, 1030, 600)])
def test_select_random(dtype, batch, tokens, n, k):
    rng = np.random.default_rng(batch * 1000 + tokens + n + k)
    scores = _cast(rng.standard_normal((batch, tokens)), dtype)
    starts = rng.integers(0, tokens - n + 1, size=batch)  # each row its own span start
    _check_select(scores, starts, n, k, threshold=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_select_ties_everywhere(dtype):
    """A saturated TanhNorm: every span token the same weight; the lowest indices win."""
    scores = _cast(np.full((3, 60), 0.2 * np.tanh(50.0) + 1.0), dtype)
    got = _check_select(scores, [0, 5, 10], 50, 20, threshold=1.0)
    assert list(got[1]) == list(range(0, 25)) + list(range(55, 60))
    # a few distinct values, each repeated: the radix select ends on a bin of equal keys
    rng = np.random.default_rng(1)
    _check_select(_cast(rng.integers(0, 3, size=(4, 200)) * 0.5, dtype), [0, 3, 17, 50], 150, 77, threshold=0.5)


@pytest.mark.parametrize("where", ["start", "end"])
def test_select_span_at_the_edges(where):
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((2, 90)).astype(np.float32)
    start = 0 if where == "start" else 90 - 70
    for k in (0, 1, 35, 70):
        _check_select(scores, [start, start], 70, k, threshold=0.0)


def test_select_bench_geometry_every_layer():
    """576 image tokens after a 43-token prefix in a 620-token prompt, the 7B k schedule, B = 2 rows
    with different scores, router weights from a TanhNorm (many near-ties in fp16)."""
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((2, 620)) * 3
    for dtype in ("float32", "float16", "bfloat16"):
        weights = _cast(0.2 * np.tanh(raw) + 1.0, dtype)
        for k in sorted(set(PMOD_7B_K)):
            _check_select(weights, [35, 43], 576, k, threshold=1.0)


def test_select_beyond_topk_limit():
    """T and k above TensorRT TopK's K < 3840, and a span longer than the keys the kernel keeps in
    shared memory (8192): the kernel reads the scores again on each pass."""
    rng = np.random.default_rng(4)
    scores = rng.standard_normal((2, 9000)).astype(np.float32)
    scores[:, 100:3000] = scores[:, 100:3000].round(1)  # ties across the bins of the last passes
    _check_select(scores, [0, 500], 8500, 5000, threshold=0.0)
    _check_select(scores[:1, :8192], [0], 8192, 8192)


def test_select_nan_and_signed_zero():
    """NaN above everything and -0 equal to +0, as the eager op's stable sort orders them."""
    scores = np.array([[0.0, -0.0, np.nan, 1.0, -0.0, 0.0, np.nan, -1.0]], dtype=np.float32)
    for k in range(9):
        _check_select(scores, [0], 8, k, threshold=0.0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("batch,tokens,width,hidden", [(1, 5, 5, 1), (2, 40, 17, 3), (3, 64, 0, 8), (2, 620, 486, 64),
                                                       (1, 30, 30, 4101)])
def test_gather_and_scatter(dtype, batch, tokens, width, hidden):
    rng = np.random.default_rng(tokens + width + hidden)
    x = _cast(rng.standard_normal((batch, tokens, hidden)), dtype)
    y = _cast(rng.standard_normal((batch, width, hidden)), dtype)
    kept = np.stack([np.sort(rng.permutation(tokens)[:width]) for _ in range(batch)]).astype(np.int64)
    kept = kept.reshape(batch, width)
    gathered = run_cpu("MoDGather", {"x": x, "kept": kept}, {})
    want = ops.mod_gather(_torch(x), torch.from_numpy(kept))
    assert gathered.dtype == x.dtype and gathered.shape == (batch, width, hidden)
    np.testing.assert_array_equal(_bits(gathered), _bits(want))
    scattered = run_cpu("MoDScatter", {"x": x, "kept": kept, "y": y}, {})
    want = ops.mod_scatter(_torch(x), torch.from_numpy(kept), _torch(y))
    np.testing.assert_array_equal(_bits(scattered), _bits(want))


def test_gather_unaligned_rows():
    """Row sizes that allow only 2- or 4-byte copy units, and a view that starts off 16 bytes."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2 * 9 * 7 + 1,)).astype(np.float16)
    x = base[1:].reshape(2, 9, 7)  # 14-byte rows, 2-byte aligned
    kept = np.array([[0, 4, 8], [1, 2, 3]])
    np.testing.assert_array_equal(run_cpu("MoDGather", {"x": x, "kept": kept}), x[np.arange(2)[:, None], kept])


def test_select_matches_the_onnx_function_bodies():
    """The kernels against ONNX Runtime running MoDSelect / MoDSelectThreshold's function bodies
    (what the exported graphs run on CPU), including ties and per-row spans."""
    import onnxruntime as ort

    def session(op_type):
        return ort.InferenceSession(selection_model(op_type).SerializeToString(), providers=["CPUExecutionProvider"])

    select = session("MoDSelect")
    threshold = session("MoDSelectThreshold")
    rng = np.random.default_rng(6)
    cases = [(rng.standard_normal((3, 50)), [0, 7, 20], 30, 11),
             (rng.integers(0, 3, size=(2, 80)) * 0.5, [10, 0], 70, 33),  # ties
             (np.full((2, 20), 0.7), [2, 4], 16, 16),
             (rng.standard_normal((1, 40)), [5], 30, 0)]
    for scores, starts, n, k in cases:
        inputs = _select_inputs(scores.astype(np.float32), starts, n, k)
        feeds = {"scores": inputs["scores"], "span_start": inputs["span_start"], "n": inputs["span_length"],
                 "k": inputs["capacity"]}
        np.testing.assert_array_equal(run_cpu("MoDSelect", inputs), select.run(None, feeds)[0])
        got = run_cpu("MoDSelectThreshold", inputs, {"threshold": THRESHOLD})
        for mine, theirs in zip(got, threshold.run(None, feeds)):
            np.testing.assert_array_equal(mine, theirs)


def test_plugin_attributes_are_accepted():
    scores = np.zeros((1, 4), dtype=np.float32)
    attrs = {"plugin_namespace": "gammamod", "plugin_version": "1", "tensorrt_plugin_shape_input_indices": [2, 3]}
    assert run_cpu("MoDSelect", _select_inputs(scores, [0], 4, 2), attrs).tolist() == [[0, 1]]


@pytest.mark.parametrize("op_type,inputs,attrs,message", [
    ("MoDTopK", {}, {}, "unknown node type"),
    ("MoDSelect", {"scores": np.zeros((1, 4), np.float32)}, {}, "expected inputs"),
    ("MoDSelect", _select_inputs(np.zeros((1, 4), np.float32), [0], 3, 4), {}, "'capacity': 4 is outside"),
    ("MoDSelect", _select_inputs(np.zeros((1, 4), np.float32), [0], 5, 1), {}, "'span_length': 5 is outside"),
    ("MoDSelect", _select_inputs(np.zeros((2, 4), np.float32), [0, 2], 3, 1), {}, "row 1 starts at 2"),
    ("MoDSelect", _select_inputs(np.zeros((1, 4), np.int32), [0], 3, 1), {}, "expected float32"),
    ("MoDSelect", _select_inputs(np.zeros((1, 4), np.float32), [0], 3, 1), {"k": 2}, "unknown attribute 'k'"),
    ("MoDSelectThreshold", _select_inputs(np.zeros((1, 4), np.float32), [0], 3, 1), {}, "'threshold'"),
    ("MoDGather", {"x": np.zeros((1, 4, 2), np.float32), "kept": np.array([[4]])}, {}, "must lie in [0, 4)"),
    ("MoDScatter", {"x": np.zeros((1, 4, 2), np.float32), "kept": np.array([[1, 1]]),
                    "y": np.zeros((1, 2, 2), np.float32)}, {}, "repeats an index"),
    ("MoDScatter", {"x": np.zeros((1, 4, 2), np.float32), "kept": np.array([[1]]),
                    "y": np.zeros((1, 1, 2), np.float16)}, {}, "input 'y'"),
])
def test_bad_input_is_one_line(op_type, inputs, attrs, message):
    with pytest.raises(GammamodError) as err:
        run_cpu(op_type, inputs, attrs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_kernels_keep_what_onnx_runtime_keeps(art_pmod, art_gamma, test_image_path):
    """The demo's step: the decoder on ONNX Runtime for two prompts about an image, and the kernels
    on every MoD layer's real router scores (B = 2)."""
    from gammamod.engines.demo import kernels_match_graph

    for artifact in (art_pmod, art_gamma):
        checks = kernels_match_graph(artifact, [test_image_path] * 2,
                                     ["What is in the picture?", "Describe the colours, please."])
        assert checks and all(c.batch == 2 and 0 < c.kept < c.span_length for c in checks)
        assert [c.node for c in checks if not c.identical] == []
