"""`make demo`: the whole method on the embedded toy world, on a CPU.

  1. builds the 'moving shapes' world (videos -> toy-codec latents, prompts, detailed captions, umT5 contexts),
  2. pretrains the toy T2V generator (video-only flow matching; it stands where Wan2.1's weights stand) and
     exports it as a Wan model folder,
  3. stage 1, Knowledge Recall: UniViGU from that generator, target text = the prompt,
  4. stage 2, Capability Refinement: from stage 1, target text = the detailed caption,
  5. evaluates each stage on the held-out attribute combinations and prints T2V / V2T per-attribute accuracy vs
     chance, and how often a jointly generated caption agrees with its own video.
`ROOT/demo_result.json` holds every stage's evaluation: `pretrain_t2v.test.t2v.<attribute>`,
`stage2.test.{t2v,v2t}.<attribute>`, `stage2.test.v2t.exact_match`, `stage2.test.joint.agreement`, ...
Everything goes under `--root` (default `runs/demo`, gitignored); a finished stage is not retrained when the demo is
run again (its workdir resumes at its last step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags, logging

from uvigu import atomic_files, run_config

_ROOT = flags.DEFINE_string("root", "runs/demo", "Where the world, the three workdirs and the samples go.")
_TEXT_FLOW = flags.DEFINE_enum("text_flow", "discrete", ["discrete", "embedding"], "The text flow of stages 1-2.")
_STEPS = flags.DEFINE_list("steps", None, "Training steps of pretrain_t2v,stage1,stage2 (default: the configs').")
_VIDEO_LR_SCALE = flags.DEFINE_float(
    "video_lr_scale", None, "Stages 1-2 train the generator's (DiT's) params at lr x this, the text side at lr "
    "(config.optim.video_lr_scale; default: the configs', 1). 0.25 keeps a long generator's T2V through stages 1-2 "
    "(README); the demo's 2000-step generator has none to keep, and its captioning needs the full rate.")

def stage_configs(root: Path, text_flow: str, steps: list[int] | None, overrides: dict | None = None,
                  video_lr_scale: float | None = None):
    """The three tiny configs, chained: stage 1 starts from the pretrain export, stage 2 from the stage-1 workdir.
    `overrides` ({"model.wan.dim": 32, ...}) go into every stage (the tests' smaller demo); `video_lr_scale` into
    stages 1-2 (`config.optim.video_lr_scale`)."""
    out = {}
    for i, stage in enumerate(("pretrain_t2v", "stage1", "stage2")):
        c = run_config.load(stage, "tiny")
        c.data.path = str(root / "toy_world")
        c.model.univigu.text_flow = text_flow
        if steps:
            c.total_steps = steps[i]
        if stage == "stage1":
            c.init.path = str(root / "pretrain_t2v" / "export" / "dit")
        elif stage == "stage2":
            c.init.path = str(root / "stage1")
        if stage != "pretrain_t2v" and video_lr_scale is not None:
            c.optim.video_lr_scale = video_lr_scale
        for key, value in (overrides or {}).items():
            *parents, last = key.split(".")
            node = c
            for part in parents:
                node = node[part]
            node[last] = value
        out[stage] = c
    return out


def run(root: Path, text_flow: str, steps: list[int] | None = None, overrides: dict | None = None,
        video_lr_scale: float | None = None) -> dict:
    """Trains (or resumes) the three stages under `root` and writes `root/demo_result.json`: the run's seconds, text
    flow and each stage's evaluation (`pretrain_t2v`, `stage1`, `stage2`: `{validation,test}.{t2v,v2t,joint}`).
    Returns that summary."""
    from uvigu import train

    t0 = time.perf_counter()
    summary: dict = {"text_flow": text_flow}
    for stage, c in stage_configs(root, text_flow, steps, overrides, video_lr_scale).items():
        t_stage = time.perf_counter()
        logging.info("==== %s (%d steps) ====", stage, c.total_steps)
        result = train.train_and_evaluate(c, str(root / stage))
        history = result["history"]
        done = f"final loss {history[-1]['loss']:.4f}" if history else "already trained (resumed at its last step)"
        print(f"{stage:>13}: {c.total_steps} steps, {done}, {time.perf_counter() - t_stage:.0f} s", flush=True)
        summary[stage] = result["eval"]
    summary["seconds"] = time.perf_counter() - t0
    atomic_files.write_text(root / "demo_result.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_table(report: dict, chance: dict) -> str:
    rows = ["                       " + "  ".join(f"{a:>10}" for a in chance) + "  exact_match"]
    for split in ("validation", "test"):
        for mode in ("t2v", "v2t"):
            metrics = report.get(split, {}).get(mode)
            if not metrics:
                continue
            cells = "  ".join(f"{metrics[a]:>10.2f}" if a in metrics else f"{'-':>10}" for a in chance)
            rows.append(f"{split:>10} {mode.upper():>4} acc  {cells}  {metrics['exact_match']:>11.2f}")
    rows.append(f"{'chance':>19}  " + "  ".join(f"{v:>10.2f}" for v in chance.values()))
    return "\n".join(rows)


def main(argv):
    del argv
    root = Path(_ROOT.value).absolute()
    steps = [int(s) for s in _STEPS.value] if _STEPS.value else None
    summary = run(root, _TEXT_FLOW.value, steps, video_lr_scale=_VIDEO_LR_SCALE.value)
    final = summary["stage2"]
    chance = final["chance"]
    print(f"\nUni-ViGU toy world, text flow '{_TEXT_FLOW.value}', {summary['seconds'] / 60:.1f} min on the CPU")
    print("test = held-out (shape, colour, motion) combinations never seen in training; T2V scored on the prompt's "
          "attributes by a pixel detector, V2T on every attribute of the parsed caption.\n")
    print("the generator (pretrain_t2v: video-only flow matching, before any text layers)")
    print(format_table(summary["pretrain_t2v"], chance))
    print("\nafter stage 1 (Knowledge Recall: prompt as target)")
    print(format_table(summary["stage1"], chance))
    print("\nafter stage 2 (Capability Refinement: detailed caption as target)")
    print(format_table(final, chance))
    joint = final["test"]["joint"]
    print(f"\njoint generation on held-out prompts: the generated caption agrees with the detector's reading of its "
          f"own video on shape {joint['shape']:.2f}, colour {joint['colour']:.2f}, motion {joint['motion']:.2f} "
          f"(mean {joint['agreement']:.2f}; all three {joint['exact_match']:.2f})")
    generator = summary["pretrain_t2v"]["test"]["t2v"]
    kept = ", ".join(f"{a} {final['test']['t2v'][a] - generator[a]:+.2f}" for a in ("shape", "colour", "motion"))
    print(f"the generative prior kept: held-out T2V after stage 2 minus the generator's: {kept}")
    print(f"\nsamples: {root}/stage2/samples/  (T2V and joint GIFs, captions.txt)")
    print(f"results: {root}/demo_result.json")


if __name__ == "__main__":
    app.run(main)
