"""``Pipeline``: images and prompts in, text out, from an exported artifact, without torch.

    pipe = Pipeline.load("artifact/", backend="ort", device="cpu")
    results = pipe.generate(["cat.jpg"], ["What is in the picture?"], max_new_tokens=64)

The pipeline reads only the manifest and the files it names: the tokenizer, the image
processor settings, the token embedding table, and the graphs (through a backend).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError
from gammamod.manifest import read_manifest

from .generator import Generator
from .anyres import AnyRes
from .image import ImageProcessor, as_picture
from .prompt import IMAGE_TOKEN_INDEX, Template, tokenize_with_image
from .sampling import check_sampling, choose
from .tokenizer import Tokenizer

BACKENDS = ("ort", "tensorrt")


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length
    prompt_tokens: int


@dataclass
class GenerationStats:
    vision_s: float = 0.0
    prefill_s: float = 0.0  # time to first token, vision included
    decode_s: float = 0.0
    new_tokens: int = 0  # decode steps x rows
    steps: int = 0
    kv_bytes_per_layer: list[int] = field(default_factory=list)  # valid KV entries after generation
    capacity_overflows: dict = field(default_factory=dict)  # threshold routing: MoD layer -> rows overflowed

    def add(self, part: "GenerationStats") -> None:
        """Fold in the stats of one batch of a call that ran several (rows with different spans)."""
        self.prefill_s += part.prefill_s
        self.decode_s += part.decode_s
        self.steps += part.steps
        self.new_tokens += part.new_tokens
        self.kv_bytes_per_layer = [a + b for a, b in zip(self.kv_bytes_per_layer or [0] * len(part.kv_bytes_per_layer),
                                                         part.kv_bytes_per_layer)]
        for layer, n in part.capacity_overflows.items():
            self.capacity_overflows[layer] = self.capacity_overflows.get(layer, 0) + n

    @property
    def kv_bytes(self) -> int:
        return int(sum(self.kv_bytes_per_layer))

    @property
    def ttft_s(self) -> float:
        return self.vision_s + self.prefill_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Prepared:
    """Prompts (and images) turned into decoder inputs."""

    inputs_embeds: np.ndarray  # [B, T, H], right-padded
    lengths: np.ndarray  # [B]
    routable: list[tuple[int, int]] | None  # each row's routed span (start, length), or None
    token_ids: list[list[int]] = field(default_factory=list)


def _split_at_images(ids: list[int]) -> list[list[int]]:
    """Token ids around the ``<image>`` placeholders: k images give k + 1 pieces."""
    pieces, current = [], []
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces + [current]


def make_backend(name: str, manifest, device: str = "cpu", threads: int | None = None, **kw):
    if name == "ort":
        from .backends.ort import OrtBackend

        return OrtBackend(manifest, device=device, threads=threads, **kw)
    if name == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(manifest, device=device, **kw)
    raise GammamodError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")


class TextStream:
    """Incremental detokenisation: emits text as tokens arrive, holding back an incomplete
    UTF-8 sequence (byte-fallback pieces decode to U+FFFD until the character is whole)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta


