"""`gammamod bundle ARTIFACT OUT --target orin-jp6|thor-jp7|...`: what a Jetson needs to build
and run the engines itself (engines are not portable: a Jetson engine is built on the Jetson).

OUT holds the artifact's files (weights, embeddings, tokenizer, the manifest), the TensorRT ONNX
copies for the target's TensorRT (``--mod-ops plugin`` and ``native`` forms), the plugin sources
with their CMake project under ``plugins/``, the build plan (``plan.json``), a test image, and
``build.sh``, which on the device (1) builds the plugin library with the device's own nvcc,
(2) builds the engines with ``gammamod build`` when gammamod and TensorRT's Python package are
installed, else with ``trtexec`` (JetPack: ``/usr/src/tensorrt/bin/trtexec``), and (3) runs a
smoke generation with ``gammamod run`` that prints time to first token and tokens/s.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import onnx

from gammamod.errors import GammamodError

from .plan import BuildOptions, make_plan
from .plugin_library import library_sources
from .prepare import checked_copy, copy_name

BUNDLE_MARKER = "bundle.json"
SMOKE_PROMPT = "Describe the picture in one sentence."


def _place(src: Path, dst: Path) -> None:
    """A copy, never a hard link: the onnx package refuses external data with several links (a
    hard-link attack, to its checker), which would break check-onnx and calib on the artifact, and a
    bundle is meant to be moved to the device whole."""
    shutil.copy2(src, dst)


def trtexec_command(plan: dict, kind: str, plugin_var: str | None) -> list[str]:
    """trtexec's arguments for one engine of the plan (10.3 and 11.x flags; the precision flag
    only where TensorRT 10's weak typing is what the plan says)."""
    eng = plan["engines"][kind]
    cmd = ["\"$TRTEXEC\"", f"--onnx={eng['onnx']}", f"--saveEngine={eng['file']}",
           f"--memPoolSize=workspace:{plan['options']['workspace_mib']}M",
           f"--builderOptimizationLevel={plan['options']['opt_level']}", "--timingCacheFile=timing.cache"]
    for index, profile in enumerate(eng["profiles"].values()):
        if len(eng["profiles"]) > 1:
            cmd.append(f"--profile={index}")
        for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
            # shape tensors take their values in the same spec (trtexec reads them as int32 in 10.3)
            spec = ",".join(f"{name}:{'x'.join(map(str, e[key]))}" for name, e in profile.items())
            cmd.append(f"{flag}={spec}")
    if plan["typing_mode"] == "flag":
        cmd.append(f"--{plan['precision']}")  # trt-api: --fp16/--bf16 exist in TensorRT 10 only (weak typing)
    elif plan["tensorrt"] != "11.x":
        cmd.append("--stronglyTyped")  # trt-api: a no-op flag in 11.x, needed in 10.x
    if plan["options"]["hardware_compat"] == "ampere+":
        cmd.append("--hardwareCompatibilityLevel=ampere+")
    if plan["options"]["version_compatible"]:
        cmd.append("--versionCompatible")
    if plugin_var and kind == "decoder" and plan["plugin"] is not None:
        cmd.append(f"--dynamicPlugins=\"${plugin_var}\"")
        if plan["options"]["version_compatible"]:
            cmd.append(f"--setPluginsToSerialize=\"${plugin_var}\"")
    return cmd


