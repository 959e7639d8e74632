"""Calibration ranges from real runs: the runtime generates on the calibration samples, and every
activation that feeds a quantized MatMul reports its largest magnitude.

Each decoder graph is calibrated on the inputs the runtime really gives it: ``decoder.ort.onnx``
on prefill chunks, ``decode.ort.onnx`` on single-token steps (ONNX Runtime's fused pass), and the
portable ``decoder.onnx`` on both (a second pass with ``fused=False``, as TensorRT runs it). The
runner each graph gets is a session of the graph plus ``calib.amax.*`` outputs
(:func:`gammamod.calib.qdq.with_amax_outputs`); the Generator drives it exactly as in serving
(same feeds, KV buffers appended in place), so no input is stored: each run folds into a running
maximum.
"""

from __future__ import annotations

import os

import numpy as np

from gammamod.errors import GammamodError

from .qdq import AMAX_PREFIX, with_amax_outputs

PASSES = (("fused", True, ("decoder_ort", "decode_ort")), ("portable", False, ("decoder",)))


class _AmaxRunner:
    """An ONNX Runtime runner of a graph with amax outputs: returns what the Generator asked for
    and folds the amax outputs into ``amax``."""

    def __init__(self, runner, keys: list[str], amax: dict[str, float]):
        self._runner, self._keys, self.amax = runner, keys, amax
        self.kind = runner.kind
        self.input_names = runner.input_names
        self.output_names = [n for n in runner.output_names if not n.startswith(AMAX_PREFIX)]
        self.runs = 0

    def run(self, feeds, outputs=None, into=None):
        wanted = list(outputs or self.output_names)
        outs = self._runner.run(feeds, wanted + [AMAX_PREFIX + k for k in self._keys], into=into)
        for key in self._keys:
            value = float(outs.pop(AMAX_PREFIX + key))
            if not np.isfinite(value):
                raise GammamodError(f"calibration: activation {key!r} of {self.kind} is not finite")
            self.amax[key] = max(self.amax.get(key, 0.0), value)
        self.runs += 1
        return outs


def calibration_ranges(manifest, samples, steps: int, threads: int | None = None, progress=None) -> dict:
    """{graph kind: {activation: amax}} over ``samples`` (prefill, then ``steps`` greedy decode
    steps each), for every decoder graph the artifact has."""
    import onnx
    import onnxruntime as ort

    from gammamod.runtime.backends.ort import OrtBackend, OrtRunner
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.runtime.tokenizer import Tokenizer

    stage = progress.stage if progress is not None else (lambda name, total=None: (lambda n=1: None))
    tokenizer = Tokenizer.from_dir(manifest.root) if "tokenizer" not in manifest["absent"] else None
    if tokenizer is None:
        raise GammamodError(f"{manifest.root}: the artifact has no tokenizer; calibration runs prompts through it")
    ranges: dict[str, dict[str, float]] = {}
    runs: dict[str, int] = {}
    for label, fused, kinds in PASSES:
        kinds = [k for k in kinds if k in manifest["graphs"]]
        if not kinds:
            continue
        backend = OrtBackend(manifest, device="cpu", threads=threads, fused=fused)
        pipe = Pipeline(manifest, backend, tokenizer)
        runners = {}
        for kind in kinds:
            model = onnx.load(str(manifest.path(manifest.graph(kind)["file"])), load_external_data=False)
            augmented, keys = with_amax_outputs(model)
            options = backend._options(kind)
            # the copy is never written: its external data is read from the artifact's directory
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(manifest.root))
            session = ort.InferenceSession(augmented.SerializeToString(), options, providers=backend.providers)
            ranges[kind] = {}
            runners[kind] = pipe._runners[kind] = _AmaxRunner(OrtRunner(kind, session, "cpu"), keys, ranges[kind])
        advance = stage(f"calibrating ({label} graphs)", len(samples))
        for sample in samples:
            _generate(pipe, sample, steps)
            advance()
        runs.update({kind: r.runs for kind, r in runners.items()})
    return {"amax": ranges, "runs": runs}


def _generate(pipe, sample, steps: int) -> None:
    from gammamod.runtime.image import load_image

    if sample.image is not None and "vision" in pipe.manifest["graphs"]:
        picture = load_image(sample.image) if isinstance(sample.image, (str, os.PathLike)) else sample.image
        prepared = pipe.prepare(None, [sample.prompt], features=pipe.encode_images([picture]))
    else:
        prepared = pipe.prepare(None, [sample.prompt])
    gen = pipe.generator(1)
    logits = gen.prefill(prepared.inputs_embeds, routable=prepared.routable, lengths=prepared.lengths)
    for _ in range(steps):
        logits = gen.decode(np.asarray(logits).argmax(-1))
