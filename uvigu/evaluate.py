"""Evaluation of a training run on the toy world: the three inference modes, scored by attribute.

  V2T    caption each clip (clean video, text from noise, null prompt context); parse the caption; per-attribute
         accuracy + exact match.
  T2V    generate a clip from each prompt (clean prompt text, video from noise, CFG on the video velocity); decode
         with the codec; an independent pixel detector reads the attributes back; per-attribute accuracy.
  joint  a (video, caption) pair generated together from each prompt (CFG on the video velocity); scored by how often
         the caption says what the detector reads in its own video (shape, colour, motion: `joint_agreement`).
on `validation` and on `test`, whose (shape, colour, motion) combinations never occur in training. Stage 1 is scored
on the prompt's attributes (its target text is the prompt), stage 2 on all of them; T2V always on the prompt's.
Samples (GIFs, caption lists) go to `WORKDIR/samples/step_N/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvigu import pipeline as uvigu_pipeline
from uvigu import sampling
from uvigu.data import pipeline
from uvigu.data.world import ATTRIBUTES, PROMPT_ATTRIBUTES
from uvigu.eval import toy_metrics
from uvigu.models.univigu import UniViGU


def _stack(records, key, dtype=None) -> np.ndarray:
    return np.stack([np.asarray(r[key], dtype) for r in records])


def generate(c, model, batch: dict[str, jax.Array], key) -> dict[str, Any]:
    """T2V latents (and, for UniViGU, V2T ids and a joint pair) for one batch of records (`latents`: the clean videos
    V2T captions, `context`, `prompt_ids`, `prompt_mask`), through the inference pipeline's sampling core
    (`uvigu.pipeline.t2v_latents` / `v2t_ids` / `joint_sample`): the evaluation runs what users run."""
    s = c.sample
    video, context = batch["latents"].astype(jnp.float32), batch["context"].astype(jnp.float32)
    prompt_ids, prompt_mask = batch["prompt_ids"].astype(jnp.int32), batch["prompt_mask"].astype(bool)
    is_unified = isinstance(model, UniViGU)
    sigmas = sampling.schedule(s.solver, s.num_steps, s.shift)
    null = jnp.zeros_like(context)  # what condition dropout trains on
    k_t2v, k_v2t, k_joint = jax.random.split(key, 3)
    # T2V: the prompt, clean, as the text tokens (as the released code does); CFG on the video velocity.
    text_mask = pipeline.text_attention_mask(prompt_mask, c.data.loss_on_padding) if is_unified else None
    text = model.text_flow.clean(prompt_ids) if is_unified else None
    noise = jax.random.normal(k_t2v, video.shape, jnp.float32)
    out = {"t2v": uvigu_pipeline.t2v_latents(model, noise, sigmas, context, null, s.guidance_scale, text, text_mask,
                                             solver=s.solver)}
    if not is_unified:
        return out
    text_len = prompt_ids.shape[1]
    # V2T captions from the video alone: the null context, never the prompt (which would let it copy).
    out["v2t"] = uvigu_pipeline.v2t_ids(model, k_v2t, video, null, sigmas, text_len, solver=s.solver,
                                        temperature=s.text_temperature)
    out["joint_video"], out["joint_text"] = uvigu_pipeline.joint_sample(
        model, k_joint, video.shape, sigmas, context, null, s.guidance_scale, text_len, solver=s.solver,
        temperature=s.text_temperature)
    return out


def _generator(c, model, mesh: jax.sharding.Mesh | None):
    """`run(batch, key)`: `generate` jitted for `model`, on records every process holds whole. With a mesh the batch
    is split over its batch axes (`pipeline.shared_to_global`) and the outputs come back replicated, so that every
    process can read them, however many processes share the mesh."""
    graphdef, state = nnx.split(model)
    if mesh is None:
        run = jax.jit(lambda state, batch, key: generate(c, nnx.merge(graphdef, state), batch, key))
        return lambda batch, key: jax.device_get(run(state, {k: jnp.asarray(v) for k, v in batch.items()}, key))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    run = jax.jit(lambda state, batch, key: generate(c, nnx.merge(graphdef, state), batch, key),
                  out_shardings=replicated)
    return lambda batch, key: jax.device_get(run(state, pipeline.shared_to_global(batch, mesh), key))


def evaluate(c, model, data: pipeline.Datasets, *, workdir: Path, step: int, mesh: jax.sharding.Mesh | None = None,
             should_stop=lambda: False) -> dict[str, Any]:
    """Scores `model` on up to `config.eval_examples` records of validation and test; saves samples of each.
    With `mesh` (the run's) each batch is split over the devices' batch axes, on one process or several.
    `should_stop()` is asked between batches (SIGTERM): an interrupted evaluation returns `{"interrupted": True}`
    and writes nothing, rather than a score over part of the split."""
    scored = PROMPT_ATTRIBUTES if c.data.text_target == "prompt" else ATTRIBUTES
    run = _generator(c, model, mesh)
    report: dict[str, Any] = {"step": step, "stage": c.stage,
                              "chance": toy_metrics.chance_levels(attributes=ATTRIBUTES)}
    for split_index, split in enumerate(("validation", "test")):
        outputs: dict[str, list] = {}
        records_seen: list[dict] = []
        source = getattr(data, split)
        for i, records in enumerate(pipeline.evaluation_batches(source, batch_size=c.eval_batch_size,
                                                                limit=c.eval_examples)):
            if should_stop():
                return {"step": step, "stage": c.stage, "interrupted": True}
            arrays = {k: _stack(records, k) for k in ("latents", "context", "prompt_ids", "prompt_mask")}
            key = jax.random.fold_in(jax.random.key(c.seed + 7919), split_index * 100_003 + i)
            result = run(arrays, key)
            for name, value in result.items():
                outputs.setdefault(name, []).append(np.asarray(value))
            records_seen += records
        truth = [r["attributes"] for r in records_seen]
        videos = data.codec.decode(np.concatenate(outputs["t2v"]))
        split_report = {"t2v": toy_metrics.video_accuracy(videos, truth, attributes=PROMPT_ATTRIBUTES)}
        captions: list[str] = []
        joint: tuple = ()
        if "v2t" in outputs:
            captions = data.tokenizer.decode(np.concatenate(outputs["v2t"]))
            split_report["v2t"] = toy_metrics.caption_accuracy(captions, truth, attributes=scored)
            joint_videos = data.codec.decode(np.concatenate(outputs["joint_video"]))
            joint_captions = data.tokenizer.decode(np.concatenate(outputs["joint_text"]))
            split_report["joint"] = toy_metrics.joint_agreement(joint_videos, joint_captions)
            joint = (joint_videos, joint_captions)
        report[split] = split_report
        _save_samples(Path(workdir) / "samples" / f"step_{step}" / split, c.sample.num_saved, videos, records_seen,
                      captions, joint)
    return report


def _save_samples(folder: Path, n: int, videos, records, captions, joint) -> None:
    """The first `n` T2V clips (GIFs) with their prompt, caption and generated caption, and the first `n` joint
    (video, caption) pairs of `joint` (already decoded for scoring; empty for a bare DiT)."""
    if jax.process_index() != 0 or n <= 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(min(n, len(records))):
        save_gif(folder / f"t2v_{i}.gif", videos[i])
        lines.append(f"[{i}] prompt:    {records[i]['prompt']}")
        lines.append(f"    caption:   {records[i]['caption']}")
        if captions:
            lines.append(f"    generated: {captions[i]}")
    if joint:
        for i, (v, t) in enumerate(zip(joint[0][:n], joint[1][:n])):
            save_gif(folder / f"joint_{i}.gif", v)
            lines.append(f"joint [{i}]: {t}")
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")


def save_gif(path: Path, video: np.ndarray, scale: int = 4) -> None:
    """[F, H, W, 3] in [−1, 1] -> an animated GIF, upscaled `scale`× (nearest) so a 32-px clip is visible."""
    from PIL import Image

    frames = np.clip((np.asarray(video) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=120, loop=0)


def flat_scalars(report: dict[str, Any]) -> dict[str, float]:
    """`eval/{split}/{mode}/{attribute}` scalars for the metric writer."""
    out = {}
    for split in ("validation", "test"):
        for mode, metrics in report.get(split, {}).items():
            for name, value in metrics.items():
                if name != "count":
                    out[f"eval/{split}/{mode}/{name}"] = float(value)
    return out


def sample_real_data(c, model, data: pipeline.Datasets, *, release: Path, workdir: Path, step: int,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Periodic samples of a run on real latent shards (no attribute scorer exists there): for the first
    `config.sample.num_saved` held-out clips (validation, else train), a T2V video from the clip's prompt context and,
    for a UniViGU, the V2T caption of the clip, written as `samples/step_N/t2v_i.mp4` and `captions.txt` (prompt,
    reference caption, generated caption). The VAE decoding them is the release's (`release/vae`)."""
    from uvigu import checkpoint
    from uvigu.data.video import write_video

    source = data.validation if len(data.validation) else data.train
    if isinstance(source, dict):  # buckets: the first one's clips
        source = next(iter(source.values()))
    n = min(c.sample.num_saved, len(source))
    report: dict[str, Any] = {"step": step, "stage": c.stage, "samples": n}
    if n == 0:
        return report
    records = [source[i] for i in range(n)]
    batch = {k: _stack(records, k) for k in ("latents", "context", "prompt_ids", "prompt_mask")}
    out = _generator(c, model, mesh)(batch, jax.random.key(c.seed + 7919))
    vae = checkpoint.load_pretrained(release, kind=checkpoint.WAN_VAE)
    videos = np.asarray(jax.jit(lambda z: jnp.clip((vae.decode(z) + 1.0) / 2.0, 0.0, 1.0))(out["t2v"]))
    captions = data.tokenizer.decode(np.asarray(out["v2t"])) if "v2t" in out else []
    if jax.process_index() == 0:
        folder = Path(workdir) / "samples" / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, record in enumerate(records):
            write_video(folder / f"t2v_{i}.mp4", videos[i], fps=16)
            lines += [f"[{i}] prompt:    {record.get('prompt', '')}", f"    caption:   {record.get('caption', '')}"]
            if captions:
                lines.append(f"    generated: {captions[i]}")
        (folder / "captions.txt").write_text("\n".join(lines) + "\n")
        report["folder"] = str(folder)
    return report
