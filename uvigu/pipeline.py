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

Conventions (`Conventions`, pipeline.json's optional "conventions"; absent = ours, as above). A folder converted
from the released Uni-ViGU checkpoint (`--univigu`) records the release's, so its outputs are reproduced:
  latents          "normalized" | "raw": the DiT works on VAE latents (μ − mean)/std, or on the raw VAE μ (release);
  pad_context      "zeroed" | "unzeroed": umT5 rows past each prompt are zeroed (Wan), or kept as the encoder wrote
                   them over the whole 512-token padded input (release);
  t2v_text         "prompt_visible" | "prompt_tokens": T2V's clean text is the prompt tokenised to max_text_len with
                   every position visible (ours), or with the tokenizer's key-padding mask (release);
  joint_text_time  "video_time": text time = video time in joint sampling (both ours and the release's);
  joint_text_update "mixture" | "released": the text takes mixture-path steps on the τ grid (ours), or (release) at
                   step i of N every token is replaced by a sample of the model's softmax with probability i/(N − 1),
                   and after the loop one more call at τ_v = τ_t = 1 (conditional context) gives the argmax tokens;
  sigmas           "solver" | "linspace_shift": the solver's own σ grid (`sampling.schedule`), or the release's
                   σ = shift(linspace(1, 0, N + 1)[:-1]) then 0 (its FlowMatchScheduler, sigma_min 0);
  caption_latents  "mean" | "sample": V2T encodes the VAE posterior mean, or a sample μ + σ·ε (release);
  caption_sigmas   "solver" | "uniform": V2T's text grid is the video's shifted one, or uniform τ = i/N (release's
                   discrete solver with step 1/N);
  text_time_rounding "none" | "integer": V2T's text time in Wan units as is, or rounded to an integer (release).
Not reproduced: the release's bf16 autocast (its timesteps are bf16-rounded too) and its precomputed null embedding
file (empty_context_t5_emb.pt); our null condition is the negative prompt encoded by the same path.

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
    caption_temperature: float = 1.0  # of the discrete text flow's token draws (captions, joint); 0: greedy


_CONVENTION_VALUES = {
    "latents": ("normalized", "raw"),
    "pad_context": ("zeroed", "unzeroed"),
    "t2v_text": ("prompt_visible", "prompt_tokens"),
    "joint_text_time": ("video_time",),
    "joint_text_update": ("mixture", "released"),
    "sigmas": ("solver", "linspace_shift"),
    "caption_latents": ("mean", "sample"),
    "caption_sigmas": ("solver", "uniform"),
    "text_time_rounding": ("none", "integer"),
}


@dataclasses.dataclass(frozen=True)
class Conventions:
    """How the pipeline prepares inputs and steps the samplers (module docstring); the first value of each is ours."""

    latents: str = "normalized"
    pad_context: str = "zeroed"
    t2v_text: str = "prompt_visible"
    joint_text_time: str = "video_time"
    joint_text_update: str = "mixture"
    sigmas: str = "solver"
    caption_latents: str = "mean"
    caption_sigmas: str = "solver"
    text_time_rounding: str = "none"

    def __post_init__(self):
        for name, allowed in _CONVENTION_VALUES.items():
            if getattr(self, name) not in allowed:
                raise PipelineError(f"conventions.{name}={getattr(self, name)!r} is not one of {list(allowed)}")

    @classmethod
    def from_dict(cls, d: Any, where: str = "conventions") -> "Conventions":
        if not isinstance(d, dict):
            raise PipelineError(f"{where}: must be an object of convention names, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_CONVENTION_VALUES))
        if unknown:
            raise PipelineError(f"{where}: unknown convention(s) {unknown}; known: {sorted(_CONVENTION_VALUES)}")
        return cls(**d)

    def changed(self) -> dict[str, str]:
        """The conventions that differ from ours (what pipeline.json records)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v != _CONVENTION_VALUES[k][0]}


def _check_temperature(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise PipelineError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def released_sigmas(num_steps: int, shift: float) -> jax.Array:
    """The released Uni-ViGU grid: σ = shift(linspace(1, 0, N + 1)[:-1]), then a terminal 0 (float64 on the host)."""
    base = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
    return jnp.asarray(np.concatenate([shift * base / (1.0 + (shift - 1.0) * base), [0.0]]), jnp.float32)


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
        raw_conventions = meta.get("conventions", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PipelineError(f"{meta_path}: not a readable pipeline file ({e!r})") from None
    conventions = Conventions.from_dict(raw_conventions, f"{meta_path}: conventions")
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
    _check_temperature(merged.get("caption_temperature", 1.0), f"{meta_path}: defaults.caption_temperature")
    return Pipeline(model, vae, encoder, tokenizer, SamplingDefaults(**merged), source=root, mesh=mesh,
                    conventions=conventions)


class Pipeline:
    """A denoiser (`WanDiT` or `UniViGU`), its VAE (the codec), umT5 and tokenizer, and the sampling defaults."""

    def __init__(self, model: nnx.Module, vae: nnx.Module, encoder: nnx.Module, tokenizer, defaults: SamplingDefaults,
                 *, source: Path | None = None, mesh: Mesh | None = None, conventions: Conventions | None = None):
        self.model, self.vae, self.encoder, self.tokenizer = model, vae, encoder, tokenizer
        self.mesh = mesh
        self.conventions = conventions or Conventions()
        self.defaults = defaults
        self.source = source
        self.kind = "univigu" if isinstance(model, UniViGU) else "wan"
        self.dit = model.dit if isinstance(model, UniViGU) else model
        self._compiled: dict[Any, Callable] = {}

    def with_model(self, model: nnx.Module) -> "Pipeline":
        """The same VAE, umT5, tokenizer and defaults around another denoiser (e.g. a UniViGU trained from this
        folder's DiT)."""
        return Pipeline(model, self.vae, self.encoder, self.tokenizer, self.defaults, source=self.source,
                        mesh=self.mesh, conventions=self.conventions)

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
        if self.conventions.changed():
            meta["conventions"] = self.conventions.changed()
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
        if self.conventions.sigmas == "linspace_shift":
            settings["sigmas"] = released_sigmas(settings["steps"], settings["shift"])
        else:
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
        """umT5 embeddings as the DiT takes them: [B, text_len, text_dim], rows past each prompt zeroed (or, with
        pad_context="unzeroed", the encoder's output over the whole padded input)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text_len = self.dit.config.text_len
        ids, mask = self.tokenize(prompts, text_len)
        zeroed = self.conventions.pad_context == "zeroed"
        return self._jit(("encode", zeroed), _encode_prompt, text_len, zeroed)(self.encoder, jnp.asarray(ids),
                                                                               jnp.asarray(mask))

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

    def caption(self, video, *, num_inference_steps: int | None = None, temperature: float | None = None,
                seed: int = 0, progress: Progress | None = None) -> list[str]:
        """Video -> captions. `video`: a path (decoded at the folder's fps, size and frame count) or frames
        [B, F, H, W, 3] (uint8, or float in [0, 1]) at a size the VAE takes. `temperature`: of the discrete text
        flow's token draws (0: the most likely token at every step; default: the folder's `caption_temperature`)."""
        model = self._need_unified("captioning")
        temperature = self._temperature(temperature)
        frames = self._read_frames(video)
        steps = num_inference_steps or self.defaults.caption_steps
        self.check_video_size(frames.shape[1], frames.shape[2], frames.shape[3])
        c = self.conventions
        key_video, key_text = jax.random.split(jax.random.key(seed))
        encode = (c.latents == "raw", c.caption_latents == "sample")
        latents = self._jit(("encode_video", encode), _encode_video, *encode)(
            self.vae, jnp.asarray(frames * 2.0 - 1.0), key_video)
        text_len = model.config.max_text_len
        context = jnp.zeros((frames.shape[0], self.dit.config.text_len, self.dit.config.text_dim), jnp.float32)
        if c.caption_sigmas == "uniform":
            sigmas = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
        else:
            sigmas = sampling.schedule(self.defaults.solver, steps, self.defaults.shift)
        rounding = c.text_time_rounding == "integer"
        run = self._jit(("v2t", self.defaults.solver, text_len, rounding, temperature), _v2t, self.defaults.solver,
                        text_len, rounding, temperature)
        with self._reporting(progress, steps):
            ids = run(model, key_text, latents, context, sigmas)
        return self.tokenizer.decode(np.asarray(ids))

    def joint(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
              num_frames: int | None = None, num_inference_steps: int | None = None,
              guidance_scale: float | None = None, shift: float | None = None, solver: str | None = None,
              temperature: float | None = None, seed: int = 0,
              progress: Progress | None = None) -> tuple[np.ndarray, list[str]]:
        """Video and caption generated together from the prompt: (frames [B, F, H, W, 3] in [0, 1], captions).
        `temperature`: as in `caption`."""
        model = self._need_unified("joint generation")
        temperature = self._temperature(temperature)
        prompts, s = self._generation_settings(prompt, height, width, num_frames, num_inference_steps, guidance_scale,
                                               shift, solver)
        context = self.encode_prompt(prompts)
        null = self.encode_prompt([self.defaults.negative_prompt] * len(prompts)) if s["guidance"] > 1.0 else None
        text_len = model.config.max_text_len
        if self.conventions.joint_text_update == "released":
            run = self._jit(("joint-released", null is None, text_len, temperature), _joint_released, text_len,
                            temperature)
        else:
            run = self._jit(("joint", s["solver"], null is None, text_len, temperature), _joint, s["solver"],
                            text_len, temperature)
        with self._reporting(progress, s["steps"]):
            z, ids = run(model, jax.random.key(seed), self._initial_latents(None, s["latent_shape"], seed), s["sigmas"],
                         context, null, jnp.float32(s["guidance"]))
        return self._frames(z), self.tokenizer.decode(np.asarray(ids))

    # -- pieces ------------------------------------------------------------------------------------------------------

    def _temperature(self, temperature: float | None) -> float:
        if temperature is None:
            return float(self.defaults.caption_temperature)
        return _check_temperature(temperature, "temperature")

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
        if self.conventions.t2v_text == "prompt_tokens":  # the release: padded to max_length, a key-padding mask
            return self.model.text_flow.clean(jnp.asarray(ids)), jnp.asarray(mask, bool)
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
        raw = self.conventions.latents == "raw"
        video = self._jit(("decode", raw), _decode_video, raw)(self.vae, latents)
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

def _encode_prompt(text_len: int, zeroed: bool, encoder, ids, mask):
    if not zeroed:  # the release: every row of the padded input as the encoder wrote it
        return encoder(ids, mask).astype(jnp.float32)
    return wan_context(encoder(ids, mask), mask, text_len)


def _encode_video(raw: bool, sample: bool, vae, video, key):
    """Latents of a clip: the posterior mean or (sample) μ + exp(logvar / 2)·ε; normalised unless raw."""
    mu, logvar = vae.encode_moments(video)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype) if sample else mu
    return z if raw else vae.normalize(z)


def _decode_video(raw: bool, vae, latents):
    video = vae.decode_raw(latents) if raw else vae.decode(latents)
    return jnp.clip((video.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


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


def _integer_text_time(velocity: sampling.VelocityFn) -> sampling.VelocityFn:
    """The release's V2T text time: round((1 − τ_t)·1000) Wan units, i.e. τ_t snapped to multiples of 1/1000."""

    def rounded(video, text, tau_v, tau_t, context, text_mask=None):
        steps = flow.WAN_NUM_TRAIN_TIMESTEPS
        return velocity(video, text, tau_v, 1.0 - jnp.round((1.0 - tau_t) * steps) / steps, context, text_mask)

    return rounded


def v2t_ids(model: UniViGU, key, latents, context, sigmas, text_len: int, *, solver: str, report: bool = False,
            integer_text_time: bool = False, temperature: float = 1.0):
    """Caption ids [B, text_len] of clean video latents (every text position visible, as trained); `temperature`:
    of the discrete text flow's token draws (0: greedy)."""
    velocity = model.as_velocity_fn()
    if integer_text_time:
        velocity = _integer_text_time(velocity)
    return sampling.sample_v2t(_counting(velocity, report), key, latents, model.text_flow, text_len,
                               context, solver=solver, sigmas=sigmas, text_temperature=temperature,
                               text_mask=jnp.ones((latents.shape[0], text_len), bool))


def joint_sample(model: UniViGU, key, video_shape, sigmas, context, null_context, guidance_scale, text_len: int, *,
                 solver: str, noise=None, report: bool = False, temperature: float = 1.0):
    """(video latents, caption ids), integrated together on one τ grid."""
    return sampling.sample_joint(_counting(model.as_velocity_fn(), report), key, video_shape, model.text_flow,
                                 text_len, context, null_context, guidance_scale, solver=solver, sigmas=sigmas,
                                 noise=noise, text_mask=jnp.ones((video_shape[0], text_len), bool),
                                 text_temperature=temperature)


def _t2v(solver, model, noise, sigmas, context, null, guidance, text, text_mask):
    return t2v_latents(model, noise, sigmas, context, null, guidance, text, text_mask, solver=solver, report=True)


def _v2t(solver, text_len, integer_text_time, temperature, model, key, latents, context, sigmas):
    return v2t_ids(model, key, latents, context, sigmas, text_len, solver=solver, report=True,
                   integer_text_time=integer_text_time, temperature=temperature)


def _joint(solver, text_len, temperature, model, key, noise, sigmas, context, null, guidance):
    return joint_sample(model, key, noise.shape, sigmas, context, null, guidance, text_len, solver=solver, noise=noise,
                        report=True, temperature=temperature)


def joint_sample_released(model: UniViGU, key, noise, sigmas, context, null_context, guidance_scale, text_len: int, *,
                          report: bool = False, temperature: float = 1.0):
    """The released joint (T2VT) loop: (video latents, caption ids).

    Text starts from the flow's source; at each step i of N one (CFG'd on video) model call at τ_v = τ_t = 1 − σ_i;
    the video takes an Euler step to σ_{i+1}; every token is replaced by a draw from softmax(logits) with probability
    i/(N − 1) (1 when N = 1). Then one more call at τ_v = τ_t = 1 with the conditional context only, and its argmax is
    the caption. (The release's own text solver is not the mixture path's; this is its update, as written.)
    `temperature` tempers the draws (1: the release's)."""
    velocity = _counting(model.as_velocity_fn(), report)
    batch, n = noise.shape[0], sigmas.shape[0] - 1
    key_text, key_loop = jax.random.split(key)
    ids = model.text_flow.source(key_text, batch, text_len)
    mask = jnp.ones((batch, text_len), bool)
    progress = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1) if n > 1 else jnp.ones((1,), jnp.float32)

    def step(carry, per_step):
        z, ids = carry
        sigma, sigma_next, keep_p, k = per_step
        taus = jnp.full((batch,), 1.0 - sigma)
        v, logits = sampling._call_with_guidance(velocity, z, ids, taus, taus, context, null_context, guidance_scale,
                                                 mask)
        z = z + (sigma - sigma_next).astype(z.dtype) * v  # Euler in σ on the paper velocity dz/dτ = −dz/dσ
        k_sample, k_keep = jax.random.split(k)
        sampled = flow.draw_tokens(jax.random.uniform(k_sample, ids.shape), logits, temperature)
        ids = jnp.where(jax.random.uniform(k_keep, ids.shape) < keep_p, sampled, ids)
        return (z, ids), None

    (z, ids), _ = jax.lax.scan(step, (noise, ids), (sigmas[:-1], sigmas[1:], progress, jax.random.split(key_loop, n)))
    ones = jnp.ones((batch,), jnp.float32)
    _, logits = model.as_velocity_fn()(z, ids, ones, ones, context, mask)
    return z, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _joint_released(text_len, temperature, model, key, noise, sigmas, context, null, guidance):
    return joint_sample_released(model, key, noise, sigmas, context, null, guidance, text_len, report=True,
                                 temperature=temperature)
