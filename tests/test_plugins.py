"""The TensorRT plugin library: its CUDA code compiled with nvcc for the GPUs we target, the
library built with CMake against TensorRT's headers and probed as TensorRT loads it (only where
TENSORRT_INCLUDE_DIR is set), the identity the manifest records, and the TensorRT copies' extra
selection inputs. No test here needs a GPU or TensorRT's library."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from gammamod.engines import plugin_library
from gammamod.engines.kernels import harness
from gammamod.engines.prepare import pass_span_values, tensorrt_copy
from gammamod.export import ops
from mod_nodes import selection_model

PROBE = Path(__file__).with_name("plugin_probe.cpp")
# Datacenter Ampere, Jetson Orin, Ada, Hopper, and PTX for what comes later
CUDA_TARGETS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_87,code=sm_87",
                "-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]
WARNINGS_AS_ERRORS = ["-Werror=all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror"]


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_cuda_kernels_compile_for_every_target(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels were not compiled")
    _run(["nvcc", "-std=c++17", "-c", str(plugin_library.SOURCE_DIR / "mod_kernels.cu"), "-o", str(tmp_path / "k.o"),
          *CUDA_TARGETS, *WARNINGS_AS_ERRORS])


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    include = os.environ.get("TENSORRT_INCLUDE_DIR")
    if not include:
        pytest.skip("TENSORRT_INCLUDE_DIR is not set: the plugin library was not built (set it to a directory "
                    "holding NvInfer.h, e.g. TensorRT's include/)")
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("the plugin library needs nvcc and cmake on PATH")
    build = tmp_path_factory.mktemp("plugins-build")
    for cmd in plugin_library.cmake_commands(build, include, "87;90"):
        _run(cmd)
    library = build / plugin_library.LIBRARY_NAME
    assert library.is_file()
    return include, library


def test_library_exports_only_the_entry_points(built_library):
    _, library = built_library
    symbols = _run(["nm", "-D", "--defined-only", str(library)]).stdout.split()
    assert {"getCreators", "setLoggerFinder"} <= set(symbols)
    assert not any("gammamod" in s or "ModPlugin" in s for s in symbols)  # everything else stays hidden


def test_library_loads_as_tensorrt_loads_it(built_library, tmp_path):
    """plugin_probe.cpp: dlopen, getCreators, and every creator and plugin method that needs no GPU."""
    include, library = built_library
    probe = tmp_path / "plugin_probe"
    _run([os.environ.get("CXX", "g++"), "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", include,
          "-isystem",
          str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"), str(PROBE), "-o", str(probe), "-ldl"])
    out = _run([str(probe), str(library)]).stdout
    assert "0 failures" in out and "FAIL" not in out


def test_identity_names_the_library_and_its_sources():
    identity = plugin_library.plugin_identity()
    assert identity["library"] == plugin_library.LIBRARY_NAME
    assert identity["kernels_version"] == harness().gm_kernels_version().decode()
    names = [p.name for p in plugin_library.library_sources()]
    assert names == ["CMakeLists.txt", "mod_kernels.cu", "mod_kernels.h", "mod_launch.h", "mod_plugins.cpp"]
    assert len(identity["sources_sha256"]) == 64


def test_identity_changes_with_the_sources(tmp_path):
    sources = plugin_library.library_sources()
    copies = []
    for path in sources:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    assert plugin_library.sources_sha256(copies) == plugin_library.sources_sha256()
    copies[0].write_bytes(copies[0].read_bytes() + b"\n")
    assert plugin_library.sources_sha256(copies) != plugin_library.sources_sha256()


@pytest.mark.parametrize("op_type", ["MoDSelect", "MoDSelectThreshold"])
def test_tensorrt_copy_passes_the_span_values_to_enqueue(op_type):
    model = selection_model(op_type)
    copy = tensorrt_copy(model, "10.3")
    node = copy.graph.node[0]
    # inputs 2 and 3 stay TensorRT shape inputs; 4 and 5 are the same tensors, for the kernel
    assert list(node.input) == ["scores", "span_start", "n", "k", "n", "k"]
    assert not [f for f in copy.functions if f.domain == ops.DOMAIN]
    assert list(model.graph.node[0].input) == ["scores", "span_start", "n", "k"]  # the original is untouched
    assert pass_span_values(copy) == 0  # idempotent


def test_gather_and_scatter_keep_their_inputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2])
    node = helper.make_node("MoDGather", ["x", "kept"], ["y"], domain=ops.DOMAIN)
    model = helper.make_model(helper.make_graph([node], "g", [x], []))
    assert pass_span_values(model) == 0 and list(model.graph.node[0].input) == ["x", "kept"]


def test_manifest_names_the_plugin_library(art_pmod):
    from gammamod.manifest import read_manifest

    plugin = read_manifest(art_pmod)["tensorrt"]["plugin"]
    assert plugin["namespace"] == ops.PLUGIN_NAMESPACE and plugin["version"] == ops.PLUGIN_VERSION
    assert {k: plugin[k] for k in ("library", "sources_sha256", "kernels_version")} == plugin_library.plugin_identity()
