"""The converter's umT5 encoder and tokenizer parts and `UMT5Tokenizer`, on tiny local fixtures (nothing downloaded):

* umT5: a random transformers UMT5EncoderModel saved as a diffusers `text_encoder/` (one file and sharded) and as
  Wan's original-naming bf16 `.pth`; converted, loaded with `uvigu.checkpoint.load_pretrained`, run against
  transformers in fp32 (relative error <= 1e-5).
* tokenizer: a SentencePiece Unigram model trained here on a few dozen sentences (accents, CJK, Cyrillic, emoji,
  combining marks), laid out as google/umt5-xxl/ (spiece.model + an old transformers-4-style tokenizer.json + json
  configs), as a diffusers tokenizer/ (transformers' save_pretrained) and as a spiece.model-only folder; ids must
  equal transformers' AutoTokenizer called as WanPipeline calls it, raw and after `clean_prompt`.
* bad inputs: each gives a ValueError naming the file / key, and no output folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import unicodedata
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from flax import nnx

from tools.convert_wan_weights import tokenizer_part, umt5_part
from tools.convert_wan_weights.safetensors_io import SafetensorsError
from uvigu import checkpoint
from uvigu.data.umt5_tokenizer import TokenizerError, UMT5Tokenizer, clean_prompt
from uvigu.models import umt5_keys
from uvigu.models.umt5 import UMT5Config

TOL = 1e-5

# Odd sizes on purpose: N*K = 21 != d_model, 3 layers, few buckets; gated-gelu as umT5.
CFG = UMT5Config(vocab_size=97, d_model=24, d_kv=7, num_heads=3, d_ff=40, num_layers=3,
                 relative_attention_num_buckets=16, relative_attention_max_distance=20)
# The original release has no config: the fields shapes cannot tell (max distance, eps, activation) take umT5-XXL's
# values, so its fixture must have them.
CFG_ORIGINAL = dataclasses.replace(CFG, relative_attention_max_distance=128)

CORPUS = [
    "A red ball rolls across the wooden floor.", "A cat sits on the mat and looks at the camera.",
    "The quick brown fox jumps over the lazy dog.", "Two people walk along the beach at sunset.",
    "Un café très chaud à Paris, s'il vous plaît.", "Über größere Straßen fahren schnelle Autos.",
    "東京の夜景はとても美しいです。", "北京欢迎你，长城很壮观。", "서울의 거리는 밤에도 밝습니다.",
    "Привет мир, как дела сегодня?", "Emoji party 🎉🐱 with balloons 🎈", "Combining marks: e\u0301 n\u0303 a\u0308",
    "A video of a dog running in the park.", "Slow motion shot of water drops falling.",
    "Ｆｕｌｌｗｉｄｔｈ letters and ① numbers", "¿Dónde está la biblioteca? ¡Aquí!",
    "A drone flies over green mountains and a river.", "Close-up of a flower opening in the morning light.",
]
PROMPTS = [
    "A red ball rolls across the wooden floor.", "Un café très chaud à Paris", "東京の夜景", "Emoji 🎉🐱 party 🦄",
    "e\u0301 n\u0303 combining é ñ", "multiple   spaces\there\nand a newline", "  leading and trailing  ",
    "&amp;lt;b&amp;gt; html &amp; entities &quot;quoted&quot;", "", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ ①②", "zzqx unknownword Ωmega ☃",
    "The quick brown fox jumps over the lazy dog. " * 4, "Привет, 서울 北京!",
]
LENGTHS = (1, 5, 16, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def hf_umt5(cfg: UMT5Config, seed: int = 0) -> transformers.UMT5EncoderModel:
    """Random, every param non-trivial: matrices ~ N(0, 1/fan_in), embedding and bias tables ~ N(0, 1), norm scales
    ~ 1 + N(0, 0.2²)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, feed_forward_proj=cfg.feed_forward_proj,
        dropout_rate=0.0)
    model = transformers.UMT5EncoderModel(hf_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                p.copy_(torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * p.shape[1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return hf_umt5(CFG)


@pytest.fixture(scope="module")
def hf_model_original():
    return hf_umt5(CFG_ORIGINAL, seed=1)


@pytest.fixture(scope="module")
def hf_model_bf16():
    """`hf_model_original` with its weights rounded to bf16 (what the bf16 .pth holds), run in fp32."""
    model = hf_umt5(CFG_ORIGINAL, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def save_original_pth(model, path: Path) -> None:
    """Wan's release file: original names, bf16, one flat state dict (no tied duplicate)."""
    sd = {umt5_keys.hf_to_original_key(k): v.to(torch.bfloat16).contiguous()
          for k, v in model.state_dict().items() if k != umt5_keys.TIED_KEY}
    torch.save(sd, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, hf_model, hf_model_original):
    root = tmp_path_factory.mktemp("umt5_src")
    (root / "diffusers").mkdir()
    hf_model.save_pretrained(root / "diffusers" / "text_encoder")
    (root / "sharded").mkdir()
    hf_model.save_pretrained(root / "sharded" / "text_encoder", max_shard_size="8KB")
    (root / "original").mkdir()
    save_original_pth(hf_model_original, root / "original" / umt5_part.ORIGINAL_FILE)
    return root


def run_ours(folder: Path, ids, mask, **overrides) -> np.ndarray:
    model = checkpoint.load_pretrained(folder, **overrides)
    return np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))


def run_hf(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def token_inputs(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [40, 17, 3]
    ids = rng.integers(1, CFG.vocab_size, (3, 40))
    mask = (np.arange(40)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


# ----------------------------------------------------------------------------------------------------------------------
# umT5 encoder part.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "sharded"])
def test_umt5_diffusers_parity(sources, hf_model, tmp_path, layout):
    located = umt5_part.locate(sources / layout)
    assert located.layout == umt5_part.DIFFUSERS
    if layout == "sharded":
        assert located.weights[0].name == "model.safetensors.index.json"
        assert len(list((sources / layout / "text_encoder").glob("*.safetensors"))) > 1
    result = umt5_part.convert(located, tmp_path / "umt5")
    assert result["config"] == dataclasses.replace(CFG, scan_layers=True).to_dict()
    assert result["tensors"] == len(umt5_keys.expected_hf_shapes(CFG))
    assert result["parameters"] == sum(p.numel() for p in hf_model.parameters())
    assert result["dtype"] == "float32"
    assert "umt5" in umt5_part.summary(result)
    ids, mask = token_inputs()
    got, want = run_ours(tmp_path / "umt5", ids, mask), run_hf(hf_model, ids, mask)
    err = rel_err(got, want)
    print(f"umT5 {layout}: rel err {err:.2e}")
    assert err <= TOL, err
    # the looped layout loads the same stacked folder
    assert rel_err(run_ours(tmp_path / "umt5", ids, mask, scan_layers=False), want) <= TOL


def test_umt5_original_pth_parity(sources, hf_model_bf16, tmp_path):
    located = umt5_part.locate(sources / "original")
    assert located.layout == umt5_part.ORIGINAL and located.config_path is None
    result = umt5_part.convert(located, tmp_path / "dst" / "umt5")  # dtype keep: bf16 stays bf16
    assert result["dtype"] == "bfloat16" and result["config"]["param_dtype"] == "bfloat16"
    assert result["config"] == dataclasses.replace(CFG_ORIGINAL, param_dtype="bfloat16").to_dict()
    notes = " ".join(result["notes"])
    assert "inferred from tensor shapes" in notes and "relative_attention_max_distance=128 assumed" in notes, notes
    meta = json.loads((tmp_path / "dst" / "umt5" / "config.json").read_text())
    assert meta["model"] == "umt5_encoder" and meta["source"]["config_inferred_from_shapes"] is True
    stored = checkpoint.read_param_metadata(tmp_path / "dst" / "umt5")
    assert {str(v.dtype) for v in stored.values()} == {"bfloat16"}
    ids, mask = token_inputs(1)
    got = run_ours(tmp_path / "dst" / "umt5", ids, mask, param_dtype="float32")
    err = rel_err(got, run_hf(hf_model_bf16, ids, mask))
    print(f"umT5 original bf16 .pth: rel err {err:.2e}")
    assert err <= TOL, err


def test_umt5_dtype_choice_and_overwrite(sources, hf_model_bf16, tmp_path):
    located = umt5_part.locate(sources / "original")
    out = tmp_path / "umt5"
    umt5_part.convert(located, out, dtype="float32")
    stored = checkpoint.read_param_metadata(out)
    assert {str(v.dtype) for v in stored.values()} == {"float32"}
    with pytest.raises(ValueError, match="already exists"):
        umt5_part.convert(located, out)
    umt5_part.convert(located, out, dtype="bfloat16", overwrite=True)
    assert {str(v.dtype) for v in checkpoint.read_param_metadata(out).values()} == {"bfloat16"}
    with pytest.raises(ValueError, match="dtype"):
        umt5_part.convert(located, tmp_path / "x", dtype="float64")
    assert not (tmp_path / "x").exists()


def test_umt5_tied_embedding_stored_twice(sources, hf_model, tmp_path):
    """A text_encoder whose file holds both names of the tied embedding converts; if they differ, it is refused."""
    from tools.convert_wan_weights.safetensors_io import write_safetensors

    src = tmp_path / "src" / "text_encoder"
    shutil.copytree(sources / "diffusers" / "text_encoder", src)
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert umt5_keys.TIED_KEY in sd
    (src / "model.safetensors").unlink()
    write_safetensors(src / "model.safetensors", sd)
    assert umt5_part.locate(src) == umt5_part.locate(src.parent)  # a lone text_encoder/ folder works too
    umt5_part.convert(umt5_part.locate(src.parent), tmp_path / "ok")
    ids, mask = token_inputs()
    assert rel_err(run_ours(tmp_path / "ok", ids, mask), run_hf(hf_model, ids, mask)) <= TOL
    sd[umt5_keys.TIED_KEY] = sd[umt5_keys.TIED_KEY] + 1
    write_safetensors(src / "model.safetensors", sd)
    with pytest.raises(ValueError, match="tied embedding"):
        umt5_part.convert(umt5_part.locate(src.parent), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_umt5_locate_absent(tmp_path):
    assert umt5_part.locate(tmp_path) is None
    assert umt5_part.locate(tmp_path / "nope") is None


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def _state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items() if k != umt5_keys.TIED_KEY}


@pytest.mark.parametrize("problem", ["corrupt_shard", "missing_key", "misshaped_key", "unexpected_key",
                                     "bad_config_json", "no_weights"])
def test_umt5_bad_diffusers_inputs(sources, hf_model, tmp_path, problem):
    from tools.convert_wan_weights.safetensors_io import write_safetensors

    src = tmp_path / "src"
    shutil.copytree(sources / "sharded", src)
    folder = src / "text_encoder"
    shards = sorted(folder.glob("model-*.safetensors"))
    if problem == "corrupt_shard":
        data = shards[1].read_bytes()
        shards[1].write_bytes(data[: len(data) - 100])  # a cut-short download
        expect = shards[1].name
    elif problem == "bad_config_json":
        (folder / "config.json").write_text("{not json")
        expect = "config.json"
    elif problem == "no_weights":
        for p in folder.glob("model*"):
            p.unlink()
        expect = "no umT5 weights"
    else:  # rewrite as one file with one tensor changed
        for p in folder.glob("model*"):
            p.unlink()
        sd = _state_dict_np(hf_model)
        key = "encoder.block.1.layer.0.SelfAttention.k.weight"
        if problem == "missing_key":
            del sd[key]
            expect = f"missing key.*{key}"
        elif problem == "misshaped_key":
            sd[key] = sd[key][:, :-1]
            expect = rf"mis-shaped.*{key}: expected \(21, 24\), got \(21, 23\)"
        else:
            sd["encoder.block.1.layer.0.SelfAttention.extra.weight"] = sd[key]
            expect = "unexpected key.*SelfAttention.extra.weight"
        write_safetensors(folder / "model.safetensors", sd)
    out = tmp_path / "dst" / "umt5"
    error = SafetensorsError if problem == "corrupt_shard" else ValueError
    with pytest.raises(error, match=expect):
        umt5_part.convert(umt5_part.locate(src), out)
    assert not out.exists() and _leftovers(out.parent) == []


@pytest.mark.parametrize("problem", ["missing_key", "misshaped_key", "unexpected_key", "corrupt_pth"])
def test_umt5_bad_original_inputs(hf_model, tmp_path, problem):
    src = tmp_path / "src"
    src.mkdir()
    path = src / umt5_part.ORIGINAL_FILE
    sd = {umt5_keys.hf_to_original_key(k): v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()
          if k != umt5_keys.TIED_KEY}
    key = "blocks.2.ffn.fc1.weight"
    if problem == "missing_key":
        del sd[key]
        expect = f"missing key.*{key}"
    elif problem == "misshaped_key":
        sd[key] = sd[key][:-2]
        expect = rf"mis-shaped.*{key}: expected \(40, 24\), got \(38, 24\)"
    elif problem == "unexpected_key":
        sd["blocks.2.ffn.gate.1.weight"] = sd[key]
        expect = "unexpected key.*blocks.2.ffn.gate.1.weight"
    torch.save(sd, path)
    if problem == "corrupt_pth":
        path.write_bytes(path.read_bytes()[:300])
        expect = f"{umt5_part.ORIGINAL_FILE}.*cannot read"
    out = tmp_path / "dst" / "umt5"
    with pytest.raises(ValueError, match=expect):
        umt5_part.convert(umt5_part.locate(src), out)
    assert not out.exists() and _leftovers(out.parent) == []


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: fixtures.
# ----------------------------------------------------------------------------------------------------------------------


def train_spiece() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 2), model_writer=model, model_type="unigram", vocab_size=200,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.9995, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def old_style_tokenizer_json(saved: dict) -> dict:
    """A transformers-4 T5 tokenizer.json (google/umt5-xxl's kind): Precompiled + Replace(" {2,}") normalizer and a
    lone Metaspace pre-tokenizer, instead of transformers 5's WhitespaceSplit + Metaspace."""
    j = json.loads(json.dumps(saved))
    j["normalizer"] = {"type": "Sequence", "normalizers": [
        j["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    return j


@pytest.fixture(scope="module")
def tok_sources(tmp_path_factory):
    """{name: SRC folder}: original release, diffusers pipeline, spiece-only (with and without extra_ids)."""
    root = tmp_path_factory.mktemp("tok_src")
    proto = train_spiece()
    seed = root / "seed"
    seed.mkdir()
    (seed / "spiece.model").write_bytes(proto)
    (seed / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 8}))
    hf = transformers.AutoTokenizer.from_pretrained(seed)
    out = {}
    out["diffusers"] = root / "diffusers"
    hf.save_pretrained(out["diffusers"] / "tokenizer")
    out["original"] = root / "original"
    umt5 = out["original"] / "google" / "umt5-xxl"
    umt5.mkdir(parents=True)
    (umt5 / "spiece.model").write_bytes(proto)
    saved = json.loads((out["diffusers"] / "tokenizer" / "tokenizer.json").read_text())
    (umt5 / "tokenizer.json").write_text(json.dumps(old_style_tokenizer_json(saved)))
    sentinels = [f"<extra_id_{i}>" for i in range(8)]
    (umt5 / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": sentinels}))
    (umt5 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 8, "additional_special_tokens": sentinels,
         "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    out["spiece_only"] = root / "spiece_only"
    shutil.copytree(seed, out["spiece_only"] / "tokenizer")
    out["spiece_bare"] = root / "spiece_bare"  # no tokenizer_config.json: transformers' default 100 sentinels
    (out["spiece_bare"] / "tokenizer").mkdir(parents=True)
    (out["spiece_bare"] / "tokenizer" / "spiece.model").write_bytes(proto)
    return out


def hf_tokenizer(folder: Path):
    """transformers' tokenizer for a folder: AutoTokenizer (it needs tokenizer_config.json to pick the class), else
    T5Tokenizer directly."""
    if (Path(folder) / "tokenizer_config.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(folder)
    return transformers.T5Tokenizer.from_pretrained(folder)


def hf_encode(hf, prompts, n):
    enc = hf(prompts, padding="max_length", max_length=n, truncation=True, add_special_tokens=True,
             return_attention_mask=True, return_tensors="np")
    return enc.input_ids, enc.attention_mask.astype(bool)


def assert_same_ids(ours: UMT5Tokenizer, hf, label: str) -> int:
    checked = 0
    for prompts in (PROMPTS, [clean_prompt(p) for p in PROMPTS]):
        for n in LENGTHS:
            want_ids, want_mask = hf_encode(hf, prompts, n)
            ids, mask = ours.encode(prompts, n)
            assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(prompts), n)
            bad = [(prompts[r], want_ids[r].tolist(), ids[r].tolist()) for r in range(len(prompts))
                   if (want_ids[r] != ids[r]).any() or (want_mask[r] != mask[r]).any()]
            assert not bad, f"{label}, max_length {n}: {bad[:2]}"
            checked += len(prompts)
    return checked


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: parity.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["original", "diffusers", "spiece_only", "spiece_bare"])
def test_tokenizer_ids_equal_transformers_raw_folder(tok_sources, name):
    located = tokenizer_part.locate(tok_sources[name])
    hf = hf_tokenizer(located.folder)
    ours = UMT5Tokenizer.load(located.folder)
    assert ours.vocab_size == len(hf)
    n = assert_same_ids(ours, hf, name)
    print(f"tokenizer {name} ({ours.built_from}): {n} encodings equal to transformers'")
    # some prompts really are truncated at the shorter lengths, and some pieces are unknown to the tiny vocabulary
    assert max(ours.count_tokens(PROMPTS)) > max(LENGTHS[:-1])
    assert (ours.encode(PROMPTS, 64)[0] == ours.unk_id).any()


@pytest.mark.parametrize("name", ["original", "diffusers", "spiece_only"])
def test_tokenizer_part_converts_and_matches(tok_sources, tmp_path, name):
    located = tokenizer_part.locate(tok_sources[name])
    assert located.layout == {"original": "original"}.get(name, "diffusers")
    out = tmp_path / "dst" / "tokenizer"
    result = tokenizer_part.convert(located, out)
    assert "tokenizer" in tokenizer_part.summary(result)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == "umt5_tokenizer" and meta["format_version"] == 1
    assert meta["source"]["layout"] == located.layout and (out / "tokenizer.json").is_file()
    for f in located.files:  # copied unchanged
        assert (out / f).read_bytes() == (located.folder / f).read_bytes()
    if name == "spiece_only":
        assert any("built from spiece.model" in n for n in meta["notes"])
    ours = UMT5Tokenizer.load(out)
    assert UMT5Tokenizer.load(out.parent).sha256 == ours.sha256 == UMT5Tokenizer.load(located.folder).sha256
    assert UMT5Tokenizer.load(tok_sources[name]).source == str(located.folder)
    hf = hf_tokenizer(located.folder)
    assert_same_ids(ours, hf, f"converted {name}")
    # transformers reading our folder (tokenizer.json + configs) agrees as well
    assert_same_ids(ours, hf_tokenizer(out), f"transformers on converted {name}")


def test_tokenizer_decode_round_trip(tok_sources):
    folder = tokenizer_part.locate(tok_sources["diffusers"]).folder
    ours, hf = UMT5Tokenizer.load(folder), hf_tokenizer(folder)
    cleaned = [clean_prompt(p) for p in PROMPTS]
    ids, mask = ours.encode(cleaned, 128)
    decoded = ours.decode(ids)
    assert decoded == [hf.decode(r[m], skip_special_tokens=True) for r, m in zip(ids, mask)]
    # texts made only of in-vocabulary pieces come back exactly if NFKC leaves them alone (cleaned: single spaces)
    simple = [p for p in cleaned if (ours.encode([p], 128)[0] != ours.unk_id).all()
              and unicodedata.normalize("NFKC", p) == p]
    assert len(simple) >= 3
    assert ours.decode(ours.encode(simple, 128)[0]) == simple
    # decode stops at the first eos and skips pads, specials and ids beyond the vocabulary
    row = ours.encode(["A red ball"], 8)[0][0].tolist()
    noisy = np.array([[row[0], 0, ours.vocab_size + 5, *row[1:]] + [7, 7]])
    assert ours.decode(noisy) == ["A red ball"]
    # count_tokens is the max_len that keeps a text whole
    for text, n in zip(PROMPTS, ours.count_tokens(PROMPTS)):
        ids, mask = ours.encode([text], n)
        assert ids[0, -1] == ours.eos_id and mask.all()


def test_tokenizer_api_and_pickle(tok_sources):
    ours = UMT5Tokenizer.load(tokenizer_part.locate(tok_sources["original"]).folder)
    assert (ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2)
    ids, mask = ours.encode(["A cat", "The quick brown fox jumps over the lazy dog."], 6)
    assert ids[1, -1] == ours.eos_id and mask[1].all()  # truncated keeps eos last
    assert (ids[0][~mask[0]] == ours.pad_id).all() and ids[0][mask[0]][-1] == ours.eos_id
    again = pickle.loads(pickle.dumps(ours))
    np.testing.assert_array_equal(again.encode(PROMPTS, 32)[0], ours.encode(PROMPTS, 32)[0])
    assert again.sha256 == ours.sha256 and ours.describe()["vocab_size"] == ours.vocab_size
    with pytest.raises(TypeError, match="list of texts"):
        ours.encode("one string", 8)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        ours.encode(["ok", 3], 8)
    with pytest.raises(ValueError, match="max_len"):
        ours.encode(["x"], 0)


def test_clean_prompt_matches_wan_pipeline():
    from diffusers.pipelines.wan import pipeline_wan

    for p in PROMPTS + ["\u00a0nbsp\u3000ideographic space", "&amp;amp; triple", "tab\tand\r\nCRLF  "]:
        assert clean_prompt(p) == pipeline_wan.prompt_clean(p), p
    assert clean_prompt("&amp;lt;b&amp;gt;  x ") == "<b> x"
    assert clean_prompt("a \t\n b") == "a b"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: bad inputs.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["corrupt_spiece", "corrupt_spiece_only", "missing_files", "bad_tokenizer_json",
                                     "bad_config_json", "mixed_vocab", "wrong_special_ids"])
def test_tokenizer_bad_inputs(tok_sources, tmp_path, problem):
    src = tmp_path / "src"
    shutil.copytree(tok_sources["original"], src)
    folder = src / "google" / "umt5-xxl"
    if problem == "corrupt_spiece":
        (folder / "spiece.model").write_bytes(b"\x0a\xff\xff garbage" * 10)
        expect = "spiece.model.*not a valid SentencePiece model"
    elif problem == "corrupt_spiece_only":
        (folder / "tokenizer.json").unlink()
        data = (folder / "spiece.model").read_bytes()
        (folder / "spiece.model").write_bytes(data[: len(data) // 2])
        expect = "spiece.model.*not a valid SentencePiece model"
    elif problem == "missing_files":
        (folder / "tokenizer.json").unlink()
        (folder / "spiece.model").unlink()
        expect = "no tokenizer files"
    elif problem == "bad_tokenizer_json":
        (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}')
        expect = "tokenizer.json.*not a SentencePiece Unigram"
    elif problem == "bad_config_json":
        (folder / "tokenizer_config.json").write_text("{")
        expect = "tokenizer_config.json.*not valid JSON"
    elif problem == "mixed_vocab":
        j = json.loads((folder / "tokenizer.json").read_text())
        j["model"]["vocab"][10][0] = "▁something_else"
        (folder / "tokenizer.json").write_text(json.dumps(j))
        expect = "different vocabularies.*id 10"
    else:
        j = json.loads((folder / "tokenizer.json").read_text())
        v = j["model"]["vocab"]
        v[0], v[1] = v[1], v[0]
        j["added_tokens"] = []
        (folder / "tokenizer.json").write_text(json.dumps(j))
        (folder / "spiece.model").unlink()
        expect = "tokenizer.json: <pad> has id 1, expected 0"
    out = tmp_path / "dst" / "tokenizer"
    with pytest.raises(ValueError, match=expect):
        tokenizer_part.convert(tokenizer_part.locate(src), out)
    assert not out.exists() and _leftovers(out.parent) == []


def test_tokenizer_locate_and_load_errors(tmp_path):
    assert tokenizer_part.locate(tmp_path) is None
    with pytest.raises(TokenizerError, match="no tokenizer.json or spiece.model"):
        UMT5Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no such tokenizer folder"):
        UMT5Tokenizer.load(tmp_path / "nope")
