"""umT5's tokenizer (Wan2.1's prompt tokenizer, `google/umt5-xxl`), behind the toy `SentencePieceTokenizer`'s interface.

Reference: what transformers (5.x) builds when `AutoTokenizer.from_pretrained` loads a T5 tokenizer folder, called the
way diffusers' WanPipeline calls it (padding="max_length", max_length=S, truncation=True, add_special_tokens=True).
That tokenizer does not run the folder's tokenizer.json pipeline as saved: it keeps only the vocabulary (a Unigram
model, unk id 2, no byte fallback), the SentencePiece normalisation table (`Precompiled` charsmap) and the added
special tokens, and rebuilds the rest as T5's fixed pipeline:

    normalizer     Precompiled(charsmap)                       (none if the file has no charsmap)
    pre-tokenizer  WhitespaceSplit, then Metaspace("▁", prepend_scheme="always", split=True)
    post-processor "$A </s>"                                   (eos appended, no bos)
    decoder        Metaspace("▁", prepend_scheme="always", split=True)

We build exactly that with the `tokenizers` library, from tokenizer.json when the folder has one, else from
spiece.model (its pieces and charsmap read from the SentencePiece model proto, as transformers' converter does; the
T5 converter appends `extra_ids` sentinels `<extra_id_{n-1}> … <extra_id_0>`, 100 unless tokenizer_config.json says
otherwise). Older tokenizer.json files (e.g. google/umt5-xxl's, written by transformers 4) carry a slightly different
pipeline (Replace(" {2,}", " ") after the charsmap, Metaspace without WhitespaceSplit); on prompts cleaned by
`clean_prompt` both give the same ids, on raw text the rebuilt one is what transformers 5 gives.

Ids follow umT5's convention, checked on load: pad 0, eos 1, unk 2. `encode` truncates the text tokens to S - 1 and
appends eos (transformers' truncation=True with one special token), then pads with pad 0; the mask covers text + eos.

Shape letters: B batch, S tokens.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default when tokenizer_config.json does not say

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CONFIG_FILE = "config.json"  # written by tools.convert_wan_weights next to the tokenizer files
MODEL_KIND = "umt5_tokenizer"
FORMAT_VERSION = 1

SUBFOLDERS = ("tokenizer", "google/umt5-xxl")  # DST / diffusers pipeline; original Wan2.1 release
_EXTRA_ID = re.compile(r"^<extra_id_\d+>$")


class TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be loaded as umT5's tokenizer; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers' WanPipeline / Wan's HuggingfaceTokenizer(clean="whitespace")).
# ----------------------------------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """What WanPipeline does to a prompt before tokenising: ftfy.fix_text (only when ftfy is installed, as there),
    HTML-unescape twice, strip, then collapse every whitespace run to one space and strip."""
    if not isinstance(text, str):
        raise TypeError(f"clean_prompt takes a str, got {type(text).__name__}")
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer.
# ----------------------------------------------------------------------------------------------------------------------


class UMT5Tokenizer:
    """encode(texts, max_len) -> (ids, mask); decode(ids) -> texts; vocab_size, pad_id, eos_id. Picklable (it carries
    the serialized `tokenizers` pipeline), so grain worker processes can hold one."""

    def __init__(self, tokenizer: Tokenizer, *, source: str = "", built_from: str = "", notes: Sequence[str] = ()):
        self._tok = tokenizer
        self.source = str(source)
        self.built_from = built_from
        self.notes = list(notes)
        self._tok.no_truncation()
        self._tok.no_padding()
        for token, want in ((PAD, PAD_ID), (EOS, EOS_ID), (UNK, UNK_ID)):
            got = self._tok.token_to_id(token)
            if got != want:
                where = "/".join(filter(None, (self.source, self.built_from))) or "tokenizer"
                raise TokenizerError(f"{where}: {token} has id {got}, expected {want} (umT5's pad/eos/unk convention)")
        self._special_ids = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special) | {PAD_ID, EOS_ID, UNK_ID}

    # --- construction -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "UMT5Tokenizer":
        """From a folder: ours (`DST/tokenizer/`, written by tools.convert_wan_weights), a raw `google/umt5-xxl/` or a
        diffusers `tokenizer/`, or a folder holding one of those (DST, pipeline or release root). tokenizer.json is
        used when present, else spiece.model."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: no such tokenizer folder")
        if not any((folder / f).is_file() for f in (TOKENIZER_JSON, SPIECE_MODEL)):
            # a converted DST, a diffusers pipeline or an original release folder: its tokenizer subfolder
            sub = next((folder / s for s in SUBFOLDERS if (folder / s).is_dir()), None)
            folder = sub if sub is not None else folder
        notes = []
        if (folder / CONFIG_FILE).is_file():
            meta = read_json(folder / CONFIG_FILE)
            if meta.get("model") == MODEL_KIND and meta.get("format_version") != FORMAT_VERSION:
                raise TokenizerError(f"{folder / CONFIG_FILE}: format_version {meta.get('format_version')!r}; this "
                                     f"code reads version {FORMAT_VERSION}")
        config = tokenizer_config(folder)
        if (folder / TOKENIZER_JSON).is_file():
            tok = build_from_tokenizer_json(folder / TOKENIZER_JSON, notes)
            built_from = TOKENIZER_JSON
        elif (folder / SPIECE_MODEL).is_file():
            tok = build_from_spiece(folder / SPIECE_MODEL, config, notes)
            built_from = SPIECE_MODEL
        else:
            raise TokenizerError(f"{folder}: no {TOKENIZER_JSON} or {SPIECE_MODEL}; expected a google/umt5-xxl, a "
                                 "diffusers tokenizer/ or a converted DST/tokenizer folder")
        return cls(tok, source=str(folder), built_from=built_from, notes=notes)

    @classmethod
    def from_str(cls, serialized: str, **kwargs) -> "UMT5Tokenizer":
        """From `to_str()`'s text (the pipeline kept as serialized, the vocabulary scores parsed exactly)."""
        return cls(_exact_from_str(serialized), **kwargs)

    def to_str(self) -> str:
        """The rebuilt pipeline as tokenizer.json text (the converter writes it when a folder has only spiece.model)."""
        return self._tok.to_str()

    def __getstate__(self):
        return {"json": self.to_str(), "source": self.source, "built_from": self.built_from, "notes": self.notes}

    def __setstate__(self, state):
        self.__init__(_exact_from_str(state["json"]), source=state["source"], built_from=state["built_from"],
                      notes=state["notes"])

    # --- properties ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can emit (pieces, sentinels and added tokens): transformers' `len(tokenizer)`."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def sha256(self) -> str:
        """Identity of the tokenization (the serialized pipeline): part of the cache key of anything tokenised."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"model": MODEL_KIND, "source": self.source, "built_from": self.built_from,
                "vocab_size": self.vocab_size, "pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
                "sha256": self.sha256, "notes": list(self.notes)}

    def __repr__(self) -> str:
        return f"UMT5Tokenizer({self.source!r}, vocab_size={self.vocab_size}, from {self.built_from or '?'})"

    # --- encode / decode ----------------------------------------------------------------------------------------------

    def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including the eos: what `encode` needs as max_len to keep every text whole."""
        return [len(ids) + 1 for ids in self._tokens(texts)]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int32 [B, max_len], mask bool [B, max_len]): tokens (cut to max_len - 1), eos, then pad."""
        if not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        rows = self._tokens(texts)
        ids = np.full((len(rows), max_len), PAD_ID, np.int32)
        mask = np.zeros((len(rows), max_len), bool)
        for r, tokens in enumerate(rows):
            tokens = tokens[: max_len - 1] + [EOS_ID]
            ids[r, : len(tokens)] = tokens
            mask[r, : len(tokens)] = True
        return ids, mask

    def decode(self, ids) -> list[str]:
        """ids [B, S] -> texts. Each row stops at its first eos; pad, unk, sentinels and other special tokens are
        skipped, and so is an id outside the vocabulary (a text head wider than the vocabulary can emit one)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"decode takes ids of shape [B, S], got {ids.shape}")
        out = []
        for row in ids.tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            row = [i for i in row if 0 <= i < self.vocab_size and i not in self._special_ids]
            out.append(self._tok.decode(row, skip_special_tokens=True))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Building the pipeline.
