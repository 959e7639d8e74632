"""The TensorRT plugin library's identity and its build.

The sources live in ``engines/plugins/`` (shipped with the package): ``mod_kernels.h`` (the
kernels, one source for the GPU and the CPU harness), ``mod_kernels.cu`` (CUDA launches),
``mod_plugins.cpp`` (TensorRT IPluginV3 classes and creators) and ``CMakeLists.txt``, which
builds ``libgammamod_plugins.so`` from TensorRT's headers and CUDA alone. ``cpu_harness.cpp``
is the kernels' CPU driver for tests (:mod:`gammamod.engines.kernels`), not part of the library.

The manifest's ``tensorrt.plugin`` section carries :func:`plugin_identity`, so that an engine
builder and the runtime can refuse a library built from other sources or other kernels.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "plugins"
LIBRARY_NAME = "libgammamod_plugins.so"
CPU_HARNESS = "cpu_harness.cpp"
_SOURCE_SUFFIXES = (".h", ".cu", ".cpp", ".txt")


def library_sources() -> list[Path]:
    """The files the library is built from, sorted by name (the CPU harness is not one)."""
    return sorted(p for p in SOURCE_DIR.iterdir()
                  if p.is_file() and p.suffix in _SOURCE_SUFFIXES and p.name != CPU_HARNESS)


def sources_sha256(paths: list[Path] | None = None) -> str:
    """One sha256 over the files' names and contents (a renamed file changes it too)."""
    digest = hashlib.sha256()
    for path in library_sources() if paths is None else paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def kernels_version() -> str:
    """``GAMMAMOD_KERNELS_VERSION`` as ``mod_kernels.h`` defines it."""
    text = (SOURCE_DIR / "mod_kernels.h").read_text()
    match = re.search(r'#define\s+GAMMAMOD_KERNELS_VERSION\s+"([^"]+)"', text)
    if match is None:
        raise RuntimeError(f"{SOURCE_DIR / 'mod_kernels.h'}: no GAMMAMOD_KERNELS_VERSION")
    return match.group(1)


def plugin_identity() -> dict:
    """What the manifest records about the plugin library next to the nodes' namespace, version,
    domain and op types: the library's file name, its sources' sha256, the kernels' version."""
    return {"library": LIBRARY_NAME, "sources_sha256": sources_sha256(), "kernels_version": kernels_version()}


def cmake_commands(build_dir: str | Path, tensorrt_include: str | Path, cuda_architectures: str) -> list[list[str]]:
    """The two commands that build the library (CUDA and TensorRT's headers are all it needs)."""
    return [["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), f"-DTENSORRT_INCLUDE_DIR={tensorrt_include}",
             f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}", "-DCMAKE_BUILD_TYPE=Release"],
            ["cmake", "--build", str(build_dir), "-j", "2"]]
