"""UMT5Encoder against transformers' UMT5EncoderModel: module by module and end to end, fp32, relative error ≤ 1e-5;
the key mapping, the bucket function, bf16 compute, Wan's context preparation, and the umt5-xxl size."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xla_env import host_device_flags

from uvigu import sharding
from uvigu.models import umt5_keys
from uvigu.models.umt5 import UMT5Config, UMT5Encoder, relative_position_bucket, relative_position_buckets, wan_context

TOL = 1e-5
# bf16 matmuls (8 mantissa bits) through a few layers: measured 0.5–1.2e-2 here (≤ 0.9e-2 with fp32 params).
BF16_TOL = 3e-2

# Tiny architectures that break different assumptions. Each runs sequences longer than max_distance, so the
# log-spaced and the clamped far buckets are both hit.
CONFIGS = {
    # the toy world's preset as is: 4 heads of 8 = d_model, 32 buckets / 128
    "tiny": UMT5Config.preset("tiny"),
    # odd head count, N*K = 21 != d_model = 24, few buckets, short max distance, eps != 1e-6, Python-loop layers
    "odd_heads": UMT5Config.preset("tiny", vocab_size=97, d_model=24, d_kv=7, num_heads=3, d_ff=40, num_layers=3,
                                   relative_attention_num_buckets=16, relative_attention_max_distance=20,
                                   layer_norm_epsilon=1e-5, scan_layers=False),
    # an ungated FFN (`wi`, not wi_0 / wi_1) with ReLU, 5 heads, an odd per-direction bucket count (10 // 2 = 5)
    "ungated": UMT5Config.preset("tiny", vocab_size=50, d_model=16, d_kv=4, num_heads=5, d_ff=24, num_layers=2,
                                 relative_attention_num_buckets=10, relative_attention_max_distance=9,
                                 feed_forward_proj="relu"),
}
# (batch, sequence) and each example's real length (right padding, as umT5's tokenizer pads).
INPUTS = {"tiny": (150, [150, 97, 3]), "odd_heads": (48, [48, 21, 30]), "ungated": (25, [12, 25])}


def hf_config(cfg: UMT5Config, **extra) -> transformers.UMT5Config:
    return transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj=cfg.feed_forward_proj, dropout_rate=0.0, **extra)


def hf_umt5(cfg: UMT5Config, seed: int = 0, dtype=torch.float32):
    """A random transformers UMT5EncoderModel with `cfg`'s architecture; every param re-drawn non-zero: matrices
    ~ N(0, 1/fan_in) (activations stay O(1)), the embedding ~ N(0, 1), bias tables ~ N(0, 1) (so the position bias
    moves the softmax a lot), norm scales ~ 1 + N(0, 0.2²)."""
    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(hf_config(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                p.copy_(torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * p.shape[1] ** -0.5)
    return model.to(dtype).eval()


def inputs(cfg: UMT5Config, name: str, seed: int = 0):
    seq, lengths = INPUTS[name]
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (len(lengths), seq))
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)  # pad id 0, as umT5's tokenizer
    return ids, mask


def hf_forward(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return out.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    name = request.param
    cfg = CONFIGS[name]
    ref = hf_umt5(cfg, seed=sum(map(ord, name)))
    ours = umt5_keys.model_from_params(cfg, umt5_keys.hf_to_params(ref.state_dict(), cfg))
    return name, cfg, ref, ours


# ----------------------------------------------------------------------------------------------------------------------
# End to end and module by module.
# ----------------------------------------------------------------------------------------------------------------------


def test_end_to_end(case):
    name, cfg, ref, ours = case
    ids, mask = inputs(cfg, name)
    want = hf_forward(ref, ids, mask)
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == (*ids.shape, cfg.d_model) and got.dtype == np.float32
    # transformers' padded positions are not garbage: padded queries attend to the real keys like any other, so they
    # are compared too (and Wan zeroes them afterwards anyway, see wan_context).
    assert np.isfinite(want).all()
    assert rel_err(got, want) <= TOL, f"{name}: end-to-end rel err {rel_err(got, want):.2e}"
    valid = mask.astype(bool)
    assert rel_err(got[valid], want[valid]) <= TOL


def test_no_mask_is_all_ones(case):
    name, cfg, ref, ours = case
    ids, _ = inputs(cfg, name)
    ones = np.ones_like(ids)
    got = np.asarray(_forward(ours, jnp.asarray(ids), None))
    assert rel_err(got, hf_forward(ref, ids, ones)) <= TOL
    np.testing.assert_array_equal(got, np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(ones))))


@nnx.jit
def _layer_parts(layer, x, buckets, kv_mask):
    return {
        "attention_norm": layer.attention_norm(x),
        "attention": layer.attention(x, buckets, kv_mask),
        "ffn_norm": layer.ffn_norm(x),
        "ffn": layer.ffn(x),
        "layer": layer(x, buckets, kv_mask),
        "bias": layer.attention.position_bias(buckets),
    }


def test_modules(case):
    """Norm, attention (with its own bias table), FFN and a whole layer, each on the same random input."""
    name, cfg, ref, ours = case
    looped = ours if not cfg.scan_layers else umt5_keys.model_from_params(
        dataclasses.replace(cfg, scan_layers=False), umt5_keys.state_to_flat_params(ours))
    ids, mask = inputs(cfg, name, seed=1)
    b, s = ids.shape
    x = np.random.default_rng(2).standard_normal((b, s, cfg.d_model)).astype(np.float32) * 3.0
    additive = np.where(mask[:, None, None, :] == 1, 0.0, np.finfo(np.float32).min).astype(np.float32)
    xt, mt = torch.from_numpy(x), torch.from_numpy(additive)
    buckets = relative_position_buckets(s, s, num_buckets=cfg.relative_attention_num_buckets,
                                        max_distance=cfg.relative_attention_max_distance)
    kv_mask = jnp.asarray(mask.astype(bool))
    for i in range(cfg.num_layers):
        hf_layer, layer = ref.encoder.block[i], looped.blocks[i]
        with torch.no_grad():
            want = {
                "attention_norm": hf_layer.layer[0].layer_norm(xt),
                "attention": hf_layer.layer[0].SelfAttention(xt, attention_mask=mt)[0],
                "ffn_norm": hf_layer.layer[1].layer_norm(xt),
                "ffn": hf_layer.layer[1].DenseReluDense(xt),
                "layer": hf_layer(xt, attention_mask=mt),
            }
        got = _layer_parts(layer, jnp.asarray(x), jnp.asarray(buckets), kv_mask)
        for part in want:  # "bias" is compared bitwise below
            err = rel_err(got[part], want[part].numpy())
            assert err <= TOL, f"{name} layer {i} {part}: rel err {err:.2e}"
        # This layer's bias, not layer 0's: umT5 has a table per layer.
        with torch.no_grad():
            bias_want = hf_layer.layer[0].SelfAttention.compute_bias(s, s)[0].numpy()
        np.testing.assert_array_equal(np.asarray(got["bias"]), bias_want)
    with torch.no_grad():
        final_want = ref.encoder.final_layer_norm(xt).numpy()
    assert rel_err(looped.final_norm(jnp.asarray(x)), final_want) <= TOL


def test_scan_and_loop_agree():
    cfg = CONFIGS["tiny"]
    flat = umt5_keys.hf_to_params(hf_umt5(cfg, seed=3).state_dict(), cfg)
    ids, mask = inputs(cfg, "tiny")
    outs = [np.asarray(_forward(umt5_keys.model_from_params(dataclasses.replace(cfg, scan_layers=scan), flat),
                                jnp.asarray(ids), jnp.asarray(mask))) for scan in (True, False)]
    assert rel_err(outs[0], outs[1]) <= 1e-6


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (10, 9), (8, 64), (6, 9), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance, bidirectional):
    """Every distance in [-3000, 3000], including the float32 bucket boundaries (16, 32, 64 for 32 / 128)."""
    hf_cfg = transformers.UMT5Config(d_model=8, d_kv=2, num_heads=2, relative_attention_num_buckets=num_buckets,
                                     relative_attention_max_distance=max_distance, is_decoder=not bidirectional)
    attn = transformers.models.umt5.modeling_umt5.UMT5Attention(hf_cfg, has_relative_attention_bias=True)
    rel = np.arange(-3000, 3001)
    want = attn._relative_position_bucket(torch.from_numpy(rel)).numpy()
    got = relative_position_bucket(rel, num_buckets=num_buckets, max_distance=max_distance,
                                   bidirectional=bidirectional)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < num_buckets


# ----------------------------------------------------------------------------------------------------------------------
# Keys.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_key_round_trip_is_bitwise(name):
    cfg = CONFIGS[name]
    ref = hf_umt5(cfg, seed=5)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert umt5_keys.TIED_KEY in sd  # state_dict() lists the tied embedding under both names
    flat = umt5_keys.hf_to_params(sd, cfg)
    assert {k: v.shape for k, v in flat.items()} == umt5_keys.expected_param_shapes(cfg)
    back = umt5_keys.params_to_hf(flat, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    # through a model, in both layouts
    for scan in (True, False):
        model = umt5_keys.model_from_params(dataclasses.replace(cfg, scan_layers=scan), flat)
        params = umt5_keys.state_to_flat_params(model)
        if not scan:
            params = umt5_keys.stack_blocks(params, cfg.num_layers)
        assert set(params) == set(flat)
        for k in flat:
            assert np.array_equal(np.asarray(params[k]), flat[k]), k
    # saved-file form (shared.weight only) loads, and the full form loads into transformers strictly
    only_shared = umt5_keys.params_to_hf(flat, cfg, tied=False)
    assert umt5_keys.TIED_KEY not in only_shared
    flat2 = umt5_keys.hf_to_params(only_shared, cfg)
    assert all(np.array_equal(flat2[k], flat[k]) for k in flat)
    fresh = transformers.UMT5EncoderModel(hf_config(cfg))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    ids, mask = inputs(cfg, name)
    np.testing.assert_array_equal(hf_forward(fresh.eval(), ids, mask), hf_forward(ref, ids, mask))


def test_bad_state_dicts_raise_naming_the_key():
    cfg = CONFIGS["odd_heads"]
    sd = {k: v.numpy() for k, v in hf_umt5(cfg).state_dict().items()}

    def raises(d, *needles):
        with pytest.raises(ValueError) as info:
            umt5_keys.hf_to_params(d, cfg)
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))

    k_key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    raises({k: v for k, v in sd.items() if k != k_key}, "missing", k_key)
    raises({**sd, "encoder.block.3.layer.0.layer_norm.weight": sd["encoder.final_layer_norm.weight"]},
           "unexpected", "encoder.block.3.layer.0.layer_norm.weight")
    raises({**sd, "encoder.block.0.layer.1.DenseReluDense.wi.weight": np.zeros((40, 24), np.float32)},
           "unexpected", "DenseReluDense.wi.weight")
    q_key = "encoder.block.2.layer.0.SelfAttention.q.weight"
    raises({**sd, q_key: sd[q_key].T}, "mis-shaped", q_key, "expected (21, 24), got (24, 21)")
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    raises({**sd, bias_key: np.zeros((32, 3), np.float32)}, "mis-shaped", bias_key)
    raises({k: v for k, v in sd.items() if k not in (umt5_keys.SHARED_KEY, umt5_keys.TIED_KEY)},
           "missing", umt5_keys.SHARED_KEY)
    raises({**sd, umt5_keys.TIED_KEY: sd[umt5_keys.TIED_KEY] + 1.0}, umt5_keys.SHARED_KEY, umt5_keys.TIED_KEY)
    # either name of the tied embedding alone is enough
    only_tied = {k: v for k, v in sd.items() if k != umt5_keys.SHARED_KEY}
    np.testing.assert_array_equal(umt5_keys.hf_to_params(only_tied, cfg)["embed_tokens.embedding"],
                                  sd[umt5_keys.SHARED_KEY])
    with pytest.raises(ValueError, match="blocks.attention.q.kernel"):
        flat = umt5_keys.hf_to_params(sd, cfg)
        flat["blocks.attention.q.kernel"] = flat["blocks.attention.q.kernel"][:, :, :-1]
        umt5_keys.model_from_params(cfg, flat)


def test_original_wan_names_round_trip():
    """Wan2.1's own T5 names (read off its module code) map one to one onto transformers' names."""
    cfg = UMT5Config.preset("umt5-xxl", num_layers=2)
    hf_keys = set(umt5_keys.expected_hf_shapes(cfg))
    original = {umt5_keys.hf_to_original_key(k) for k in hf_keys}
    assert len(original) == len(hf_keys)
    assert {umt5_keys.original_to_hf_key(k) for k in original} == hf_keys
    assert umt5_keys.original_to_hf_key("blocks.1.ffn.gate.0.weight").endswith("DenseReluDense.wi_0.weight")
    with pytest.raises(KeyError, match="blocks.0.attn.bogus.weight"):
        umt5_keys.original_to_hf_key("blocks.0.attn.bogus.weight")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_infer_config(name):
    cfg = CONFIGS[name]
    shapes = {k: tuple(v.shape) for k, v in hf_umt5(cfg).state_dict().items()}
    known = dict(relative_attention_max_distance=cfg.relative_attention_max_distance,
                 layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj=cfg.feed_forward_proj,
                 scan_layers=cfg.scan_layers)
    inferred, notes = umt5_keys.infer_config(shapes, **known)
    assert inferred == cfg
    assert any("num_heads" in n for n in notes)
    bare, notes = umt5_keys.infer_config(shapes)
    assert bare.feed_forward_proj == ("gated-gelu" if cfg.is_gated else "relu")
    assert any("relative_attention_max_distance=128 assumed" in n for n in notes)
    with pytest.raises(ValueError, match="d_ff"):
        umt5_keys.infer_config(shapes, d_ff=cfg.d_ff + 1)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        umt5_keys.infer_config(shapes, feed_forward_proj="relu" if cfg.is_gated else "gated-gelu")


def test_config_from_hf():
    for name, cfg in CONFIGS.items():
        assert umt5_keys.config_from_hf(hf_config(cfg).to_dict(), scan_layers=cfg.scan_layers) == cfg, name
    with pytest.raises(ValueError, match="model_type"):
        umt5_keys.config_from_hf(transformers.T5Config().to_dict())


# ----------------------------------------------------------------------------------------------------------------------
# bf16, Wan's context, sizes, config checks.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_is_close(param_dtype):
    """bf16 matmuls (norms, softmax, position bias and the residual stream stay float32) against transformers fp32."""
    errs = {}
    for name in ("tiny", "odd_heads"):
        cfg = CONFIGS[name]
        ref = hf_umt5(cfg, seed=7)
        ids, mask = inputs(cfg, name)
        flat = umt5_keys.hf_to_params(ref.state_dict(), cfg)
        model = umt5_keys.model_from_params(dataclasses.replace(cfg, dtype="bfloat16", param_dtype=param_dtype), flat)
        got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
        assert got.dtype == np.float32
        errs[name] = rel_err(got, hf_forward(ref, ids, mask))
    assert max(errs.values()) <= BF16_TOL, errs
    assert min(errs.values()) > 1e-4, errs  # it did run in bf16


def _wan_reference(emb: np.ndarray, mask: np.ndarray, text_len: int) -> np.ndarray:
    """Wan's recipe written out: u[:seq_len] per prompt, then zero rows up to text_len."""
    out = []
    for u, v in zip(emb, mask.sum(axis=1)):
        u = u[:v][:text_len]
        out.append(np.concatenate([u, np.zeros((text_len - len(u), u.shape[1]), u.dtype)]))
    return np.stack(out)


