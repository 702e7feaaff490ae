"""`python -m uvigu.data.preprocess`: videos + prompts (+ detailed captions) -> latent shards for training.

    python -m uvigu.data.preprocess --manifest data.jsonl --model DST --out SHARDS \
        [--frames 81 --height 480 --width 832 | --buckets 81x480x832,49x480x832,81x832x480] \
        [--shard_size 64] [--val_fraction 0.0] [--max_text_len 256] [--process_index i --process_count n]

Input: a jsonl manifest, one `{"video": path, "prompt": str, "caption": str}` per line, or a csv with those columns;
relative video paths are relative to the manifest's folder. A record's `index` is its 0-based line (jsonl) or data row
(csv) in that file. DST is a converted model folder (`tools.convert_wan_weights`): its VAE, umT5 and tokenizer are
used, at its fps (`pipeline.json`, 16 for Wan2.1).

Per video: probe; choose the bucket (frames, height, width): among the buckets whose frame count the clip covers at the
model's fps, the one whose aspect ratio is closest (|log ratio|; ties: more frames, then more pixels), so resize +
centre-crop never stretches; decode the first `frames` frames (longer clips are cut), resized and centre-cropped;
VAE-encode to normalised latents ((mu - mean) / std, the pipeline's convention); umT5-encode the prompt exactly as the
pipeline does (`Pipeline.encode_prompt`: text_len rows, zero past the prompt); tokenise prompt and caption to
`max_text_len` (eos, then pad; masks). The record schema is `uvigu.data.records`' (the toy world's).

Output folder:
    manifest.json          format "uvigu-shards": buckets, model folder + hash (of its config.json files), codec
                           (`vae.describe()`), tokenizer (`describe()`, copied to tokenizer/), counts, and per split
                           the shards with their bucket, record ids (`indices`), sizes and sha256
    rejects.jsonl          {"index", "line", "video", "reason"} per bad input, sorted by index
    {split}-{F}x{H}x{W}-p{i}of{n}-{k}.array_record      one bucket per shard (a batch is drawn from one bucket)
    tokenizer/  run.json (the settings a rerun must match)  .state/ (per-shard done records, per-process plans)

Resumable: each process plans its shards from its slice of the manifest (`index % n == i`) deterministically; a shard
is written under a temporary name, fsynced, renamed into place and only then recorded in `.state/done/`. A rerun skips
recorded shards whose file is there at the recorded size, deletes leftover temporary files of its own shards and redoes
the rest; a killed run therefore never leaves a partial shard that is listed or named as finished. Each process, when
done, merges every finished shard into manifest.json under a file lock; `complete` is true once every process's plan
is finished (readers refuse an incomplete set).

Bad inputs (malformed line, missing/unreadable/corrupt video, too short for every bucket, no prompt, prompt or caption
longer than max_text_len) go to rejects.jsonl; they never stop the run; the count is printed at the end.

The validation split (--val_fraction) is chosen by a hash of each line's video path and prompt, so it does not depend
on the order of lines or on the number of processes. The test split is empty.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from uvigu.data import records
from uvigu.data import video as video_io
from uvigu.generate import CliError, _Parser, check_model_folder, run_main

DEFAULT_SHARD_SIZE = 64
DEFAULT_MAX_TEXT_LEN = 256
STATE_DIR = ".state"
RUN_FILE = "run.json"
REJECTS_FILE = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"


# ----------------------------------------------------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A pixel size clips are cut and cropped to: frames (4n+1), height and width (multiples of 16)."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        parts = text.strip().lower().split("x")
        try:
            frames, height, width = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"bucket {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 81x480x832") from None
        try:
            video_io.check_video_size(frames, height, width)
        except ValueError as e:
            raise ValueError(f"bucket {text!r}: {e}") from None
        return cls(frames, height, width)


def parse_buckets(text: str) -> list[Bucket]:
    """'81x480x832,49x480x832' -> buckets, each checked (frames 4n+1, sizes multiples of 16), no duplicates."""
    buckets = [Bucket.parse(t) for t in text.split(",") if t.strip()]
    if not buckets:
        raise ValueError(f"--buckets {text!r}: no bucket given")
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise ValueError(f"--buckets {text!r}: a bucket is listed twice")
    return buckets


def choose_bucket(buckets: Sequence[Bucket], height: int, width: int, available_frames: int) -> Bucket | None:
    """The bucket for a clip of height x width pixels and `available_frames` frames at the model's fps: among those
    whose frames fit, the closest aspect ratio (ties: more frames, then more pixels); None when none fits."""
    fitting = [b for b in buckets if b.frames <= available_frames]
    if not fitting or height < 1 or width < 1:
        return None
    aspect = width / height
    return min(fitting, key=lambda b: (round(abs(math.log(b.aspect / aspect)), 9), -b.frames, -b.height * b.width))


def available_frames(info: video_io.VideoInfo, fps: float) -> int:
    """Frames `read_video` yields at `fps` for a clip as the container describes it (an estimate: the decode may
    still find it shorter, and that clip is then rejected)."""
    duration = info.duration or (info.num_frames / info.fps if info.fps else 0.0)
    return max(0, math.ceil(duration * fps - 1e-6))


# ----------------------------------------------------------------------------------------------------------------------
# The input manifest.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    index: int  # 0-based line (jsonl) or data row (csv): the record id
    line: int  # 1-based line in the file, for messages
    video: str  # as written in the manifest
    path: Path  # resolved
    prompt: str
    caption: str


def _reject(index: int, line: int, video: Any, reason: str) -> dict[str, Any]:
    return {"index": index, "line": line, "video": video if isinstance(video, str) else None, "reason": reason}


def _item(index: int, line: int, row: Any, base: Path) -> Item | dict[str, Any]:
    """A manifest row -> Item, or a reject naming what is wrong with it."""
    if not isinstance(row, dict):
        return _reject(index, line, None, f"line {line}: not a JSON object")
    video, prompt, caption = row.get("video"), row.get("prompt"), row.get("caption")
    if not isinstance(video, str) or not video.strip():
        return _reject(index, line, video, f"line {line}: no video path")
    if not isinstance(prompt, str) or not prompt.strip():
        return _reject(index, line, video, "no prompt")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        return _reject(index, line, video, f"caption is a {type(caption).__name__}, not a string")
    path = Path(video).expanduser()
    return Item(index, line, video, path if path.is_absolute() else base / path, prompt, caption)


def read_input_manifest(path: str | os.PathLike) -> tuple[list[Item], list[dict[str, Any]]]:
    """(items, rejects) of a jsonl or csv manifest (csv by the .csv suffix). Bad rows are rejects, a missing file or
    a csv without the columns a CliError."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--manifest {str(path)!r}: no such file")
    base = path.parent
    items: list[Item | dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"video", "prompt"} - set(reader.fieldnames or ())
            if missing:
                raise CliError(f"--manifest {str(path)!r}: csv header {reader.fieldnames} lacks {sorted(missing)} "
                               "(columns: video, prompt, caption)")
            for index, row in enumerate(reader):
                items.append(_item(index, reader.line_num, dict(row), base))
    else:
        with path.open(encoding="utf-8") as f:
            for index, text in enumerate(f):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    items.append(_reject(index, index + 1, None, f"line {index + 1}: not valid JSON ({e})"))
                    continue
                items.append(_item(index, index + 1, row, base))
    good = [i for i in items if isinstance(i, Item)]
    return good, [i for i in items if not isinstance(i, Item)]


