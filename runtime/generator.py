"""The decoding loop's core for apps that bring their own embeddings.

``gen = pipeline.generator(batch_size=B)``; ``gen.prefill(inputs_embeds, routable=(start, len))``
returns the last position's logits; ``gen.decode(token_ids)`` feeds the chosen tokens and returns
the next logits; ``gen.kv_lengths()`` gives each layer's cached entries per row.

A static-capacity artifact routes with the span it was exported for: the prefill graph's
routable span and kept counts are constants. Prompts without a routable span (text only) and
later turns go through the decode graph, which takes chunks of any length.
"""

from __future__ import annotations

import numpy as np

from gammamod.errors import GammamodError

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class Generator:
    def __init__(self, manifest, backend, runners, embeddings: np.ndarray, batch_size: int):
        self.manifest = manifest
        self.backend = backend
        self._runners = runners  # callable kind -> Runner (opened lazily, shared by generators)
        self.embeddings = embeddings
        self.batch_size = batch_size
        model, kv = manifest["model"], manifest["kv_cache"]
        if model["dtype"] not in NP_DTYPES:
            raise GammamodError(f"{manifest.root}: {model['dtype']} artifacts run on TensorRT; the host runtime "
                                "takes float32 or float16")
        if batch_size < 1 or batch_size > kv["max_batch"]:
            raise GammamodError(f"batch_size {batch_size}: the artifact takes 1 to {kv['max_batch']} rows "
                                "(re-export with a larger --max-batch)")
        self.dtype = NP_DTYPES[model["dtype"]]
        self.hidden = model["hidden_size"]
        self.layers = model["num_layers"]
        self.max_seq = kv["max_seq"]
        routing = manifest["routing"]
        self.span = tuple(routing["routable_span"]) if routing["mode"] == "static" and manifest.capacities else None
        self.capacities = manifest.capacities
        self.inplace = backend.inplace_decode()
        self.cache = backend.kv_store(self.layers, batch_size, model["num_kv_heads"], model["head_dim"],
                                      self.max_seq, self.dtype, full=self.inplace)
        self._bound = None  # the cache buffers as the backend binds them (in-place decode)
        self.past_length = np.zeros(batch_size, dtype=np.int64)
        self.kept: dict[int, np.ndarray] = {}
        self._started = False

    # -- helpers ----------------------------------------------------------------------------------
    def _check_embeds(self, inputs_embeds: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(inputs_embeds)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != self.hidden:
            raise GammamodError(f"inputs_embeds of shape {list(x.shape)}: expected [{self.batch_size}, tokens, "
                                f"{self.hidden}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise GammamodError(f"inputs_embeds of dtype {x.dtype}: expected floating point embeddings")
        if not np.isfinite(x).all():
            raise GammamodError("inputs_embeds hold NaN or infinite values")
        t = x.shape[1]
        lengths = np.full(self.batch_size, t, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lengths.shape != (self.batch_size,) or (lengths < 1).any() or (lengths > t).any():
            raise GammamodError(f"lengths {lengths.tolist()}: expected {self.batch_size} row lengths in [1, {t}]")
        return np.ascontiguousarray(x, dtype=self.dtype), lengths

    def embed(self, token_ids) -> np.ndarray:
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
        except (TypeError, ValueError):
            raise GammamodError(f"token ids {token_ids!r}: expected integers") from None
        if ids.ndim == 0 or ids.size == 0 or ids.shape[0] != self.batch_size:
            raise GammamodError(f"token ids of shape {list(ids.shape)}: expected one per row ({self.batch_size})")
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.min() < 0 or ids.max() >= self.embeddings.shape[0]:
            raise GammamodError(f"token ids must lie in [0, {self.embeddings.shape[0]})")
        return np.asarray(self.embeddings[ids], dtype=self.dtype)

    # -- the interface ----------------------------------------------------------------------------
    def prefill(self, inputs_embeds, routable: tuple[int, int] | None = None, lengths=None) -> np.ndarray:
        """Start a new sequence per row; returns each row's last-token logits [B, V]."""
        x, lengths = self._check_embeds(inputs_embeds, lengths)
        t = x.shape[1]
        if int(lengths.max()) > self.max_seq:
            raise GammamodError(f"the prompt has {int(lengths.max())} tokens, more than the artifact's max_seq "
                                f"{self.max_seq}")
        self.cache.reset()
        self.past_length[:] = 0
        self.kept = {}
        self._started = True
        if self.span is not None and routable is not None:
            if tuple(routable) != self.span:
                raise GammamodError(f"routable span {tuple(routable)}: this artifact was exported for {self.span} "
                                    "(static capacity); re-export with --routable or the prompt layout you use")
            end = self.span[0] + self.span[1]
            if t <= end or (lengths <= end).any():
                raise GammamodError(f"every row must extend past the routable span (ends at {end}); row lengths "
                                    f"{lengths.tolist()}")
            return self._routed_prefill(x, lengths)
        if self.span is None and t >= 2:
            return self._routed_prefill(x, lengths)  # a dense artifact's prefill graph: no routing
        return self.extend(x, lengths)

    def _routed_prefill(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        outs = self._runners("prefill").run({"inputs_embeds": x, "seq_lengths": lengths})
        skipped = {layer: self.span[1] - k for layer, k in self.capacities.items()} if self.span else {}
        for layer in range(self.layers):
            self.cache.write(layer, outs[f"present_key.{layer}"], outs[f"present_value.{layer}"],
                             start=np.zeros(self.batch_size, np.int64))
            self.cache.lengths[layer] = lengths - skipped.get(layer, 0)
        self.kept = {layer: outs[f"kept_indices.{layer}"] for layer in skipped}
        self.past_length[:] = lengths
        return outs["logits"]

    def extend(self, inputs_embeds, lengths=None) -> np.ndarray:
        """Feed a chunk of tokens (a later turn, or one decode step) after what is cached."""
        if not self._started:
            raise GammamodError("decode/extend before prefill: start each sequence with Generator.prefill")
        x, lengths = self._check_embeds(inputs_embeds, lengths)
        if int((self.past_length + lengths).max()) > self.max_seq:
            raise GammamodError(f"the sequence would exceed the artifact's max_seq {self.max_seq}")
        if self.inplace and x.shape[1] == 1:
            return self._step_in_place(x, lengths)
        feeds = {"inputs_embeds": x, "seq_lengths": lengths, "past_length": self.past_length.copy()}
        for layer in range(self.layers):
            feeds[f"past_key.{layer}"] = self.cache.keys(layer)
            feeds[f"past_value.{layer}"] = self.cache.values(layer)
            feeds[f"kv_length.{layer}"] = self.cache.lengths[layer].copy()
        outs = self._runners("decode").run(feeds)
        for layer in range(self.layers):
            self.cache.write(layer, outs[f"present_key.{layer}"], outs[f"present_value.{layer}"])
            self.cache.lengths[layer] = outs[f"new_kv_length.{layer}"]
        self.past_length += lengths
        return outs["logits"]

    def _step_in_place(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token per row through the fused graph: it appends each layer's entry into the cache
        buffers itself (bound as both past and present), so nothing is written here."""
        if self._bound is None:
            self._bound = [(self.backend.bind(self.cache.keys(i)), self.backend.bind(self.cache.values(i)))
                           for i in range(self.layers)]
        feeds = {"inputs_embeds": x, "seq_lengths": lengths, "past_length": self.past_length.copy()}
        into, outputs = {}, ["logits"]
        for layer, (keys, values) in enumerate(self._bound):
            feeds[f"past_key.{layer}"] = keys
            feeds[f"past_value.{layer}"] = values
            feeds[f"kv_length.{layer}"] = self.cache.lengths[layer].copy()
            into[f"present_key.{layer}"] = keys
            into[f"present_value.{layer}"] = values
            outputs.append(f"new_kv_length.{layer}")
        outs = self._runners("decode_ort").run(feeds, outputs, into=into)
        for layer in range(self.layers):
            if int((self.cache.lengths[layer] + 1).max()) > self.max_seq:
                raise GammamodError(f"the sequence would exceed the artifact's max_seq {self.max_seq}")
            self.cache.lengths[layer] = outs[f"new_kv_length.{layer}"]
        self.past_length += lengths
        return outs["logits"]

    def decode(self, token_ids) -> np.ndarray:
        """Feed one token per row ([B], or [B, T] for several) and return the next logits [B, V]."""
        return self.extend(self.embed(token_ids))

    def kv_lengths(self) -> np.ndarray:
        """[layers, B]: entries in each layer's cache, per row."""
        return self.cache.lengths.copy()

    def kv_bytes(self) -> np.ndarray:
        """[layers]: bytes of valid KV entries per layer (all rows)."""
        return self.cache.bytes_used()
