"""Faults and hostile input for `python -m tools.convert_wan_weights` (issue 10 §4 "Converter", §5).

Every case runs the real CLI entry (`main`, once as a subprocess) on a tiny random Wan2.1 release
(tests/tiny_release.py) with one thing broken, and checks: exit 2, a message naming the file / key, no traceback, and
DST as it was (nothing that looks like a converted part). The staging cases check that a killed conversion's hidden
folders are swept by the next run, that a DST part another process creates during the run is never replaced, and
that two conversions into one DST do not both run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_release as tr
from tools.convert_wan_weights import main, staging
from tools.convert_wan_weights.safetensors_io import SafetensorsFile, write_safetensors
from uvigu import atomic_files

REPO = Path(__file__).resolve().parents[1]
DIT_FILE = "transformer/diffusion_pytorch_model.safetensors"
VISIBLE_PARTS = {"dit", "vae", "umt5", "tokenizer", "pipeline.json"}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """{"diffusers": folder, "original": folder} of one tiny random release (built once, copied per test)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    pipe = tr.build_tiny_pipeline("unipc")
    return {"diffusers": tr.save_diffusers(pipe, root / "diffusers"),
            "original": tr.save_original_release(pipe, root / "original")}


def copy(releases, tmp_path: Path, layout: str = "diffusers") -> Path:
    return Path(shutil.copytree(releases[layout], tmp_path / "src"))


