"""The toy world as a TFDS dataset, so `tfds.data_source("uvigu_toy_world", data_dir=...)` reads it.

No TensorFlow is needed on either side (checked with tensorflow-datasets 4.9.10 and no `tensorflow` installed):
TFDS writes ArrayRecord files of tf.Example protos through its own protobuf copies, and `tfds.data_source` parses
them with its numpy parser.

The builder does not regenerate the world: it copies a built one (`build_toy_world`) record by record, in order
(shuffling disabled), so TFDS and `ToyWorldSource` serve identical examples. It is unregistered on purpose: reading
goes through the files TFDS writes (dataset_info.json, features.json), so a reader needs neither this module nor the
source world, and `tfds.data_source` never tries to build the dataset with missing arguments.

Differences from `ToyWorldSource` records that come from TFDS itself: strings come back as bytes, and `attributes`
is a JSON string (TFDS features are fixed-type tensors).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from uvigu.data.toy_world import ToyWorldPaths, ToyWorldSource, _locked
from uvigu.data.world import SPLITS

NAME = "uvigu_toy_world"
VERSION_STRING = "1.0.0"


class UviguToyWorld(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over a built toy world (`source`). Its name, from the class name, is `uvigu_toy_world`."""

    VERSION = tfds.core.Version(VERSION_STRING)
    RELEASE_NOTES = {VERSION_STRING: "The uvigu 'moving shapes' toy world, copied from its ArrayRecord build."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """No code directory: this builder has no checksums or metadata files next to it. (TFDS 4.9.10's default
        looks that directory up through `importlib_resources`, an undeclared dependency that is not installed.)"""
        return None

    def __init__(self, *, source: ToyWorldPaths | str | os.PathLike, **kwargs):
        self._source = source if isinstance(source, ToyWorldPaths) else ToyWorldPaths.from_root(source)
        self._manifest = self._source.read_manifest()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        fields = self._manifest["fields"]
        # Float arrays are ZLIB-compressed bytes (the flat latents shrink several-fold); ints and masks are small.
        tensors = {name: tfds.features.Tensor(
            shape=tuple(f["shape"]), dtype=np.dtype(f["dtype"]),
            encoding=tfds.features.Encoding.ZLIB if f["dtype"] == "float32" else tfds.features.Encoding.NONE)
            for name, f in fields.items()}
        features = tfds.features.FeaturesDict({
            **tensors,
            "index": np.int64,
            "prompt": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "attributes": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(
            builder=self, features=features, disable_shuffling=True,
            description=f"uvigu toy world, cache key {self._manifest['key']}",
            metadata=tfds.core.MetadataDict(key=self._manifest["key"], encoder_id=self._manifest["encoder_id"]))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the source world is local
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        source = ToyWorldSource(self._source, split)
        fields = self._manifest["fields"]
        for i in range(len(source)):
            record = source[i]
            yield i, {**{name: record[name] for name in fields}, "index": record["index"],
                      "prompt": record["prompt"], "caption": record["caption"],
                      "attributes": json.dumps(record["attributes"], sort_keys=True)}


def export_tfds(paths: ToyWorldPaths, data_dir: str | os.PathLike | None = None) -> Path:
    """Writes the TFDS copy of a built world (once) and returns the `data_dir` to give `tfds.data_source`.

    The default data_dir is `<world>/tfds`, inside the world, so a rebuilt world never meets a stale copy. With an
    explicit data_dir, a copy made from a different world (another cache key) is replaced.
    """
    data_dir = Path(data_dir) if data_dir is not None else paths.root / "tfds"
    key = paths.read_manifest()["key"]
    version_dir = data_dir / NAME / VERSION_STRING
    with _locked(paths.root.parent):
        metadata = version_dir / "metadata.json"
        if version_dir.exists() and not (metadata.exists() and json.loads(metadata.read_text()).get("key") == key):
            shutil.rmtree(version_dir)
        builder = UviguToyWorld(source=paths, data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_dir=str(data_dir / "downloads"))
    return data_dir
