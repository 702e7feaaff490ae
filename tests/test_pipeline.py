"""The real path end to end on tiny random Wan2.1 releases (tests/tiny_release.py): a diffusers `WanPipeline` and the
same weights in the original release layout are converted with `tools.convert_wan_weights`; `uvigu.pipeline`'s T2V
must equal diffusers' own output for the same initial latents, negative prompt and CFG, with both of Wan's
schedulers; the prompt embedding must equal `encode_prompt`; both layouts must give the same parts; the commands write
an MP4 that PyAV reads back, and caption one with a Uni-ViGU folder built on the converted DiT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tiny_release as tr
from xla_env import host_device_flags
from reference import rel_err
from tools.convert_wan_weights.cli import main as convert_main
from uvigu import checkpoint
from uvigu import pipeline as uvigu_pipeline
from uvigu.data.umt5_tokenizer import UMT5Tokenizer
from uvigu.models import flat_params

FRAMES, SIZE, STEPS, GUIDE = 5, 32, 4, 4.0
PROMPTS = ["a red circle moves left across a dark background", "ein blaues Quadrat springt — schnell! 🐟"]
NEGATIVE = "blurry, static"
TOL = 1e-4  # the bound for whole-pipeline frames at fp32 (measured ~1e-6, see below)


@pytest.fixture(scope="module", params=tr.SCHEDULERS)
def release(request, tmp_path_factory):
    """(diffusers pipeline, its converted DST) for one scheduler."""
    torch.set_num_threads(1)
    pipe = tr.build_tiny_pipeline(request.param)
    root = tmp_path_factory.mktemp(f"release-{request.param}")
    tr.save_diffusers(pipe, root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "dst")]) == 0
    return pipe, root / "dst"


def test_t2v_equals_diffusers_wan_pipeline(release):
    pipe, dst = release
    ours = uvigu_pipeline.load(dst)
    assert ours.kind == "wan" and ours.defaults.solver == ("unipc" if "UniPC" in type(pipe.scheduler).__name__
                                                            else "euler")
    latents = np.random.default_rng(0).standard_normal((2, *tr.latent_shape(pipe, FRAMES, SIZE, SIZE)))
    latents = latents.astype(np.float32)
    kw = dict(negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
              guidance_scale=GUIDE)
    want = tr.reference_t2v(pipe, PROMPTS, latents_channels_last=latents, **kw)
    steps = []
    got = ours.t2v(PROMPTS, latents=latents, progress=lambda done, total: steps.append((done, total)), **kw)
    assert got.shape == want.shape == (2, FRAMES, SIZE, SIZE, 3) and got.dtype == np.float32
    assert rel_err(got, want) < TOL, rel_err(got, want)
    assert steps == [(i, STEPS) for i in range(1, STEPS + 1)]
    # Not a vacuous match: another negative prompt (or none) changes the frames well beyond the tolerance.
    assert rel_err(ours.t2v(PROMPTS, latents=latents, **{**kw, "negative_prompt": ""}), want) > 100 * TOL
    # The prompt embedding is diffusers' encode_prompt: 512 rows, padding rows exactly zero.
    emb, ref = np.asarray(ours.encode_prompt(PROMPTS)), tr.reference_prompt_embeds(pipe, PROMPTS)
    assert emb.shape == ref.shape == (2, 512, 32) and rel_err(emb, ref) < 1e-5
    assert (emb[:, -100:] == 0).all()


def test_bad_requests(release):
    _, dst = release
    ours = uvigu_pipeline.load(dst)
    with pytest.raises(uvigu_pipeline.PipelineError, match=r"frames=6 is not 4n\+1 \(nearest valid: 5\)"):
        ours.t2v("x", num_frames=6, height=SIZE, width=SIZE)
    with pytest.raises(uvigu_pipeline.PipelineError, match=r"height=40 is not a positive multiple of 16"):
        ours.t2v("x", num_frames=5, height=40, width=SIZE)
    with pytest.raises(uvigu_pipeline.PipelineError, match=r"latents must be \[B, T, h, w, C\]"):
        ours.t2v("x", num_frames=5, height=SIZE, width=SIZE, latents=np.zeros((1, 2, 4, 4, 3), np.float32))
    with pytest.raises(uvigu_pipeline.PipelineError, match="captioning needs a Uni-ViGU model"):
        ours.caption(np.zeros((1, 5, SIZE, SIZE, 3), np.uint8))


def test_pipeline_folder_must_be_complete(release, tmp_path):
    _, dst = release
    partial = tmp_path / "partial"
    shutil.copytree(dst, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(uvigu_pipeline.PipelineError, match=r"vae/ is missing \(the VAE\)"):
        uvigu_pipeline.load(partial)
    (partial / "pipeline.json").unlink()
    with pytest.raises(uvigu_pipeline.PipelineError, match="no pipeline.json"):
        uvigu_pipeline.load(partial)


def _flat(folder, kind):
    model = checkpoint.load_pretrained(folder, kind=kind)
    return {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(model).items()}


def test_original_layout_converts_to_the_same_parts(tmp_path):
    """The original release layout (original key names, bf16 T5 .pth, VAE .pth without config, google/umt5-xxl/) gives
    the same DiT, VAE and tokenizer as the diffusers layout, and the same umT5 up to the bf16 the .pth holds."""
    torch.set_num_threads(1)
    pipe = tr.build_tiny_pipeline("unipc")
    tr.save_diffusers(pipe, tmp_path / "diffusers")
    tr.save_original_release(pipe, tmp_path / "original")
    assert convert_main(["--src", str(tmp_path / "diffusers"), "--dst", str(tmp_path / "a")]) == 0
    assert convert_main(["--src", str(tmp_path / "original"), "--dst", str(tmp_path / "b")]) == 0
    for kind in (checkpoint.WAN_DIT, checkpoint.WAN_VAE):
        a, b = _flat(tmp_path / "a", kind), _flat(tmp_path / "b", kind)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{kind} {k}")
    a, b = _flat(tmp_path / "a", checkpoint.UMT5_ENCODER), _flat(tmp_path / "b", checkpoint.UMT5_ENCODER)
    for k in a:
        assert rel_err(b[k].astype(np.float32), a[k]) < 1e-2, k  # bf16 rounding of the original .pth
    tok_a = UMT5Tokenizer.load(tmp_path / "a" / "tokenizer")
    tok_b = UMT5Tokenizer.load(tmp_path / "b" / "tokenizer")
    np.testing.assert_array_equal(tok_a.encode(PROMPTS, 24)[0], tok_b.encode(PROMPTS, 24)[0])
    # The original release has no scheduler config: Wan's own defaults are recorded.
    assert json.loads((tmp_path / "b" / "pipeline.json").read_text())["scheduler"]["solver"] == "unipc"


def test_missing_and_requested_parts(tmp_path, capsys):
    torch.set_num_threads(1)
    pipe = tr.build_tiny_pipeline("euler")
    src = tr.save_diffusers(pipe, tmp_path / "src")
    shutil.rmtree(src / "vae")
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "lacks vae" in err and "--parts dit,umt5,tokenizer,scheduler" in err
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--parts", "dit,tokenizer"]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["dit", "tokenizer"]
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "dst2"), "--parts", "vae"]) == 2
    assert "requested part(s) vae not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# The commands, on the converted Wan folder and on a Uni-ViGU folder built around its DiT.
# ----------------------------------------------------------------------------------------------------------------------

SMALL = {"num_frames": FRAMES, "height": SIZE, "width": SIZE, "num_inference_steps": 2, "caption_steps": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(converted Wan DST, Uni-ViGU DST), both with small sampling defaults (5 frames, 32 px, 2 steps)."""
    from flax import nnx

    from uvigu.models.univigu import UniViGU, UniViGUConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    tr.save_diffusers(tr.build_tiny_pipeline("unipc"), root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "wan")]) == 0
    meta = json.loads((root / "wan" / "pipeline.json").read_text())
    meta["defaults"].update(SMALL)
    (root / "wan" / "pipeline.json").write_text(json.dumps(meta))
    wan = uvigu_pipeline.load(root / "wan")
    text_side = UniViGUConfig(text_flow="discrete", vocab_size=wan.tokenizer.vocab_size, max_text_len=8)
    wan.with_model(UniViGU.from_wan(wan.model, text_side, rngs=nnx.Rngs(3))).save(root / "univigu")
    return root / "wan", root / "univigu"


