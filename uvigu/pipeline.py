"""The inference pipeline: a converted Wan2.1 release or an exported Uni-ViGU folder -> videos and captions.

    pipe = uvigu.pipeline.load("checkpoints/wan2.1-1.3b")
    frames = pipe.t2v("a red fox runs through snow")          # [B, F, H, W, 3] float32 in [0, 1]
    captions = pipe.caption("clip.mp4")                       # Uni-ViGU folders only
    frames, captions = pipe.joint("a red fox runs through snow")

A folder (what `tools.convert_wan_weights` writes, or a training export) holds the denoiser (`univigu/` or `dit/`),
`vae/`, `umt5/`, `tokenizer/` and `pipeline.json` (the scheduler's solver and shift, the sampling defaults).

T2V reproduces diffusers' `WanPipeline` step for step (tested to 1e-4 on tiny random releases, both schedulers):
  1. prompts cleaned (`clean_prompt`: ftfy if installed, html unescape, whitespace), tokenised to the DiT's text_len
     (512) with eos and padding, umT5-encoded, rows past each prompt's length zeroed (`wan_context`);
  2. CFG when guidance_scale > 1: the negative prompt ("" by default) through the same path, then
     v = v_neg + g·(v_cond − v_neg) on the video velocity;
  3. the σ grid of the converted scheduler (`sampling.schedule`: UniPC's single shift or FlowMatch Euler's double
     shift) and its solver; the DiT sees σ·1000, truncated to an integer for UniPC as diffusers' UniPC does;
  4. latents [B, T, h, w, C] normalised (channels last) -> VAE decode (un-normalise, decode, clamp) -> (x + 1) / 2.
For a UniViGU the prompt's own tokens are also fed as clean text (τ_t = 1), as the released code does.
Captioning (V2T) holds the VAE-encoded video clean and integrates the text from the flow's source with the null
(zero) context; joint generation integrates both on one τ grid.

Each mode compiles once per shape and step count (one `jax.jit` around the whole sampling loop); `progress`
callbacks (done, total) fire once per denoising step from the device loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from uvigu import atomic_files, checkpoint, flow, sampling
from uvigu.data import video as video_io
from uvigu.data.umt5_tokenizer import UMT5Tokenizer, clean_prompt
from uvigu.models.umt5 import wan_context
from uvigu.models.univigu import UniViGU

PIPELINE_FILE = "pipeline.json"
Progress = Callable[[int, int], None]


class PipelineError(ValueError):
    """A folder or a request the pipeline cannot serve; the message names the folder, part or argument."""


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """What a call uses when an argument is left out: the folder's `pipeline.json`."""

    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 5.0
    solver: str = "unipc"
    fps: int = 16
    negative_prompt: str = ""
    caption_steps: int = 50  # V2T steps (the text flow's own grid)


