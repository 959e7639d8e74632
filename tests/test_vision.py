"""The released checkpoints' vision: LLaVA-HR's CLIP + ConvNeXt tower (gamma-MoD) and LLaVA-NeXT
anyres (p-MoD). The references here are written from the authors' code independently of
``export/llava_hr.py`` and ``runtime/anyres.py`` (functional torch, transformers' CLIP and image
processor, Pillow), so a shared mistake cannot pass unnoticed."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from gammamod.errors import GammamodError

torch = pytest.importorskip("torch")
F = torch.nn.functional

SLOW = "model.vision_tower.slow_vision_tower.vision_tower."
FAST = "model.vision_tower.fast_vision_tower.vision_tower."
MEAN = (0.48145466, 0.4578275, 0.40821073)
# LLaVA-NeXT's pinpoints as the p-MoD NeXT training script sets them (width, height)
NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some structure (so resampling differences would show)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.01, 0.1, 3)
    arr = np.stack([127 + 120 * np.sin(a[c] * x + (c + 1) * 0.03 * y) for c in range(3)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# LLaVA-HR (gamma-MoD)


def _state(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def reference_hr_tower(state: dict, clip_dir, pixels: torch.Tensor, size: int) -> torch.Tensor:
    """LLaVA-HR's multi-path tower read off the authors' ``multipath_encoder_wapper.py`` (functional
    ConvNeXt, transformers' CLIP): [N, 3, S, S] -> [N, tokens, CLIP width]."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    def s(k):
        return state[SLOW + k].float()

    def ln2d(x, w, b):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-6).permute(0, 3, 1, 2)

    # ConvNeXt: stem, four stages, only the last map used
    x = F.conv2d(pixels, s("stem.0.weight"), s("stem.0.bias"), stride=s("stem.0.weight").shape[-1])
    x = ln2d(x, s("stem.1.weight"), s("stem.1.bias"))
    for i in range(4):
        if i:
            x = ln2d(x, s(f"stages.{i}.downsample.0.weight"), s(f"stages.{i}.downsample.0.bias"))
            x = F.conv2d(x, s(f"stages.{i}.downsample.1.weight"), s(f"stages.{i}.downsample.1.bias"), stride=2)
        j = 0
        while SLOW + f"stages.{i}.blocks.{j}.weight" in state:
            p = f"stages.{i}.blocks.{j}."
            k = s(p + "conv_dw.weight").shape[-1]
            y = F.conv2d(x, s(p + "conv_dw.weight"), s(p + "conv_dw.bias"), padding=k // 2, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), s(p + "norm.weight"), s(p + "norm.bias"), 1e-6)
            y = F.linear(F.gelu(F.linear(y, s(p + "mlp.fc1.weight"), s(p + "mlp.fc1.bias"))),
                         s(p + "mlp.fc2.weight"), s(p + "mlp.fc2.bias"))
            x = x + y.permute(0, 3, 1, 2) * s(p + "weight").reshape(1, -1, 1, 1)
            j += 1
    slow = x

    clip = CLIPVisionModel(CLIPVisionConfig(**json.loads((clip_dir / "config.json").read_text()))).eval()
    vm = getattr(clip, "vision_model", clip)  # transformers 5 flattened CLIPVisionModel
    prefix = FAST + "vision_model."
    missing, _ = vm.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)},
                                    strict=False)
    assert not missing
    fast = max(int(size / 32 * 14), 336)
    y = F.interpolate(pixels, size=(fast, fast), mode="bilinear", align_corners=True)
    patches = vm.embeddings.patch_embedding(y).flatten(2).transpose(1, 2)
    n = pixels.shape[0]
    tokens = torch.cat([vm.embeddings.class_embedding.expand(n, 1, -1), patches], 1)
    pos = vm.embeddings.position_embedding.weight
    old, new = int(math.sqrt(pos.shape[0] - 1)), int(math.sqrt(patches.shape[1]))
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[new, new], mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(-1, pos.shape[1])
    tokens = tokens + torch.cat([pos[:1], grid])
    y = vm.pre_layrnorm(tokens[:, 1:])  # the class token dropped before the pre-layernorm

    def adapter(f, k):
        a = lambda name: state[f"model.vision_tower.align_stages_latent.{k}.{name}"].float()  # noqa: E731
        d = f.shape[-1]
        side = int(math.sqrt(f.shape[1]))
        sl = F.conv2d(F.gelu(F.conv2d(slow, a("slow_conv.weight"), a("slow_conv.bias"))),
                      a("slow_proj.weight"), a("slow_proj.bias")).flatten(2).transpose(1, 2)
        assert sl.shape[1] == f.shape[1]  # the released geometry: the maps align without resizing
        g = f.transpose(1, 2).reshape(n, d, side, side)
        g = g + F.conv2d(F.gelu(F.conv2d(g, a("fast_conv.weight"), a("fast_conv.bias"), padding=3, groups=d)),
                         a("fast_proj.weight"), a("fast_proj.bias"))
        g = g.flatten(2).transpose(1, 2)
        gate = F.linear(F.gelu(F.linear(torch.cat([g, sl], -1).mean(1), a("gate.0.weight"), a("gate.0.bias"))),
                        a("gate.2.weight"), a("gate.2.bias")).unsqueeze(1)
        return g + sl * torch.tanh(gate)

    layers = vm.encoder.layers
    quarter = len(layers) // 4
    import inspect

    for i, layer in enumerate(layers):
        if "causal_attention_mask" in inspect.signature(type(layer).forward).parameters:
            y = layer(y, None, None)[0]
        else:
            y = layer(y, None)
        if (i + 1) in (quarter, 2 * quarter, 3 * quarter):
            y = adapter(y, (i + 1) // quarter - 1)
    fuse = lambda name: state["model.vision_tower.align_stages.0." + name].float()  # noqa: E731
    return (F.linear(y, fuse("fast_proj.weight"), fuse("fast_proj.bias"))
            + F.linear(slow.flatten(2).transpose(1, 2), fuse("slow_proj.weight"), fuse("slow_proj.bias")))


def test_hr_checkpoint_has_the_released_key_layout(tiny_hr):
    keys = set(_state(tiny_hr))
    assert {k for k in keys if k.startswith("model.vision_tower.align_stages_latent.")} == {
        f"model.vision_tower.align_stages_latent.{i}.{m}.{p}" for i in range(3)
        for m in ("slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate.0", "gate.2") for p in ("weight", "bias")}
    assert {f"model.vision_tower.align_stages.0.{m}.{p}" for m in ("fast_proj", "slow_proj") for p in ("weight", "bias")} <= keys
    assert SLOW + "stages.2.blocks.1.weight" in keys and not any(k.endswith(".gamma") for k in keys)
    assert SLOW + "head.fc.weight" in keys and FAST + "vision_model.post_layernorm.weight" in keys  # saved, unused
    assert {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} <= keys
    config = json.loads((tiny_hr / "config.json").read_text())
    assert config["is_multipath_encoder"] and config["freeze_vision"] is False and config["input_image_size"] == 256


def test_hr_tower_is_the_authors_forward(tiny_hr):
    """Loaded from the checkpoint, the tower (both branches, adapters with non-zero weights, the
    fusion) computes what the authors' forward computes, and the projector follows it."""
    from gammamod.export import load_checkpoint

    model = load_checkpoint(tiny_hr)
    assert model.vision.multipath is not None and model.vision.image_tokens == 64
    state = _state(tiny_hr)
    assert all(state[f"model.vision_tower.align_stages_latent.{i}.slow_proj.weight"].abs().sum() > 0 for i in range(3))
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.model.vision_tower(pixels)
        want = reference_hr_tower(state, tiny_hr / "clip-vision-tower", pixels, 256)
        assert got.shape == (2, 64, 64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        without = model.model.vision_tower.align_stages_latent
        del model.model.vision_tower.align_stages_latent  # the adapters do change the features
        assert (model.model.vision_tower(pixels) - got).abs().max() > 1e-3
        model.model.vision_tower.align_stages_latent = without
        assert model.encode_images(pixels).shape == (2, 64, model.config.hidden_size)


def test_hr_preprocessing_is_the_convnext_processor_after_the_mean_colour_pad(tiny_hr):
    """The runtime's numpy + Pillow path equals the authors': expand2square in int(mean * 255),
    then the ConvNeXt branch's CLIPImageProcessor (bicubic to input_image_size), not CLIP's."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from gammamod.export import load_checkpoint
    from gammamod.export.llava_hr import convnext_processor
    from gammamod.runtime.image import expand_to_square

    fill = tuple(int(x * 255) for x in MEAN)
    assert fill == (122, 116, 104)
    model = load_checkpoint(tiny_hr)
    oracle = CLIPImageProcessorPil(**convnext_processor(256))
    proc = model.vision.processor()
    for w, h in ((640, 480), (200, 500), (256, 256), (97, 301)):
        img = picture(w, h)
        want = oracle(expand_to_square(img, fill), return_tensors="np")["pixel_values"][0]
        got = proc.process([img]).pixels[0]
        assert got.shape == (3, 256, 256)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_hr_loads_without_a_tower_directory_and_refuses_a_partial_tower(tiny_hr, copy_ckpt):
    from safetensors.torch import load_file, save_file

    from gammamod.export import load_checkpoint

    ckpt = copy_ckpt(tiny_hr)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # what the releases name
    (ckpt / "config.json").write_text(json.dumps(config))
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_checkpoint(tiny_hr).encode_images(pixels)
        torch.testing.assert_close(load_checkpoint(ckpt).encode_images(pixels), want)
        got = load_checkpoint(ckpt, vision_tower=tiny_hr / "clip-vision-tower").encode_images(pixels)
        torch.testing.assert_close(got, want)
    state = load_file(str(ckpt / "model.safetensors"))
    for key in ("model.vision_tower.align_stages_latent.1.gate.2.weight", SLOW + "stages.2.blocks.1.mlp.fc2.bias",
                FAST + "vision_model.encoder.layers.3.self_attn.q_proj.weight"):
        partial = {k: v for k, v in state.items() if k != key}
        save_file(partial, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(GammamodError, match=f"missing key {key.replace('.', '[.]')}") as err:
            load_checkpoint(ckpt)
        assert "\n" not in str(err.value)
    del config["input_image_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GammamodError, match="input_image_size"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("layout", ["timm", "open_clip"])
def test_hr_convnext_weights_from_a_local_directory(tiny_hr, tmp_path, layout):
    """A checkpoint without the ConvNeXt branch's weights plus timm's (or open_clip's) download of
    them loads the same model; where both hold a tensor the checkpoint's wins, as in the authors'
    code (timm's pretrained weights first, the checkpoint loaded over them)."""
    from safetensors.torch import load_file, save_file

    from gammamod.export import load_checkpoint
    from gammamod.export.checkpoint import open_checkpoint
    from gammamod.export.tiny_vision import split_convnext

    ckpt, convnext = split_convnext(tiny_hr, tmp_path / "ckpt", tmp_path / "convnext", layout)
    assert not any(k.startswith(SLOW) for k in load_file(str(ckpt / "model.safetensors")))
    whole = load_checkpoint(tiny_hr)
    want = whole.state_dict()
    got = load_checkpoint(ckpt, vision_tower_slow=convnext).state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert "61 ConvNeXt tensors" in open_checkpoint(ckpt, vision_tower_slow=convnext).vision.tower_source
    with pytest.raises(GammamodError, match=f"missing key {SLOW}stem.0.weight .*--vision-tower-slow") as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    if layout != "timm":
        return
    # the config's vision_tower_slow naming a local directory (here: beside the weights) is found
    name = json.loads((ckpt / "config.json").read_text())["vision_tower_slow"]
    shutil.copytree(convnext, ckpt / name)
    got = load_checkpoint(ckpt).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    shutil.rmtree(ckpt / name)
    # precedence: the directory's values all shifted; the checkpoint keeps the last stage
    timm = load_file(str(convnext / "model.safetensors"))
    save_file({k: v + 1 for k, v in timm.items()}, str(convnext / "model.safetensors"), metadata={"format": "pt"})
    state = load_file(str(tiny_hr / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith(SLOW) or k.startswith(SLOW + "stages.3.")},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    mixed = load_checkpoint(ckpt, vision_tower_slow=convnext).state_dict()
    for k in want:
        if k.startswith(SLOW + "stages.3."):
            assert torch.equal(mixed[k], want[k]), k
        elif k.startswith(SLOW):
            assert torch.equal(mixed[k], want[k] + 1), k
    assert "not " + str(convnext) in open_checkpoint(tiny_hr, vision_tower_slow=convnext).vision.tower_source
    assert torch.equal(load_checkpoint(tiny_hr, vision_tower_slow=convnext).state_dict()[SLOW + "stem.0.weight"],
                       want[SLOW + "stem.0.weight"])
    # a tensor in neither: named, with both places
    key = "stages.2.blocks.1.mlp.fc2.bias"
    save_file({k: v for k, v in timm.items() if k != key}, str(convnext / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(GammamodError, match=f"missing key {SLOW}{key} .*not in {convnext} either"):
        load_checkpoint(ckpt, vision_tower_slow=convnext)


def test_hr_clip_weights_from_the_tower_directory(tiny_hr, copy_ckpt):
    """The CLIP branch likewise: weights the checkpoint lacks come from --vision-tower's directory."""
    from safetensors.torch import load_file, save_file

    from gammamod.export import load_checkpoint

    ckpt = copy_ckpt(tiny_hr)
    state = load_file(str(ckpt / "model.safetensors"))
    clip = {k[len(FAST):]: v for k, v in state.items() if k.startswith(FAST)}
    save_file({k: v for k, v in state.items() if not k.startswith(FAST)}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(GammamodError, match=f"missing key {FAST}vision_model.*--vision-tower DIR"):
        load_checkpoint(ckpt)
    tower = ckpt / "clip-vision-tower"
    save_file(clip, str(tower / "model.safetensors"), metadata={"format": "pt"})
    want = load_checkpoint(tiny_hr).state_dict()
    got = load_checkpoint(ckpt, vision_tower=tower).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_hr_convnext_directory_refusals(tiny_hr, tiny_next, tmp_path, capsys):
    from safetensors.torch import save_file

    from gammamod import cli
    from gammamod.export import load_checkpoint
    from gammamod.export.tiny_vision import split_convnext

    ckpt, convnext = split_convnext(tiny_hr, tmp_path / "ckpt", tmp_path / "convnext", "timm")
    empty = tmp_path / "empty"
    empty.mkdir()
    fb = tmp_path / "fb"
    fb.mkdir()
    save_file({"downsample_layers.0.0.weight": torch.zeros(16, 3, 4, 4)}, str(fb / "model.safetensors"))
    vit = tmp_path / "vit"
    vit.mkdir()
    save_file({"stem.0.weight": torch.zeros(1)}, str(vit / "model.safetensors"))
    (vit / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_clip_336"}))
    cases = [(ckpt, tmp_path / "nowhere", "no such directory"),
             (ckpt, empty, "no ConvNeXt weights .*model.safetensors"),
             (ckpt, fb, "Facebook's original ConvNeXt layout"),
             (ckpt, vit, "'vit_large_patch14_clip_336' is not a ConvNeXt"),
             (ckpt, ckpt / "config.json", "expected a directory, or a .safetensors or .bin weight file"),
             (tiny_next, convnext, "no LLaVA-HR multi-path tower")]
    for where, slow, message in cases:
        with pytest.raises(GammamodError, match=message) as err:
            load_checkpoint(where, vision_tower_slow=slow)
        assert "\n" not in str(err.value)
    # the command line: generate from the split checkpoint equals the whole one; export refuses
    # the bad directory before writing anything
    args = ["generate", "--prompt", "What is in the picture?", "--max-new-tokens", "4"]
    picture(300, 200).save(tmp_path / "p.png")
    args += ["--image", str(tmp_path / "p.png")]
    assert cli.main(args[:1] + [str(tiny_hr)] + args[1:]) == 0
    want = capsys.readouterr().out
    assert cli.main(args[:1] + [str(ckpt), "--vision-tower-slow", str(convnext)] + args[1:]) == 0
    assert capsys.readouterr().out == want
    assert cli.main(["export", str(ckpt), str(tmp_path / "art"), "--vision-tower-slow", str(fb)]) == 2
    assert "Facebook's original ConvNeXt layout" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()
    # the ConvNeXt directory is an input: never replaced, even with --force
    before = sorted(p.name for p in convnext.iterdir())
    assert cli.main(["export", str(ckpt), str(convnext), "--vision-tower-slow", str(convnext), "--force"]) == 2
    assert f"is the input {convnext}" in capsys.readouterr().err
    assert sorted(p.name for p in convnext.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT anyres (p-MoD)


def test_anyres_token_counts_are_the_authors():
    """Grids, unpadding and newlines on the released geometry (336-pixel tiles, 24 x 24 patches):
    counts worked out by hand from LLaVA's select_best_resolution and unpad_image."""
    from gammamod.runtime.anyres import AnyRes

    grid = AnyRes(NEXT_PINPOINTS, 336, 24)
    table = {(640, 480): ((2, 2), 2340), (480, 640): ((2, 2), 2352), (1024, 1024): ((2, 2), 2928),
             (336, 336): ((1, 2), 1176),  # a full tie: the first pinpoint listed wins
             (1920, 1080): ((2, 2), 1948),  # int() and symmetric floor padding keep 28 rows, not 27
             (800, 200): ((3, 1), 1890), (100, 1000): ((1, 3), 1224)}
    for size, (tiles, tokens) in table.items():
        assert (grid.grid(size), grid.tokens(size)) == (tiles, tokens), size


def reference_best_resolution(size, pinpoints):
    """LLaVA's select_best_resolution."""
    w0, h0 = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        if eff > best_eff or (eff == best_eff and w * h - eff < best_waste):
            best, best_eff, best_waste = (w, h), eff, w * h - eff
    return best


def reference_anyres_pixels(img: Image.Image, pinpoints, tile: int, processor) -> np.ndarray:
    """LLaVA's process_anyres_image (p-MoD's llava/mm_utils.py), step by step."""
    w0, h0 = img.size
    tw, th = reference_best_resolution((w0, h0), pinpoints)
    if tw / w0 < th / h0:
        nw, nh = tw, min(math.ceil(h0 * tw / w0), th)
    else:
        nw, nh = min(math.ceil(w0 * th / h0), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    patches = [canvas.crop((j, i, j + tile, i + tile)) for i in range(0, th, tile) for j in range(0, tw, tile)]
    base = img.resize((tile, tile))
    return np.stack([processor(p, return_tensors="np")["pixel_values"][0] for p in [base] + patches])


def reference_anyres_merge(features: torch.Tensor, size, pinpoints, tile: int, newline: torch.Tensor):
    """p-MoD's prepare_inputs_labels_for_multimodal_mod for one image (spatial_unpad)."""
    w0, h0 = size
    best = reference_best_resolution(size, pinpoints)
    npw, nph = best[0] // tile, best[1] // tile
    side = int(math.sqrt(features.shape[1]))
    base, feat = features[0], features[1:]
    feat = feat.view(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    cur_h, cur_w = feat.shape[1:]
    if w0 / h0 > cur_w / cur_h:
        new_h = int(h0 * (cur_w / w0))
        pad = (cur_h - new_h) // 2
        feat = feat[:, pad:cur_h - pad, :]
    else:
        new_w = int(w0 * (cur_h / h0))
        pad = (cur_w - new_w) // 2
        feat = feat[:, :, pad:cur_w - pad]
    feat = torch.cat((feat, newline[:, None, None].expand(*feat.shape[:-1], 1)), dim=-1)
    return torch.cat([base, feat.flatten(1, 2).transpose(0, 1)])


NEXT_SIZES = [(200, 500), (300, 90), (180, 170)]  # 1x3, 3x1 and 2x2 tiles on the tiny grids


def test_anyres_preprocessing_and_merge_are_the_authors(tiny_next):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from gammamod.export import load_checkpoint

    model = load_checkpoint(tiny_next)
    anyres = model.vision.anyres
    tile = anyres.tile
    oracle = CLIPImageProcessorPil(**json.loads((tiny_next / "clip-vision-tower" / "preprocessor_config.json")
                                                .read_text()))
    pinpoints = json.loads((tiny_next / "config.json").read_text())["image_grid_pinpoints"]
    grids = set()
    for w, h in NEXT_SIZES + [(84, 84), (1, 40)]:
        img = picture(w, h)
        batch = model.vision.processor().process([img])
        want = reference_anyres_pixels(img, pinpoints, tile, oracle)
        assert batch.pixels.shape == want.shape
        np.testing.assert_allclose(batch.pixels, want, atol=1e-5, rtol=0)
        grids.add(anyres.grid((w, h)))
        with torch.no_grad():
            [ours] = model.image_features(batch)
            features = model.encode_images(torch.from_numpy(want))
            ref = reference_anyres_merge(features, (w, h), pinpoints, tile, model.model.image_newline)
        assert ours.shape == (anyres.tokens((w, h)), model.config.hidden_size)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        numpy_merge = anyres.assemble(features.numpy(), (w, h), model.model.image_newline.detach().numpy())
        np.testing.assert_allclose(numpy_merge, ref.numpy(), atol=1e-6, rtol=0)
    assert len(grids) >= 3


def test_next_checkpoint_refuses_what_p_mod_does_not_run(tiny_next, copy_ckpt):
    from gammamod.export import load_checkpoint

    ckpt = copy_ckpt(tiny_next)
    config = json.loads((ckpt / "config.json").read_text())
    for change, message in (({"mm_patch_merge_type": "flat"}, "spatial_unpad"),
                            ({"image_grid_pinpoints": [[84, 100]]}, "not a multiple"),
                            ({"image_grid_pinpoints": "[[84, 168"}, "image_grid_pinpoints"),
                            ({"max_num_patches": 4}, "max_num_patches")):
        (ckpt / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(GammamodError, match=message) as err:
            load_checkpoint(ckpt)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# exported: vision.onnx, the runtime, greedy parity


@pytest.mark.parametrize("which", ["hr", "next"])
def test_vision_onnx_features_equal_pytorch(which, request):
    from gammamod.engines.lint import lint_artifact
    from gammamod.export import load_checkpoint
    from gammamod.manifest import read_manifest
    from gammamod.runtime.pipeline import Pipeline

    ckpt, art = request.getfixturevalue(f"tiny_{which}"), request.getfixturevalue(f"art_{which}")
    model = load_checkpoint(ckpt)
    pipe = Pipeline.load(art)
    findings, _ = lint_artifact(art, "10.3")
    assert [f for f in findings if f.severity == "error"] == []
    manifest = read_manifest(art)
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(NEXT_SIZES)]
    batch = model.vision.processor().process(images)
    got = pipe.runner("vision").run({"pixel_values": batch.pixels[:manifest["image"]["max_rows"]]})["image_features"]
    with torch.no_grad():
        want = model.encode_images(torch.from_numpy(batch.pixels[:manifest["image"]["max_rows"]])).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with torch.no_grad():
        want_each = [f.numpy() for f in model.image_features(batch)]
    got_each = pipe.encode_images(images)
    assert [g.shape for g in got_each] == [w.shape for w in want_each]
    for g, w in zip(got_each, want_each):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
    if which == "next":
        assert len({g.shape[0] for g in got_each}) == 3  # the token count follows the image's size
        assert manifest["routing"]["span_lengths"] == model.vision.anyres.token_range()


@pytest.mark.parametrize("which", ["hr", "next"])
def test_greedy_tokens_equal_the_reference_for_several_aspect_ratios(which, request, tmp_path):
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import generate_text
    from gammamod.runtime.pipeline import Pipeline

    ckpt, art = request.getfixturevalue(f"tiny_{which}"), request.getfixturevalue(f"art_{which}")
    model = load_checkpoint(ckpt)
    pipe = Pipeline.load(art)
    paths = []
    for i, (w, h) in enumerate(NEXT_SIZES):
        paths.append(tmp_path / f"{w}x{h}.png")
        picture(w, h, seed=i).save(paths[-1])
    question = "What is in the picture?"
    want = []
    for p in paths:
        ref = generate_text(ckpt, question, image=p, routing="static", max_new_tokens=12, model=model)
        want.append([t for t in ref.tokens if t != 2])
    for p, tokens in zip(paths, want):
        [got] = pipe.generate([p], [question], max_new_tokens=12)
        assert got.tokens == tokens, p.name
    # one call, images of different grids: rows with different spans run as separate batches
    together = pipe.generate(paths, [question] * len(paths), max_new_tokens=12)
    assert [r.tokens for r in together] == want


def test_bad_images_and_sizes_are_one_line(art_next, art_hr, tiny_next, tmp_path):
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import prepare_prompts
    from gammamod.runtime.pipeline import Pipeline
    from gammamod.runtime.tokenizer import Tokenizer

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for art in (art_hr, art_next):
        pipe = Pipeline.load(art)
        for image, message in ((bad, "broken.png: not a readable image"),
                               (np.zeros((0, 5, 3), np.uint8), "expected an HxWx3"),
                               (np.zeros((4, 4, 3), np.float32), "uint8")):
            with pytest.raises(GammamodError, match=message) as err:
                pipe.encode_images([image])
            assert "\n" not in str(err.value)
    pipe = Pipeline.load(art_next)
    huge = picture(2000, 2000)  # an image whose grid does not fit the artifact's sequence
    if pipe.anyres.tokens(huge.size) + 40 > pipe.manifest["kv_cache"]["max_seq"]:
        with pytest.raises(GammamodError, match="max_seq"):
            pipe.generate([huge], ["What is it?"], max_new_tokens=2)
    model = load_checkpoint(tiny_next)
    tok = Tokenizer.from_dir(tiny_next)
    with pytest.raises(GammamodError, match="anyres images: pass the ImageBatch"):
        prepare_prompts(model, tok, ["<image>\nWhat?"], np.zeros((1, 3, 84, 84), np.float32))
