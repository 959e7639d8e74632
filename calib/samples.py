"""The PyTorch model and its inputs for each calibration sample (``arank`` and ``capacity``).

A sample becomes one prompt in LLaVA's vicuna_v1 template, with its image when the checkpoint can
take images (a language-only checkpoint gets the prompts alone), embedded by the PyTorch
reference exactly as ``gammamod generate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from gammamod.errors import GammamodError

from .data import calibration_set


@dataclass
class Prepared:
    embeds: object  # torch.Tensor [1, T, hidden]
    length: int  # T
    image_span: tuple[int, int] | None  # (start, tokens) of the image block
    routable: tuple[int, int] | None  # the recipe's routed span (static routing)


def load_model(checkpoint, vision_tower=None, vision_tower_slow=None):
    from gammamod.export import load_checkpoint

    return load_checkpoint(checkpoint, vision_tower=vision_tower, vision_tower_slow=vision_tower_slow)


def prepared_samples(model, checkpoint, data=None, random=None, seed: int = 0):
    """Yield one :class:`Prepared` per calibration sample (``--data``, ``--random`` or the shipped set)."""
    from gammamod.export.generate import prompt_batch
    from gammamod.runtime.tokenizer import Tokenizer

    samples = calibration_set(data, random, seed, with_images=model.has_vision)
    tokenizer = Tokenizer.from_dir(checkpoint)
    for sample in samples:
        batch = prompt_batch(model, checkpoint, [sample.prompt], sample.image, tokenizer=tokenizer)
        length = int(batch.lengths[0])
        if length > model.config.max_position_embeddings:
            raise GammamodError(f"calibration prompt {sample.prompt!r}: {length} tokens, more than the model's "
                                f"max_position_embeddings {model.config.max_position_embeddings}")
        yield Prepared(batch.inputs_embeds[:, :length], length,
                       batch.image_spans[0] if batch.image_spans else None,
                       batch.routable[0] if batch.routable else None)