def in_validation(item: Item, fraction: float) -> bool:
    """A stable draw per (video, prompt): the same split whatever the line order or process count."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{item.video}\0{item.prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


# ----------------------------------------------------------------------------------------------------------------------
# Hashes and state.
# ----------------------------------------------------------------------------------------------------------------------


def model_hash(folder: str | os.PathLike) -> str:
    """sha256 over the model folder's config.json files (relative path + bytes, sorted): which model made the data."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("config.json")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return records.sha256_file(path)


@contextmanager
def _locked(out: Path):
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _proc_tag(index: int, count: int) -> str:
    return f"p{index:03d}of{count:03d}"


def _done_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / "done" / f"{name}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _finished(out: Path, name: str) -> dict[str, Any] | None:
    """The done record of shard `name` when the shard file is there at its recorded size, else None."""
    done = _read_json(_done_path(out, name))
    if not isinstance(done, dict) or "entry" not in done:
        return None
    shard = out / name
    if not shard.is_file() or shard.stat().st_size != done["entry"]["bytes"]:
        return None
    return done


# ----------------------------------------------------------------------------------------------------------------------
# Encoding one video.
# ----------------------------------------------------------------------------------------------------------------------


_VAE_ENCODE = []  # the jitted VAE encode, made once per process (nnx.jit caches per module graph and shape)


