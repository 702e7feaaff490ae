"""The experiment scripts' accounting, checked without running a benchmark: the §8 FLOP formula against the numbers
DESIGN.md quotes, the parameter counts of the text side, the timing summary on a fake clock, and the T2V probes on a
tiny random DiT and an analytic velocity field."""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# `experiments` is not an installed package: it is importable from the repository root, which `python -m pytest`
# puts on the path but a bare `pytest` (or a run from inside tests/) does not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_cpu, bench_dit, param_overhead, t2v_probe, wan_parity_report  # noqa: E402
from uvigu.models.wan import WanConfig, WanDiT  # noqa: E402

DIT_1_3B_PARAMS = 1_418_996_800


# ----------------------------------------------------------------------------------------------------------------------
# bench_dit: the formula.
# ----------------------------------------------------------------------------------------------------------------------


def test_formula_matches_design_numbers():
    report = bench_dit.check_formula()
    assert report["latent"] == (21, 60, 104)
    assert report["video_tokens"] == 32_760 and report["tokens"] == 32_760 + 256
    assert report["forward_tflop"] == pytest.approx(287.0, rel=0.01)
    assert report["share"]["self_attention"] == pytest.approx(0.70, abs=0.01)
    assert report["train_step_tflop"] == pytest.approx(3 * report["forward_tflop"])
    assert sum(report["share"].values()) == pytest.approx(1.0)


def test_formula_terms_by_hand():
    n, c, d, f = 2, 3, 5, 7
    terms = bench_dit.layer_flop_terms(n, c, d, f)
    assert terms == {"projections": 12 * n * d * d, "ffn": 4 * n * d * f, "cross_kv": 4 * c * d * d,
                     "self_attention": 4 * n * n * d, "cross_attention": 4 * n * c * d}
    cfg = bench_dit.WanConfig.preset("tiny")
    assert bench_dit.forward_flops(cfg, n, c) == cfg.num_layers * sum(
        bench_dit.layer_flop_terms(n, c, cfg.dim, cfg.ffn_dim).values())


def test_video_shapes():
    assert bench_dit.latent_shape_for_video(81, 480, 832) == (21, 60, 104)
    with pytest.raises(ValueError, match="4n\\+1"):
        bench_dit.latent_shape_for_video(80, 480, 832)
    assert bench_dit.video_token_count(bench_dit.WanConfig.preset("tiny", patch_size=(2, 2, 1)), (4, 4, 3)) == 12


def test_default_peak_by_device():
    assert bench_dit.default_peak_tflops("NVIDIA H200", "gpu", "bfloat16") == 989.0
    assert bench_dit.default_peak_tflops("NVIDIA H100 80GB HBM3", "gpu", "bfloat16") == 989.0
    assert bench_dit.default_peak_tflops("cpu", "cpu", "float32") is None
    assert bench_dit.default_peak_tflops("NVIDIA A10", "gpu", "bfloat16") is None


# ----------------------------------------------------------------------------------------------------------------------
# bench_dit: timing and accounting on a fake clock.
# ----------------------------------------------------------------------------------------------------------------------


