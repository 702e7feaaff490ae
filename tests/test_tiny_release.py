"""Checks of the tiny Wan2.1 release fixture (tests/tiny_release.py): the diffusers pipeline runs and is not degenerate,
its tokenizer agrees with SentencePiece, the facts its docstring states about WanPipeline hold (prompt padding zeroed,
scheduler timesteps, latent un-normalisation), save/load round trips, and the original-layout folder has the
original key names and loads with `torch.load(weights_only=True)`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tiny_release as tr
from reference import rel_err
from uvigu.models import umt5_keys, wan_keys

FRAMES, SIZE, STEPS = 5, 32, 3
PROMPT = "a red circle moves left across a dark background"


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tr.build_tiny_pipeline()


@pytest.fixture(scope="module")
def noise(pipe):
    shape = tr.latent_shape(pipe, FRAMES, SIZE, SIZE)
    return np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)


def _t2v(pipe, noise, prompt=PROMPT, guidance_scale=5.0, **kw):
    return tr.reference_t2v(pipe, prompt, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
                            guidance_scale=guidance_scale, latents_channels_last=noise, **kw)


def test_sizes_and_strides(pipe):
    assert tr.latent_shape(pipe, FRAMES, SIZE, SIZE) == (2, 4, 4, 4)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == pipe.tokenizer.vocab_size
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim == len(pipe.vae.config.latents_mean)
    # The VAE's real strides match what its config tells the pipeline.
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, FRAMES, SIZE, SIZE)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 2, 4, 4)
    # Every param non-zero (no zero-init head or bias hides a layout bug).
    for name, module in (("transformer", pipe.transformer), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        for key, p in module.named_parameters():
            assert (p != 0).float().mean() > 0.99, f"{name}.{key} is mostly zero"


def test_pipeline_runs_and_is_not_degenerate(pipe, noise):
    video = _t2v(pipe, noise)
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3) and video.dtype == np.float32
    assert video.min() >= 0.0 and video.max() <= 1.0
    assert ((video > 0) & (video < 1)).mean() > 0.5, "most pixels are clamped: the fixture would hide errors"
    assert video.std() > 0.05
    # Deterministic, and prompt / guidance / noise each change the result.
    np.testing.assert_array_equal(video, _t2v(pipe, noise))
    assert rel_err(_t2v(pipe, noise, prompt="a blue square bounces up and down"), video) > 1e-3
    assert rel_err(_t2v(pipe, noise, guidance_scale=1.0), video) > 1e-3
    assert rel_err(_t2v(pipe, noise, negative_prompt="worst quality"), video) > 1e-3
    assert rel_err(_t2v(pipe, -noise), video) > 1e-3


def test_tokenizer_matches_sentencepiece(pipe):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tr.spiece_model())
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == len(pipe.tokenizer)
    texts = [*tr.CORPUS, "unseen wörds ☃ zzz", "ＡＢＣ ﬁne", "x"]
    for text in texts:
        assert pipe.tokenizer(text).input_ids == sp.encode(text) + [1], text
    # NFKC normalisation is part of the model (full-width letters and the ligature map to ASCII).
    assert pipe.tokenizer("ＦＵＬＬＷＩＤＴＨ ﬁ").input_ids == pipe.tokenizer("FULLWIDTH fi").input_ids
    assert tr.spiece_model() == tr.spiece_model.__wrapped__(), "tokenizer training is not deterministic"


def test_prompt_embeds_zero_padded(pipe):
    prompts = [PROMPT, "東京の夜景がとても綺麗です", ""]
    emb = tr.reference_prompt_embeds(pipe, prompts, max_sequence_length=32)
    assert emb.shape == (3, 32, pipe.text_encoder.config.d_model)
    mask = pipe.tokenizer(prompts, padding="max_length", max_length=32, truncation=True).attention_mask
    lengths = np.asarray(mask).sum(-1)
    assert 1 < lengths[1] < lengths[0] < 32
    for row, n in zip(emb, lengths):
        assert np.all(row[n:] == 0) and np.all(np.abs(row[:n]).sum(-1) > 0)
    assert lengths[2] == 1  # "" is the eos alone
    # Prompt cleaning: html entities and runs of whitespace do not change the embedding.
    np.testing.assert_array_equal(tr.reference_prompt_embeds(pipe, "  a &amp; b \n\t c ", 32),
                                  tr.reference_prompt_embeds(pipe, "a & b c", 32))
    # Truncation keeps max_len - 1 tokens and the eos.
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=4, truncation=True).input_ids
    assert len(ids) == 4 and ids[-1] == 1 and ids[:3] == pipe.tokenizer(PROMPT).input_ids[:3]


def test_schedules_are_as_documented(pipe):
    s, n = tr.FLOW_SHIFT, 4
    shift = lambda x: s * x / (1 + (s - 1) * x)  # noqa: E731
    timesteps, sigmas = tr.reference_schedule(pipe, n)
    expect = shift(np.linspace(1, 1 / 1000, n + 1)[:-1])
    expect[0] -= 1e-6
    np.testing.assert_allclose(sigmas, np.append(expect, 0).astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(timesteps, (expect * 1000).astype(np.int64))  # truncated, not rounded
    assert timesteps.dtype == np.int64 and list(timesteps) == [999, 900, 750, 500]

    euler = tr.build_tiny_pipeline("euler")
    timesteps, sigmas = tr.reference_schedule(euler, n)
    expect = shift(np.linspace(1, shift(1 / 1000), n))  # diffusers shifts twice
    np.testing.assert_allclose(sigmas, np.append(expect, 0), rtol=1e-5)
    np.testing.assert_allclose(timesteps, expect * 1000, rtol=1e-5)
    assert timesteps.dtype == np.float32


def test_latents_are_unnormalised_before_decode(pipe, noise):
    """reference_t2v = VAE decode of (final normalised latents * std + mean), then (x + 1) / 2 clamped to [0, 1]."""
    z = tr.reference_t2v_latents(pipe, PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES,
                                 num_inference_steps=STEPS, guidance_scale=5.0, latents_channels_last=noise)
    assert z.shape == noise.shape
    mean = np.asarray(pipe.vae.config.latents_mean, np.float32)
    std = np.asarray(pipe.vae.config.latents_std, np.float32)
    with torch.no_grad():
        raw = torch.from_numpy(np.moveaxis(z * std + mean, -1, 1).copy())
        decoded = pipe.vae.decode(raw).sample
    video = np.moveaxis(((decoded * 0.5 + 0.5).clamp(0, 1)).numpy(), 1, -1)
    assert rel_err(video, _t2v(pipe, noise)) < 1e-5
    assert rel_err(np.moveaxis(((pipe.vae.decode(torch.from_numpy(np.moveaxis(z, -1, 1).copy())).sample * 0.5 + 0.5)
                                .clamp(0, 1)).detach().numpy(), 1, -1), video) > 1e-2


def test_diffusers_round_trip(pipe, noise, tmp_path):
    folder = tr.save_diffusers(pipe, tmp_path / "wan")
    for name in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "tokenizer/spiece.model", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                 "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (folder / name).is_file(), name
    assert (folder / "tokenizer/spiece.model").read_bytes() == tr.spiece_model()
    sched = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["flow_shift"] == 3.0
    assert sched["prediction_type"] == "flow_prediction" and sched["use_flow_sigmas"] is True
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    assert vae_cfg["latents_mean"] == list(pipe.vae.config.latents_mean)

    loaded = tr.load_diffusers(folder)
    assert type(loaded.scheduler).__name__ == "UniPCMultistepScheduler"
    np.testing.assert_array_equal(_t2v(loaded, noise), _t2v(pipe, noise))
    np.testing.assert_array_equal(tr.reference_prompt_embeds(loaded, PROMPT, 16),
                                  tr.reference_prompt_embeds(pipe, PROMPT, 16))


def test_original_release_layout(pipe, tmp_path):
    wan_vae_keys = pytest.importorskip("uvigu.models.wan_vae_keys", reason="uvigu.models.wan_vae_keys is not there")
    folder = tr.save_original_release(pipe, tmp_path / "orig")
    _check_original(pipe, folder)
    vae = torch.load(folder / tr.ORIGINAL_VAE_FILE, weights_only=True)
    assert len(vae) == len(pipe.vae.state_dict())
    diffusers_vae = pipe.vae.state_dict()
    for original, diffusers in (("conv1.weight", "quant_conv.weight"), ("conv2.bias", "post_quant_conv.bias"),
                                ("encoder.head.2.weight", "encoder.conv_out.weight"),
                                ("decoder.middle.1.to_qkv.weight", "decoder.mid_block.attentions.0.to_qkv.weight"),
                                ("encoder.middle.0.residual.0.gamma", "encoder.mid_block.resnets.0.norm1.gamma"),
                                # 1 res block: decoder stage = 2 res blocks + 1 resampler, 3 flat slots per stage
                                ("decoder.upsamples.1.residual.6.weight", "decoder.up_blocks.0.resnets.1.conv2.weight"),
                                ("decoder.upsamples.2.time_conv.weight",
                                 "decoder.up_blocks.0.upsamplers.0.time_conv.weight"),
                                ("decoder.upsamples.9.residual.0.gamma", "decoder.up_blocks.3.resnets.0.norm1.gamma"),
                                ("encoder.downsamples.1.resample.1.weight", "encoder.down_blocks.1.resample.1.weight"),
                                ("encoder.downsamples.5.time_conv.bias", "encoder.down_blocks.5.time_conv.bias")):
        assert torch.equal(vae[original], diffusers_vae[diffusers]), original
    renamed = wan_vae_keys.original_to_diffusers(vae)  # num_res_blocks read off the shapes
    assert set(renamed) == set(diffusers_vae)
    assert all(v.dtype == torch.float32 for v in vae.values())


def test_original_release_without_vae(pipe, tmp_path):
    folder = tr.save_original_release(pipe, tmp_path / "orig", include_vae=False)
    _check_original(pipe, folder)
    assert not (folder / tr.ORIGINAL_VAE_FILE).exists()


def _check_original(pipe, folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg == {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 24, "eps": 1e-6, "ffn_dim": 32,
                   "freq_dim": 16, "in_dim": 4, "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 4,
                   "text_len": 512}
    dit = pipe.transformer.state_dict()
    with safe_open(folder / tr.ORIGINAL_DIT_FILE, framework="pt") as f:
        keys = set(f.keys())
        assert len(keys) == len(dit)
        assert not any(k.startswith(("condition_embedder", "proj_out")) or ".attn1." in k for k in keys)
        for original, diffusers in (("blocks.1.self_attn.q.weight", "blocks.1.attn1.to_q.weight"),
                                    ("blocks.0.cross_attn.o.bias", "blocks.0.attn2.to_out.0.bias"),
                                    ("blocks.0.norm3.weight", "blocks.0.norm2.weight"),  # the swap
                                    ("blocks.1.modulation", "blocks.1.scale_shift_table"),
                                    ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"),
                                    ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
                                    ("time_projection.1.bias", "condition_embedder.time_proj.bias"),
                                    ("head.head.weight", "proj_out.weight"), ("head.modulation", "scale_shift_table"),
                                    ("patch_embedding.weight", "patch_embedding.weight")):
            assert torch.equal(f.get_tensor(original), dit[diffusers]), original
        assert tuple(f.get_slice("text_embedding.0.weight").get_shape()) == (24, 32)  # text_dim only in the shapes
    assert {wan_keys.original_to_diffusers_key(k) for k in keys} == set(dit)
    t5 = torch.load(folder / tr.ORIGINAL_T5_FILE, weights_only=True)
    hf = pipe.text_encoder.state_dict()
    assert len(t5) == len(hf) - 1  # the tied embedding once
    assert all(v.dtype == torch.bfloat16 for v in t5.values())
    assert {umt5_keys.original_to_hf_key(k) for k in t5} == set(hf) - {umt5_keys.TIED_KEY}
    for original, name in (("token_embedding.weight", "shared.weight"),
                           ("norm.weight", "encoder.final_layer_norm.weight"),
                           ("blocks.1.attn.q.weight", "encoder.block.1.layer.0.SelfAttention.q.weight"),
                           ("blocks.0.pos_embedding.embedding.weight",
                            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                           ("blocks.0.ffn.gate.0.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"),
                           ("blocks.0.ffn.fc1.weight", "encoder.block.0.layer.1.DenseReluDense.wi_1.weight")):
        assert torch.equal(t5[original], hf[name].to(torch.bfloat16)), original
    tok = folder / tr.ORIGINAL_TOKENIZER_DIR
    assert (tok / "spiece.model").read_bytes() == tr.spiece_model() and (tok / "tokenizer.json").is_file()


def test_bad_inputs(pipe, noise, tmp_path):
    with pytest.raises(ValueError, match="scheduler"):
        tr.build_tiny_pipeline("ddim")
    with pytest.raises(ValueError, match="latents_channels_last"):
        _t2v(pipe, noise[:, :1])
    with pytest.raises(ValueError, match="latents_channels_last"):
        _t2v(pipe, np.moveaxis(noise, -1, 1))  # channels-first by mistake
    with pytest.raises(ValueError, match="num_frames"):
        tr.latent_shape(pipe, 6, SIZE, SIZE)
    with pytest.raises(ValueError, match="divisible by 16"):
        tr.latent_shape(pipe, FRAMES, 40, SIZE)
    with pytest.raises(ValueError, match="spiece.model"):
        tr._save_tokenizer(type("T", (), {"save_pretrained": lambda self, f: None})(), tmp_path)
