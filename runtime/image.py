"""LLaVA image preprocessing in numpy and Pillow, as the checkpoint's image processor config says.

Pad-to-square with the mean colour (LLaVA's ``expand2square``, when ``image_aspect_ratio`` is
``pad``), then transformers' CLIPImageProcessor steps: resize the shortest edge (bicubic),
centre crop, rescale, normalise. Equal to ``CLIPImageProcessor`` within 1e-5.
"""

from __future__ import annotations

import os
from math import ceil

import numpy as np

from gammamod.errors import GammamodError

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | os.PathLike):
    """Open an image file as RGB, with a one-line error for anything unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise GammamodError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise GammamodError(f"{path}: not a readable image ({type(e).__name__})") from None


def expand_to_square(img, background: tuple[int, int, int]):
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _size_of(value, key: str, default: int) -> int:
    if isinstance(value, dict):
        return int(value.get(key, value.get("height", default)))
    if isinstance(value, (int, float)):
        return int(value)
    return default


class ImageProcessor:
    """Preprocessing from a ``preprocessor_config.json`` dict (CLIPImageProcessor fields)."""

    def __init__(self, config: dict, aspect: str = "pad"):
        self.config = dict(config)
        c = self.config
        self.aspect = aspect
        self.mean = np.asarray(c.get("image_mean", DEFAULT_MEAN), dtype=np.float32)
        self.std = np.asarray(c.get("image_std", DEFAULT_STD), dtype=np.float32)
        self.do_resize = bool(c.get("do_resize", True))
        size = c.get("size", {"shortest_edge": 224})
        if isinstance(size, dict) and "shortest_edge" not in size and "height" in size:
            self.resize_to = (int(size["height"]), int(size["width"]))  # exact (h, w)
            self.shortest = None
        else:
            self.resize_to = None
            self.shortest = _size_of(size, "shortest_edge", 224)
        self.resample = int(c.get("resample", 3))
        self.do_center_crop = bool(c.get("do_center_crop", True))
        crop = c.get("crop_size", self.shortest or 224)
        self.crop = (_size_of(crop, "height", 224), _size_of(crop, "width", 224)) if isinstance(crop, dict) \
            else (int(crop), int(crop))
        self.do_rescale = bool(c.get("do_rescale", True))
        self.rescale_factor = float(c.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(c.get("do_normalize", True))

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop
        return self.resize_to or (self.shortest, self.shortest)

    def __call__(self, img) -> np.ndarray:
        """PIL image -> float32 [3, H, W]."""
        from PIL import Image

        img = img.convert("RGB")
        if self.aspect == "pad":
            img = expand_to_square(img, tuple(int(x * 255) for x in self.mean))
        if self.do_resize:
            w, h = img.size
            if self.resize_to is not None:
                new_h, new_w = self.resize_to
            else:
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self.shortest, int(self.shortest * long / short)
                new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
            img = img.resize((new_w, new_h), resample=Image.Resampling(self.resample))
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # CHW
        if self.do_center_crop:
            arr = center_crop(arr, self.crop)
        out = arr.astype(np.float64) * self.rescale_factor if self.do_rescale else arr.astype(np.float64)
        out = out.astype(np.float32)
        if self.do_normalize:
            out = (out - self.mean[:, None, None]) / self.std[:, None, None]
        return out.astype(np.float32)

    def batch(self, images) -> np.ndarray:
        return np.stack([self(im) for im in images])


def center_crop(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CHW centre crop, zero-padding an image smaller than the crop (as transformers does)."""
    _, h, w = arr.shape
    ch, cw = size
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((arr.shape[0], nh, nw), dtype=arr.dtype)
    tp, lp = ceil((nh - h) / 2), ceil((nw - w) / 2)
    padded[:, tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return padded[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]
