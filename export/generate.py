"""The PyTorch reference: one forward over embeddings, and greedy/sampled generation.

These are the oracles later stages are checked against: the ONNX graphs against
:func:`forward_language` in ``static`` mode, the runtime's tokens against
:func:`generate_from_embeds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gammamod.errors import GammamodError

from .model import ROUTING_MODES, KVCache, MoDLlava, Step


@dataclass
class LanguageOutput:
    logits: torch.Tensor  # [B, T, V] (float32)
    kept: dict[int, torch.Tensor]  # MoD layer -> kept token indices [B, K] (ascending)
    kv_lengths: torch.Tensor  # [num_layers, B] entries in each layer's cache
    capacity: dict[int, int]  # MoD layer -> kept routable tokens (static mode)
    cache: KVCache  # to continue decoding
    above: dict[int, torch.Tensor] = field(default_factory=dict)  # threshold: span tokens above it [B]


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, N] generated token ids
    kv_lengths: torch.Tensor  # [num_layers, B] after generation
    kept: dict[int, torch.Tensor]  # prefill routing
    capacity: dict[int, int]
    logits: torch.Tensor | None = None  # [B, N, V] the logits each token was chosen from


def _check_call(model: MoDLlava, inputs_embeds: torch.Tensor, routable, routing: str, lengths):
    if routing not in ROUTING_MODES:
        raise GammamodError(f"routing {routing!r}: expected one of {', '.join(ROUTING_MODES)}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != model.config.hidden_size:
        raise GammamodError(f"inputs_embeds of shape {list(inputs_embeds.shape)}: expected "
                            f"[batch, tokens, {model.config.hidden_size}]")
    b, t, _ = inputs_embeds.shape
    if routing == "threshold" and model.recipe.router != "shared-binary":
        raise GammamodError(f"routing 'threshold' is gamma-MoD's released inference; a {model.recipe.name} "
                            "checkpoint routes with 'static'")
    if routing == "reference" and b != 1:
        raise GammamodError("routing 'reference' reproduces the authors' released inference, which runs batch "
                            "size 1 only; use routing 'static' for batches")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.shape != (b,) or bool((lengths > t).any()) or bool((lengths < 1).any()):
            raise GammamodError(f"lengths {lengths.tolist()}: expected {b} row lengths in [1, {t}]")
    else:
        lengths = torch.full((b,), t, dtype=torch.long)
    spans = row_spans(routable, b)
    if spans is not None:
        starts, n = spans
        if bool((starts < 0).any()) or n < 0 or bool((starts + n > lengths).any()):
            raise GammamodError(f"routable span {routable}: expected (start, length) inside each row's "
                                f"{lengths.tolist()} tokens")
    return lengths, spans


def row_spans(routable, batch: int) -> tuple[torch.Tensor, int] | None:
    """``routable``: (start, length) for every row, or one pair per row with one length ->
    (starts [B], length) or None."""
    if routable is None:
        return None
    pairs = [routable] * batch if len(routable) == 2 and all(isinstance(x, int) for x in routable) else list(routable)
    if len(pairs) != batch or len({int(n) for _, n in pairs}) != 1:
        raise GammamodError(f"routable {routable!r}: expected (start, length), or one pair per row ({batch}) with one "
                            "length")
    return torch.tensor([int(s) for s, _ in pairs], dtype=torch.long), int(pairs[0][1])


def capacities(model: MoDLlava, span_length: int | None, routing: str, skip_ratio=None, capacity=None) -> dict[int, int]:
    if skip_ratio is not None and model.recipe.kept != "skip-ratio":
        raise GammamodError(f"skip ratio {skip_ratio}: applies to gamma-MoD; this {model.recipe.name} checkpoint keeps "
                            "counts from its own layer schedule")
    if span_length is None or routing == "dense" or not model.recipe.is_mod:
        return {}
    if routing == "reference" and model.recipe.kept == "skip-ratio":
        return {}  # gamma-MoD's released inference thresholds instead of counting
    if routing == "threshold" and capacity is None and skip_ratio is None:
        # no capacity given: every span token may be kept, so the threshold alone decides
        return {layer: span_length for layer in model.recipe.mod_layers}
    return model.recipe.capacities(span_length, skip_ratio, capacity)


@torch.no_grad()
def forward_language(model: MoDLlava, inputs_embeds: torch.Tensor, routable: tuple[int, int] | None = None,
                     routing: str = "static", skip_ratio: float | None = None,
                     capacity: dict[int, int] | None = None, lengths=None,
                     cache: KVCache | None = None) -> LanguageOutput:
    """Run the decoder over ``inputs_embeds`` [B, T, hidden].

    ``routable`` is the (start, length) of the routable tokens (gamma-MoD: system prompt and
    image; p-MoD: image), or one such pair per row (each row its own start, one length). ``static`` keeps a fixed count per MoD layer (from ``skip_ratio`` for
    gamma-MoD, default 0.5, or the p-MoD schedule; ``capacity`` overrides layers); ``reference``
    is the authors' inference (gamma-MoD thresholds at r > 0.005 and ignores ``routable``);
    ``threshold`` (gamma-MoD) selects each MoD layer's ``capacity`` top-k of the span (default:
    the whole span) and skips those at or below the prefill threshold: ``reference`` in a static
    graph (route the whole chunk: ``routable=(0, T)``). ``dense`` ignores the routers. ``lengths``
    gives each row's real length when rows are right-padded. Pass the returned ``cache`` back to
    continue (then ``routable`` is None, or the next chunk's span).
    """
    lengths, spans = _check_call(model, inputs_embeds, routable, routing, lengths)
    b = inputs_embeds.shape[0]
    if cache is None:
        cache = model.new_cache(b, capacity=max(64, inputs_embeds.shape[1]))
    elif cache.batch != b:
        raise GammamodError(f"cache holds {cache.batch} rows, inputs_embeds {b}")
    caps = capacities(model, spans[1] if spans else None, routing, skip_ratio, capacity)
    device = cache.seen.device
    step = Step(routing=routing, kv=cache, past_length=cache.seen.clone(), valid=lengths.to(device),
                span_start=spans[0].to(device) if spans else None, span_length=spans[1] if spans else 0,
                capacity=caps)
    hidden = model.forward_chunk(inputs_embeds.to(model.dtype), step)
    cache.seen += step.valid
    logits = model.lm_head(hidden).float()
    return LanguageOutput(logits=logits, kept=step.kept, kv_lengths=cache.lengths.clone(), capacity=caps,
                          cache=cache, above=step.above)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row [B] from logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_from_embeds(model: MoDLlava, inputs_embeds: torch.Tensor, routable: tuple[int, int] | None = None,
                         routing: str = "static", max_new_tokens: int = 32, skip_ratio: float | None = None,
                         capacity: dict[int, int] | None = None, lengths=None, eos_token_id: int | None = None,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                         return_logits: bool = False, on_token=None) -> GenerationOutput:
    """Prefill ``inputs_embeds`` then decode ``max_new_tokens`` tokens (greedy by default).

    Rows that produced ``eos_token_id`` keep emitting it; generation stops early once every row
    has, and at the model's ``max_position_embeddings`` (the longest row's). ``on_token(step,
    tokens)`` is called after each step (streaming).
    """
    from gammamod.runtime.sampling import check_sampling

    check_sampling(temperature, top_p, top_k, max_new_tokens=max_new_tokens)
    out = forward_language(model, inputs_embeds, routable, routing, skip_ratio, capacity, lengths)
    b = inputs_embeds.shape[0]
    rows = torch.arange(b)
    last = out.cache.seen - 1
    logits = out.logits[rows, last]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens, all_logits = [], []
    done = torch.zeros(b, dtype=torch.bool)
    cache = out.cache
    # the last token chosen is not fed back: a sequence may reach max_position_embeddings
    budget = min(max_new_tokens, model.config.max_position_embeddings - int(cache.seen.max()) + 1)
    if budget < 1:
        raise GammamodError(f"the prompt has {int(cache.seen.max())} tokens, more than the model's "
                            f"max_position_embeddings {model.config.max_position_embeddings}")
    for i in range(budget):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt)
        if return_logits:
            all_logits.append(logits)
        if on_token is not None:
            on_token(i, nxt)
        if i + 1 == budget or (eos_token_id is not None and bool(done.all())):
            break
        embeds = model.embed(nxt[:, None].to(model.lm_head.weight.device))
        step = Step(routing=routing, kv=cache, past_length=cache.seen.clone(),
                    valid=torch.ones(b, dtype=torch.long))
        hidden = model.forward_chunk(embeds, step)
        cache.seen += 1
        logits = model.lm_head(hidden[:, -1]).float()
    return GenerationOutput(tokens=torch.stack(tokens, 1) if tokens else torch.zeros(b, 0, dtype=torch.long),
                            kv_lengths=cache.lengths.clone(), kept=out.kept, capacity=out.capacity,
                            logits=torch.stack(all_logits, 1) if return_logits else None)


# --------------------------------------------------------------------------------------------
# prompts and images -> embeddings (the LLaVA input side of the PyTorch reference)


@dataclass
class PromptBatch:
    inputs_embeds: torch.Tensor  # [B, T, hidden], rows right-padded
    lengths: torch.Tensor  # [B]
    input_ids: list[list[int]]  # with IMAGE_TOKEN_INDEX where the image features go
    image_spans: list[tuple[int, int]] | None  # per row (start, image tokens)
    routable: list[tuple[int, int]] | None  # per row the recipe's routed span (start, length)


def prepare_prompts(model: MoDLlava, tokenizer, prompts: list[str], pixel_values=None) -> PromptBatch:
    """Tokenise LLaVA prompts (``<image>`` marks where the image goes), embed them and splice in
    the image features. ``pixel_values``: one image per prompt, as [B, 3, H, W] (numpy or torch)
    or as the runtime's ``ImageBatch`` (what ``model.vision.processor().process(pictures)``
    gives; anyres images need it: several tiles each, merged by their size); None for text-only
    prompts."""
    from gammamod.runtime.image import ImageBatch
    from gammamod.runtime.prompt import IMAGE_TOKEN_INDEX, tokenize_with_image

    ids = [tokenize_with_image(tokenizer, p) for p in prompts]
    n_images = [row.count(IMAGE_TOKEN_INDEX) for row in ids]
    has_image = pixel_values is not None
    if has_image and n_images != [1] * len(prompts):
        raise GammamodError(f"each prompt must hold exactly one <image> when an image is given (found {n_images})")
    if not has_image and any(n_images):
        raise GammamodError("a prompt holds <image> but no image was given")
    features = None
    if has_image:
        if not model.has_vision:
            why = model.vision.tower_source if model.vision is not None else "it has no vision tower or projector"
            raise GammamodError(f"this checkpoint cannot take images: {why}")
        images = pixel_values
        if not isinstance(images, ImageBatch):
            if model.vision.anyres is not None:
                raise GammamodError("anyres images: pass the ImageBatch that model.vision.processor().process(pictures) "
                                    "gives (each image's tiles and size), not pixel_values")
            pixels = torch.as_tensor(pixel_values)
            if pixels.dim() != 4:
                raise GammamodError(f"pixel_values of shape {list(pixels.shape)}: expected [{len(prompts)}, 3, H, W]")
            images = ImageBatch(pixels, [1] * pixels.shape[0], [])
        if len(images.rows) != len(prompts):
            raise GammamodError(f"{len(images.rows)} images for {len(prompts)} prompts: expected one per prompt")
        with torch.no_grad():
            features = model.image_features(images)
    rows, image_spans = [], []
    for b, row in enumerate(ids):
        if features is None:
            rows.append(model.embed(torch.tensor(row)))
            continue
        at = row.index(IMAGE_TOKEN_INDEX)
        before = model.embed(torch.tensor(row[:at], dtype=torch.long))
        after = model.embed(torch.tensor(row[at + 1:], dtype=torch.long))
        rows.append(torch.cat([before, features[b].to(before.dtype), after]))
        image_spans.append((at, features[b].shape[0]))
    lengths = torch.tensor([r.shape[0] for r in rows])
    width = int(lengths.max())
    embeds = torch.zeros(len(rows), width, model.config.hidden_size, dtype=model.dtype)
    for b, r in enumerate(rows):
        embeds[b, :r.shape[0]] = r.detach()
    routable = [model.recipe.routable_span(*s) for s in image_spans] if image_spans else None
    return PromptBatch(embeds, lengths, ids, image_spans or None, routable)


def prompt_batch(model: MoDLlava, checkpoint, questions: list[str], image=None, system: str | None = None,
                 tokenizer=None) -> PromptBatch:
    """The reference's inputs for questions about one image (a path or a PIL image; None: text
    only) in LLaVA's vicuna_v1 template: tokens, projected image features from the PyTorch tower,
    embeddings, and each row's routed span."""
    from gammamod.runtime.image import as_picture
    from gammamod.runtime.prompt import VICUNA_V1
    from gammamod.runtime.tokenizer import Tokenizer

    tokenizer = tokenizer or Tokenizer.from_dir(checkpoint)
    pixels = None
    if image is not None:
        picture = as_picture(image, str(image))
        if not model.has_vision:
            why = model.vision.tower_source if model.vision is not None else "it has no vision tower or projector"
            raise GammamodError(f"{checkpoint}: cannot take images: {why}")
        pixels = model.vision.processor().process([picture] * len(questions))
    prompts = [VICUNA_V1.prompt(q, has_image=image is not None, system=system) for q in questions]
    return prepare_prompts(model, tokenizer, prompts, pixels)


