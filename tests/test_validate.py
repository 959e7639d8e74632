"""validate and bench on the tiny models: what they compare, report and write. (Speed is bench's
business, measured as ratios; no test asserts a time.)"""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from gammamod.errors import GammamodError
from gammamod.validate.bench import run_bench
from gammamod.validate.validate import run_validate


def test_validate_passes_a_faithful_artifact(art_gamma, tiny_gamma):
    report = run_validate(art_gamma, tiny_gamma, samples=2, steps=6)
    assert report["passed"] and report["dtype"] == "float32"
    r = report["backends"]["ort-cpu"]
    assert r["logits"]["max_abs_over_scale"] < 1e-4 and r["features"]["max_abs_over_scale"] < 1e-4
    assert r["kept_agreement"] == {3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    assert r["kv_lengths_match"] and r["greedy_match"] == [6, 6]
    # Polygraphy's statistics are all there
    assert {"max_abs", "mean_abs", "median_abs", "max_rel", "mean_rel", "median_rel"} <= set(r["logits"])


def test_validate_fails_a_divergent_reference(art_gamma, tiny_gamma, tmp_path):
    """The same geometry with one weight changed: the logits no longer agree, and validate says so."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "changed"
    shutil.copytree(tiny_gamma, ckpt)
    state = load_file(ckpt / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"] * 1.5
    save_file(state, ckpt / "model.safetensors")
    report = run_validate(art_gamma, ckpt, samples=1, steps=4)
    assert not report["passed"]
    assert any("logits error" in f for f in report["backends"]["ort-cpu"]["failures"])


def test_validate_uses_half_precision_tolerances(art_gamma_fp16, tiny_gamma):
    report = run_validate(art_gamma_fp16, tiny_gamma, samples=1, steps=4)
    assert report["dtype"] == "float16" and report["tolerance"]["logits"] == 3e-2
    assert report["passed"], report["backends"]["ort-cpu"]["failures"]


def test_validate_inputs_from_files_and_errors(art_gamma, tiny_gamma, tiny_pmod, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (90, 60), (200, 10, 10)).save(images / "a.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour is it?\nIs it a square?\n")
    report = run_validate(art_gamma, tiny_gamma, steps=3, images_dir=images, prompts_file=prompts)
    assert report["samples"] == 2 and report["passed"]
    with pytest.raises(GammamodError, match="no such file"):
        run_validate(art_gamma, tiny_gamma, prompts_file=tmp_path / "none.txt")
    with pytest.raises(GammamodError, match="not the checkpoint this artifact was exported from"):
        run_validate(art_gamma, tiny_pmod, samples=1)
    with pytest.raises(GammamodError, match="not available here"):
        run_validate(art_gamma, tiny_gamma, backends=["tensorrt"])


def test_validate_cli_report_and_exit_code(art_gamma, tiny_gamma, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "gammamod", "validate", str(art_gamma), "--reference",
                           str(tiny_gamma), "--samples", "1", "--steps", "3", "--report", str(report),
                           "--save-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["passed"] and "PASS" in proc.stdout
    assert (tmp_path / "runs" / "decoder-0.json").is_file()  # Polygraphy's saved run results


def test_bench_reports_every_configuration(art_gamma, art_gamma_dense, tiny_gamma, tmp_path):
    report = run_bench(art_gamma, reference=tiny_gamma, dense_artifact=art_gamma_dense, tokens=3, warmup=0,
                       repeats=1, out_dir=tmp_path / "bench")
    assert set(report["configs"]) == {"gamma-mod / ort", "dense / ort", "gamma-mod / pytorch",
                                      "dense / transformers"}
    for r in report["configs"].values():
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "e2e_ms",
                    "peak_rss_mib", "kv_bytes", "prefill_gflops", "prefill_roofline", "decode_gbps"):
            assert r[key] > 0, key
    # the MoD artifact caches fewer KV entries than its dense twin, and computes fewer FLOPs
    assert report["ratios"]["KV bytes MoD / dense"] < 1
    assert report["prefill_gflop"]["routed"] < report["prefill_gflop"]["dense"]
    assert {g["name"] for g in report["goals"]} == {"prefill MoD vs dense, share of the FLOP speedup",
                                                    "prefill dense runtime vs transformers eager",
                                                    "decode runtime vs PyTorch reference",
                                                    "decode MoD vs dense, share of the speedup the gate's skipped "
                                                    "FLOPs allow"}
    # gamma-MoD's decode gate: the share of (step, MoD layer) pairs it skipped, counted from the
    # layers' caches, and the speedup those skipped FLOPs allow
    skipped = report["ratios"]["decode gate: skipped (step, MoD layer) pairs"]
    allowed = report["ratios"]["decode speedup the gate's skipped FLOPs allow (theory)"]
    assert 0 <= skipped <= 1 and allowed >= 1 and (allowed > 1) == (skipped > 0)
    # runtime workers never load torch, so their peak memory is their own
    assert report["configs"]["gamma-mod / ort"]["peak_rss_mib"] < report["configs"]["gamma-mod / pytorch"]["peak_rss_mib"]
    out = tmp_path / "bench"
    assert json.loads((out / "bench.json").read_text())["recipe"] == "gamma-mod"
    assert "| gamma-mod / ort |" in (out / "bench.md").read_text()
    assert Image.open(out / "bench.png").size[0] > 500


def test_decode_skip_speedup_by_hand(art_gamma):
    """The speedup the gate allows: a step's FLOPs (layers and lm_head) over those left when the
    skipped share of the MoD layers' FLOPs is gone, from the tiny model's geometry by hand."""
    from gammamod.manifest import read_manifest
    from gammamod.validate.bench import decode_skip_speedup

    m = read_manifest(art_gamma)
    h, inter, layers, vocab = 64, 176, 8, 512  # hidden, MLP, layers, vocabulary of make-tiny's gamma-MoD
    heads, kv_heads, d, context = 4, 2, 16, 100
    layer = 2 * h * (heads * d * 2 + kv_heads * d * 2) + 4 * context * heads * d + 6 * h * inter
    total = layers * layer + 2 * h * vocab
    assert decode_skip_speedup(m, 0.5, context) == pytest.approx(total / (total - 0.5 * 4 * layer))
    assert decode_skip_speedup(m, 0.0, context) == 1.0


def test_bench_sweep_and_dense_twin_export(art_gamma, tiny_gamma, tmp_path):
    """Without --dense, bench exports the dense twin itself; --sweep exports and times each ratio."""
    report = run_bench(art_gamma, reference=tiny_gamma, tokens=2, warmup=0, repeats=1, out_dir=tmp_path / "b",
                       sweep=[0.25, 0.75])
    assert (tmp_path / "b" / "dense-artifact" / "manifest.json").is_file()
    rows = report["sweep"]
    assert [r["skip_ratio"] for r in rows] == [0.25, 0.75]
    assert rows[0]["flop_speedup"] < rows[1]["flop_speedup"]  # skipping more saves more
    assert rows[0]["kv_bytes"] > rows[1]["kv_bytes"]
    assert Image.open(tmp_path / "b" / "sweep.png").size[0] > 300


def test_bench_sweep_needs_gamma(art_pmod, tiny_pmod, tmp_path):
    with pytest.raises(GammamodError, match="sweep skip-ratio needs a gamma-MoD artifact"):
        run_bench(art_pmod, reference=tiny_pmod, dense_artifact=art_pmod, tokens=1, warmup=0, repeats=1,
                  out_dir=tmp_path / "x", sweep=[0.5])