# ----------------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json merged over special_tokens_map.json (either may be absent)."""
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        if (folder / name).is_file():
            config.update(read_json(folder / name))
    return config


def _exact_from_str(serialized: str) -> Tokenizer:
    """Tokenizer.from_str, with the Unigram scores re-set from Python's exact JSON parse: the Rust side's float parsing
    can be one ulp off, which would make a save / load round trip change the scores (and the identity hash)."""
    tok = Tokenizer.from_str(serialized)
    vocab = json.loads(serialized)["model"]["vocab"]
    tok.model = Unigram([(str(p), float(s)) for p, s in vocab], unk_id=UNK_ID, byte_fallback=False)
    return tok


def _t5_pipeline(tok: Tokenizer, charsmap: bytes | None) -> Tokenizer:
    """Installs T5's fixed normalizer / pre-tokenizer / decoder / post-processor (see the module docstring)."""
    tok.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", EOS], pair=["$A", EOS, "$B", EOS],
                                                       special_tokens=[(EOS, EOS_ID)])
    return tok


def _charsmap_of_json(normalizer: Any) -> bytes | None:
    if not normalizer:
        return None
    items = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for item in items:
        if isinstance(item, dict) and item.get("type") == "Precompiled" and item.get("precompiled_charsmap"):
            return base64.b64decode(item["precompiled_charsmap"])
    return None


