"""What gammamod refuses, and what it never does: delete a user's files, leave processes or partial
directories behind, print a traceback for bad input, or answer garbage silently.

One group of tests per cause, with real directories and real processes."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from gammamod.errors import GammamodError

psutil = pytest.importorskip("psutil")


def gammamod(*args, cwd=None, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "gammamod", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, **kw)


def one_line(proc, code=2, *fragments):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every file below root with its bytes: what must survive a refused command unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. --force never deletes what is not ours; replacement is atomic


def test_force_refuses_the_input_its_parent_and_the_working_directory(tiny_gamma, tmp_path):
    import shutil

    ck = tmp_path / "work" / "ck"
    shutil.copytree(tiny_gamma, ck)
    (tmp_path / "work" / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    one_line(gammamod("export", ck, ck, "--force"), 2, "is the input")
    one_line(gammamod("export", ck, ck.parent, "--force"), 2, "contains the input")
    one_line(gammamod("export", "ck", ".", "--force", cwd=ck.parent), 2, "contains the input")
    inner = tmp_path / "elsewhere" / "inner"
    inner.mkdir(parents=True)
    one_line(gammamod("export", ck, tmp_path, "--force", cwd=inner), 2, "contains the input")
    one_line(gammamod("export", ck.resolve(), "..", "--force", cwd=inner), 2, "working directory")
    (tmp_path / "a-file").write_text("x")
    one_line(gammamod("export", ck, tmp_path / "a-file"), 2, "not a directory")
    one_line(gammamod("export", ck, tmp_path / "a-file", "--force"), 2, "not a directory")
    assert snapshot(tmp_path) == {**before, "a-file": b"x"}


def test_force_replaces_only_gammamod_directories(tiny_gamma, tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"not really a jpeg")
    one_line(gammamod("export", tiny_gamma, user, "--force"), 2, "not an artifact directory that gammamod wrote")
    one_line(gammamod("make-tiny", user, "--recipe", "p-mod", "--force"), 2, "not a make-tiny checkpoint")
    link = tmp_path / "link"
    link.symlink_to(user)
    one_line(gammamod("export", tiny_gamma, link, "--force"), 2, "symbolic link")
    assert snapshot(user) == {"cat.jpg": b"not really a jpeg"}
    # a checkpoint make-tiny wrote is replaced
    ck = tmp_path / "ck"
    assert gammamod("make-tiny", ck, "--recipe", "gamma-mod").returncode == 0
    assert gammamod("make-tiny", ck, "--recipe", "llava", "--force").returncode == 0
    assert '"llava_llama"' in (ck / "config.json").read_text()


def test_forced_replacement_keeps_the_old_artifact_until_the_new_one_is_whole(art_gamma, tiny_gamma, tmp_path,
                                                                             monkeypatch):
    import shutil

    from gammamod.export import exporter
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.manifest import read_manifest

    out = tmp_path / "art"
    shutil.copytree(art_gamma, out)
    before = snapshot(out)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", "decoder.onnx")

    monkeypatch.setattr(exporter, "trace_graphs", disk_full)
    with pytest.raises(OSError):
        export_artifact(tiny_gamma, out, ExportOptions(force=True))
    assert snapshot(out) == before  # the old artifact is untouched and whole
    read_manifest(out).verify_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial, no lock


# --------------------------------------------------------------------------------------------
# 2 and 3. concurrent writers, signals, orphans, stale partial directories


def _start_export(ckpt, out, cwd):
    proc = subprocess.Popen([sys.executable, "-m", "gammamod", "export", str(ckpt), str(out)], cwd=cwd,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 180
    while time.time() < deadline:  # tracing: two forked tracer processes
        if len(parent.children(recursive=True)) >= 2:
            return proc, parent.children(recursive=True)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("the export never started its tracing processes")


def _gone(processes, timeout=20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes):
            return True
        time.sleep(0.1)
    return False


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_second_writer_is_told_and_sigterm_leaves_nothing(tiny_gamma, tmp_path):
    proc, children = _start_export(tiny_gamma, "out", tmp_path)
    assert any(name.startswith(".out.partial-") for name in _leftovers(tmp_path))
    one_line(gammamod("export", tiny_gamma, "out", "--force", cwd=tmp_path), 2, "being written by another")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    line = [x for x in proc.stderr.read().splitlines() if x.strip()]
    assert line == ["gammamod export: interrupted (SIGTERM)"]
    assert _gone(children), "tracing processes outlived the export"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial, no lock, no out


def test_ctrl_c_to_the_process_group_ends_in_one_line(tiny_gamma, tmp_path):
    proc, children = _start_export(tiny_gamma, "out", tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
    assert proc.wait(timeout=60) == 130
    assert [x for x in proc.stderr.read().splitlines() if x.strip()] == ["gammamod export: interrupted (SIGINT)"]
    assert _gone(children)
    assert list(tmp_path.iterdir()) == []


def test_sigkill_takes_the_tracers_along_and_the_next_writer_cleans_up(tiny_gamma, tmp_path):
    proc, children = _start_export(tiny_gamma, "out", tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert _gone(children), "tracing processes outlived a SIGKILLed export"
    stale = [name for name in _leftovers(tmp_path) if name.startswith(".out.partial-")]
    assert stale  # SIGKILL cannot clean up: the next writer of out must
    from gammamod.lifecycle import OutputDir

    with OutputDir(tmp_path / "out") as partial:
        (partial / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_lock_follows_a_killed_holder(tmp_path):
    """The lock is the kernel's: a writer killed while holding it does not block the next one."""
    code = ("import sys, time; from gammamod.lifecycle import OutputDir\n"
            "with OutputDir(sys.argv[1]) as p:\n    print(p, flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    partial = Path(holder.stdout.readline().strip())
    assert partial.is_dir()
    from gammamod.lifecycle import OutputDir

    with pytest.raises(GammamodError, match="being written by another"):
        with OutputDir(tmp_path / "out"):
            pass
    holder.kill()
    holder.wait()
    with OutputDir(tmp_path / "out") as p:
        (p / "done").write_text("1")
    assert not partial.exists() and (tmp_path / "out" / "done").is_file()


# --------------------------------------------------------------------------------------------
# 4. the manifest is checked against itself and against the graphs it names


def _edited(art, tmp_path, edit, name="edited"):
    import json
    import shutil

    dst = tmp_path / name
    shutil.copytree(art, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_edited_manifests_are_refused_in_one_line(art_gamma, tmp_path):
    """Each edit used to give a silent wrong answer, a traceback or a huge allocation."""
    from gammamod.runtime.pipeline import Pipeline

    def rule(d):
        return d["routing"]["capacity"]

    cases = [
        # a MoD layer keeping more than the span (a KV length larger than the prompt)
        (lambda d: rule(d).update(overrides={"3": {"fraction": "1.5"}}), "capacity fraction 1.5"),
        (lambda d: rule(d).update(overrides={"3": {"count": 500}}, count_span_length=73), r"must lie in \[0, 73\]"),
        (lambda d: d["model"].update(num_layers=9), "do not match the model's 9 layers"),
        (lambda d: d["model"].update(num_layers=4), "recipe.mod_layers must be layer indices below"),
        (lambda d: d["model"].update(hidden_size=128), "hidden size 64, the manifest's model says 128"),
        (lambda d: d["kv_cache"].update(max_seq=2 ** 40), "max_seq 1099511627776 exceeds"),
        (lambda d: d["kv_cache"].update(max_batch=0), "kv_cache.max_batch must be a positive integer"),
        (lambda d: d["routing"].update(span_lengths=[5000]), "routing.span_lengths"),
        (lambda d: d["tokenizer"].update(eos_id=10 ** 6), "tokenizer.eos_id"),
    ]
    for i, (edit, fragment) in enumerate(cases):
        art = _edited(art_gamma, tmp_path, edit, f"e{i}")
        with pytest.raises(GammamodError, match=fragment):
            Pipeline.load(art)
        one_line(gammamod("run", art, "--prompt", "hi", "--no-verify"), 2, "manifest.json")


def test_a_manifest_pointing_at_another_graph_is_refused(art_gamma, tmp_path):
    """The manifest's description of a graph is compared with the graph itself when it loads."""
    from gammamod.runtime.pipeline import Pipeline

    art = _edited(art_gamma, tmp_path, lambda d: d["graphs"]["decoder_ort"].update(file="decode.ort.onnx"))
    with pytest.raises(GammamodError, match="graphs.decoder_ort.inputs do not match decode.ort.onnx"):
        Pipeline.load(art)


# --------------------------------------------------------------------------------------------
# 5. errors that used to escape the one-line handler


def test_integer_weights_are_refused_in_one_line(tiny_gamma, copy_ckpt):
    from safetensors.torch import load_file, save_file

    ck = copy_ckpt(tiny_gamma)
    state = load_file(ck / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = state[key].to(__import__("torch").int32)
    save_file(state, ck / "model.safetensors")
    one_line(gammamod("generate", ck, "--prompt", "hi"), 2, key, "int32", "floating point")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (decoding it would take width*height bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_and_bad_sampling_are_one_line(tiny_gamma, art_gamma, tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)
    one_line(gammamod("generate", tiny_gamma, "--prompt", "hi", "--image", bomb), 2, "bomb.png", "pixels")
    one_line(gammamod("run", art_gamma, "--prompt", "hi", "--image", bomb), 2, "bomb.png", "pixels")
    for flags, fragment in ((("--temperature", "nan"), "temperature nan"), (("--temperature", "-1"), "temperature"),
                            (("--top-p", "0"), "top_p"), (("--top-p", "1.5"), "top_p"), (("--top-k", "-3"), "top_k"),
                            (("--repetition-penalty", "0"), "repetition_penalty"), (("--stop", ""), "empty stop")):
        one_line(gammamod("run", art_gamma, "--prompt", "hi", *flags), 2, fragment)
    one_line(gammamod("generate", tiny_gamma, "--prompt", "hi", "--temperature", "inf"), 2, "finite")


def test_full_disk_during_export_is_one_line_and_leaves_nothing(tiny_gamma, tmp_path):
    """A real full disk: a 1 MiB tmpfs in a private mount namespace (needs root and unshare)."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} || exit 77; {sys.executable} -m gammamod export {tiny_gamma} "
              f"{mnt}/out; rc=$?; ls -A {mnt} > {tmp_path}/left.txt; exit $rc")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    one_line(proc, 2, "No space left on device")
    assert (tmp_path / "left.txt").read_text().split() == []


def test_an_unforeseen_error_is_one_line_with_the_way_to_the_traceback(monkeypatch, capsys, tiny_gamma):
    from gammamod import cli
    from gammamod.export import generate

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(generate, "generate_text", bug)
    assert cli.main(["generate", str(tiny_gamma), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: ZeroDivisionError" in err[0] and "--debug" in err[0]
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "generate", str(tiny_gamma), "--prompt", "hi"])


# --------------------------------------------------------------------------------------------
# 6. images: high-bit-depth modes scaled, never turned into garbage silently


def test_sixteen_bit_and_float_images_are_scaled_or_refused(tmp_path):
    from PIL import Image

    from gammamod.runtime.image import as_picture, load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    want = np.rint(ramp * 255)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f01.tiff")
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "f255.tiff")
    Image.fromarray((ramp * 255).round().astype(np.int32)).save(tmp_path / "i32.tiff")
    for name in ("g16.png", "f01.tiff", "f255.tiff", "i32.tiff"):
        rgb = np.asarray(load_image(tmp_path / name)).astype(np.float64)
        assert rgb.shape == (64, 64, 3)
        assert np.abs(rgb[..., 0] - want).max() <= 1, name  # Pillow's convert('RGB') gave 99.5% white / black
    Image.fromarray((ramp * 1000).astype(np.float32)).save(tmp_path / "hdr.tiff")
    with pytest.raises(GammamodError, match="hdr.tiff: a F image with values up to 1000"):
        load_image(tmp_path / "hdr.tiff")
    bad = np.full((8, 8), np.nan, np.float32)
    with pytest.raises(GammamodError, match="NaN"):
        as_picture(Image.fromarray(bad))
    # the Python API: HWC uint8 arrays are images; None, numbers and other arrays are refused
    arr = (np.arange(6 * 5 * 3) % 256).astype(np.uint8).reshape(6, 5, 3)
    assert np.array_equal(np.asarray(as_picture(arr)), arr)
    for value, fragment in ((None, "NoneType is not an image"), (3, "int is not an image"),
                            (arr.astype(np.float32), "dtype float32"), (np.zeros((4, 4, 2), np.uint8), r"shape \[4, 4, 2\]")):
        with pytest.raises(GammamodError, match=fragment):
            as_picture(value, "image 0")


# --------------------------------------------------------------------------------------------
# 7. generation is bounded and nothing generated is thrown away


def test_pytorch_generation_stops_at_max_positions(tiny_gamma, copy_ckpt):
    import json

    ck = copy_ckpt(tiny_gamma)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    from gammamod.export.generate import generate_text

    res = generate_text(ck, "Hello there", max_new_tokens=1_000_000_000)
    assert res.seq_len + len(res.tokens) <= 64 + 1
    assert max(res.kv_lengths) <= 64


def test_runtime_generation_stops_at_max_seq_and_keeps_the_text(tiny_gamma, tmp_path):
    from gammamod.export.exporter import ExportOptions, export_artifact
    from gammamod.runtime.pipeline import Pipeline

    art = tmp_path / "short"
    export_artifact(tiny_gamma, art, ExportOptions(max_seq=110, max_batch=2))
    pipe = Pipeline.load(art)
    streamed = []
    [res] = pipe.generate(None, ["Tell me about the picture, please."], max_new_tokens=1_000_000_000,
                          stream=lambda row, text: streamed.append(text))
    assert res.finish_reason in ("length", "eos")
    assert res.prompt_tokens + len(res.tokens) <= 110 + 1
    assert "".join(streamed) == res.text
    proc = gammamod("run", art, "--prompt", "Tell me about the picture, please.", "--max-new-tokens", "1000000000")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# poorly handled before: the Python API and small flags


def test_python_api_refusals(art_gamma, tiny_pmod):
    from gammamod.export import load_checkpoint
    from gammamod.export.generate import forward_language
    from gammamod.runtime.pipeline import Pipeline

    pipe = Pipeline.load(art_gamma)
    with pytest.raises(GammamodError, match="no prompts"):
        pipe.generate([], [])
    # None for a prompt means a text-only prompt; None inside a prompt's image list is a mistake
    with pytest.raises(GammamodError, match="image 0: NoneType is not an image"):
        pipe.generate([[None]], ["hi"])
    with pytest.raises(GammamodError, match="image 0: int is not an image"):
        pipe.generate([3], ["hi"])
    gen = pipe.generator(1)
    with pytest.raises(GammamodError, match="before prefill"):
        gen.decode([5])
    x = np.zeros((1, 8, pipe.manifest["model"]["hidden_size"]), np.float32)
    x[0, 3, 1] = np.nan
    with pytest.raises(GammamodError, match="NaN"):
        gen.prefill(x)
    model = load_checkpoint(tiny_pmod)
    torch = pytest.importorskip("torch")
    with pytest.raises(GammamodError, match="applies to gamma-MoD"):
        forward_language(model, torch.zeros(1, 60, model.config.hidden_size), routable=(10, 36), skip_ratio=0.3)
    one_line(gammamod("export", tiny_pmod, "/nonexistent-dir/x", "--skip-ratio", "0.3"), 2, "applies to gamma-MoD")
