"""Calibration and validation inputs: images and prompts.

Three sources, for every calibration command (and ``gammamod validate``):

* ``--data DIR``: the user's images (png, jpg, jpeg, bmp, webp) and a prompts file in it
  (``prompts.txt``, one prompt per line); images and prompts are paired in turn;
* ``--random N``: N seeded synthetic images (smooth colour fields with solid shapes, of varied
  aspect ratios, so pad-to-square and tiling are exercised) with prompts taken in turn;
* the set this package ships (``calib/data/``): 8 such images written once by
  :func:`write_shipped_set`, with 8 prompts, so every command runs offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

PROMPTS = ["What is in the picture?", "Describe this image in detail.", "What colours do you see?",
           "Is there a vehicle in the image? Answer briefly.", "Count the objects and say where they are.",
           "What is the weather like in this scene?", "Which shape is the largest, and where is it?",
           "Describe the picture in one sentence."]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHIPPED = 8


@dataclass
class Sample:
    image: object  # a PIL image, a path, or None for a text-only prompt
    prompt: str


def synthetic_image(rng: np.random.Generator):
    """A seeded picture: a smooth colour field of random size and aspect, with three solid shapes."""
    from PIL import Image

    h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
    base = rng.integers(0, 255, 3)
    y, x = np.mgrid[0:h, 0:w]
    img = (base + 90 * np.stack([np.sin(x / rng.uniform(5, 40)), np.cos(y / rng.uniform(5, 40)),
                                  np.sin((x + y) / rng.uniform(5, 40))], -1)).clip(0, 255).astype(np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        img[y0:y0 + int(rng.integers(10, 60)), x0:x0 + int(rng.integers(10, 60))] = rng.integers(0, 255, 3)
    return Image.fromarray(img)


def random_samples(n: int, seed: int = 0, with_images: bool = True) -> list[Sample]:
    if n < 1:
        raise GammamodError(f"--random {n}: expected at least one sample")
    rng = np.random.default_rng(seed)
    return [Sample(synthetic_image(rng) if with_images else None, PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def read_prompts(path: Path, what: str = "--prompts") -> list[str]:
    if not path.is_file():
        raise GammamodError(f"{what} {path}: no such file (one prompt per line)")
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise GammamodError(f"{what} {path}: not a text file (one prompt per line)") from None
    if not prompts:
        raise GammamodError(f"{what} {path}: no prompt in it (one per line)")
    return prompts


def list_images(directory: Path, what: str = "--data") -> list[Path]:
    if not directory.is_dir():
        raise GammamodError(f"{what} {directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GammamodError(f"{what} {directory}: no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def directory_samples(directory: Path, with_images: bool = True) -> list[Sample]:
    """``--data DIR``: its images and ``prompts.txt``, paired in turn (as many samples as the larger)."""
    directory = Path(directory)
    prompts_file = directory / "prompts.txt"
    prompts = read_prompts(prompts_file, "--data") if prompts_file.exists() else PROMPTS
    if not with_images:
        return [Sample(None, p) for p in prompts]
    files = list_images(directory)
    n = max(len(files), len(prompts))
    return [Sample(files[i % len(files)], prompts[i % len(prompts)]) for i in range(n)]


def shipped_dir() -> Path:
    return Path(str(resources.files("gammamod.calib") / "data"))


def calibration_set(data: str | Path | None = None, random: int | None = None, seed: int = 0,
                    with_images: bool = True) -> list[Sample]:
    """The samples a calibration command runs: ``--data DIR``, ``--random N``, or the shipped set."""
    if data is not None and random is not None:
        raise GammamodError("give --data DIR or --random N, not both")
    if random is not None:
        return random_samples(random, seed, with_images)
    return directory_samples(Path(data) if data is not None else shipped_dir(), with_images)


def write_shipped_set(directory: Path, n: int = SHIPPED, seed: int = 1234) -> None:
    """(Re)write the shipped set: ``n`` synthetic PNGs and ``prompts.txt``. Run once by hand; the
    files are committed (calib/data/), so users need nothing else."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        synthetic_image(rng).save(directory / f"calib-{i:02d}.png", optimize=True)
    (directory / "prompts.txt").write_text("\n".join(PROMPTS[:n]) + "\n")