class FakeClock:
    """Advances by the next of `durations` on every second reading, so step i appears to take durations[i]."""

    def __init__(self, durations):
        self.now, self.durations, self.reads = 100.0, list(durations), 0

    def __call__(self):
        if self.reads % 2:
            self.now += self.durations[self.reads // 2]
        self.reads += 1
        return self.now


def test_time_steps_and_summary_on_fake_clock():
    durations = [0.1, 0.2, 0.3, 0.4]
    calls = []

    def step():
        calls.append(1)
        return jnp.zeros(())

    clock = FakeClock(durations)
    times = bench_dit.time_steps(step, iters=4, warmup=2, clock=clock)
    assert len(calls) == 6 and clock.reads == 8  # warmup steps run but are not timed
    assert times == pytest.approx(durations)

    s = bench_dit.summarize(times, tokens_per_step=1000, flops_per_step=2e12, peak_tflops=10.0)
    assert s["tokens_per_s"] == pytest.approx(1000 * 4 / 1.0)  # tokens · iters / total time
    assert s["tflops"] == pytest.approx(2.0 * 4 / 1.0)
    assert s["mfu"] == pytest.approx(0.8)
    assert s["step_s_median"] == pytest.approx(0.25)
    assert s["step_s_p10"] < s["step_s_median"] < s["step_s_p90"]
    assert bench_dit.summarize(times, 1000, 2e12, None)["mfu"] is None


def test_setup_defaults_follow_the_device():
    parser = bench_dit.build_parser()
    cpu = bench_dit.setup_from_args(parser.parse_args([]), "cpu")
    assert (cpu.wan.dtype, cpu.wan.attention_backend, cpu.latent, cpu.text_len) == ("float32", "xla", (3, 8, 8), 0)
    gpu = bench_dit.setup_from_args(parser.parse_args(["--preset", "wan2.1-1.3b", "--model", "univigu",
                                                       "--layout", "loop", "--remat", "full"]), "gpu")
    assert (gpu.wan.dtype, gpu.wan.attention_backend, gpu.wan.scan_layers, gpu.wan.remat_policy) == (
        "bfloat16", "cudnn", False, "full")
    assert gpu.latent == (21, 60, 104) and gpu.tokens_per_example == 32_760 + 256 and gpu.context_len == 512


# ----------------------------------------------------------------------------------------------------------------------
# param_overhead.
# ----------------------------------------------------------------------------------------------------------------------


def test_param_overhead_1_3b():
    assert param_overhead.dit_param_count("wan2.1-1.3b") == DIT_1_3B_PARAMS
    rows = {r["text_flow"]: r for r in param_overhead.overhead_table(("wan2.1-1.3b",), ffn_t_fractions=(1.0,),
                                                                      vocab_size=256_384)}
    for r in rows.values():
        assert r["dit"] == DIT_1_3B_PARAMS
        assert r["overhead"] > 0 and r["total"] == r["dit"] + sum(r["text"].values())
        assert r["text"]["FFN_t"] == 30 * (2 * 1536 * 8960 + 8960 + 1536)
    assert rows["embedding"]["text"]["table"] == 256_384 * 128
    assert rows["discrete"]["text"]["table"] == 256_384 * 1536
    assert rows["embedding"]["total"] < rows["discrete"]["total"]


def test_half_width_ffn_t_is_smaller():
    full, half = param_overhead.overhead_table(("wan2.1-1.3b",), flows=("embedding",), ffn_t_fractions=(1.0, 0.5))
    assert half["ffn_t_dim"] == 4480 and half["text"]["FFN_t"] < full["text"]["FFN_t"]
    assert half["text"]["table"] == full["text"]["table"]


# ----------------------------------------------------------------------------------------------------------------------
# Every script's command line parses its defaults.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [bench_dit, param_overhead, wan_parity_report])
def test_parsers_take_defaults(module):
    assert isinstance(module.build_parser().parse_args([]), argparse.Namespace)


# ----------------------------------------------------------------------------------------------------------------------
# bench_cpu: configs and flags (the timing itself is not run here).
# ----------------------------------------------------------------------------------------------------------------------


def test_bench_cpu_configs_match_the_issue():
    assert bench_cpu.token_count("small") == 320 and bench_cpu.CONFIGS["small"][2] == 4
    assert bench_cpu.token_count("wide") == 1536 and bench_cpu.CONFIGS["wide"][2] == 1
    small, wide = bench_cpu.wan_config("small", {}), bench_cpu.wan_config("wide", {})
    assert (small.dim, small.num_layers, small.head_dim) == (128, 4, 32)
    assert (wide.dim, wide.num_layers, wide.head_dim) == (512, 2, 128)
    assert small.remat_policy == "none" and small.scan_layers  # no remat: the same work as diffusers


def test_bench_cpu_exec_overrides():
    got = bench_cpu.parse_exec_overrides("scan_layers=false, remat_policy=dots,attention_backend=xla")
    assert got == {"scan_layers": False, "remat_policy": "dots", "attention_backend": "xla"}
    assert bench_cpu.wan_config("small", got).remat_policy == "dots"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench_cpu.parse_exec_overrides("num_layers=3")
    with pytest.raises(ValueError, match="boolean"):
        bench_cpu.parse_exec_overrides("scan_layers=maybe")
    with pytest.raises(ValueError, match="remat_policy"):
        bench_cpu.wan_config("small", {"remat_policy": "sometimes"})


def test_bench_cpu_block_products_are_the_formulas_weight_terms():
    cfg = bench_cpu.wan_config("wide", {})
    rows, context_rows = 1536, 16
    products = bench_cpu.block_products(cfg, rows, context_rows)
    terms = bench_dit.layer_flop_terms(rows, context_rows, cfg.dim, cfg.ffn_dim)
    assert sum(2 * m * k * n for _, m, k, n in products) == pytest.approx(
        terms["projections"] + terms["ffn"] + terms["cross_kv"])


def test_bench_cpu_gemm_mode_times_every_product_layout():
    result = bench_cpu.bench_gemms("small", iters=1, warmup=0)
    shapes = {(m, k, n) for _, m, k, n in bench_cpu.block_products(bench_cpu.wan_config("small", {}), 4 * 320, 4 * 16)}
    assert {(r["m"], r["k"], r["n"], r["layout"]) for r in result["table"]} == {
        (*shape, layout) for shape in shapes for layout in bench_cpu.GEMM_LAYOUTS}
    assert result["ratio"] == pytest.approx(result["block_ours_ms"] / result["block_torch_ms"])
    assert all(r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["rel_err"] < 1e-5 for r in result["table"])


# ----------------------------------------------------------------------------------------------------------------------
# t2v_probe: the six probes.
# ----------------------------------------------------------------------------------------------------------------------


def test_denoising_probe_lands_on_the_clip_under_a_point_mass():
    # The exact Wan velocity of a one-clip data set is (x − x1) / σ: Euler on it reaches x1 from any σ0, in any number
    # of steps, only if the probe noises and integrates in the right direction.
    rng = np.random.default_rng(0)
    clip, noise = rng.standard_normal((2, 3, 2, 4, 4, 5)).astype(np.float32)

    def velocity(x, sigma):
        return (x - clip) / sigma

    for sigma0, steps in ((1.0, 5), (0.5, 3), (0.9, 1)):
        np.testing.assert_allclose(t2v_probe.denoise_from(velocity, clip, noise, sigma0, steps), clip, atol=1e-5)
    moved = t2v_probe.denoise_from(lambda x, sigma: jnp.zeros_like(x), clip, noise, 0.5, 4)  # no velocity: x stays
    np.testing.assert_allclose(moved, 0.5 * clip + 0.5 * noise, atol=1e-6)


def test_word_sensitivity_is_what_the_context_changes():
    cfg = WanConfig.preset("tiny", scan_layers=True, dtype="float32")
    dit = WanDiT(cfg, rngs=nnx.Rngs(0))
    # A fresh Wan DiT predicts 0 (zero-init head): give every param random values so the context matters.
    params = nnx.state(dit, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(dit, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, 2, 4, 4, cfg.in_channels)).astype(np.float32)
    context, other = rng.standard_normal((2, 2, 6, cfg.text_dim)).astype(np.float32)
    sigmas = (0.3, 1.0)
    changed = t2v_probe.word_sensitivity(dit, latents, context, other, sigmas, jax.random.key(0))
    same = t2v_probe.word_sensitivity(dit, latents, context, context, sigmas, jax.random.key(0))
    assert all(changed[s] > 1e-3 for s in sigmas) and all(same[s] == 0.0 for s in sigmas)
    # The context reaches a Wan DiT only through cross-attention: without its output, no word can matter.
    params = nnx.state(dit, nnx.Param)
    nnx.update(dit, jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "attn2" in jax.tree_util.keystr(path) and
        "to_out" in jax.tree_util.keystr(path) else x, params))
    blind = t2v_probe.word_sensitivity(dit, latents, context, other, sigmas, jax.random.key(0))
    assert all(blind[s] < 1e-6 for s in sigmas)


