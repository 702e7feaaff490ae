"""A SentencePiece tokenizer trained on the toy world's corpus, behind the interface umT5's tokenizer will share.

Ids follow umT5's convention: pad 0, eos 1, unk 2, no bos. `encode` appends eos, pads to a fixed length and, if a
text is too long, truncates it keeping the eos last (what a Hugging Face T5 tokenizer does with truncation=True), so
a truncated text still ends like a text.

The toy tokenizer is a SentencePiece *word* model: the corpus has about thirty distinct words and a word model makes
every attribute word exactly one token, which keeps captions short (≤ 15 tokens) and their parsing unambiguous.
`tokenizer_max_vocab` is a cap, not a target (hard_vocab_limit off): the vocabulary is the words that occur plus
the three specials. Training is single-threaded on an in-order corpus, so the model file is byte-identical run to run.

Shape letters: B batch, S tokens.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from uvigu.data.world import WorldSpec, training_corpus

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# Bumped when the trainer options below change: part of the tokenizer's cache key.
TRAINER_VERSION = 1


class SentencePieceTokenizer:
    """encode(texts, max_len) -> (ids, mask); decode(ids) -> texts; vocab_size, pad_id, eos_id. Picklable (it carries
    the serialized model, not the C++ processor), so grain worker processes can hold one."""

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"tokenizer ids pad/eos/unk are {self._sp.pad_id()}/{self._sp.eos_id()}/"
                             f"{self._sp.unk_id()}, expected {PAD_ID}/{EOS_ID}/{UNK_ID} (umT5's convention)")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    @classmethod
    def train(cls, texts: Iterable[str], max_vocab: int = 128) -> "SentencePieceTokenizer":
        """Trains a word model on `texts` (in memory, in order)."""
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="word", vocab_size=max_vocab,
            hard_vocab_limit=False, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            normalization_rule_name="identity", num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, character_coverage=1.0, minloglevel=2)
        return cls(model.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model file atomically (a reader never sees half a file)."""
        _atomic_write(Path(path), self.model_proto)

    def __getstate__(self):
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    @property
    def sha256(self) -> str:
        """Identity of the vocabulary: part of the cache key of anything tokenised with it."""
        return hashlib.sha256(self.model_proto).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including the eos: what `encode` needs as max_len to keep every text whole."""
        return [len(ids) + 1 for ids in self._sp.encode(list(texts), out_type=int)]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int32 [B, max_len], mask bool [B, max_len]): tokens, eos, then pad; mask covers the eos."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        ids = np.full((len(texts), max_len), PAD_ID, np.int32)
        for row, tokens in enumerate(self._sp.encode(list(texts), out_type=int)):
            tokens = tokens[: max_len - 1] + [EOS_ID]
            ids[row, : len(tokens)] = tokens
        mask = np.zeros_like(ids, dtype=bool)
        lengths = (ids != PAD_ID).sum(-1)
        mask[np.arange(max_len)[None, :] < lengths[:, None]] = True
        return ids, mask

    def decode(self, ids) -> list[str]:
        """ids [B, S] -> texts. Each row stops at its first eos and skips pads; an id outside the vocabulary (a model
        whose text head is wider than the vocabulary can emit one) decodes as unk."""
        out = []
        for row in np.asarray(ids).tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            row = [i if 0 <= i < self.vocab_size else UNK_ID for i in row if i != PAD_ID]
            out.append(self._sp.decode(row))
        return out


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any build output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenizer_path(cache_dir: str | os.PathLike, spec: WorldSpec) -> Path:
    """Where `build_tokenizer` caches the tokenizer of a world: keyed by the world (its training corpus) and the
    trainer options."""
    key = hashlib.sha256(f"{spec.fingerprint()}:{TRAINER_VERSION}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"toy_tokenizer-{key}.model"


def build_tokenizer(cache_dir: str | os.PathLike, spec: WorldSpec) -> SentencePieceTokenizer:
    """The world's tokenizer, trained on its training prompts and captions on first use and cached in `cache_dir`.

    Call this before building the prompt encoder: the encoder's embedding table needs `vocab_size`.
    """
    path = tokenizer_path(cache_dir, spec)
    if path.exists():
        return SentencePieceTokenizer.load(path)
    tokenizer = SentencePieceTokenizer.train(training_corpus(spec), spec.tokenizer_max_vocab)
    tokenizer.save(path)
    return tokenizer
