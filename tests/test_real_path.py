"""The whole real path in tiny form (issue 9 §6): a tiny random diffusers WanPipeline is converted; a dozen MP4s (one
corrupt, one too short) and a manifest are written; `uvigu.data.preprocess` makes latent shards (the two bad clips in
rejects.jsonl, a rerun does no work); stage 1 then stage 2 train a few steps each with the `from_folder` variant
(architecture from the converted folder, two latent buckets); the exported folder captions an MP4 with `uvigu.caption`
and generates one with `uvigu.generate`. Also stage 1 with LoRA: only the adapters move, and the export holds them
(lora.safetensors) and the merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_release as tr
from tools.convert_wan_weights.cli import main as convert_main
from uvigu import checkpoint, run_config, train
from uvigu.data import preprocess
from uvigu.data import video as video_io
from uvigu.models import flat_params, lora_formats

BUCKETS = "5x32x32,5x32x48"
MAX_TEXT_LEN = 24
WORDS = ("red", "blue", "green", "yellow", "small", "quick", "brown", "calm", "cold", "wide")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A converted tiny release with small sampling defaults (5 frames, 32 px, 2 steps)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("release")
    tr.save_diffusers(tr.build_tiny_pipeline("unipc"), root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "dst")]) == 0
    meta = json.loads((root / "dst" / "pipeline.json").read_text())
    meta["defaults"].update(num_frames=5, height=32, width=32, num_inference_steps=2, caption_steps=2)
    (root / "dst" / "pipeline.json").write_text(json.dumps(meta))
    return root / "dst"


@pytest.fixture(scope="module")
def shards(release, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        size = (32, 32) if i % 2 else (32, 48)
        video_io.write_video(root / f"v{i}.mp4", rng.integers(0, 256, (8, *size, 3), dtype=np.uint8), fps=16)
        rows.append({"video": f"v{i}.mp4", "prompt": f"a {WORDS[i]} circle moves left",
                     "caption": f"a {WORDS[i]} square bounces up"})
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    video_io.write_video(root / "short.mp4", rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), fps=16)
    rows += [{"video": "corrupt.mp4", "prompt": "a corrupt clip", "caption": ""},
             {"video": "short.mp4", "prompt": "a short clip", "caption": ""}]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "shards"
    argv = ["--manifest", str(root / "data.jsonl"), "--model", str(release), "--out", str(out), "--buckets", BUCKETS,
            "--max_text_len", str(MAX_TEXT_LEN), "--shard_size", "4", "--val_fraction", "0.2", "--no_progress"]
    assert preprocess.main(argv) == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(Path(r["video"]).name for r in rejects) == ["corrupt.mp4", "short.mp4"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.array_record")}
    assert preprocess.main(argv) == 0  # a rerun does no work
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.array_record")} == mtimes
    return out


def _config(stage: str, init: Path, data: Path, **extra):
    c = run_config.load(stage, "from_folder")
    c.update_from_flattened_dict({
        "init.path": str(init), "data.path": str(data), "data.global_batch_size": 2,
        "model.wan.dtype": "float32", "model.wan.remat_policy": "none", "model.univigu.max_text_len": MAX_TEXT_LEN,
        "model.univigu.text_flow": "discrete", "optim.schedule": "constant", "optim.warmup_steps": 1,
        "optim.lr": 1e-3, "total_steps": 2, "log_every": 1, "ckpt_every": 2, "eval_every": 0, "eval_examples": 1,
        "sample.num_steps": 2, "sample.num_saved": 1, **extra})
    return c


def _flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(model).items()}


@pytest.fixture(scope="module")
def stages(release, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    one = train.train_and_evaluate(_config("stage1", release, shards), str(root / "w1"))
    two = train.train_and_evaluate(_config("stage2", root / "w1", shards), str(root / "w2"))
    return root, one, two


def test_stages_train_on_shards_from_the_converted_folder(release, stages):
    root, one, two = stages
    assert one["step"] == two["step"] == 2
    assert all(np.isfinite(r["loss"]) for r in one["history"] + two["history"])
    # from_folder: the architecture is the converted DiT's, the vocabulary its tokenizer's.
    saved = json.loads((root / "w1" / "run_config.json").read_text())["model"]
    dit = checkpoint.load_config(release, kind=checkpoint.WAN_DIT)
    assert saved["wan"]["dim"] == dit.dim and saved["wan"]["num_layers"] == dit.num_layers
    assert saved["univigu"]["vocab_size"] == 200
    # Samples of held-out clips: an MP4 and captions.
    sample = root / "w2" / "samples" / "step_2"
    assert len(video_io.read_video(sample / "t2v_0.mp4")) == 5 and "generated:" in (sample / "captions.txt").read_text()
    # The export is a whole pipeline folder.
    export = root / "w2" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["pipeline.json", "tokenizer", "umt5", "univigu", "vae"]


def test_the_export_captions_and_generates(stages, tmp_path, capsys):
    from uvigu import caption, generate

    root, _, _ = stages
    export = root / "w2" / "export"
    clip = tmp_path / "clip.mp4"
    video_io.write_video(clip, np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    capsys.readouterr()
    assert caption.main(["--model", str(export), "--video", str(clip)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and isinstance(printed[-1], str)
    out = tmp_path / "gen.mp4"
    assert generate.main(["--model", str(export), "--prompt", "a red circle moves left", "--out", str(out)]) == 0
    assert len(video_io.read_video(out)) == 5


def test_stage1_with_lora_moves_only_adapters(release, shards, tmp_path):
    c = _config("stage1", release, shards, **{"optim.trainable": "lora", "lora.rank": 4, "lora.alpha": 4.0})
    result = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert result["step"] == 2
    export = tmp_path / "w" / "export"
    adapters, fmt = lora_formats.load_lora(export / "lora.safetensors")
    assert fmt == "diffusers" and adapters and all(w.rank == 4 for w in adapters.values())
    assert any(np.abs(w.b).max() > 0 for w in adapters.values())  # B started at zero: it was trained
    # The exported UniViGU holds base + merged adapters; the DiT's base weights outside the targets are the release's.
    exported = _flat(checkpoint.load_pretrained(export))
    base = _flat(checkpoint.load_pretrained(release, kind=checkpoint.WAN_DIT))
    np.testing.assert_array_equal(exported["dit.patch_embedding.kernel"], base["patch_embedding.kernel"])
    assert not np.array_equal(exported["dit.blocks.attn1.to_q.kernel"], base["blocks.attn1.to_q.kernel"])
