"""``gammamod triton-repo ARTIFACT OUT``: a model repository for NVIDIA Triton Inference Server.

Triton brings what one process cannot: dynamic batching, model instances, metrics, health
endpoints, and the ecosystem to scale out. The repository holds:

* ``gammamod_generate``: a Python-backend model, decoupled (one request, one response per token),
  that generates with gammamod's runtime: the same prompt template, routed spans, sampling and
  continuous batching as ``gammamod serve`` (``serve/triton_model.py``). The artifact sits in the
  model's directory (``artifact/``: links to the artifact's files, or copies with ``--copy``).
* ``gammamod_generate_once``: the same model, not decoupled: one response with the whole answer,
  for clients that cannot stream (Triton's HTTP ``infer``).
* ``vision_onnx`` and ``decoder_onnx``: the artifact's vision graph and portable decoder graph for
  Triton's ONNX Runtime backend (stateless: the caller keeps the KV cache).
* ``vision_trt`` and ``decoder_trt``: the engines for Triton's TensorRT backend, when the artifact
  has engines (``manifest["engines"]``); the plugin library rides along as the model's
  ``op_library_filename``.

Every model uses ``max_batch_size: 0``: the graphs' batch dimension is theirs (the decoder's
``span_length`` and ``capacity.<l>`` are shape tensors of shape [1], never batched), and the
generate model batches rows itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gammamod.errors import GammamodError

MARKER = ".gammamod-triton-repo"  # says the directory is ours (--force may replace it)
GENERATE, GENERATE_ONCE = "gammamod_generate", "gammamod_generate_once"

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}

# the generate models' tensors: (name, Triton type, dims, optional)
GENERATE_INPUTS = [("prompt", "TYPE_STRING", [1], False),  # the user's question (or a whole conversation, see below)
                   ("image", "TYPE_UINT8", [-1], True),  # an encoded image file (PNG, JPEG, ...)
                   ("system", "TYPE_STRING", [1], True),
                   ("max_tokens", "TYPE_INT32", [1], True),
                   ("temperature", "TYPE_FP32", [1], True),
                   ("top_p", "TYPE_FP32", [1], True),
                   ("top_k", "TYPE_INT32", [1], True),
                   ("repetition_penalty", "TYPE_FP32", [1], True),
                   ("seed", "TYPE_INT64", [1], True),
                   ("stop", "TYPE_STRING", [-1], True)]
GENERATE_OUTPUTS = [("text", "TYPE_STRING", [1]),  # streamed: the text this token completes; once: the answer
                    ("token_ids", "TYPE_INT64", [-1]),  # streamed: the one token; once: all of them
                    ("finish_reason", "TYPE_STRING", [1])]  # "" until the last response: stop | length


def _dims(shape) -> list[int]:
    """A manifest shape (symbolic names for dynamic dimensions) as Triton dims (-1 for dynamic)."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]{extra}\n  }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _graph_io(graph: dict, shape_tensors: bool) -> str:
    """``input``/``output`` of a graph as the manifest records it. ``shape_tensors``: the
    TensorRT backend must be told which inputs are shape tensors (INT32 [1]: span_length,
    capacity.<l>)."""
    inputs = []
    for t in graph["inputs"]:
        if t["dtype"] not in TRITON_TYPES:
            raise GammamodError(f"graph input {t['name']}: dtype {t['dtype']} has no Triton type")
        is_shape = t["role"] == "span_length" or t["role"].startswith("capacity.")
        extra = "\n    is_shape_tensor: true" if shape_tensors and is_shape else ""
        inputs.append(_tensor(t["name"], TRITON_TYPES[t["dtype"]], _dims(t["shape"]), extra))
    outputs = [_tensor(t["name"], TRITON_TYPES[t["dtype"]], _dims(t["shape"])) for t in graph["outputs"]]
    return _io("input", inputs) + _io("output", outputs)


def graph_config(name: str, graph: dict, backend: str, filename: str, instance: str = "KIND_CPU",
                 op_library: str | None = None) -> str:
    """config.pbtxt of one graph: ``backend`` "onnxruntime" or "tensorrt"."""
    platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    text = (f'name: "{name}"\nplatform: "{platform}"\nbackend: "{backend}"\nmax_batch_size: 0\n'
            f'default_model_filename: "{filename}"\n' + _graph_io(graph, backend == "tensorrt")
            + f"instance_group [\n  {{\n    count: 1\n    kind: {instance}\n  }}\n]\n")
    if op_library:
        text += f'model_operations {{\n  op_library_filename: [ "{op_library}" ]\n}}\n'
    return text


def generate_config(name: str, decoupled: bool, artifact: str, max_batch: int, device: str,
                    python_site: str = "") -> str:
    """config.pbtxt of a Python-backend generate model."""
    inputs = [_tensor(n, t, d, "\n    optional: true" if opt else "") for n, t, d, opt in GENERATE_INPUTS]
    outputs = [_tensor(n, t, d) for n, t, d in GENERATE_OUTPUTS]
    params = {"artifact": artifact, "max_batch": str(max_batch), "device": device, "python_site": python_site}
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            f"model_transaction_policy {{\n  decoupled: {'true' if decoupled else 'false'}\n}}\n"
            + _io("input", inputs) + _io("output", outputs)
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
            + "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n'
                      for k, v in params.items()))


