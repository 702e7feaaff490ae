"""The paper's claim, measured on the toy world: does a generator's text->video knowledge make video->text cheap to
learn? Every arm trains the same UniViGU on the same data for the same number of steps; only where it starts and what
it may change differ.

    python -m experiments.prior_ablation                      # 5 arms x 3 seeds (slow: hours on a 2-core CPU)
    python -m experiments.prior_ablation --seeds 0 --arms method,no_prior --scale 0.5
    python -m experiments.prior_ablation --report_only        # rewrite the table and plot from finished runs

Arms (stage lengths are the `tiny` configs' stage 1 and stage 2 steps, times `--scale`):
  method        generator prior -> stage 1 (Knowledge Recall) -> stage 2 (Capability Refinement)   the paper's recipe
  no_recall     generator prior -> stage 2 only, for stage-1 + stage-2 steps                     no Knowledge Recall
  no_prior      random init     -> stage 1 -> stage 2                                             no generative prior
  frozen_video  generator prior -> stage 1 -> stage 2, video side frozen (`optim.freeze_video`)   prior kept exactly
  embedding     the method with the paper's embedding text flow instead of the discrete one
  no_recall_restart
                generator prior -> stage 2 for stage-1 steps -> stage 2 again (its schedule and optimizer restarted)
                the method's two-run structure without Knowledge Recall: the control that tells what Knowledge Recall
                does from what restarting the learning-rate schedule and Adam's moments after stage 1 does
The generator prior is one `pretrain_t2v` run on the same world (`--prior`, default: the demo's export, trained here
first if it does not exist); every seed starts from it, as every fine-tune of Wan2.1 starts from the same weights.
Seeds change the training randomness (init of the new text layers, noise, batches' order), never the world
(`data.world_seed` stays 0).

Each run is evaluated on the held-out split every `--evals` of its length (V2T from the video alone, T2V by the pixel
detector; `uvigu.evaluate`). Outputs, under `--out` (default experiments/results/):
  prior_ablation.md    final held-out accuracy per arm, mean ± std over seeds, and the differences to the method
  prior_ablation.png   held-out V2T (mean over shape/colour/motion, the attributes both stages score) and T2V
                       against the step, one line per arm (mean over seeds, band: ± std)
  prior_ablation.json  every run's curve and final metrics
Runs live under `--runs`; a finished run is not retrained when the script is run again.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Sequence

from absl import app, flags, logging

ARMS = ("method", "no_recall", "no_prior", "frozen_video", "embedding", "no_recall_restart")
PROMPT_ATTRIBUTES = ("shape", "colour", "motion")
V2T_COLUMNS = ("shape", "colour", "motion", "size", "speed", "position", "background", "exact_match")

# (--runs, not --root: uvigu.demo defines --root, and both may be imported in one process.)
_RUNS = flags.DEFINE_string("runs", "runs/prior_ablation", "Where the runs go.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the table, plot and JSON go.")
_PRIOR = flags.DEFINE_string("prior", "runs/demo/pretrain_t2v", "The pretrain_t2v workdir of the generator prior "
                             "(trained there first if it has no export).")
_WORLD = flags.DEFINE_string("world", "runs/demo/toy_world", "The toy world's cache folder (shared with the demo).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of every arm.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), f"Arms to run, among {ARMS}.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Stage lengths as a fraction of the tiny configs'.")
_EVALS = flags.DEFINE_integer("evals", 4, "Evaluations per run (the last at its end).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 128, "Held-out examples per evaluation.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rewrite the report from the runs under --runs.")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of an arm: its config and workdir, and the step it starts at on the arm's common axis."""

    name: str
    config: object
    workdir: Path
    offset: int


