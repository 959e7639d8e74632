"""`gammamod build`: TensorRT engines for this machine's GPU, from the plan (:mod:`.plan`).

Needs TensorRT's Python package (10.3 or later) and the GPU the engines are for; without them it
refuses in one line before anything is written. Written against the TensorRT 10.3 and 11.x
Python APIs (``shared/tools/trt_api_check.py`` checks the names); it has not run here: these
machines have neither TensorRT nor a GPU.

What it writes, atomically: ``ARTIFACT/engines/`` (``decoder.engine`` with the ``prefill`` and
``decode`` profiles, ``vision.engine``, the plugin library it built against, ``build.json``) and
the manifest's ``engines`` section with those files' hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import onnx

from gammamod.errors import GammamodError

INSTALL = ("gammamod build needs TensorRT 10.3+ (its Python package) and an NVIDIA GPU: pip install tensorrt-cu12 "
           "(or tensorrt-cu13; on Jetson, JetPack's python3-libnvinfer) on the machine with the GPU the engines are "
           "for; 'gammamod build --dry-run' and 'gammamod bundle' need neither")
HARDWARE_LEVEL = {"none": "none", "ampere+": "ampere_plus", "same-cc": "same_compute_capability"}


def tensorrt_module():
    """TensorRT's Python package, or a one-line refusal saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise GammamodError(INSTALL) from None
    if not hasattr(trt, "Builder"):  # PyPI's placeholder package
        raise GammamodError(INSTALL)
    return trt


def parser_version(tensorrt_version: str) -> str:
    """The parser table (``targets.TARGETS``) an installed TensorRT reads with."""
    major, minor = (int(x) for x in tensorrt_version.split(".")[:2])
    if major < 10 or (major == 10 and minor < 3):
        raise GammamodError(f"TensorRT {tensorrt_version} is older than 10.3, the oldest gammamod builds with")
    return "11.x" if major >= 11 else ("10.3" if minor == 3 else "10.x")


def build_plugin_library(out_dir: Path, cuda_architecture: str) -> Path:
    """Build ``libgammamod_plugins.so`` with CMake for this GPU (needs nvcc and TensorRT's headers:
    ``TENSORRT_INCLUDE_DIR``, or the system's)."""
    from .plugin_library import LIBRARY_NAME, cmake_commands

    include = os.environ.get("TENSORRT_INCLUDE_DIR") or next(
        (d for d in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")
         if Path(d, "NvInferRuntime.h").is_file()), None)
    if include is None or shutil.which("cmake") is None:
        raise GammamodError("--mod-ops plugin needs the plugin library: pass --plugin-library FILE, or set "
                            "TENSORRT_INCLUDE_DIR (the folder with NvInfer.h) with cmake and nvcc installed; "
                            "or build --mod-ops native")
    with tempfile.TemporaryDirectory() as tmp:
        for cmd in cmake_commands(tmp, include, cuda_architecture):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                raise GammamodError(f"building the plugin library failed ({' '.join(cmd[:3])}): {last[0]}")
        built = next(Path(tmp).rglob(LIBRARY_NAME), None)
        if built is None:
            raise GammamodError(f"building the plugin library made no {LIBRARY_NAME}")
        shutil.copy2(built, out_dir / LIBRARY_NAME)
    return out_dir / LIBRARY_NAME


