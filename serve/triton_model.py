"""The generate model of a Triton repository (``gammamod triton-repo``), for Triton's Python backend.

Each model directory's ``1/model.py`` hands Triton's calls to :class:`GenerateModel`, so the
repository carries no copy of our logic. It loads the artifact with the runtime (``Pipeline``)
and runs a :class:`ContinuousBatcher`, exactly as ``gammamod serve`` does: every request is
prefilled alone and joins the running batch at the next decode step. Decoupled (the streaming
model): one response per token, the last one flagged final and carrying ``finish_reason``. Not
decoupled: ``execute`` waits for its requests' answers and returns one response each.

``triton_python_backend_utils`` exists only inside Triton's Python backend; it is imported when
Triton starts the model.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np

DEFAULT_MAX_TOKENS = 256


def _scalar(pb_utils, request, name: str, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise _bad(f"input {name}: expected one value, got {value.size}")
    value = value[0]
    return value.decode() if isinstance(value, bytes) else value.item()


def _bad(message: str):
    from gammamod.errors import GammamodError

    return GammamodError(message)


class GenerateModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from gammamod.runtime.pipeline import Pipeline
        from gammamod.serve.batching import ContinuousBatcher

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        artifact = Path(args["model_repository"]) / params.get("artifact", "artifact")
        self.pipe = Pipeline.load(artifact, device=params.get("device", "cpu"))
        self.batcher = ContinuousBatcher(self.pipe, int(params.get("max_batch", 1)))

    # -- a request into a job ---------------------------------------------------------------------------
    def _job(self, request, on_text, on_done, on_error):
        from gammamod.runtime.image import load_image
        from gammamod.serve.batching import Job, Sampling

        pb = self.pb
        prompt = _scalar(pb, request, "prompt")
        if not prompt:
            raise _bad("input prompt: expected the question as one string")
        image = pb.get_input_tensor_by_name(request, "image")
        pictures = None
        if image is not None:
            data = image.as_numpy().astype(np.uint8).tobytes()
            pictures = [load_image(io.BytesIO(data), where="input image")]
        stop = pb.get_input_tensor_by_name(request, "stop")
        sampling = Sampling(max_tokens=int(_scalar(pb, request, "max_tokens", DEFAULT_MAX_TOKENS)),
                            temperature=float(_scalar(pb, request, "temperature", 0.0)),
                            top_p=float(_scalar(pb, request, "top_p", 1.0)),
                            top_k=int(_scalar(pb, request, "top_k", 0)),
                            repetition_penalty=float(_scalar(pb, request, "repetition_penalty", 1.0)),
                            stop=[s.decode() for s in stop.as_numpy().reshape(-1)] if stop is not None else None,
                            seed=_scalar(pb, request, "seed"))
        if sampling.max_tokens < 1:
            raise _bad("input max_tokens: expected at least 1")
        prepared = self.pipe.prepare(pictures, [prompt], system=_scalar(pb, request, "system"))
        return Job(prepared, sampling, on_text=on_text, on_done=on_done, on_error=on_error)

    def _response(self, text: str, tokens, finish: str):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text", np.array([text.encode()], dtype=object)),
            pb.Tensor("token_ids", np.asarray(tokens, dtype=np.int64).reshape(-1)),
            pb.Tensor("finish_reason", np.array([finish.encode()], dtype=object))])

    def _error(self, message: str):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))

    # -- Triton's calls --------------------------------------------------------------------------------
    def execute(self, requests):
        from gammamod.serve.app import FINISH

        if self.decoupled:
            for request in requests:
                self._stream(request, FINISH)
            return None
        answers: list = [None] * len(requests)
        done = [threading.Event() for _ in requests]

        def finish(i, response):
            answers[i] = response
            done[i].set()

        for i, request in enumerate(requests):
            try:
                job = self._job(request, on_text=lambda text, token: None,
                                on_done=lambda r, i=i: finish(i, self._response(r.text, r.tokens, FINISH[r.finish_reason])),
                                on_error=lambda message, i=i: finish(i, self._error(message)))
                self.batcher.submit(job)
            except Exception as e:  # noqa: BLE001 - one request's bad input is its own error response
                finish(i, self._error(_one_line(e)))
        for event in done:
            event.wait()
        return answers

    def _stream(self, request, finish_names) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_done(result):
            sender.send(self._response("", [], finish_names[result.finish_reason]), flags=final)

        try:
            job = self._job(request, on_text=lambda text, token: sender.send(self._response(text, [token], "")),
                            on_done=on_done, on_error=lambda message: sender.send(self._error(message), flags=final))
            self.batcher.submit(job)
        except Exception as e:  # noqa: BLE001
            sender.send(self._error(_one_line(e)), flags=final)

    def finalize(self):
        self.batcher.close()


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