def run(src: Path, dst: Path, *extra: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--src", str(src), "--dst", str(dst), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, dst: Path, *needles: str) -> None:
    """Exit 2, every needle in the message, no traceback, and DST holds nothing (not even hidden staging)."""
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert not dst.exists() or not any(dst.iterdir()), sorted(p.name for p in dst.iterdir())


def replace_header(path: Path, body: bytes) -> None:
    """Keeps the data buffer, swaps the JSON header (and its length) for `body`."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


def edit_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    edit(header)
    replace_header(path, json.dumps(header).encode())


def poison(path: Path, value: float, key: str | None = None) -> str:
    """Writes `value` (NaN / Inf) into one element of tensor `key` (default: the first float tensor) of a safetensors
    file; returns the key."""
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    key = key or sorted(k for k, v in tensors.items() if v.dtype.kind == "f" and v.size)[0]
    tensors[key].flat[tensors[key].size // 2] = value
    write_safetensors(path, tensors)
    return key


def poison_pth(path: Path, value: float) -> str:
    state = torch.load(path, weights_only=True)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state[key].view(-1)[0] = value
    torch.save(state, path)
    return key


# ----------------------------------------------------------------------------------------------------------------------
# 1. Hostile safetensors headers: exit 2 with a message, never RecursionError / a traceback.
# ----------------------------------------------------------------------------------------------------------------------

HEADERS = {
    # name -> (edit the DiT's file, needles)
    "nested-100000": (lambda f: replace_header(f, b"[" * 100_000), ["corrupt header", "nested too deeply"]),
    "nested-in-entry": (lambda f: replace_header(f, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                        ["corrupt header"]),
    "nested-entry-parses": (lambda f: replace_header(f, b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}"),
                            ["tensor 'a'", "corrupt header entry"]),
    "length-past-end": (lambda f: f.write_bytes((10 ** 12).to_bytes(8, "little") + f.read_bytes()[8:]),
                        ["header length 1000000000000 runs past the end"]),
    "not-an-object": (lambda f: replace_header(f, b'["dtype", "F32"]'), ["expected a JSON object, got list"]),
    "offsets-out-of-range": (lambda f: edit_header(f, lambda h: h["proj_out.bias"].update(
        data_offsets=[10 ** 9, 10 ** 9 + 4 * h["proj_out.bias"]["shape"][0]])), ["proj_out.bias", "truncated file"]),
    "offsets-not-ints": (lambda f: edit_header(f, lambda h: h["proj_out.bias"].update(data_offsets=[False, True])),
                         ["proj_out.bias", "corrupt data_offsets"]),
    "metadata-not-strings": (lambda f: edit_header(f, lambda h: h.update(__metadata__={"format": [1, 2]})),
                             ["__metadata__"]),
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_hostile_safetensors_header(name, releases, tmp_path, capsys):
    edit, needles = HEADERS[name]
    src = copy(releases, tmp_path)
    edit(src / DIT_FILE)
    code, _, err = run(src, tmp_path / "dst", capsys=capsys)  # the whole release: nothing may be published
    assert_refused(code, err, tmp_path / "dst", "diffusion_pytorch_model.safetensors", *needles)


def test_nested_header_subprocess_exit_code(releases, tmp_path):
    """The issue's probe as a user runs it: `[` x 100,000 as the header, exit 2 and one line, not exit 1."""
    src = copy(releases, tmp_path)
    replace_header(src / DIT_FILE, b"[" * 100_000)
    proc = subprocess.run([sys.executable, "-m", "tools.convert_wan_weights", "--src", str(src), "--dst",
                           str(tmp_path / "dst"), "--parts", "dit"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nested too deeply" in proc.stderr
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 2. NaN / Inf tensors are refused naming the key, in every part, unless --allow_nonfinite.
# ----------------------------------------------------------------------------------------------------------------------

POISON = {
    # name -> (layout, file, part)
    "dit": ("diffusers", DIT_FILE, "dit"),
    "vae": ("diffusers", "vae/diffusion_pytorch_model.safetensors", "vae"),
    "umt5": ("diffusers", "text_encoder/model.safetensors", "umt5"),
    "vae-original-pth": ("original", tr.ORIGINAL_VAE_FILE, "vae"),
    "umt5-original-pth": ("original", tr.ORIGINAL_T5_FILE, "umt5"),
}


@pytest.mark.parametrize("value", [np.nan, -np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(POISON))
def test_nonfinite_refused_naming_the_key(name, value, releases, tmp_path, capsys):
    layout, file, _ = POISON[name]
    src = copy(releases, tmp_path, layout)
    key = (poison_pth if file.endswith(".pth") else poison)(src / file, value)
    code, _, err = run(src, tmp_path / "dst", capsys=capsys)  # every part: the poisoned one may come last
    assert_refused(code, err, tmp_path / "dst", key, "NaN or Inf", "--allow_nonfinite", Path(file).name)


@pytest.mark.parametrize("name", ["dit", "vae", "umt5"])
def test_allow_nonfinite_converts_and_says_so(name, releases, tmp_path, capsys):
    layout, file, part = POISON[name]
    src = copy(releases, tmp_path, layout)
    key = poison(src / file, np.nan)
    dst = tmp_path / "dst"
    code, out, err = run(src, dst, "--parts", part, "--allow_nonfinite", capsys=capsys)
    assert code == 0, err
    assert key in out and "NaN or Inf" in out, out
    meta = json.loads((dst / part / "config.json").read_text())
    recorded = json.dumps(meta["source"])
    assert key in recorded, recorded
    from uvigu.checkpoint import load_pretrained
    from uvigu.models import flat_params

    kind = {"dit": "wan_dit", "vae": "wan_vae", "umt5": "umt5_encoder"}[part]
    flat = flat_params.state_to_flat_params(load_pretrained(dst / part, kind=kind))
    assert sum(int(np.isnan(np.asarray(v, np.float32)).sum()) for v in flat.values()) == 1  # the one NaN, kept


# ----------------------------------------------------------------------------------------------------------------------
# 3. Index shard names must stay in the index's folder.
# ----------------------------------------------------------------------------------------------------------------------


def _sharded(src: Path, name_of) -> Path:
    """Moves the DiT's weights to one shard and writes an index mapping every tensor to `name_of(shard path)`."""
    folder = src / "transformer"
    shard = folder / "diffusion_pytorch_model-00001-of-00001.safetensors"
    (folder / "diffusion_pytorch_model.safetensors").rename(shard)
    keys = SafetensorsFile(shard).keys()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name_of(shard) for k in keys}}))
    return shard


