"""The tiny DiT on 8 fake CPU devices: sharded init, every large param really sharded, same numbers as 1 device.

The multi-device part runs in a subprocess because the fake device count must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from xla_env import host_device_flags

from uvigu import sharding

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from uvigu import sharding
    from uvigu.models import wan_keys
    from uvigu.models.wan import WanConfig, WanDiT

    assert jax.device_count() == 8, jax.devices()
    cases = json.loads(sys.argv[1])
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 3, 4, 6, 16)), jnp.float32)
    t = jnp.asarray(np.linspace(5, 995, 8), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((8, 5, 32)), jnp.float32)
    # Random non-zero params (the fresh init zeroes the head, which would make every output equal).
    shapes = wan_keys.expected_param_shapes(WanConfig.preset("tiny"))
    flat = {k: rng.standard_normal(s).astype(np.float32) * 0.2 for k, s in shapes.items()}
    one_device = {}
    results = {}

    def describe(model):
        out = {}
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            arr = v[...]
            out[".".join(map(str, path))] = dict(
                shape=list(arr.shape), spec=[list(a) if isinstance(a, tuple) else a for a in arr.sharding.spec],
                shard=list(arr.addressable_shards[0].data.shape))
        return out

    for scan, shape in cases:
        cfg = WanConfig.preset("tiny", scan_layers=scan)
        if scan not in one_device:
            one_device[scan] = np.asarray(forward(wan_keys.model_from_params(cfg, flat), x, t, ctx))
        mesh = sharding.make_mesh(shape)
        model = wan_keys.model_from_params(cfg, flat)
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
        data = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
        with jax.set_mesh(mesh):
            out = forward(model, jax.device_put(x, data), t, jax.device_put(ctx, data))
        results[json.dumps([scan, shape])] = dict(
            specs=describe(model), max_abs_diff=float(np.max(np.abs(np.asarray(out) - one_device[scan]))),
            scale=float(np.max(np.abs(one_device[scan]))), out_spec=str(out.sharding.spec))

    # Sharded init from scratch: params are born in their shards, with the values a 1-device init gives.
    cfg = WanConfig.preset("tiny")
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    fresh = sharding.sharded_init(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)), mesh)
    # (compared with a jitted 1-device init: eager init differs by 1 ulp where XLA folds randn / sqrt(D))
    plain = wan_keys.state_to_flat_params(nnx.jit(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))())
    fresh_flat = wan_keys.state_to_flat_params(fresh)
    results["sharded_init"] = dict(
        specs=describe(fresh),
        max_abs_diff=max(float(np.max(np.abs(np.asarray(fresh_flat[k]) - np.asarray(v)))) for k, v in plain.items()))
    print("RESULTS" + json.dumps(results))
    """
)

CASES = [(True, {"fsdp": 4, "tensor": 2}), (True, {"fsdp": 2, "tensor": 4}),
         (True, {"data": 2, "fsdp": 2, "tensor": 2}), (False, {"fsdp": 4, "tensor": 2})]


@pytest.fixture(scope="module")
def eight_device_results():
    env = dict(os.environ, XLA_FLAGS=host_device_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def _check_specs(specs: dict, mesh_shape: dict, scan_layers: bool):
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 1, **mesh_shape}
    large = 0
    for path, s in specs.items():
        # Every sharded dim divides its mesh axes, and the shard shape says the data really is split.
        for dim, (n, axes) in enumerate(zip(s["shape"], s["spec"] + [None] * len(s["shape"]))):
            axes = [] if axes is None else ([axes] if isinstance(axes, str) else axes)
            parts = 1
            for a in axes:
                parts *= sizes[a]
            assert n % parts == 0, (path, s)
            assert s["shard"][dim] == n // parts, (path, s)
        # "Large" params (every matrix and stacked table) must be split somewhere when the mesh splits params.
        if len(s["shape"]) - int(scan_layers and path.startswith("blocks.")) >= 2 and max(s["shape"]) >= 48:
            large += 1
            assert any(a is not None for a in s["spec"]), (path, s)
    assert large >= 10


@pytest.mark.parametrize("scan_layers,mesh_shape", CASES,
                         ids=lambda c: c if isinstance(c, bool) else "x".join(f"{k}{v}" for k, v in c.items()))
def test_eight_devices_match_one(eight_device_results, scan_layers, mesh_shape):
    r = eight_device_results[json.dumps([scan_layers, mesh_shape])]
    assert r["max_abs_diff"] <= 1e-5 * max(r["scale"], 1.0), r["max_abs_diff"]
    _check_specs(r["specs"], mesh_shape, scan_layers)


def test_sharded_init_is_born_sharded_with_single_device_values(eight_device_results):
    r = eight_device_results["sharded_init"]
    _check_specs(r["specs"], {"fsdp": 4, "tensor": 2}, True)
    assert r["max_abs_diff"] == 0.0


def test_tensor_axis_splits_heads_and_mlp(eight_device_results):
    specs = eight_device_results[json.dumps([True, {"fsdp": 4, "tensor": 2}])]["specs"]
    assert specs["blocks.attn1.to_q.kernel"]["spec"] == [None, "fsdp", "tensor"]
    assert specs["blocks.attn1.to_out.kernel"]["spec"] == [None, "tensor", "fsdp"]
    assert specs["blocks.ffn.proj_in.kernel"]["spec"] == [None, "fsdp", "tensor"]
    assert specs["condition_embedder.text_embedder.linear_1.kernel"]["spec"] == [None, "fsdp"]


# ----------------------------------------------------------------------------------------------------------------------
# The rules table itself (no devices needed: abstract meshes).
# ----------------------------------------------------------------------------------------------------------------------


def _abstract(shape: dict[str, int]):
    sizes = {a: shape.get(a, 1) for a in sharding.MESH_AXES}
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


def test_resolve_spec_maps_and_replicates_what_does_not_divide():
    mesh = _abstract({"fsdp": 4, "tensor": 2})
    assert sharding.resolve_spec(("embed", "mlp"), (1536, 8960), mesh) == P("fsdp", "tensor")
    assert sharding.resolve_spec(("embed", "mlp"), (1538, 8960), mesh) == P(None, "tensor")  # 1538 % 4 != 0
    assert sharding.resolve_spec(("layers", "embed", "heads"), (30, 1536, 1536), mesh) == P(None, "fsdp", "tensor")
    assert sharding.resolve_spec(("act_batch", "act_length", "act_embed"), (8, 100, 64), mesh) == P("fsdp", None, None)
    # an axis is used once: the second 'embed' dim is replicated
    assert sharding.resolve_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
    # axes of size 1 are dropped, so specs stay minimal on small meshes
    assert sharding.resolve_spec(("embed", "heads"), (64, 64), _abstract({"fsdp": 8})) == P("fsdp", None)


def test_resolve_spec_errors_name_the_axis():
    mesh = _abstract({"fsdp": 2})
    with pytest.raises(KeyError, match="'bogus'"):
        sharding.resolve_spec(("bogus",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match"):
        sharding.resolve_spec(("embed",), (4, 4), mesh)


def test_make_mesh_shapes():
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh({"fsdp": -1}, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2}, devices)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices)