def test_wan_context():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, 10, 6)).astype(np.float32) + 1.0  # no zeros to begin with
    lengths = np.array([10, 4, 0, 7])
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    for text_len in (16, 10, 6):  # pad, exact, truncate
        got = np.asarray(jax.jit(wan_context, static_argnums=2)(jnp.asarray(emb), jnp.asarray(mask), text_len))
        assert got.shape == (4, text_len, 6) and got.dtype == np.float32
        np.testing.assert_array_equal(got, _wan_reference(emb, mask, text_len))
        for b, n in enumerate(lengths):
            assert not got[b, n:].any()
            np.testing.assert_array_equal(got[b, : min(n, text_len)], emb[b, : min(n, text_len)])
    # a boolean mask works the same; a mask with a hole is counted, not followed (Wan keeps the first sum(mask) rows)
    np.testing.assert_array_equal(np.asarray(wan_context(jnp.asarray(emb), jnp.asarray(mask.astype(bool)), 12)),
                                  _wan_reference(emb, mask, 12))
    holey = np.array([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0]] * 4)
    got = np.asarray(wan_context(jnp.asarray(emb), jnp.asarray(holey), 12))
    np.testing.assert_array_equal(got[:, :2], emb[:, :2])
    assert not got[:, 2:].any()
    with pytest.raises(ValueError, match="mask"):
        wan_context(jnp.asarray(emb), jnp.asarray(mask[:, :5]), 12)


