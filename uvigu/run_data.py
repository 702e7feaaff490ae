"""A run's data from its config (application side): the embedded toy world, built on first use with its frozen
toy prompt encoder, or prebuilt latent shards. The library's data layer (`uvigu.data`) reads records and knows no
model; producing the toy world's prompt embeddings needs one, so that wiring lives here.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from uvigu.data.pipeline import Datasets

def open_datasets(c) -> Datasets:
    """The run's data from `config.data`: the embedded toy world (built on first use, cached under `data.path`), or
    prebuilt latent shards in the same manifest + ArrayRecord format (`data.kind='shards'`, `data.path`)."""
    from uvigu.data import toy_world

    d = c.data
    if d.kind == "toy_world":
        paths = build_toy_world_for_run(d.path, seed=d.world_seed, train_size=d.train_size, val_size=d.val_size,
                                        test_size=d.test_size, context_len=c.model.wan.text_len)
    elif d.kind == "shards":
        if not d.path:
            raise ValueError("config.data.kind='shards' needs config.data.path (a folder with a manifest.json)")
        paths = toy_world.ToyWorldPaths.from_root(d.path)
    else:
        raise ValueError(f"config.data.kind={d.kind!r} is not 'toy_world' or 'shards'")
    buckets = paths.buckets("train")
    # Several latent shapes (buckets): one source per bucket, so that a batch holds one shape.
    train = ({b: toy_world.ToyWorldSource(paths, "train", bucket=b) for b in buckets} if len(buckets) > 1
             else toy_world.ToyWorldSource(paths, "train"))
    first = (next(iter(train.values())) if isinstance(train, dict) else train)[0]
    return Datasets(train=train, validation=toy_world.ToyWorldSource(paths, "validation"),
                    test=toy_world.ToyWorldSource(paths, "test"), tokenizer=paths.open_tokenizer(),
                    # The toy codec is rebuilt from its description; a WanVAE (params) is loaded only when samples
                    # are decoded (`uvigu.evaluate.sample_real_data`).
                    codec=paths.open_codec() if paths.read_manifest()["codec"].get("name") == "ToyCodec" else None,
                    latent_shape=tuple(first["latents"].shape), context_shape=tuple(first["context"].shape),
                    manifest=paths.read_manifest())


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

    @functools.cache
    def encoder() -> UMT5Encoder:  # made on the first prompt only: a cached world needs no encoder (seconds of init)
        return UMT5Encoder(enc_cfg, rngs=nnx.Rngs(TOY_ENCODER_SEED))

    @nnx.jit
    def encode(encoder, ids, mask):
        return wan_context(encoder(ids, mask), mask, context_len)

    encoder_id = json.dumps({"umt5": enc_cfg.to_dict(), "seed": TOY_ENCODER_SEED, "context_len": context_len},
                            sort_keys=True)
    return toy_world.build_toy_world(cache_dir, spec, tok,
                                     lambda ids, mask: np.asarray(encode(encoder(), ids, mask)), encoder_id)
