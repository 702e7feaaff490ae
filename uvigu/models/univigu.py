"""Uni-ViGU: one Wan2.1 DiT that denoises video and text together.

Built *around* a `WanDiT` (it holds the DiT and calls its pieces; nothing is copied): the sequence is
[video tokens; text tokens], video first. Per block:
  * self-attention over the whole sequence with the DiT's shared weights; video tokens keep Wan's 3-D RoPE
    (interleaved pairs), text tokens get a 1-D RoPE over the full head dim (rotate-half pairs, positions 0..S-1),
    as the released code does. Text positions need no relation to video positions: attention between the two
    modalities is then position-free, which is what a caption about the whole clip wants;
  * cross-attention of every token to the prompt embedding (shared weights, no modulation);
  * FFN_v (the DiT's) on the video tokens and FFN_t on the text tokens: a static split of the sequence at L.
Modulation is per token: video tokens are modulated by the DiT's time path at τ_v and the DiT's per-block tables;
text tokens by a second time path (same architecture, initialised as a copy of Wan's) at τ_t and the same tables.

Both τ follow the paper (1 = clean). The DiT runs in Wan's units: timestep = (1 − τ)·1000 and its raw output is
noise − data, so the video velocity returned is −(DiT output). With no text tokens (S = 0) the video velocity
equals −WanDiT(x, (1 − τ_v)·1000, context): the pretrained prior is untouched by the wrapping (tested).

Text flows (`UniViGUConfig.text_flow`, read once here; everything else uses `model.text_flow`, a `uvigu.flow`
object): "embedding" (paper): text is a noisy latent [B, S, E] in the space of a learnable table E [V, E]
(`TextEmbeddingTable`), projected to D on the way in; the head predicts the velocity [B, S, E]. "discrete" (released
code): text is token ids [B, S], embedded by a vocab table [V, D] (one more row, the mask id V, with the "mask"
source); the head predicts logits [B, S, V].

The released checkpoint (tools/convert_wan_weights/univigu_part.py) needs three text-side options, all off by default:
`text_head_norm="weight"` (its head LayerNorm has a learned weight [D], no bias), `text_head_eps=1e-5` (that norm's
eps; ours is the DiT's) and, with a mask source, `head_mask_logit=True` (its head scores V + 1 ids).

Shape letters: B batch, T/H/W latent frames/height/width, C latent channels, L video tokens, S text tokens,
D model dim, E text latent dim, V vocab, G prompt-encoder dim.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from uvigu import flow, sharding
from uvigu.models import layers
from uvigu.models.model_config import ModelConfig
from uvigu.models.text_table import TextEmbeddingTable
from uvigu.models.wan import TimeEmbedding, WanConfig, WanDiT, WanFeedForward, layer_stack, split_modulation



@dataclasses.dataclass(frozen=True)
class UniViGUConfig(ModelConfig):
    """The text side added to a Wan DiT. The DiT's own architecture stays in its `WanConfig`."""

    text_flow: flow.TextFlowName = "embedding"
    vocab_size: int = 256_384  # umT5's tokenizer
    text_latent_dim: int = 128  # E, the embedding flow's text latent width (unused by the discrete flow)
    max_text_len: int = 256  # longest caption; also bounds the text RoPE table
    ffn_t_dim: int | None = None  # FFN_t hidden width; None = the DiT's ffn_dim
    ffn_t_init: Literal["fresh", "copy"] = "fresh"  # paper: fresh; released code: a copy of FFN_v (needs equal width)
    embedding_row_norm: float | None = None  # fixed row norm of E; None = sqrt(E)
    text_rope_theta: float = 10000.0
    discrete_source: flow.DiscreteSource = "uniform"  # discrete flow: uniform ids, or an absorbing mask id (= V)
    scheduler_power: float = 1.0  # discrete flow: κ(τ) = τ^power
    # The text head's norm: "none" = non-affine LayerNorm (ours); "weight" = LayerNorm times a learned per-channel
    # weight (the released code's `text_head.norm_final`, no bias). eps None = the DiT's eps (the release uses 1e-5).
    text_head_norm: Literal["none", "weight"] = "none"
    text_head_eps: float | None = None
    # Discrete "mask" source only: the head also scores the mask id (V + 1 logits), as the released code's head does.
    head_mask_logit: bool = False

    def __post_init__(self):
        if self.text_flow not in ("embedding", "discrete"):
            raise ValueError(f"UniViGUConfig.text_flow={self.text_flow!r} is not 'embedding' or 'discrete'")
        if self.discrete_source not in ("uniform", "mask"):
            raise ValueError(f"UniViGUConfig.discrete_source={self.discrete_source!r} is not 'uniform' or 'mask'")
        if self.ffn_t_init not in ("fresh", "copy"):
            raise ValueError(f"UniViGUConfig.ffn_t_init={self.ffn_t_init!r} is not 'fresh' or 'copy'")
        if self.text_head_norm not in ("none", "weight"):
            raise ValueError(f"UniViGUConfig.text_head_norm={self.text_head_norm!r} is not 'none' or 'weight'")
        if self.text_head_eps is not None and not self.text_head_eps > 0:
            raise ValueError(f"UniViGUConfig.text_head_eps must be positive or None, got {self.text_head_eps!r}")
        if self.head_mask_logit and (self.text_flow != "discrete" or self.discrete_source != "mask"):
            raise ValueError("UniViGUConfig.head_mask_logit=True needs text_flow='discrete' with discrete_source='mask' "
                             f"(got text_flow={self.text_flow!r}, discrete_source={self.discrete_source!r})")
        if self.vocab_size < 2 or self.text_latent_dim < 1 or self.max_text_len < 1:
            raise ValueError(f"UniViGUConfig: vocab_size, text_latent_dim and max_text_len must be positive: {self}")