def test_swapped_triples_change_one_word_to_a_known_prompt():
    known = {("circle", "red", "right"), ("square", "red", "left"), ("circle", "green", "left")}
    triples = [("circle", "red", "left"), ("triangle", "blue", "up")]
    assert t2v_probe.swapped_triples(triples, known, "motion") == [("circle", "red", "right"), None]
    assert t2v_probe.swapped_triples(triples, known, "shape") == [("square", "red", "left"), None]
    assert t2v_probe.swapped_triples(triples, known, "colour") == [("circle", "green", "left"), None]


def test_bayes_x0_is_the_posterior_mean_over_the_candidates():
    rng = np.random.default_rng(3)
    candidates = jnp.asarray(rng.standard_normal((3, 2, 4, 4, 5)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 5)).astype(np.float32))
    # One candidate: the posterior is a point mass, at any σ.
    np.testing.assert_allclose(t2v_probe.bayes_x0(candidates[:1], x, 0.7), candidates[0], atol=1e-6)
    # σ = 1: x carries nothing of x0, so the posterior is the prior: the plain mean.
    np.testing.assert_allclose(t2v_probe.bayes_x0(candidates, x, 1.0), candidates.mean(0), atol=1e-5)
    # Low noise around candidate 1: the posterior concentrates on it.
    near = 0.95 * candidates[1] + 0.05 * x
    np.testing.assert_allclose(t2v_probe.bayes_x0(candidates, near, 0.05), candidates[1], atol=1e-5)
    # In between, the weights are the Gaussian likelihoods (checked by hand for σ = 0.6).
    sigma = 0.6
    logl = np.array([-np.sum((np.asarray(x) - 0.4 * np.asarray(c)) ** 2) / (2 * sigma**2) for c in candidates])
    w = np.exp(logl - logl.max())
    w /= w.sum()
    np.testing.assert_allclose(t2v_probe.bayes_x0(candidates, x, sigma), np.tensordot(w, np.asarray(candidates), 1),
                               atol=1e-5)