def build_script(plan: dict, build_args: list[str], has_image: bool) -> str:
    """``build.sh``: plugin library, engines, smoke run, on the device."""
    target = plan["target"]
    plugin = plan["plugin"] is not None
    run_args = ["--backend", "tensorrt", "--device", "cuda:0", "--prompt", SMOKE_PROMPT, "--max-new-tokens", "32"]
    if has_image:
        run_args[0:0] = ["--image", "smoke.png"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build and smoke-test gammamod engines on a {target['gpu']} ({target['sm']}"
        f"{', JetPack ' + target['jetpack'] if target['jetpack'] else ''}, TensorRT {plan['tensorrt']}).",
        "# Written by 'gammamod bundle'. Run it on the device, in this folder: bash build.sh",
        "# Environment: CUDA_HOME (default /usr/local/cuda), TENSORRT_INCLUDE_DIR (default: where NvInfer.h is),",
        "#              TRTEXEC (default /usr/src/tensorrt/bin/trtexec), MOD_OPS=native to build without the plugin.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}',
        'export PATH="$CUDA_HOME/bin:$PATH"',
        f'MOD_OPS=${{MOD_OPS:-{plan["mod_ops"] if plan["mod_ops"] in ("plugin", "native") else "native"}}}',
        "",
    ]
    if plugin:
        lines += [
            "# 1. the plugin library, with this device's own nvcc (code built elsewhere may not load here)",
            'PLUGIN=""',
            'if [ "$MOD_OPS" = plugin ]; then',
            '  if [ -z "${TENSORRT_INCLUDE_DIR:-}" ]; then',
            '    for d in /usr/include/aarch64-linux-gnu /usr/include/x86_64-linux-gnu /usr/include; do',
            '      [ -f "$d/NvInferRuntime.h" ] && TENSORRT_INCLUDE_DIR=$d && break',
            '    done',
            '  fi',
            '  [ -n "${TENSORRT_INCLUDE_DIR:-}" ] || { echo "NvInferRuntime.h not found: set TENSORRT_INCLUDE_DIR" >&2; exit 2; }',
            f'  cmake -S plugins -B build/plugins -DTENSORRT_INCLUDE_DIR="$TENSORRT_INCLUDE_DIR" '
            f'-DCMAKE_CUDA_ARCHITECTURES={target["cuda_architecture"]} -DCMAKE_BUILD_TYPE=Release',
            '  cmake --build build/plugins -j "$(nproc)"',
            f'  PLUGIN=$PWD/build/plugins/{plan["plugin"]["library"]}',
            "fi",
            "",
        ]
    else:
        lines += ["# 1. no plugin library: this artifact has no MoD nodes (dense) or the plan builds them natively",
                  'PLUGIN=""', ""]
    gammamod_build = ["gammamod", "build", ".", *build_args, "--mod-ops", "\"$MOD_OPS\""]
    plugin_arg = ' ${PLUGIN:+--plugin-library "$PLUGIN"}' if plugin else ""
    lines += [
        "# 2. the engines: gammamod build (records them in the manifest for the runtime), else trtexec",
        'if command -v gammamod >/dev/null && python3 -c "import tensorrt" 2>/dev/null; then',
        f"  {' '.join(gammamod_build)}{plugin_arg}",
        "else",
        '  TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}',
        '  [ -x "$TRTEXEC" ] || { echo "neither gammamod with TensorRT Python nor trtexec ($TRTEXEC) found" >&2; exit 2; }',
        "  mkdir -p engines",
    ]
    for kind in plan["engines"]:
        native_onnx = plan["engines"][kind]["onnx"].replace(".onnx", ".native.onnx")
        native = {**plan, "engines": {**plan["engines"], kind: {**plan["engines"][kind], "onnx": native_onnx}}}
        if kind == "decoder" and plan["plugin"] is not None:
            lines += ['  if [ "$MOD_OPS" = plugin ]; then',
                      "    " + " ".join(trtexec_command(plan, kind, "PLUGIN")),
                      "  else",
                      "    " + " ".join(trtexec_command(native, kind, None)),
                      "  fi"]
        else:
            lines.append("  " + " ".join(trtexec_command(plan, kind, None)))
    lines += [
        '  echo "engines built with trtexec; the runtime reads engines that gammamod build recorded in manifest.json:"',
        "  echo 'install gammamod and the TensorRT Python package to build and run them with gammamod'; exit 0",
        "fi",
        "",
        "# 3. a smoke generation: prints time to first token and tokens/s",
        "gammamod run . " + " ".join(shlex.quote(a) for a in run_args),
        "",
    ]
    return "\n".join(lines)


def write_bundle(artifact, out, opts: BuildOptions, force: bool = False) -> dict:
    """Write the bundle for ``opts.target`` into ``out``; returns the plan it carries."""
    from gammamod.lifecycle import OutputDir
    from gammamod.manifest import describe_files, read_manifest

    manifest = read_manifest(artifact)
    if manifest.get("engines"):
        raise GammamodError(f"{artifact}: holds engines built for another GPU; bundle the artifact as exported")
    plan = make_plan(manifest, opts)
    has_image = manifest.graph("vision") is not None
    is_bundle = lambda p: (Path(p) / BUNDLE_MARKER).is_file()  # noqa: E731
    with OutputDir(Path(out), force=force, inputs=[manifest.root], is_ours=is_bundle, what="bundle") as tmp:
        names = [n for n in manifest["files"] if ".trt" not in n]  # other versions' copies stay behind
        for name in names:
            _place(manifest.path(name), tmp / name)
        copies = {}
        for kind in plan["engines"]:
            forms = ("plugin", "native") if kind == "decoder" and manifest.routed else ("plugin",)
            for form in forms:
                name = copy_name(manifest.graph(kind)["file"], plan["tensorrt"], form)
                onnx.save(checked_copy(manifest, kind, plan["tensorrt"], form), str(tmp / name))
                copies[kind if form == "plugin" else f"{kind}_native"] = name
        (tmp / "plugins").mkdir()
        for src in library_sources():
            shutil.copy2(src, tmp / "plugins" / src.name)
        if has_image:
            from importlib import resources

            shutil.copy2(str(resources.files("gammamod") / "assets" / "test_image.png"), tmp / "smoke.png")
        build_args = ["--target", plan["target"]["name"], "--precision", plan["precision"], "--max-batch",
                      str(plan["max_batch"]), "--max-seq", str(plan["max_seq"]), "--opt-level",
                      str(plan["options"]["opt_level"]), "--workspace", str(plan["options"]["workspace_mib"]),
                      "--hardware-compat", plan["options"]["hardware_compat"], "--timing-cache", "timing.cache"]
        if plan["span_lengths"]:
            build_args += ["--span-lengths", ",".join(map(str, plan["span_lengths"]))]
        if plan["options"]["version_compatible"]:
            build_args.append("--version-compatible")
        script = tmp / "build.sh"
        script.write_text(build_script(plan, build_args, has_image))
        script.chmod(0o755)
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        data = json.loads(json.dumps(manifest.data))
        data["tensorrt"]["targets"] = {plan["tensorrt"]: {**copies, "notes": plan["parser_notes"]}}
        data["files"] = describe_files(tmp, names + list(copies.values()))
        from gammamod.manifest import Manifest

        Manifest(data, tmp).write()
        (tmp / BUNDLE_MARKER).write_text(json.dumps(
            {"target": plan["target"]["name"], "tensorrt": plan["tensorrt"], "artifact": str(manifest.root),
             "onnx": copies, "plugin_sources": sorted(p.name for p in (tmp / "plugins").iterdir())}, indent=2) + "\n")
    return plan

