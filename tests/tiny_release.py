"""Tiny random Wan2.1 releases for end-to-end tests: a diffusers `WanPipeline` folder, the same weights in the original
Wan2.1 release layout, and diffusers' own outputs on them (the reference our converter and `uvigu.pipeline` must match).

Nothing here downloads: every component is built locally at tiny sizes, fp32, CPU, with every param re-drawn non-zero
(norm gammas near 1) so layout bugs cannot hide behind zeros or ones.

Components of `build_tiny_pipeline` (architecture mirrors the real release; sizes do not):
  tokenizer     a SentencePiece *unigram* model trained on `CORPUS` (a few dozen sentences, many scripts, full-width
                letters and a ligature that NFKC rewrites), default `nmt_nfkc` normalisation like umT5's; ids pad 0,
                eos 1, unk 2, no bos; wrapped as transformers' `T5Tokenizer` with extra_ids=0, so the vocabulary is
                exactly the SentencePiece one (`len(tokenizer)` = `VOCAB_SIZE`). Its spiece.model travels with every
                saved folder (transformers 5 writes only tokenizer.json / tokenizer_config.json).
  text_encoder  transformers `UMT5EncoderModel`: d_model 32, 2 layers, 2 heads x d_kv 16, d_ff 48, gated-gelu.
  transformer   diffusers `WanTransformer3DModel`: 2 heads x 12 (dim 24), ffn 32, 2 layers, freq_dim 16, patch
                (1, 2, 2), in/out 4 channels (= the VAE's z_dim), text_dim 32 (= umT5's d_model); params drawn by
                `reference.diffusers_wan`.
  vae           diffusers `AutoencoderKLWan`: base_dim 8, z_dim 4, dim_mult (1, 2, 2, 2), 1 res block, temporal
                downsample (False, True, True) like the real one, so the stride is the real (4, 8, 8):
                F = 4n + 1 frames -> n + 1 latent frames, H, W -> H/8, W/8. latents_mean / latents_std are 4 drawn
                values (not 0 / 1) so skipping the (un)normalisation shows.
  scheduler     "unipc": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                flow_shift=3.0, num_train_timesteps=1000), other fields at their defaults, which are the values of
                Wan-AI/Wan2.1-T2V-*-Diffusers' scheduler_config.json (solver_order 2, bh2, predict_x0,
                lower_order_final, final_sigmas_type "zero", timestep_spacing "linspace");
                "euler": FlowMatchEulerDiscreteScheduler(shift=3).

What diffusers 0.42's `WanPipeline.__call__` does (diffusers/pipelines/wan/pipeline_wan.py), step by step:
  1. Prompt cleaning, per prompt: `ftfy.fix_text` *only if ftfy is installed* (it is not in this venv; with it, e.g.
     curly quotes are straightened), then `html.unescape` twice, strip, then every run of whitespace (`regex` `\\s+`,
     unicode-aware) -> one space, strip again.
  2. Tokenizer: `tokenizer(prompts, padding="max_length", max_length=max_sequence_length (512), truncation=True,
     add_special_tokens=True)`: tokens, then eos (1), then pad (0); a long prompt keeps max_len - 1 tokens + eos.
     mask = 1 on tokens and eos.
  3. umT5 encoder on (ids, mask) -> last_hidden_state [B, L, d]; each row is cut to its mask length and the rest
     replaced by zeros, so the context is always [B, max_sequence_length, d] with exact zeros after the eos row.
     The negative prompt (default "", i.e. just eos) is encoded the same way, only when guidance_scale > 1.
  4. Latents: given latents are used as they are (normalised latent space, [B, C, T, h, w], float32). Shapes the
     pipeline would draw: T = (F - 1) // 4 + 1, h = H // 8, w = W // 8 (F not 4n+1 is rounded down to 4n+1 with a
     warning; H, W must be divisible by 16).
  5. Timesteps: `scheduler.set_timesteps(N)`. UniPC with flow sigmas: sigma = linspace(1, 1/1000, N + 1)[:-1],
     shifted sigma' = s*sigma / (1 + (s - 1)*sigma) (s = flow_shift = 3), sigma'[0] -= 1e-6 (exactly 1 would give
     log(0)); timesteps = (sigma' * 1000) cast to int64 (truncation, so the DiT sees integer timesteps while the solver
     uses the float sigmas); sigmas get a final 0 appended. Euler (FlowMatchEulerDiscrete, shift s): init sigmas are
     shifted once, so sigma_min = shift(1/1000); set_timesteps takes linspace(1000, 1000*sigma_min, N) / 1000 and shifts
     it *again*; timesteps = sigma * 1000 as float32 (not rounded); final 0 appended;
     step x += (sigma_next - sigma) * v.
  6. Loop over timesteps t: the DiT gets latents (cast to its dtype), timestep = t broadcast to [B], context = the
     prompt embeds -> v_cond; if guidance_scale > 1 a second, separate call with the negative embeds -> v_uncond and
     v = v_uncond + g * (v_cond - v_uncond). `scheduler.step(v, t, latents)`: UniPC converts v to
     x0 = latents - sigma * v (flow_prediction), runs its corrector on the previous step (from step 1 on) and its
     predictor (order 1 on the first step and, with lower_order_final, on the last; order 2 otherwise).
  7. Decode: latents * std + mean per channel (computed as latents / (1 / std) + mean) with the VAE config's
     latents_mean / latents_std, then `vae.decode` (which clamps to [-1, 1]), then the video processor per batch item:
     (x * 0.5 + 0.5).clamp(0, 1), channels-last -> np.float32 [B, F, H, W, 3].

Shape letters: B batch, F frames, H/W pixels, T/h/w latent frames/height/width, C latent channels, L tokens.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPIECE_FILE = "spiece.model"
ORIGINAL_DIT_FILE = "diffusion_pytorch_model.safetensors"
ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"

# The tokenizer's training text: a few scripts, accents, CJK, full-width letters and a ligature (NFKC maps them to
# ASCII, so a tokenizer that skips normalisation disagrees), emoji (unk or byte pieces).
CORPUS = (
    "a red circle moves left across a dark background",
    "a blue square bounces up and down",
    "a green triangle rotates slowly in the centre",
    "a yellow star spins and grows larger",
    "the quick brown fox jumps over the lazy dog",
    "waves crash on a rocky shore at sunset",
    "a person walks through a busy market at night",
    "two birds fly over a calm lake",
    "smoke rises from a chimney on a cold morning",
    "a small boat drifts down a wide river",
    "rain falls on the window of an old house",
    "a cat and a dog bake a cake together in a kitchen",
    "Ein großer Hund läuft über die Wiese.",
    "Un chat noir dort sur le canapé, très calme.",
    "El perro corre por la playa con una pelota.",
    "Il treno arriva in stazione alle otto.",
    "café, naïve, résumé — déjà vu!",
    "一只猫在桌子上睡觉",
    "東京の夜景がとても綺麗です",
    "한국어 문장도 조금 넣어 봅니다",
    "Кошка сидит на окне и смотрит на улицу",
    "صورة لقطة فيديو قصيرة",
    "ＦＵＬＬＷＩＤＴＨ letters and ﬁ ligatures",
    "emoji 🎬 video clip 🚀 rocket launch",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality",
    "a slow zoom into a forest covered in snow",
    "fireworks explode above a city skyline",
    "a chef slices vegetables on a wooden board",
    "a child flies a red kite on a windy hill",
    "sunlight streams through the leaves of a tall tree",
    "a train crosses a bridge over a deep valley",
    "the camera pans across a desert at dawn",
)
TOKENIZER_MAX_VOCAB = 200

# Architecture of the tiny components (module docstring says why these values).
TEXT_ENCODER = dict(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=48, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                    dropout_rate=0.0)
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=8)
TRANSFORMER = dict(dim=24, ffn_dim=32, num_heads=2, num_layers=2, freq_dim=16, patch_size=(1, 2, 2), eps=1e-6,
                   text_len=512)
FLOW_SHIFT = 3.0
SCHEDULERS = ("unipc", "euler")


# ----------------------------------------------------------------------------------------------------------------------
# Components.
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def spiece_model() -> bytes:
    """The serialized SentencePiece unigram model (deterministic: one thread, corpus in order)."""
    import sentencepiece as spm

    model = io.BytesIO()
    # Each sentence twice: unigram training needs some repetition to keep multi-character pieces.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 2), model_writer=model, model_type="unigram",
        vocab_size=TOKENIZER_MAX_VOCAB, hard_vocab_limit=False, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        bos_id=-1, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, character_coverage=1.0,
        minloglevel=2)
    return model.getvalue()


@functools.lru_cache(maxsize=None)
def _tokenizer_source() -> str:
    """A folder holding spiece.model + tokenizer_config.json for `T5Tokenizer.from_pretrained` (which converts the
    SentencePiece model to a `tokenizers` Unigram with its NFKC charsmap; the plain constructor does not)."""
    folder = tempfile.mkdtemp(prefix="uvigu_tiny_tokenizer_")
    atexit.register(shutil.rmtree, folder, True)
    Path(folder, SPIECE_FILE).write_bytes(spiece_model())
    Path(folder, "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}))
    return folder


def build_tokenizer():
    """transformers `T5Tokenizer` over the tiny SentencePiece model (vocab_file = its spiece.model)."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(_tokenizer_source())
    specials = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if specials != (PAD_ID, EOS_ID, UNK_ID):
        raise AssertionError(f"tiny tokenizer pad/eos/unk ids are {specials}, expected {(PAD_ID, EOS_ID, UNK_ID)}")
    return tokenizer


