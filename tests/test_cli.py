"""`python -m uvigu.generate` / `python -m uvigu.caption`: argument validation before any model loads (exit 2, one
stderr line, no output file) and the writing path against a fake `uvigu.pipeline` that follows its contract."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from uvigu import caption, generate
from uvigu.data import video as V

ROOT = Path(__file__).resolve().parent.parent


class PipelineError(RuntimeError):
    pass


class FakePipe:
    """The pipeline contract: t2v / joint return float [B, F, H, W, 3] in [0, 1]; progress once per step."""

    def __init__(self, kind="univigu", **defaults):
        self.kind = kind
        d = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=5.0, shift=3.0,
                 solver="unipc", fps=16)
        d.update(defaults)
        self.defaults = types.SimpleNamespace(**d)
        self.calls = []

    def _video(self, prompts, num_frames, height, width, seed):
        b = len(prompts)
        levels = (np.arange(b)[:, None] * 0.25 + np.arange(num_frames)[None] * 0.05 + 0.05) % 1.0
        return np.broadcast_to(levels[:, :, None, None, None], (b, num_frames, height, width, 3)).astype(np.float32)

    def _steps(self, n, progress):
        for i in range(n):
            if progress is not None:
                progress(i + 1, n)

    def t2v(self, prompt, *, negative_prompt="", height=480, width=832, num_frames=81, num_inference_steps=50,
            guidance_scale=5.0, shift=None, solver=None, seed=0, latents=None, progress=None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(("t2v", prompts, dict(negative_prompt=negative_prompt, height=height, width=width,
                                                num_frames=num_frames, steps=num_inference_steps,
                                                guidance_scale=guidance_scale, shift=shift, solver=solver, seed=seed)))
        self._steps(num_inference_steps, progress)
        return self._video(prompts, num_frames, height, width, seed)

    def joint(self, prompt, *, height, width, num_frames, num_inference_steps, guidance_scale, shift, solver, seed,
              temperature=None, progress=None):
        if self.kind == "wan":
            raise PipelineError("captioning needs a Uni-ViGU model")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(("joint", prompts, dict(seed=seed, temperature=temperature)))
        self._steps(num_inference_steps, progress)
        return self._video(prompts, num_frames, height, width, seed), [f"caption of {p}" for p in prompts]

    def caption(self, video, *, num_inference_steps=None, temperature=None, seed=0, progress=None):
        if self.kind == "wan":
            raise PipelineError("captioning needs a Uni-ViGU model")
        self.calls.append(("caption", np.asarray(video), dict(steps=num_inference_steps, seed=seed,
                                                              temperature=temperature)))
        self._steps(num_inference_steps or self.defaults.num_inference_steps, progress)
        return [f"a clip of {np.asarray(video).shape[1]} frames"]


@pytest.fixture
def fake(monkeypatch):
    """Installs a fake `uvigu.pipeline` module; `fake.pipe` is what load() returns, `fake.loads` its arguments."""
    module = types.ModuleType("uvigu.pipeline")
    module.PipelineError = PipelineError
    module.pipe = FakePipe()
    module.loads = []

    def load(path, *, dtype=None, mesh=None):
        module.loads.append((path, dtype, mesh))
        return module.pipe

    module.load = load
    monkeypatch.setitem(sys.modules, "uvigu.pipeline", module)
    return module


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def run(main, argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------------------
# Validation: exit 2, one line naming the problem, nothing loaded, nothing written.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--frames", "80"], r"frames=80 is not 4n\+1 \(nearest valid: 81\)"),
    (["--height", "481"], r"height=481 .*nearest valid: 480"),
    (["--width", "100", "--height", "64"], r"width=100 .*nearest valid: 96"),
    (["--frames", "0"], r"--frames must be positive"),
    (["--steps", "0"], r"--steps must be >= 1"),
    (["--shift", "-1"], r"--shift must be positive"),
    (["--mesh", "data=two"], r"--mesh 'data=two'"),
    (["--mode", "joint", "--negative_prompt", "blurry"], r"--negative_prompt applies to --mode t2v only"),
    (["--solver", "heun"], r"invalid choice: 'heun'"),
])
def test_generate_bad_arguments(fake, model, tmp_path, capsys, extra, message):
    out = tmp_path / "clip.mp4"
    code, stdout, err = run(generate.main, ["--model", model, "--prompt", "a fox", "--out", out, *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists() and fake.loads == []


def test_generate_missing_model_prompts_and_bad_extension(fake, model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, _, err = run(generate.main, ["--model", tmp_path / "nope", "--prompt", "a", "--out", out], capsys)
    assert code == 2 and "--model" in err and "nope" in err and "no such folder" in err
    code, _, err = run(generate.main, ["--model", model, "--prompts", tmp_path / "p.txt", "--out", out], capsys)
    assert code == 2 and "--prompts" in err and "p.txt" in err and "no such file" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    code, _, err = run(generate.main, ["--model", model, "--prompts", tmp_path / "blank.txt", "--out", out], capsys)
    assert code == 2 and "no non-empty line" in err
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--out", tmp_path / "clip.avi"], capsys)
    assert code == 2 and "unknown video extension '.avi'" in err
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--prompts", "x", "--out", out], capsys)
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run(generate.main, ["--model", model, "--out", out], capsys)
    assert code == 2 and "--prompt" in err
    assert not out.exists() and fake.loads == []
    assert sorted(os.listdir(tmp_path)) == ["blank.txt", "model"]


def test_mesh_axes_are_checked_before_loading(fake, model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--out", out, "--mesh", "pipe=1"], capsys)
    assert code == 2 and "--mesh" in err and "unknown mesh axes ['pipe']" in err
    assert fake.loads == [] and not out.exists()
    assert generate.parse_mesh("data=1, fsdp=-1,tensor=1") == {"data": 1, "fsdp": -1, "tensor": 1}


def test_help_loads_no_model():
    code = ("import sys\nfrom uvigu import generate, caption\n"
            "for m in (generate, caption):\n"
            "    try:\n        m.main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'uvigu.pipeline' not in sys.modules and 'uvigu.models.wan' not in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--negative_prompt" in r.stdout and "--video" in r.stdout and r.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------------------------------
# Writing path (fake pipeline).
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_t2v_writes_video_with_folder_defaults(fake, model, tmp_path, capsys):
    out = tmp_path / "out" / "clip.mp4"
    code, stdout, err = run(generate.main, ["--model", model, "--prompt", "a fox", "--out", out, "--seed", "7",
                                            "--dtype", "float32", "--mesh", "fsdp=-1"], capsys)
    assert code == 0, err
    assert fake.loads[0][0] == str(model) and fake.loads[0][1] == "float32"
    assert dict(fake.loads[0][2].shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    kind, prompts, kw = fake.pipe.calls[0]
    assert kind == "t2v" and prompts == ["a fox"]
    assert kw == dict(negative_prompt="", height=32, width=48, num_frames=9, steps=3, guidance_scale=5.0, shift=3.0,
                      solver="unipc", seed=7)
    frames = V.read_video(out, fps=16)
    assert frames.shape == (9, 32, 48, 3)
    expect = np.round((np.arange(9) * 0.05 + 0.05) * 255)
    assert np.abs(frames.reshape(9, -1).mean(-1) - expect).max() < 3
    assert "3/3" in err  # the progress bar reached the end
    assert str(out) in stdout
    assert [p for p in os.listdir(out.parent) if p.startswith(".")] == []


def test_generate_flags_override_defaults(fake, model, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    argv = ["--model", model, "--prompt", "p", "--out", out, "--frames", "5", "--height", "16", "--width", "32",
            "--steps", "2", "--guide", "1.5", "--shift", "5", "--solver", "euler", "--negative_prompt", "blur"]
    code, _, err = run(generate.main, argv, capsys)
    assert code == 0, err
    kw = fake.pipe.calls[0][2]
    assert kw == dict(negative_prompt="blur", height=16, width=32, num_frames=5, steps=2, guidance_scale=1.5,
                      shift=5.0, solver="euler", seed=0)
    assert V.read_video(out, fps=16).shape == (5, 16, 32, 3)


def test_generate_prompts_file_numbered_outputs(fake, model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\n  a cat  \na dog\n")
    out = tmp_path / "clips" / "clip.mp4"
    code, stdout, err = run(generate.main, ["--model", model, "--prompts", prompts, "--out", out, "--batch", "2",
                                            "--seed", "10"], capsys)
    assert code == 0, err
    names = sorted(os.listdir(out.parent))
    assert names == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"]
    assert [(c[1], c[2]["seed"]) for c in fake.pipe.calls] == [(["a fox", "a cat"], 10), (["a dog"], 12)]
    # The fake's second video in a batch is 0.25 brighter: the files are in prompt order.
    m0, m1 = (V.read_video(out.parent / n, fps=16).mean() for n in names[:2])
    assert abs((m1 - m0) - 0.25 * 255) < 4


def test_generate_joint_writes_caption(fake, model, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, err = run(generate.main, ["--model", model, "--prompt", "a fox", "--out", out, "--mode", "joint"],
                            capsys)
    assert code == 0, err
    assert out.exists() and (tmp_path / "clip.txt").read_text() == "caption of a fox\n"
    assert "caption of a fox" in stdout


def test_generate_joint_on_wan_folder(fake, model, tmp_path, capsys):
    fake.pipe = FakePipe(kind="wan")
    out = tmp_path / "clip.mp4"
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--out", out, "--mode", "joint"], capsys)
    assert code == 2 and "Uni-ViGU" in err and not out.exists() and fake.pipe.calls == []


def test_progress_bar_fallback_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails
    with generate.ProgressBar("video") as bar:
        for i in range(4):
            bar(i + 1, 4)
    err = capsys.readouterr().err
    assert "video 1/4 steps" in err and "video 4/4 steps" in err and "ETA" in err and err.endswith("\n")


# ---------------------------------------------------------------------------------------------------------------------
# caption.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clip(tmp_path):
    """12 frames at 16 fps, 64x96: captioned at the fake's 32x48."""
    frames = np.zeros((12, 64, 96, 3), np.uint8)
    frames[:] = np.arange(12)[:, None, None, None] * 16
    return V.write_video(tmp_path / "in.mp4", frames, fps=16)


