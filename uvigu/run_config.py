"""What every run config shares; `configs/*.py` are big_vision-style `get_config(arg)` files that build on it.

A config file reads top to bottom: `common(stage, variant)` (every field, at the paper's real-scale values, with the
model preset of the variant), then the file's run-local block (its stage's init, target text, lr, dropout, steps),
then, for the `tiny` variant, `use_toy_world(c)` and the stage's tiny values. Every value can be overridden from the
command line (`--config.optim.lr=1e-4`, `--config.model.wan.remat_policy=names`); a key that does not exist is an
error.

Variants (`--config=configs/stage1.py:VARIANT`): `tiny` (the embedded toy world on a CPU: the default),
`wan2.1-1.3b` and `wan2.1-14b` (real Wan2.1 weights converted with `tools.convert_wan_weights`, latent shards at
`data.path`), and `from_folder`: the architecture is read at the start of the run from `init.path` (a converted
folder's `dit/config.json` and tokenizer for stage 1, the init workdir's run_config.json for stage 2), not from a
preset, so any converted Wan folder trains as it is (`resolve_from_folder`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import ml_collections

from uvigu.models.lora import LoRAConfig
from uvigu.models.univigu import UniViGUConfig
from uvigu.models.wan import WanConfig

STAGES = ("pretrain_t2v", "stage1", "stage2")
VARIANTS = ("tiny", "wan2.1-1.3b", "wan2.1-14b", "from_folder")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# The toy world's shapes, fixed by its codec (space-to-depth 2 of 16x16 RGB) and its tiny umT5 encoder.
TOY_LATENT_CHANNELS = 12
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
    # A resume whose stage, init or data differ from the workdir's run_config.json is refused unless this is set.
    c.allow_config_change = False

    # ---- model: bf16 compute, fp32 master weights, remat by name ----
    # (from_folder: a placeholder architecture, replaced by the init folder's at the start of the run)
    preset = "wan2.1-1.3b" if variant in ("tiny", "from_folder") else variant
    wan = WanConfig.preset(preset, dtype="bfloat16", remat_policy="names")
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
        train_size=2000, val_size=200, test_size=200, world_seed=0,  # toy world only (its own seed: runs with
        # different `seed`s, e.g. an ablation's, see the same data)
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
        # ... and, instead, this probability for the exact V2T examples that `clean_video_prob` makes: captioning runs
        # from the video alone (null context), so those examples see what inference sees. (No effect when
        # clean_video_prob = 0, as at full scale.)
        clean_video_cond_dropout=1.0,
        rounding_weight=0.1,  # embedding flow: weight of the rounding cross-entropy on the predicted clean text
    ))

    # ---- optimiser (Adam β 0.9 / 0.95 as in the paper) ----
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        warmup_steps=1000, schedule="cosine", min_lr_ratio=0.1,  # cosine | constant
        clip_norm=1.0,
        trainable="all",  # all | lora (adapters only, base frozen; see config.lora)
        freeze_video=False,  # train only the text side (FFN_t, text time path, text in/out)
        # The DiT's own params (the generator's) at lr × this; the new text side at lr. Below 1 keeps more of the
        # generative prior through stages 1-2 while the text side learns at full rate (1: one rate, as the paper).
        video_lr_scale=1.0,
    ))
    # LoRA (optim.trainable='lora'): rank, alpha (scale alpha/rank) and target Linears of each block (FFN_t included).
    lora_defaults = LoRAConfig()
    c.lora = ml_collections.ConfigDict(dict(rank=lora_defaults.rank, alpha=float(lora_defaults.rank),
                                            targets=list(lora_defaults.targets)))

    # ---- schedule of the loop ----
    c.total_steps = 100_000
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.eval_every = 5000  # 0: only at the end
    c.eval_examples = 256
    c.eval_batch_size = 8

    # ---- sampling for evaluation ----
    # text_temperature: of the discrete text flow's token draws in V2T and joint samples (1: the flow's law, 0: greedy)
    c.sample = ml_collections.ConfigDict(dict(num_steps=50, shift=3.0, guidance_scale=5.0, solver="unipc",
                                              num_saved=4, text_temperature=1.0))

    # ---- mesh (sizes; one may be -1 = the remaining devices) ----
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1))
    return c


def use_toy_world(c: ml_collections.ConfigDict) -> None:
    """The `tiny` variant: the embedded toy world on a CPU, every code path of full scale at toy size.

    The values are tuned for `make demo` (the whole method in about a quarter of an hour on 2 cores). The DiT is as
    wide as its tokens need: a (1, 2, 2) patch of the 8 x 8 x 12 toy latents is 48 values, and the 96-wide model can
    carry all of them (the earlier 64-wide model under 576-value (3, 2, 2) patches could not remove 89 % of the noise;
    see `uvigu.data.world`). Two heads: head dim 48 gives each RoPE axis 8 frequencies instead of 4. float32: on
    XLA:CPU the bf16 step is slower (no bf16 matmul units), and the toy model is small enough. Layers in a Python loop
    (`scan_layers=False`): at 4 layers the compile stays short and the step skips the scan's stacked residual buffers
    (steps/s 11.2 -> 12.8 pretrain, 9.1 -> 10.4 stage 2, issue-11 note)."""
    # Wan's (1, 2, 2) patch: 5 x 4 x 4 = 80 tokens of 48 values.
    wan = WanConfig.preset("tiny", dim=96, ffn_dim=256, num_heads=2, num_layers=4, in_channels=TOY_LATENT_CHANNELS,
                           out_channels=TOY_LATENT_CHANNELS, text_dim=TOY_CONTEXT_DIM, freq_dim=64, text_len=16,
                           patch_size=(1, 2, 2), dtype="float32", scan_layers=False)
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
    # Greedy captions (as the released joint loop's final argmax): held-out V2T exact match of five 200 + 2000-step
    # runs 0.50 sampled, 0.57 greedy (issue-11 note).
    c.sample.text_temperature = 0.0


def resolve_from_folder(c: ml_collections.ConfigDict) -> None:
    """For the `from_folder` variant: the architecture fields of `c.model.wan` (and the text side's vocabulary) from
    the init source; execution fields (dtype, remat, ...) stay the config's. A no-op for the other variants."""
    if c.variant != "from_folder":
        return
    from uvigu import checkpoint

    execution = checkpoint.EXECUTION_FIELDS
    if c.init.kind == "wan":
        found = checkpoint.load_config(c.init.path, kind=checkpoint.WAN_DIT).to_dict()
        tokenizer = _release_root(Path(c.init.path)) / "tokenizer" / "config.json"
        univigu = None
        if tokenizer.is_file():  # the text side's vocabulary is the release's tokenizer
            univigu = {"vocab_size": json.loads(tokenizer.read_text())["vocab_size"]}
    elif c.init.kind == "stage":
        model = json.loads((Path(c.init.path) / "run_config.json").read_text())["config"]["model"]
        found, univigu = model["wan"], model["univigu"]
    else:
        raise ValueError(f"the from_folder variant needs config.init.kind wan or stage, got {c.init.kind!r}")
    c.model.wan.update({k: v for k, v in found.items() if k not in execution})
    if univigu:
        c.model.univigu.update(univigu)


def _release_root(path: Path) -> Path:
    """A converted DST given as the DST or as its dit/ folder."""
    return path.parent if path.name == "dit" else path


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


# ----------------------------------------------------------------------------------------------------------------------
# Checking a config before any work (uvigu.train calls it before it creates the workdir).
# ----------------------------------------------------------------------------------------------------------------------

INIT_KINDS = ("scratch", "wan", "stage")
DATA_KINDS = ("toy_world", "shards")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A config value that cannot run; the message names every bad key and what it may be."""


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks every value a run reads against what the code accepts, before a workdir, dataset or model exists.
    Raises ConfigError listing each bad key with its value and the allowed values or range."""
    import typing

    from uvigu import flow, sampling
    from uvigu.data import pipeline

    problems: list[str] = []

    def get(key: str):
        node = c
        for part in key.split("."):
            node = node[part]
        return node

    def choice(key: str, allowed) -> None:
        if get(key) not in allowed:
            problems.append(f"config.{key}={get(key)!r} is not one of {' | '.join(map(str, allowed))}")

    def number(key: str, low=None, high=None, *, integer: bool = False, open_low: bool = False) -> None:
        v = get(key)
        kind = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind):
            problems.append(f"config.{key}={v!r} is not {'an integer' if integer else 'a number'}")
            return
        bad = (low is not None and (v <= low if open_low else v < low)) or (high is not None and v > high)
        if bad:
            lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
            hi = "" if high is None else f"<= {high}"
            problems.append(f"config.{key}={v!r} is out of range (must be {' and '.join(x for x in (lo, hi) if x)})")

    choice("stage", STAGES)
    choice("variant", VARIANTS)
    choice("init.kind", INIT_KINDS)
    choice("data.kind", DATA_KINDS)
    choice("data.text_target", typing.get_args(pipeline.TextTarget))
    choice("flow.tau_sampling", typing.get_args(flow.TauKind))
    choice("model.univigu.text_flow", typing.get_args(flow.TextFlowName))
    choice("sample.solver", typing.get_args(sampling.Solver))
    choice("optim.schedule", SCHEDULES)
    if "trainable" in c.optim:
        choice("optim.trainable", ("all", "lora"))
    for key in ("total_steps", "log_every", "ckpt_every", "keep_checkpoints", "eval_batch_size",
                "data.global_batch_size", "sample.num_steps"):
        number(key, 1, integer=True)
    for key in ("eval_every", "eval_examples", "sample.num_saved", "optim.warmup_steps", "seed"):
        number(key, 0, integer=True)
    for key in ("flow.cond_dropout", "flow.clean_video_cond_dropout", "flow.clean_video_prob", "flow.clean_text_prob",
                "optim.min_lr_ratio"):
        number(key, 0.0, 1.0)
    for key in ("optim.b1", "optim.b2"):
        number(key, 0.0, 1.0)
    if "video_lr_scale" in c.optim:
        number("optim.video_lr_scale", 0.0, 1.0, open_low=True)
        if c.optim.video_lr_scale != 1.0 and (c.stage == "pretrain_t2v" or c.optim.get("trainable") == "lora"
                                              or c.optim.get("freeze_video")):
            problems.append(f"config.optim.video_lr_scale={c.optim.video_lr_scale!r} sets the DiT's rate against the "
                            "text side's: it needs stage1 / stage2 training all params (not LoRA, not freeze_video)")
    for key in ("optim.lr", "optim.clip_norm", "flow.tau_std"):
        number(key, 0.0, open_low=True)
    for key in ("optim.eps", "optim.weight_decay", "flow.rounding_weight", "sample.guidance_scale",
                "sample.text_temperature"):
        number(key, 0.0)
    number("flow.tau_shift", 0.0, open_low=True)
    number("sample.shift", 0.0, open_low=True)
    for key in ("init.path", "data.path"):  # local or mounted (gcsfuse, NFS) paths only: see workdir.local_path
        if "://" in str(get(key)):
            problems.append(f"config.{key}={get(key)!r} is a URL; uvigu reads local paths: mount the bucket (gcsfuse) "
                            "and give the mounted path")
    if c.stage != "pretrain_t2v" and c.data.text_target == "none":
        problems.append(f"config.data.text_target='none' leaves {c.stage} no target text (prompt | caption)")
    if not isinstance(c.get("allow_config_change", False), bool):
        problems.append(f"config.allow_config_change={c.allow_config_change!r} is not true | false")
    mesh = c.mesh.to_dict()
    for name, size in mesh.items():
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            problems.append(f"config.mesh.{name}={size!r} is not a positive integer or -1 (the remaining devices)")
    if sum(v == -1 for v in mesh.values()) > 1:
        problems.append(f"config.mesh={mesh}: at most one axis may be -1")
    for section, make in (("model.wan", wan_config), ("model.univigu", univigu_config)):
        try:
            make(c)
        except (TypeError, ValueError) as e:  # the dataclasses' own checks (dtype, remat_policy, sizes, ...)
            problems.append(f"config.{section}: {e}")
    if problems:
        raise ConfigError("invalid config (nothing was started or written):\n  " + "\n  ".join(problems))