MODEL_PY = '''"""Triton Python backend model: gammamod's runtime generating (written by gammamod triton-repo).
The implementation is gammamod.serve.triton_model, installed with gammamod in the Python that
Triton's Python backend runs. That interpreter is isolated (it ignores PYTHONPATH): the model's
parameter python_site names site-packages directories to add when gammamod is installed elsewhere."""

import json
import site


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        for directory in filter(None, params.get("python_site", {}).get("string_value", "").split(":")):
            site.addsitedir(directory)  # runs its .pth files too (editable installs)
        from gammamod.serve.triton_model import GenerateModel

        self.model = GenerateModel()
        self.model.initialize(args)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
'''


def _place(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def is_triton_repo(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def write_triton_repo(artifact, out, force: bool = False, copy: bool = False, max_batch: int | None = None,
                      device: str = "cpu", python_site=()) -> Path:
    """Write the repository at ``out`` (atomically); returns ``out``. ``python_site``: site-packages
    directories the generate models add before importing gammamod."""
    from gammamod.lifecycle import OutputDir
    from gammamod.manifest import read_manifest

    artifact, out = Path(artifact), Path(out)
    manifest = read_manifest(artifact)
    most = manifest["kv_cache"]["max_batch"]
    max_batch = max_batch or most
    if max_batch > most:
        raise GammamodError(f"--max-batch {max_batch}: the artifact takes at most {most} rows")
    if manifest.get("tokenizer") is None or "tokenizer" in manifest["absent"]:
        raise GammamodError(f"{artifact}: the artifact has no tokenizer; the generate model needs one")
    engines = manifest.get("engines") or {}
    written = []
    with OutputDir(out, force=force, inputs=[artifact], is_ours=is_triton_repo, what="Triton model repository") as tmp:
        (tmp / MARKER).write_text("a Triton model repository written by gammamod triton-repo\n")
        # the artifact, once, inside the streaming model's directory (Triton only reads numbered versions)
        store = tmp / GENERATE / "artifact"
        store.mkdir(parents=True)
        for name in sorted(p.name for p in artifact.iterdir() if p.is_file()):
            _place(artifact / name, store / name, copy)
        for name, decoupled in ((GENERATE, True), (GENERATE_ONCE, False)):
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "1" / "model.py").write_text(MODEL_PY)
            where = "artifact" if name == GENERATE else f"../{GENERATE}/artifact"
            (tmp / name / "config.pbtxt").write_text(generate_config(name, decoupled, where, max_batch, device,
                                                                              ":".join(str(Path(d).resolve()) for d in python_site)))
            written.append(name)
        for kind in ("vision", "decoder"):
            graph = manifest.graph(kind)
            if graph is None:
                continue
            model = tmp / f"{kind}_onnx"
            (model / "1").mkdir(parents=True)
            for name in [graph["file"], *graph.get("weights", [])]:
                _place(artifact / name, model / "1" / name, copy)
            (model / "config.pbtxt").write_text(graph_config(model.name, graph, "onnxruntime", graph["file"]))
            written.append(model.name)
            engine = (engines.get("files") or {}).get(kind)
            if engine:
                model = tmp / f"{kind}_trt"
                (model / "1").mkdir(parents=True)
                _place(artifact / engine, model / "1" / engine, copy)
                library = (engines.get("plugin") or {}).get("library")
                if library:
                    _place(artifact / library, model / "1" / Path(library).name, copy)
                (model / "config.pbtxt").write_text(graph_config(model.name, graph, "tensorrt", engine, "KIND_GPU",
                                                                 Path(library).name if library else None))
                written.append(model.name)
        (tmp / "README.md").write_text(_readme(artifact, written, bool(engines.get("files"))))
    return out


def _readme(artifact: Path, models: list[str], has_engines: bool) -> str:
    trt = ("" if has_engines else
           "\nThe artifact has no TensorRT engines, so there are no `vision_trt`/`decoder_trt` models: build the "
           "engines on the GPU server (`gammamod build`), then write the repository again there.\n")
    return f"""# Triton model repository for `{artifact.name}` (written by `gammamod triton-repo`)

Models: {", ".join(f"`{m}`" for m in models)}.

* `{GENERATE}` (Python backend, decoupled): inputs `prompt` (string), optional `image` (the bytes of
  an image file), `system`, `max_tokens`, `temperature`, `top_p`, `top_k`, `repetition_penalty`,
  `seed`, `stop`; one response per token (`text`, `token_ids`), the last with `finish_reason`.
  Stream it with gRPC (`tritonclient.grpc`'s `start_stream` / `async_stream_infer`).
* `{GENERATE_ONCE}`: the same, one response with the whole answer (HTTP or gRPC `infer`).
* `*_onnx`: the graphs for the ONNX Runtime backend; `*_trt`: engines for the TensorRT backend.
{trt}
Run it on a GPU server (the Python backend's Python needs gammamod: `pip install 'gammamod[serve]'`
in the environment the backend uses; set `device` to `cuda:0` in the generate models' parameters
for ONNX Runtime on the GPU):

    tritonserver --model-repository=/path/to/this/directory
"""