def build_from_tokenizer_json(path: Path, notes: list[str] | None = None) -> Tokenizer:
    """A T5 Unigram tokenizer.json -> the rebuilt pipeline (its vocabulary, charsmap and added tokens kept)."""
    notes = [] if notes is None else notes
    raw = read_json(path)
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise TokenizerError(f"{path}: not a SentencePiece Unigram tokenizer (model type "
                             f"{model.get('type') if isinstance(model, dict) else None!r}); umT5's is Unigram")
    try:
        tok = _exact_from_str(json.dumps(raw))
    except Exception as e:  # tokenizers raises plain Exceptions for a malformed file
        raise TokenizerError(f"{path}: cannot be read by the tokenizers library ({type(e).__name__}: {e})") from None
    charsmap = _charsmap_of_json(raw.get("normalizer"))
    if charsmap is None:
        notes.append(f"{path.name} has no Precompiled normalizer: text is not NFKC-normalised")
    if raw.get("pre_tokenizer", {}) and raw["pre_tokenizer"].get("type") != "Sequence":
        notes.append(f"{path.name}: its own pre-tokenizer ({raw['pre_tokenizer'].get('type')}) replaced by T5's "
                     "WhitespaceSplit + Metaspace, as transformers does")
    return _t5_pipeline(tok, charsmap)


def read_spiece_proto(path: Path):
    """The parsed SentencePiece ModelProto (needs sentencepiece and protobuf)."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as e:
        raise TokenizerError(f"{path}: reading a spiece.model needs sentencepiece and protobuf ({e}); a folder with "
                             "tokenizer.json needs neither") from None
    data = Path(path).read_bytes()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
        spm.SentencePieceProcessor(model_proto=data)  # the library's own validation, too
    except Exception as e:  # protobuf DecodeError, sentencepiece's RuntimeError
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: a SentencePiece model with no pieces")
    if proto.trainer_spec.model_type != 1:  # UNIGRAM
        raise TokenizerError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not Unigram (1)")
    return proto


def build_from_spiece(path: Path, config: dict[str, Any] | None = None, notes: list[str] | None = None) -> Tokenizer:
    """spiece.model (+ tokenizer_config.json's extra_ids / additional_special_tokens) -> the rebuilt pipeline."""
    notes = [] if notes is None else notes
    config = config or {}
    proto = read_spiece_proto(path)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    have = {p for p, _ in vocab}
    extra = [t for t in _special_token_names(config.get("additional_special_tokens") or []) if _EXTRA_ID.match(t)]
    n_extra = len(extra) if extra else int(config.get("extra_ids", DEFAULT_EXTRA_IDS))
    sentinels = [f"<extra_id_{i}>" for i in range(n_extra - 1, -1, -1)]
    vocab += [(t, 0.0) for t in sentinels if t not in have]
    if "extra_ids" not in config and not extra:
        notes.append(f"no extra_ids in {TOKENIZER_CONFIG}: {DEFAULT_EXTRA_IDS} sentinels appended (transformers' "
                     "default)")
    tok = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    # SentencePiece control pieces (type 3) are special tokens; user-defined ones (type 4) are matched verbatim.
    specials = [p.piece for p in proto.pieces if p.type == 3] + [PAD, EOS, UNK] + sentinels[::-1]
    specials += [t for t in _special_token_names(config.get("additional_special_tokens") or []) if t in have]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    user = [p.piece for p in proto.pieces if p.type == 4]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    return _t5_pipeline(tok, charsmap)


def _special_token_names(items) -> list[str]:
    """additional_special_tokens entries are strings or AddedToken dicts ({"content": ...})."""
    return [t["content"] if isinstance(t, dict) else str(t) for t in items]


__all__ = ["UMT5Tokenizer", "TokenizerError", "clean_prompt", "build_from_spiece", "build_from_tokenizer_json",
           "read_spiece_proto", "tokenizer_config", "PAD_ID", "EOS_ID", "UNK_ID"]
