"""Polygraphy runners over the PyTorch reference and the runtime's backends.

Polygraphy's ``Comparator`` runs every runner over the same feeds and compares outputs by name, so
the reference and any backend are compared tensor by tensor with its statistics. A decoder
runner is stateful: a sequence of feeds is one prefill then decode steps, each runner keeping its
own KV cache across the sequence. Every feed holds ``inputs_embeds``, ``seq_lengths`` and
``token_ids`` (Polygraphy wants each declared input in each feed): a prefill feed has the prompt
embeddings, a decode step an empty [B, 0, H] ``inputs_embeds`` and the tokens to feed. Outputs
per step: ``logits`` [B, V], ``kv_lengths`` [layers, B], and after the prefill ``kept_indices.<l>``.
"""


from __future__ import annotations

import time

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from gammamod.export.generate import forward_language
from gammamod.export.model import Step


def prefill_feed(inputs_embeds: np.ndarray, lengths: np.ndarray) -> dict:
    return {"inputs_embeds": inputs_embeds, "seq_lengths": lengths,
            "token_ids": np.zeros(inputs_embeds.shape[0], np.int64)}


def decode_feed(token_ids: np.ndarray, hidden: int) -> dict:
    ids = np.asarray(token_ids, np.int64)
    return {"inputs_embeds": np.zeros((ids.shape[0], 0, hidden), np.float32),
            "seq_lengths": np.ones(ids.shape[0], np.int64), "token_ids": ids}


class _Timed(BaseRunner):
    def _timed(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.inference_time = time.perf_counter() - t0
        return out

    def deactivate_impl(self):
        pass


class TorchDecoderRunner(_Timed):
    """The PyTorch reference (static or dense routing) over a prefill + decode sequence."""

    def __init__(self, model, routable, routing: str, name: str = "pytorch"):
        super().__init__(name=name)
        self.model, self.routable, self.routing = model, routable, routing
        self.cache = None

    def activate_impl(self):
        self.cache = None

    def get_input_metadata_impl(self):
        return TensorMetadata().add("inputs_embeds", np.float32, (None, None, self.model.config.hidden_size)) \
            .add("seq_lengths", np.int64, (None,)).add("token_ids", np.int64, (None,))

    def infer_impl(self, feed_dict):
        return self._timed(lambda: self._step(feed_dict))

    @torch.inference_mode()
    def _step(self, feed):
        model = self.model
        if feed["inputs_embeds"].shape[1] > 0:
            embeds = torch.from_numpy(np.asarray(feed["inputs_embeds"], np.float32))
            out = forward_language(model, embeds, routable=self.routable, routing=self.routing,
                                   lengths=torch.from_numpy(feed["seq_lengths"]))
            self.cache = out.cache
            last = out.cache.seen - 1
            logits = out.logits[torch.arange(embeds.shape[0]), last]
            result = {f"kept_indices.{layer}": idx.numpy() for layer, idx in out.kept.items()}
        else:
            ids = torch.from_numpy(np.asarray(feed["token_ids"], np.int64))
            cache = self.cache
            step = Step(routing=self.routing, kv=cache, past_length=cache.seen.clone(),
                        valid=torch.ones(ids.shape[0], dtype=torch.long))
            hidden = model.forward_chunk(model.embed(ids[:, None]).to(model.dtype), step)
            cache.seen += 1
            logits = model.lm_head(hidden[:, -1]).float()
            result = {}
        result["logits"] = logits.float().numpy()
        result["kv_lengths"] = self.cache.lengths.numpy().copy()
        return result


class RuntimeDecoderRunner(_Timed):
    """A runtime backend (through its Generator) over the same sequence."""

    def __init__(self, pipeline, routable, name: str):
        super().__init__(name=name)
        self.pipeline, self.routable = pipeline, routable
        self.gen = None

    def activate_impl(self):
        self.gen = None

    def get_input_metadata_impl(self):
        hidden = self.pipeline.manifest["model"]["hidden_size"]
        return TensorMetadata().add("inputs_embeds", np.float32, (None, None, hidden)) \
            .add("seq_lengths", np.int64, (None,)).add("token_ids", np.int64, (None,))

    def infer_impl(self, feed_dict):
        return self._timed(lambda: self._step(feed_dict))

    def _step(self, feed):
        if feed["inputs_embeds"].shape[1] > 0:
            x = np.asarray(feed["inputs_embeds"])
            self.gen = self.pipeline.generator(batch_size=x.shape[0])
            logits = self.gen.prefill(x, routable=self.routable, lengths=feed["seq_lengths"])
            result = {f"kept_indices.{layer}": self._kept(layer, idx) for layer, idx in self.gen.kept.items()}
        else:
            logits = self.gen.decode(feed["token_ids"])
            result = {}
        result["logits"] = np.asarray(logits, np.float32)
        result["kv_lengths"] = self.gen.kv_lengths()
        return result

    def _kept(self, layer: int, idx: np.ndarray) -> np.ndarray:
        """Threshold routing pads each row's kept indices to the capacity; the reference keeps a
        row's count only (validation runs one row, so the trimmed array stays rectangular)."""
        counts = self.gen.kept_per_row.get(layer)
        return idx if counts is None else idx[:, :int(counts.max())]


class TorchVisionRunner(_Timed):
    def __init__(self, model, name: str = "pytorch"):
        super().__init__(name=name)
        self.model = model

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata().add("pixel_values", np.float32, (None, 3, None, None))

    @torch.inference_mode()
    def infer_impl(self, feed_dict):
        pixels = torch.from_numpy(np.asarray(feed_dict["pixel_values"], np.float32))
        return self._timed(lambda: {"image_features": self.model.encode_images(pixels).float().numpy()})


class RuntimeVisionRunner(_Timed):
    def __init__(self, pipeline, name: str):
        super().__init__(name=name)
        self.pipeline = pipeline

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return TensorMetadata().add("pixel_values", np.float32, (None, 3, None, None))

    def infer_impl(self, feed_dict):
        pixels = np.asarray(feed_dict["pixel_values"])
        if self.pipeline.manifest["model"]["dtype"] == "float16":
            pixels = pixels.astype(np.float16)
        runner = self.pipeline.runner("vision")
        return self._timed(lambda: {"image_features": np.asarray(
            runner.run({"pixel_values": pixels})["image_features"], np.float32)})
