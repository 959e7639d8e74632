"""The engines stage's demo step: the plugin kernels' CPU path on an artifact's real router scores.

The artifact's portable decoder (``decoder.onnx``, the graph TensorRT builds from) runs on ONNX
Runtime through the runtime's own Generator, for real prompts about an image, with every
selection node's inputs and outputs (the router scores as they enter ``MoDSelect``, the row starts, the span
length and kept count) added as graph outputs. The kernels' CPU path (:func:`run_cpu`) then
selects from those scores, and its kept tokens are compared with the graph's ``kept_indices``:
the plugin's kernels keep the tokens ONNX Runtime keeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

SELECT_NODES = ("MoDSelect", "MoDSelectThreshold")


@dataclass
class LayerCheck:
    node: str  # the kept-indices tensor the node writes (kept_indices.<layer>)
    op_type: str
    batch: int
    tokens: int
    span_length: int
    kept: int
    identical: bool


def _select_nodes(model):
    from gammamod.export.ops import DOMAIN

    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in SELECT_NODES]


class _Recorder:
    """A Runner that keeps the feeds and outputs of its last run."""

    def __init__(self, runner):
        self.runner = runner
        self.kind = runner.kind
        self.input_names = runner.input_names
        self.output_names = runner.output_names
        self.feeds: dict = {}
        self.outputs: dict = {}

    def run(self, feeds, outputs=None):
        self.feeds = dict(feeds)
        self.outputs = self.runner.run(feeds, outputs)
        return self.outputs


def _scores_session(manifest):
    """ONNX Runtime's session over the portable decoder with the selection nodes' inputs and
    outputs as graph outputs. Built in memory, weights included: graphs up to 2 GiB."""
    import onnx
    import onnxruntime as ort

    from gammamod.errors import GammamodError

    graph = manifest.graph("decoder")
    weights = sum(manifest.path(f).stat().st_size for f in graph.get("weights", []))
    if weights > 2**31 - 2**26:
        raise GammamodError(f"{manifest.root}: the decoder's {weights / 2**30:.1f} GiB of weights do not fit one "
                            "in-memory ONNX graph; check the kernels on a smaller artifact")
    model = onnx.load(str(manifest.path(graph["file"])))
    have = {o.name for o in model.graph.output}
    for node in _select_nodes(model):
        for name in list(node.input) + list(node.output):
            if name and name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # quick to open
    return model, ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernels_match_graph(artifact: str | os.PathLike, images, questions: list[str]) -> list[LayerCheck]:
    """Prefill ``questions`` about ``images`` (one each) through the artifact's portable decoder
    on ONNX Runtime; for every selection node, run the kernels' CPU path on the scores the node
    received and compare with the node's output."""
    import onnx

    from gammamod.manifest import read_manifest
    from gammamod.runtime.backends.ort import OrtRunner
    from gammamod.runtime.generator import Generator
    from gammamod.runtime.pipeline import Pipeline, make_backend
    from gammamod.runtime.tokenizer import Tokenizer

    from .kernels import run_cpu

    manifest = read_manifest(artifact)  # its decoder session is the one below: none opened here
    pipe = Pipeline(manifest, make_backend("ort", manifest, fused=False), Tokenizer.from_dir(manifest.root))
    prepared = pipe.prepare(images, questions)
    model, session = _scores_session(pipe.manifest)
    recorder = _Recorder(OrtRunner("decoder", session, "cpu"))

    def runners(kind):
        return recorder if kind == "decoder" else pipe.runner(kind)

    gen = Generator(pipe.manifest, pipe.backend, runners, pipe.embeddings, len(questions))
    gen.prefill(prepared.inputs_embeds, routable=prepared.routable, lengths=prepared.lengths)
    values = {**recorder.feeds, **recorder.outputs}
    checks = []
    for node in _select_nodes(model):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = dict(zip(("scores", "span_start", "span_length", "capacity"), (values[n] for n in node.input[:4])))
        got = run_cpu(node.op_type, inputs, attrs)
        want = [values[n] for n in node.output]
        same = all(np.array_equal(g, w) for g, w in zip(got if isinstance(got, tuple) else (got,), want))
        scores = inputs["scores"]
        checks.append(LayerCheck(node.output[0], node.op_type, scores.shape[0], scores.shape[1],
                                 int(inputs["span_length"]), int(inputs["capacity"]), same))
    return checks


def kernels_step(artifacts: dict, image, questions: list[str], title: str) -> bool:
    """The demo's step: for each artifact, two prompts about ``image`` through its portable decoder on
    ONNX Runtime, and the plugin kernels' CPU path on every MoD layer's real router scores. Prints
    one row per artifact; True when the kernels keep exactly the tokens ONNX Runtime keeps."""
    from rich.table import Table

    from gammamod.console import console

    table = Table(title=title)
    for col in ("artifact", "selection nodes", "batch x tokens", "span", "kept per layer", "kept tokens"):
        table.add_column(col, overflow="fold")
    every = True
    for name, artifact in artifacts.items():
        checks = kernels_match_graph(artifact, [image] * len(questions), questions)
        same = all(c.identical for c in checks)
        every = every and same
        kept = sorted({c.kept for c in checks}, reverse=True)
        kinds = sorted({c.op_type for c in checks})
        table.add_row(name, f"{len(checks)} ({', '.join(kinds)})" if checks else "0 (a dense artifact)",
                      f"{checks[0].batch} x {checks[0].tokens}" if checks else "-",
                      str(checks[0].span_length) if checks else "-", " ".join(map(str, kept)) or "-",
                      "identical to ONNX Runtime" if same else
                      "DIFFER in " + ", ".join(c.node for c in checks if not c.identical))
    console.print(table)
    return every
