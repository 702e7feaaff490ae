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
import json
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

    Order: shuffle with `seed` (reshuffled every epoch), repeat, take every `process_count`-th example starting at
    `process_index` (each host reads a disjoint slice), batch `global_batch_size / process_count` per host.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
    if len(source) == 0:
        raise ValueError("the training source has no examples")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(SelectTrainingFields(target, loss_on_padding))
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
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
    latent_shape: tuple[int, ...]  # [T, h, w, C] of one example
    context_shape: tuple[int, ...]  # [S_c, G]

    @property
    def null_context(self) -> np.ndarray:
        return np.zeros(self.context_shape, np.float32)

    def check_model(self, model) -> None:
        """Fails early, naming both sides, when the data and the model's shapes disagree."""
        from uvigu.models.univigu import UniViGU

        dit = model.dit if isinstance(model, UniViGU) else model
        channels, text_dim = self.latent_shape[-1], self.context_shape[-1]
        if dit.config.in_channels != channels or dit.config.out_channels != channels:
            raise ValueError(f"data latents have {channels} channels; the model's in/out_channels are "
                             f"{dit.config.in_channels}/{dit.config.out_channels} (config.model.wan)")
        if dit.config.text_dim != text_dim:
            raise ValueError(f"data context width is {text_dim}; the model's text_dim is {dit.config.text_dim}")
        if isinstance(model, UniViGU) and model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens; config.model.univigu.vocab_size "
                             f"is {model.config.vocab_size}")


def open_datasets(c) -> Datasets:
    """The run's data from `config.data`: the embedded toy world (built on first use, cached under `data.path`), or
    prebuilt latent shards in the same manifest + ArrayRecord format (`data.kind='shards'`, `data.path`)."""
    from uvigu.data import toy_world

    d = c.data
    if d.kind == "toy_world":
        paths = build_toy_world_for_run(d.path, seed=c.seed, train_size=d.train_size, val_size=d.val_size,
                                        test_size=d.test_size, context_len=c.model.wan.text_len)
    elif d.kind == "shards":
        if not d.path:
            raise ValueError("config.data.kind='shards' needs config.data.path (a folder with a manifest.json)")
        paths = toy_world.ToyWorldPaths.from_root(d.path)
    else:
        raise ValueError(f"config.data.kind={d.kind!r} is not 'toy_world' or 'shards'")
    splits = {s: toy_world.ToyWorldSource(paths, s) for s in ("train", "validation", "test")}
    first = splits["train"][0]
    return Datasets(train=splits["train"], validation=splits["validation"], test=splits["test"],
                    tokenizer=paths.open_tokenizer(), codec=paths.open_codec(),
                    latent_shape=tuple(first["latents"].shape), context_shape=tuple(first["context"].shape))


# The toy world's frozen prompt encoder: umT5's architecture, tiny, random weights from this seed.
TOY_ENCODER_SEED = 1234


def build_toy_world_for_run(cache_dir: str, *, seed: int, train_size: int, val_size: int, test_size: int,
                            context_len: int):
    """Builds (or reuses) the toy world: its tokenizer first, then the tiny umT5 encoder sized to that vocabulary,
    whose embeddings of every prompt (zero-padded to `context_len`, as Wan prepares umT5 output) go into the
    shards."""
    from flax import nnx

    from uvigu.data import tokenizer as toy_tokenizer
    from uvigu.data import toy_world
    from uvigu.data.world import WorldSpec
    from uvigu.models.umt5 import UMT5Config, UMT5Encoder, wan_context

    spec = WorldSpec(seed=seed, num_train=train_size, num_validation=val_size, num_test=test_size)
    tok = toy_tokenizer.build_tokenizer(cache_dir, spec)
    enc_cfg = UMT5Config.preset("tiny", vocab_size=tok.vocab_size)
    encoder = UMT5Encoder(enc_cfg, rngs=nnx.Rngs(TOY_ENCODER_SEED))

    @nnx.jit
    def encode(encoder, ids, mask):
        return wan_context(encoder(ids, mask), mask, context_len)

    encoder_id = json.dumps({"umt5": enc_cfg.to_dict(), "seed": TOY_ENCODER_SEED, "context_len": context_len},
                            sort_keys=True)
    return toy_world.build_toy_world(cache_dir, spec, tok,
                                     lambda ids, mask: np.asarray(encode(encoder, ids, mask)), encoder_id)