class _Builder:
    def __init__(self, trt, plan: dict, plugin_library: Path | None):
        self.trt, self.plan = trt, plan
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.plugin_library = plugin_library
        if plugin_library is not None:
            if not trt.get_plugin_registry().load_library(str(plugin_library)):
                raise GammamodError(f"{plugin_library}: TensorRT could not load the plugin library")
        self.major = int(trt.__version__.split(".")[0])
        self.timing_cache = None

    def _network(self, builder):
        trt = self.trt
        flags = 0
        if self.plan["typing_mode"] == "strong" and self.major < 11:  # 11.x is always strongly typed
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder.create_network(flags)

    def _config(self, builder):
        trt, opts = self.trt, self.plan["options"]
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts["workspace_mib"] << 20)
        config.builder_optimization_level = opts["opt_level"]
        if self.plan["typing_mode"] == "flag":  # TensorRT 10 only: 11.x has no precision flags
            flag = getattr(trt.BuilderFlag, self.plan["precision"].upper())  # trt-api: FP16/BF16 exist in 10.x only
            config.set_flag(flag)
        level = opts["hardware_compat"]
        if level == "ampere+":
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        elif level == "same-cc":
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY  # trt-api: 10.9+, refused for 10.3 by the plan
        if opts["version_compatible"]:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if self.plugin_library is not None:  # the library travels inside the engine
                config.plugins_to_serialize = [str(self.plugin_library)]
        if self.timing_cache is None:
            path = opts.get("timing_cache")
            data = Path(path).read_bytes() if path and Path(path).is_file() else b""
            self.timing_cache = config.create_timing_cache(data)
        config.set_timing_cache(self.timing_cache, False)
        return config

    def build(self, model: onnx.ModelProto, source: Path, profiles: dict) -> bytes:
        """Parse ``model`` (weights external, found beside ``source``) and build it with one
        optimization profile per entry of ``profiles`` (in order: prefill is 0, decode 1)."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = self._network(builder)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(model.SerializeToString(), str(source)):
            first = parser.get_error(0).desc() if parser.num_errors else "no message"
            raise GammamodError(f"{source}: TensorRT's ONNX parser failed ({parser.num_errors} errors): {first}")
        config = self._config(builder)
        for inputs in profiles.values():
            profile = builder.create_optimization_profile()
            for name, e in inputs.items():
                if e.get("values"):  # a shape tensor: its values (int32 lists in 10.x)
                    profile.set_shape_input(name, e["min"], e["opt"], e["max"])
                else:
                    profile.set_shape(name, e["min"], e["opt"], e["max"])
            config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise GammamodError(f"{source}: TensorRT could not build the engine (see its log above)")
        return bytes(engine)

    def save_timing_cache(self) -> None:
        path = self.plan["options"].get("timing_cache")
        if path and self.timing_cache is not None:
            tmp = Path(f"{path}.tmp")
            tmp.write_bytes(bytes(self.timing_cache.serialize()))
            os.replace(tmp, path)


def build_engines(manifest, plan: dict, gpu, force: bool = False, plugin_library: str | None = None) -> dict:
    """Build the plan's engines into ``ARTIFACT/engines`` and record them in the manifest."""
    from gammamod.lifecycle import OutputDir
    from gammamod.manifest import ENGINES_DIR, describe_files, now, sha256_of

    from .prepare import checked_copy

    trt = tensorrt_module()
    started = time.time()
    out = manifest.path(ENGINES_DIR)
    with OutputDir(out, force=True, is_ours=lambda p: (p / "build.json").is_file(), what="engines directory") as tmp:
        library = None
        if plan["plugin"] is not None:
            name = plan["plugin"]["library"]
            if plugin_library:
                shutil.copy2(plugin_library, tmp / name)
                library = tmp / name
            else:
                library = build_plugin_library(tmp, plan["target"]["cuda_architecture"])
        builder = _Builder(trt, plan, library)
        for kind, eng in plan["engines"].items():
            form = plan["mod_ops"] if kind == "decoder" and plan["mod_ops"] != "none" else "plugin"
            model = checked_copy(manifest, kind, plan["tensorrt"], form)
            data = builder.build(model, manifest.path(manifest.graph(kind)["file"]), eng["profiles"])
            (tmp / Path(eng["file"]).name).write_bytes(data)
        builder.save_timing_cache()
        record = {
            "tensorrt": trt.__version__,
            "gpu": {"name": gpu.name, "compute_capability": list(gpu.compute_capability)},
            "hardware_compatibility": HARDWARE_LEVEL[plan["options"]["hardware_compat"]],
            "version_compatible": plan["options"]["version_compatible"],
            "precision": plan["precision"], "typing": plan["typing_mode"],
            "mod_ops": plan["mod_ops"],
            "plugin": None if library is None else {**plan["plugin"], "sha256": sha256_of(library)},
            "files": {kind: eng["file"] for kind, eng in plan["engines"].items()},
            "profiles": {kind: eng["profiles"] for kind, eng in plan["engines"].items()},
            "kv_capacity": plan["kv_capacity"], "max_batch": plan["max_batch"], "max_seq": plan["max_seq"],
            "span_lengths": plan["span_lengths"], "options": plan["options"],
            "built": now(), "build_seconds": round(time.time() - started, 1),
        }
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        files = {f"{ENGINES_DIR}/{name}": entry
                 for name, entry in describe_files(tmp, [p.name for p in tmp.iterdir()]).items()}
    manifest.data["files"] = {k: v for k, v in manifest.data["files"].items() if not k.startswith(ENGINES_DIR + "/")}
    manifest.data["files"].update(files)
    manifest.data["engines"] = record
    manifest.write()
    return record