def test_umt5_xxl_size_matches_transformers():
    """Param count of the preset (jax.eval_shape: nothing allocated) equals transformers' UMT5EncoderModel built on
    the meta device for the same config, and every tensor of that model has the shape our mapping expects."""
    cfg = UMT5Config.preset("umt5-xxl")
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (
        256384, 4096, 64, 64, 10240, 24)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.layer_norm_epsilon,
            cfg.feed_forward_proj, cfg.activation_name) == (32, 128, 1e-6, "gated-gelu", "gelu_new")
    with torch.device("meta"):
        hf = transformers.UMT5EncoderModel(hf_config(cfg))
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied embedding counted once
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == hf_count == 5_680_910_336
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == umt5_keys.expected_hf_shapes(cfg, tied=True)
    assert {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))} \
        == umt5_keys.expected_param_shapes(cfg)


def test_params_carry_logical_axes():
    """Every param is tagged with names the sharding rules know; the big ones shard on an fsdp x tensor mesh."""
    mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
    abstract = nnx.eval_shape(lambda: UMT5Encoder(UMT5Config.preset("umt5-xxl"), rngs=nnx.Rngs(0)))
    specs = {path: spec for path, _, names, spec in sharding.explain_shardings(nnx.state(abstract, nnx.Param), mesh)
             if names is not None}
    assert len(specs) == len(umt5_keys.expected_param_shapes(UMT5Config.preset("umt5-xxl")))
    P = jax.sharding.PartitionSpec
    assert specs["embed_tokens.embedding"] == P("tensor", "fsdp")
    assert specs["blocks.attention.q.kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks.attention.o.kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks.ffn.wi_0.kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks.ffn.wo.kernel"] == P(None, "tensor", "fsdp")