class Answer:
    """One row's answer as its tokens are chosen: the end-of-sequence token ends it (and is not
    kept), a stop string ends it (the text cut before it), and ``push`` returns the text to
    stream. ``history``: the ids the repetition penalty sees (prompt and answer), or None."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None, history: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or ())
        self.history = history
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # eos | stop, once done
        self._stream = TextStream(tokenizer)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        token = int(token)
        if token == self.tokenizer.eos_id:
            self.finish_reason = "eos"
            return ""
        self.tokens.append(token)
        if self.history is not None:
            self.history.append(token)
        before = len(self.text)
        self.text += self._stream.push(token)
        hits = [self.text.index(s) for s in self.stop if s in self.text]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
        return self.text[before:]

    def result(self, prompt_tokens: int) -> GenerationResult:
        """The answer so far; ``length`` when neither the end-of-sequence token nor a stop ended it."""
        text = self.text if self.finish_reason == "stop" else self.tokenizer.decode(self.tokens)
        return GenerationResult(text=text, tokens=list(self.tokens), finish_reason=self.finish_reason or "length",
                                prompt_tokens=int(prompt_tokens))


class Pipeline:
    def __init__(self, manifest, backend, tokenizer: Tokenizer | None):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self._runners: dict[str, object] = {}
        emb = manifest["embeddings"]
        self.embeddings = np.load(manifest.path(emb["file"]), mmap_mode="r")
        if list(self.embeddings.shape) != list(emb["shape"]):
            raise GammamodError(f"{manifest.path(emb['file'])}: shape {list(self.embeddings.shape)}, manifest says "
                                f"{emb['shape']}")
        image = manifest.get("image")
        self.anyres, self.newline = None, None
        if image and image.get("anyres"):
            grid = image["anyres"]
            self.anyres = AnyRes(grid["grid_pinpoints"], grid["tile"], grid["patches_per_side"])
            self.newline = np.load(manifest.path(grid["newline"]))
            if self.newline.shape != (manifest["model"]["hidden_size"],):
                raise GammamodError(f"{manifest.path(grid['newline'])}: shape {list(self.newline.shape)}, expected "
                                    f"[{manifest['model']['hidden_size']}] (model.hidden_size)")
        self.image_processor = ImageProcessor(image["processor"], image["aspect"], self.anyres) if image else None
        prompt = manifest.get("prompt") or {}
        self.template = Template.from_dict(prompt["template"]) if prompt.get("template") else None
        self.last_stats = GenerationStats()
        self.unfed: list[int] = []
        self._pool: dict[int, list[Generator]] = {}  # idle generators by batch size: their KV buffers stay
        self._pool_lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, artifact_dir: str | os.PathLike, backend: str = "ort", device: str = "cpu",
             threads: int | None = None, verify: bool = True, **backend_options) -> "Pipeline":
        """Open an artifact. ``verify`` checks every file against the manifest's sha256 (turn it off
        for the fastest start when the files are known good)."""
        manifest = read_manifest(artifact_dir)
        if backend not in BACKENDS:
            raise GammamodError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if verify:
            manifest.verify_files()
        else:
            for name in manifest["files"]:
                if not manifest.path(name).is_file():
                    raise GammamodError(f"{manifest.path(name)}: missing (named in manifest.json)")
        engine = make_backend(backend, manifest, device=device, threads=threads, **backend_options)
        tokenizer = None
        if "tokenizer" not in manifest["absent"]:
            tokenizer = Tokenizer.from_dir(manifest.root)
        pipe = cls(manifest, engine, tokenizer)
        for kind in engine.graphs_used():  # sessions/engines open now: the first request pays no load time
            pipe.runner(kind)
        return pipe

    def runner(self, kind: str):
        if kind not in self._runners:
            self._runners[kind] = self.backend.open(kind)
        return self._runners[kind]

    def generator(self, batch_size: int = 1) -> Generator:
        """A new generator with its own KV cache (yours to keep)."""
        return Generator(self.manifest, self.backend, self.runner, self.embeddings, batch_size)

    @contextlib.contextmanager
    def pooled_generator(self, batch_size: int = 1):
        """A generator whose KV buffers outlive the request: the next request of that batch size
        reuses them. A fresh max-length cache per request costs the kernel zeroing its pages on
        first touch (up to a second per prefill on the bench-size model, measured); kept, the
        memory is paid once. Thread-safe: concurrent requests each get their own."""
        with self._pool_lock:
            idle = self._pool.setdefault(batch_size, [])
            gen = idle.pop() if idle else None
        if gen is None:
            gen = self.generator(batch_size)
        try:
            yield gen
        finally:
            with self._pool_lock:
                self._pool[batch_size].append(gen)

    # -- inputs -----------------------------------------------------------------------------------
    def encode_images(self, images) -> list[np.ndarray]:
        """Images (paths, PIL images or HxWx3 uint8 arrays) -> one projected [tokens, hidden] array
        per image, in the order the decoder sees them (anyres: the base tile's tokens, then the
        unpadded feature map row by row, each row ending with the newline embedding; the count
        depends on the image's size)."""
        if self.image_processor is None or "vision" in self.manifest["absent"]:
            raise GammamodError(f"{self.manifest.root}: this artifact has no vision graph (exported from a "
                                "checkpoint without vision tower); pass embeddings to a Generator instead")
        pictures = [as_picture(im, f"image {i}" if not isinstance(im, (str, os.PathLike)) else str(im))
                    for i, im in enumerate(images)]
        if not pictures:
            return []
        batch = self.image_processor.process(pictures)
        pixels = batch.pixels
        if self.manifest["model"]["dtype"] == "float16":
            pixels = pixels.astype(np.float16)
        step = self.manifest["image"].get("max_rows") or len(pixels)  # the graph's (TensorRT profile's) bound
        runner = self.runner("vision")
        features = np.concatenate([runner.run({"pixel_values": pixels[i:i + step]})["image_features"]
                                   for i in range(0, len(pixels), step)])
        per_image = batch.split(features)
        if self.anyres is None:
            return [f[0] for f in per_image]
        return [self.anyres.assemble(f, size, self.newline) for f, size in zip(per_image, batch.sizes)]

    def prepare(self, images, prompts: list[str], features: list | None = None, system: str | None = None,
                rendered: bool = False) -> Prepared:
        """Render the template, tokenise with ``<image>`` expansion, embed, splice image features,
        and find each row's routed span (the recipe's: p-MoD's image tokens, gamma-MoD's system
        prompt and images). ``images``: None, or per prompt an image or a list of images, one for
        each ``<image>`` in the prompt (a prompt without the marker gets its one image first, as
        LLaVA does); ``features``: the same, already encoded ([tokens, hidden] arrays); ``system``
        replaces the template's system prompt; ``rendered``: the prompts are already whole conversations
        in the template (``Template.render``), with an ``<image>`` marker for each image."""
        return self._batch(*self._rows(images, prompts, features, system, rendered))

    def _rows(self, images, prompts: list[str], features, system, rendered: bool = False):
        """Each prompt's embeddings [T, H] with its images' features spliced in, its routed span and
        its token ids (what :meth:`prepare` batches)."""
        if self.tokenizer is None or self.template is None:
            raise GammamodError(f"{self.manifest.root}: the artifact has no tokenizer; use a Generator with your "
                                "own embeddings")
        from .prompt import IMAGE_TOKEN, routable_span

        n = len(prompts)
        given = features if features is not None else images
        if given is not None and (not isinstance(given, (list, tuple)) or len(given) != n):
            raise GammamodError(f"images: give one entry per prompt ({n}), each an image or a list of images, or "
                                "None for text-only prompts")
        per_row = [[] if g is None else list(g) if isinstance(g, (list, tuple)) else [g] for g in (given or [None] * n)]
        if system is not None and not isinstance(system, str):
            raise GammamodError("system: expected a string")
        texts = []
        for b, (p, row_images) in enumerate(zip(prompts, per_row)):
            marks = p.count(IMAGE_TOKEN)
            if marks and marks != len(row_images):
                raise GammamodError(f"prompt {b} has {marks} {IMAGE_TOKEN} markers and {len(row_images)} images")
            if not marks and (len(row_images) > 1 or rendered and row_images):
                raise GammamodError(f"prompt {b}: {len(row_images)} images need {IMAGE_TOKEN} markers saying where "
                                    "each goes")
            texts.append(p if rendered else self.template.prompt(p, has_image=bool(row_images), system=system))
        ids = [tokenize_with_image(self.tokenizer, t) for t in texts]
        if features is None:
            flat = self.encode_images([im for row in per_row for im in row])
            it = iter(flat)
            per_row = [[next(it) for _ in row] for row in per_row]
        hidden = self.manifest["model"]["hidden_size"]
        dtype = self.embeddings.dtype
        rows, spans = [], []
        for b, (row, feats) in enumerate(zip(ids, per_row)):
            parts, blocks, at = [], [], 0
            pieces = _split_at_images(row)
            for i, text in enumerate(pieces):
                parts.append(np.asarray(self.embeddings[text], dtype=dtype).reshape(len(text), hidden))
                at += len(text)
                if i < len(feats):
                    f = np.asarray(feats[i])
                    if f.ndim != 2 or f.shape[1] != hidden:
                        raise GammamodError(f"image features of shape {list(f.shape)}: expected [tokens, {hidden}]")
                    parts.append(f.astype(dtype))
                    blocks.append((at, f.shape[0]))
                    at += f.shape[0]
            rows.append(np.concatenate(parts))
            if self.manifest["routing"]["mode"] == "threshold":
                spans.append((0, rows[-1].shape[0]))  # the released inference routes the whole prompt
            else:
                spans.append(routable_span(self.manifest["routing"]["span"], blocks) if self.manifest.routed else None)
        return rows, spans, ids

    def _batch(self, rows, spans, ids) -> Prepared:
        n, hidden, dtype = len(rows), self.manifest["model"]["hidden_size"], self.embeddings.dtype
        lengths = np.array([r.shape[0] for r in rows], dtype=np.int64)
        max_seq = self.manifest["kv_cache"]["max_seq"]
        if lengths.max() > max_seq:
            raise GammamodError(f"prompt and images take {int(lengths.max())} tokens, more than the artifact's "
                                f"max_seq {max_seq}")
        x = np.zeros((n, int(lengths.max()), hidden), dtype=dtype)
        for b, r in enumerate(rows):
            x[b, :r.shape[0]] = r
        routable = None
        if any(s is not None for s in spans):
            sizes = {s[1] if s is not None else 0 for s in spans}
            if len(sizes) > 1:
                raise GammamodError(f"the prompts' routed spans have different lengths ({sorted(sizes)} tokens): a "
                                    "batch shares one span length; prepare them in separate calls (Pipeline.generate "
                                    "does so itself)")
            routable = spans
        return Prepared(x, lengths, routable, ids)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, images, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, stop: list[str] | None = None, stream=None,
                 seed: int | None = None, system: str | None = None) -> list[GenerationResult]:
        """Answer each prompt (about its images). ``images``: None, or per prompt an image (a path, a
        PIL image or an HxWx3 uint8 array), a list of them (one per ``<image>`` in the prompt), or
        None. ``system`` replaces the template's system prompt; the routed span follows the prompt.
        ``stream(row, text)`` receives text as it is generated. Rows whose routed spans differ in
        length (anyres images of different sizes) are generated as separate batches, in one call."""
        if isinstance(prompts, str):
            prompts = [prompts]
            images = None if images is None else ([images] if not isinstance(images, (list, tuple)) else images)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise GammamodError("no prompts: give one prompt (a string) or a non-empty list of them")
        if not all(isinstance(p, str) for p in prompts):
            raise GammamodError("prompts must be strings")
        if images is not None and not isinstance(images, (list, tuple)):
            raise GammamodError("images: expected None or a list with one image per prompt")
        check_sampling(temperature, top_p, top_k, repetition_penalty, stop, max_new_tokens)
        stats = GenerationStats()
        t0 = time.perf_counter()
        rows, spans, ids = self._rows(images, list(prompts), None, system)
        stats.vision_s = time.perf_counter() - t0
        # rows whose routed spans differ in length (anyres images of different sizes) run as separate
        # batches: one decoder call shares one span length
        groups: dict[int, list[int]] = {}
        for i, span in enumerate(spans):
            groups.setdefault(span[1] if span is not None else 0, []).append(i)
        results: list[GenerationResult | None] = [None] * len(rows)
        for members in groups.values():
            prepared = self._batch([rows[i] for i in members], [spans[i] for i in members], [ids[i] for i in members])
            part = GenerationStats()
            on_text = None if stream is None else (lambda row, text, members=members: stream(members[row], text))
            with self.pooled_generator(len(members)) as gen:
                t1 = time.perf_counter()
                logits = gen.prefill(prepared.inputs_embeds, routable=prepared.routable, lengths=prepared.lengths)
                part.prefill_s = time.perf_counter() - t1
                out = self.decode_loop(gen, logits, prepared, max_new_tokens, temperature, top_p, top_k,
                                       repetition_penalty, stop, on_text, seed, part)
            for i, result in zip(members, out):
                results[i] = result
            stats.add(part)
        self.last_stats = stats
        return results

    def decode_loop(self, gen: Generator, logits, prepared: Prepared, max_new_tokens, temperature, top_p, top_k,
                     repetition_penalty, stop, stream, seed, stats: GenerationStats) -> list[GenerationResult]:
        b = gen.batch_size
        rng = np.random.default_rng(seed)
        answers = [Answer(self.tokenizer, stop, [t for t in row if t >= 0] if repetition_penalty != 1.0 else None)
                   for row in prepared.token_ids]  # the history drops the image placeholder
        history = [a.history for a in answers] if repetition_penalty != 1.0 else None
        t0 = time.perf_counter()
        # every token but the last one chosen is fed back: the sequence may grow to max_seq entries
        room = int(gen.max_seq - gen.past_length.max())
        budget = min(max_new_tokens, room + 1)
        for step in range(budget):
            nxt = choose(logits, temperature, top_k, top_p, repetition_penalty, history, rng)
            for row, answer in enumerate(answers):
                if answer.done:
                    continue
                delta = answer.push(nxt[row])
                if stream is not None and delta:
                    stream(row, delta)
            if all(a.done for a in answers) or step + 1 == budget:
                self.unfed = [int(t) for t in nxt]  # chosen but not yet fed to the model (chat continues from them)
                break
            logits = gen.decode(nxt)
            stats.steps += 1
            stats.new_tokens += b
        stats.decode_s = time.perf_counter() - t0
        stats.kv_bytes_per_layer = [int(x) for x in gen.kv_bytes()]
        stats.capacity_overflows = {layer: n for layer, n in gen.overflows.items() if n}
        return [answer.result(prepared.lengths[row]) for row, answer in enumerate(answers)]
