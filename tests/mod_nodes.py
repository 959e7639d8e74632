"""One MoD selection node as a whole ONNX model, for the kernel and plugin tests."""

import onnx
from onnx import TensorProto, helper

from gammamod.export import ops

THRESHOLD = 0.5


def selection_model(op_type: str) -> onnx.ModelProto:
    """scores [B, T], span_start [B], n, k -> kept (and count): the node as the exporter writes it
    (plugin attributes, MoDSelectThreshold's threshold THRESHOLD), with its function bodies."""
    outputs = ["kept"] + (["count"] if op_type == "MoDSelectThreshold" else [])
    extra = {"threshold": THRESHOLD} if op_type == "MoDSelectThreshold" else {}
    node = helper.make_node(op_type, ["scores", "span_start", "n", "k"], outputs, domain=ops.DOMAIN,
                            plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.PLUGIN_VERSION,
                            tensorrt_plugin_shape_input_indices=ops.SHAPE_INPUTS, **extra)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "T"]),
         helper.make_tensor_value_info("span_start", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(o, TensorProto.INT64, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 10
    ops.attach_functions(model)
    return model