def test_config_validation():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        UMT5Config.preset("tiny", feed_forward_proj="gated-swish")
    with pytest.raises(ValueError, match="num_buckets"):
        UMT5Config.preset("tiny", relative_attention_num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        UMT5Config.preset("tiny", relative_attention_num_buckets=32, relative_attention_max_distance=8)
    with pytest.raises(ValueError, match="dtype"):
        UMT5Config.preset("tiny", dtype="float64")
    with pytest.raises(KeyError, match="umt5-xxl"):
        UMT5Config.preset("umt5-xl")
    cfg = UMT5Config.preset("tiny", feed_forward_proj="gated-silu")
    assert cfg.is_gated and cfg.activation_name == "silu"
    assert UMT5Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        UMT5Config.from_dict({**cfg.to_dict(), "bogus": 1})
    model = nnx.eval_shape(lambda: UMT5Encoder(UMT5Config.preset("tiny"), rngs=nnx.Rngs(0)))  # inputs checked first
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="mask"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5)))


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from uvigu import sharding
from uvigu.models.umt5 import UMT5Config, UMT5Encoder
make = lambda: UMT5Encoder(UMT5Config.preset("tiny"), rngs=nnx.Rngs(0))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (8, 40)))
mask = (jnp.arange(40)[None] < jnp.arange(8, 48, 5)[:, None]).astype(jnp.int32)
run = nnx.jit(lambda m, i, k: m(i, k))
want = np.asarray(run(make(), ids, mask))
for shape in ({"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 4}):
    mesh = sharding.make_mesh(shape)
    model = sharding.sharded_init(make, mesh)
    with jax.set_mesh(mesh):
        got = np.asarray(run(model, ids, mask))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-6, (shape, err)
print("ok")
"""


@pytest.mark.slow
def test_runs_sharded_on_8_fake_devices():
    """The same numbers (up to reduction order) on an fsdp x tensor and a data x fsdp mesh of 8 CPU devices."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": host_device_flags(8)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