def build_text_encoder(vocab_size: int, seed: int = 0):
    """transformers `UMT5EncoderModel`, params re-drawn: matrices ~ N(0, 1/fan_in), embedding and position-bias
    tables ~ N(0, 1), norm scales ~ 1 + N(0, 0.2²)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER))
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    return model.eval()


def wan_config(**overrides):
    """The tiny transformer as a `WanConfig` (what our converter should produce from either layout)."""
    from uvigu.models.wan import WanConfig

    fields = dict(TRANSFORMER, in_channels=VAE["z_dim"], out_channels=VAE["z_dim"],
                  text_dim=TEXT_ENCODER["d_model"])
    fields.update(overrides)
    return WanConfig(**fields)


def build_transformer(seed: int = 0):
    """diffusers `WanTransformer3DModel`, params from `reference.diffusers_wan` (N(0, 0.2²), norms near 1)."""
    from reference import diffusers_wan

    return diffusers_wan(wan_config(), seed=seed)


def build_vae(seed: int = 0):
    """diffusers `AutoencoderKLWan`, params re-drawn: conv / linear weights ~ N(0, (1.2² / fan_in)) so activations
    stay O(1) through the stack, biases ~ N(0, 0.05²), RMS-norm gammas ~ 1 + N(0, 0.1²); latents_mean ~ N(0, 0.5²),
    latents_std ~ U(0.5, 2) (rounded to 4 decimals, so the JSON config holds them exactly)."""
    from diffusers import AutoencoderKLWan

    rng = np.random.default_rng(seed + 21)
    z = VAE["z_dim"]
    mean = [round(float(v), 4) for v in rng.normal(0.0, 0.5, z)]
    std = [round(float(v), 4) for v in rng.uniform(0.5, 2.0, z)]
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE, latents_mean=mean, latents_std=std)
    gen = torch.Generator().manual_seed(seed + 22)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()  # [out, in, *kernel]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.2 / fan_in ** 0.5))
    return vae.eval()


def build_scheduler(name: str = "unipc"):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                                       num_train_timesteps=1000)
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


def build_tiny_pipeline(scheduler: str = "unipc", seed: int = 0):
    """A diffusers `WanPipeline` of tiny random components (module docstring), fp32, CPU, eval mode."""
    from diffusers import WanPipeline

    sched = build_scheduler(scheduler)  # first: a bad name fails before anything is built
    tokenizer = build_tokenizer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(len(tokenizer), seed),
                       vae=build_vae(seed), scheduler=sched, transformer=build_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# Saving: the diffusers folder and the original release folder.
# ----------------------------------------------------------------------------------------------------------------------


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained plus the spiece.model the real releases ship next to tokenizer.json."""
    tokenizer.save_pretrained(folder)
    src = getattr(tokenizer, "vocab_file", None)
    if not src or not os.path.isfile(src):
        raise ValueError("the tokenizer has no spiece.model (vocab_file) to save; build it with build_tokenizer()")
    shutil.copyfile(src, folder / SPIECE_FILE)