def arm_stages(arm: str, seed: int, root: Path, prior: Path, world: Path, steps: tuple[int, int], evals: int,
               eval_examples: int) -> list[Stage]:
    """The runs of one arm and seed, in order. Stage lengths are `steps` (stage 1, stage 2); `no_recall` spends both
    in one stage-2 run, `no_recall_restart` in two."""
    from uvigu import run_config

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")
    base = root / arm / f"seed{seed}"
    plan = {"no_recall": [("stage2", "stage2", steps[0] + steps[1])],  # (workdir name, stage, steps)
            "no_recall_restart": [("stage2_first", "stage2", steps[0]), ("stage2", "stage2", steps[1])]}.get(
        arm, [("stage1", "stage1", steps[0]), ("stage2", "stage2", steps[1])])
    stages, offset = [], 0
    for name, stage, length in plan:
        c = run_config.load(stage, "tiny")
        c.seed = seed
        c.data.path = str(world)
        c.total_steps = length
        c.eval_every = max(1, -(-length // evals))  # the last periodic evaluation is the final one
        c.eval_examples = eval_examples
        c.sample.num_saved = 0
        c.sample.text_temperature = 1.0  # captions drawn from the flow's law, as in the committed table
        if arm == "embedding":
            c.model.univigu.text_flow = "embedding"
        if arm == "frozen_video":
            c.optim.freeze_video = True
        if not stages:  # the arm's first run: from the prior, or from nothing
            c.init.kind, c.init.path = ("scratch", "") if arm == "no_prior" else ("wan", str(prior / "export" / "dit"))
        else:
            c.init.kind, c.init.path = "stage", str(stages[-1].workdir)
        stages.append(Stage(name, c, base / name, offset))
        offset += length
    return stages


def tiny_steps(scale: float) -> tuple[int, int]:
    from uvigu import run_config

    return tuple(max(1, round(run_config.load(s, "tiny").total_steps * scale)) for s in ("stage1", "stage2"))


def ensure_prior(prior: Path, world: Path) -> None:
    """Trains the generator prior (the demo's pretrain_t2v) if its export is missing."""
    from uvigu import run_config, train

    if (prior / "export" / "dit").exists():
        return
    logging.info("no generator prior at %s: training it (pretrain_t2v, tiny)", prior)
    c = run_config.load("pretrain_t2v", "tiny")
    c.data.path = str(world)
    c.eval_examples = 0
    train.train_and_evaluate(c, str(prior))


# ----------------------------------------------------------------------------------------------------------------------
# Reading finished runs.
# ----------------------------------------------------------------------------------------------------------------------


def held_out_reports(stage: Stage) -> list[dict]:
    """The run's held-out evaluations, in step order; a finished run's last one is at its final step."""
    evals = sorted((stage.workdir / "eval").glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return [r for r in (json.loads(p.read_text()) for p in evals) if "test" in r]


def finished(stage: Stage, reports: Sequence[dict] | None = None) -> bool:
    """Whether the run's last held-out evaluation is at its final step (`reports`: its `held_out_reports`, if read)."""
    reports = held_out_reports(stage) if reports is None else reports
    return bool(reports) and reports[-1]["step"] == stage.config.total_steps


def read_run(stages: Sequence[Stage]) -> dict | None:
    """One arm-seed's curve [(step on the arm's axis, V2T mean over shape/colour/motion, T2V mean)] and the final
    held-out metrics (of its last run's last evaluation); None while any run is unfinished."""
    curve = []
    for stage in stages:
        reports = held_out_reports(stage)
        if not finished(stage, reports):
            return None
        for r in reports:
            test = r["test"]
            curve.append((stage.offset + r["step"], _mean(test["v2t"], PROMPT_ATTRIBUTES),
                          _mean(test["t2v"], PROMPT_ATTRIBUTES)))
    final = json.loads(json.dumps(reports[-1]["test"]))
    return {"curve": curve, "final": final}


def _mean(metrics: dict, attributes: Sequence[str]) -> float:
    return float(sum(metrics[a] for a in attributes) / len(attributes))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{arm: {column: (mean, std, seeds)}} over the finished seeds; V2T columns as in V2T_COLUMNS, T2V ones as
    't2v_<attribute>'."""
    out = {}
    for arm, seeds in runs.items():
        finals = [r["final"] for r in seeds.values()]
        if not finals:
            continue
        columns = {f"v2t_{k}": [f["v2t"][k] for f in finals] for k in V2T_COLUMNS}
        columns.update({f"t2v_{k}": [f["t2v"][k] for f in finals] for k in PROMPT_ATTRIBUTES})
        out[arm] = {k: (*_mean_std(v), len(v)) for k, v in columns.items()}
    return out


def markdown_table(summary: dict, steps: tuple[int, int]) -> str:
    """The final held-out accuracy per arm (mean ± std over seeds) and each arm's exact-match difference to the
    method's, with the pooled std of that difference."""
    head = ["arm", "seeds", *[f"V2T {k}" for k in V2T_COLUMNS], *[f"T2V {k}" for k in PROMPT_ATTRIBUTES]]
    lines = [f"Held-out (test split) accuracy after {steps[0]} + {steps[1]} steps, mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, cols in summary.items():
        seeds = next(iter(cols.values()))[2]
        cells = [f"{m:.3f} ± {s:.3f}" for m, s, _ in (cols[f"v2t_{k}"] for k in V2T_COLUMNS)]
        cells += [f"{m:.3f} ± {s:.3f}" for m, s, _ in (cols[f"t2v_{k}"] for k in PROMPT_ATTRIBUTES)]
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    if "method" in summary:
        lines += ["", "Difference to the method in V2T exact match (± the std of the difference of two means):", ""]
        m, s, n = summary["method"]["v2t_exact_match"]
        for arm, cols in summary.items():
            if arm == "method":
                continue
            am, as_, an = cols["v2t_exact_match"]
            pooled = (s**2 / n + as_**2 / an) ** 0.5
            lines.append(f"- {arm}: {am - m:+.3f} ± {pooled:.3f}")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Held-out V2T and T2V (means over shape/colour/motion) against the step, one line per arm: the mean over
    seeds, a band of ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for arm, seeds in runs.items():
        curves = [r["curve"] for r in seeds.values()]
        if not curves:
            continue
        steps = sorted({s for c in curves for s, _, _ in c})
        for ax, column in zip(axes, (1, 2)):
            # Seeds share the evaluation steps (same lengths, same eval_every); a missing point is left out.
            values = np.full((len(curves), len(steps)), np.nan)
            for i, curve in enumerate(curves):
                for point in curve:
                    values[i, steps.index(point[0])] = point[column]
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            ax.plot(steps, mean, marker="o", label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    for ax, title in zip(axes, ("held-out V2T (mean of shape, colour, motion)", "held-out T2V (pixel detector)")):
        ax.set_title(title)
        ax.set_xlabel("training step (stage 1 + stage 2)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if axes[0].lines:  # no finished run yet: an empty plot, without a legend
        axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: Path, out: Path, arms: Sequence[str], seeds: Sequence[int], steps: tuple[int, int],
                 stages_of) -> dict:
    runs = {arm: {} for arm in arms}
    for arm in arms:
        for seed in seeds:
            run = read_run(stages_of(arm, seed))
            if run is not None:
                runs[arm][seed] = run
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prior_ablation.md").write_text(markdown_table(summary, steps))
    (out / "prior_ablation.json").write_text(json.dumps({"steps": steps, "runs": runs}, indent=1) + "\n")
    plot(runs, out / "prior_ablation.png")
    return summary


def main(argv):
    del argv
    from uvigu import train

    root, out, prior, world = (Path(f.value).absolute() for f in (_RUNS, _OUT, _PRIOR, _WORLD))
    seeds = [int(s) for s in _SEEDS.value]
    unknown = set(_ARMS.value) - set(ARMS)
    if unknown:
        raise app.UsageError(f"unknown arms {sorted(unknown)}; arms are {ARMS}")
    steps = tiny_steps(_SCALE.value)

    def stages_of(arm, seed):
        return arm_stages(arm, seed, root, prior, world, steps, _EVALS.value, _EVAL_EXAMPLES.value)

    if not _REPORT_ONLY.value:
        ensure_prior(prior, world)
        for seed in seeds:  # seed-major: a partial sweep already has every arm at some seeds
            for arm in _ARMS.value:
                for stage in stages_of(arm, seed):
                    if finished(stage):  # its final evaluation is written: skip without building the model
                        continue
                    logging.info("==== %s seed %d: %s (%d steps) ====", arm, seed, stage.name,
                                 stage.config.total_steps)
                    if train.train_and_evaluate(stage.config, str(stage.workdir))["stopped_early"]:
                        logging.warning("SIGTERM: the sweep stops here (rerun it to resume)")
                        write_report(root, out, _ARMS.value, seeds, steps, stages_of)
                        return None
                write_report(root, out, _ARMS.value, seeds, steps, stages_of)
    summary = write_report(root, out, _ARMS.value, seeds, steps, stages_of)
    print((out / "prior_ablation.md").read_text())
    print(f"plot: {out / 'prior_ablation.png'}")
    return summary


if __name__ == "__main__":
    app.run(main)
