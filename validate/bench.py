"""``gammamod bench``: latency of the deployed artifact against its dense twin and PyTorch, in one run.

Configurations, each in its own process (so peak memory is its own, and the runtime ones never
import torch), all on the same image and prompt, the same dtype and the same thread count:

* ``<recipe> / <backend>``: the artifact on the runtime;
* ``dense / <backend>``: the same checkpoint exported with ``--dense`` (routers ignored);
* ``<recipe> / pytorch``: the reference model in static mode, eager, with torch's fused SDPA;
* ``dense / transformers``: transformers' ``LlamaForCausalLM`` of the same shape and weights,
  eager with SDPA (the dense PyTorch baseline users know).

Every process loads first; then the measurements run in rounds, one configuration at a time
(warm-up rounds, then the median of the timed ones), so slow periods of a shared machine fall on
all configurations alike. Stages: vision encoder, prefill (decoder; time to first token is
vision + prefill), decode (ms/token over a fixed number of greedy tokens), end to end.

Against the machine: prefill's achieved GFLOP/s (theoretical decoder FLOPs / time) against the
measured matmul rate, decode's achieved bytes/s (weights and KV read per token / time) against
the measured memory bandwidth. Output: JSON, a markdown table and a PNG chart; ``--sweep
skip-ratio=...`` adds gamma-MoD's prefill speedup against the skip ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gammamod.errors import GammamodError
from gammamod.manifest import SHORT_DTYPE

GOALS = {  # measured on this project's 2-core CPU machine with the bench-size models on ONNX Runtime
    "prefill MoD vs dense, share of the FLOP speedup": 0.9,
    "prefill dense runtime vs transformers eager": 1.2,
    "decode runtime vs PyTorch reference": 2.0,
    # gamma-MoD: the decode gate skips layers; the time saved must follow the FLOPs skipped
    "decode MoD vs dense, share of the speedup the gate's skipped FLOPs allow": 0.8,
    # a quantized artifact against its fp32 source (--compare), ONNX Runtime CPU
    "prefill int8 vs fp32": 2.5,
    "decode int8 vs fp32": 3.0,
    "decode int4 vs fp32": 2.0,
}


SETTLE_S = 0.5  # pause between configurations


@dataclass
class Config:
    label: str
    kind: str  # runtime | pytorch | transformers
    artifact: str | None = None
    checkpoint: str | None = None
    backend: str = "ort"
    device: str = "cpu"
    routing: str = "static"
    options: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# the machine


def machine_rates(threads: int, device: str = "cpu") -> dict | None:
    """ONNX Runtime's fp32 matmul rate (2048^3 GEMM) and read bandwidth (GEMV over 256 MiB) on
    ``device``; None where ORT cannot run there (a GPU without onnxruntime-gpu)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1]) if ":" in device else 0})]
    else:
        return None

    def session(a_shape, w):
        g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.disable_prepacking", "1")  # as the runtime runs its weights
        return ort.InferenceSession(m.SerializeToString(), so, providers=providers)

    def best(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rng = np.random.default_rng(0)
    n = 2048
    a = rng.standard_normal((n, n)).astype(np.float32)
    s = session(a.shape, rng.standard_normal((n, n)).astype(np.float32))
    gflops = 2 * n ** 3 / best(lambda: s.run(None, {"a": a})) / 1e9
    w = rng.standard_normal((4096, 16384)).astype(np.float32)
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    s = session(x.shape, w)
    gbps = w.nbytes / best(lambda: s.run(None, {"a": x})) / 1e9
    return {"matmul_gflops": gflops, "memory_gbps": gbps, "threads": threads, "device": device}


# --------------------------------------------------------------------------------------------
# one configuration, in its own process


def _worker(conn, config: Config, image: str, prompt: str, tokens: int, threads: int) -> None:
    from gammamod.lifecycle import die_with_parent

    die_with_parent()
    try:
        run = _Runner(config, image, prompt, tokens, threads)
        conn.send(("ready", run.info))
        while True:
            cmd = conn.recv()
            if cmd == "measure":
                conn.send(("ok", run.measure()))
            elif cmd == "stats":
                conn.send(("ok", {"peak_rss_mib": _peak_rss_mib(), "device_memory_mib": run.device_memory_mib()}))
            else:
                break
    except BaseException as e:  # report, do not hang the parent
        conn.send(("error", f"{config.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    finally:
        conn.close()


def _peak_rss_mib() -> float:
    """This process's peak resident memory. (ru_maxrss would not do: Linux keeps it across exec,
    so a spawned worker would report its parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_memory_mib(device: str) -> float | None:
    """GPU memory used by this process on ``device`` (NVML), or None on CPU / without NVML."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.split(":")[1]) if ":" in device else 0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20
        return None
    finally:
        pynvml.nvmlShutdown()


class _Runner:
    """Loads one configuration; ``measure()`` times one pass: vision, prefill, ``tokens`` greedy steps."""

    def __init__(self, config: Config, image: str, prompt: str, tokens: int, threads: int):
        self.config, self.tokens = config, tokens
        self.image, self.prompt = image, prompt
        self.info: dict = {}
        self._peak_device = 0.0
        if config.kind == "runtime":
            from gammamod.runtime.image import load_image
            from gammamod.runtime.pipeline import Pipeline

            self.pipe = Pipeline.load(config.artifact, backend=config.backend, device=config.device,
                                      threads=threads, verify=False, **config.options)
            self.picture = load_image(image)
            self.info = {"backend": self.pipe.backend.describe()}
        else:
            import torch

            torch.set_num_threads(threads)
            from gammamod.export import load_checkpoint
            from gammamod.runtime.image import load_image
            from gammamod.runtime.tokenizer import Tokenizer

            self.torch = torch
            self.model = load_checkpoint(config.checkpoint)
            self.tokenizer = Tokenizer.from_dir(config.checkpoint)
            self.images = self.model.vision.processor().process([load_image(image)])
            self.pixels = torch.from_numpy(self.images.pixels)
            self.info = {"backend": f"torch {torch.__version__} ({torch.get_num_threads()} threads, SDPA)"}
            if config.kind == "transformers":
                self.hf = transformers_twin(self.model)

    def measure(self) -> dict:
        result = self._runtime() if self.config.kind == "runtime" else self._torch()
        self._peak_device = max(self._peak_device, _gpu_memory_mib(self.config.device) or 0.0)
        return result

    def device_memory_mib(self) -> float | None:
        """The most GPU memory this process held after a pass (its arena and engines keep what
        they took, so that is its peak); None on CPU or without NVML (nvidia-ml-py)."""
        return self._peak_device or None

    def _runtime(self) -> dict:
        pipe = self.pipe
        t0 = time.perf_counter()
        features = pipe.encode_images([self.picture])
        t1 = time.perf_counter()
        prepared = pipe.prepare(None, [self.prompt], features=features)
        with pipe.pooled_generator(1) as gen:  # as Pipeline.generate: the KV buffers are kept between requests
            return self._timed_generation(gen, prepared, t0, t1)

    def _timed_generation(self, gen, prepared, t0, t1) -> dict:
        pipe = self.pipe
        t2 = time.perf_counter()
        logits = gen.prefill(prepared.inputs_embeds, routable=prepared.routable, lengths=prepared.lengths)
        t3 = time.perf_counter()
        lengths = [gen.kv_lengths()]
        for _ in range(self.tokens):
            logits = gen.decode(np.asarray(logits).argmax(-1))
            lengths.append(gen.kv_lengths())
        t4 = time.perf_counter()
        # a layer whose cache did not grow in a step did not run in it (gamma-MoD's decode gate)
        grew = np.diff(np.stack(lengths)[:, :, 0], axis=0) > 0  # [steps, layers]
        mod_layers = pipe.manifest["recipe"]["mod_layers"] if pipe.manifest.routed else []
        skipped = float((~grew[:, mod_layers]).mean()) if mod_layers else 0.0
        return {"vision_s": t1 - t0, "prefill_s": t3 - t2, "decode_s": (t4 - t3) / self.tokens, "e2e_s": t4 - t0,
                "seq_len": int(prepared.lengths[0]),
                "span_length": prepared.routable[0][1] if prepared.routable else 0,
                "kv_bytes": int(gen.kv_bytes().sum()), "kv_bytes_per_layer": [int(x) for x in gen.kv_bytes()],
                "decode_skipped": skipped}

    def _torch(self) -> dict:
        torch = self.torch
        from gammamod.export.generate import forward_language, prepare_prompts
        from gammamod.export.model import Step
        from gammamod.runtime.prompt import VICUNA_V1

        model = self.model
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.encode_images(self.pixels)
            t1 = time.perf_counter()
            batch = prepare_prompts(model, self.tokenizer, [VICUNA_V1.prompt(self.prompt)], self.images)
            x = batch.inputs_embeds
            if self.config.kind == "transformers":
                t2 = time.perf_counter()
                out = self.hf(inputs_embeds=x, use_cache=True, logits_to_keep=1)
                t3 = time.perf_counter()
                past, logits = out.past_key_values, out.logits[:, -1]
                for _ in range(self.tokens):
                    out = self.hf(input_ids=logits.argmax(-1)[:, None], past_key_values=past, use_cache=True,
                                  logits_to_keep=1)
                    past, logits = out.past_key_values, out.logits[:, -1]
                t4 = time.perf_counter()
                kv = sum(k.numel() * k.element_size() * 2 for k in _past_keys(past))
            else:
                t2 = time.perf_counter()
                out = forward_language(model, x, routable=batch.routable, routing=self.config.routing)
                t3 = time.perf_counter()
                cache, logits = out.cache, out.logits[:, -1]
                for _ in range(self.tokens):  # the reference's decode loop (generate_from_embeds)
                    step = Step(routing=self.config.routing, kv=cache, past_length=cache.seen.clone(),
                                valid=torch.ones(1, dtype=torch.long))
                    hidden = model.forward_chunk(model.embed(logits.argmax(-1)[:, None]), step)
                    cache.seen += 1
                    logits = model.lm_head(hidden[:, -1]).float()
                t4 = time.perf_counter()
                cfg = model.config
                kv = int(cache.lengths.sum()) * 2 * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
        return {"vision_s": t1 - t0, "prefill_s": t3 - t2, "decode_s": (t4 - t3) / self.tokens,
                "e2e_s": (t1 - t0) + (t4 - t2), "seq_len": int(x.shape[1]), "kv_bytes": int(kv)}


def _past_keys(past):
    if hasattr(past, "layers"):  # transformers 5 DynamicCache
        return [layer.keys for layer in past.layers]
    if hasattr(past, "key_cache"):
        return past.key_cache
    return [k for k, _ in past]


def transformers_twin(model, attention: str = "sdpa"):
    """transformers' LlamaForCausalLM with our decoder's weights (the same names: ours mirror the
    checkpoint keys), eager with ``attention`` ("sdpa" or "eager")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    cfg._attn_implementation = attention
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items()
                        if not (".router" in k or k.startswith(("model.vision_tower.", "model.mm_projector.")))})
    return hf.to(model.dtype)


# --------------------------------------------------------------------------------------------
# the run


def _start(configs: list[Config], image: str, prompt: str, tokens: int, threads: int):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # runtime workers must not inherit torch
    workers = {}
    for cfg in configs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, cfg, image, prompt, tokens, threads), daemon=True)
        proc.start()
        child.close()
        workers[cfg.label] = (proc, parent)
    info = {}
    try:
        for label, (_, conn) in workers.items():
            status, payload = conn.recv()
            if status == "error":
                raise GammamodError(f"bench could not start {payload}")
            info[label] = payload
    except BaseException:
        _stop(workers, kill=True)
        raise
    return workers, info


def _ask(workers, label, cmd):
    conn = workers[label][1]
    conn.send(cmd)
    status, payload = conn.recv()
    if status == "error":
        raise GammamodError(f"bench failed in {payload}")
    return payload


def _stop(workers, kill: bool = False) -> None:
    """Ask the workers to end (or kill them: after an error or an interrupt), and reap them."""
    for proc, conn in workers.values():
        if not kill:
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                kill = True
        proc.join(timeout=0 if kill else 30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def measure_configs(configs: list[Config], image: str, prompt: str, tokens: int, threads: int, warmup: int,
                    repeats: int, progress=None) -> dict:
    workers, info = _start(configs, image, prompt, tokens, threads)
    samples = {cfg.label: [] for cfg in configs}
    advance = progress.stage("timing", (warmup + repeats) * len(configs)) if progress else (lambda n=1: None)
    try:
        for r in range(warmup + repeats):
            for cfg in configs:  # round robin: a slow moment of the machine hits every configuration
                # the previous configuration's idle thread pools spin for a while (ORT, OpenMP):
                # let them go to sleep first, or they take cores from this one's first stage
                time.sleep(SETTLE_S)
                result = _ask(workers, cfg.label, "measure")
                if r >= warmup:
                    samples[cfg.label].append(result)
                advance()
        stats = {label: _ask(workers, label, "stats") for label in samples}
    except BaseException:
        _stop(workers, kill=True)
        raise
    _stop(workers)
    out = {}
    for cfg in configs:
        runs = samples[cfg.label]
        med = {k: statistics.median(r[k] for r in runs) for k in ("vision_s", "prefill_s", "decode_s", "e2e_s")}
        out[cfg.label] = {
            "kind": cfg.kind, "backend": info[cfg.label].get("backend"), "repeats": len(runs),
            "vision_ms": med["vision_s"] * 1e3, "prefill_ms": med["prefill_s"] * 1e3,
            "ttft_ms": (med["vision_s"] + med["prefill_s"]) * 1e3, "decode_ms_per_token": med["decode_s"] * 1e3,
            "tokens_per_s": 1.0 / med["decode_s"], "e2e_ms": med["e2e_s"] * 1e3,
            "prefill_ms_all": [r["prefill_s"] * 1e3 for r in runs], "decode_ms_all": [r["decode_s"] * 1e3 for r in runs],
            "seq_len": runs[-1]["seq_len"], "span_length": runs[-1].get("span_length", 0),
            "decode_skipped": statistics.mean(r.get("decode_skipped", 0.0) for r in runs), "kv_bytes": runs[-1]["kv_bytes"],
            "kv_bytes_per_layer": runs[-1].get("kv_bytes_per_layer"), "peak_rss_mib": stats[cfg.label]["peak_rss_mib"],
            "device_memory_mib": stats[cfg.label]["device_memory_mib"]}
    return out


# --------------------------------------------------------------------------------------------
# theory: FLOPs and bytes


def _config(manifest):
    from gammamod.export.model import DecoderConfig

    m = manifest["model"]
    return DecoderConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                         intermediate_size=m["intermediate_size"], num_layers=m["num_layers"], num_heads=m["num_heads"],
                         num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"])


def prefill_flops(manifest, seq_len: int, span_length: int = 0) -> float:
    """Decoder prefill FLOPs of a ``seq_len``-token prompt whose routed span has ``span_length``
    tokens (MoD layers over their kept tokens; 0: dense)."""
    from gammamod.export.model import decoder_flops

    kept = {}
    if span_length and manifest.routed:
        kept = {layer: seq_len - span_length + k for layer, k in manifest.capacity_rule().kept_counts(span_length).items()}
    return decoder_flops(_config(manifest), seq_len, kept)


def decode_skip_speedup(manifest, skipped: float, context: int) -> float:
    """The decode speedup gamma-MoD's gate allows when it skips ``skipped`` of the (step, MoD layer)
    pairs: the FLOPs of a step (layers and lm_head) over those that remain."""
    from gammamod.export.model import mod_layer_flops

    cfg = _config(manifest)
    layer = mod_layer_flops(cfg, 1, context)
    total = cfg.num_layers * layer + 2 * cfg.hidden_size * cfg.vocab_size
    saved = skipped * len(manifest["recipe"]["mod_layers"]) * layer
    return total / (total - saved)


def decode_weight_bytes(manifest) -> int:
    """Bytes of weights a decode step reads: every decoder weight its graph uses (embeddings are a
    row lookup; RoPE tables a row each)."""
    kind = "decode_ort" if "decode_ort" in manifest["graphs"] else "decoder"
    table = manifest["weights"]["decoder.weights"]
    return sum(table[n][1] for n in manifest["graphs"][kind]["initializers"] if not n.startswith("rope_"))


# --------------------------------------------------------------------------------------------


def run_bench(artifact, reference=None, dense_artifact=None, backend: str = "ort", device: str = "cpu",
              threads: int | None = None, tokens: int = 32, warmup: int = 2, repeats: int = 5, out_dir=None,
              sweep: list[float] | None = None, image=None, prompt: str = "What is in the picture?",
              progress=None, compare=None) -> dict:
    from gammamod.demo import test_image
    from gammamod.manifest import read_manifest
    from gammamod.runtime.backends.ort import _physical_cores

    manifest = read_manifest(artifact)
    recipe = manifest["recipe"]["name"]
    routed = manifest.routed
    threads = threads or _physical_cores()
    out_dir = Path(out_dir or Path(artifact).with_name(Path(artifact).name + ".bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = str(image or test_image())
    stage = progress.stage if progress is not None else (lambda name, total=None: (lambda n=1: None))
    if dense_artifact is None and reference is not None and routed:
        dense_artifact = _dense_twin(reference, manifest, out_dir, stage)
    stage("measuring the machine")()
    before = machine_rates(threads, device)

    precision = (manifest.get("quantization") or {}).get("precision")
    label = f"{recipe} {precision} / {backend}" if precision else f"{recipe} / {backend}"
    configs = [Config(label, "runtime", artifact=str(artifact), backend=backend, device=device)]
    manifests = {label: manifest}
    precisions = {label: precision or SHORT_DTYPE[manifest["model"]["dtype"]]}
    for other_dir in compare or []:  # the same model at other precisions, timed in the same rounds
        other = read_manifest(other_dir)
        if other["model"]["hidden_size"] != manifest["model"]["hidden_size"] or \
                other["model"]["num_layers"] != manifest["model"]["num_layers"] or other["recipe"] != manifest["recipe"]:
            raise GammamodError(f"--compare {other_dir}: not the same model as {artifact} (geometry or recipe differ)")
        other_precision = (other.get("quantization") or {}).get("precision") or SHORT_DTYPE[other["model"]["dtype"]]
        other_label = f"{recipe} {other_precision} / {backend}"
        if other_label in manifests:
            raise GammamodError(f"--compare {other_dir}: a second {other_precision} artifact; compare each precision "
                                "once (quantized artifacts against their fp32 source)")
        configs.append(Config(other_label, "runtime", artifact=str(other_dir), backend=backend, device=device))
        manifests[other_label] = other
        precisions[other_label] = other_precision
    if dense_artifact is not None:
        configs.append(Config(f"dense / {backend}", "runtime", artifact=str(dense_artifact), backend=backend,
                              device=device))
    if reference is not None:  # eager CPU baselines (the reference model runs on CPU)
        where = "" if device == "cpu" else " (cpu)"
        configs.append(Config(f"{recipe} / pytorch{where}", "pytorch", checkpoint=str(reference),
                              routing="static" if routed else "dense"))
        configs.append(Config(f"dense / transformers{where}", "transformers", checkpoint=str(reference),
                              routing="dense"))
    results = measure_configs(configs, image, prompt, tokens, threads, warmup, repeats, progress)
    # the machine's best rates, before and after: one slow moment must not inflate the roofline shares
    after = machine_rates(threads, device)
    machine = {**before, **{k: max(before[k], after[k]) for k in ("matmul_gflops", "memory_gbps")}} if before else None

    seq_len = results[label]["seq_len"]
    span = results[label].get("span_length", 0)
    flops = {"routed": prefill_flops(manifest, seq_len, span), "dense": prefill_flops(manifest, seq_len)}
    weight_bytes = decode_weight_bytes(manifest)
    for name, r in results.items():
        read_weights = decode_weight_bytes(manifests[name]) if name in manifests else weight_bytes
        is_routed = routed and not name.startswith("dense")
        r["prefill_gflop"] = flops["routed" if is_routed else "dense"] / 1e9
        r["prefill_gflops"] = r["prefill_gflop"] / (r["prefill_ms"] / 1e3)
        on_device = machine is not None and (r["kind"] == "runtime" or device == "cpu")
        r["prefill_roofline"] = r["prefill_gflops"] / machine["matmul_gflops"] if on_device else None
        read = read_weights + r["kv_bytes"]
        r["decode_bytes_per_token"] = read
        r["decode_gbps"] = read / (r["decode_ms_per_token"] / 1e3) / 1e9
        r["decode_roofline"] = r["decode_gbps"] / machine["memory_gbps"] if on_device else None

    ratios = {}
    dense_label = f"dense / {backend}"
    where = "" if device == "cpu" else " (cpu)"
    pytorch_label, hf_label = f"{recipe} / pytorch{where}", f"dense / transformers{where}"
    if dense_label in results and routed:
        speedup = results[dense_label]["prefill_ms"] / results[label]["prefill_ms"]
        flop_speedup = flops["dense"] / flops["routed"]
        ratios["prefill speedup MoD vs dense"] = speedup
        ratios["prefill FLOP speedup MoD vs dense (theory)"] = flop_speedup
        ratios["decode speedup MoD vs dense"] = (results[dense_label]["decode_ms_per_token"]
                                                 / results[label]["decode_ms_per_token"])
        ratios["KV bytes MoD / dense"] = results[label]["kv_bytes"] / results[dense_label]["kv_bytes"]
        ratios["prefill MoD vs dense, share of the FLOP speedup"] = speedup / flop_speedup
        if manifest["recipe"]["decode"] == "gate":
            skipped = results[label]["decode_skipped"]
            allowed = decode_skip_speedup(manifest, skipped, seq_len + tokens // 2)
            ratios["decode gate: skipped (step, MoD layer) pairs"] = skipped
            ratios["decode speedup the gate's skipped FLOPs allow (theory)"] = allowed
            ratios["decode MoD vs dense, share of the speedup the gate's skipped FLOPs allow"] = (
                ratios["decode speedup MoD vs dense"] / allowed)
    if dense_label in results and hf_label in results:
        ratios["prefill dense runtime vs transformers eager"] = (results[hf_label]["prefill_ms"]
                                                                 / results[dense_label]["prefill_ms"])
    if pytorch_label in results:
        ratios["decode runtime vs PyTorch reference"] = (results[pytorch_label]["decode_ms_per_token"]
                                                         / results[label]["decode_ms_per_token"])
        ratios["prefill runtime vs PyTorch reference"] = (results[pytorch_label]["prefill_ms"]
                                                          / results[label]["prefill_ms"])
    baseline = next((name for name, m in manifests.items() if not m.get("quantization")), None)
    if compare and baseline is not None:  # each quantized configuration against the unquantized one
        for name, m in manifests.items():
            if m.get("quantization"):
                for stage_name, key in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
                    ratios[f"{stage_name} {precisions[name]} vs {precisions[baseline]}"] = (
                        results[baseline][key] / results[name][key])
    # the goals are set for ONNX Runtime on CPU against CPU baselines
    goals = [_goal(name, ratios[name]) for name in GOALS if name in ratios] if device == "cpu" else []

    report = {"artifact": str(artifact), "reference": str(reference) if reference else None,
              "compare": [str(c) for c in compare or []], "quantization": precision,
              "dense_artifact": str(dense_artifact) if dense_artifact else None, "recipe": recipe,
              "dtype": manifest["model"]["dtype"], "prompt": prompt, "image": image, "seq_len": seq_len,
              "decode_tokens": tokens, "warmup": warmup, "repeats": repeats, "threads": threads, "device": device,
              "machine": machine,
              "prefill_gflop": {k: v / 1e9 for k, v in flops.items()}, "decode_weight_bytes": weight_bytes,
              "configs": results, "ratios": ratios, "goals": goals}
    if sweep:
        if reference is None or recipe != "gamma-mod":
            raise GammamodError("--sweep skip-ratio needs a gamma-MoD artifact and its --reference checkpoint")
        report["sweep"] = _sweep(reference, manifest, sweep, out_dir, results, dense_label, image, prompt, tokens,
                                 threads, warmup, repeats, backend, device, stage, progress)
    write_outputs(report, out_dir)
    return report


def _goal(name: str, value: float) -> dict:
    return {"name": name, "value": value, "target": GOALS[name], "met": value >= GOALS[name]}


def _dense_twin(reference, manifest, out_dir: Path, stage) -> Path:
    """The same checkpoint exported with its routers ignored (cached in the bench directory)."""
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.manifest import read_manifest

    dense = out_dir / "dense-artifact"
    if (dense / "manifest.json").is_file():
        cached = read_manifest(dense)
        if cached["model"] == manifest["model"] and cached["source"]["checkpoint"] == manifest["source"]["checkpoint"]:
            return dense
    stage("exporting the dense baseline")()
    dtype = SHORT_DTYPE[manifest["model"]["dtype"]]
    export_artifact(reference, dense, ExportOptions(routing="dense", dtype=dtype, force=True,
                                                    max_batch=manifest["kv_cache"]["max_batch"],
                                                    max_seq=manifest["kv_cache"]["max_seq"]))
    return dense


def _sweep(reference, manifest, ratios, out_dir, results, dense_label, image, prompt, tokens, threads, warmup,
           repeats, backend, device, stage, progress) -> list[dict]:
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.manifest import read_manifest
    from gammamod.runtime.capacity import decimal_fraction

    dtype = SHORT_DTYPE[manifest["model"]["dtype"]]
    configs = []
    for r in ratios:
        art = out_dir / f"sweep-skip-{r:g}"
        if not (art / "manifest.json").is_file() or decimal_fraction(
                read_manifest(art)["routing"]["capacity"]["skip_ratio"]) != decimal_fraction(r):
            stage(f"exporting skip ratio {r:g}")()
            export_artifact(reference, art, ExportOptions(skip_ratio=r, dtype=dtype, force=True,
                                                          max_batch=manifest["kv_cache"]["max_batch"],
                                                          max_seq=manifest["kv_cache"]["max_seq"]))
        configs.append(Config(f"skip {r:g}", "runtime", artifact=str(art), backend=backend, device=device))
    measured = measure_configs(configs, image, prompt, tokens, threads, warmup, repeats, progress)
    dense = results.get(dense_label)
    rows = []
    for r, cfg in zip(ratios, configs):
        m = measured[cfg.label]
        art_manifest = read_manifest(cfg.artifact)
        flop = prefill_flops(art_manifest, m["seq_len"], m["span_length"]) / prefill_flops(art_manifest, m["seq_len"])
        rows.append({"skip_ratio": r, "prefill_ms": m["prefill_ms"], "decode_ms_per_token": m["decode_ms_per_token"],
                     "prefill_speedup": dense["prefill_ms"] / m["prefill_ms"] if dense else None,
                     "flop_speedup": 1 / flop, "kv_bytes": m["kv_bytes"]})
    return rows


# --------------------------------------------------------------------------------------------
# outputs


def write_outputs(report: dict, out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "bench.md").write_text(markdown(report))
    chart(report, out_dir / "bench.png")
    if report.get("sweep"):
        sweep_chart(report, out_dir / "sweep.png")
    report["outputs"] = {name: str(out_dir / name) for name in ("bench.json", "bench.md", "bench.png")}
    if report.get("sweep"):
        report["outputs"]["sweep.png"] = str(out_dir / "sweep.png")


def markdown(report: dict) -> str:
    m = report["machine"]
    machine = (f"Machine ({m['device']}): {m['matmul_gflops']:.0f} GFLOP/s fp32 matmul, {m['memory_gbps']:.1f} GB/s "
               "read (both measured with ONNX Runtime)." if m else
               "Machine rates: not measured (ONNX Runtime has no provider for this device).")
    gpu = any(r.get("device_memory_mib") is not None for r in report["configs"].values())
    title = f"{report['quantization']} quantized" if report.get("quantization") else report["dtype"]
    lines = [f"# gammamod bench: {report['recipe']} ({title})", "",
             f"Prompt of {report['seq_len']} tokens (image + {report['prompt']!r}), {report['decode_tokens']} greedy "
             f"decode tokens, median of {report['repeats']} rounds after {report['warmup']} warm-up, "
             f"{report['threads']} threads. {machine}", "",
             "| configuration | vision ms | prefill ms | time to first token ms | decode ms/token | tokens/s | "
             "end to end ms | prefill GFLOP/s (of peak) | decode GB/s (of bandwidth) | KV MiB | peak RSS MiB |"
             + (" device MiB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]

    def share(value, of, fmt=".0f"):
        return f"{value:{fmt}} ({of:.0%})" if of is not None else f"{value:{fmt}}"

    for name, r in report["configs"].items():
        device = r.get("device_memory_mib")
        lines.append(f"| {name} | {r['vision_ms']:.0f} | {r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | "
                     f"{r['decode_ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | {r['e2e_ms']:.0f} | "
                     f"{share(r['prefill_gflops'], r['prefill_roofline'])} | "
                     f"{share(r['decode_gbps'], r['decode_roofline'], '.1f')} | "
                     f"{r['kv_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} |"
                     + (f" {device:.0f} |" if device is not None else (" - |" if gpu else "")))
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    if report["goals"]:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {g['name']} | {g['value']:.2f} | >= {g['target']} | {'yes' if g['met'] else 'NO'} |"
                  for g in report["goals"]]
    if report.get("sweep"):
        lines += ["", "| skip ratio | prefill ms | speedup vs dense | FLOP speedup | decode ms/token |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['skip_ratio']:g} | {r['prefill_ms']:.0f} | {r['prefill_speedup'] or 0:.2f} | "
                  f"{r['flop_speedup']:.2f} | {r['decode_ms_per_token']:.1f} |" for r in report["sweep"]]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    stages = [("vision", "vision_ms"), ("prefill", "prefill_ms"),
              (f"decode x{report['decode_tokens']}", None)]
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.6 * len(names)))
    left = np.zeros(len(names))
    for (label, key), colour in zip(stages, ("#8fb3d9", "#3b6fb6", "#f0a04b")):
        values = np.array([report["configs"][n][key] if key else
                           report["configs"][n]["decode_ms_per_token"] * report["decode_tokens"] for n in names])
        ax.barh(names, values, left=left, label=label, color=colour)
        left += values
    for i, n in enumerate(names):
        ax.text(left[i], i, f" {left[i]:.0f} ms", va="center", fontsize=8)
    ax.set_xlabel("milliseconds (median)")
    ax.invert_yaxis()
    ax.set_xlim(0, left.max() * 1.18)
    ax.set_title(f"{report['recipe']} ({report['dtype']}): latency per stage, {report['seq_len']}-token prompt",
                 pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["sweep"]
    x = [r["skip_ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["flop_speedup"] for r in rows], "--", color="grey", label="decoder FLOPs (theory)")
    if rows[0]["prefill_speedup"] is not None:
        ax.plot(x, [r["prefill_speedup"] for r in rows], "o-", color="#3b6fb6", label="prefill, measured")
    ax.set_xlabel("gamma-MoD skip ratio")
    ax.set_ylabel("speedup vs dense")
    ax.set_title("prefill speedup against the skip ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