def routing_summary(model: MoDLlava, seq_len: int, kept: dict[int, torch.Tensor], routing: str) -> tuple[str, float]:
    """One line on how the prefill routed, and the decoder FLOP ratio against dense."""
    from .model import decoder_flops

    if not kept:
        return f"routing {routing}: every layer processed all {seq_len} tokens; decoder FLOPs 1.00x dense", 1.0
    counts = {layer: int(idx.shape[1]) for layer, idx in kept.items()}
    ratio = decoder_flops(model.config, seq_len, counts) / decoder_flops(model.config, seq_len)
    layers = sorted(counts)
    shown = " ".join(f"{layer}:{counts[layer]}" for layer in layers)
    return (f"routing {routing}: tokens kept per MoD layer (of {seq_len}) {shown}; "
            f"decoder FLOPs {ratio:.2f}x dense", ratio)


@dataclass
class TextResult:
    text: str
    tokens: list[int]
    summary: str
    flop_ratio: float
    kept_counts: dict[int, int]
    seq_len: int
    kv_lengths: list[int]


def generate_text(checkpoint, prompt: str, image=None, routing: str = "static", max_new_tokens: int = 64,
                  vision_tower=None, dtype=torch.float32, skip_ratio: float | None = None, vision_tower_slow=None,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  model: MoDLlava | None = None, on_token=None) -> TextResult:
    """``gammamod generate``: one question about one image (or none) through the PyTorch model."""
    from gammamod.runtime.sampling import check_sampling
    from gammamod.runtime.tokenizer import Tokenizer

    from .checkpoint import load_checkpoint

    check_sampling(temperature, top_p, top_k, max_new_tokens=max_new_tokens)
    if model is None:
        model = load_checkpoint(checkpoint, vision_tower=vision_tower, dtype=dtype, vision_tower_slow=vision_tower_slow)
    tokenizer = Tokenizer.from_dir(checkpoint)
    batch = prompt_batch(model, checkpoint, [prompt], image, tokenizer=tokenizer)
    routable = [(0, int(batch.lengths[0]))] if routing == "threshold" else batch.routable  # the whole prompt
    out = generate_from_embeds(model, batch.inputs_embeds, routable=routable, routing=routing,
                               max_new_tokens=max_new_tokens, skip_ratio=skip_ratio,
                               eos_token_id=tokenizer.eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, on_token=on_token)
    tokens = out.tokens[0].tolist()
    seq_len = int(batch.lengths[0])
    summary, ratio = routing_summary(model, seq_len, out.kept, routing)
    return TextResult(text=tokenizer.decode(tokens).strip(), tokens=tokens, summary=summary, flop_ratio=ratio,
                      kept_counts={k: int(v.shape[1]) for k, v in out.kept.items()}, seq_len=seq_len,
                      kv_lengths=out.kv_lengths[:, 0].tolist())