@pytest.mark.parametrize("default_frames,expect", [(9, 9), (17, 9), (5, 5)])
def test_caption_reads_at_model_size(fake, model, clip, capsys, default_frames, expect):
    fake.pipe = FakePipe(num_frames=default_frames)
    code, stdout, err = run(caption.main, ["--model", model, "--video", clip, "--steps", "4", "--seed", "3"], capsys)
    assert code == 0, err
    kind, video, kw = fake.pipe.calls[0]
    assert video.shape == (1, expect, 32, 48, 3) and video.dtype == np.uint8
    assert kw == dict(steps=4, seed=3, temperature=None)  # None: the folder's default
    assert stdout.strip() == f"a clip of {expect} frames"
    assert "4/4" in err


def test_temperature_flag(fake, model, clip, tmp_path, capsys):
    code, _, err = run(caption.main, ["--model", model, "--video", clip, "--temperature", "0"], capsys)
    assert code == 0, err
    assert fake.pipe.calls[-1][2]["temperature"] == 0.0
    out = tmp_path / "clip.mp4"
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a fox", "--out", out, "--mode", "joint",
                                       "--temperature", "0.5"], capsys)
    assert code == 0, err
    assert fake.pipe.calls[-1][2]["temperature"] == 0.5
    loads = len(fake.loads)
    code, _, err = run(caption.main, ["--model", model, "--video", clip, "--temperature", "-1"], capsys)
    assert code == 2 and "--temperature must be >= 0, got -1.0" in err
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--out", tmp_path / "t.mp4",
                                       "--temperature", "0"], capsys)
    assert code == 2 and "applies to --mode joint only" in err and not (tmp_path / "t.mp4").exists()
    assert len(fake.loads) == loads  # refused before loading


