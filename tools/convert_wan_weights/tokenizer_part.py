"""The umT5 tokenizer part of the converter: a Wan2.1 release's tokenizer files -> `DST/tokenizer/`, which
`uvigu.data.umt5_tokenizer.UMT5Tokenizer.load` reads.

Where it is in SRC: `google/umt5-xxl/` (original release) or `tokenizer/` (diffusers pipeline), holding spiece.model
and/or tokenizer.json plus tokenizer_config.json / special_tokens_map.json. A lone tokenizer folder works too.

DST/tokenizer/ gets the tokenizer files copied unchanged, and

    config.json  {"model": "umt5_tokenizer", "format_version": 1, "source": {...}, "files": {name: sha256},
                  "built_from": "tokenizer.json" | "spiece.model", "vocab_size": V, "pad_id": 0, "eos_id": 1, ...}

When SRC has only spiece.model, the tokenizer.json of the pipeline `UMT5Tokenizer` rebuilds from it (the one
transformers builds; ids checked equal to transformers' in tests/test_convert_text_parts.py) is written too, so that
loading DST/tokenizer needs only the `tokenizers` library. Every file is validated before anything is written:
JSON files must parse, spiece.model must load in sentencepiece, tokenizer.json in tokenizers, and when both are
present their vocabularies must agree (a mixed download otherwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tools.convert_wan_weights.conversion import ConversionError
from tools.convert_wan_weights.jsonfile import read_json
from uvigu import checkpoint
from uvigu.data import umt5_tokenizer as ut

PART = "tokenizer"
ORIGINAL, DIFFUSERS, FOLDER = "original", "diffusers", "folder"
ORIGINAL_SUBFOLDER = Path("google") / "umt5-xxl"
DIFFUSERS_SUBFOLDER = Path("tokenizer")
TOKENIZER_FILES = (ut.SPIECE_MODEL, ut.TOKENIZER_JSON)
CONFIG_FILES = (ut.TOKENIZER_CONFIG, ut.SPECIAL_TOKENS_MAP, "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class Located:
    """Where the tokenizer is in SRC: its layout, the folder and the files found there (tokenizer and configs)."""

    layout: str  # ORIGINAL, DIFFUSERS or FOLDER (SRC itself is a tokenizer folder)
    folder: Path
    files: tuple[str, ...]


def locate(src: Path) -> Located | None:
    """The tokenizer folder in SRC (google/umt5-xxl/, tokenizer/, or SRC itself); None when SRC has none. A folder
    that is there but holds neither spiece.model nor tokenizer.json is still returned, so `convert` can say so."""
    src = Path(src)
    if not src.is_dir():
        return None
    for layout, sub in ((ORIGINAL, ORIGINAL_SUBFOLDER), (DIFFUSERS, DIFFUSERS_SUBFOLDER)):
        if (src / sub).is_dir():
            return Located(layout, src / sub, _present(src / sub))
    if any((src / name).is_file() for name in TOKENIZER_FILES):
        return Located(FOLDER, src, _present(src))
    return None


def _present(folder: Path) -> tuple[str, ...]:
    return tuple(name for name in TOKENIZER_FILES + CONFIG_FILES if (folder / name).is_file())


def convert(located: Located, out: Path, *, dtype: str = "keep", overwrite: bool = False) -> dict[str, Any]:
    """Validates the tokenizer files and writes `out` (e.g. DST/tokenizer); returns a summary dict. `dtype` is
    accepted for the part contract and ignored (a tokenizer has no weights). Raises ConversionError naming the file on
    bad input; nothing is left at `out` then."""
    del dtype
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")
    folder = located.folder
    files = _present(folder)
    if not any(name in files for name in TOKENIZER_FILES):
        raise ConversionError(f"{folder}: no tokenizer files: needs {ut.SPIECE_MODEL} and/or {ut.TOKENIZER_JSON} "
                              f"(found {sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no folder'})")
    for name in files:  # first with our reader: it names the file for every kind of broken JSON
        if name.endswith(".json"):
            read_json(folder / name, ConversionError)
    try:
        for name in files:
            if name.endswith(".json"):
                ut.read_json(folder / name)
        if ut.SPIECE_MODEL in files:
            proto = ut.read_spiece_proto(folder / ut.SPIECE_MODEL)
        tokenizer = ut.UMT5Tokenizer.load(folder)
    except ut.TokenizerError as e:
        raise ConversionError(str(e)) from None
    notes = list(tokenizer.notes)
    if ut.SPIECE_MODEL in files and ut.TOKENIZER_JSON in files:
        _check_same_vocab(folder, proto)

    source = {"part": PART, "layout": located.layout, "folder": str(folder.resolve()), "files": list(files),
              "converter": "tools.convert_wan_weights", "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with checkpoint.staged_folder(out, overwrite) as staging:
        for name in files:
            shutil.copyfile(folder / name, staging / name)
        if ut.TOKENIZER_JSON not in files:
            (staging / ut.TOKENIZER_JSON).write_text(tokenizer.to_str(), encoding="utf-8")
            notes.append(f"{ut.TOKENIZER_JSON} built from {ut.SPIECE_MODEL} (the pipeline transformers builds)")
        written = sorted(p.name for p in staging.iterdir())
        reloaded = ut.UMT5Tokenizer.load(staging)  # what a reader of `out` will get; must equal what we validated
        if reloaded.sha256 != tokenizer.sha256:
            raise ConversionError(f"{out}: the written tokenizer differs from the source's ({folder}); a bug")
        meta = {
            "model": ut.MODEL_KIND,
            "format_version": ut.FORMAT_VERSION,
            "built_from": tokenizer.built_from,
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
            "unk_id": tokenizer.unk_id,
            "sha256": tokenizer.sha256,
            "files": {name: _sha256(staging / name) for name in written},
            "source": source,
            "notes": notes,
        }
        (staging / ut.CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "part": PART,
        "layout": located.layout,
        "source": str(folder),
        "output": str(out),
        "files": written + [ut.CONFIG_FILE],
        "built_from": tokenizer.built_from,
        "vocab_size": tokenizer.vocab_size,
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }


def _check_same_vocab(folder: Path, proto) -> None:
    """spiece.model and tokenizer.json must hold the same pieces (tokenizer.json may append sentinels)."""
    raw = ut.read_json(folder / ut.TOKENIZER_JSON)
    vocab = [p for p, _ in raw["model"]["vocab"]]
    pieces = [p.piece for p in proto.pieces]
    if vocab[: len(pieces)] != pieces:
        first = next((i for i, (a, b) in enumerate(zip(vocab, pieces)) if a != b), min(len(vocab), len(pieces)))
        raise ConversionError(
            f"{folder}: {ut.SPIECE_MODEL} ({len(pieces)} pieces) and {ut.TOKENIZER_JSON} ({len(vocab)} pieces) hold "
            f"different vocabularies (first difference at id {first}); do they come from the same download?")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summary(result: dict[str, Any]) -> str:
    lines = [f"umT5 tokenizer ({result['layout']}) {result['source']} -> {result['output']}",
             f"  vocab_size {result['vocab_size']}, built from {result['built_from']}, files {result['files']}"]
    return "\n".join(lines + [f"  note: {n}" for n in result["notes"]])


__all__ = ["Located", "locate", "convert", "summary", "PART"]
