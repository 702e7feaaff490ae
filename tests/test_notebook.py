"""experiments/notebooks/uvigu_demo.ipynb runs top to bottom (nbclient, a real kernel) on a tiny random Wan2.1 release
built by tests/tiny_release.py, downloading nothing: its parameters cell (tag "parameters") is replaced by one
pointing at the tiny release, tiny sizes and INSTALL = False.
  whole notebook  it converts the diffusers folder itself, merges a LoRA, generates, shows the MP4 inline (the
                  HTML5 video holds the MP4's bytes), then captions the MP4 with a Uni-ViGU folder built on the
                  converted DiT: the caption cell prints one;
  Wan-only        DST converted already (RELEASE absent) and video-only: the caption cell prints its skip message.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import tiny_release as tr

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "notebooks" / "uvigu_demo.ipynb"
SIZE = (5, 32, 32)
SKIP_MESSAGE = "Skipping captioning:"
TIMEOUT = 240  # per cell; the whole test takes well under a minute


def parameters_cell(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"want exactly one cell tagged 'parameters', found {found}"
    return found[0]


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def run_notebook(params: dict, tmp_path: Path, only: tuple[str, ...] | None = None):
    """Executes the notebook with its parameters cell replaced by `params` (and, with `only`, just the cells of
    those ids after it); returns the executed notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = parameters_cell(nb)
    if only is not None:
        missing = set(only) - {c.get("id") for c in nb.cells}
        assert not missing, f"the notebook has no cells {sorted(missing)}"
        nb.cells = [c for i, c in enumerate(nb.cells) if i == index or c.get("id") in only]
        index = parameters_cell(nb)
    # Every injected name must be one the notebook declares: a renamed parameter cannot be silently ignored.
    unknown = set(params) - assigned_names(nb.cells[index].source)
    assert not unknown, f"the notebook's parameters cell has no {sorted(unknown)}"
    nb.cells[index].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the kernel inherits it: no hub access
    try:
        NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
    nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure
    return nb


def cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def text_of(c, stream: str | None = None) -> str:
    """A cell's printed text (stdout and stderr, or only `stream`) and plain-text results."""
    out = []
    for o in c.get("outputs", []):
        if o.output_type == "stream" and stream in (None, o.name):
            out.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            out.append(o.data.get("text/plain", ""))
    return "".join(out)


def check_ran(nb):
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None, f"cell {c.id} did not run"
            errors = [o for o in c.outputs if o.output_type == "error"]
            assert not errors, f"cell {c.id}: {errors}"


