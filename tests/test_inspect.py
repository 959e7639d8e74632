"""gammamod inspect: the routing picture from the runtime and from the PyTorch model, checked
pixel by pixel against the kept indices it draws."""

import json

import numpy as np
import pytest
from PIL import Image

from gammamod.errors import GammamodError
from gammamod.validate.inspect_routing import DIM, run_inspect


def check_picture(routing, png):
    """Every drawn patch is bright where the layer kept it and dim where it skipped it, judged
    against the picture the vision tower sees, at the centre of each patch's cell."""
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255
    g, side = routing.grid, routing.picture.shape[0]
    for layer, (x0, y0, x1, y1) in routing.cells.items():
        kept = routing.image_kept(layer)
        seen = {True: 0, False: 0}
        for r in range(g):
            for c in range(g):
                px, py = int(x0 + (c + 0.5) * (x1 - x0) / g), int(y0 + (r + 0.5) * (y1 - y0) / g)
                sx, sy = int((c + 0.5) * side / g), int((r + 0.5) * side / g)
                source = routing.picture[sy - 1:sy + 2, sx - 1:sx + 2].mean()
                if source < 0.15:  # too dark to tell bright from dim
                    continue
                ratio = img[py - 1:py + 2, px - 1:px + 2].mean() / source
                assert (ratio > (1 + DIM) / 2) == kept[r, c], (layer, r, c, ratio)
                seen[bool(kept[r, c])] += 1
        assert seen[True] and seen[False], (layer, seen)  # both kinds were checked


def test_inspect_from_the_runtime_draws_the_kept_indices(art_gamma, test_image_path, tmp_path):
    """gamma-MoD routes the system prompt too: its share is counted; the PNG's size is the figure's."""
    from gammamod.runtime.pipeline import Pipeline

    routing, png, data = run_inspect(art_gamma, test_image_path, "Where is the car?", tmp_path / "routing.png")
    size = Image.open(png).size
    assert size[0] >= 800 and size[1] >= 500
    start, length = routing.span
    assert routing.recipe.startswith("gamma") and start == 0 and length > routing.image_block[1]
    numbers = json.loads(data.read_text())
    rule = Pipeline.load(art_gamma).generator(1).kept_counts(length)  # the manifest's kept-count rule
    assert sorted(rule) == sorted(routing.kept)
    for layer, kept in routing.kept.items():
        c = routing.counts(layer)
        assert c["routed_text_total"] == length - routing.image_block[1]
        assert c["image"] + c["routed_text"] == len(kept) - (routing.seq_len - length) == rule[layer]
        assert numbers["layers"][str(layer)]["kept"] == kept.tolist()
    assert any(routing.counts(layer)["image"] < routing.image_block[1] for layer in routing.kept)
    check_picture(routing, png)


def test_inspect_from_the_checkpoint_equals_the_runtime(tiny_pmod, art_pmod, test_image_path, tmp_path):
    """The PyTorch model (static mode) keeps exactly the patches the exported graph keeps (fp32)."""
    runtime, _, _ = run_inspect(art_pmod, test_image_path, "What is in the picture?", tmp_path / "rt.png")
    torch_side, png, _ = run_inspect(tiny_pmod, test_image_path, "What is in the picture?", tmp_path / "pt.png")
    assert torch_side.source.startswith("pytorch") and runtime.source.startswith("runtime")
    assert sorted(runtime.kept) == sorted(torch_side.kept)
    for layer in runtime.kept:
        assert runtime.kept[layer].tolist() == torch_side.kept[layer].tolist(), layer
    assert all(torch_side.counts(layer)["routed_text_total"] == 0 for layer in torch_side.kept)  # p-MoD: image only
    check_picture(torch_side, png)


def test_inspect_refuses_bad_arguments(art_pmod, test_image_path, tmp_path):
    with pytest.raises(GammamodError, match="expected a .png path"):
        run_inspect(art_pmod, test_image_path, "hi", tmp_path / "routing.jpg")
    (tmp_path / "taken.png").write_bytes(b"")
    with pytest.raises(GammamodError, match="already exists"):
        run_inspect(art_pmod, test_image_path, "hi", tmp_path / "taken.png")
    with pytest.raises(GammamodError, match="expected an artifact directory"):
        run_inspect(tmp_path, test_image_path, "hi", tmp_path / "x.png")
    with pytest.raises(GammamodError, match="routes as it was exported"):
        run_inspect(art_pmod, test_image_path, "hi", tmp_path / "y.png", routing="reference")
