"""Calibration: capacities from data feeding a threshold-routed export, and ARank.

The threshold artifact is checked against gamma-MoD's released inference (``reference`` routing)
on the very samples its capacities were calibrated on at quantile 1, where every layer's count fits:
logits, greedy tokens, kept indices and every layer's KV length must agree over prefill and 16
decode steps, on both ONNX Runtime graphs. The same graph with a smaller capacity in its manifest
must report the overflow (runtime and validate).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SAMPLES = 2  # --random N of the calibration run, reused as the parity inputs


def gammamod(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gammamod", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def one_line_error(proc, *fragments):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="session")
def capacity_file(tiny_root, tiny_gamma):
    out = tiny_root / "gamma-capacity.json"
    if not out.exists():
        proc = gammamod("calib", "capacity", tiny_gamma, "--random", SAMPLES, "--quantile", "1", "--out", out)
        assert proc.returncode == 0, proc.stderr
        assert "export with: gammamod export" in proc.stdout
    return out


@pytest.fixture(scope="session")
def art_threshold(tiny_root, tiny_gamma, capacity_file):
    from gammamod.export.exporter import ExportOptions, export_artifact, read_capacity_file

    out = tiny_root / "art-gamma-threshold"
    if not out.exists():
        overrides, span = read_capacity_file(capacity_file)
        export_artifact(tiny_gamma, out, ExportOptions(routing="threshold", capacity=overrides, capacity_span=span))
    return out


def _calibration_samples(ckpt, n: int = SAMPLES):
    from gammamod.calib.samples import load_model, prepared_samples

    model = load_model(ckpt)
    return model, list(prepared_samples(model, ckpt, random=n))


def test_capacity_report_covers_every_observed_count(tiny_gamma, capacity_file):
    """At quantile 1 no calibration sample falls short, and each capacity is the smallest 4-decimal
    fraction at or above the largest kept fraction the reference routing produced."""
    from gammamod.export.generate import forward_language
    from gammamod.runtime.capacity import fraction_count

    report = json.loads(capacity_file.read_text())
    assert capacity_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, samples = _calibration_samples(tiny_gamma)
    assert report["routing"] == "threshold" and report["samples"] == SAMPLES
    assert set(report["capacity"]) == {str(l) for l in model.recipe.mod_layers}
    observed = {l: [] for l in model.recipe.mod_layers}
    for s in samples:
        out = forward_language(model, s.embeds, routing="reference")
        for l in observed:
            observed[l].append((int(out.kept[l].shape[1]), s.length))
    for l, pairs in observed.items():
        entry = report["layers"][str(l)]
        cap = Fraction(entry["capacity"])
        assert Fraction(str(report["capacity"][str(l)])) == cap
        worst = max(Fraction(k, n) for k, n in pairs)
        assert worst <= cap < worst + Fraction(1, 10_000)
        assert entry["shortfall"] == 0.0
        assert all(k <= fraction_count(n, cap) for k, n in pairs)
        assert 0 <= entry["decode_gate_pass"] <= 1
    flops = report["flops"]
    assert 0 < flops["prefill_saving_reference"] and flops["prefill_saving_at_capacity"] <= flops["prefill_saving_reference"]


def test_threshold_artifact_equals_released_inference(tiny_gamma, art_threshold):
    """Capacity at or above every count: the static graph is gamma-MoD's released inference, exactly."""
    from gammamod.export.generate import generate_from_embeds
    from gammamod.manifest import read_manifest
    from gammamod.runtime import Pipeline

    assert read_manifest(art_threshold)["routing"]["mode"] == "threshold"
    model, samples = _calibration_samples(tiny_gamma)
    steps = 16
    for s in samples:
        ref = generate_from_embeds(model, s.embeds, routing="reference", max_new_tokens=steps + 1, return_logits=True)
        x = s.embeds.numpy()
        for fused in (True, False):
            gen = Pipeline.load(art_threshold, fused=fused).generator(1)
            logits = gen.prefill(x)
            for layer, idx in ref.kept.items():
                count = int(gen.kept_per_row[layer][0])
                assert count == idx.shape[1]
                np.testing.assert_array_equal(gen.kept[layer][:, :count], idx.numpy())
            tokens = []
            for i in range(steps + 1):
                want = ref.logits[:, i].numpy()
                assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
                tokens.append(int(np.argmax(logits)))
                if i < steps:
                    logits = gen.decode([tokens[-1]])
            assert tokens == ref.tokens[0].tolist()
            np.testing.assert_array_equal(gen.kv_lengths(), ref.kv_lengths.numpy())
            assert not any(gen.overflows.values())


def test_smaller_capacity_overflows_and_is_reported(tiny_gamma, art_threshold, tmp_path):
    """The capacity is an input of the graph: the same artifact with a smaller capacity in its
    manifest drops tokens, and the runtime and validate say so."""
    from gammamod.manifest import read_manifest
    from gammamod.runtime import Pipeline
    from gammamod.validate.validate import run_validate

    small = tmp_path / "small"
    shutil.copytree(art_threshold, small)
    manifest = read_manifest(small)
    overrides = manifest["routing"]["capacity"]["overrides"]
    for layer in overrides:
        overrides[layer] = {"fraction": "0.3"}
    manifest.write()
    _, samples = _calibration_samples(tiny_gamma)
    gen = Pipeline.load(small).generator(1)
    gen.prefill(samples[0].embeds.numpy())
    assert set(gen.overflows) == {int(l) for l in overrides} and all(n == 1 for n in gen.overflows.values())
    assert all(int(gen.kept_per_row[int(l)][0]) == int(np.ceil(0.3 * samples[0].length)) for l in overrides)
    report = run_validate(small, tiny_gamma, samples=1, steps=2)
    backend = report["backends"]["ort-cpu"]
    assert not report["passed"] and set(backend["capacity_overflows"]) == {int(l) for l in overrides}
    assert any("calibrate a larger capacity" in f for f in backend["failures"])