def check_video(nb, path: Path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == SIZE[0] and frames[0].shape == (*SIZE[1:], 3)
    html = [o.data["text/html"] for o in cell(nb, "show").outputs if "text/html" in o.get("data", {})]
    assert len(html) == 1 and 'src="data:video/mp4;base64,' in html[0]
    # The inline video is the MP4 itself.
    import base64

    payload = html[0].split("base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(payload) == path.read_bytes()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(tiny diffusers release, its conversion, a Uni-ViGU folder built on that DiT) under one root."""
    import torch
    from flax import nnx

    from tools.convert_wan_weights.cli import main as convert_main
    from uvigu import pipeline as uvigu_pipeline
    from uvigu.models.univigu import UniViGU, UniViGUConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("notebook")
    tr.save_diffusers(tr.build_tiny_pipeline("unipc"), root / "src")
    assert convert_main(["--src", str(root / "src"), "--dst", str(root / "wan")]) == 0
    pipe = uvigu_pipeline.load(root / "wan")
    side = UniViGUConfig(text_flow="discrete", vocab_size=pipe.tokenizer.vocab_size, max_text_len=8)
    pipe.with_model(UniViGU.from_wan(pipe.model, side, rngs=nnx.Rngs(3))).save(root / "univigu")
    return root


def base_params(root: Path, tmp_path: Path) -> dict:
    return dict(WORK=str(tmp_path), RELEASE=str(root / "src"), DST=str(tmp_path / "dst"), UNIVIGU="",
                PROMPT="a red circle moves left across a dark background", NEGATIVE_PROMPT=None, SIZE=SIZE, STEPS=2,
                GUIDE=4.0, SEED=1, CAPTION_STEPS=2, OUT=str(tmp_path / "demo.mp4"), LORA="", LORA_SCALE=1.0,
                DTYPE="float32", INSTALL=False, RUNTIME="cpu", REPO="(not used: INSTALL is False)")


def test_notebook_converts_generates_shows_and_captions(folders, tmp_path):
    """The whole notebook: it converts the release itself into DST, merges a LoRA, generates, shows the MP4 inline,
    then captions the MP4 with another folder (a Uni-ViGU one)."""
    from uvigu.models import lora_formats
    from uvigu.models.lora import LoRAWeight

    rng = np.random.default_rng(0)
    adapters = {f"blocks.{n}.attn1.to_q": LoRAWeight(rng.normal(0, 0.5, (24, 4)), rng.normal(0, 0.5, (4, 24)), 4.0)
                for n in range(2)}
    lora_file = lora_formats.save_lora(adapters, tmp_path / "style.safetensors", "original")
    params = dict(base_params(folders, tmp_path), UNIVIGU=str(folders / "univigu"), LORA=str(lora_file),
                  LORA_SCALE=0.5)
    start = time.perf_counter()
    nb = run_notebook(params, tmp_path)
    seconds = time.perf_counter() - start
    check_ran(nb)
    assert "skipping the install" in text_of(cell(nb, "install"))
    assert f"converted {folders / 'src'} -> {tmp_path / 'dst'}" in text_of(cell(nb, "convert"))
    assert json.loads((tmp_path / "dst" / "pipeline.json").read_text())["scheduler"]["solver"] == "unipc"
    generated = text_of(cell(nb, "generate"), "stdout")
    assert "merged 2 LoRA adapter(s) (original layout)" in generated and "a wan model" in generated
    check_video(nb, tmp_path / "demo.mp4")
    captioned = text_of(cell(nb, "caption"), "stdout")
    lines = [line for line in captioned.splitlines() if line.startswith("caption: ")]
    assert len(lines) == 1 and len(lines[0]) > len("caption: ") and SKIP_MESSAGE not in captioned, captioned
    print(f"notebook run: {seconds:.1f} s, {lines[0]!r}")


def test_caption_cell_skips_a_wan_only_folder(folders, tmp_path):
    """DST converted already (RELEASE may then be absent) and Wan-only, no UNIVIGU: the caption cell says why it
    skips. Only the cells this needs run (the generation path is the test above)."""
    params = dict(base_params(folders, tmp_path), RELEASE=str(tmp_path / "absent"), DST=str(folders / "wan"))
    nb = run_notebook(params, tmp_path, only=("install", "convert", "caption"))
    check_ran(nb)
    assert "is converted already" in text_of(cell(nb, "convert"))
    captioned = text_of(cell(nb, "caption"), "stdout")
    assert captioned.startswith(SKIP_MESSAGE) and str(folders / "wan") in captioned and "caption: " not in captioned


def test_parameters_cell_is_plain_and_complete():
    """The defaults users see: the cell CI replaces assigns every name the test injects, and nothing else in the
    notebook assigns them (so an injected value is the one used)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = parameters_cell(nb)
    declared = assigned_names(nb.cells[index].source)
    assert set(base_params(Path("r"), Path("t"))) <= declared
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and i != index:
            assert not assigned_names(c.source) & declared, f"cell {c.id} reassigns a parameter"
    downloads = [c.id for c in nb.cells if c.cell_type == "code" and any(
        word in line for line in c.source.splitlines() if not line.lstrip().startswith("#")
        for word in ("huggingface-cli", "hf download", "snapshot_download", "hf_hub_download"))]
    assert downloads == [], f"cells that download when run: {downloads}"


# ----------------------------------------------------------------------------------------------------------------------
# experiments/tpu/launch_stage1.sh
# ----------------------------------------------------------------------------------------------------------------------

LAUNCH = ROOT / "experiments" / "tpu" / "launch_stage1.sh"


def launch(*args, **env):
    import subprocess

    full = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "DST", "SHARDS",
                                                              "WORKDIR", "VARIANT", "REPO_DIR", "PYTHON", "LOG")}
    full.update(env)
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, env=full, timeout=30)


def test_launch_script_syntax_and_command():
    """`bash -n` passes; --dry-run prints one gcloud command that runs, on every worker, uvigu.main with the stage-1
    flags (values with spaces survive the remote shell), flags that exist in main.py and configs/stage1.py."""
    import shlex
    import subprocess

    assert subprocess.run(["bash", "-n", str(LAUNCH)], capture_output=True).returncode == 0
    env = dict(TPU_NAME="slice", ZONE="us-east5-a", PROJECT="proj", DST="/mnt/s/wan 1.3b", SHARDS="/mnt/s/shards",
               WORKDIR="/mnt/s/runs/stage1")
    r = launch("--dry-run", "--", "--config.total_steps=7", **env)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice"]
    assert {"--zone=us-east5-a", "--worker=all", "--project=proj"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    words = shlex.split(remote)  # what the remote shell will see
    assert words[:4] == ["cd", "~/uvigu", "&&", "nohup"]
    i = words.index("-m")
    cmd = words[i - 1:words.index(">")]
    assert cmd == ["~/uvigu/.venv/bin/python", "-m", "uvigu.main", "--config=configs/stage1.py:wan2.1-1.3b",
                   "--workdir=/mnt/s/runs/stage1", "--jax_distributed", "--config.init.path=/mnt/s/wan 1.3b",
                   "--config.data.path=/mnt/s/shards", "--config.mesh.fsdp=-1", "--config.total_steps=7"]
    assert remote.rstrip().endswith("< /dev/null &")
    # The flags exist: main.py's --jax_distributed and the config fields the script sets.
    from uvigu import run_config

    assert "_DISTRIBUTED = flags.DEFINE_bool(\"jax_distributed\"" in (ROOT / "uvigu" / "main.py").read_text()
    c = run_config.load("stage1", "wan2.1-1.3b")
    assert "path" in c.init and "path" in c.data and c.mesh.fsdp == -1 and c.init.kind == "wan"


def test_launch_script_refuses_bad_settings():
    r = launch("--dry-run")
    assert r.returncode == 2 and "set TPU_NAME ZONE DST SHARDS WORKDIR" in r.stderr
    r = launch("--dry-run", TPU_NAME="s", ZONE="z", DST="/d", SHARDS="/s", WORKDIR="gs://bucket/run")
    assert r.returncode == 2 and "WORKDIR=gs://bucket/run is a URL" in r.stderr and "gcsfuse" in r.stderr
    r = launch("--bogus", TPU_NAME="s", ZONE="z", DST="/d", SHARDS="/s", WORKDIR="/w")
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
