"""A conversation about one image that keeps the image and the KV cache between turns.

The first turn is a full prompt (template, image, question) through the routed prefill; each
later turn feeds only the new text (``</s>USER: ... ASSISTANT:``) after the answer already in the
cache, through the decode graph, so neither the image nor the earlier turns are recomputed.
"""

from __future__ import annotations

import time

import numpy as np

from gammamod.errors import GammamodError

from .pipeline import GenerationResult, GenerationStats, Pipeline, Prepared
from .sampling import check_sampling


class Chat:
    def __init__(self, pipeline: Pipeline, image=None, system: str | None = None, **sampling):
        self.pipeline = pipeline
        self.image = image
        self.system = system
        self.sampling = sampling
        self.generator = pipeline.generator(batch_size=1)
        self.turns: list[tuple[str, str]] = []
        self._last: GenerationResult | None = None
        self._unfed: list[int] = []

    def ask(self, question: str, max_new_tokens: int = 128, stream=None) -> GenerationResult:
        pipe = self.pipeline
        if not isinstance(question, str) or not question.strip():
            raise GammamodError("empty question")
        check_sampling(**self._sampling_checked(), max_new_tokens=max_new_tokens)
        stats = GenerationStats()
        t0 = time.perf_counter()
        if self._last is None:
            prepared = pipe.prepare([self.image] if self.image is not None else None, [question], system=self.system)
            stats.vision_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            logits = self.generator.prefill(prepared.inputs_embeds, routable=prepared.routable,
                                            lengths=prepared.lengths)
        else:
            tok = pipe.tokenizer
            pending = [] if self._last.finish_reason == "eos" else self._unfed  # eos is the chunk's first token
            ids = pending + tok.encode(pipe.template.continuation(question), add_bos=False)
            if self.generator.past_length[0] + len(ids) >= self.generator.max_seq:
                raise GammamodError(f"the conversation has reached the artifact's max_seq {self.generator.max_seq}; "
                                    "start a new chat")
            prepared = Prepared(self.generator.embed(np.asarray([ids])), np.array([len(ids)]), None, [ids])
            t1 = time.perf_counter()
            logits = self.generator.extend(prepared.inputs_embeds)
        stats.prefill_s = time.perf_counter() - t1
        result = pipe.decode_loop(self.generator, logits, prepared, max_new_tokens, stream=stream, stats=stats,
                                   **self._sampling())[0]
        pipe.last_stats = stats
        self._unfed = pipe.unfed[:1]
        self._last = result
        self.turns.append((question, result.text))
        return result

    def _sampling_checked(self) -> dict:
        s = self._sampling()
        return {k: s[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "stop")}

    def _sampling(self) -> dict:
        s = self.sampling
        return {"temperature": s.get("temperature", 0.0), "top_p": s.get("top_p", 1.0), "top_k": s.get("top_k", 0),
                "repetition_penalty": s.get("repetition_penalty", 1.0), "stop": s.get("stop"), "seed": s.get("seed")}
