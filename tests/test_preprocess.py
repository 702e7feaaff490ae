"""Preprocessing real videos into latent shards (`uvigu.data.preprocess`) and synthesising stage-1 videos
(`uvigu.data.synthesize`), on a tiny converted random Wan2.1 release (tests/tiny_release.py) with small defaults.

The inputs: a dozen tiny MP4s written with `write_video` (random frames, landscape 32x48 and portrait 48x32, 12 frames
at 16 fps), one corrupt file, one too short (3 frames), plus rows with no prompt and with a caption longer than
max_text_len. Buckets 9x32x48 and 9x48x32: each clip must land in the bucket of its own aspect ratio.
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import tiny_release as tr
from reference import rel_err
from tools.convert_wan_weights.cli import main as convert_main
from uvigu import pipeline as uvigu_pipeline
from uvigu.data import preprocess as pp
from uvigu.data import records, synthesize
from uvigu.data import video as video_io
from uvigu.data.toy_world import ToyWorldPaths, ToyWorldSource

FPS = 16
BUCKETS = "9x32x48,9x48x32"
MAX_TEXT_LEN = 64  # the tiny tokenizer has 200 pieces: ~1 token per 2 characters
SHARD_SIZE = 3
NUM_GOOD = 10
# Words the tiny tokenizer knows (its corpus), so the token ids decode back to the text.
WORDS = ("red", "blue", "green", "yellow", "small", "quick", "brown", "calm", "cold", "wide")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(converted DST, its loaded pipeline): defaults 9 frames, 32x32, 2 steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model")
    tr.save_diffusers(tr.build_tiny_pipeline("unipc"), root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "dst")]) == 0
    meta = json.loads((root / "dst" / "pipeline.json").read_text())
    meta["defaults"].update({"num_frames": 9, "height": 32, "width": 32, "num_inference_steps": 2,
                             "caption_steps": 2})
    (root / "dst" / "pipeline.json").write_text(json.dumps(meta))
    return root / "dst", uvigu_pipeline.load(root / "dst")


def _shape(i: int) -> tuple[int, int]:
    return (32, 48) if i % 2 == 0 else (48, 32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of videos and its jsonl manifest; returns (manifest path, rows)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(NUM_GOOD):
        h, w = _shape(i)
        frames = rng.integers(0, 256, (12, h, w, 3), dtype=np.uint8)
        video_io.write_video(root / "clips" / f"v{i:02d}.mp4", frames, fps=FPS)
        rows.append({"video": f"clips/v{i:02d}.mp4", "prompt": f"a {WORDS[i]} circle moves left",
                     "caption": f"a {WORDS[i]} square bounces up and down across a dark background"})
    (root / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    video_io.write_video(root / "clips" / "short.mp4", rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8), fps=FPS)
    rows.append({"video": "clips/corrupt.mp4", "prompt": "a corrupt clip", "caption": ""})
    rows.append({"video": "clips/short.mp4", "prompt": "a short clip", "caption": ""})
    rows.append({"video": "clips/v00.mp4", "prompt": "   ", "caption": "no prompt"})
    rows.append({"video": "clips/v01.mp4", "prompt": "a long caption", "caption": "word " * 60})
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, rows


def _run(model, manifest, out, **kw):
    dst, pipe = model
    kw = {"buckets": pp.parse_buckets(BUCKETS), "shard_size": SHARD_SIZE, "max_text_len": MAX_TEXT_LEN,
          "pipe": pipe, "progress": False, **kw}
    return pp.preprocess(manifest, dst, out, **kw)


@pytest.fixture(scope="module")
def single(model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "shards"
    return out, _run(model, inputs[0], out)


def _records(out) -> dict[int, dict]:
    paths = records.ShardPaths.from_root(out)
    return {r["index"]: r for split in records.SPLITS for r in
            (records.ShardSource(paths, split)[i] for i in range(len(records.ShardSource(paths, split))))}


def _stamps(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".array_record"}


# ----------------------------------------------------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------------------------------------------------


def test_buckets_are_parsed_and_chosen_without_stretching():
    land, port, short = pp.parse_buckets("81x480x832,81x832x480,49x480x832")
    assert pp.choose_bucket([land, port, short], 720, 1280, 200) == land
    assert pp.choose_bucket([land, port, short], 1280, 720, 200) == port
    assert pp.choose_bucket([land, port, short], 720, 1280, 60) == short  # 81 frames do not fit
    assert pp.choose_bucket([land, port, short], 720, 1280, 40) is None
    with pytest.raises(ValueError, match=r"frames=80 is not 4n\+1"):
        pp.parse_buckets("80x480x832")
    with pytest.raises(ValueError, match="not FRAMESxHEIGHTxWIDTH"):
        pp.parse_buckets("81x480")


def test_manifest_rows_jsonl_and_csv(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"video": "a.mp4", "prompt": "p", "caption": "c"}\n\nnot json\n'
                                      '{"video": "b.mp4"}\n[1]\n{"video": "/abs/c.mp4", "prompt": "q"}\n')
    items, rejects = pp.read_input_manifest(tmp_path / "m.jsonl")
    assert [(i.index, i.path, i.caption) for i in items] == [(0, tmp_path / "a.mp4", "c"),
                                                            (5, pp.Path("/abs/c.mp4"), "")]
    assert [r["index"] for r in rejects] == [2, 3, 4]
    assert rejects[0]["reason"].startswith("line 3: not valid JSON")
    assert rejects[1]["reason"] == "no prompt" and rejects[1]["video"] == "b.mp4"
    assert rejects[2]["reason"] == "line 5: not a JSON object"
    (tmp_path / "m.csv").write_text('video,prompt,caption\na.mp4,"p, with comma",c\nb.mp4,,x\n')
    items, rejects = pp.read_input_manifest(tmp_path / "m.csv")
    assert [(i.video, i.prompt) for i in items] == [("a.mp4", "p, with comma")]
    assert rejects[0]["reason"] == "no prompt" and rejects[0]["line"] == 3
    (tmp_path / "bad.csv").write_text("path,text\na,b\n")
    with pytest.raises(pp.CliError, match=r"lacks \['prompt', 'video'\]"):
        pp.read_input_manifest(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------------------------------------------------
# A run.
# ----------------------------------------------------------------------------------------------------------------------


def test_preprocess_writes_shards_and_rejects(model, inputs, single):
    dst, pipe = model
    manifest_path, rows = inputs
    out, summary = single
    assert summary.complete and summary.encoded == NUM_GOOD and summary.rejected_total == 4
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["index"]: r["reason"] for r in rejects}
    assert sorted(reasons) == [10, 11, 12, 13]
    assert "unreadable video" in reasons[10] and "corrupt" in reasons[10]
    assert reasons[11].startswith("too short: about 3 frames at 16 fps, the shortest bucket needs 9")
    assert reasons[12] == "no prompt" and reasons[13].startswith("caption longer than max_text_len")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == records.SHARDS_FORMAT and manifest["complete"]
    assert manifest["model"]["hash"] == pp.model_hash(dst) and manifest["codec"] == pipe.vae.describe()
    assert manifest["tokenizer"]["sha256"] == pipe.tokenizer.sha256
    assert manifest["counts"]["by_bucket"] == {"9x32x48": 5, "9x48x32": 5}
    for entry in manifest["splits"]["train"]["files"]:  # one bucket per shard, files as recorded
        assert entry["bucket_name"] in ("9x32x48", "9x48x32") and entry["num_records"] <= SHARD_SIZE
        assert records.sha256_file(out / entry["name"]) == entry["sha256"]

    got = _records(out)
    assert sorted(got) == list(range(NUM_GOOD))
    vae_encode = nnx.jit(lambda vae, video: vae.encode(video))  # our own jit: eager encoding is slow on a CPU
    for i in (0, 1):  # one clip per bucket
        r = got[i]
        h, w = _shape(i)
        assert list(r["bucket"]) == [9, h, w] and r["latents"].shape == (3, h // 8, w // 8, 4)
        frames = video_io.read_video(manifest_path.parent / rows[i]["video"], fps=FPS, num_frames=9, height=h,
                                     width=w)
        want = np.asarray(vae_encode(pipe.vae, jnp.asarray(frames.astype(np.float32) / 255.0 * 2.0 - 1.0)[None]))[0]
        assert r["latents"].dtype == np.float32 and rel_err(r["latents"], want) < 1e-5, rel_err(r["latents"], want)
        context = np.asarray(pipe.encode_prompt([rows[i]["prompt"]]))[0]
        assert r["context"].shape == (512, 32) and rel_err(r["context"], context) < 1e-6
        assert (r["context"][-100:] == 0).all()
        assert r["prompt_ids"].shape == r["caption_ids"].shape == (MAX_TEXT_LEN,)
        assert pipe.tokenizer.decode(r["prompt_ids"][None]) == [rows[i]["prompt"]]
        assert pipe.tokenizer.decode(r["caption_ids"][None]) == [rows[i]["caption"]]
        assert r["prompt_mask"].sum() == pipe.tokenizer.count_tokens([rows[i]["prompt"]])[0]
    # A different clip gives different latents (the comparison above can fail).
    assert rel_err(got[2]["latents"], got[0]["latents"]) > 0.1


def test_training_reader_opens_the_shards(model, single):
    """What `run_data.open_datasets` does for data.kind='shards': the toy world's reader names on real shards."""
    dst, pipe = model
    out, _ = single
    paths = ToyWorldPaths.from_root(out)
    train = ToyWorldSource(paths, "train")
    assert len(train) == NUM_GOOD and len(ToyWorldSource(paths, "validation")) == 0
    assert paths.buckets("train") == ["9x32x48", "9x48x32"]
    land = records.ShardSource(paths, "train", bucket=(9, 32, 48))
    assert len(land) == 5 and {land[i]["latents"].shape for i in range(5)} == {(3, 4, 6, 4)}
    with pytest.raises(ValueError, match="has no bucket '9x64x64'"):
        records.ShardSource(paths, "train", bucket="9x64x64")
    assert paths.open_tokenizer().sha256 == pipe.tokenizer.sha256
    assert paths.open_codec().describe() == pipe.vae.describe()


