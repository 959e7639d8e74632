"""LLaVA image preprocessing in numpy and Pillow, as the checkpoint's image processor config says.

Pad-to-square with the mean colour (LLaVA's ``expand2square``, when ``image_aspect_ratio`` is
``pad``), then transformers' CLIPImageProcessor steps: resize the shortest edge (bicubic),
centre crop, rescale, normalise. Equal to ``CLIPImageProcessor`` within 1e-5. LLaVA-HR feeds its
1024-pixel tower this way too (its ConvNeXt branch's processor settings, the same mean colour);
LLaVA-NeXT's ``anyres`` cuts each image into several tiles (``runtime/anyres.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import ceil

import numpy as np

from gammamod.errors import GammamodError

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit: refuse before decoding, not after


def load_image(path, where: str | None = None):
    """Open an image file (a path, or a binary file object such as ``io.BytesIO``) as RGB (see
    :func:`to_rgb`), with a one-line error naming ``where`` (default: the path) for anything
    unreadable, and without decoding images of more than ``MAX_PIXELS`` pixels."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = where or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise GammamodError(f"{name}: {w}x{h} is {w * h} pixels, more than the {MAX_PIXELS} this "
                                        "runtime decodes (a decompression bomb?); downscale it first")
                img.load()
                return to_rgb(img, name)
    except FileNotFoundError:
        raise GammamodError(f"{name}: no such image file") from None
    except IsADirectoryError:
        raise GammamodError(f"{name}: is a directory, expected an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GammamodError(f"{name}: more than {MAX_PIXELS} pixels (a decompression bomb?); downscale it "
                            "first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise GammamodError(f"{name}: not a readable image ({type(e).__name__})") from None


def to_rgb(img, where: str = "image"):
    """An 8-bit RGB picture, as LLaVA's ``convert('RGB')`` gives for 8-bit modes (alpha dropped).

    Pillow's own conversion clips the high-bit-depth modes instead of scaling them: a 16-bit
    grayscale PNG comes out nearly white, a float TIFF black. Those are scaled here: 16-bit
    integers by 255/65535; 32-bit integers holding 0..255 as is, 0..65535 as 16-bit; floats
    in [0, 1] by 255 and in [0, 255] as is. Anything else is refused rather than guessed."""
    from PIL import Image

    mode = img.mode
    if mode in ("RGB",):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise GammamodError(f"{where}: a {mode} image holding NaN or infinite values")
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif low < 0:
            raise GammamodError(f"{where}: a {mode} image with negative values ({low:g}): expected light "
                                "intensities; convert it to 8-bit RGB first")
        elif mode == "F" and high <= 1.0:
            scale = 255.0
        elif high <= 255.0:
            scale = 1.0
        elif mode == "I" and high <= 65535.0:
            scale = 255.0 / 65535.0
        else:
            raise GammamodError(f"{where}: a {mode} image with values up to {high:g}: expected 0..1 or 0..255 "
                                f"{'' if mode == 'F' else 'or 0..65535 '}; convert it to 8-bit RGB first")
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise GammamodError(f"{where}: cannot convert a {mode} image to RGB ({e})") from None


def as_picture(image, where: str = "image"):
    """What the Python API takes as an image: a path, a PIL image, or an HxWx3 (or HxW) uint8
    numpy array. Anything else is refused in one line."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise GammamodError(f"{where}: {w}x{h} pixels, more than the {MAX_PIXELS} this runtime takes")
        if w < 1 or h < 1:
            raise GammamodError(f"{where}: an empty image ({w}x{h})")
        return to_rgb(image, where)
    if isinstance(image, np.ndarray):
        ok = image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3)))
        if not ok or 0 in image.shape:
            raise GammamodError(f"{where}: a numpy array of dtype {image.dtype} and shape {list(image.shape)}; "
                                "expected an HxWx3 (or HxW) uint8 array")
        if image.shape[0] * image.shape[1] > MAX_PIXELS:
            raise GammamodError(f"{where}: {image.shape[1]}x{image.shape[0]} pixels, more than the {MAX_PIXELS} "
                                "this runtime takes")
        arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    raise GammamodError(f"{where}: {type(image).__name__} is not an image; expected a path, a PIL image or an "
                        "HxWx3 uint8 numpy array")


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


@dataclass
class ImageBatch:
    """Pictures turned into what the vision graph takes: ``pixels`` [rows, 3, S, S], ``rows[i]`` of
    them for picture i (one each, or an anyres image's base tile and grid tiles), and each
    picture's original (width, height), which anyres needs to put the features back together."""

    pixels: np.ndarray
    rows: list[int]
    sizes: list[tuple[int, int]]

    def split(self, features) -> list:
        """The vision graph's output rows, one slice per picture."""
        ends = np.cumsum(self.rows).tolist()
        return [features[end - n:end] for n, end in zip(self.rows, ends)]


class ImageProcessor:
    """Preprocessing from a ``preprocessor_config.json`` dict (CLIPImageProcessor fields).
    ``aspect``: ``pad`` (square with the mean colour first), ``square`` (as the processor
    resizes and crops) or ``anyres`` (``anyres`` gives the tiling: ``runtime.anyres.AnyRes``)."""

    def __init__(self, config: dict, aspect: str = "pad", anyres=None):
        self.config = dict(config)
        c = self.config
        if aspect not in ("pad", "square", "anyres") or (aspect == "anyres") != (anyres is not None):
            raise GammamodError(f"image aspect {aspect!r}: expected pad, square, or anyres with its grid")
        self.aspect = aspect
        self.anyres = anyres
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

        img = to_rgb(img)
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
        """[N, 3, H, W] for models that take one tower input per image (not anyres)."""
        if self.anyres is not None:
            raise GammamodError("anyres images take several tower inputs each: use ImageProcessor.process")
        return np.stack([self(im) for im in images])

    def process(self, images) -> ImageBatch:
        """Pictures -> the vision graph's input rows, with what it takes to put each picture's
        features together again (anyres: the base tile, then the grid's tiles)."""
        pictures = [to_rgb(im) for im in images]
        if self.anyres is None:
            parts = [self(p)[None] for p in pictures]
        else:
            parts = [self.anyres.tiles(p, self) for p in pictures]
        pixels = np.concatenate(parts) if parts else np.zeros((0, 3, *self.output_size), np.float32)
        return ImageBatch(pixels, [len(p) for p in parts], [p.size for p in pictures])


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