def save_diffusers(pipe, folder) -> Path:
    """`pipe.save_pretrained(folder)` (safetensors) plus `tokenizer/spiece.model`; returns the folder.

    Layout: model_index.json, scheduler/scheduler_config.json, text_encoder/{config.json, model.safetensors},
    tokenizer/{spiece.model, tokenizer.json, tokenizer_config.json}, transformer/{config.json,
    diffusion_pytorch_model.safetensors}, vae/{config.json, diffusion_pytorch_model.safetensors}.
    """
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(pipe.tokenizer, folder / "tokenizer")
    return folder


def load_diffusers(folder):
    """A `WanPipeline` from a folder written by `save_diffusers`, fp32, eval.

    Not `WanPipeline.from_pretrained`: without `accelerate` (not installed here) diffusers 0.42 forces
    low_cpu_mem_usage=False, which it then refuses for `WanTransformer3DModel` (it has `_keep_in_fp32_modules`). So
    each diffusers model is built from its config.json and gets its safetensors with `load_state_dict(strict=True)`
    (a missing or extra tensor fails); the text encoder, tokenizer and scheduler load the ordinary way.
    """
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from diffusers import schedulers as diffusers_schedulers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "WanPipeline":
        raise ValueError(f"{folder}/model_index.json is a {index.get('_class_name')!r}, expected 'WanPipeline'")

    def diffusers_model(cls, name):
        model = cls.from_config(cls.load_config(folder / name))
        model.load_state_dict(load_file(folder / name / "diffusion_pytorch_model.safetensors"), strict=True)
        return model.eval()

    scheduler_cls = getattr(diffusers_schedulers, index["scheduler"][1])
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
        vae=diffusers_model(AutoencoderKLWan, "vae"),
        scheduler=scheduler_cls.from_pretrained(folder / "scheduler"),
        transformer=diffusers_model(WanTransformer3DModel, "transformer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def original_dit_config(transformer) -> dict:
    """The original release's config.json for a diffusers transformer: the field names of Wan-AI/Wan2.1-T2V-*'s own
    file. Like the real file it leaves out text_dim and patch_size (4096 and (1, 2, 2) there); the tiny text_dim is 32,
    so a converter must infer it from `text_embedding.0.weight` [dim, text_dim]."""
    c = transformer.config
    return {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0",
        "dim": c.num_attention_heads * c.attention_head_dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_channels, "model_type": "t2v", "num_heads": c.num_attention_heads,
        "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": TRANSFORMER["text_len"],
    }


def original_dit_state(transformer) -> dict[str, torch.Tensor]:
    from uvigu.models.wan_keys import diffusers_to_original_key

    return {diffusers_to_original_key(k): v.detach().contiguous().clone()
            for k, v in transformer.state_dict().items()}


def original_t5_state(text_encoder, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Wan's T5 naming (umt5_keys.hf_to_original_key); the tied `encoder.embed_tokens.weight` is the same tensor as
    `shared.weight` and is written once, as `token_embedding.weight`."""
    from uvigu.models.umt5_keys import SHARED_KEY, TIED_KEY, hf_to_original_key

    state = text_encoder.state_dict()
    out = {}
    for key, value in state.items():
        if key == TIED_KEY and SHARED_KEY in state:
            continue
        out[hf_to_original_key(key)] = value.detach().to(dtype).contiguous().clone()
    return out


def original_vae_state(vae) -> dict[str, torch.Tensor]:
    """Wan2.1_VAE.pth naming via `uvigu.models.wan_vae_keys.diffusers_to_original_key`; ImportError naming the
    module if it is not there."""
    try:
        from uvigu.models.wan_vae_keys import diffusers_to_original_key
    except ImportError as e:
        raise ImportError(f"save_original_release needs uvigu.models.wan_vae_keys.diffusers_to_original_key for "
                          f"{ORIGINAL_VAE_FILE} ({e}); pass include_vae=False to write the rest") from e
    # The decoder's flat `upsamples.N` index depends on the res blocks per stage.
    r = vae.config.num_res_blocks
    return {diffusers_to_original_key(k, r): v.detach().contiguous().clone() for k, v in vae.state_dict().items()}


def save_original_release(pipe, folder, *, include_vae: bool = True) -> Path:
    """The same weights in the original Wan2.1 release layout; returns the folder.

      config.json                             original field names (`original_dit_config`)
      diffusion_pytorch_model.safetensors     DiT, original key names (no `model.diffusion_model.` prefix), fp32
      Wan2.1_VAE.pth                          torch.save of the VAE state dict, original names, fp32 (include_vae)
      models_t5_umt5-xxl-enc-bf16.pth         torch.save of the umT5 encoder state dict, Wan's T5 names, bf16
      google/umt5-xxl/                        tokenizer files (spiece.model, tokenizer.json, tokenizer_config.json)
    Like the real release there is no config for the VAE or T5: sizes come from tensor shapes. The VAE's
    latents_mean / latents_std are not in the file either (the original code hard-codes the real 16 values), so a
    converter reading this folder cannot recover the tiny ones: compare against the diffusers folder for those.
    Everything is built before anything is written: a failure (e.g. no wan_vae_keys) writes nothing.
    """
    from safetensors.torch import save_file

    dit = original_dit_state(pipe.transformer)
    t5 = original_t5_state(pipe.text_encoder)
    vae = original_vae_state(pipe.vae) if include_vae else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(original_dit_config(pipe.transformer), indent=2))
    save_file(dit, str(folder / ORIGINAL_DIT_FILE))
    torch.save(t5, folder / ORIGINAL_T5_FILE)
    if vae is not None:
        torch.save(vae, folder / ORIGINAL_VAE_FILE)
    tokenizer_dir = folder / ORIGINAL_TOKENIZER_DIR
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(pipe.tokenizer, tokenizer_dir)
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# diffusers' outputs.
# ----------------------------------------------------------------------------------------------------------------------


def latent_shape(pipe, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(T, h, w, C) of the latents for a video of num_frames x height x width (channels-last)."""
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    if num_frames < 1 or (num_frames - 1) % st:
        raise ValueError(f"num_frames must be {st}n + 1, got {num_frames}")
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be divisible by 16, got {height}x{width}")
    return (num_frames - 1) // st + 1, height // ss, width // ss, pipe.transformer.config.in_channels


def _run(pipe, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
         latents_channels_last, max_sequence_length, output_type):
    latents = np.asarray(latents_channels_last, np.float32)
    expected = latent_shape(pipe, num_frames, height, width)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    if latents.shape != (batch, *expected):
        raise ValueError(f"latents_channels_last has shape {latents.shape}, expected {(batch, *expected)} "
                         f"(B, T, h, w, C) for {num_frames} frames at {height}x{width}")
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(latents, -1, 1)))
    with torch.no_grad():
        out = pipe(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=x,
                   output_type=output_type, max_sequence_length=max_sequence_length).frames
    return out