def test_capacity_fraction_rule():
    from gammamod.calib.capacity import choose_fraction

    assert choose_fraction([0.5, 0.25, 0.8], 1.0) == "0.8000"
    assert choose_fraction([0.80001], 1.0) == "0.8001"  # rounded up, never below the observation
    assert choose_fraction([0.1, 0.2, 0.3, 0.4], 0.5) == "0.3000"  # an observed value, not an interpolation
    assert choose_fraction([0.0], 0.99) == "0.0001"  # a fraction must stay above 0
    assert choose_fraction([1.0], 0.99) == "1.0000"


def test_pmod_capacity_report_is_information(tiny_pmod, tmp_path):
    from gammamod.export.checkpoint import load_checkpoint

    out = tmp_path / "pmod.json"
    proc = gammamod("calib", "capacity", tiny_pmod, "--random", "1", "--weights", "1.0,1.1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["routing"] == "static" and "capacity" not in report
    recipe = load_checkpoint(tiny_pmod).recipe
    assert set(report["layers"]) == {str(l) for l in recipe.mod_layers}
    for l, entry in report["layers"].items():
        assert 0 < entry["schedule_fraction"] <= 1
        assert entry["above"]["1.1"]["fraction"] <= entry["above"]["1"]["fraction"]
    one_line_error(gammamod("export", tiny_pmod, tmp_path / "a", "--capacity", out), "holds no capacity")


def test_capacity_refusals(tiny_llava, tiny_gamma, capacity_file, tmp_path):
    one_line_error(gammamod("calib", "capacity", tiny_llava, "--random", "1", "--out", tmp_path / "c.json"),
                   "no MoD layers")
    one_line_error(gammamod("calib", "capacity", tiny_gamma, "--random", "1", "--out", tmp_path / "c.txt"),
                   "expected a .json path")
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    one_line_error(gammamod("calib", "capacity", tiny_gamma, "--random", "1", "--out", mine), "already exists")
    one_line_error(gammamod("calib", "capacity", tiny_gamma, "--random", "1", "--out", mine, "--force"),
                   "not a capacity report that gammamod wrote")
    assert mine.read_text() == "{}" and not mine.with_suffix(".png").exists()
    bad = gammamod("calib", "capacity", tiny_gamma, "--quantile", "0", "--out", tmp_path / "q.json")
    assert bad.returncode == 2 and "expected a number in (0, 1]" in bad.stderr


# -- ARank ------------------------------------------------------------------------------------


def test_rank_of_known_matrices():
    from gammamod.calib.arank import ranks

    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((3, 12, 2)), rng.standard_normal((3, 2, 12))
    maps = torch.from_numpy(u @ v)  # three rank-2 maps
    maps[1] = torch.from_numpy(np.tril(rng.standard_normal((12, 12)), -1))  # strictly lower: rank 11
    assert ranks(maps, "float64", None) == [2, 11, 2]
    assert ranks(maps, "float32", None) == [2, 11, 2]
    assert ranks(maps, "float64", 0.9) == [1, 1, 1]  # a loose tolerance keeps only the largest direction


def test_proposal_rule():
    from gammamod.calib.arank import authors_mod_layers, propose

    ranks = [50, 10, 40, 40, 5, 30, 60]
    assert propose(ranks, keep_dense=4) == ([1, 4, 5], "dense: first, last, and the 2 other layers of highest "
                                                       "mean rank (4 in all)")  # tie 2/3: both dense
    assert propose(ranks, keep_dense=3)[0] == [1, 3, 4, 5]  # tie broken by the lower index
    assert propose(ranks, threshold=30)[0] == [1, 4]
    assert authors_mod_layers(7) == [3, 4, 5]


def test_arank_command(tiny_llava, tmp_path):
    """Ranks recomputed here from the attention maps, per head, in float64 with torch's default
    tolerance, agree with the command's report; the proposal follows its stated rule."""
    from gammamod.calib.arank import attention_maps, layer_inputs

    out = tmp_path / "arank"
    proc = gammamod("calib", "arank", tiny_llava, "--random", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "authors' arank_mod" in proc.stdout
    report = json.loads((out / "arank.json").read_text())
    assert (out / "arank.png").read_bytes()[:4] == b"\x89PNG" and (out / "arank.txt").exists()
    model, samples = _calibration_samples(tiny_llava, 1)
    inputs = layer_inputs(model, samples[0].embeds)
    t = samples[0].length
    for entry, layer, x in zip(report["layers"], model.model.layers, inputs):
        maps = attention_maps(layer, x).double().numpy()
        assert np.allclose(np.diagonal(maps, axis1=1, axis2=2), 0) and np.allclose(np.triu(maps, 1), 0)
        expected = [np.linalg.matrix_rank(m, tol=np.linalg.svd(m, compute_uv=False)[0] * t * np.finfo(float).eps)
                    for m in maps]
        assert entry["heads_mean"] == [float(r) for r in expected]
        assert all(r <= t - 1 for r in expected)
    n = len(report["layers"])
    dense = set(range(n)) - set(report["proposal"]["mod_layers_idx"])
    assert {0, n - 1} <= dense and len(dense) == 4
    assert report["tolerance"]["eps"] == float(np.finfo(np.float64).eps)
    one_line_error(gammamod("calib", "arank", tiny_llava, "--random", "1", "--out", out), "already exists")
    one_line_error(gammamod("calib", "arank", tiny_llava, "--random", "1", "--out", tmp_path / "b", "--keep-dense",
                            "99"), "--keep-dense 99")

