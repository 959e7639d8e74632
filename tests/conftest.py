"""Shared fixtures: seeded tiny checkpoints written once per test session by make-tiny."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _make(root: Path, recipe: str, layout: str = "original", **kw) -> Path:
    from gammamod.export.tiny import make_tiny

    name = f"{recipe}-{layout}" + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
    out = root / name
    if not out.exists():
        make_tiny(out, recipe, size="tiny", seed=0, layout=layout, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_gamma(tiny_root) -> Path:
    return _make(tiny_root, "gamma-mod")


@pytest.fixture(scope="session")
def tiny_pmod(tiny_root) -> Path:
    return _make(tiny_root, "p-mod")


@pytest.fixture(scope="session")
def tiny_llava(tiny_root) -> Path:
    return _make(tiny_root, "llava")


@pytest.fixture(scope="session")
def tiny_llava_hf(tiny_root) -> Path:
    return _make(tiny_root, "llava", layout="hf")


@pytest.fixture(scope="session")
def tiny_hr(tiny_root) -> Path:
    """gamma-MoD on LLaVA-HR (the released gamma-MoD checkpoints' CLIP + ConvNeXt tower)."""
    return _make(tiny_root, "gamma-mod-hr")


@pytest.fixture(scope="session")
def tiny_next(tiny_root) -> Path:
    """p-MoD on LLaVA-NeXT (anyres tiles, image_newline)."""
    return _make(tiny_root, "p-mod-next")


@pytest.fixture(scope="session")
def tiny_models(tiny_gamma, tiny_pmod, tiny_llava):
    from gammamod.export import load_checkpoint

    return {"gamma-mod": load_checkpoint(tiny_gamma), "p-mod": load_checkpoint(tiny_pmod),
            "llava": load_checkpoint(tiny_llava)}


@pytest.fixture()
def copy_ckpt(tmp_path):
    """Copy a checkpoint directory to a scratch place a test may damage."""

    def copy(src: Path, name: str = "ckpt") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def test_image_path() -> Path:
    from gammamod.demo import test_image

    return test_image()


def _export(root: Path, ckpt: Path, name: str, **options) -> Path:
    from gammamod.export.exporter import ExportOptions, export_artifact

    out = root / name
    if not out.exists():
        export_artifact(ckpt, out, ExportOptions(**options))
    return out


@pytest.fixture(scope="session")
def art_gamma(tiny_root, tiny_gamma) -> Path:
    return _export(tiny_root, tiny_gamma, "art-gamma", tensorrt=["10.3", "11.x"])


@pytest.fixture(scope="session")
def art_pmod(tiny_root, tiny_pmod) -> Path:
    return _export(tiny_root, tiny_pmod, "art-pmod")


@pytest.fixture(scope="session")
def art_llava(tiny_root, tiny_llava) -> Path:
    return _export(tiny_root, tiny_llava, "art-llava")


@pytest.fixture(scope="session")
def art_hr(tiny_root, tiny_hr) -> Path:
    return _export(tiny_root, tiny_hr, "art-hr", tensorrt=["10.3"])


@pytest.fixture(scope="session")
def art_next(tiny_root, tiny_next) -> Path:
    return _export(tiny_root, tiny_next, "art-next", tensorrt=["10.3"])


@pytest.fixture(scope="session")
def art_gamma_dense(tiny_root, tiny_gamma) -> Path:
    return _export(tiny_root, tiny_gamma, "art-gamma-dense", routing="dense")


@pytest.fixture(scope="session")
def art_gamma_fp16(tiny_root, tiny_gamma) -> Path:
    return _export(tiny_root, tiny_gamma, "art-gamma-fp16", dtype="fp16")


@pytest.fixture(scope="session")
def prompts_and_image(test_image_path):
    return ["What is in the picture?", "Describe the colours and the shapes you see, please."], test_image_path


@pytest.fixture(scope="session")
def no_torch_prelude() -> str:
    """The first lines of a test script in which importing torch fails outright."""
    return """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""