@pytest.mark.parametrize("how", ["dotdot", "absolute", "dotdot-inside", "backslash-dotdot"])
def test_index_shard_names_outside_the_folder_refused(how, releases, tmp_path, capsys):
    src = copy(releases, tmp_path)
    name_of = {"dotdot": lambda p: f"../transformer/{p.name}", "absolute": lambda p: str(p),
               "dotdot-inside": lambda p: f"sub/../{p.name}", "backslash-dotdot": lambda p: f"..\\{p.name}"}[how]
    shard = _sharded(src, name_of)
    code, _, err = run(src, tmp_path / "dst", "--parts", "dit", capsys=capsys)
    assert_refused(code, err, tmp_path / "dst", "diffusion_pytorch_model.safetensors.index.json",
                   name_of(shard).replace("\\", "\\\\"), "absolute or contain '..'")


def test_index_plain_names_still_convert(releases, tmp_path, capsys):
    src = copy(releases, tmp_path)
    _sharded(src, lambda p: p.name)
    code, _, err = run(src, tmp_path / "dst", "--parts", "dit", capsys=capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------------------------------
# 4. Staging left by a killed conversion is swept by the next run.
# ----------------------------------------------------------------------------------------------------------------------


def test_stale_staging_made_by_hand_is_swept(releases, tmp_path, capsys):
    src, dst = copy(releases, tmp_path), tmp_path / "dst"
    stale = [dst / ".dit.partial-deadbeef" / "dit" / "params", dst / ".vae.partial-0badf00d",
             dst / ".dit.partial-12345678" / ".dit.partial-87654321"]  # ours around uvigu.checkpoint's
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "junk").write_bytes(b"x" * 100)
    (dst / ".pipeline.json.partial").write_text("{")  # what an older converter left
    (dst / ".tokenizer.old-cafebabe").mkdir()  # a retired folder whose replacement never arrived: restored
    (dst / ".tokenizer.old-cafebabe" / "mine").write_text("kept")
    (dst / ".export.partial-11111111").mkdir()  # not a converter part: left alone
    code, out, err = run(src, dst, "--parts", "dit,scheduler", capsys=capsys)
    assert code == 0, err
    for name in (".dit.partial-deadbeef", ".vae.partial-0badf00d", ".dit.partial-12345678", ".pipeline.json.partial"):
        assert f"removed {dst / name}" in out, (name, out)
    assert "restored" in out and (dst / "tokenizer" / "mine").read_text() == "kept"
    assert sorted(p.name for p in dst.iterdir()) == [".export.partial-11111111", "dit", "pipeline.json", "tokenizer"]


