"""``gammamod calib quantize ARTIFACT --precision int8|int4|fp8 --out DIR``: a quantized artifact.

The output is a whole artifact (the same layout and manifest as ``gammamod export`` writes, so
the runtime, ``validate``, ``bench`` and the engine builder take it unchanged) whose decoder
graphs carry explicit Q/DQ (:mod:`gammamod.calib.qdq`). What is quantized and how, what stayed in
full precision, the calibration and the tolerances ``validate`` holds it to are recorded under the
manifest's ``quantization`` field; ``validate`` adds its numbers there.

Backends: ``ort`` (the default) computes the scales here and calibrates activations by running
the artifact on ONNX Runtime (:mod:`gammamod.calib.capture`); ``modelopt`` is NVIDIA ModelOpt's
ONNX PTQ, an optional extra.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError

from .qdq import BLOCK_SIZES, SCHEMES, quantize_model, quantize_weight

FP8_MIN_COMPUTE_CAPABILITY = 8.9
DECODER_KINDS = ("decoder", "decoder_ort", "decode_ort")
WEIGHTS_FILE = "decoder.weights"
FULL_PRECISION = ["routers", "RMSNorms", "MoD nodes (MoDSelect/MoDGather/MoDScatter and their scores)",
                  "attention (QK^T, softmax, AV) and the KV cache", "lm_head (the logits)", "token embeddings",
                  "the vision graph"]
_ONNX_DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 3: "int8", 2: "uint8", 6: "int32", 7: "int64",
                     22: "int4", 17: "float8e4m3fn"}


def check_request(manifest, precision: str, block_size: int, backend: str, compute_capability: float | None) -> None:
    """Refuse, in one line, what cannot be made or would not run where it is meant to."""
    if precision not in SCHEMES:
        raise GammamodError(f"--precision {precision!r}: expected one of {', '.join(SCHEMES)}")
    if manifest.get("quantization"):
        raise GammamodError(f"{manifest.root}: already quantized ({manifest['quantization']['precision']}); quantize "
                            "the fp32 artifact it came from")
    if manifest["model"]["dtype"] != "float32":
        raise GammamodError(f"{manifest.root}: a {manifest['model']['dtype']} artifact; quantize starts from an fp32 "
                            "export (gammamod export --dtype fp32)")
    if precision == "fp8":
        if compute_capability is None:
            raise GammamodError("--precision fp8 runs only on TensorRT with compute capability 8.9+ (Ada, Hopper, "
                                "Blackwell, Thor; not Orin): name the target with --compute-capability X.Y")
        if compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
            raise GammamodError(f"--precision fp8 needs compute capability {FP8_MIN_COMPUTE_CAPABILITY}+, the target has "
                                f"{compute_capability:g} (Jetson Orin is 8.7): use int8 or int4 there")
    if precision == "int4" and block_size not in BLOCK_SIZES:
        raise GammamodError(f"--block-size {block_size}: expected one of {', '.join(map(str, BLOCK_SIZES))}")
    if backend == "modelopt":
        try:
            import modelopt.onnx.quantization  # noqa: F401
        except ImportError:
            raise GammamodError("--backend modelopt needs NVIDIA ModelOpt: pip install 'gammamod[modelopt]' "
                                "(nvidia-modelopt[onnx]: pulls onnxruntime-gpu and CuPy, about 1.4 GB)") from None
        raise GammamodError("--backend modelopt: ModelOpt is installed, but gammamod does not drive it yet; "
                            "use --backend ort")
    elif backend != "ort":
        raise GammamodError(f"--backend {backend!r}: expected ort or modelopt")


def quantize_artifact(artifact, out, precision: str, data=None, random: int | None = None, steps: int = 8,
                      block_size: int = 32, backend: str = "ort", compute_capability: float | None = None,
                      threads: int | None = None, force: bool = False, progress=None):
    import onnx
    import onnxruntime

    from gammamod import __version__
    from gammamod.export.onnx_graph import WeightsFile
    from gammamod.lifecycle import OutputDir, is_artifact
    from gammamod.manifest import Manifest, describe_files, now, read_manifest

    from .capture import calibration_ranges
    from .data import calibration_set

    stage = progress.stage if progress is not None else (lambda name, total=None: (lambda n=1: None))
    manifest = read_manifest(artifact)
    check_request(manifest, precision, block_size, backend, compute_capability)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise GammamodError(f"--steps {steps!r}: expected 0 or more decode steps per calibration sample")
    scheme = SCHEMES[precision]
    samples = calibration_set(data, random, with_images="vision" in manifest["graphs"])
    kinds = [k for k in DECODER_KINDS if k in manifest["graphs"]]
    calibration = None
    if scheme.activations:
        manifest.verify_files()
        calibration = calibration_ranges(manifest, samples, steps, threads, progress)

    source_table = manifest["weights"][WEIGHTS_FILE]
    source = np.memmap(manifest.path(WEIGHTS_FILE), mode="r")
    cache: dict[str, dict] = {}  # weight -> its stored tensors, made once for every graph
    stored: dict = {}  # stored tensor name -> TensorProto

    def weight_tensors(name: str) -> dict:
        if name not in cache:
            offset, nbytes, dtype, shape = source_table[name]
            w = source[offset:offset + nbytes].view(np.dtype(dtype)).reshape(shape)
            cache[name] = quantize_weight(name, w, scheme, block_size)
            stored.update(cache[name])
        return cache[name]

    with OutputDir(out, force=force, inputs=[artifact], is_ours=is_artifact, what="artifact directory") as partial:
        stage("writing quantized graphs")()
        models, counts = {}, {}
        for kind in kinds:
            model = onnx.load(str(manifest.path(manifest.graph(kind)["file"])), load_external_data=False)
            amax = calibration["amax"].get(kind, {}) if calibration else {}
            models[kind], used = quantize_model(model, amax, scheme, block_size, weight_tensors)
            existing = {i.name for i in models[kind].graph.initializer}
            models[kind].graph.initializer.extend(stored[n] for n in sorted(used) if n not in existing)
            counts[kind] = len({n.rsplit(".", 1)[0] for n in used})
        table = _write_weights(models, source, source_table, stored, partial / WEIGHTS_FILE, WeightsFile)
        data = copy.deepcopy(manifest.data)
        for kind, model in models.items():
            onnx.save(model, str(partial / manifest.graph(kind)["file"]))
            data["graphs"][kind]["initializers"] = sorted(i.name for i in model.graph.initializer if i.name in table)
        data["weights"][WEIGHTS_FILE] = table
        trt_copies = {f for t in (manifest.get("tensorrt") or {}).get("targets", {}).values()
                      for k, f in t.items() if k != "notes"}
        written = {manifest.graph(k)["file"] for k in kinds} | {WEIGHTS_FILE}
        for name in manifest["files"]:
            if name not in written and name not in trt_copies:
                shutil.copy2(manifest.path(name), partial / name)
        data["created"] = now()
        data["tools"] = {**data["tools"], "gammamod": __version__, "onnxruntime": onnxruntime.__version__,
                         "onnx": onnx.__version__}
        data["quantization"] = _record(manifest, precision, scheme, block_size, backend, compute_capability, samples,
                                       steps, calibration, counts)
        versions = list((data.get("tensorrt") or {}).get("targets", {}))
        if data.get("tensorrt"):
            data["tensorrt"]["targets"] = {}
        result = Manifest(data, partial)
        if versions:
            from gammamod.engines.prepare import write_tensorrt_copies

            stage("writing TensorRT copies")()
            write_tensorrt_copies(result, versions)
        result.data["files"] = describe_files(partial, [p.name for p in partial.iterdir() if p.name != "manifest.json"])
        result.write()
    result.root = Path(out)
    return result


def _write_weights(models: dict, source, source_table: dict, stored: dict, path: Path, WeightsFile) -> dict:
    """One weights file for every decoder graph: the fp32 tensors they keep (copied from the
    source artifact's file) and the quantized ones, each once; every graph points into it."""
    weights = WeightsFile(path)
    table = {}
    try:
        for model in models.values():
            for init in model.graph.initializer:
                name = init.name
                external = init.data_location == init.EXTERNAL
                if name in table or not (external or _in_weights_file(stored, name)):
                    continue
                if external:
                    offset, nbytes, dtype, shape = source_table[name]
                    raw = np.asarray(source[offset:offset + nbytes])
                else:
                    raw = np.frombuffer(init.raw_data, np.uint8)
                    dtype, shape = _ONNX_DTYPE_NAMES[init.data_type], list(init.dims)
                weights.add(name, raw)
                table[name] = [*weights.placements[name], dtype, shape]
    finally:
        weights.close()
    for model in models.values():
        for init in model.graph.initializer:
            if init.name in table:
                offset, nbytes = table[init.name][:2]
                init.ClearField("raw_data")
                del init.external_data[:]
                for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(nbytes))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
                init.data_location = init.EXTERNAL
    return table


