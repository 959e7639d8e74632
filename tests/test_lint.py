"""check-onnx on hand-built graphs: each defect reported for the TensorRT version it concerns."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gammamod.engines.lint import lint_graph, lint_model_file
from gammamod.engines.targets import TARGETS


def model(nodes, inputs, outputs, initializers=(), opset=20, functions=(), ir_version=10, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                          functions=list(functions))
    m.ir_version = ir_version
    return m


def tensor(name, dtype=TensorProto.FLOAT, shape=("B", 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def errors(m, version="10.3"):
    return [f.message for f in lint_graph(m, TARGETS[version], "m.onnx") if f.severity == "error"]


def warnings_(m, version):
    return [f.message for f in lint_graph(m, TARGETS[version], "m.onnx") if f.severity == "warning"]


def const(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def good():
    return model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x")], [tensor("y")])


def test_a_plain_graph_passes_every_version():
    for version in TARGETS:
        assert lint_graph(good(), TARGETS[version], "m.onnx") == []


def test_unsupported_op():
    m = model([helper.make_node("Unique", ["x"], ["y"])], [tensor("x")], [tensor("y")])
    assert any("Unique is not supported" in e for e in errors(m))


def test_contrib_op_without_plugin_attributes():
    m = model([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")], [tensor("x")],
              [tensor("y")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    assert any("no plugin_namespace" in e for e in errors(m, "10.3"))
    assert errors(m, "11.x") == []  # 11 takes the namespace from the domain
    assert any("takes the namespace from the domain" in w for w in warnings_(m, "11.x"))


def test_topk_limits():
    k_big = const("k", [4000])
    m = model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [tensor("x")],
              [tensor("v"), tensor("i", TensorProto.INT64)], [k_big])
    assert any("K=4000" in e for e in errors(m))
    m = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)], [tensor("x")],
              [tensor("v"), tensor("i", TensorProto.INT64)], [const("k", [3])])
    assert any("sorted must be 1" in e for e in errors(m))
    # K computed from data: neither static nor checkable
    m = model([helper.make_node("ReduceMax", ["n"], ["k"], keepdims=1),
               helper.make_node("TopK", ["x", "k"], ["v", "i"])],
              [tensor("x"), tensor("n", TensorProto.INT64, ("B",))], [tensor("v"), tensor("i", TensorProto.INT64)])
    assert any("TopK K is computed from data" in e for e in errors(m))
    # K from a shape-tensor input (an INT32 [1] input, as the decoder's capacity.<l>): static, but its
    # profile values must stay below TensorRT's limit
    m = model([helper.make_node("Cast", ["cap"], ["k"], to=TensorProto.INT64),
               helper.make_node("TopK", ["x", "k"], ["v", "i"])],
              [tensor("x"), tensor("cap", TensorProto.INT32, (1,))], [tensor("v"), tensor("i", TensorProto.INT64)])
    assert errors(m) == [] and any("shape inputs" in w for w in warnings_(m, "10.3"))
    # a constant K below the limit is fine
    m = model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [tensor("x")],
              [tensor("v"), tensor("i", TensorProto.INT64)], [const("k", [3])])
    assert errors(m) == []


def test_data_dependent_shapes():
    m = model([helper.make_node("NonZero", ["x"], ["y"])], [tensor("x")], [tensor("y", TensorProto.INT64, (2, "N"))])
    assert any("NonZero has a data-dependent output shape" in e for e in errors(m))
    # a Reshape whose target shape is read from data (the values of a tensor of dynamic size)
    m = model([helper.make_node("Reshape", ["x", "s"], ["y"])],
              [tensor("x"), tensor("s", TensorProto.INT64, ("R",))], [tensor("y")])
    assert any("data-dependent shape" in e for e in errors(m))
    # ... but a small fixed-size integer input is a shape tensor (its values come with each profile)
    m = model([helper.make_node("Reshape", ["x", "s"], ["y"])],
              [tensor("x"), tensor("s", TensorProto.INT64, (2,))], [tensor("y")])
    assert errors(m) == []
    # ... and one whose target shape comes from Shape arithmetic is static
    m = model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
              [tensor("x")], [tensor("y")])
    assert errors(m) == []


def custom_node(**attrs):
    return helper.make_node("MoDGather", ["x", "i"], ["y"], domain="gammamod", **attrs)


def body():
    return helper.make_function("gammamod", "MoDGather", ["x", "i"], ["y"],
                                [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 20)])


def test_custom_node_needs_plugin_attributes():
    inputs = [tensor("x"), tensor("i", TensorProto.INT64)]
    m = model([custom_node()], inputs, [tensor("y")], extra_opsets=[helper.make_opsetid("gammamod", 1)])
    assert any("no plugin_namespace attribute" in e for e in errors(m, "10.x"))
    m = model([custom_node(plugin_namespace="gammamod", plugin_version="1")], inputs, [tensor("y")],
              extra_opsets=[helper.make_opsetid("gammamod", 1)])
    assert errors(m, "10.3") == []


def test_function_body_shadows_the_plugin_up_to_10_6():
    inputs = [tensor("x"), tensor("i", TensorProto.INT64)]
    m = model([custom_node(plugin_namespace="gammamod", plugin_version="1")], inputs, [tensor("y")],
              functions=[body()], extra_opsets=[helper.make_opsetid("gammamod", 1)])
    assert any("would inline it instead of using the plugin" in e for e in errors(m, "10.3"))
    assert errors(m, "11.x") == [] and any("dead weight" in w for w in warnings_(m, "11.x"))


def test_opset_ir_version_and_types():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x")], [tensor("y")], opset=23, ir_version=11)
    errs = errors(m, "10.3")
    assert any("opset 23 is above TensorRT 10.3's maximum (20)" in e for e in errs)
    assert any("IR version 11" in e for e in errs)
    assert errors(m, "11.x") == []
    m = model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", TensorProto.STRING)],
              [tensor("y", TensorProto.STRING)])
    assert any("does not support" in e for e in errors(m))


def test_cli_exit_codes(tmp_path):
    bad = model([helper.make_node("Unique", ["x"], ["y"])], [tensor("x")], [tensor("y")])
    onnx.save(bad, tmp_path / "bad.onnx")
    onnx.save(good(), tmp_path / "good.onnx")
    run = lambda p: subprocess.run([sys.executable, "-m", "gammamod", "check-onnx", str(p), "--tensorrt", "10.3"],
                                   capture_output=True, text=True)
    proc = run(tmp_path / "bad.onnx")
    assert proc.returncode == 1 and "Unique is not supported" in proc.stdout and "1 errors" in proc.stdout
    proc = run(tmp_path / "good.onnx")
    assert proc.returncode == 0 and "0 errors" in proc.stdout
    proc = run(tmp_path / "missing.onnx")
    assert proc.returncode == 2 and "no such ONNX file" in proc.stderr


def test_unreadable_file(tmp_path):
    from gammamod.errors import GammamodError

    (tmp_path / "x.onnx").write_text("nope")
    with pytest.raises(GammamodError, match="not a readable ONNX model"):
        lint_model_file(tmp_path / "x.onnx", "10.3")
