"""Why the toy generator's T2V misses shape and motion: six probes of a `pretrain_t2v` export on the toy world.

    python -m experiments.t2v_probe --probe_export runs/demo/pretrain_t2v/export/dit --probe_world runs/demo/toy_world

1. Word sensitivity. Training clips are noised to σ; the DiT predicts the clean clip x0 = x − σ·DiT(x, σ, c) once
   with the clip's own prompt context and once with ONE prompt word (shape, colour or motion) swapped for another
   value (a prompt that also occurs in training). The RMS change of x0 says how much the model uses that word. A
   generator that draws what it is told must move its prediction when the word changes, most of all at high σ,
   where the noisy clip cannot tell the attribute yet.
2. Denoising from a real clip. Validation clips are noised to σ0 and sampled back to 0 (Euler, CFG on the prompt);
   the pixel detector reads the result. σ0 = 1 is plain T2V; the σ0 at which an attribute stops surviving is the
   noise level from which the generator can no longer draw it.

3. The gap to the Bayes-optimal denoiser. The world is a finite set of scenes: `world.prompt_scenes` lists the 420
   a prompt allows, so E[x0 | x_σ, prompt] is computable exactly (`bayes_x0`, a uniform prior over them). On
   validation clips the model's x0 error is set against it at each σ: the gap is what training has not learnt yet.
4. Hand-over sampling. Euler from pure noise with the Bayes denoiser above σ_cut and the model below it: which noise
   range loses which attribute. σ_cut = 1 is the model alone.
5. The arrow of time. A clip that moves left, played backwards, is a clip that moves right, and a Wan DiT knows a
   frame's place only relative to the others (3D RoPE, no absolute position). So: does the model use the direction
   word where the noisy clip cannot yet show it? The model's x0 is projected on the line from B_r, the Bayes x0 under
   the same prompt with the direction reversed, to B_c, the Bayes x0 under the clip's own prompt:
   t = <x0 − (B_c + B_r)/2, B_c − B_r> / |B_c − B_r|², +0.5 at B_c, −0.5 at B_r. Next to it, the t of a denoiser that
   ignores the direction word (Bayes over both directions' scenes): what the noisy clip alone tells. At σ = 1, the
   time-odd part of the model's x0 averaged over noise draws (x0(t) − x0(T − 1 − t), which only knowing the
   direction and where in time a frame lies can produce) is compared with the prompt's mean clip's, by cosine.
6. Frame by frame. Next to probe 3's Bayes denoiser, one that reads each frame alone (`bayes_x0_per_frame`: frame
   k's posterior mean from frame k's noisy pixels only). Where the model's x0 error is near this one's, the model
   denoises frames one by one and does not use the path across frames (one shape, one straight line at one speed),
   which is what fixes the direction while the noise is high.

All print a table; `--probe_json` also writes the numbers. (Flag names are prefixed: absl flags are global, and
the tests import every experiment into one process.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from uvigu.data.world import PROMPT_ATTRIBUTES

_EXPORT = flags.DEFINE_string("probe_export", "runs/demo/pretrain_t2v/export/dit", "The generator: a Wan model folder.")
_WORLD_PATH = flags.DEFINE_string("probe_world", "runs/demo/toy_world", "The toy world's cache folder.")
_SIGMAS = flags.DEFINE_list("probe_sigmas", ["0.3", "0.5", "0.7", "0.8", "0.9", "1.0"],
                             "Noise levels of the word-swap probe and the Bayes gap.")
_START_SIGMAS = flags.DEFINE_list("probe_start_sigmas", ["0.35", "0.5", "0.7", "0.8", "0.9", "1.0"],
                                  "σ0 of the denoising probe.")
_EXAMPLES = flags.DEFINE_integer("probe_examples", 64, "Clips per probe.")
_STEPS = flags.DEFINE_integer("probe_steps", 30, "Euler steps from σ0 to 0.")
_GUIDANCE = flags.DEFINE_float("probe_guidance", 3.0, "CFG scale of the denoising probe.")
_CUTS = flags.DEFINE_list("probe_cuts", ["1.0", "0.9", "0.8", "0.6", "0.4"],
                          "σ_cut of the hand-over probe: the Bayes denoiser above it, the model below.")
_DIRECTION_SIGMAS = flags.DEFINE_list("probe_direction_sigmas", ["0.98", "0.95", "0.9", "0.85", "0.8", "0.7", "0.6"],
                                      "Noise levels of the arrow-of-time probe.")
_JSON = flags.DEFINE_string("probe_json", None, "Also write the numbers here.")

# Wan convention throughout: x_σ = (1 − σ)·x0 + σ·noise; the DiT predicts (noise − x0) at timestep σ·1000.
WanVelocity = Callable[[jax.Array, float], jax.Array]


def swapped_triples(triples: Sequence[tuple[str, str, str]], known: set, attribute: str) -> list:
    """For each (shape, colour, motion), the same triple with `attribute` changed to the first other value (in sorted
    order) whose triple is in `known`; None where there is none."""
    i = PROMPT_ATTRIBUTES.index(attribute)
    values = sorted({t[i] for t in known})
    out = []
    for triple in triples:
        choice = None
        for value in values:
            candidate = (*triple[:i], value, *triple[i + 1:])
            if value != triple[i] and candidate in known:
                choice = candidate
                break
        out.append(choice)
    return out


def word_sensitivity(dit, latents: np.ndarray, contexts: np.ndarray, swapped: np.ndarray, sigmas: Sequence[float],
                     key) -> dict[float, float]:
    """RMS of x0(x_σ, c) − x0(x_σ, c') over clips `latents` [B, T, h, w, C] with their contexts `contexts` and the
    word-swapped ones `swapped` (both [B, S, G]), at each σ (the same noise at every σ)."""
    graphdef, state = nnx.split(dit)

    @jax.jit
    def x0(state, x, context, sigma):
        timestep = jnp.full((x.shape[0],), sigma * 1000.0, jnp.float32)
        return x - sigma * nnx.merge(graphdef, state)(x, timestep, context)

    noise = jax.random.normal(key, latents.shape, jnp.float32)
    out = {}
    for sigma in sigmas:
        x = (1.0 - sigma) * jnp.asarray(latents) + sigma * noise
        delta = x0(state, x, jnp.asarray(contexts), sigma) - x0(state, x, jnp.asarray(swapped), sigma)
        out[float(sigma)] = float(jnp.sqrt(jnp.mean(jnp.square(delta))))
    return out


def cfg_velocity(dit, context: np.ndarray, guidance: float) -> WanVelocity:
    """The DiT as a Wan velocity with classifier-free guidance against the null (zero) context."""
    graphdef, state = nnx.split(dit)
    context = jnp.asarray(context)

    @jax.jit
    def velocity(state, x, sigma):
        model = nnx.merge(graphdef, state)
        timestep = jnp.full((x.shape[0],), sigma * 1000.0, jnp.float32)
        cond = model(x, timestep, context)
        if guidance == 1.0:  # plain conditional: no unconditional pass to pay for
            return cond
        uncond = model(x, timestep, jnp.zeros_like(context))
        return uncond + guidance * (cond - uncond)

    return lambda x, sigma: velocity(state, x, jnp.float32(sigma))


def denoise_from(velocity: WanVelocity, latents: np.ndarray, noise: np.ndarray, sigma0: float,
                 steps: int) -> np.ndarray:
    """`latents` noised to σ0 with `noise`, then Euler steps on a uniform σ grid down to 0."""
    x = jnp.asarray((1.0 - sigma0) * latents + sigma0 * noise, jnp.float32)
    grid = np.linspace(sigma0, 0.0, steps + 1)
    for sigma, nxt in zip(grid[:-1], grid[1:]):
        x = x + (nxt - sigma) * velocity(x, float(sigma))
    return np.asarray(x)


def bayes_x0(candidates: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
    """E[x0 | x_σ] when x0 is uniform over the rows of `candidates` [N, ...] (one clip's possible scenes) and
    x_σ = (1 − σ)·x0 + σ·noise: the softmax over −‖x − (1 − σ)·x0_n‖² / 2σ² of the candidates."""
    flat = candidates.reshape(candidates.shape[0], -1)
    logits = -jnp.sum(jnp.square(x.reshape(1, -1) - (1.0 - sigma) * flat), axis=-1) / (2.0 * sigma**2)
    return (jax.nn.softmax(logits) @ flat).reshape(x.shape)


def bayes_x0_per_frame(candidates: jax.Array, x: jax.Array, sigma: float) -> jax.Array:
    """Frame k of E[x0 | frame k of x_σ], for every k: `bayes_x0` with each frame's likelihood alone (candidates
    [N, T, ...], x [T, ...]). What a denoiser that cannot see across frames gets at best."""
    per_frame = jax.vmap(bayes_x0, in_axes=(1, 0, None))  # over T: candidates [N, ...] and x [...] of one frame
    return per_frame(candidates, x, sigma)


def reversed_direction(triple: tuple[str, str, str]) -> tuple[str, str, str]:
    """(shape, colour, motion) with the motion played backwards: left <-> right, up <-> down."""
    shape, colour, motion = triple
    return shape, colour, {"left": "right", "right": "left", "up": "down", "down": "up"}[motion]


def direction_projection(x0: jax.Array, toward: jax.Array, away: jax.Array) -> np.ndarray:
    """Per clip (leading axis), where `x0` lies on the line from `away` (−0.5) to `toward` (+0.5):
    <x0 − (toward + away)/2, toward − away> / |toward − away|²."""
    flat = lambda v: v.reshape(v.shape[0], -1)
    d = flat(toward - away)
    middle = flat(toward + away) / 2.0
    return np.asarray(jnp.sum((flat(x0) - middle) * d, 1) / jnp.maximum(jnp.sum(d * d, 1), 1e-12))


def time_odd_cosine(a: jax.Array, b: jax.Array) -> np.ndarray:
    """Per clip [B, T, ...]: the cosine between the time-odd parts (v − v played backwards) of `a` and `b`."""
    odd = lambda v: (v - v[:, ::-1]).reshape(v.shape[0], -1)
    oa, ob = odd(a), odd(b)
    return np.asarray(jnp.sum(oa * ob, 1) / jnp.maximum(jnp.linalg.norm(oa, axis=1) * jnp.linalg.norm(ob, axis=1),
                                                        1e-12))


def handover_sample(model_x0: Callable, oracle_x0: Callable, noise: np.ndarray, cut: float, steps: int) -> np.ndarray:
    """Euler from pure noise (σ = 1) to 0 on a uniform grid; x0 from `oracle_x0(x, σ)` while σ > cut, from
    `model_x0(x, σ)` after. (The Wan velocity is (x − x0) / σ.)"""
    def velocity(x, sigma):
        return (x - (oracle_x0 if sigma > cut else model_x0)(x, sigma)) / sigma

    return denoise_from(velocity, np.zeros_like(noise), noise, 1.0, steps)


def run(export: str, world: str, *, sigmas, start_sigmas, examples: int, steps: int, guidance: float,
        cuts=(), direction_sigmas=()) -> dict:
    from uvigu import checkpoint, run_config, run_data
    from uvigu.eval import toy_metrics

    c = run_config.load("pretrain_t2v", "tiny")
    c.data.path = world
    data = run_data.open_datasets(c)
    dit = checkpoint.load_pretrained(export)

    train = [data.train[i] for i in range(len(data.train))]
    context_of = {tuple(r["attributes"][a] for a in PROMPT_ATTRIBUTES): np.asarray(r["context"]) for r in train}
    clips = train[:examples]
    triples = [tuple(r["attributes"][a] for a in PROMPT_ATTRIBUTES) for r in clips]
    report: dict = {"export": export, "sensitivity": {}, "denoise": {}}
    for attribute in PROMPT_ATTRIBUTES:
        keep = [(r, s) for r, s in zip(clips, swapped_triples(triples, set(context_of), attribute)) if s]
        report["sensitivity"][attribute] = word_sensitivity(
            dit, np.stack([r["latents"] for r, _ in keep]), np.stack([r["context"] for r, _ in keep]),
            np.stack([context_of[s] for _, s in keep]), sigmas, jax.random.key(0))

    held = [data.validation[i] for i in range(min(examples, len(data.validation)))]
    latents = np.stack([r["latents"] for r in held])
    velocity = cfg_velocity(dit, np.stack([r["context"] for r in held]), guidance)
    noise = np.asarray(jax.random.normal(jax.random.key(1), latents.shape, jnp.float32))
    truth = [r["attributes"] for r in held]
    for sigma0 in start_sigmas:
        videos = data.codec.decode(denoise_from(velocity, latents, noise, sigma0, steps))
        report["denoise"][float(sigma0)] = toy_metrics.video_accuracy(
            videos, truth, attributes=("shape", "colour", "motion", "size", "speed", "position"))
    if cuts:
        report.update(_bayes_probes(dit, data.codec, held, sigmas, cuts, steps, direction_sigmas))
    return report


def _bayes_probes(dit, codec, held, sigmas, cuts, steps: int, direction_sigmas=()) -> dict:
    """Probes 3 to 6 on the clips `held` (records of the default world)."""
    from uvigu.data import world as world_lib
    from uvigu.eval import toy_metrics

    spec = world_lib.WorldSpec()  # the scene geometry; a config's toy world changes only its seed and split sizes
    candidates = {}

    def scenes_of(triple):
        if triple not in candidates:
            videos = np.stack([world_lib.render(spec, s) for s in world_lib.prompt_scenes(spec, *triple)])
            candidates[triple] = jnp.asarray(codec.encode(videos))
        return candidates[triple]

    triples = [tuple(r["attributes"][a] for a in PROMPT_ATTRIBUTES) for r in held]
    per_clip = [scenes_of(t) for t in triples]
    oracle = jax.jit(jax.vmap(bayes_x0, in_axes=(0, 0, None)))
    frame_oracle = jax.jit(jax.vmap(bayes_x0_per_frame, in_axes=(0, 0, None)))
    stacked = jnp.stack(per_clip)  # every prompt allows the same number of scenes
    latents = jnp.asarray(np.stack([r["latents"] for r in held]))
    context = jnp.asarray(np.stack([r["context"] for r in held]))
    velocity = cfg_velocity(dit, np.asarray(context), 1.0)

    def model_x0(x, sigma):
        return x - sigma * velocity(x, sigma)

    noise = jax.random.normal(jax.random.key(2), latents.shape, jnp.float32)
    error = lambda x0: float(jnp.mean(jnp.square(x0 - latents)))
    gap = {}
    for sigma in sigmas:
        x = (1.0 - sigma) * latents + sigma * noise
        gap[float(sigma)] = {"model": error(model_x0(x, sigma)), "bayes": error(oracle(stacked, x, sigma)),
                             "bayes_per_frame": error(frame_oracle(stacked, x, sigma))}
    handover = {}
    truth = [r["attributes"] for r in held]
    for cut in cuts:
        x = handover_sample(model_x0, lambda x, s: oracle(stacked, x, s), np.asarray(noise), float(cut), steps)
        handover[float(cut)] = toy_metrics.video_accuracy(codec.decode(x), truth, attributes=PROMPT_ATTRIBUTES)
    report = {"bayes_gap": gap, "handover": handover}
    if direction_sigmas:
        reversed_ = jnp.stack([scenes_of(reversed_direction(t)) for t in triples])
        report["direction"] = _direction_probe(model_x0, oracle, stacked, reversed_, latents, direction_sigmas)
    return report


def _direction_probe(model_x0, oracle, own, reversed_, latents, sigmas, draws: int = 4) -> dict:
    """Probe 5: per σ, the median t of the model and of the direction-blind Bayes denoiser, and the fraction of
    clips the model puts on the prompt's side (t > 0), over `draws` noise draws; at σ = 1, the time-odd cosine."""
    both = jnp.concatenate([own, reversed_], axis=1)  # the scenes of both directions, equally likely
    rows = {}
    for sigma in sigmas:
        model_t, blind_t = [], []
        for k in range(draws):
            noise = jax.random.normal(jax.random.key(20 + k), latents.shape, jnp.float32)
            x = (1.0 - sigma) * latents + sigma * noise
            toward, away = oracle(own, x, sigma), oracle(reversed_, x, sigma)
            model_t.append(direction_projection(model_x0(x, sigma), toward, away))
            blind_t.append(direction_projection(oracle(both, x, sigma), toward, away))
        model_t, blind_t = np.concatenate(model_t), np.concatenate(blind_t)
        rows[float(sigma)] = {"model": float(np.median(model_t)), "model_right": float(np.mean(model_t > 0)),
                              "blind_bayes": float(np.median(blind_t))}
    mean_x0 = sum(model_x0(jax.random.normal(jax.random.key(40 + k), latents.shape, jnp.float32), 1.0)
                  for k in range(4 * draws)) / (4 * draws)
    cosine = time_odd_cosine(mean_x0, own.mean(axis=1))
    return {"t": rows, "time_odd_cosine_at_1": {"median": float(np.median(cosine)),
                                                "positive": float(np.mean(cosine > 0))}}


def format_report(report: Mapping) -> str:
    sens = report["sensitivity"]
    sigmas = sorted(next(iter(sens.values())))
    lines = ["RMS change of the x0 prediction when one prompt word is swapped (training clips):",
             "  σ      " + "".join(f"{a:>9}" for a in sens)]
    lines += [f"  {s:<5.2f}  " + "".join(f"{sens[a][s]:>9.3f}" for a in sens) for s in sigmas]
    lines.append("\nDetector accuracy after denoising validation clips from σ0 (σ0 = 1: plain T2V):")
    attrs = ("shape", "colour", "motion", "size", "speed", "position")
    lines.append("  σ0     " + "".join(f"{a:>9}" for a in attrs))
    for s0, acc in sorted(report["denoise"].items()):
        lines.append(f"  {s0:<5.2f}  " + "".join(f"{acc[a]:>9.2f}" for a in attrs))
    if "bayes_gap" in report:
        lines.append("\nx0 MSE on validation clips at σ, the model against the Bayes-optimal denoiser (of the whole clip,"
                     " and of each frame alone):")
        lines.append("  σ        model    Bayes  Bayes per frame")
        lines += [f"  {s:<5.2f}  {g['model']:>7.4f}  {g['bayes']:>7.4f}  {g['bayes_per_frame']:>15.4f}"
                  for s, g in sorted(report["bayes_gap"].items())]
        lines.append("\nEuler from noise, the Bayes denoiser above σ_cut and the model below (1.0: the model alone):")
        lines.append("  σ_cut  " + "".join(f"{a:>9}" for a in PROMPT_ATTRIBUTES))
        for cut, acc in sorted(report["handover"].items(), reverse=True):
            lines.append(f"  {cut:<5.2f}  " + "".join(f"{acc[a]:>9.2f}" for a in PROMPT_ATTRIBUTES))
    if "direction" in report:
        d = report["direction"]
        lines.append("\nThe direction word: x0 between the Bayes x0 reversed (-0.5) and as told (+0.5), clip median:")
        lines.append("  σ      model  model>0  direction-blind Bayes")
        lines += [f"  {s:<5.2f} {r['model']:>+6.3f}  {r['model_right']:>7.2f}  {r['blind_bayes']:>+6.3f}"
                  for s, r in sorted(d["t"].items(), reverse=True)]
        cos = d["time_odd_cosine_at_1"]
        lines.append(f"  σ = 1, time-odd part of the mean x0 against the prompt's mean clip: cosine median "
                     f"{cos['median']:+.3f}, positive in {cos['positive']:.2f} of clips (1.0 if it knows the arrow)")
    return "\n".join(lines)


def main(argv):
    del argv
    report = run(_EXPORT.value, _WORLD_PATH.value, sigmas=[float(s) for s in _SIGMAS.value],
                 start_sigmas=[float(s) for s in _START_SIGMAS.value], examples=_EXAMPLES.value, steps=_STEPS.value,
                 guidance=_GUIDANCE.value, cuts=[float(c) for c in _CUTS.value],
                 direction_sigmas=[float(s) for s in _DIRECTION_SIGMAS.value])
    print(format_report(report))
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
