"""Grain input pipeline: example records -> seeded shuffle (a new order each epoch) -> this process's slice ->
batches of training arrays -> global jax.Arrays on the mesh.

A record (what the toy-world shards and, later, real latent shards hold) is a dict with at least
    latents       float [T, h, w, C]   VAE / codec latents of the video (normalised)
    context       float [S_c, G]       precomputed prompt embedding (umT5), zero-padded
    prompt_ids    int   [S_p]          tokenised short prompt      (+ prompt_mask bool [S_p])
    caption_ids   int   [S_d]          tokenised detailed caption  (+ caption_mask bool [S_d])
The training target text is chosen by stage: stage 1 recalls the prompt, stage 2 the detailed caption.

The iterator is a `grain.DatasetIterator`: its state (a few integers) is saved with every checkpoint, so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import grain
import jax
import numpy as np

TextTarget = Literal["prompt", "caption", "none"]
TRAIN_FIELDS = ("latents", "context", "text_ids", "text_mask")


def text_attention_mask(mask, loss_on_padding: bool):
    """The text mask a step uses for attention and loss.

    With `loss_on_padding` the padding after the eos is part of the target: V2T generates a fixed-length sequence,
    so the model must learn to write eos and then padding, and at inference (no length known) every text position
    is visible, as in training. Without it, padding is invisible to attention and loss (variable-length training
    on ragged captions)."""
    return (mask | True) if loss_on_padding else mask  # all True, same array type (numpy or jax)


class SelectTrainingFields(grain.transforms.Map):
    """Keeps the arrays a training step needs and names the target text generically (`text_ids`, `text_mask`)."""

    def __init__(self, target: TextTarget, loss_on_padding: bool = True):
        if target not in ("prompt", "caption", "none"):
            raise ValueError(f"text target {target!r} is not 'prompt', 'caption' or 'none'")
        self.target = target
        self.loss_on_padding = loss_on_padding

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {"latents": np.asarray(record["latents"], np.float32),
               "context": np.asarray(record["context"], np.float32)}
        if self.target == "none":
            out["text_ids"] = np.zeros((0,), np.int32)
            out["text_mask"] = np.zeros((0,), bool)
        else:
            out["text_ids"] = np.asarray(record[f"{self.target}_ids"], np.int32)
            out["text_mask"] = text_attention_mask(np.asarray(record[f"{self.target}_mask"], bool),
                                                   self.loss_on_padding)
        return out


def training_dataset(
    source,
    *,
    global_batch_size: int,
    target: TextTarget,
    seed: int,
    loss_on_padding: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """An endless stream of this process's share of each global batch.

    `source`: one random-access source, or {bucket: source} for records of several shapes (latent buckets): every
    global batch then comes from one bucket, drawn per step with probability ∝ its size (seeded, so the same on every
    process and after a resume), and each bucket compiles the train step once.

    Order: each bucket's examples shuffled with `seed` (reshuffled every epoch) and repeated; global batch s is rows
    [s·B, (s + 1)·B) of its bucket's stream, and this process reads only its rows of it, the contiguous block
    [p·b, (p + 1)·b) with b = B / P, which is what its devices hold of the global array (`to_global`: the batch axis
    sharded over the mesh's process-major device order). So every process reads a disjoint slice, and the global
    batch (its rows, their order, hence every per-row random draw) is the same whatever the process count. (With
    several buckets, a bucket's stream advances with the step, not with its own draws: over an epoch each bucket is a
    uniform random sample, not an exact permutation.)
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
    sources = dict(source) if isinstance(source, Mapping) else {"": source}
    empty = [name or "train" for name, s in sources.items() if len(s) == 0]
    if empty:
        raise ValueError(f"the training source has no examples ({', '.join(empty)})")
    names = sorted(sources)
    streams = [grain.MapDataset.source(sources[n]).shuffle(seed=seed + i).repeat(None) for i, n in enumerate(names)]
    sizes = np.asarray([len(sources[n]) for n in names], np.float64)
    local = global_batch_size // process_count
    offset = process_index * local

    def bucket_of(step: int) -> int:
        if len(names) == 1:
            return 0
        return int(np.random.default_rng([seed, step]).choice(len(names), p=sizes / sizes.sum()))

    def example(i: int):
        step, row = divmod(i, local)
        return streams[bucket_of(step)][step * global_batch_size + offset + row]

    ds = grain.MapDataset.range(len(streams[0]) // global_batch_size * local).map(example)
    ds = ds.map(SelectTrainingFields(target, loss_on_padding))
    ds = ds.batch(local, drop_remainder=True)
    return ds.to_iter_dataset()


def evaluation_batches(source, *, batch_size: int, limit: int | None = None) -> list[list[dict[str, Any]]]:
    """The first `limit` records of an evaluation split (all fields, in order), grouped in batches of records."""
    n = len(source) if limit is None else min(limit, len(source))
    records = [source[i] for i in range(n)]
    return [records[i : i + batch_size] for i in range(0, n, batch_size)]


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over the batch axes of the mesh."""
    spec = jax.sharding.PartitionSpec(("data", "fsdp"))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def shared_to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """A batch every process holds whole (an evaluation batch) -> global arrays split over the batch axes of the mesh
    (each device works on its own rows), or replicated when the batch size does not divide over those axes."""
    spec = jax.sharding.PartitionSpec(("data", "fsdp"))
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        sharding = jax.sharding.NamedSharding(mesh, spec if v.shape[0] % rows == 0 else jax.sharding.PartitionSpec())
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Opening a run's data.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Datasets:
    """Everything a run reads: the three splits, the tokenizer and codec the records were made with, and the
    context a dropped / unconditional prompt gets (zeros: what condition dropout trains on)."""

    train: Any
    validation: Any
    test: Any
    tokenizer: Any
    codec: Any
    latent_shape: tuple[int, ...]  # [T, h, w, C] of one example (of the first bucket)
    context_shape: tuple[int, ...]  # [S_c, G]
    manifest: dict | None = None  # the shard set's manifest (model folder, codec, buckets, counts)

    @property
    def null_context(self) -> np.ndarray:
        return np.zeros(self.context_shape, np.float32)

    def check_shapes(self, *, in_channels: int, out_channels: int, text_dim: int,
                     vocab_size: int | None = None) -> None:
        """Fails early, naming both sides, when the data and the model's shapes disagree (the caller passes the
        model's numbers: the data layer knows no model)."""
        channels, width = self.latent_shape[-1], self.context_shape[-1]
        if in_channels != channels or out_channels != channels:
            raise ValueError(f"data latents have {channels} channels; the model's in/out_channels are "
                             f"{in_channels}/{out_channels} (config.model.wan)")
        if text_dim != width:
            raise ValueError(f"data context width is {width}; the model's text_dim is {text_dim}")
        if vocab_size is not None and vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens; config.model.univigu.vocab_size "
                             f"is {vocab_size}")