def test_rerun_does_no_work(model, inputs, single, capsys):
    out, first = single
    stamps = _stamps(out)
    assert len(stamps) == first.shards_written == 4  # 5 + 5 videos in shards of 3
    again = _run(model, inputs[0], out)
    assert again.encoded == 0 and again.shards_written == 0
    assert again.skipped == NUM_GOOD and again.shards_skipped == 4 and again.rejected_total == 4
    assert _stamps(out) == stamps
    # The command, same arguments: loads the model, finds every shard finished, prints the counts.
    dst, _ = model
    assert pp.main(["--manifest", str(inputs[0]), "--model", str(dst), "--out", str(out), "--buckets", BUCKETS,
                    "--shard_size", str(SHARD_SIZE), "--max_text_len", str(MAX_TEXT_LEN), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "0 videos encoded" in printed and "10 skipped in 4 finished shards" in printed
    assert "4 in total" in printed and "complete" in printed
    assert _stamps(out) == stamps


def test_killed_run_is_cleaned_and_completed(model, inputs, single, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(single[0], out)
    victim = sorted(_stamps(out))[0]
    # What a kill mid-shard leaves: a partial temp file, no final file, no done record.
    (out / victim).unlink()
    (out / ".state" / "done" / f"{victim}.json").unlink()
    partial = out / f".{victim}.tmp-deadbeef"
    partial.write_bytes(b"partial shard bytes")
    partial_record = out / ".state" / "done" / f".{victim}.json.tmp-deadbeef"
    partial_record.write_text('{"entry": ')
    stamps = _stamps(out)
    again = _run(model, inputs[0], out)
    assert again.shards_written == 1 and again.encoded == SHARD_SIZE and again.complete
    assert not partial.exists() and not partial_record.exists() and (out / victim).exists()
    assert {k: v for k, v in _stamps(out).items() if k != victim} == stamps  # nothing else rewritten
    want, got = _records(single[0]), _records(out)
    assert sorted(got) == sorted(want)
    for i in got:
        np.testing.assert_array_equal(got[i]["latents"], want[i]["latents"])


def test_process_slices_together_equal_one_run(model, inputs, single, tmp_path):
    out = tmp_path / "sliced"
    first = _run(model, inputs[0], out, process_index=0, process_count=2)
    assert not first.complete and first.videos == 7
    with pytest.raises(ValueError, match="preprocessing is not finished"):
        records.ShardPaths.from_root(out)
    second = _run(model, inputs[0], out, process_index=1, process_count=2)
    assert second.complete and first.encoded + second.encoded == NUM_GOOD and second.rejected_total == 4
    want, got = _records(single[0]), _records(out)
    assert sorted(got) == sorted(want)
    for i in got:
        for key in ("latents", "context", "prompt_ids", "caption_ids"):
            np.testing.assert_array_equal(got[i][key], want[i][key])
    assert (out / "rejects.jsonl").read_text() == (single[0] / "rejects.jsonl").read_text()
    # A rerun with other settings into the same folder is refused, naming the difference.
    with pytest.raises(pp.CliError, match="shard_size: was 3, now 4"):
        _run(model, inputs[0], out, process_index=0, process_count=2, shard_size=4)


def test_command_line_errors(model, inputs, tmp_path, capsys):
    dst, _ = model
    base = ["--manifest", str(inputs[0]), "--model", str(dst), "--out", str(tmp_path / "o")]
    assert pp.main(base + ["--buckets", "9x32x40"]) == 2
    assert "height=32" not in capsys.readouterr().err  # width is the bad one
    assert pp.main(base + ["--buckets", "9x32x48", "--frames", "9"]) == 2
    assert "not both" in capsys.readouterr().err
    assert pp.main(base + ["--frames", "9"]) == 2
    assert "all of --frames, --height and --width" in capsys.readouterr().err
    assert pp.main(["--manifest", str(tmp_path / "missing.jsonl"), "--model", str(dst), "--out",
                    str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert pp.main(base + ["--process_index", "2", "--process_count", "2"]) == 2
    assert "--process_index 2 is not in [0, --process_count 2)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_synthesize_then_preprocess(model, tmp_path, capsys):
    dst, pipe = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left\n\n  a blue square bounces up and down  \n")
    out = tmp_path / "synth"
    # The library call with the loaded pipeline (the command would load its own and compile again: slow here).
    result = synthesize.synthesize(synthesize.read_prompts(prompts), dst, out, frames=9, height=32, width=48, steps=2,
                                   seed=3, pipe=pipe, progress=False)
    assert result["generated"] == 2 and result["skipped"] == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows == [{"video": "videos/00000.mp4", "prompt": "a red circle moves left", "caption": ""},
                    {"video": "videos/00001.mp4", "prompt": "a blue square bounces up and down", "caption": ""}]
    clip = video_io.read_video(out / rows[1]["video"], fps=FPS)
    assert clip.shape == (9, 32, 48, 3)
    kw = dict(num_frames=9, height=32, width=48, num_inference_steps=2)
    want, other = pipe.t2v(rows[1]["prompt"], seed=4, **kw)[0], pipe.t2v(rows[1]["prompt"], seed=3, **kw)[0]
    err = lambda v: np.abs(clip / 255.0 - v).mean()
    assert err(want) < 0.5 * err(other), (err(want), err(other))  # prompt i uses seed + i, up to H.264 loss
    # A rerun makes nothing new; the manifest is accepted by preprocess.
    stamp = (out / rows[0]["video"]).stat().st_mtime_ns
    again = synthesize.synthesize(synthesize.read_prompts(prompts), dst, out, frames=9, height=32, width=48, steps=2,
                                  pipe=pipe, progress=False)
    assert again["generated"] == 0 and (out / rows[0]["video"]).stat().st_mtime_ns == stamp
    summary = _run(model, out / "manifest.jsonl", tmp_path / "shards", buckets=pp.parse_buckets("9x32x48"))
    assert summary.complete and summary.encoded == 2 and summary.rejected_total == 0
    # The command's argument checks, before any model loads.
    assert synthesize.main(["--prompts", str(tmp_path / "none.txt"), "--model", str(dst), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert synthesize.main(["--prompts", str(prompts), "--model", str(dst), "--out", str(out), "--frames", "8"]) == 2
    assert "frames=8 is not 4n+1" in capsys.readouterr().err