def test_killed_conversion_is_swept_by_the_next_run(releases, tmp_path, capsys):
    """SIGKILL once every part is staged (the test hook pauses there), then run again."""
    src, dst = releases["diffusers"], tmp_path / "dst"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.convert_wan_weights", "--src", str(src), "--dst", str(dst), "--parts",
         "dit,vae,scheduler"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", staging.PAUSE_ENV: "120"})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.startswith("test hook:") or time.monotonic() > deadline:
                break
        else:
            pytest.fail(f"the converter ended before the hook: {proc.wait()} {proc.stderr.read()}")
        assert line.startswith("test hook:"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(p.name for p in dst.iterdir())
    assert [n.split("-")[0] for n in left] == [".dit.partial", ".pipeline.json.partial", ".vae.partial"], left
    assert not VISIBLE_PARTS & set(left)  # nothing that looks converted
    assert (dst / left[0] / "dit" / "config.json").is_file()  # the kill came after real data was staged

    code, out, err = run(src, dst, "--parts", "dit,vae,scheduler", capsys=capsys)
    assert code == 0, err
    assert all(f"removed {dst / n}" in out for n in left), out
    assert sorted(p.name for p in dst.iterdir()) == ["dit", "pipeline.json", "vae"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. A destination that appears during the run is never replaced; two runs on one DST do not both write.
# ----------------------------------------------------------------------------------------------------------------------


def test_destination_appearing_during_the_write_is_kept(releases, tmp_path, capsys, monkeypatch):
    src, dst = copy(releases, tmp_path), tmp_path / "dst"

    def other_writer(names):  # another process publishes DST/dit while we convert
        (dst / "dit").mkdir()
        (dst / "dit" / "theirs.txt").write_text("their data")

    monkeypatch.setattr(staging, "before_publish", other_writer)
    code, _, err = run(src, dst, "--parts", "dit,scheduler", capsys=capsys)
    assert code == 2 and "dit already exists" in err and "nothing was published" in err, err
    assert sorted(p.name for p in dst.iterdir()) == ["dit"]  # no pipeline.json, no staging left
    assert [p.name for p in (dst / "dit").iterdir()] == ["theirs.txt"]
    assert (dst / "dit" / "theirs.txt").read_text() == "their data"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_destination_appearing_at_the_rename_is_kept(renameat2, releases, tmp_path, capsys, monkeypatch):
    """The other writer wins the race by a hair: after every check, just before our rename of the second part."""
    src, dst = copy(releases, tmp_path), tmp_path / "dst"
    real_publish = staging.publish
    if not renameat2:
        monkeypatch.setattr(atomic_files, "_renameat2", lambda *a: False)

    def racing_publish(staged, final, overwrite):
        if final.name == "pipeline.json":
            final.write_text("their pipeline.json")
        return real_publish(staged, final, overwrite)

    monkeypatch.setattr(staging, "publish", racing_publish)
    code, _, err = run(src, dst, "--parts", "dit,scheduler", capsys=capsys)
    assert code == 2 and "pipeline.json already exists" in err and "already published: dit" in err, err
    assert (dst / "pipeline.json").read_text() == "their pipeline.json"
    assert sorted(p.name for p in dst.iterdir()) == ["dit", "pipeline.json"]  # dit complete; no staging left


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("target", ["folder", "empty-folder", "file"])
def test_publish_never_replaces_without_overwrite(renameat2, target, tmp_path, monkeypatch):
    """The atomic step itself: the target exists by the time of the rename (no check before it can help)."""
    if not renameat2:
        monkeypatch.setattr(atomic_files, "_renameat2", lambda *a: False)
    staged, final = tmp_path / "area" / "dit", tmp_path / "dit"
    staged.mkdir(parents=True)
    (staged / "ours").write_text("new")
    if target == "file":
        final.write_text("theirs")
    else:
        final.mkdir()
        if target == "folder":
            (final / "theirs").write_text("old")
    with pytest.raises(staging.DestinationExists, match="already exists"):
        staging.publish(staged, final, overwrite=False)
    assert (staged / "ours").read_text() == "new"
    if target == "file":
        assert final.read_text() == "theirs"
    else:
        assert sorted(p.name for p in final.iterdir()) == (["theirs"] if target == "folder" else [])
    staging.publish(staged, final, overwrite=True)  # asked for: swapped, the old one left at `staged`
    assert (final / "ours").read_text() == "new"
    assert staged.exists() or (tmp_path / "area" / "dit.retired").exists()


def test_second_conversion_into_a_locked_dst_is_refused(releases, tmp_path, capsys):
    import fcntl

    src, dst = copy(releases, tmp_path), tmp_path / "dst"
    dst.mkdir()
    (dst / ".dit.partial-0000aaaa").mkdir()  # a live conversion's staging: must survive the refused run
    fd = os.open(dst, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running conversion holds
        code, _, err = run(src, dst, "--parts", "dit", capsys=capsys)
        assert code == 2 and "another conversion is writing" in err, err
        assert sorted(p.name for p in dst.iterdir()) == [".dit.partial-0000aaaa"]
    finally:
        os.close(fd)
    code, out, err = run(src, dst, "--parts", "dit", capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in dst.iterdir()) == ["dit"]


# ----------------------------------------------------------------------------------------------------------------------
# 6. Other bad input found by probing: exit 2, the file named, nothing published (even by parts that converted fine).
# ----------------------------------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: int | None = None) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:keep if keep is not None else len(raw) // 2])


def _dir_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


PROBES = {
    # name -> (layout, break(src), needles)
    "truncated-vae-pth": ("original", lambda s: _truncate(s / tr.ORIGINAL_VAE_FILE), [tr.ORIGINAL_VAE_FILE]),
    "truncated-t5-pth": ("original", lambda s: _truncate(s / tr.ORIGINAL_T5_FILE), [tr.ORIGINAL_T5_FILE]),
    "garbage-vae-pth": ("original", lambda s: (s / tr.ORIGINAL_VAE_FILE).write_bytes(b"not a zip"),
                        [tr.ORIGINAL_VAE_FILE]),
    "folder-as-dit-safetensors": ("original", lambda s: _dir_instead(s / tr.ORIGINAL_DIT_FILE),
                                  [tr.ORIGINAL_DIT_FILE, "is a folder"]),
    "folder-as-t5-pth": ("original", lambda s: _dir_instead(s / tr.ORIGINAL_T5_FILE), [tr.ORIGINAL_T5_FILE]),
    "folder-as-umt5-safetensors": ("diffusers", lambda s: _dir_instead(s / "text_encoder/model.safetensors"),
                                   ["text_encoder/model.safetensors", "is a folder"]),
    "nested-text-encoder-config": ("diffusers", lambda s: (s / "text_encoder/config.json").write_text("[" * 100_000),
                                   ["text_encoder/config.json", "nested too deeply"]),
    "nested-tokenizer-json": ("diffusers", lambda s: (s / "tokenizer/tokenizer.json").write_text("[" * 100_000),
                              ["tokenizer/tokenizer.json", "nested too deeply"]),
    "nested-model-index": ("diffusers", lambda s: (s / "model_index.json").write_text("{\"a\":" * 100_000),
                           ["model_index.json", "nested too deeply"]),
    "scheduler-not-object": ("diffusers", lambda s: (s / "scheduler/scheduler_config.json").write_text("[1]"),
                             ["scheduler_config.json", "expected a JSON object"]),
    "scheduler-shift-string": ("diffusers", lambda s: _rewrite_json(s / "scheduler/scheduler_config.json",
                                                                    flow_shift="3"),
                               ["scheduler_config.json", "flow_shift"]),
    "patch-size-int": ("diffusers", lambda s: _rewrite_json(s / "transformer/config.json", patch_size=2),
                       ["transformer/config.json", "patch_size"]),
    "vae-config-not-utf8": ("diffusers", lambda s: (s / "vae/config.json").write_bytes(b"{\"a\": \"\xff\"}"),
                            ["vae/config.json", "UTF-8"]),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probed_bad_input(name, releases, tmp_path, capsys):
    layout, breaker, needles = PROBES[name]
    src = copy(releases, tmp_path, layout)
    breaker(src)
    code, _, err = run(src, tmp_path / "dst", capsys=capsys)
    assert_refused(code, err, tmp_path / "dst", *needles)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(releases, tmp_path, capsys):
    src = copy(releases, tmp_path)
    (src / "vae/diffusion_pytorch_model.safetensors").chmod(0)
    code, _, err = run(src, tmp_path / "dst", capsys=capsys)
    assert_refused(code, err, tmp_path / "dst", "vae/diffusion_pytorch_model.safetensors")


def test_dst_is_a_file(releases, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.write_text("mine")
    code, _, err = run(releases["diffusers"], dst, "--parts", "dit", capsys=capsys)
    assert code == 2 and "is a file" in err and dst.read_text() == "mine", err
