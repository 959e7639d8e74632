"""The command line: help, make-tiny, generate, demo, and one-line errors without tracebacks."""

import os
import subprocess
import sys

import pytest


def gammamod(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "gammamod", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_the_commands():
    proc = gammamod("--help")
    assert proc.returncode == 0
    for cmd in ("make-tiny", "generate", "demo"):
        assert cmd in proc.stdout


def test_make_tiny_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "g"
    proc = gammamod("make-tiny", out, "--recipe", "gamma-mod")
    assert proc.returncode == 0 and (out / "config.json").is_file()
    assert_one_line_error(gammamod("make-tiny", out, "--recipe", "gamma-mod"), str(out), "--force")
    assert gammamod("make-tiny", out, "--recipe", "p-mod", "--force").returncode == 0
    assert '"pmod_llava_llama"' in (out / "config.json").read_text()


def test_make_tiny_failure_leaves_nothing(tmp_path, monkeypatch):
    from gammamod.export import tiny

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "_save_safetensors", boom)
    with pytest.raises(OSError):
        tiny.make_tiny(tmp_path / "x", "llava")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("routing", ["reference", "static", "dense"])
def test_generate_prints_text_and_routing_summary(tiny_gamma, test_image_path, routing):
    proc = gammamod("generate", tiny_gamma, "--image", test_image_path, "--prompt", "What is in the picture?",
                    "--routing", routing, "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"routing {routing}:") and "x dense" in summary
    if routing != "dense":
        assert "3:" in summary and "6:" in summary  # the MoD layers


def test_generate_sampled_is_seeded(tiny_pmod, test_image_path):
    args = ("generate", tiny_pmod, "--image", test_image_path, "--prompt", "Describe it.", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7", "--max-new-tokens", "6")
    first, second = gammamod(*args), gammamod(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


def test_generate_errors_are_one_line(tiny_gamma, tmp_path):
    assert_one_line_error(gammamod("generate", tmp_path / "none", "--prompt", "x"), "not a checkpoint directory")
    assert_one_line_error(gammamod("generate", tiny_gamma, "--prompt", "x", "--image", tmp_path / "none.png"),
                          "none.png: no such image file")
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    assert_one_line_error(gammamod("generate", tiny_gamma, "--prompt", "x", "--image", bad), "not a readable image")
    proc = gammamod("generate", tiny_gamma, "--prompt", "x", "--max-new-tokens", "0")
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_demo_runs_every_recipe_and_mode(tmp_path):
    # --quick: the bench-size stage runs validate and bench, whose own tests are in test_validate
    proc = gammamod("demo", "--workdir", tmp_path / "demo", "--quick", env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for recipe in ("gamma-mod", "p-mod"):
        for mode in ("reference", "static", "dense"):
            assert any(recipe in line and mode in line for line in lines), (recipe, mode, proc.stdout)
        # the export table: linted clean for TensorRT 10.3, ONNX Runtime equal to PyTorch
        export = [line for line in lines if line.startswith(f"│ {recipe}") and "MiB" in line and "errors" in line]
        assert len(export) == 1 and "0 errors" in export[0] and export[0].count("identical") == 2, proc.stdout
        # the runtime table: answers, time to first token, tokens/s
        assert any(line.startswith(f"│ {recipe}") and "tokens/s" in line for line in lines), proc.stdout
    assert "Bench-size" not in proc.stdout