def _vae_encode(vae, video):
    if not _VAE_ENCODE:
        from flax import nnx

        _VAE_ENCODE.append(nnx.jit(lambda vae, video: vae.encode(video)))
    return _VAE_ENCODE[0](vae, video)


class Encoder:
    """The pipeline's VAE, umT5 and tokenizer as one record maker (compiles once per bucket shape)."""

    def __init__(self, pipe, max_text_len: int):
        self.pipe = pipe
        self.max_text_len = max_text_len
        self.fps = pipe.defaults.fps

    def frames(self, item: Item, bucket: Bucket) -> np.ndarray:
        return video_io.read_video(item.path, fps=self.fps, num_frames=bucket.frames, height=bucket.height,
                                   width=bucket.width)

    def record(self, item: Item, bucket: Bucket) -> dict[str, Any]:
        from uvigu.data.umt5_tokenizer import clean_prompt

        frames = self.frames(item, bucket)
        video = frames.astype(np.float32) / 255.0 * 2.0 - 1.0  # the pipeline's [0, 1] -> [-1, 1]
        latents = np.asarray(_vae_encode(self.pipe.vae, video[None]), np.float32)[0]
        if not np.isfinite(latents).all():
            raise video_io.VideoError(f"{str(item.path)!r}: the VAE returned non-finite latents")
        context = np.asarray(self.pipe.encode_prompt([item.prompt]), np.float32)[0]
        p_ids, p_mask = self.pipe.tokenize([item.prompt], self.max_text_len)
        c_ids, c_mask = self.pipe.tokenize([item.caption], self.max_text_len)
        return {"index": item.index, "latents": latents, "context": context,
                "prompt_ids": p_ids[0], "prompt_mask": p_mask[0], "caption_ids": c_ids[0], "caption_mask": c_mask[0],
                "prompt": clean_prompt(item.prompt), "caption": clean_prompt(item.caption),
                "video": item.video, "bucket": np.asarray([bucket.frames, bucket.height, bucket.width], np.int32)}


# ----------------------------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What one process did."""

    videos: int = 0  # manifest rows in this process's slice (bad rows included)
    encoded: int = 0  # videos encoded in this run
    skipped: int = 0  # videos in shards finished by an earlier run
    shards_written: int = 0
    shards_skipped: int = 0
    rejected: int = 0  # this process's rejects (all runs)
    rejected_total: int = 0  # everyone's, in rejects.jsonl
    seconds: float = 0.0
    complete: bool = False

    @property
    def videos_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _check_text(item: Item, tokenizer, max_text_len: int) -> str | None:
    from uvigu.data.umt5_tokenizer import clean_prompt

    if not clean_prompt(item.prompt):
        return "no prompt"
    prompt_len, caption_len = tokenizer.count_tokens([clean_prompt(item.prompt), clean_prompt(item.caption)])
    if prompt_len > max_text_len:
        return f"prompt longer than max_text_len: {prompt_len} tokens with eos > {max_text_len}"
    if caption_len > max_text_len:
        return f"caption longer than max_text_len: {caption_len} tokens with eos > {max_text_len}"
    return None


