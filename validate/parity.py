"""Decoder parity: an exported artifact run by the runtime against the PyTorch reference.

Both sides get the same prompt embeddings; the reference's greedy tokens are fed back to the
runtime, so every step compares the same computation: prefill logits, kept indices of every MoD
layer, decode logits, and each layer's KV length per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gammamod.export.generate import PromptBatch, generate_from_embeds, prompt_batch


def rel_err(a, b) -> float:
    """Max absolute difference over the reference's max magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@dataclass
class DecoderParity:
    prefill_rel_err: float
    decode_rel_err: list[float]
    kept_match: dict[int, float]  # MoD layer -> share of rows whose kept indices are identical
    kv_lengths_match: bool
    greedy_match: int  # steps before the runtime's own argmax first differs from the reference's token
    steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def max_rel_err(self) -> float:
        return max([self.prefill_rel_err, *self.decode_rel_err])


def reference_batch(model, checkpoint, questions: list[str], image=None) -> PromptBatch:
    """The reference's prompt embeddings (image features from the PyTorch tower)."""
    return prompt_batch(model, checkpoint, questions, image)


def decoder_parity(model, pipeline, batch: PromptBatch, routing: str = "static", steps: int = 8) -> DecoderParity:
    ref = generate_from_embeds(model, batch.inputs_embeds, routable=batch.routable, routing=routing,
                               max_new_tokens=steps + 1, lengths=batch.lengths, return_logits=True)
    gen = pipeline.generator(batch_size=batch.inputs_embeds.shape[0])
    logits = gen.prefill(batch.inputs_embeds.numpy(), routable=batch.routable, lengths=batch.lengths.numpy())
    prefill_err = rel_err(logits, ref.logits[:, 0])
    kept = {}
    for layer, idx in ref.kept.items():
        ours = gen.kept.get(layer)
        kept[layer] = 0.0 if ours is None or ours.shape != tuple(idx.shape) else float(
            np.mean([np.array_equal(ours[b], idx[b].numpy()) for b in range(idx.shape[0])]))
    greedy = steps + 1 if np.array_equal(logits.argmax(-1), ref.tokens[:, 0].numpy()) else 0
    errs = []
    for i in range(steps):
        logits = gen.decode(ref.tokens[:, i].numpy())
        errs.append(rel_err(logits, ref.logits[:, i + 1]))
        if greedy == steps + 1 and not np.array_equal(logits.argmax(-1), ref.tokens[:, i + 1].numpy()):
            greedy = i + 1
    return DecoderParity(prefill_err, errs, kept, bool(np.array_equal(gen.kv_lengths(), ref.kv_lengths.numpy())),
                         greedy, steps)
