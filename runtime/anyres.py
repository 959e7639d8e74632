"""LLaVA-NeXT's "anyres" images, as p-MoD's LLaVA-NeXT models take them (numpy and Pillow).

An image is cut into tiles of the vision tower's size on the grid that fits it best, plus a
"base" tile: the whole image squashed to one tile. The tower encodes every tile; the features of
the grid tiles are put back into one feature map, the rows or columns that show only padding are
cut off, and a learned ``image_newline`` embedding ends every row. What the decoder sees of one
image: the base tile's tokens, then the map row by row, each row closed by the newline.

The rules are the authors' (LLaVA's ``llava/mm_utils.py`` and ``llava_arch.py``, which p-MoD keeps),
including the ones that are easy to get wrong:

* the best grid: the pinpoint that keeps most of the image's pixels (downscaled sizes truncated);
  on a tie, the one that wastes fewer pixels; on a full tie, the first listed;
* tiles: the image resized to fit that resolution (the other side rounded up), pasted centred on a
  black canvas, then cut row by row, left to right;
* the base tile is a plain resize to a square (no padding): the aspect ratio is lost there;
* the padding cut from the feature map: ``int()`` of the scaled side, the difference halved and
  floored, and that many rows (or columns) removed at both ends (so one more can stay than the
  image covers).

Every image's token count therefore depends on its size: :meth:`AnyRes.tokens`.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

import numpy as np

from gammamod.errors import GammamodError


def parse_pinpoints(value, where: str) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` as config.json holds it (a list of [width, height], or the string
    of one, which the authors read with ``ast.literal_eval``) -> [(width, height), ...]."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise GammamodError(f"{where}: image_grid_pinpoints {value!r}: expected a list of [width, height]") \
                from None
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                            for v in p) for p in value)
    if not ok:
        raise GammamodError(f"{where}: image_grid_pinpoints {value!r}: expected a non-empty list of [width, height] "
                            "pairs of positive integers")
    return [(int(w), int(h)) for w, h in value]


def select_best_resolution(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (width, height) that keeps most of an image of ``size`` (width, height)."""
    width, height = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def unpadded_extent(rows: int, cols: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """Which rows and columns of a ``rows`` x ``cols`` feature map show the image of ``size``
    (LLaVA's ``unpad_image``, with its int() truncation and floored, symmetric padding)."""
    width, height = size
    if width / height > cols / rows:
        new_rows = int(height * (cols / width))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(width * (rows / height))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


@dataclass(frozen=True)
class AnyRes:
    """The anyres geometry of one model: its grid pinpoints (width, height in pixels), the tile
    size in pixels (the tower's input) and the tower's patches per tile side."""

    pinpoints: tuple[tuple[int, int], ...]
    tile: int
    side: int

    def __post_init__(self):
        object.__setattr__(self, "pinpoints", tuple(tuple(p) for p in self.pinpoints))

    def check(self, where: str) -> None:
        bad = [p for p in self.pinpoints if p[0] % self.tile or p[1] % self.tile]
        if bad:
            raise GammamodError(f"{where}: image_grid_pinpoints {list(bad[0])} is not a multiple of the vision tower's "
                                f"{self.tile}-pixel tiles")

    # -- geometry -----------------------------------------------------------------------------
    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Tiles across and down, (columns, rows), for an image of ``size`` (width, height)."""
        w, h = select_best_resolution(size, list(self.pinpoints))
        return w // self.tile, h // self.tile

    def rows(self, size: tuple[int, int]) -> int:
        """Tower inputs for one image: the base tile and the grid's tiles."""
        cols, rows = self.grid(size)
        return 1 + cols * rows

    def map_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """The unpadded feature map's (rows, columns) for an image of ``size``."""
        cols, rows = self.grid(size)
        r, c = unpadded_extent(rows * self.side, cols * self.side, size)
        return r.stop - r.start, c.stop - c.start

    def tokens(self, size: tuple[int, int]) -> int:
        """What the decoder sees of one image: the base tile, then each map row and its newline."""
        rows, cols = self.map_shape(size)
        return self.side * self.side + rows * (cols + 1)

    def token_range(self) -> list[int]:
        """Token counts of images shaped exactly like each pinpoint (nothing unpadded): the largest
        an image of that grid can take."""
        return sorted({self.tokens(p) for p in self.pinpoints})

    # -- pixels ---------------------------------------------------------------------------------
    def tiles(self, picture, process) -> np.ndarray:
        """An RGB picture -> [1 + tiles, 3, S, S]: the base tile, then the grid's tiles row by row.
        ``process`` turns one square S x S picture into its normalised [3, S, S] pixels."""
        from PIL import Image

        bicubic = Image.Resampling.BICUBIC  # Pillow's default for RGB, which the authors' resize calls rely on
        width, height = picture.size
        target_w, target_h = select_best_resolution((width, height), list(self.pinpoints))
        scale_w, scale_h = target_w / width, target_h / height
        if scale_w < scale_h:
            new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
        canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        canvas.paste(picture.resize((new_w, new_h), bicubic), ((target_w - new_w) // 2, (target_h - new_h) // 2))
        base = picture.resize((self.tile, self.tile), bicubic)
        crops = [canvas.crop((x, y, x + self.tile, y + self.tile))
                 for y in range(0, target_h, self.tile) for x in range(0, target_w, self.tile)]
        return np.stack([process(p) for p in [base] + crops])

    # -- features -------------------------------------------------------------------------------
    def assemble(self, features: np.ndarray, size: tuple[int, int], newline: np.ndarray) -> np.ndarray:
        """One image's tower features [1 + tiles, side * side, C] -> what the decoder sees [tokens, C]."""
        cols, rows = self.grid(size)
        side, channels = self.side, features.shape[-1]
        if features.shape[:2] != (1 + cols * rows, side * side):
            raise GammamodError(f"image features of shape {list(features.shape)}: expected [{1 + cols * rows}, "
                                f"{side * side}, C] for an image of {size[0]}x{size[1]}")
        grid = features[1:].reshape(rows, cols, side, side, channels).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, channels)
        keep_rows, keep_cols = unpadded_extent(rows * side, cols * side, size)
        grid = grid[keep_rows, keep_cols]
        ends = np.broadcast_to(np.asarray(newline, dtype=features.dtype), (grid.shape[0], 1, channels))
        lines = np.concatenate([grid, ends], axis=1).reshape(-1, channels)
        return np.concatenate([features[0], lines])

    def to_dict(self) -> dict:
        return {"grid_pinpoints": [list(p) for p in self.pinpoints], "tile": self.tile, "patches_per_side": self.side,
                "merge": "spatial_unpad"}
