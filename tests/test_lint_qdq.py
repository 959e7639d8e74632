"""check-onnx --tensorrt on hand-built Q/DQ graphs: each of TensorRT's quantization rules broken once."""

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from gammamod.engines.lint import lint_graph
from gammamod.engines.targets import TARGETS

K, N = 16, 8


def _model(nodes, initializers, opset=20, inputs=None):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
                              initializer=initializers)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _init(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def int8_matmul(act_zero=0, weight_zero=0, act_scale_shape=(), weight_scale_len=N, axis=1, scale_dtype=np.float32,
                act_zero_type=np.int8):
    """x -> Q/DQ (per tensor) -> MatMul with a DQ'd int8 weight (per channel)."""
    w = np.ones((K, N), np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [_init("w", w, np.int8), _init("ws", np.full(weight_scale_len, 0.1), scale_dtype),
             _init("wz", np.full(weight_scale_len, weight_zero), np.int8),
             _init("xs", np.full(act_scale_shape, 0.05), scale_dtype), _init("xz", np.full(act_scale_shape, act_zero),
                                                                              act_zero_type)]
    return _model(nodes, inits)


def int4_matmul(block=4, n=N, scale_rows=None):
    w = np.ones((K, n), ml_dtypes.int4)
    rows = scale_rows if scale_rows is not None else -(-K // block)
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    return _model(nodes, [numpy_helper.from_array(w, "w"), _init("ws", np.full((rows, n), 0.1))], opset=21)


def errors(m, version="10.3"):
    return [f.message for f in lint_graph(m, TARGETS[version], "m.onnx") if f.severity == "error"]


def warnings_(m, version="10.3"):
    return [f.message for f in lint_graph(m, TARGETS[version], "m.onnx") if f.severity == "warning"]


def test_symmetric_int8_qdq_passes():
    for version in TARGETS:
        assert errors(int8_matmul(), version) == []
        assert warnings_(int8_matmul(), version) == []


def test_zero_points_must_be_zero():
    assert any("is not 0" in e for e in errors(int8_matmul(act_zero=3)))
    assert any("'wz' is not 0" in e for e in errors(int8_matmul(weight_zero=1)))


def test_per_axis_only_on_weights():
    found = errors(int8_matmul(act_scale_shape=(K,)))
    assert any("not a constant" in e and "per tensor only" in e for e in found)


def test_per_axis_scale_has_the_axis_size():
    assert any("expected one per channel" in e for e in errors(int8_matmul(weight_scale_len=N - 2)))
    assert any("expected one per channel" in e for e in errors(int8_matmul(axis=0)))  # K channels on axis 0, N given


def test_uint8_is_not_a_tensorrt_type():
    assert any("UINT8" in e for e in errors(int8_matmul(act_zero_type=np.uint8)))
    no_zero = int8_matmul()
    no_zero.graph.node[0].input.pop()  # Q without zero point and output_dtype: uint8 by ONNX's rule
    assert any("UINT8" in e for e in errors(no_zero))


def test_scales_must_be_constants():
    m = int8_matmul()
    m.graph.node.insert(0, helper.make_node("Identity", ["xs"], ["xs_live"]))
    m.graph.input.append(helper.make_tensor_value_info("s_in", TensorProto.FLOAT, []))
    m.graph.node[0].input[0] = "s_in"
    m.graph.node[1].input[1] = "xs_live"
    assert any("scale 'xs_live' is computed at run time" in e for e in errors(m))


def test_fp16_scales_are_a_warning():
    m = int8_matmul(scale_dtype=np.float16)
    assert errors(m) == []
    assert any("float32 scales" in w for w in warnings_(m))


def test_blocked_int4_weight_only():
    assert errors(int4_matmul()) == []
    # opset 21 for INT4 is a warning on TensorRT 10 (it reads INT4 weight-only Q/DQ), nothing on 11
    assert any("opset 21" in w for w in warnings_(int4_matmul(), "10.3"))
    assert errors(int4_matmul(), "11.x") == [] and not any("opset" in w for w in warnings_(int4_matmul(), "11.x"))


def test_blocked_scale_shape():
    assert any("expected [4, 8]" in e for e in errors(int4_matmul(scale_rows=3)))


def test_int4_last_dimension_even():
    assert any("odd last dimension" in e for e in errors(int4_matmul(n=7)))


def test_blocked_quantization_only_on_weights():
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], axis=1, block_size=4),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], axis=1, block_size=4),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    inits = [_init("xs", np.full((1, 4), 0.1)), _init("xz", np.zeros((1, 4)), np.int8), _init("w", np.ones((K, N)))]
    found = errors(_model(nodes, inits, opset=21))
    assert sum("blocked quantization on an activation" in e for e in found) == 2


def test_opset_21_without_quantization_stays_an_error():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_init("w", np.ones((K, N)))], opset=21)
    assert any("opset 21 is above" in e for e in errors(m))


def test_rules_reach_into_if_branches():
    """gamma-MoD's MoD layers sit in If branches; their weights are outer-scope initializers."""
    bad = int8_matmul(weight_zero=2)
    branch = helper.make_graph(list(bad.graph.node), "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])])
    other = helper.make_graph([helper.make_node("Constant", [], ["y2"], value=numpy_helper.from_array(
        np.zeros((1, N), np.float32)))], "else", [], [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, N])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    m = _model([node], list(bad.graph.initializer), inputs=inputs)
    assert any("'wz' is not 0" in e for e in errors(m))
