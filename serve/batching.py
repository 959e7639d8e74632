"""Continuous batching: concurrent requests share one generator step.

A batch generator's rows are slots. A request joins at the next step: its prompt is prefilled
alone (a batch-1 generator, so its routing and logits are exactly a lone request's), its first
token chosen, and its sequence placed into a free row (``Generator.place``). Each step then
decodes one token for every occupied row (free rows are idle: 0 tokens, cache unchanged) and
each row chooses its next token with its own sampling settings. A row leaves when its answer is
done (end of sequence, a stop string, its token budget, or its client gone) and the slot is
free for the next request. One thread runs the model; callers hand in :class:`Job`s and get
their tokens through callbacks.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gammamod.errors import GammamodError
from gammamod.runtime.pipeline import Answer, GenerationResult, Pipeline, Prepared
from gammamod.runtime.sampling import check_sampling, choose


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None

    def check(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.stop,
                       self.max_tokens)


@dataclass
class Job:
    """One request: its prepared prompt (one row), how to sample, and where its output goes.
    ``on_text(text, token)`` receives each chosen token and the text it completes (possibly "");
    ``on_done(result)`` the whole answer; ``on_error(message)`` a failure. Set ``cancelled`` to
    free its slot at the next step (the client went away)."""

    prepared: Prepared
    sampling: Sampling
    on_text: Callable[[str, int], None]
    on_done: Callable[[GenerationResult], None]
    on_error: Callable[[str], None] = lambda message: None
    cancelled: bool = False


@dataclass
class _Row:
    job: Job
    answer: Answer
    budget: int  # tokens this row may still choose
    rng: np.random.Generator
    next_token: int = 0
    prompt_tokens: int = 0
    history: list = field(default_factory=list)


class ContinuousBatcher:
    """``submit(job)`` from any thread; one worker thread runs prefills and batched decode steps.
    ``max_batch`` rows decode together; ``max_waiting`` requests may queue for a row (more are
    refused, so a flood cannot grow memory without bound)."""

    def __init__(self, pipeline: Pipeline, max_batch: int = 8, max_waiting: int = 256):
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.batch = pipeline.generator(max_batch)  # the slots
        self.lone = pipeline.generator(1)  # each joining request's prefill
        self.rows: list[_Row | None] = [None] * max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self.steps = 0  # batched decode steps run (for /health and tests)
        self.busiest = 0  # most rows decoded in one step
        self._thread = threading.Thread(target=self._work, name="gammamod-batcher", daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        job.sampling.check()
        if job.prepared.inputs_embeds.shape[0] != 1:
            raise GammamodError("a job holds one prompt")
        with self._wake:
            if self._closing:
                raise GammamodError("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise Busy(f"{len(self._waiting)} requests are already waiting for a slot; try again later")
            self._waiting.append(job)
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"active": sum(r is not None for r in self.rows), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "steps": self.steps, "busiest_step": self.busiest}

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; running and waiting ones are told the server is going away."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not any(self.rows):
                    self._wake.wait()
                if self._closing:
                    break
                joining = []
                for slot, row in enumerate(self.rows):
                    if row is None and self._waiting:
                        joining.append((slot, self._waiting.popleft()))
            for slot, job in joining:
                self._guard(job, lambda: self._join(slot, job))
            if any(self.rows):
                self._guard(None, self._step)
        self._fail_all("the server is shutting down")

    def _guard(self, job: Job | None, action) -> None:
        """An unexpected failure ends the jobs it touches, in one line each; the worker goes on."""
        try:
            action()
        except Exception as e:  # noqa: BLE001 - reported to the clients, never a dead worker
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if job is not None:
                job.on_error(message)
            else:
                self._fail_rows(message)

    def _join(self, slot: int, job: Job) -> None:
        if job.cancelled:
            return
        p, s = job.prepared, job.sampling
        logits = self.lone.prefill(p.inputs_embeds, routable=p.routable, lengths=p.lengths)
        prompt = [t for t in p.token_ids[0] if t >= 0]  # the image placeholder is not a token
        answer = Answer(self.pipeline.tokenizer, s.stop, prompt if s.repetition_penalty != 1.0 else None)
        # every token but the last chosen is fed back: the sequence may grow to max_seq entries
        budget = min(s.max_tokens, int(self.lone.max_seq - self.lone.past_length[0]) + 1)
        row = _Row(job, answer, budget, np.random.default_rng(s.seed), prompt_tokens=int(p.lengths[0]))
        if self._advance(row, logits):
            self.batch.place(slot, self.lone)
            self.rows[slot] = row

    def _step(self) -> None:
        active = np.array([r is not None for r in self.rows])
        ids = np.array([r.next_token if r is not None else 0 for r in self.rows], dtype=np.int64)
        logits = self.batch.decode(ids, active=active)
        self.steps += 1
        self.busiest = max(self.busiest, int(active.sum()))
        for slot, row in enumerate(self.rows):
            if row is not None and not self._advance(row, logits[slot:slot + 1]):
                self.rows[slot] = None
                self.batch.release(slot)

    def _advance(self, row: _Row, logits: np.ndarray) -> bool:
        """Choose the row's next token and hand it out; False when the row is finished."""
        job, s = row.job, row.job.sampling
        if job.cancelled:
            return False
        history = [row.answer.history] if row.answer.history is not None else None
        token = int(choose(logits, s.temperature, s.top_k, s.top_p, s.repetition_penalty, history, row.rng)[0])
        row.budget -= 1
        text = row.answer.push(token)
        if row.answer.finish_reason != "eos":  # the end-of-sequence token is not part of the answer
            job.on_text(text, token)
        if row.answer.done or row.budget == 0:
            job.on_done(row.answer.result(row.prompt_tokens))
            return False
        row.next_token = token
        return True

    def _fail_rows(self, message: str) -> None:
        for slot, row in enumerate(self.rows):
            if row is not None:
                row.job.on_error(message)
                self.rows[slot] = None
                self.batch.release(slot)

    def _fail_all(self, message: str) -> None:
        self._fail_rows(message)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            job.on_error(message)


class Busy(GammamodError):
    """Too many requests are waiting: the caller should come back later (HTTP 503)."""