def test_generate_writes_an_mp4_with_the_requested_frames(folders, tmp_path, capsys):
    import av

    from uvigu import generate

    wan, _ = folders
    out = tmp_path / "clip.mp4"
    assert generate.main(["--model", str(wan), "--prompt", PROMPTS[0], "--out", str(out), "--frames", "9",
                          "--steps", "2", "--seed", "1"]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == 16
    assert len(frames) == 9 and frames[0].shape == (SIZE, SIZE, 3)
    # The MP4 holds the pipeline's frames, up to H.264's loss (4:2:0 chroma on 32-px noise-like clips is lossy):
    # far closer to them than to the clip of another seed.
    pipe = uvigu_pipeline.load(wan)
    error = lambda seed: np.abs(np.stack(frames) / 255.0 - pipe.t2v(PROMPTS[0], num_frames=9, num_inference_steps=2,
                                                                      seed=seed)[0]).mean()
    assert error(1) < 0.5 * error(2), (error(1), error(2))
    # Bad input: nothing written.
    bad = tmp_path / "bad.mp4"
    assert generate.main(["--model", str(wan), "--prompt", "x", "--out", str(bad), "--frames", "8"]) == 2
    assert "nearest" in capsys.readouterr().err and not bad.exists()


def test_caption_and_joint_on_a_univigu_folder(folders, tmp_path, capsys):
    from uvigu import caption, generate
    from uvigu.data.video import read_video, write_video

    wan, uni = folders
    pipe = uvigu_pipeline.load(uni)
    assert pipe.kind == "univigu" and pipe.model.config.max_text_len == 8
    clip = tmp_path / "in.mp4"
    write_video(clip, uvigu_pipeline.load(wan).t2v(PROMPTS[1], seed=2)[0])
    capsys.readouterr()
    assert caption.main(["--model", str(uni), "--video", str(clip), "--seed", "5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    frames = read_video(clip, fps=16, num_frames=FRAMES, height=SIZE, width=SIZE)
    assert printed == pipe.caption(frames[None], seed=5)[0]  # the command is the library call on the decoded clip
    assert pipe.caption(frames[None], seed=5) == pipe.caption(frames[None], seed=5)
    # Greedy captions: a folder whose pipeline.json sets caption_temperature 0 captions as temperature=0 does.
    greedy_folder = tmp_path / "greedy"
    shutil.copytree(uni, greedy_folder)
    meta = json.loads((greedy_folder / "pipeline.json").read_text())
    meta["defaults"]["caption_temperature"] = 0.0
    (greedy_folder / "pipeline.json").write_text(json.dumps(meta))
    greedy = uvigu_pipeline.load(greedy_folder)
    assert greedy.caption(frames[None], seed=5) == pipe.caption(frames[None], seed=5, temperature=0)
    assert greedy.caption(frames[None], seed=5) != pipe.caption(frames[None], seed=5)  # the random model's draws
    with pytest.raises(uvigu_pipeline.PipelineError, match="temperature must be a number >= 0"):
        pipe.caption(frames[None], temperature=-0.5)
    meta["defaults"]["caption_temperature"] = "cold"
    (greedy_folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(uvigu_pipeline.PipelineError, match=r"pipeline.json: defaults.caption_temperature must be a "
                                                           r"number >= 0, got 'cold'"):
        uvigu_pipeline.load(greedy_folder)
    # A Wan-only folder cannot caption: exit 2, a clear message.
    assert caption.main(["--model", str(wan), "--video", str(clip)]) == 2
    assert "captioning needs a Uni-ViGU model" in capsys.readouterr().err
    # Joint: the video and the caption written next to it are the library's.
    out = tmp_path / "joint.gif"
    assert generate.main(["--model", str(uni), "--prompt", PROMPTS[0], "--out", str(out), "--mode", "joint",
                          "--seed", "4"]) == 0
    video, captions = pipe.joint(PROMPTS[0], seed=4)
    assert out.with_suffix(".txt").read_text().strip() == captions[0].strip()
    assert len(read_video(out, fps=16)) == FRAMES and video.shape == (1, FRAMES, SIZE, SIZE, 3)


def test_converted_vae_folder_encodes_and_decodes_like_diffusers(release):
    """`load_pretrained(DST/vae)` is a WanVAE whose encode / decode are diffusers' with the pipeline's latent
    normalisation: (μ − mean) / std, and decode(z · std + mean) clamped."""
    import jax.numpy as jnp

    from uvigu.models.wan_vae import WanVAE

    pipe, dst = release
    vae = checkpoint.load_pretrained(dst / "vae")
    assert isinstance(vae, WanVAE) and vae.latent_shape(FRAMES, SIZE, SIZE) == tr.latent_shape(pipe, FRAMES, SIZE,
                                                                                                 SIZE)
    video = np.random.default_rng(1).uniform(-1, 1, (1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    mean = np.asarray(pipe.vae.config.latents_mean, np.float32)
    std = np.asarray(pipe.vae.config.latents_std, np.float32)
    with torch.no_grad():
        mu = pipe.vae.encode(torch.from_numpy(np.moveaxis(video, -1, 1))).latent_dist.mean.numpy()
    want_z = (np.moveaxis(mu, 1, -1) - mean) / std
    z = np.asarray(vae.encode(jnp.asarray(video)))
    assert rel_err(z, want_z) < 1e-5
    with torch.no_grad():
        raw = torch.from_numpy(np.moveaxis(want_z * std + mean, -1, 1).copy())
        want_video = np.moveaxis(pipe.vae.decode(raw).sample.clamp(-1, 1).numpy(), 1, -1)
    assert rel_err(np.asarray(vae.decode(jnp.asarray(want_z))), want_video) < 1e-5
    bf16 = checkpoint.load_pretrained(dst / "vae", dtype=jnp.bfloat16)
    assert bf16.config.dtype == "bfloat16" and rel_err(np.asarray(bf16.encode(jnp.asarray(video))), want_z) < 5e-2


def test_sharded_pipeline_matches_one_device(folders, tmp_path):
    """`load(DST, mesh=...)` on 8 fake CPU devices (fsdp 4 x tensor 2) gives the frames of one device (and its
    progress ticks, one per step, arrive from the multi-device loop)."""
    import os
    import subprocess
    import sys
    import textwrap

    wan, _ = folders
    script = textwrap.dedent(f"""
        import numpy as np
        from uvigu import pipeline, sharding
        mesh = sharding.make_mesh({{"data": 1, "fsdp": 4, "tensor": 2, "context": 1}})
        pipe = pipeline.load({str(wan)!r}, mesh=mesh)
        ticks = []
        frames = pipe.t2v({PROMPTS!r}, seed=3, progress=lambda d, t: ticks.append(d))
        assert ticks == [1, 2], ticks
        np.save({str(tmp_path / "sharded.npy")!r}, frames)
    """)
    env = dict(os.environ, XLA_FLAGS=host_device_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = uvigu_pipeline.load(wan).t2v(PROMPTS, seed=3)
    assert rel_err(np.load(tmp_path / "sharded.npy"), want) < 1e-5