def test_caption_errors(fake, model, clip, tmp_path, capsys):
    code, _, err = run(caption.main, ["--model", model, "--video", tmp_path / "none.mp4"], capsys)
    assert code == 2 and "none.mp4" in err and "does not exist" in err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    code, _, err = run(caption.main, ["--model", model, "--video", bad], capsys)
    assert code == 2 and "bad.mp4" in err and "not a readable video" in err
    code, _, err = run(caption.main, ["--model", tmp_path / "nope", "--video", clip], capsys)
    assert code == 2 and "no such folder" in err
    assert fake.loads == []  # all of the above fail before loading
    fake.pipe = FakePipe(kind="wan")
    code, stdout, err = run(caption.main, ["--model", model, "--video", clip], capsys)
    assert code == 2 and "captioning needs a Uni-ViGU model" in err and stdout == ""
    assert len(err.strip().splitlines()) == 1


def test_pipeline_error_is_a_clean_exit(fake, model, clip, capsys, monkeypatch):
    def boom(*a, **k):
        raise PipelineError("the folder has no umt5/")

    monkeypatch.setattr(fake.pipe, "caption", boom)
    code, _, err = run(caption.main, ["--model", model, "--video", clip], capsys)
    assert code == 2 and err.strip() == "error: the folder has no umt5/"


