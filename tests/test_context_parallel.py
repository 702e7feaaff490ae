"""Context parallelism: the token axis split over the `context` mesh axis gives the numbers of one device.

8 fake CPU devices (mesh context 4 x fsdp 2) in a subprocess (the device count must be set before JAX starts). A tiny
WanDiT and a tiny UniViGU (embedding text flow, a text mask with padding, remat "names") with random non-zero params:
forward, parameter gradients of a flow-matching loss and two Adam steps on 8 devices against 1 device, relative error
‖a − b‖ / ‖b‖ per array <= 1e-5. The compiled 8-device HLO must hold the *per-device* attention logits
[B/2, N, L/4, L] (queries split 4 ways, every key present) and no [., N, L, L] block, plus an all-gather: so the
test fails if the sequence is not split. Sizes: video 12 tokens (3 per device); the UniViGU sequence is 12 + 8 = 20
tokens (5 per device), so the video / text boundary falls inside a shard. A 12 + 6 = 18 token sequence does not
divide 4: it must run replicated over `context` with the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from xla_env import host_device_flags

WORKER = textwrap.dedent(
    """
    import json, re, sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from uvigu import flow, sharding
    from uvigu.models.univigu import UniViGU, UniViGUConfig
    from uvigu.models.wan import WanConfig, WanDiT

    assert jax.device_count() == 8, jax.devices()
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    B, N_TEXT = 2, 8
    video = rng.standard_normal((B, 2, 4, 6, 16)).astype(np.float32)  # 2 x 2 x 3 = 12 tokens after 1x2x2 patches
    noise = rng.standard_normal(video.shape).astype(np.float32)
    ctx = rng.standard_normal((B, 5, 32)).astype(np.float32)
    tau_v = np.array([0.3, 0.8], np.float32)
    tau_t = np.array([0.6, 0.1], np.float32)
    ids = rng.integers(0, 50, (B, N_TEXT)).astype(np.int32)
    text_mask = np.ones((B, N_TEXT), bool)
    text_mask[1, 5:] = False  # padding in the second example: the key mask is exercised
    text_noise = rng.standard_normal((B, N_TEXT, 8)).astype(np.float32)

    def randomize(model):
        # Non-zero values everywhere (the fresh init zeroes the output heads, which would hide most of the network).
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.2, a.dtype), state))
        return model

    wan_cfg = WanConfig.preset("tiny")
    wan = randomize(nnx.jit(lambda: WanDiT(wan_cfg, rngs=nnx.Rngs(0)))())
    uni_cfg = WanConfig.preset("tiny", remat_policy="names")
    text_cfg = UniViGUConfig(text_flow="embedding", vocab_size=50, text_latent_dim=8, max_text_len=16)
    uni = randomize(nnx.jit(lambda: UniViGU(WanDiT(uni_cfg, rngs=nnx.Rngs(1)), text_cfg, rngs=nnx.Rngs(2)))())

    # ---- the functions compared: forward, loss (uvigu.flow), gradient, an Adam step ----
    def wan_forward(m, b):
        return m(b["video"], flow.tau_to_wan_timestep(b["tau_v"]), b["ctx"])

    def wan_loss(m, b):
        z = flow.interpolate(b["video"], b["noise"], b["tau_v"])
        pred = flow.wan_velocity_to_paper(m(z, flow.tau_to_wan_timestep(b["tau_v"]), b["ctx"]))
        return jnp.mean(jnp.square(pred - flow.velocity_target(b["video"], b["noise"])))

    def uni_forward(m, b):
        text_in = flow.interpolate(m.text_flow.clean(b["ids"]), b["text_noise"], b["tau_t"])
        return m(b["video"], text_in, b["tau_v"], b["tau_t"], b["ctx"], b["text_mask"])

    def uni_loss(m, b):
        tf = m.text_flow
        clean = tf.clean(b["ids"])
        text_in = flow.interpolate(clean, b["text_noise"], b["tau_t"])
        z = flow.interpolate(b["video"], b["noise"], b["tau_v"])
        video_v, text_out = m(z, text_in, b["tau_v"], b["tau_t"], b["ctx"], b["text_mask"])
        loss, _ = flow.uni_flow_loss(video_v, flow.velocity_target(b["video"], b["noise"]), text_out,
                                     flow.velocity_target(clean, b["text_noise"]), b["text_mask"], text_flow=tf)
        return loss

    # eps bounds how much Adam amplifies rounding: an element with a ~1e-9 gradient (one of ffn.proj_in's here)
    # under the default eps 1e-8 turns a 1e-9 fp32 summation-order difference into a 7% change of its update.
    tx = optax.adam(1e-2, eps=1e-4)

    def make_step(graphdef, forward, loss, layout):
        # One program per device layout (forward, loss, gradients, an Adam update): one compile each. Params and
        # optimizer state come back in the layout they came in (the next step reuses the same executable).
        def step(params, opt_state, b):
            out = forward(nnx.merge(graphdef, params), b)
            value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), b))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), opt_state)
            return (out, value, grads, *jax.lax.with_sharding_constraint(new, layout))

        return jax.jit(step)

    def run(model, forward, loss, batch, mesh=None, train=True):
        graphdef, params = nnx.split(model)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        if mesh is None:
            return _run(graphdef, params, forward, loss, batch, train)
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        batch = jax.device_put(batch, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        with jax.set_mesh(mesh):
            return _run(graphdef, params, forward, loss, batch, train)

    def _run(graphdef, params, forward, loss, batch, train):
        if not train:
            fwd = jax.jit(lambda p, b: forward(nnx.merge(graphdef, p), b)).lower(params, batch).compile()
            return dict(out=to_np(fwd(params, batch))), fwd.as_text()
        opt_state = jax.jit(tx.init)(params)
        layout = jax.tree.map(lambda a: a.sharding, (params, opt_state))
        step = make_step(graphdef, forward, loss, layout).lower(params, opt_state, batch).compile()
        out, loss1, grads, params, opt_state = step(params, opt_state, batch)
        _, loss2, _, params, _ = step(params, opt_state, batch)
        return dict(out=to_np(out), grads=to_np(grads), params=to_np(params), losses=to_np([loss1, loss2]),
                    paths=[jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]), \
            step.as_text()

    to_np = lambda t: [np.asarray(a, np.float64) for a in jax.tree.leaves(t)]

    def rel(a, b):
        errs = []
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape, (x.shape, y.shape)
            den = np.linalg.norm(y)
            errs.append(float(np.linalg.norm(x - y) / den) if den else float(np.linalg.norm(x) > 0))
        return errs

    mesh = sharding.make_mesh({"context": 4, "fsdp": 2})
    wan_batch = dict(video=video, noise=noise, ctx=ctx, tau_v=tau_v)
    uni_batch = dict(wan_batch, tau_t=tau_t, ids=ids, text_mask=text_mask, text_noise=text_noise)
    cases = {
        "wan": (wan, wan_forward, wan_loss, wan_batch, 12, True),
        "univigu": (uni, uni_forward, uni_loss, uni_batch, 12 + N_TEXT, True),
        # 12 + 6 = 18 tokens do not divide context 4: replicated over context, same numbers (forward only).
        "univigu_indivisible": (uni, uni_forward, uni_loss,
                                dict(uni_batch, ids=ids[:, :6], text_mask=text_mask[:, :6],
                                     text_noise=text_noise[:, :6]), 12 + 6, False),
    }
    results = {}
    for name, (model, forward, loss, batch, length, train) in cases.items():
        t = time.perf_counter()
        one, _ = run(model, forward, loss, batch, train=train)
        eight, hlo = run(model, forward, loss, batch, mesh, train=train)
        heads = wan_cfg.num_heads
        # Per-device logits of a self-attention: [B/2, N, L/4, L] when split, [B/2, N, L, L] when not.
        split_logits = f"f32[1,{heads},{length // 4},{length}]" if length % 4 == 0 else None
        errs = {k: rel(eight[k], one[k]) for k in one if k != "paths"}
        worst = {k: (max(v), one["paths"][int(np.argmax(v))] if k in ("grads", "params") else None)
                 for k, v in errs.items()}
        results[name] = dict(
            length=length,
            err={k: v[0] for k, v in worst.items()},
            worst_leaf={k: v[1] for k, v in worst.items()},
            losses=[float(v) for v in one.get("losses", [])],
            losses_8=[float(v) for v in eight.get("losses", [])],
            split_logits=bool(split_logits and split_logits in hlo),
            full_logits=bool(re.search(rf"f32\\[\\d+,{heads},{length},{length}\\]", hlo)),
            all_gather="all-gather" in hlo,
            seconds=time.perf_counter() - t,
        )
    results["total_seconds"] = time.perf_counter() - t0
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS=host_device_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    out = json.loads(line[len("RESULTS"):])
    # XLA's SPMD partitioner logs this when it must gather a whole tensor to re-split it (a layout it was not told).
    out["involuntary_remat"] = [l[:400] for l in proc.stderr.splitlines() if "Involuntary full rematerialization" in l]
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.parametrize("name", ["wan", "univigu", "univigu_indivisible"])
def test_eight_devices_match_one_device(results, name):
    r = results[name]
    # forward outputs, parameter gradients, params after 2 Adam steps, the 2 losses
    assert r["err"], r
    for what, err in r["err"].items():
        assert err <= 1e-5, (what, r["err"], r["worst_leaf"])
    if r["losses"]:
        assert r["losses"][1] < r["losses"][0]  # the step did something


@pytest.mark.parametrize("name", ["wan", "univigu"])
def test_sequence_is_split_over_context(results, name):
    r = results[name]
    assert r["split_logits"], f"no per-device [1, N, {r['length'] // 4}, {r['length']}] attention logits in the HLO"
    assert not r["full_logits"], "a device computes the full [L, L] attention: the queries are not split"
    assert r["all_gather"]  # K / V gathered over `context`


def test_indivisible_sequence_is_replicated_not_padded(results):
    r = results["univigu_indivisible"]
    assert r["full_logits"] and not r["split_logits"]


def test_no_layout_gathers_a_whole_tensor(results):
    # The per-token modulation and the FFN_v / FFN_t routing are constrained to the sequence layout; without that,
    # XLA split them over D and had to gather whole [B, L + S, D] tensors to re-split them (forward and backward).
    assert not results["involuntary_remat"], results["involuntary_remat"]