@dataclasses.dataclass(frozen=True)
class UniViGUModelConfig:
    """Everything that builds a `UniViGU`: its DiT's `WanConfig` and the text side's `UniViGUConfig` (what a UniViGU
    model folder records). Execution fields (dtype, scan_layers, ...) live on `wan`."""

    wan: WanConfig
    univigu: UniViGUConfig

    def to_dict(self) -> dict:
        return {"wan": self.wan.to_dict(), "univigu": self.univigu.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "UniViGUModelConfig":
        if set(d) != {"wan", "univigu"}:
            raise ValueError(f"a UniViGU config has sections 'wan' and 'univigu', got {sorted(d)}")
        return cls(WanConfig.from_dict(d["wan"]), UniViGUConfig.from_dict(d["univigu"]))

    def build(self, rngs: nnx.Rngs) -> "UniViGU":
        return UniViGU(WanDiT(self.wan, rngs=rngs), self.univigu, rngs=rngs)


class TextHead(nnx.Module):
    """LayerNorm (non-affine, or times a learned weight [D] with `norm_weight`, the released code's `norm_final`), a
    (1, 2, D) shift/scale table added to the text time embedding e_t, Linear(D -> out). The projection starts at zero:
    a fresh text head predicts a zero velocity / uniform logits."""

    def __init__(self, dim: int, out_dim: int, out_axis: str | None, *, eps: float, dtype, param_dtype,
                 rngs: nnx.Rngs, norm_weight: bool = False):
        self.eps = eps
        self.dtype = dtype
        if norm_weight:
            self.norm_scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",))
        init = jax.random.normal(rngs.params(), (1, 2, dim), jnp.float32) / np.sqrt(dim)
        self.scale_shift_table = nnx.Param(init.astype(param_dtype), out_sharding=(None, "modulation", "embed"))
        self.proj = layers.dense(dim, out_dim, ("embed", out_axis), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x: Float[Array, "B S D"], e_t: Float[Array, "B D"]) -> Float[Array, "B S O"]:
        shift, scale = split_modulation(self.scale_shift_table, e_t[:, None, None])
        normed = layers.layer_norm_fp32(x, self.eps)
        if hasattr(self, "norm_scale"):
            normed = normed * self.norm_scale[...].astype(jnp.float32)
        h = layers.modulate(normed, shift, scale)
        return self.proj(h.astype(self.dtype)).astype(jnp.float32)


class UniViGU(nnx.Module):
    """`model(video, text, tau_v, tau_t, context, text_mask=None) -> (video_velocity, text_out)`.

    video [B, T, H, W, C] noisy latents; text [B, S, E] noisy text latents ("embedding") or [B, S] ids
    ("discrete"); tau_v, tau_t [B] in [0, 1], 1 = clean; context [B, S_c, G] prompt embeddings; text_mask [B, S]
    (1 = real token) or None. Returns the paper velocity dz/dτ of the video [B, T, H, W, C] (float32) and the text
    velocity [B, S, E] or logits [B, S, V].
    """

    def __init__(self, dit: WanDiT, config: UniViGUConfig, *, rngs: nnx.Rngs):
        self.dit = dit
        self.config = config
        w = dit.config
        dt = dict(dtype=w.compute_dtype, param_dtype=w.storage_dtype)
        ffn_t_dim = config.ffn_t_dim or w.ffn_dim
        head = dict(eps=w.eps if config.text_head_eps is None else config.text_head_eps,
                    norm_weight=config.text_head_norm == "weight", **dt)
        self.ffn_t = layer_stack(lambda r: WanFeedForward(w.dim, ffn_t_dim, **dt, rngs=r), w.num_layers,
                                 w.scan_layers, rngs)
        self.text_time = TimeEmbedding(w.dim, w.freq_dim, param_dtype=w.storage_dtype, rngs=rngs)
        if config.text_flow == "embedding":
            self.text_table = TextEmbeddingTable(config.vocab_size, config.text_latent_dim, rngs=rngs,
                                                 row_norm=config.embedding_row_norm, param_dtype=w.storage_dtype)
            self.text_proj_in = layers.dense(config.text_latent_dim, w.dim, (None, "embed"), **dt, rngs=rngs)
            self.text_head = TextHead(w.dim, config.text_latent_dim, None, **head, rngs=rngs)
        else:
            mask_row = int(config.discrete_source == "mask")
            self.vocab_embed = nnx.Embed(config.vocab_size + mask_row, w.dim, dtype=w.compute_dtype,
                                         param_dtype=w.storage_dtype, rngs=rngs,
                                         embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                                              ("vocab", "embed")))
            self.text_head = TextHead(w.dim, config.vocab_size + int(config.head_mask_logit), "vocab", **head,
                                      rngs=rngs)

    @classmethod
    def from_wan(cls, dit: WanDiT, config: UniViGUConfig, *, rngs: nnx.Rngs) -> "UniViGU":
        """Wraps a (pretrained) DiT; the text side starts from it as `inherit_from_dit` describes."""
        model = cls(dit, config, rngs=rngs)
        model.inherit_from_dit()
        return model

    def inherit_from_dit(self) -> None:
        """Initialises the text side from the current DiT weights: the text time path becomes a copy of the DiT's
        (text tokens are modulated sensibly from step 0); FFN_t a copy of each block's FFN_v when
        `ffn_t_init='copy'` (else it stays fresh). Copies, not aliases: training one never moves the other. The
        trainer calls this after loading pretrained weights into an already-sharded model."""
        dit, config = self.dit, self.config
        copy = lambda src, dst: nnx.update(dst, jax.tree.map(jnp.copy, nnx.state(src, nnx.Param)))
        copy(dit.condition_embedder.time_embedder, self.text_time.time_embedder)
        copy(dit.condition_embedder.time_proj, self.text_time.time_proj)
        if config.ffn_t_init == "copy":
            if (config.ffn_t_dim or dit.config.ffn_dim) != dit.config.ffn_dim:
                raise ValueError(f"ffn_t_init='copy' needs ffn_t_dim == the DiT's ffn_dim ({dit.config.ffn_dim}), "
                                 f"got {config.ffn_t_dim}")
            if dit.config.scan_layers:
                copy(dit.blocks.ffn, self.ffn_t)
            else:
                for block, ffn_t in zip(dit.blocks, self.ffn_t):
                    copy(block.ffn, ffn_t)

    @property
    def text_flow(self) -> flow.TextFlow:
        """The text flow object (source, corruption, loss, solver step, decoding) of this model's text side."""
        c = self.config
        if hasattr(self, "text_table"):
            return flow.EmbeddingTextFlow(self.text_table)
        return flow.DiscreteTextFlow(c.vocab_size, source=c.discrete_source, scheduler_power=c.scheduler_power,
                                     mask_id=c.vocab_size if c.discrete_source == "mask" else None)

    @property
    def text_latent_dim(self) -> int | None:
        """E, the width of the text latents the embedding flow feeds in; None for the discrete flow (token ids)."""
        return self.text_table.dim if hasattr(self, "text_table") else None

    def as_velocity_fn(self):
        """This model as a pure function with the samplers' signature
        `(video, text, tau_v, tau_t, context, text_mask) -> (video_velocity, text_out)`.

        The samplers call it inside `lax.scan`; the DiT itself runs `nnx.scan`, which refuses modules created at an
        outer trace level. So the state is split once here and the module re-assembled inside each call."""
        graphdef, state = nnx.split(self)

        def velocity(video, text, tau_v, tau_t, context, text_mask=None):
            # tree.map rebuilds the Variables at the current trace level (merge alone would reuse the split ones).
            model = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
            return model(video, text, tau_v, tau_t, context, text_mask)

        return velocity

    # -- text in / out -------------------------------------------------------------------------------------------------

    def _embed_text(self, text) -> Float[Array, "B S D"]:
        c = self.config
        if self.text_flow.gaussian:
            if text.ndim != 3 or text.shape[-1] != c.text_latent_dim:
                raise ValueError(f"text must be noisy text latents [B, S, E={c.text_latent_dim}] for the embedding "
                                 f"flow, got {text.shape}")
            return self.text_proj_in(text.astype(self.dit.config.compute_dtype)).astype(jnp.float32)
        if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer):
            raise ValueError(f"text must be token ids [B, S] (integer) for the discrete flow, got {text.shape} "
                             f"{text.dtype}")
        if not isinstance(text, jax.core.Tracer):  # values are only visible outside jit
            bad = np.asarray(text)
            top = self.vocab_embed.num_embeddings  # V, or V + 1 with the mask id
            if bad.size and (bad.min() < 0 or bad.max() >= top):
                raise ValueError(f"text ids must be in [0, {top}) (vocab_size={c.vocab_size}), got range "
                                 f"[{bad.min()}, {bad.max()}]")
        # Under jit an out-of-range id gathers NaN (jnp.take's "fill" mode), which the training NaN guard reports.
        return self.vocab_embed(text).astype(jnp.float32)

    def text_rope(self, length: int) -> tuple[Array, Array]:
        """1-D rotate-half RoPE over the full head dim for text positions 0..S-1: cos, sin [S, K/2]."""
        if length > self.config.max_text_len:
            raise ValueError(f"text length {length} exceeds max_text_len={self.config.max_text_len}")
        angles = layers.rope_angles(self.dit.config.head_dim, np.arange(length), self.config.text_rope_theta)
        return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)

    # -- the call ------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        video: Float[Array, "B T H W C"],
        text: Float[Array, "B S E"] | Int[Array, "B S"],
        tau_v: Float[Array, "B"],
        tau_t: Float[Array, "B"],
        context: Float[Array, "B Sc G"],
        text_mask: Bool[Array, "B S"] | Float[Array, "B S"] | None = None,
    ) -> tuple[Float[Array, "B T H W C"], Float[Array, "B S E"] | Float[Array, "B S V"]]:
        dit = self.dit
        batch = video.shape[0]
        for name, arr, shape in (("tau_v", tau_v, (batch,)), ("tau_t", tau_t, (batch,)),
                                 ("text", text, (batch, *text.shape[1:])), ("context", context,
                                                                           (batch, *context.shape[1:]))):
            if tuple(arr.shape) != shape:
                raise ValueError(f"{name} must have batch {batch} (shape {shape}), got {tuple(arr.shape)}")
        n_text = text.shape[1]
        if text_mask is not None and tuple(text_mask.shape) != (batch, n_text):
            raise ValueError(f"text_mask must be [B, S] = {(batch, n_text)}, got {tuple(text_mask.shape)}")

        video_tokens, grid = dit.embed_video(video)
        n_video = video_tokens.shape[1]
        x = jnp.concatenate([video_tokens, self._embed_text(text)], axis=1)  # [B, L + S, D]
        x = sharding.constrain(x, ("act_batch", "act_length", "act_embed"))

        e_v, e0_v = dit.condition_embedder.time(flow.tau_to_wan_timestep(tau_v))  # [B, D], [B, 6, D]
        e_t, e0_t = self.text_time.time(flow.tau_to_wan_timestep(tau_t))
        rope = ((dit.video_rope(grid), True), (self.text_rope(n_text), False))
        kv_mask = None
        if text_mask is not None:
            kv_mask = jnp.concatenate([jnp.ones((batch, n_video), bool), text_mask.astype(bool)], axis=1)

        def block_fn(block, ffn_t, x, context, e0, rope, kv_mask):
            e0_v, e0_t = e0
            mods = [_per_segment(mv, mt, n_video, n_text)
                    for mv, mt in zip(split_modulation(block.scale_shift_table, e0_v[:, None]),
                                      split_modulation(block.scale_shift_table, e0_t[:, None]))]
            shift, scale, gate, c_shift, c_scale, c_gate = mods
            x = block.self_attention(x, shift, scale, gate, rope, kv_mask)
            x = block.cross_attention(x, context)
            # Each modality's slice stays split over `context` (its own even split: the boundary at L need not fall
            # on a shard edge, so XLA moves the few tokens across it), so FFN_v / FFN_t never run replicated.
            per_token = lambda t: sharding.constrain(t, ("act_batch", "act_length", "act_embed"))
            routed = lambda h: per_token(jnp.concatenate([per_token(block.ffn(per_token(h[:, :n_video]))),
                                                          per_token(ffn_t(per_token(h[:, n_video:])))], axis=1))
            x = block.feed_forward(x, c_shift, c_scale, c_gate, ffn=routed)
            return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))

        x = dit.run_blocks(x, dit.embed_context(context), (e0_v, e0_t), rope, kv_mask, block_fn=block_fn,
                           companions=self.ffn_t)
        wan_out = dit.unpatchify(dit.head(x[:, :n_video], e_v), grid)
        video_velocity = flow.wan_velocity_to_paper(wan_out)
        return video_velocity, self.text_head(x[:, n_video:], e_t)


def _per_segment(video_mod: Float[Array, "B 1 D"], text_mod: Float[Array, "B 1 D"], n_video: int,
                 n_text: int) -> Float[Array, "B N D"]:
    """Per-token modulation [B, L + S, D]: the video row for the first L tokens, the text row for the rest.
    (A broadcast-and-concatenate that XLA fuses into its consumer: no [B, L + S, 6, D] tensor is materialised.)"""
    b, _, d = video_mod.shape
    mod = jnp.concatenate([jnp.broadcast_to(video_mod, (b, n_video, d)),
                           jnp.broadcast_to(text_mod, (b, n_text, d))], axis=1)
    # Laid out like the tokens it modulates (left alone, XLA may split D instead and then re-gather it whole).
    return sharding.constrain(mod, ("act_batch", "act_length", "act_embed"))


def text_params(path, _value) -> bool:
    """nnx filter for the params that are *not* the DiT's: FFN_t, the text time path, text in/out, the table.
    `nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, text_params))` trains the text side with the video frozen."""
    return not path or path[0] != "dit"