def _in_weights_file(stored: dict, name: str) -> bool:
    """Quantized weights and their scales go to the weights file; zero points (all 0, one byte per
    channel) stay in the graph, where a linter reads them without the weights file."""
    return name in stored and not name.endswith(".zero_point")


def _record(manifest, precision, scheme, block_size, backend, compute_capability, samples, steps, calibration,
            counts) -> dict:
    from gammamod.validate.validate import QUANTIZED_TOLERANCES

    weights = {"dtype": scheme.weight_dtype, "symmetric": True, "zero_points": 0,
               "granularity": (f"blocks of {block_size} along K of each [K, N] weight (DequantizeLinear axis 0, "
                               "block_size)" if precision == "int4" else
                               "per output channel (DequantizeLinear axis 1 of each [K, N] weight)")}
    activations = None
    if scheme.activations:
        activations = {"dtype": scheme.weight_dtype, "symmetric": True, "zero_points": 0, "granularity": "per tensor",
                       "calibration": "max |x| over real runs (runtime prefill and decode on the calibration samples)",
                       "runs": calibration["runs"]}
    return {"precision": precision, "backend": backend,
            "method": {"int8": "W8A8 static post-training quantization, explicit Q/DQ",
                       "fp8": "FP8 e4m3 weights and activations, static, explicit Q/DQ",
                       "int4": "INT4 weight-only, blocked DequantizeLinear (opset 21)"}[precision],
            "scales_dtype": scheme.scale_dtype, "block_size": block_size if precision == "int4" else None,
            "weights": weights, "activations": activations,
            "quantized": "decoder layers' projections (self_attn qkv/o, mlp gate_up/down): "
                         + ", ".join(f"{n} weights in {k}" for k, n in counts.items()),
            "full_precision": FULL_PRECISION,
            "calibration_samples": len(samples) if scheme.activations else 0,  # int4: weights alone
            "decode_steps": steps if scheme.activations else 0,
            "min_compute_capability": FP8_MIN_COMPUTE_CAPABILITY if precision == "fp8" else None,
            "target_compute_capability": compute_capability,
            "ort_cpu": {"int8": "fused to MatMulIntegerToFloat", "int4": "fused to MatMulNBits",
                        "fp8": "runs, emulated: QuantizeLinear/DequantizeLinear in float8 around fp32 MatMuls (slower "
                               "than fp32; fp8 is for TensorRT)"}[precision],
            "source_artifact": str(manifest.root), "tolerance": QUANTIZED_TOLERANCES[precision].as_dict(),
            "validate": None}