def test_per_frame_bayes_reads_each_frame_alone():
    rng = np.random.default_rng(4)
    candidates = jnp.asarray(rng.standard_normal((3, 2, 4, 4, 5)).astype(np.float32))  # [N, T, h, w, C]
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 5)).astype(np.float32))
    per_frame = t2v_probe.bayes_x0_per_frame(candidates, x, 0.6)
    for k in range(2):  # frame k: the posterior mean of frame k from frame k's likelihood only
        np.testing.assert_allclose(per_frame[k], t2v_probe.bayes_x0(candidates[:, k], x[k], 0.6), atol=1e-6)
    # One frame: nothing to read across, so it is the whole-clip denoiser.
    np.testing.assert_allclose(t2v_probe.bayes_x0_per_frame(candidates[:, :1], x[:1], 0.6),
                               t2v_probe.bayes_x0(candidates[:, :1], x[:1], 0.6), atol=1e-6)
    # Two clips whose frames go together (u, u) or (-u, -u): each frame alone is weak evidence, the pair is twice
    # as strong, so reading frames one by one costs error (averaged over noise draws).
    u = jnp.asarray(rng.standard_normal((4, 4, 5)).astype(np.float32))
    coupled = jnp.stack([jnp.stack([u, u]), jnp.stack([-u, -u])])
    sigma, errors = 0.9, np.zeros(2)
    for draw in range(64):
        noisy = (1 - sigma) * coupled[0] + sigma * jax.random.normal(jax.random.key(draw), coupled[0].shape)
        for i, denoise in enumerate((t2v_probe.bayes_x0, t2v_probe.bayes_x0_per_frame)):
            errors[i] += float(jnp.mean(jnp.square(denoise(coupled, noisy, sigma) - coupled[0])))
    assert errors[1] > 1.5 * errors[0], errors


def test_probe_report_prints_every_table():
    attrs = ("shape", "colour", "motion", "size", "speed", "position")
    report = {"sensitivity": {a: {0.5: 0.1, 0.9: 0.2} for a in t2v_probe.PROMPT_ATTRIBUTES},
              "denoise": {1.0: dict.fromkeys(attrs, 0.25)},
              "bayes_gap": {0.8: {"model": 0.0671, "bayes": 0.005, "bayes_per_frame": 0.0578}},
              "handover": {1.0: dict.fromkeys(t2v_probe.PROMPT_ATTRIBUTES, 0.5)},
              "direction": {"t": {0.9: {"model": 0.026, "model_right": 0.55, "blind_bayes": 0.409}},
                            "time_odd_cosine_at_1": {"median": 0.012, "positive": 0.52}}}
    text = t2v_probe.format_report(report)
    assert "0.80    0.0671   0.0050           0.0578" in text
    assert "0.90  +0.026     0.55  +0.409" in text and "cosine median +0.012" in text


