"""The decoding loop's core for apps that bring their own embeddings.

``gen = pipeline.generator(batch_size=B)``; ``gen.prefill(inputs_embeds, routable=(start, len))``
returns the last position's logits; ``gen.decode(token_ids)`` feeds the chosen tokens and returns
the next logits; ``gen.extend(inputs_embeds)`` feeds a chunk (a later turn); ``gen.kv_lengths()``
gives each layer's cached entries per row.

Continuous batching (a fixed batch of rows as slots, each request joining at the next step and
leaving when done): ``decode(ids, active=mask)`` and ``extend(chunk, lengths)`` take rows of
length 0, which are idle (their cache and lengths stay as they are); ``gen.place(row, lone)``
moves a sequence prefilled alone (a batch-1 generator) into a free row, and ``gen.release(row)``
frees it.

Every call runs the one decoder graph. The routed span comes with the call: one ``(start,
length)`` for the batch or one per row (the length shared by the batch); each MoD layer's kept
count is computed here from the manifest's rule (``runtime.capacity``), so one artifact serves any
prompt layout. Later chunks and decode steps carry an empty span: nothing is routed.

A threshold-routed artifact (gamma-MoD's released inference) routes every multi-token chunk whole
(its rows must have the same length) and decodes through the gate; when more span tokens pass
the threshold than a layer's capacity holds, the lowest-scoring are dropped, and ``overflows``
counts it per layer.

On ONNX Runtime (CPU) the artifact's ORT graphs run: ``decoder_ort`` for chunks, ``decode_ort`` for
single-token steps, both appending to the KV buffers in place. Elsewhere (TensorRT, or ORT with
``fused=False``) the portable ``decoder`` graph returns each chunk's new entries, written here.
"""

from __future__ import annotations

import numpy as np

