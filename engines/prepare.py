"""The ONNX copies TensorRT parses, next to the ONNX Runtime graphs of an artifact.

Per TensorRT version: the MoD ops' function bodies are stripped (the safe rule: from 10.0 to
10.6 a local function named like the plugin is used instead of it, and a plugin-bound copy
needs none), the IR version is lowered to what that version's parser reads, and the copy is
linted. The copies share the artifact's weights file: no weight is written twice.
"""

from __future__ import annotations

import onnx

from gammamod.errors import GammamodError
from gammamod.export import ops

from .lint import lint_graph
from .targets import target


def tensorrt_copy(model: onnx.ModelProto, version: str) -> onnx.ModelProto:
    tgt = target(version)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ops.strip_functions(copy)
    if copy.ir_version > tgt.max_ir_version:
        copy.ir_version = tgt.max_ir_version  # our graphs use no feature of later IR versions
    return copy


def write_tensorrt_copies(manifest, versions) -> None:
    """Write ``<graph>.trt<version>.onnx`` for each version into the manifest's directory and
    record them under ``tensorrt.targets``; fail on lint errors."""
    for version in versions:
        tgt = target(version)
        entry = {}
        for kind, graph in manifest["graphs"].items():
            if graph.get("backend") == "ort":
                continue  # ONNX Runtime's own variant: TensorRT builds from the portable graphs
            model = onnx.load(str(manifest.path(graph["file"])), load_external_data=False)
            copy = tensorrt_copy(model, version)
            name = graph["file"].replace(".onnx", f".trt{version}.onnx")
            errors = [f for f in lint_graph(copy, tgt, name) if f.severity == "error"]
            if errors:
                raise GammamodError(f"the {kind} graph would not parse with TensorRT {version}: {errors[0]} "
                                    f"({len(errors)} errors in all; run 'gammamod check-onnx')")
            onnx.save(copy, str(manifest.path(name)))
            entry[kind] = name
        entry["notes"] = tgt.notes
        manifest.data["tensorrt"]["targets"][version] = entry
