"""``gammamod inspect``: which image patches each MoD layer kept, drawn over the image.

A deployer checks with it that static capacities do not cut away what the question is about.
From an artifact the routing is the deployed graph's (the decoder's ``kept_indices.<l>``
outputs, through the torch-free runtime); from a checkpoint it is the PyTorch model's (static
mode, or the authors' ``reference`` inference). The picture: per MoD layer a small map over the
image as the model sees it (padded, resized, cropped), kept patches bright and skipped ones dim,
titled with the layer and its kept counts (gamma-MoD also routes the system prompt: its share is
in the title); below, kept tokens per layer (image, routed text, text never routed) and each
layer's prefill FLOPs against the dense layer. ``routing.json`` beside the PNG has the numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

DIM = 0.22  # brightness of a skipped patch


@dataclass
class Routing:
    """One prompt's prefill routing, wherever it came from."""

    source: str  # "runtime (ort)" or "pytorch (static)"
    recipe: str
    seq_len: int
    image_block: tuple[int, int]  # (start, tokens) of the image in the sequence
    span: tuple[int, int] | None  # the routed span (start, length)
    kept: dict[int, np.ndarray]  # MoD layer -> kept sequence positions (ascending)
    layer_flops: list[float]  # prefill FLOPs of each decoder layer as routed
    dense_flops: float  # of one layer over every token
    picture: np.ndarray  # [S, S, 3] floats in [0, 1]: the image as the vision tower sees it
    cells: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)  # layer -> PNG box (x0, y0, x1, y1)

    @property
    def grid(self) -> int:
        side = math.isqrt(self.image_block[1])
        if side * side != self.image_block[1]:
            raise GammamodError(f"{self.image_block[1]} image tokens are not a square grid of patches; inspect draws "
                                "one square image")
        return side

    def image_kept(self, layer: int) -> np.ndarray:
        """[grid, grid] bools: the image patches ``layer`` kept."""
        start, n = self.image_block
        idx = self.kept[layer]
        mask = np.zeros(n, dtype=bool)
        mask[idx[(idx >= start) & (idx < start + n)] - start] = True
        return mask.reshape(self.grid, self.grid)

    def counts(self, layer: int) -> dict[str, int]:
        """Kept tokens of ``layer`` by kind: image, routed text (the span outside the image: gamma-MoD's
        system prompt), text never routed."""
        idx = self.kept.get(layer)
        positions = np.arange(self.seq_len)
        start, n = self.image_block
        image = (positions >= start) & (positions < start + n)
        routed = np.zeros(self.seq_len, dtype=bool)
        if self.span is not None:
            routed[self.span[0]:self.span[0] + self.span[1]] = True
        kept = np.zeros(self.seq_len, dtype=bool)
        kept[idx if idx is not None else positions] = True
        return {"image": int((kept & image).sum()), "routed_text": int((kept & routed & ~image).sum()),
                "text": int((kept & ~routed & ~image).sum()),
                "image_total": int(image.sum()), "routed_text_total": int((routed & ~image).sum())}