from gammamod.errors import GammamodError

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _as_spans(routable, batch: int) -> tuple[np.ndarray, int] | None:
    """``routable`` -> (per-row starts [B], shared length) or None (no span)."""
    if routable is None:
        return None
    pairs = [routable] * batch if len(routable) == 2 and all(np.isscalar(x) for x in routable) else list(routable)
    if len(pairs) != batch:
        raise GammamodError(f"routable: {len(pairs)} spans for {batch} rows; give one (start, length) for the batch "
                            "or one per row")
    try:
        starts = np.array([int(s) for s, _ in pairs], dtype=np.int64)
        lengths = {int(n) for _, n in pairs}
    except (TypeError, ValueError):
        raise GammamodError(f"routable {routable!r}: expected (start, length) pairs of integers") from None
    if len(lengths) != 1:
        raise GammamodError(f"routable spans of different lengths {sorted(lengths)}: the span length is shared by "
                            "the batch; run such rows in separate calls")
    n = lengths.pop()
    if n < 0 or (starts < 0).any():
        raise GammamodError(f"routable {routable!r}: expected starts and a length >= 0")
    return starts, n


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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= kv["max_batch"]:
            raise GammamodError(f"batch_size {batch_size!r}: the artifact takes 1 to {kv['max_batch']} rows "
                                "(re-export with a larger --max-batch)")
        self.dtype = NP_DTYPES[model["dtype"]]
        self.hidden = model["hidden_size"]
        self.layers = model["num_layers"]
        self.max_seq = kv["max_seq"]
        self.rule = manifest.capacity_rule()
        self.mode = manifest["routing"]["mode"]
        self.overflows: dict[int, int] = {}  # threshold routing: MoD layer -> rows whose count overflowed
        self.kept_per_row: dict[int, np.ndarray] = {}  # threshold routing: MoD layer -> kept per row [B]
        self.inplace = backend.inplace_decode()
        self.cache = backend.kv_store(self.layers, batch_size, model["num_kv_heads"], model["head_dim"],
                                      self.max_seq, self.dtype, full=self.inplace)
        self._bound = None  # the cache buffers as the backend binds them (in-place graphs)
        self.past_length = np.zeros(batch_size, dtype=np.int64)
        self.kept: dict[int, np.ndarray] = {}
        self._started = False

    # -- helpers ----------------------------------------------------------------------------------
    def _check_embeds(self, inputs_embeds: np.ndarray, lengths, idle: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``idle``: rows of length 0 are allowed (they sit the call out), as long as one row runs."""
        x = np.asarray(inputs_embeds)
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[2] != self.hidden or x.shape[1] < 1:
            raise GammamodError(f"inputs_embeds of shape {list(x.shape)}: expected [{self.batch_size}, tokens, "
                                f"{self.hidden}]")
        if not np.issubdtype(x.dtype, np.floating):
            raise GammamodError(f"inputs_embeds of dtype {x.dtype}: expected floating point embeddings")
        if not np.isfinite(x).all():
            raise GammamodError("inputs_embeds hold NaN or infinite values")
        t = x.shape[1]
        lengths = np.full(self.batch_size, t, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        low = 0 if idle else 1
        if lengths.shape != (self.batch_size,) or (lengths < low).any() or (lengths > t).any() or not lengths.any():
            raise GammamodError(f"lengths {lengths.tolist()}: expected {self.batch_size} row lengths in [{low}, {t}]"
                                + (", at least one above 0" if idle else ""))
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

    def kept_counts(self, span_length: int) -> dict[int, int]:
        """Each MoD layer's kept count for a routed span of ``span_length`` tokens."""
        return self.rule.kept_counts(span_length) if self.rule is not None else {}

    # -- the interface ----------------------------------------------------------------------------
    def prefill(self, inputs_embeds, routable=None, lengths=None) -> np.ndarray:
        """Start a new sequence per row; returns each row's last-token logits [B, V]. ``routable``:
        the routed span, ``(start, length)`` for every row or one pair per row (same length);
        None routes nothing (a text-only prompt). A dense artifact ignores it; a threshold-routed
        one routes the whole prompt whatever it says."""
        x, lengths = self._check_embeds(inputs_embeds, lengths)
        spans = _as_spans(routable, self.batch_size) if self.rule is not None else None
        self.cache.reset()
        self.past_length[:] = 0
        self.kept = {}
        self.overflows = {}
        self.kept_per_row = {}
        self._started = True
        return self._run(x, lengths, spans)

    def extend(self, inputs_embeds, lengths=None) -> np.ndarray:
        """Feed a chunk of tokens (a later turn, or one decode step) after what is cached. A row of
        length 0 is idle: nothing is appended to its cache (its logits are meaningless)."""
        if not self._started:
            raise GammamodError("decode/extend before prefill: start each sequence with Generator.prefill")
        x, lengths = self._check_embeds(inputs_embeds, lengths, idle=True)
        return self._run(x, lengths, None)

    def decode(self, token_ids, active=None) -> np.ndarray:
        """Feed one token per row ([B], or [B, T] for several) and return the next logits [B, V].
        ``active`` [B] (bools): only those rows take their token; the others are idle."""
        if not self._started:
            raise GammamodError("decode/extend before prefill: start each sequence with Generator.prefill")
        x = self.embed(token_ids)
        if active is None:
            return self.extend(x)
        mask = np.asarray(active)
        if mask.dtype != bool or mask.shape != (self.batch_size,):
            raise GammamodError(f"active: expected {self.batch_size} booleans, one per row")
        return self.extend(x, lengths=np.where(mask, x.shape[1], 0))

    def place(self, row: int, source: "Generator", source_row: int = 0) -> None:
        """Copy ``source``'s sequence in ``source_row`` (typically a batch-1 generator that prefilled
        one request alone) into this generator's ``row``, which then continues it: its KV entries
        in every layer, their lengths and the position. The row's previous sequence is dropped."""
        if source.manifest.root != self.manifest.root or source.dtype != self.dtype:
            raise GammamodError("place: the source generator must come from the same artifact")
        if not 0 <= row < self.batch_size or not 0 <= source_row < source.batch_size:
            raise GammamodError(f"place: row {row} of {self.batch_size} from row {source_row} of {source.batch_size}")
        if not source._started:
            raise GammamodError("place: the source generator holds no sequence (prefill it first)")
        if not hasattr(self.cache, "copy_row"):
            raise GammamodError(f"place: the {self.backend.name} backend's KV cache cannot move rows yet")
        for layer in range(self.layers):
            self.cache.copy_row(layer, row, source.cache, source_row)
        self.past_length[row] = source.past_length[source_row]
        self._started = True

    def release(self, row: int) -> None:
        """Forget the sequence in ``row`` (its slot is free; its entries are no longer counted)."""
        self.cache.lengths[:, row] = 0
        self.past_length[row] = 0

    def kv_lengths(self) -> np.ndarray:
        """[layers, B]: entries in each layer's cache, per row."""
        return self.cache.lengths.copy()

    def kv_bytes(self) -> np.ndarray:
        """[layers]: bytes of valid KV entries per layer (all rows)."""
        return self.cache.bytes_used()

    # -- one chunk through the decoder --------------------------------------------------------------
    def _span_feeds(self, x: np.ndarray, lengths: np.ndarray, spans) -> tuple[dict, dict[int, int]]:
        t = x.shape[1]
        starts, n = spans if spans is not None else (np.zeros(self.batch_size, np.int64), 0)
        if n > 0 and ((starts + n) > lengths).any():
            raise GammamodError(f"routed span of {n} tokens at {starts.tolist()}: it must lie inside each row "
                                f"(row lengths {lengths.tolist()})")
        counts = self.kept_counts(n)
        for layer, k in counts.items():
            if t - n + k < 1:
                raise GammamodError(f"the routed span covers all {t} tokens and MoD layer {layer} keeps none of them: "
                                    "leave at least one token outside the span or keep one")
        feeds = {"span_start": starts, "span_length": np.array([n], np.int32)}
        feeds.update({f"capacity.{layer}": np.array([k], np.int32) for layer, k in counts.items()})
        return feeds, counts

    def _run(self, x: np.ndarray, lengths: np.ndarray, spans) -> np.ndarray:
        t = x.shape[1]
        if self.mode == "threshold":  # every multi-token chunk is routed whole; a decode step goes through the gate
            spans = None
            if t > 1:
                if (lengths != t).any():
                    raise GammamodError(f"threshold routing routes whole prompts, and the rows of one batch share a "
                                        f"span length: rows of {sorted(set(lengths.tolist()))} tokens must be run "
                                        "in separate calls")
                spans = (np.zeros(self.batch_size, np.int64), t)
        if int((self.past_length + t)[lengths > 0].max()) > self.max_seq:  # idle rows do not grow
            raise GammamodError(f"the sequence would exceed the artifact's max_seq {self.max_seq} "
                                f"({int(self.past_length.max())} cached + {t} new tokens)")
        feeds = {"inputs_embeds": x, "seq_lengths": lengths, "past_length": self.past_length.copy()}
        counts = {}
        step = self.inplace and t == 1 and spans is None and "decode_ort" in self.manifest["graphs"]
        if self.rule is not None and not step:
            span_feeds, counts = self._span_feeds(x, lengths, spans)
            feeds.update(span_feeds)
        if self.inplace:
            outs = self._run_in_place("decode_ort" if step else "decoder_ort", feeds)
        else:
            outs = self._run_portable(feeds)
        idle = lengths == 0
        for layer in range(self.layers):  # an idle row keeps its length (see _kv_length_feed)
            self.cache.lengths[layer] = np.where(idle, self.cache.lengths[layer], outs[f"new_kv_length.{layer}"])
        if spans is not None:
            self.kept = {layer: outs[f"kept_indices.{layer}"] for layer in counts}
            if self.mode == "threshold":
                for layer, k in counts.items():
                    above = np.asarray(outs[f"above_threshold.{layer}"])
                    self.overflows[layer] = self.overflows.get(layer, 0) + int((above > k).sum())
                    # each row keeps its first min(above, k) indices; the rest of the row is padding
                    self.kept_per_row[layer] = np.minimum(above, k).astype(np.int64)
        self.past_length += lengths
        return outs["logits"]

    def _kv_length_feed(self, layer: int, lengths: np.ndarray) -> np.ndarray:
        """The layer's cache lengths as the graph takes them. An idle row (no new token) with an empty
        cache is shown one entry: attention needs a key to look at (ONNX Runtime's GroupQueryAttention
        refuses a row with none), its output for that row is never used, and nothing is appended."""
        kv = self.cache.lengths[layer]
        return np.where((lengths == 0) & (kv == 0), 1, kv)  # a new array: the cache is not touched

    def _run_portable(self, feeds: dict) -> dict:
        for layer in range(self.layers):
            feeds[f"past_key.{layer}"] = self.cache.keys(layer)
            feeds[f"past_value.{layer}"] = self.cache.values(layer)
            feeds[f"kv_length.{layer}"] = self._kv_length_feed(layer, feeds["seq_lengths"])
        outs = self._runners("decoder").run(feeds)
        for layer in range(self.layers):
            self.cache.write(layer, outs[f"present_key.{layer}"], outs[f"present_value.{layer}"])
        return outs

    def _run_in_place(self, kind: str, feeds: dict) -> dict:
        """The ORT graphs append each layer's entries into the cache buffers themselves (bound as
        both past and present), so nothing is written here."""
        if self._bound is None:
            self._bound = [(self.backend.bind(self.cache.keys(i)), self.backend.bind(self.cache.values(i)))
                           for i in range(self.layers)]
        runner = self._runners(kind)
        into, outputs = {}, [n for n in runner.output_names if not n.startswith(("present_key.", "present_value."))]
        for layer, (keys, values) in enumerate(self._bound):
            feeds[f"past_key.{layer}"] = keys
            feeds[f"past_value.{layer}"] = values
            feeds[f"kv_length.{layer}"] = self._kv_length_feed(layer, feeds["seq_lengths"])
            into[f"present_key.{layer}"] = keys
            into[f"present_value.{layer}"] = values
        return runner.run(feeds, outputs, into=into)