def test_handover_sampling_switches_denoiser_at_the_cut():
    rng = np.random.default_rng(4)
    clip = rng.standard_normal((1, 2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(clip.shape).astype(np.float32)
    seen = []

    def oracle(x, sigma):
        seen.append(("oracle", sigma))
        return jnp.asarray(clip)

    def model(x, sigma):
        seen.append(("model", sigma))
        return x  # an identity denoiser: the velocity is 0, x stays where it is

    # The oracle to the end: lands on the clip. The model from the start: x stays the noise.
    np.testing.assert_allclose(t2v_probe.handover_sample(model, oracle, noise, 0.0, 5), clip, atol=1e-5)
    np.testing.assert_allclose(t2v_probe.handover_sample(model, oracle, noise, 1.0, 5), noise, atol=1e-6)
    seen.clear()
    out = t2v_probe.handover_sample(model, oracle, noise, 0.5, 4)  # σ 1, .75 by the oracle; .5, .25 by the model
    assert [who for who, _ in seen] == ["oracle", "oracle", "model", "model"]
    np.testing.assert_allclose(out, 0.5 * clip + 0.5 * noise, atol=1e-5)  # where the oracle left it at σ = 0.5


def test_direction_probe_places_x0_between_the_two_directions():
    rng = np.random.default_rng(5)
    toward, away = (jnp.asarray(rng.standard_normal((3, 5, 2, 2, 4)).astype(np.float32)) for _ in range(2))
    np.testing.assert_allclose(t2v_probe.direction_projection(toward, toward, away), 0.5, atol=1e-6)
    np.testing.assert_allclose(t2v_probe.direction_projection(away, toward, away), -0.5, atol=1e-6)
    np.testing.assert_allclose(t2v_probe.direction_projection((toward + away) / 2, toward, away), 0.0, atol=1e-6)
    # Anything orthogonal to the line does not move t; 3/4 of the way to `toward` is +0.25.
    d = (toward - away).reshape(3, -1)
    ortho = jnp.asarray(rng.standard_normal(d.shape).astype(np.float32))
    ortho = ortho - (jnp.sum(ortho * d, 1, keepdims=True) / jnp.sum(d * d, 1, keepdims=True)) * d
    x0 = 0.75 * toward + 0.25 * away + ortho.reshape(toward.shape)
    np.testing.assert_allclose(t2v_probe.direction_projection(x0, toward, away), 0.25, atol=1e-5)
    assert t2v_probe.reversed_direction(("circle", "red", "left")) == ("circle", "red", "right")
    assert t2v_probe.reversed_direction(("square", "blue", "down")) == ("square", "blue", "up")


def test_time_odd_cosine_sees_only_the_arrow_of_time():
    from uvigu.data import world as world_lib

    spec = world_lib.WorldSpec()
    scene = world_lib.prompt_scenes(spec, "square", "red", "left")[0]
    clip = world_lib.render(spec, scene)[None].astype(np.float32)  # [1, F, H, W, 3]: a left mover
    backwards = clip[:, ::-1]  # played backwards it moves right
    assert t2v_probe.time_odd_cosine(jnp.asarray(clip), jnp.asarray(clip))[0] == pytest.approx(1.0, abs=1e-6)
    assert t2v_probe.time_odd_cosine(jnp.asarray(backwards), jnp.asarray(clip))[0] == pytest.approx(-1.0, abs=1e-6)
    # A time-symmetric prediction (the clip averaged with its reverse: the right lane, no arrow) scores 0, and any
    # arrow added to it, however faint, decides the sign.
    symmetric = (clip + backwards) / 2
    assert t2v_probe.time_odd_cosine(jnp.asarray(symmetric), jnp.asarray(clip))[0] == 0.0
    faint = t2v_probe.time_odd_cosine(jnp.asarray(symmetric + 1e-3 * backwards), jnp.asarray(clip))[0]
    assert faint == pytest.approx(-1.0, abs=1e-4)