def _plan(items: list[Item], buckets: list[Bucket], encoder_fps: float, tokenizer, max_text_len: int,
          val_fraction: float, shard_size: int, tag: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(shards, rejects): each shard {"name", "split", "bucket", "items"} in a fixed order; rejects from the text
    checks and the probe (cheap: one decoded frame per video)."""
    rejects = []
    groups: dict[tuple[str, str], list[Item]] = {}
    shortest = min(b.frames for b in buckets)
    for item in items:
        reason = _check_text(item, tokenizer, max_text_len)
        bucket = None
        if reason is None:
            try:
                info = video_io.probe_video(item.path)
            except video_io.VideoError as e:
                reason = f"unreadable video: {e}"
            else:
                frames = available_frames(info, encoder_fps)
                bucket = choose_bucket(buckets, info.height, info.width, frames)
                if bucket is None:
                    reason = (f"too short: about {frames} frames at {encoder_fps:g} fps, the shortest bucket needs "
                              f"{shortest}")
        if reason is not None:
            rejects.append(_reject(item.index, item.line, item.video, reason))
            continue
        split = "validation" if in_validation(item, val_fraction) else "train"
        groups.setdefault((split, bucket.name), []).append(item)
    shards = []
    order = {b.name: k for k, b in enumerate(buckets)}
    for (split, name), group in sorted(groups.items(), key=lambda kv: (records.SPLITS.index(kv[0][0]),
                                                                       order[kv[0][1]])):
        bucket = next(b for b in buckets if b.name == name)
        for k, lo in enumerate(range(0, len(group), shard_size)):
            shards.append({"name": f"{split}-{name}-{tag}-{k:05d}.array_record", "split": split, "bucket": bucket,
                           "items": group[lo : lo + shard_size]})
    return shards, rejects


def _clean_leftovers(out: Path, names: set[str]) -> int:
    """Deletes temporary files of this process's shards and done records (a killed writer's). A shard file without
    a done record is not listed anywhere and is overwritten when its shard is redone."""
    removed = 0
    done = out / STATE_DIR / "done"
    for folder, targets in ((out, names), (done, {f"{n}.json" for n in names})):
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                if path.name[1 : path.name.index(".tmp-")] in targets:
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _settings(args_manifest: Path, pipe, buckets, shard_size, max_text_len, val_fraction, process_count,
              model: Path) -> dict[str, Any]:
    return {"input_manifest": {"path": str(args_manifest.resolve()), "sha256": _file_sha256(args_manifest)},
            "model_hash": model_hash(model), "buckets": [b.name for b in buckets], "shard_size": shard_size,
            "max_text_len": max_text_len, "val_fraction": val_fraction, "process_count": process_count,
            "fps": pipe.defaults.fps, "text_len": pipe.dit.config.text_len,
            "tokenizer_sha256": pipe.tokenizer.sha256}


def _check_run(out: Path, settings: dict[str, Any]) -> None:
    """Writes run.json on the first run; a rerun must match it (else its shards would mix with another run's)."""
    path = out / RUN_FILE
    if path.exists():
        previous = _read_json(path)
        if not isinstance(previous, dict):
            raise CliError(f"{path}: unreadable; --out holds a damaged run, use a fresh --out")
        diff = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if diff:
            details = "; ".join(f"{k}: was {previous.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            raise CliError(f"--out {str(out)!r} holds a run with other settings ({details}); resume it with the same "
                           "arguments, or use a fresh --out")
    else:
        records.write_json(path, settings)


def _copy_tokenizer(out: Path, pipe) -> None:
    dest = out / TOKENIZER_DIR
    if dest.is_dir():
        return
    staging = out / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for item in Path(pipe.tokenizer.source).iterdir():
        if item.is_file():
            shutil.copyfile(item, staging / item.name)
    staging.rename(dest)


def _merge(out: Path, settings: dict[str, Any], pipe, model: Path, buckets: list[Bucket]) -> tuple[bool, int]:
    """Rewrites manifest.json and rejects.jsonl from every process's state (call under the lock). Returns
    (complete, number of rejects)."""
    count = settings["process_count"]
    entries, rejects, finished, planned_total = [], [], [], 0
    for p in range(count):
        tag = _proc_tag(p, count)
        plan = _read_json(out / STATE_DIR / f"plan-{tag}.json")
        if not isinstance(plan, dict):
            continue
        rejects += plan["rejects"]
        missing = 0
        for name in plan["shards"]:
            done = _finished(out, name)
            if done is None:
                missing += 1
                continue
            entries.append(done["entry"])
            rejects += done["rejects"]
        planned_total += len(plan["shards"])
        if not missing:
            finished.append(p)
    rejects.sort(key=lambda r: r["index"])
    complete = len(finished) == count
    order = {b.name: k for k, b in enumerate(buckets)}
    splits = {}
    for split in records.SPLITS:
        files = sorted((e for e in entries if e["split"] == split), key=lambda e: (order[e["bucket_name"]], e["name"]))
        splits[split] = {"num_examples": sum(e["num_records"] for e in files), "files": files}
    by_bucket = {b.name: sum(e["num_records"] for e in entries if e["bucket_name"] == b.name) for b in buckets}
    context_shape = [pipe.dit.config.text_len, pipe.dit.config.text_dim]
    max_len = settings["max_text_len"]
    fields = records.field_shapes(None, context_shape, max_len, max_len)
    fields["latents"]["shape_by_bucket"] = {b.name: list(pipe.vae.latent_shape(b.frames, b.height, b.width))
                                            for b in buckets}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    tokenizer = {"file": TOKENIZER_DIR, **pipe.tokenizer.describe()}
    manifest = {
        "format": records.SHARDS_FORMAT, "format_version": records.FORMATS[records.SHARDS_FORMAT],
        "key": key, "complete": complete,
        "status": f"processes finished: {finished} of {count}",
        "settings": settings,
        "model": {"path": str(model.resolve()), "hash": settings["model_hash"]},
        "encoder_id": json.dumps({"umt5_of": settings["model_hash"], "text_len": settings["text_len"]}),
        "codec": pipe.vae.describe(),
        "tokenizer": tokenizer,
        "buckets": [{"name": b.name, "frames": b.frames, "height": b.height, "width": b.width,
                     "latents": fields["latents"]["shape_by_bucket"][b.name]} for b in buckets],
        "fields": fields,
        "counts": {"records": sum(e["num_records"] for e in entries), "rejected": len(rejects),
                   "shards": len(entries), "shards_planned": planned_total, "by_bucket": by_bucket},
        "splits": splits,
    }
    records.write_json(out / records.MANIFEST_FILE, manifest)
    tmp = records.temp_name(out / REJECTS_FILE)
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    os.replace(tmp, out / REJECTS_FILE)
    return complete, len(rejects)


def preprocess(manifest: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike, *,
               buckets: Sequence[Bucket] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
               val_fraction: float = 0.0, max_text_len: int = DEFAULT_MAX_TEXT_LEN, process_index: int | None = None,
               process_count: int | None = None, pipe=None, progress: bool = True) -> Summary:
    """Encodes this process's slice of `manifest` into shards under `out` (see the module docstring); `pipe`: an
    already loaded `uvigu.pipeline.load(model)` (else loaded here); `buckets` None: the model's default size."""
    start = time.perf_counter()
    manifest, model, out = Path(manifest), Path(model), Path(out)
    if shard_size < 1:
        raise CliError(f"--shard_size must be >= 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise CliError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if max_text_len < 2:
        raise CliError(f"--max_text_len must be >= 2 (text + eos), got {max_text_len}")
    if (process_index is None) != (process_count is None):
        raise CliError("give both --process_index and --process_count, or neither")
    if process_index is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise CliError(f"--process_index {process_index} is not in [0, --process_count {process_count})")
    items, bad_rows = read_input_manifest(manifest)
    if pipe is None:
        from uvigu import pipeline as uvigu_pipeline

        pipe = uvigu_pipeline.load(check_model_folder(str(model)))
    if buckets is None:
        d = pipe.defaults
        buckets = [Bucket(d.num_frames, d.height, d.width)]
    buckets = list(buckets)
    for b in buckets:
        pipe.check_video_size(b.frames, b.height, b.width)

    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(manifest, pipe, buckets, shard_size, max_text_len, val_fraction, process_count, model)
    with _locked(out):
        _check_run(out, settings)
        _copy_tokenizer(out, pipe)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)

    tag = _proc_tag(process_index, process_count)
    mine = [i for i in items if i.index % process_count == process_index]
    rejects = [r for r in bad_rows if r["index"] % process_count == process_index]
    encoder = Encoder(pipe, max_text_len)
    shards, probe_rejects = _plan(mine, buckets, encoder.fps, pipe.tokenizer, max_text_len, val_fraction, shard_size,
                                  tag)
    rejects += probe_rejects
    records.write_json(out / STATE_DIR / f"plan-{tag}.json",
                       {"shards": [s["name"] for s in shards], "rejects": sorted(rejects, key=lambda r: r["index"])})
    _clean_leftovers(out, {s["name"] for s in shards})

    summary = Summary(videos=len(mine) + sum(r["index"] % process_count == process_index for r in bad_rows))
    todo = []
    for shard in shards:
        done = _finished(out, shard["name"])
        if done is None:
            todo.append(shard)
        else:
            summary.shards_skipped += 1
            summary.skipped += len(shard["items"])
            summary.rejected += len(done["rejects"])
    summary.rejected += len(rejects)

    bar = _progress_bar(sum(len(s["items"]) for s in todo), f"preprocess {tag}", progress)
    try:
        for shard in todo:
            shard_rejects: list[dict[str, Any]] = []
            ids: list[int] = []

            def made(shard=shard, shard_rejects=shard_rejects, ids=ids):
                for item in shard["items"]:
                    try:
                        record = encoder.record(item, shard["bucket"])
                    except video_io.VideoError as e:
                        shard_rejects.append(_reject(item.index, item.line, item.video, f"decode/encode failed: {e}"))
                    else:
                        ids.append(item.index)
                        summary.encoded += 1
                        yield record
                    bar.update(1)

            entry = records.write_shard(out / shard["name"], made())
            entry.update(split=shard["split"], bucket=[shard["bucket"].frames, shard["bucket"].height,
                                                       shard["bucket"].width],
                         bucket_name=shard["bucket"].name, indices=ids, process=process_index)
            records.write_json(_done_path(out, shard["name"]), {"entry": entry, "rejects": shard_rejects})
            summary.shards_written += 1
            summary.rejected += len(shard_rejects)
    finally:
        bar.close()

    with _locked(out):
        summary.complete, summary.rejected_total = _merge(out, settings, pipe, model, buckets)
    summary.seconds = time.perf_counter() - start
    return summary


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m uvigu.data.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="jsonl ({video, prompt, caption} per line) or csv manifest.")
    p.add_argument("--model", required=True, help="A converted model folder (its VAE, umT5, tokenizer, fps).")
    p.add_argument("--out", required=True, help="Output folder of shards (a rerun resumes it).")
    p.add_argument("--frames", type=int, default=None, help="One bucket's frames, 4n+1 (default: the model's).")
    p.add_argument("--height", type=int, default=None, help="One bucket's height, a multiple of 16.")
    p.add_argument("--width", type=int, default=None, help="One bucket's width, a multiple of 16.")
    p.add_argument("--buckets", default=None, help="Buckets FxHxW, comma-separated, e.g. 81x480x832,81x832x480 "
                                                   "(instead of --frames/--height/--width).")
    p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="Videos per shard (default 64).")
    p.add_argument("--val_fraction", type=float, default=0.0, help="Share of videos in the validation split.")
    p.add_argument("--max_text_len", type=int, default=DEFAULT_MAX_TEXT_LEN,
                   help="Tokens of prompt_ids / caption_ids with eos (default 256); longer texts are rejected.")
    p.add_argument("--process_index", type=int, default=None, help="This process's slice (default jax's).")
    p.add_argument("--process_count", type=int, default=None, help="Number of slices (default jax's).")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return p