def default_dtype() -> str:
    """bf16 compute on accelerators, fp32 on a CPU (where bf16 matmuls are slow and parity is checked)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load(path: str | Path, *, dtype=None, mesh: Mesh | None = None) -> "Pipeline":
    """The pipeline of a converted / exported folder. `dtype`: compute dtype of the DiT (None: `default_dtype()`);
    `mesh`: restore every part straight into its shards on that mesh (the logical-axis rules decide; the VAE's
    params carry no axes and stay replicated) and run every call under it."""
    root = Path(path)
    if not root.is_dir():
        raise PipelineError(f"{root}: no such model folder")
    meta_path = root / PIPELINE_FILE
    if not meta_path.is_file():
        raise PipelineError(f"{root}: no {PIPELINE_FILE}; convert the whole release with "
                            "`python -m tools.convert_wan_weights --src SRC --dst DST` (not --parts dit)")
    try:
        meta = json.loads(meta_path.read_text())
        scheduler, defaults = meta["scheduler"], meta["defaults"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PipelineError(f"{meta_path}: not a readable pipeline file ({e!r})") from None
    for part, sub in (("the VAE", "vae"), ("the umT5 encoder", "umt5"), ("the tokenizer", "tokenizer")):
        if not (root / sub).is_dir():
            raise PipelineError(f"{root}: {sub}/ is missing ({part}); convert it with --parts {sub}")
    compute = checkpoint._dtype_name(dtype) if dtype is not None else default_dtype()
    model = checkpoint.load_pretrained(root, mesh=mesh, dtype=compute)
    vae = checkpoint.load_pretrained(root, mesh=mesh, kind=checkpoint.WAN_VAE)
    encoder = checkpoint.load_pretrained(root, mesh=mesh, kind=checkpoint.UMT5_ENCODER)
    tokenizer = UMT5Tokenizer.load(root / "tokenizer")
    fields = {f.name for f in dataclasses.fields(SamplingDefaults)}
    merged = {**{k: v for k, v in defaults.items() if k in fields}, "shift": float(scheduler["shift"]),
              "solver": scheduler["solver"]}
    return Pipeline(model, vae, encoder, tokenizer, SamplingDefaults(**merged), source=root, mesh=mesh)


class Pipeline:
    """A denoiser (`WanDiT` or `UniViGU`), its VAE (the codec), umT5 and tokenizer, and the sampling defaults."""

    def __init__(self, model: nnx.Module, vae: nnx.Module, encoder: nnx.Module, tokenizer, defaults: SamplingDefaults,
                 *, source: Path | None = None, mesh: Mesh | None = None):
        self.model, self.vae, self.encoder, self.tokenizer = model, vae, encoder, tokenizer
        self.mesh = mesh
        self.defaults = defaults
        self.source = source
        self.kind = "univigu" if isinstance(model, UniViGU) else "wan"
        self.dit = model.dit if isinstance(model, UniViGU) else model
        self._compiled: dict[Any, Callable] = {}

    def with_model(self, model: nnx.Module) -> "Pipeline":
        """The same VAE, umT5, tokenizer and defaults around another denoiser (e.g. a UniViGU trained from this
        folder's DiT)."""
        return Pipeline(model, self.vae, self.encoder, self.tokenizer, self.defaults, source=self.source,
                        mesh=self.mesh)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Writes every part as a folder `load` opens: the denoiser (`univigu/` or `dit/`), `vae/`, `umt5/`,
        `tokenizer/` (copied from the folder it was loaded from) and `pipeline.json`; each part staged, then renamed."""
        path = Path(path)
        sub = checkpoint.kind_of(self.model).subfolder
        checkpoint.save_pretrained(path / sub, self.model, overwrite=overwrite)
        checkpoint.save_pretrained(path / "vae", self.vae, overwrite=overwrite)
        checkpoint.save_pretrained(path / "umt5", self.encoder, overwrite=overwrite)
        with checkpoint.staged_folder(path / "tokenizer", overwrite) as staging:
            source = Path(self.tokenizer.source)
            for item in source.iterdir():
                if item.is_file():
                    shutil.copyfile(item, staging / item.name)
        d = dataclasses.asdict(self.defaults)
        meta = {"format_version": 1, "scheduler": {"solver": d.pop("solver"), "shift": d.pop("shift"),
                                                   "source": str(self.source)}, "defaults": d}
        atomic_files.write_text(path / PIPELINE_FILE, json.dumps(meta, indent=2) + "\n")
        return path

    # -- checks ------------------------------------------------------------------------------------------------------

    def check_video_size(self, num_frames: int, height: int, width: int) -> None:
        """PipelineError naming the nearest valid values: frames must be 1 + 4k (the VAE's time stride) and height and
        width multiples of 16 (VAE stride 8 × patch 2)."""
        t_stride, s_stride, _ = self.vae.stride
        try:
            video_io.check_video_size(num_frames, height, width, spatial=s_stride * self.dit.config.patch_size[1],
                                      temporal=t_stride)
        except ValueError as e:
            raise PipelineError(str(e)) from None

    def _generation_settings(self, prompt, height, width, num_frames, num_inference_steps, guidance_scale, shift,
                             solver) -> tuple[list[str], dict[str, Any]]:
        """The prompts as a list and every unset generation argument from the folder's defaults, checked."""
        d = self.defaults
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        settings = dict(height=height or d.height, width=width or d.width, num_frames=num_frames or d.num_frames,
                        steps=num_inference_steps or d.num_inference_steps,
                        guidance=d.guidance_scale if guidance_scale is None else guidance_scale,
                        solver=solver or d.solver, shift=d.shift if shift is None else shift)
        self.check_video_size(settings["num_frames"], settings["height"], settings["width"])
        settings["latent_shape"] = (len(prompts), *self.vae.latent_shape(settings["num_frames"], settings["height"],
                                                                         settings["width"]))
        settings["sigmas"] = sampling.schedule(settings["solver"], settings["steps"], settings["shift"])
        return prompts, settings

    def _need_unified(self, what: str) -> UniViGU:
        if not isinstance(self.model, UniViGU):
            raise PipelineError(f"{what} needs a Uni-ViGU model; {self.source or 'this folder'} holds a Wan2.1 DiT "
                                "(train one with configs/stage1.py, or convert a Uni-ViGU checkpoint)")
        return self.model

    # -- text --------------------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer.encode([clean_prompt(p) for p in prompts], max_len)

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """umT5 embeddings as the DiT takes them: [B, text_len, text_dim], rows past each prompt zeroed."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text_len = self.dit.config.text_len
        ids, mask = self.tokenize(prompts, text_len)
        return self._jit("encode", _encode_prompt, text_len)(self.encoder, jnp.asarray(ids), jnp.asarray(mask))

    # -- the three modes ---------------------------------------------------------------------------------------------

    def t2v(self, prompt: str | Sequence[str], *, negative_prompt: str | None = None, height: int | None = None,
            width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
            guidance_scale: float | None = None, shift: float | None = None, solver: str | None = None,
            seed: int = 0, latents=None, progress: Progress | None = None) -> np.ndarray:
        """Text -> video frames [B, F, H, W, 3] float32 in [0, 1]. `latents`: normalised initial latents
        [B, T, h, w, C] (channels last), else N(0, I) from `seed`. Unset arguments take the folder's defaults."""
        prompts, s = self._generation_settings(prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                                               shift, solver)
        noise = self._initial_latents(latents, s["latent_shape"], seed)
        context = self.encode_prompt(prompts)
        negative = self.defaults.negative_prompt if negative_prompt is None else negative_prompt
        null = self.encode_prompt([negative] * len(prompts)) if s["guidance"] > 1.0 else None
        text, text_mask = self._prompt_text(prompts)
        run = self._jit(("t2v", s["solver"], null is None), _t2v, s["solver"])
        with self._reporting(progress, s["steps"]):
            z = run(self.model, noise, s["sigmas"], context, null, jnp.float32(s["guidance"]), text, text_mask)
        return self._frames(z)

    def caption(self, video, *, num_inference_steps: int | None = None, seed: int = 0,
                progress: Progress | None = None) -> list[str]:
        """Video -> captions. `video`: a path (decoded at the folder's fps, size and frame count) or frames
        [B, F, H, W, 3] (uint8, or float in [0, 1]) at a size the VAE takes."""
        model = self._need_unified("captioning")
        frames = self._read_frames(video)
        steps = num_inference_steps or self.defaults.caption_steps
        self.check_video_size(frames.shape[1], frames.shape[2], frames.shape[3])
        latents = self._jit("encode_video", _encode_video)(self.vae, jnp.asarray(frames * 2.0 - 1.0))
        text_len = model.config.max_text_len
        context = jnp.zeros((frames.shape[0], self.dit.config.text_len, self.dit.config.text_dim), jnp.float32)
        sigmas = sampling.schedule(self.defaults.solver, steps, self.defaults.shift)
        run = self._jit(("v2t", self.defaults.solver, text_len), _v2t, self.defaults.solver, text_len)
        with self._reporting(progress, steps):
            ids = run(model, jax.random.key(seed), latents, context, sigmas)
        return self.tokenizer.decode(np.asarray(ids))

    def joint(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
              num_frames: int | None = None, num_inference_steps: int | None = None,
              guidance_scale: float | None = None, shift: float | None = None, solver: str | None = None,
              seed: int = 0, progress: Progress | None = None) -> tuple[np.ndarray, list[str]]:
        """Video and caption generated together from the prompt: (frames [B, F, H, W, 3] in [0, 1], captions)."""
        model = self._need_unified("joint generation")
        prompts, s = self._generation_settings(prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                                               shift, solver)
        context = self.encode_prompt(prompts)
        null = self.encode_prompt([self.defaults.negative_prompt] * len(prompts)) if s["guidance"] > 1.0 else None
        text_len = model.config.max_text_len
        run = self._jit(("joint", s["solver"], null is None, text_len), _joint, s["solver"], text_len)
        with self._reporting(progress, s["steps"]):
            z, ids = run(model, jax.random.key(seed), self._initial_latents(None, s["latent_shape"], seed), s["sigmas"],
                         context, null, jnp.float32(s["guidance"]))
        return self._frames(z), self.tokenizer.decode(np.asarray(ids))

    # -- pieces ------------------------------------------------------------------------------------------------------

    def _initial_latents(self, latents, shape, seed: int) -> jax.Array:
        if latents is None:
            return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if tuple(latents.shape) != tuple(shape):
            raise PipelineError(f"latents must be [B, T, h, w, C] = {tuple(shape)} (normalised, channels last) for "
                                f"these prompts and this size; got {tuple(latents.shape)}")
        return latents

    def _prompt_text(self, prompts: list[str]):
        """The clean text a UniViGU sees in T2V: the prompt's own tokens (and the attention mask over them)."""
        if not isinstance(self.model, UniViGU):
            return None, None
        ids, mask = self.tokenize(prompts, self.model.config.max_text_len)
        return self.model.text_flow.clean(jnp.asarray(ids)), jnp.ones(ids.shape, bool)

    def _read_frames(self, video) -> np.ndarray:
        """[B, F, H, W, 3] float32 in [0, 1] from a path or frames."""
        if isinstance(video, (str, Path)):
            d = self.defaults
            frames = video_io.read_video(video, fps=d.fps, num_frames=d.num_frames, height=d.height,
                                         width=d.width)[None]
        else:
            frames = np.asarray(video)
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise PipelineError(f"video frames must be [B, F, H, W, 3], got {frames.shape}")
        if frames.dtype == np.uint8:
            return frames.astype(np.float32) / 255.0
        return np.clip(frames.astype(np.float32), 0.0, 1.0)

    def _frames(self, latents) -> np.ndarray:
        video = self._jit("decode", _decode_video)(self.vae, latents)
        return np.asarray(video, np.float32)

    def _jit(self, key, fn, *static) -> Callable:
        """`fn(*static, module, *arrays)` jitted once per key (shapes recompile as jit does). On a mesh the arrays
        are placed replicated next to the sharded params and the call runs under that mesh."""
        if key not in self._compiled:
            self._compiled[key] = nnx.jit(lambda *args: fn(*static, *args))
        compiled, mesh = self._compiled[key], self.mesh
        if mesh is None:
            return compiled
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def on_mesh(module, *arrays):
            arrays = jax.tree.map(lambda a: jax.device_put(a, replicated), arrays)
            with jax.set_mesh(mesh):
                return compiled(module, *arrays)

        return on_mesh

    @contextlib.contextmanager
    def _reporting(self, progress: Progress | None, total: int):
        """Routes the device loop's per-step ticks to `progress(done, total)` while one sampling call runs."""
        done = 0

        def tick():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        with _TICK_LOCK:
            _TICK_SINK[:] = [tick]
            try:
                yield
                jax.effects_barrier()  # every tick delivered before the call returns
            finally:
                _TICK_SINK.clear()


# ----------------------------------------------------------------------------------------------------------------------
# The jitted bodies (module first, then arrays; solver and lengths static).
# ----------------------------------------------------------------------------------------------------------------------

def _encode_prompt(text_len: int, encoder, ids, mask):
    return wan_context(encoder(ids, mask), mask, text_len)


def _encode_video(vae, video):
    return vae.encode(video)


def _decode_video(vae, latents):
    return jnp.clip((vae.decode(latents).astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def _wan_velocity(dit, solver: str) -> sampling.VelocityFn:
    """A bare DiT as the samplers' velocity function. The DiT sees σ·1000 (diffusers' UniPC truncates it to an
    integer timestep; its solver keeps the float σ)."""

    # The samplers loop in `lax.scan`, the DiT in `nnx.scan`, which refuses modules from an outer trace level: split
    # once here and re-assemble inside each call (as `UniViGU.as_velocity_fn` does).
    graphdef, state = nnx.split(dit)

    def velocity(video, text, tau_v, tau_t, context, text_mask=None):
        timestep = flow.tau_to_wan_timestep(tau_v)
        if solver == "unipc":
            timestep = jnp.floor(timestep + 1e-4)  # σ·1000 = k must not floor to k − 1 after fp32 rounding (ulp 6e-5)
        model = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        return flow.wan_velocity_to_paper(model(video, timestep, context)), text

    return velocity


def _counting(velocity: sampling.VelocityFn, report: bool) -> sampling.VelocityFn:
    """Reports each call (one per denoising step) to the host for progress bars, when `report`."""
    if not report:
        return velocity

    def counted(*args):
        out = velocity(*args)
        jax.debug.callback(_tick)  # unordered: ordered effects are single-device only; ticks are just counted
        return out

    return counted


_TICK_SINK: list[Callable[[], None]] = []  # the running call's progress counter (one sampling call at a time)
_TICK_LOCK = threading.Lock()


def _tick() -> None:
    for sink in _TICK_SINK:
        sink()


def velocity_fn(model: nnx.Module, solver: str) -> sampling.VelocityFn:
    """The samplers' velocity function of either denoiser (a bare DiT ignores the text)."""
    return model.as_velocity_fn() if isinstance(model, UniViGU) else _wan_velocity(model, solver)


# The sampling core of the three modes, on embeddings and latents: what `Pipeline` runs (under one jit each) and what
# the toy-world evaluation runs on its records. `sigmas` from `sampling.schedule(solver, steps, shift)`.


def t2v_latents(model, noise, sigmas, context, null_context, guidance_scale, text=None, text_mask=None, *,
                solver: str, report: bool = False):
    """Video latents [B, T, h, w, C] from `noise`; a UniViGU also sees `text` (the prompt, clean)."""
    if text is None:
        text = jnp.zeros((noise.shape[0], 0), jnp.int32)  # a bare DiT: no text tokens
    return sampling.sample_t2v(_counting(velocity_fn(model, solver), report), None, noise.shape, text, context,
                               null_context=null_context, guidance_scale=guidance_scale, solver=solver,
                               text_mask=text_mask, sigmas=sigmas, noise=noise)


def v2t_ids(model: UniViGU, key, latents, context, sigmas, text_len: int, *, solver: str, report: bool = False):
    """Caption ids [B, text_len] of clean video latents (every text position visible, as trained)."""
    return sampling.sample_v2t(_counting(model.as_velocity_fn(), report), key, latents, model.text_flow, text_len,
                               context, solver=solver, sigmas=sigmas,
                               text_mask=jnp.ones((latents.shape[0], text_len), bool))


def joint_sample(model: UniViGU, key, video_shape, sigmas, context, null_context, guidance_scale, text_len: int, *,
                 solver: str, noise=None, report: bool = False):
    """(video latents, caption ids), integrated together on one τ grid."""
    return sampling.sample_joint(_counting(model.as_velocity_fn(), report), key, video_shape, model.text_flow,
                                 text_len, context, null_context, guidance_scale, solver=solver, sigmas=sigmas,
                                 noise=noise, text_mask=jnp.ones((video_shape[0], text_len), bool))


def _t2v(solver, model, noise, sigmas, context, null, guidance, text, text_mask):
    return t2v_latents(model, noise, sigmas, context, null, guidance, text, text_mask, solver=solver, report=True)


def _v2t(solver, text_len, model, key, latents, context, sigmas):
    return v2t_ids(model, key, latents, context, sigmas, text_len, solver=solver, report=True)


def _joint(solver, text_len, model, key, noise, sigmas, context, null, guidance):
    return joint_sample(model, key, noise.shape, sigmas, context, null, guidance, text_len, solver=solver, noise=noise,
                        report=True)