def inspect_routing(source, image, prompt: str, system: str | None = None, routing: str = "static",
                    vision_tower=None, vision_tower_slow=None) -> Routing:
    """The routing of ``prompt`` about ``image`` from an artifact (runtime) or a checkpoint (PyTorch)."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        if routing != "static":
            raise GammamodError(f"--routing {routing}: an artifact routes as it was exported (static); give the "
                                "checkpoint to see the PyTorch model's reference routing")
        return _from_runtime(source, image, prompt, system)
    if (source / "config.json").is_file():
        return _from_pytorch(source, image, prompt, system, routing, vision_tower, vision_tower_slow)
    raise GammamodError(f"{source}: expected an artifact directory (manifest.json) or a checkpoint directory "
                        "(config.json)")


def _picture(processor, picture) -> np.ndarray:
    """The image as the tower sees it: preprocessed, then un-normalised to [0, 1]."""
    pixels = processor.batch([picture])[0].transpose(1, 2, 0)
    if processor.do_normalize:
        pixels = pixels * processor.std + processor.mean
    return np.clip(pixels, 0.0, 1.0)


def _layer_flops(cfg, seq_len: int, kept: dict[int, np.ndarray]) -> tuple[list[float], float]:
    from gammamod.export.model import mod_layer_flops

    def flops(n):
        return mod_layer_flops(cfg, n, (n + 1) / 2)

    return [flops(len(kept[i]) if i in kept else seq_len) for i in range(cfg.num_layers)], flops(seq_len)


def _from_runtime(artifact: Path, image, prompt: str, system: str | None) -> Routing:
    from gammamod.runtime.image import load_image
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.runtime.prompt import IMAGE_TOKEN_INDEX

    from .bench import _config

    pipe = Pipeline.load(artifact)
    if pipe.image_processor is None:
        raise GammamodError(f"{artifact}: the artifact has no vision graph; inspect draws routing over an image")
    picture = load_image(image)
    prepared = pipe.prepare([picture], [prompt], system=system)
    gen = pipe.generator(1)
    gen.prefill(prepared.inputs_embeds, routable=prepared.routable, lengths=prepared.lengths)
    seq_len = int(prepared.lengths[0])
    # a threshold-routed artifact pads each row's kept indices after its own count
    counts = gen.kept_per_row
    kept = {layer: np.sort(np.asarray(idx[0][:int(counts[layer][0])] if layer in counts else idx[0], dtype=np.int64))
            for layer, idx in gen.kept.items()}
    flops, dense = _layer_flops(_config(pipe.manifest), seq_len, kept)
    block = (prepared.token_ids[0].index(IMAGE_TOKEN_INDEX), int(pipe.manifest["image"]["tokens"]))
    return Routing(f"runtime ({pipe.backend.describe()})", pipe.manifest["recipe"]["name"], seq_len, block,
                   tuple(prepared.routable[0]) if prepared.routable else None, kept, flops, dense,
                   _picture(pipe.image_processor, picture))


def _from_pytorch(checkpoint: Path, image, prompt: str, system: str | None, routing: str, vision_tower,
                  vision_tower_slow=None) -> Routing:
    import torch

    from gammamod.export import forward_language, load_checkpoint
    from gammamod.export.generate import prepare_prompts
    from gammamod.runtime.image import ImageProcessor, load_image
    from gammamod.runtime.prompt import VICUNA_V1
    from gammamod.runtime.tokenizer import Tokenizer

    model = load_checkpoint(checkpoint, vision_tower=vision_tower, vision_tower_slow=vision_tower_slow)
    if not model.has_vision:
        raise GammamodError(f"{checkpoint}: the checkpoint cannot take images; inspect draws routing over an image")
    processor = ImageProcessor(model.vision.image_processor, model.vision.image_aspect_ratio)
    picture = load_image(image)
    batch = prepare_prompts(model, Tokenizer.from_dir(checkpoint), [VICUNA_V1.prompt(prompt, system=system)],
                            torch.from_numpy(processor.batch([picture])))
    out = forward_language(model, batch.inputs_embeds, routable=batch.routable, routing=routing)
    seq_len = int(batch.lengths[0])
    kept = {layer: idx[0].cpu().numpy().astype(np.int64) for layer, idx in out.kept.items()}
    flops, dense = _layer_flops(model.config, seq_len, kept)
    return Routing(f"pytorch ({routing})", model.recipe.name, seq_len, tuple(batch.image_spans[0]),
                   tuple(batch.routable[0]) if batch.routable else None, kept, flops, dense,
                   _picture(processor, picture))


# -- the picture ------------------------------------------------------------------------------------
def _title(routing: Routing, layer: int) -> str:
    c = routing.counts(layer)
    title = f"L{layer}: {c['image']}/{c['image_total']} patches"
    if c["routed_text_total"]:
        title += f"\nsys {c['routed_text']}/{c['routed_text_total']}"
    return title


def draw(routing: Routing, out: Path, prompt: str = "", dpi: int = 100) -> Path:
    """Write the PNG (through a temporary file); fills ``routing.cells`` with each layer's map box
    in the PNG's pixels (x0, y0 from the top-left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(routing.kept)
    if not layers:
        raise GammamodError("the prompt routed nothing (a dense artifact, or no routed span): nothing to inspect")
    cols = min(8, len(layers))
    rows = -(-len(layers) // cols)
    extra_title = 0.3 if any(routing.counts(layer)["routed_text_total"] for layer in layers) else 0.0
    map_h = 1.75 + extra_title
    fig = plt.figure(figsize=(1.7 * max(cols, 6), map_h * rows + 3.6), dpi=dpi)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[map_h] * rows + [3.0], hspace=0.55, wspace=0.15,
                            left=0.06, right=0.98, top=1 - (1.0 if prompt else 0.7) / (map_h * rows + 3.6),
                            bottom=0.08)
    axes = {}
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        shade = _fit(np.where(routing.image_kept(layer), 1.0, DIM), routing.picture.shape[:2])
        ax.imshow(routing.picture * shade[..., None], interpolation="nearest")
        ax.set_title(_title(routing, layer), fontsize=8)
        ax.set_axis_off()
        axes[layer] = ax
    _bars(fig, grid[rows, :], routing)
    fig.suptitle(f"{routing.recipe} routing, {routing.source}: {routing.seq_len} tokens, image at "
                 f"{routing.image_block[0]}..{sum(routing.image_block) - 1}"
                 + (f", routed span ({routing.span[0]}, {routing.span[1]})" if routing.span else "")
                 + (f"\n{prompt!r}" if prompt else ""), fontsize=10)
    fig.canvas.draw()
    height = fig.bbox.height
    for layer, ax in axes.items():
        box = ax.get_window_extent()
        routing.cells[layer] = (box.x0, height - box.y1, box.x1, height - box.y0)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _fit(shade: np.ndarray, shape) -> np.ndarray:
    """A patch grid's values per pixel of a picture of ``shape`` (each patch covers its share)."""
    rows = np.minimum((np.arange(shape[0]) * shade.shape[0]) // shape[0], shade.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * shade.shape[1]) // shape[1], shade.shape[1] - 1)
    return shade[rows][:, cols]


def _bars(fig, spec, routing: Routing) -> None:
    sub = spec.subgridspec(1, 2, wspace=0.22)
    layers = np.arange(len(routing.layer_flops))
    counts = [routing.counts(int(layer)) for layer in layers]
    ax = fig.add_subplot(sub[0])
    bottom = np.zeros(len(layers))
    for key, label, colour in (("text", "text (never routed)", "#9e9e9e"),
                               ("routed_text", "routed text (system prompt)", "#f0a030"),
                               ("image", "image patches", "#3070c0")):
        values = np.array([c[key] for c in counts], dtype=float)
        if key == "routed_text" and not values.any():
            continue
        ax.bar(layers, values, bottom=bottom, color=colour, label=label, width=0.8)
        bottom += values
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens kept in prefill")
    ax.set_title(f"kept tokens per layer (of {routing.seq_len})", fontsize=10)
    ax.set_ylim(0, routing.seq_len * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax = fig.add_subplot(sub[1])
    ratio = sum(routing.layer_flops) / (routing.dense_flops * len(layers))
    scale, unit = (1e9, "GFLOPs") if routing.dense_flops >= 1e9 else (1e6, "MFLOPs")
    ax.bar(layers, np.array(routing.layer_flops) / scale, color="#50a050", width=0.8)
    ax.axhline(routing.dense_flops / scale, color="black", linestyle="--", linewidth=1, label="a dense layer")
    ax.set_ylim(0, routing.dense_flops / scale * 1.3)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"prefill {unit}")
    ax.set_title(f"FLOPs per layer: decoder {ratio:.2f}x dense", fontsize=10)
    ax.legend(fontsize=7, loc="upper center")


def write_json(routing: Routing, path: Path) -> Path:
    data = {"source": routing.source, "recipe": routing.recipe, "seq_len": routing.seq_len,
            "image_block": list(routing.image_block), "span": list(routing.span) if routing.span else None,
            "flop_ratio": sum(routing.layer_flops) / (routing.dense_flops * len(routing.layer_flops)),
            "layers": {str(layer): {"kept": routing.kept[layer].tolist(), **routing.counts(layer),
                                    "flops": routing.layer_flops[layer]} for layer in sorted(routing.kept)}}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def run_inspect(source, image, prompt: str, out, system: str | None = None, routing: str = "static",
                vision_tower=None, vision_tower_slow=None, force: bool = False) -> tuple[Routing, Path, Path]:
    """``gammamod inspect``: the PNG at ``out`` and ``routing.json`` beside it (same stem)."""
    out = Path(out)
    data = out.with_suffix(".json")
    if out.suffix.lower() != ".png":
        raise GammamodError(f"--out {out}: expected a .png path")
    for path in (out, data):
        if path.exists() and not force:
            raise GammamodError(f"{path}: already exists (pass --force to replace it)")
        if path.is_dir() or path.is_symlink():
            raise GammamodError(f"{path}: is a directory or a symbolic link; give --out a file path of its own")
    if not out.parent.is_dir():
        raise GammamodError(f"--out {out}: the directory {out.parent} does not exist")
    result = inspect_routing(source, image, prompt, system=system, routing=routing, vision_tower=vision_tower,
                             vision_tower_slow=vision_tower_slow)
    draw(result, out, prompt=prompt)
    write_json(result, data)
    return result, out, data