def _buckets_of(args) -> list[Bucket] | None:
    single = (args.frames, args.height, args.width)
    if args.buckets is not None:
        if any(v is not None for v in single):
            raise CliError("give --buckets or --frames/--height/--width, not both")
        try:
            return parse_buckets(args.buckets)
        except ValueError as e:
            raise CliError(f"--buckets: {e}") from None
    if all(v is None for v in single):
        return None  # the model's defaults
    if any(v is None for v in single):
        raise CliError("give all of --frames, --height and --width (or --buckets)")
    try:
        return [Bucket.parse(f"{args.frames}x{args.height}x{args.width}")]
    except ValueError as e:
        raise CliError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        buckets = _buckets_of(args)
        check_model_folder(args.model)
        s = preprocess(args.manifest, args.model, args.out, buckets=buckets, shard_size=args.shard_size,
                       val_fraction=args.val_fraction, max_text_len=args.max_text_len,
                       process_index=args.process_index, process_count=args.process_count,
                       progress=not args.no_progress)
        print(f"preprocess: {s.encoded} videos encoded ({s.videos_per_second:.2f} videos/s), {s.skipped} skipped in "
              f"{s.shards_skipped} finished shards, {s.shards_written} shards written; {s.rejected} rejected by this "
              f"process, {s.rejected_total} in total (see {Path(args.out) / REJECTS_FILE}); "
              f"{'complete' if s.complete else 'other processes still to finish'}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