def reference_t2v(pipe, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "", height: int,
                  width: int, num_frames: int, num_inference_steps: int, guidance_scale: float,
                  latents_channels_last: np.ndarray, max_sequence_length: int = 512) -> np.ndarray:
    """diffusers' `WanPipeline(...)` video: float32 [B, F, H, W, 3] in [0, 1].

    latents_channels_last: the initial noise [B, T, h, w, C] in the *normalised* latent space (what the pipeline
    would draw itself); it is moved to channels-first for diffusers. All steps: module docstring.
    """
    video = _run(pipe, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                 latents_channels_last, max_sequence_length, "np")
    return np.asarray(video, np.float32)


def reference_t2v_latents(pipe, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
                          height: int, width: int, num_frames: int, num_inference_steps: int, guidance_scale: float,
                          latents_channels_last: np.ndarray, max_sequence_length: int = 512) -> np.ndarray:
    """The same run stopped before the VAE (`output_type="latent"`): the final *normalised* latents, channels-last
    [B, T, h, w, C] float32. Lets a test check DiT + scheduler + CFG apart from the VAE."""
    z = _run(pipe, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
             latents_channels_last, max_sequence_length, "latent")
    return np.moveaxis(z.float().numpy(), 1, -1)


def reference_prompt_embeds(pipe, prompt: str | Sequence[str], max_sequence_length: int = 512) -> np.ndarray:
    """`pipe.encode_prompt(prompt, do_classifier_free_guidance=False)`: float32 [B, max_sequence_length, d], rows
    after each prompt's eos exactly zero."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length, device=torch.device("cpu"))
    return embeds.float().numpy()


def reference_schedule(pipe, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [N], sigmas [N + 1]) of the pipeline's scheduler after `set_timesteps(N)` (UniPC: int64 timesteps;
    Euler: float32)."""
    pipe.scheduler.set_timesteps(num_inference_steps, device="cpu")
    return pipe.scheduler.timesteps.numpy().copy(), pipe.scheduler.sigmas.numpy().copy()
