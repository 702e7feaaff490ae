"""The Wan2.1 text-to-video diffusion transformer in Flax NNX, exact to diffusers' `WanTransformer3DModel`.

Param paths follow diffusers' layout (attn1 / attn2 / to_q / ... / scale_shift_table / proj_out) so that converting
a diffusers checkpoint is a rename plus kernel transposes; with `scan_layers` the blocks are stacked along a leading
'layers' axis (`blocks.attn1.to_q.kernel` is [num_layers, D, D]). Note the one trap in naming: the affine LayerNorm
before cross-attention is `norm2` here and in diffusers, `norm3` in the original Wan release.

Shape letters: B batch, T/H/W latent frames/height/width (before patching), C latent channels, L video tokens,
S context tokens, D model dim, F ffn dim, N heads, K head dim, G text encoder dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from uvigu import sharding
from uvigu.models import layers
from uvigu.models.model_config import ModelConfig

# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanConfig(ModelConfig):
    """Architecture of a Wan2.1 T2V DiT plus how to execute it (dtypes, layer stacking, remat, attention backend).

    The execution fields do not change the weights: a checkpoint converted once loads with any of them.
    """

    # --- architecture ---
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    text_len: int = 512  # the context length the pretrained model saw (zero-padded umT5 output)
    rope_max_positions: int = 1024
    rope_theta: float = 10000.0
    # --- execution ---
    dtype: str = "float32"  # compute dtype of matmuls and attention; norms, time path and modulation stay float32
    param_dtype: str = "float32"  # storage dtype of params
    scan_layers: bool = True  # stack blocks and run them with nnx.scan (fast compile); False = a Python loop
    remat_policy: str = "none"  # none | full | dots | names  (see layers.REMAT_POLICIES)
    attention_backend: str = "xla"  # xla | cudnn

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or (self.head_dim - 4 * (self.head_dim // 6)) % 2:
            raise ValueError(f"WanConfig: head dim {self.head_dim} does not split into even 3-D RoPE bands")
        self.check_dtypes()
        if self.attention_backend not in layers.ATTENTION_BACKENDS:
            raise ValueError(
                f"WanConfig.attention_backend={self.attention_backend!r} is not one of {layers.ATTENTION_BACKENDS}"
            )
        if self.remat_policy != "none" and self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(
                f"WanConfig.remat_policy={self.remat_policy!r} is not one of {('none', *layers.REMAT_POLICIES)}"
            )
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"WanConfig.patch_size must have 3 entries (t, h, w), got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


PRESETS: dict[str, WanConfig] = {
    # Small enough for unit tests on a CPU; odd shapes on purpose (3 heads, head dim 16, in != out channels elsewhere).
    "tiny": WanConfig(dim=48, ffn_dim=96, num_heads=3, num_layers=2, in_channels=16, out_channels=16, text_dim=32,
                      freq_dim=32, text_len=16),
    "wan2.1-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
WanConfig.PRESETS = PRESETS


# ----------------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------------


def layer_stack(make_layer, num_layers: int, stacked: bool, rngs: nnx.Rngs):
    """`num_layers` layers from `make_layer(rngs)`: one module with params stacked on a leading 'layers' axis (for
    nnx.scan) or an nnx.List of separate layers.

    Both draw layer i's params from the same i-th forked key, so `scan_layers` stays an execution choice: a looped
    model starts from exactly the params of the stacked one, sliced."""
    forked = rngs.fork(split=num_layers)
    if stacked:
        make = nnx.vmap(make_layer, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        return make(forked)
    graphdef, streams = nnx.split(forked)
    return nnx.List([make_layer(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], streams)))
                     for i in range(num_layers)])


# ----------------------------------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------------------------------


class WanAttention(nnx.Module):
    """Multi-head attention with Wan's q/k RMSNorm over the whole model dim (across heads)."""

    def __init__(self, dim: int, num_heads: int, *, eps: float, dtype, param_dtype, backend: str, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.backend = backend
        proj = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = layers.dense(dim, dim, ("embed", "heads"), **proj)
        self.to_k = layers.dense(dim, dim, ("embed", "heads"), **proj)
        self.to_v = layers.dense(dim, dim, ("embed", "heads"), **proj)
        self.to_out = layers.dense(dim, dim, ("heads", "embed"), **proj)
        self.norm_q = layers.RMSNorm(dim, eps=eps, param_dtype=param_dtype)
        self.norm_k = layers.RMSNorm(dim, eps=eps, param_dtype=param_dtype)

    def __call__(
        self,
        x: Float[Array, "B L D"],
        kv_input: Float[Array, "B M D"] | None = None,
        rope: tuple[Array, Array] | tuple[tuple[Array, Array], ...] | None = None,
        kv_mask: Array | None = None,
    ) -> Float[Array, "B L D"]:
        """Self-attention when `kv_input` is None (then `rope` rotates q and k), else cross-attention to `kv_input`.

        `rope` is (cos, sin) for all L tokens, or a tuple of ((cos, sin), interleaved) segments that split L in order
        (the unified model rotates video and text tokens differently).
        """
        kv_input = x if kv_input is None else kv_input
        split = lambda t: rearrange(t, "B L (N K) -> B L N K", N=self.num_heads)
        q = split(self.norm_q(self.to_q(x)))
        k = split(self.norm_k(self.to_k(kv_input)))
        v = split(self.to_v(kv_input))
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
        # (the attention constrains q to the sequence split and gathers k / v over `context` itself)
        out = layers.dot_product_attention(q, k, v, kv_mask, backend=self.backend)
        out = layers.tag(rearrange(out, "B L N K -> B L (N K)"), "attention_out")
        return self.to_out(out)


def _rotate(x: Float[Array, "B L N K"], rope) -> Float[Array, "B L N K"]:
    """Applies RoPE: one (cos, sin) pair (interleaved) or consecutive ((cos, sin), interleaved) segments along L."""
    if len(rope) == 2 and not isinstance(rope[0], tuple):
        cos, sin = rope
        return layers.apply_rope(x, cos, sin, interleaved=True)
    parts, start = [], 0
    for (cos, sin), interleaved in rope:
        n = cos.shape[0]
        parts.append(layers.apply_rope(x[:, start : start + n], cos, sin, interleaved=interleaved))
        start += n
    if start != x.shape[1]:
        raise ValueError(f"RoPE segments cover {start} tokens, the sequence has {x.shape[1]}")
    return jnp.concatenate(parts, axis=1)


class WanFeedForward(nnx.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        proj = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = layers.dense(dim, hidden_dim, ("embed", "mlp"), **proj)
        self.proj_out = layers.dense(hidden_dim, dim, ("mlp", "embed"), **proj)

    def __call__(self, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        h = layers.gelu_tanh(self.proj_in(x))
        h = sharding.constrain(layers.tag(h, "ffn_hidden"), ("act_batch", "act_length", "act_mlp"))
        return self.proj_out(h)


def _modulation_table(rows: int, dim: int, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
    # Learned offsets added to the time projection; randn / sqrt(D) as in Wan's init.
    init = jax.random.normal(rngs.params(), (1, rows, dim), jnp.float32) / math.sqrt(dim)
    return nnx.Param(init.astype(param_dtype), out_sharding=(None, "modulation", "embed"))


def split_modulation(table: nnx.Param, e0: Float[Array, "B #L R D"]) -> list[Float[Array, "B #L D"]]:
    """table [1, R, D] + e0 [B, L or 1, R, D] (float32) -> R arrays [B, L or 1, D]."""
    mod = table[...].astype(jnp.float32)[:, None] + e0.astype(jnp.float32)
    return [mod[:, :, i] for i in range(mod.shape[2])]


class WanBlock(nnx.Module):
    """One DiT block: modulated self-attention, (unmodulated) cross-attention to the text, modulated FFN.

    The three stages are separate methods so the unified model can run them with its own FFNs (composition).
    The residual stream stays float32 (the reference's modulated residual adds are float32); matmuls run in `dtype`.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        eps: float,
        cross_attn_norm: bool,
        dtype,
        param_dtype,
        attention_backend: str,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        attn = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, backend=attention_backend, rngs=rngs)
        self.attn1 = WanAttention(dim, num_heads, **attn)
        # The affine norm before cross-attention: `norm2` in diffusers, `norm3` in the original release.
        self.norm2 = layers.AffineLayerNorm(dim, eps=eps, param_dtype=param_dtype) if cross_attn_norm else None
        self.attn2 = WanAttention(dim, num_heads, **attn)
        self.ffn = WanFeedForward(dim, ffn_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale_shift_table = _modulation_table(6, dim, param_dtype, rngs)

    def self_attention(self, x, shift, scale, gate, rope, kv_mask=None):
        h = layers.modulate(layers.layer_norm_fp32(x, self.eps), shift, scale).astype(self.dtype)
        return x + self.attn1(h, rope=rope, kv_mask=kv_mask).astype(jnp.float32) * gate

    def cross_attention(self, x, context):
        h = x if self.norm2 is None else self.norm2(x)
        return x + self.attn2(h.astype(self.dtype), kv_input=context).astype(jnp.float32)

    def feed_forward(self, x, shift, scale, gate, ffn=None):
        h = layers.modulate(layers.layer_norm_fp32(x, self.eps), shift, scale).astype(self.dtype)
        return x + (self.ffn if ffn is None else ffn)(h).astype(jnp.float32) * gate

    def __call__(
        self,
        x: Float[Array, "B L D"],
        context: Float[Array, "B S D"],
        e0: Float[Array, "B #L 6 D"],
        rope,
        kv_mask: Array | None = None,
    ) -> Float[Array, "B L D"]:
        shift, scale, gate, c_shift, c_scale, c_gate = split_modulation(self.scale_shift_table, e0)
        x = self.self_attention(x, shift, scale, gate, rope, kv_mask)
        x = self.cross_attention(x, context)
        x = self.feed_forward(x, c_shift, c_scale, c_gate)
        return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))


class PatchEmbed(nnx.Module):
    """Non-overlapping (pt, ph, pw) patches -> D, the channels-last equivalent of Wan's strided Conv3d."""

    def __init__(self, patch_size, in_channels: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch_size = tuple(patch_size)
        self.dtype = dtype
        fan_in = math.prod(patch_size) * in_channels
        init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(
            init(rngs.params(), (*patch_size, in_channels, dim), param_dtype),
            out_sharding=("patch", "patch", "patch", "patch", "embed"),
        )
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = nnx.Param(
            jax.random.uniform(rngs.params(), (dim,), param_dtype, -bound, bound), out_sharding=("embed",)
        )

    def __call__(self, x: Float[Array, "B T H W C"]) -> Float[Array, "B t h w D"]:
        pt, ph, pw = self.patch_size
        patches = rearrange(x, "B (t p) (h q) (w r) C -> B t h w p q r C", p=pt, q=ph, r=pw).astype(self.dtype)
        y = jnp.einsum("BthwpqrC,pqrCD->BthwD", patches, self.kernel[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class TimeEmbedding(nnx.Module):
    """Wan's time path: sinusoid -> Linear -> SiLU -> Linear = e; SiLU -> Linear(D, 6D) = e0. Float32 throughout,
    as in the reference. The unified model holds a second one for text tokens."""

    def __init__(self, dim: int, freq_dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        fp32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.time_embedder = nnx.Dict(
            linear_1=layers.dense(freq_dim, dim, ("freq", "embed"), **fp32),
            linear_2=layers.dense(dim, dim, (None, "embed"), **fp32),
        )
        self.time_proj = layers.dense(dim, 6 * dim, (None, "embed"), **fp32)

    def time(self, timestep: Float[Array, "*B"]) -> tuple[Float[Array, "*B D"], Float[Array, "*B 6 D"]]:
        """Wan-unit timesteps [B] (or per token [B, L]) -> (e [.., D], e0 [.., 6, D]), both float32."""
        feats = layers.sinusoidal_embedding(timestep, self.freq_dim)
        e = self.time_embedder["linear_2"](jax.nn.silu(self.time_embedder["linear_1"](feats)))
        e0 = self.time_proj(jax.nn.silu(e))
        return e, rearrange(e0, "... (R D) -> ... R D", R=6)


class TimeTextEmbedding(TimeEmbedding):
    """The time path plus the text path (Linear -> GELU(tanh) -> Linear): diffusers' `condition_embedder`."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(dim, freq_dim, param_dtype=param_dtype, rngs=rngs)
        text = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_embedder = nnx.Dict(
            linear_1=layers.dense(text_dim, dim, ("text_embed", "embed"), **text),
            linear_2=layers.dense(dim, dim, (None, "embed"), **text),
        )

    def text(self, context: Float[Array, "B S G"]) -> Float[Array, "B S D"]:
        h = layers.gelu_tanh(self.text_embedder["linear_1"](context))
        return self.text_embedder["linear_2"](h)


class WanDiT(nnx.Module):
    """Wan2.1 T2V DiT.

    `__call__(x, timestep, context)`: x [B, T, H, W, C] channels-last latents, timestep [B] in Wan units (σ·1000,
    1000 = pure noise) or [B, L] per video token (diffusers' Wan2.2 TI2V form; tokens in (t h w) order), context
    [B, S, text_dim] umT5 embeddings -> [B, T, H, W, C_out] float32, Wan's raw prediction (noise − data). The pretrained model saw context zero-padded to `text_len` tokens (the pipeline's job).
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dt = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype)
        self.patch_embedding = PatchEmbed(c.patch_size, c.in_channels, c.dim, **dt, rngs=rngs)
        self.condition_embedder = TimeTextEmbedding(c.dim, c.freq_dim, c.text_dim, **dt, rngs=rngs)

        def make_block(rngs: nnx.Rngs) -> WanBlock:
            return WanBlock(
                c.dim, c.ffn_dim, c.num_heads, eps=c.eps, cross_attn_norm=c.cross_attn_norm,
                attention_backend=c.attention_backend, **dt, rngs=rngs,
            )

        self.blocks = layer_stack(make_block, c.num_layers, c.scan_layers, rngs)

        self.scale_shift_table = _modulation_table(2, c.dim, c.storage_dtype, rngs)
        head_out = c.out_channels * math.prod(c.patch_size)
        # Zero-init output head (Wan's own init): a fresh model predicts 0.
        self.proj_out = layers.dense(c.dim, head_out, ("embed", None), **dt, rngs=rngs,
                                     kernel_init=nnx.initializers.zeros_init())

    # -- pieces the unified model composes -----------------------------------------------------------------------------

    def embed_video(self, x: Float[Array, "B T H W C"]) -> tuple[Float[Array, "B L D"], tuple[int, int, int]]:
        """Patchify and embed: tokens [B, L, D] float32 in (t, h, w) order, and the token grid (t, h, w)."""
        c = self.config
        if x.ndim != 5 or x.shape[-1] != c.in_channels:
            raise ValueError(f"x must be [B, T, H, W, C={c.in_channels}] latents (channels last), got {x.shape}")
        if any(n % p for n, p in zip(x.shape[1:4], c.patch_size)):
            raise ValueError(f"latent (T, H, W) = {x.shape[1:4]} is not divisible by patch size {c.patch_size}")
        y = self.patch_embedding(x)
        grid = y.shape[1:4]
        tokens = rearrange(y, "B t h w D -> B (t h w) D").astype(jnp.float32)
        return sharding.constrain(tokens, ("act_batch", "act_length", "act_embed")), grid

    def video_rope(self, grid: tuple[int, int, int]) -> tuple[Array, Array]:
        c = self.config
        return layers.wan_rope_3d(c.head_dim, grid, max_positions=c.rope_max_positions, theta=c.rope_theta)

    def embed_context(self, context: Float[Array, "B S G"]) -> Float[Array, "B S D"]:
        if context.ndim != 3 or context.shape[-1] != self.config.text_dim:
            raise ValueError(f"context must be [B, S, text_dim={self.config.text_dim}], got {context.shape}")
        return self.condition_embedder.text(context.astype(self.config.compute_dtype))

    def run_blocks(self, x: Float[Array, "B L D"], context, e0, rope, kv_mask=None, *, block_fn=None,
                   companions=None) -> Float[Array, "B L D"]:
        """Runs every block, stacked under nnx.scan or in a loop.

        `block_fn(block, companion, x, context, e0, rope, kv_mask)` replaces a block's own call; `companions` is a
        per-layer module laid out like `self.blocks` (stacked or a list) and walked alongside it. The unified model
        routes its text FFNs through these two; WanDiT alone uses neither.
        """
        c = self.config
        if block_fn is None:
            def block_fn(block, _, x, context, e0, rope, kv_mask):
                return block(x, context, e0, rope, kv_mask)
        # rope is closed over, not passed through remat: it may hold static structure (the unified model's per-segment
        # interleaving flags) that remat would turn into tracers.
        call = layers.remat_block_fn(
            lambda block, companion, x, context, e0, kv_mask: block_fn(block, companion, x, context, e0, rope, kv_mask),
            c.remat_policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            def body(x, block, companion):
                return call(block, companion, x, context, e0, kv_mask)

            scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0 if companions is not None else None),
                            out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(x, self.blocks, companions)
        for i, block in enumerate(self.blocks):
            x = call(block, None if companions is None else companions[i], x, context, e0, kv_mask)
        return x

    def head(self, x: Float[Array, "B L D"], e: Float[Array, "B #L D"]) -> Float[Array, "B L P"]:
        """Output norm, (1, 2, D) modulation by e (not e0), projection to out_channels * prod(patch)."""
        e = e if e.ndim == 3 else e[:, None]
        shift, scale = split_modulation(self.scale_shift_table, e[:, :, None])
        h = layers.modulate(layers.layer_norm_fp32(x, self.config.eps), shift, scale)
        return self.proj_out(h.astype(self.config.compute_dtype)).astype(jnp.float32)

    def unpatchify(self, y: Float[Array, "B L P"], grid: tuple[int, int, int]) -> Float[Array, "B T H W C"]:
        pt, ph, pw = self.config.patch_size
        t, h, w = grid
        return rearrange(y, "B (t h w) (p q r C) -> B (t p) (h q) (w r) C", t=t, h=h, w=w, p=pt, q=ph, r=pw)

    # -- the public call -----------------------------------------------------------------------------------------------

    def __call__(
        self,
        x: Float[Array, "B T H W C"],
        timestep: Float[Array, "B"] | Float[Array, "B L"],
        context: Float[Array, "B S G"],
    ) -> Float[Array, "B T H W C"]:
        tokens, grid = self.embed_video(x)
        if timestep.shape not in ((x.shape[0],), tokens.shape[:2]):
            raise ValueError(f"timestep must be [B={x.shape[0]}] or [B, L={tokens.shape[1]}] in Wan units, got "
                             f"{timestep.shape}")
        e, e0 = self.condition_embedder.time(timestep)
        e0 = e0 if timestep.ndim == 2 else e0[:, None]  # [B, L or 1, 6, D]
        h = self.run_blocks(tokens, self.embed_context(context), e0, self.video_rope(grid))
        return self.unpatchify(self.head(h, e), grid)