def test_checkpoint_error_is_a_clean_exit(fake, model, tmp_path, capsys):
    from uvigu.checkpoint import CheckpointError

    def load(path, *, dtype=None, mesh=None):
        raise CheckpointError(f"{path}: no config.json")

    fake.load = load
    out = tmp_path / "clip.mp4"
    code, _, err = run(generate.main, ["--model", model, "--prompt", "a", "--out", out], capsys)
    assert code == 2 and err.strip() == f"error: {model}: no config.json" and not out.exists()


def test_other_errors_are_not_swallowed(fake, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fake.pipe, "t2v", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate.main(["--model", str(model), "--prompt", "a", "--out", str(tmp_path / "clip.mp4")])
    assert not (tmp_path / "clip.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --lora FILE --lora_scale S: checked before loading, merged into the loaded model.
# ---------------------------------------------------------------------------------------------------------------------

LORA_LAYERS, LORA_DIM, LORA_FFN = 2, 24, 32  # tests/tiny_release.py's transformer: dim 24, ffn 32, 2 layers
LORA_TARGETS = {"attn1.to_q": (LORA_DIM, LORA_DIM), "attn1.to_v": (LORA_DIM, LORA_DIM),
                "attn1.to_out.0": (LORA_DIM, LORA_DIM), "attn2.to_k": (LORA_DIM, LORA_DIM),
                "ffn.net.0.proj": (LORA_DIM, LORA_FFN), "ffn.net.2": (LORA_FFN, LORA_DIM)}


def random_adapters(seed=0, rank=4, alpha=2.0, std=0.5):
    """Random rank-4 adapters (α = 2, so scale 0.5) on attention and FFN Linears of every block, both factors
    non-zero (a trained LoRA, not a fresh one whose B is zero)."""
    from uvigu.models.lora import LoRAWeight

    rng = np.random.default_rng(seed)
    return {f"blocks.{n}.{t}": LoRAWeight(rng.normal(0, std, (i, rank)).astype(np.float32),
                                          rng.normal(0, std, (rank, o)).astype(np.float32), alpha)
            for n in range(LORA_LAYERS) for t, (i, o) in LORA_TARGETS.items()}


@pytest.fixture
def lora_file(tmp_path):
    from uvigu.models import lora_formats

    return lora_formats.save_lora(random_adapters(), tmp_path / "style.safetensors", "diffusers")


def test_lora_arguments_are_checked_before_loading(fake, model, lora_file, tmp_path, capsys):
    from safetensors.numpy import save_file

    out = tmp_path / "clip.mp4"
    base = ["--model", model, "--prompt", "a fox", "--out", out]
    (tmp_path / "notes.txt").write_text("not a lora")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    save_file({"blocks.0.attn1.to_q.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "full.safetensors"))
    (tmp_path / "empty_dir").mkdir()
    cases = [
        (["--lora", tmp_path / "none.safetensors"], r"--lora '.*none\.safetensors': no such file"),
        (["--lora", tmp_path / "notes.txt"], r"--lora '.*notes\.txt': .*only \.safetensors"),
        (["--lora", tmp_path / "junk.safetensors"], r"--lora '.*junk\.safetensors': cannot read LoRA file"),
        (["--lora", tmp_path / "full.safetensors"], r"--lora '.*full\.safetensors': .*not a lora_A"),
        (["--lora", tmp_path / "empty_dir"], r"--lora '.*empty_dir': .*holds neither adapter_model"),
        (["--lora_scale", "0.5"], r"--lora_scale needs --lora"),
        (["--lora", lora_file, "--lora_scale", "nan"], r"--lora_scale must be a finite number"),
    ]
    for extra, message in cases:
        code, _, err = run(generate.main, [*base, *extra], capsys)
        assert code == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), (extra, err)
    assert fake.loads == [] and not out.exists()


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """A tiny random diffusers Wan2.1 release converted to a uvigu folder, with small sampling defaults."""
    import json

    import torch

    import tiny_release as tr
    from tools.convert_wan_weights.cli import main as convert_main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora-release")
    tr.save_diffusers(tr.build_tiny_pipeline("unipc"), root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "wan")]) == 0
    meta = json.loads((root / "wan" / "pipeline.json").read_text())
    meta["defaults"].update(num_frames=5, height=32, width=32, num_inference_steps=2)
    (root / "wan" / "pipeline.json").write_text(json.dumps(meta))
    return root / "wan"


def test_generate_with_lora_equals_merging_by_hand(tiny_wan, lora_file, tmp_path, capsys, monkeypatch):
    """`--lora F --lora_scale 0.7` writes the frames of a pipeline whose model had `merge_lora(model, adapters, 0.7)`
    applied by hand, and they differ from the base model's."""
    from reference import rel_err

    from uvigu import pipeline as uvigu_pipeline
    from uvigu.models import lora, lora_formats

    written = []
    write = V.write_video

    def recording(path, frames, **kw):  # the exact float frames, before H.264 rounds them
        written.append(np.array(frames))
        return write(path, frames, **kw)

    monkeypatch.setattr(generate.video_io, "write_video", recording)
    out = tmp_path / "clip.mp4"
    prompt = "a red circle moves left across a dark background"
    code, _, err = run(generate.main, ["--model", tiny_wan, "--prompt", prompt, "--out", out, "--seed", "1",
                                       "--lora", lora_file, "--lora_scale", "0.7"], capsys)
    assert code == 0, err
    assert "merged 12 LoRA adapter(s) (diffusers layout)" in err and "scale 0.7" in err
    assert len(written) == 1 and V.read_video(out, fps=16).shape == (5, 32, 32, 3)

    pipe = uvigu_pipeline.load(tiny_wan)
    base = pipe.t2v(prompt, seed=1)[0]
    adapters, fmt = lora_formats.load_lora(lora_file)
    assert fmt == "diffusers" and sorted(adapters) == sorted(random_adapters())
    lora.merge_lora(pipe.model, adapters, 0.7)
    by_hand = pipe.t2v(prompt, seed=1)[0]
    assert rel_err(written[0], by_hand) < 1e-6, rel_err(written[0], by_hand)
    assert rel_err(by_hand, base) > 1e-2, rel_err(by_hand, base)  # the LoRA changed the video

    # An adapter the model does not have (layer 5 of 2; a wrong shape): exit 2 after loading, nothing written.
    from uvigu.models.lora import LoRAWeight

    bad = {"blocks.5.attn1.to_q": LoRAWeight(np.ones((24, 2), np.float32), np.ones((2, 24), np.float32), 2.0),
           "blocks.0.ffn.net.2": LoRAWeight(np.ones((24, 2), np.float32), np.ones((2, 24), np.float32), 2.0)}
    bad_file = lora_formats.save_lora(bad, tmp_path / "other_model.safetensors", "musubi")
    out2 = tmp_path / "clip2.mp4"
    code, _, err = run(generate.main, ["--model", tiny_wan, "--prompt", prompt, "--out", out2, "--lora", bad_file],
                       capsys)
    assert code == 2 and "does not fit the model" in err and "blocks.5.attn1.to_q" in err, err
    assert "wrong shape" in err and "blocks.0.ffn.net.2" in err and not out2.exists()
