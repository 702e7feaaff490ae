"""What every run config shares; `configs/*.py` are big_vision-style `get_config(arg)` files that build on it.

A config file reads top to bottom: `common(stage, variant)` (every field, at the paper's real-scale values, with the
model preset of the variant), then the file's run-local block (its stage's init, target text, lr, dropout, steps),
then, for the `tiny` variant, `use_toy_world(c)` and the stage's tiny values. Every value can be overridden from the
command line (`--config.optim.lr=1e-4`, `--config.model.wan.remat_policy=names`); a key that does not exist is an
error.

Variants (`--config=configs/stage1.py:VARIANT`): `tiny` (the embedded toy world on a CPU: the default),
`wan2.1-1.3b` and `wan2.1-14b` (real Wan2.1 weights converted with `tools.convert_wan_weights`, latent shards at
`data.path`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from uvigu.models.univigu import UniViGUConfig
from uvigu.models.wan import WanConfig

STAGES = ("pretrain_t2v", "stage1", "stage2")
VARIANTS = ("tiny", "wan2.1-1.3b", "wan2.1-14b")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# The toy world's shapes, fixed by its codec (space-to-depth 4 of 32x32 RGB) and its tiny umT5 encoder.
TOY_LATENT_CHANNELS = 48
TOY_CONTEXT_DIM = 32


def parse_variant(arg: str | None) -> str:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {VARIANTS}")
    return variant


def common(stage: str, variant: str) -> ml_collections.ConfigDict:
    """Every field of a run config, at real-scale values; the architecture is the variant's Wan preset."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    parse_variant(variant)
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.variant = variant
    c.seed = 0

    # ---- model: bf16 compute, fp32 master weights, remat by name ----
    wan = WanConfig.preset("wan2.1-1.3b" if variant == "tiny" else variant, dtype="bfloat16", remat_policy="names")
    c.model = ml_collections.ConfigDict()
    c.model.wan = ml_collections.ConfigDict(dataclasses.asdict(wan))
    c.model.univigu = ml_collections.ConfigDict(dataclasses.asdict(UniViGUConfig()))

    # ---- where the weights start ----
    # kind: scratch | wan (a converted Wan2.1 folder or a pretrain_t2v export) | stage (a uvigu training workdir)
    c.init = ml_collections.ConfigDict(dict(kind="scratch", path=""))

    # ---- data: latent shards (manifest + ArrayRecord) ----
    c.data = ml_collections.ConfigDict(dict(
        kind="shards", path="",  # shards: their folder; toy_world: its cache folder (built on first use)
        text_target="none",  # none | prompt (stage 1) | caption (stage 2)
        global_batch_size=64,
        loss_on_padding=True,  # padding after eos is part of the target text (see pipeline.text_attention_mask)
        train_size=2000, val_size=200, test_size=200,  # toy world only
    ))

    # ---- flow ----
    c.flow = ml_collections.ConfigDict(dict(
        tau_sampling="logit_normal",  # uniform | logit_normal | shifted, τ_v and τ_t independently; then,
        # optionally, exact understanding / generation examples (flow.mix_tasks; paper: 0, 0)
        clean_video_prob=0.0, clean_text_prob=0.0,
        tau_shift=3.0, tau_mean=0.0, tau_std=1.0,
        # drop the prompt context with this probability (what makes CFG possible); stage 1 drops more, to force
        # recall from the video. Captioning from the video alone (V2T) is learnt only on dropped examples.
        cond_dropout=0.1,
        rounding_weight=0.1,  # embedding flow: weight of the rounding cross-entropy on the predicted clean text
    ))

    # ---- optimiser (Adam β 0.9 / 0.95 as in the paper) ----
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        warmup_steps=1000, schedule="cosine", min_lr_ratio=0.1,  # cosine | constant
        clip_norm=1.0,
        freeze_video=False,  # train only the text side (FFN_t, text time path, text in/out)
    ))

    # ---- schedule of the loop ----
    c.total_steps = 100_000
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.eval_every = 5000  # 0: only at the end
    c.eval_examples = 256
    c.eval_batch_size = 8

    # ---- sampling for evaluation ----
    c.sample = ml_collections.ConfigDict(dict(num_steps=50, shift=3.0, guidance_scale=5.0, solver="unipc",
                                              num_saved=4))

    # ---- mesh (sizes; one may be -1 = the remaining devices) ----
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1))
    return c


def use_toy_world(c: ml_collections.ConfigDict) -> None:
    """The `tiny` variant: the embedded toy world on a CPU, every code path of full scale at toy size.

    The values are tuned for `make demo` (the whole method in minutes on a CPU; measurements in the issue-4 note).
    What limits it is captioning: a 4-layer, 64-wide DiT learns shape and motion from the video only after ~2000 steps
    of exact V2T examples with the detailed caption as target. So the tiny stages make most examples exact V2T (clean
    video, prompt dropped), and the stage files spend most steps in stage 2."""
    # Temporal patch 3: the 9-frame toy latents become 3 x 4 x 4 = 48 tokens (Wan's 1 x 2 x 2 would make 144), which
    # is what lets the CPU demo train three stages in minutes.
    wan = WanConfig.preset("tiny", dim=64, ffn_dim=128, num_heads=4, num_layers=4, in_channels=TOY_LATENT_CHANNELS,
                           out_channels=TOY_LATENT_CHANNELS, text_dim=TOY_CONTEXT_DIM, freq_dim=64, text_len=16,
                           patch_size=(3, 2, 2))
    c.model.wan = ml_collections.ConfigDict(dataclasses.asdict(wan))
    # The released code's discrete text flow: at this size the paper's embedding flow learns captioning far slower
    # (issue-4 note); both stay one switch away (--config.model.univigu.text_flow=embedding).
    c.model.univigu = ml_collections.ConfigDict(dataclasses.asdict(
        UniViGUConfig(vocab_size=32, text_latent_dim=32, max_text_len=16, text_flow="discrete")))
    c.data.kind, c.data.path, c.data.global_batch_size = "toy_world", "runs/toy_world", 16
    c.flow.tau_sampling = "uniform"
    c.flow.clean_video_prob, c.flow.clean_text_prob = 0.8, 0.15
    c.optim.lr = 2e-3  # every tiny stage: the rate the captioning runs in the issue-4 note were tuned at
    c.optim.warmup_steps = 50
    c.log_every, c.ckpt_every = 20, 200
    c.eval_every, c.eval_examples, c.eval_batch_size = 0, 128, 64
    c.sample.num_steps, c.sample.guidance_scale = 10, 3.0


def load(stage: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """`configs/{stage}.py`'s get_config(variant), as `--config=configs/{stage}.py:variant` would give it."""
    spec = importlib.util.spec_from_file_location(f"configs.{stage}", CONFIGS_DIR / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def wan_config(c: ml_collections.ConfigDict) -> WanConfig:
    d = c.model.wan.to_dict()
    d["patch_size"] = tuple(d["patch_size"])
    return WanConfig(**d)


def univigu_config(c: ml_collections.ConfigDict) -> UniViGUConfig:
    return UniViGUConfig(**c.model.univigu.to_dict())
