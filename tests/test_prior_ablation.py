"""experiments.prior_ablation without training: what each arm runs, and how finished runs become the table and plot."""

import json
from pathlib import Path

import pytest

from experiments import prior_ablation as ablation

STEPS = (30, 70)


def stages(arm, seed=0, root=Path("/r")):
    return ablation.arm_stages(arm, seed, root, Path("/prior"), Path("/world"), STEPS, evals=2, eval_examples=16)


def test_arms_differ_only_where_they_should():
    method = stages("method")
    assert [(s.name, s.config.total_steps, s.offset) for s in method] == [("stage1", 30, 0), ("stage2", 70, 30)]
    assert (method[0].config.init.kind, method[0].config.init.path) == ("wan", "/prior/export/dit")
    assert (method[1].config.init.kind, method[1].config.init.path) == ("stage", str(method[0].workdir))
    # Equal steps: no Knowledge Recall spends both stages' steps in stage 2, from the prior.
    (only,) = stages("no_recall")
    assert (only.name, only.config.total_steps, only.config.init.kind) == ("stage2", 100, "wan")
    assert only.config.data.text_target == "caption"
    # Its control keeps the method's two runs (a restarted schedule and optimizer after the first) without recall.
    first, second = stages("no_recall_restart")
    assert [(s.config.stage, s.config.total_steps, s.offset) for s in (first, second)] == [("stage2", 30, 0),
                                                                                           ("stage2", 70, 30)]
    assert (first.config.init.kind, second.config.init.kind, second.config.init.path) == ("wan", "stage",
                                                                                        str(first.workdir))
    assert first.workdir != second.workdir and first.config.data.text_target == "caption"
    assert stages("no_prior")[0].config.init.kind == "scratch"
    assert all(s.config.optim.freeze_video for s in stages("frozen_video"))
    assert not any(s.config.optim.freeze_video for s in method)
    assert {s.config.model.univigu.text_flow for s in stages("embedding")} == {"embedding"}
    assert {s.config.model.univigu.text_flow for s in method} == {"discrete"}
    # Seeds change the training randomness, never the world, and runs never share a workdir.
    other = stages("method", seed=2)
    assert [s.config.seed for s in other] == [2, 2] and [s.config.data.world_seed for s in other] == [0, 0]
    assert {s.workdir for s in other}.isdisjoint({s.workdir for s in method})
    assert method[0].config.eval_every == 15 and method[1].config.eval_every == 35
    with pytest.raises(ValueError, match="unknown arm"):
        stages("no_such_arm")


def _write_eval(workdir: Path, step: int, v2t: float, t2v: float, exact: float) -> None:
    (workdir / "eval").mkdir(parents=True, exist_ok=True)
    metrics = {a: v2t for a in ablation.V2T_COLUMNS}
    metrics["exact_match"] = exact
    report = {"step": step, "test": {"v2t": metrics, "t2v": {a: t2v for a in ablation.PROMPT_ATTRIBUTES}}}
    (workdir / "eval" / f"step_{step}.json").write_text(json.dumps(report))


def test_report_from_finished_runs(tmp_path):
    finals = {("method", 0): 0.9, ("method", 1): 0.7, ("no_prior", 0): 0.4, ("no_prior", 1): 0.2}
    for (arm, seed), final in finals.items():
        s1, s2 = stages(arm, seed, root=tmp_path)
        _write_eval(s1.workdir, 15, 0.5, 0.8, 0.1)
        _write_eval(s1.workdir, 30, 0.6, 0.8, 0.1)
        _write_eval(s2.workdir, 35, 0.7, 0.9, final / 2)
        _write_eval(s2.workdir, 70, final, 0.9, final)
    # An unfinished run (its last evaluation is not at its last step) is left out, not half counted.
    s1, s2 = stages("method", 2, root=tmp_path)
    _write_eval(s1.workdir, 30, 0.6, 0.8, 0.1)
    _write_eval(s2.workdir, 35, 0.99, 0.9, 0.99)

    run = ablation.read_run(stages("method", 0, root=tmp_path))
    assert [p[0] for p in run["curve"]] == [15, 30, 65, 100]  # stage 2's steps continue stage 1's
    assert run["curve"][-1][1] == pytest.approx(0.9) and run["final"]["v2t"]["exact_match"] == 0.9
    assert ablation.read_run(stages("method", 2, root=tmp_path)) is None

    out = tmp_path / "results"
    summary = ablation.write_report(tmp_path, out, ["method", "no_prior"], [0, 1, 2], STEPS,
                                    lambda arm, seed: stages(arm, seed, root=tmp_path))
    mean, std, n = summary["method"]["v2t_exact_match"]
    assert (mean, n) == (pytest.approx(0.8), 2) and std == pytest.approx(0.1414, abs=1e-4)
    table = (out / "prior_ablation.md").read_text()
    assert "| method | 2 | 0.800 ± 0.141" in table
    assert "- no_prior: -0.500 ± 0.141" in table  # 0.3 − 0.8, √(0.02/2 + 0.02/2)
    assert (out / "prior_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "prior_ablation.json").read_text())["runs"]["method"]) == {"0", "1"}


def test_rerun_trains_only_unfinished_stages(tmp_path, monkeypatch):
    """A rerun skips every stage whose final evaluation is written, without building its model; a stage with only
    earlier evaluations (cut short) is trained again (train resumes it from its checkpoint)."""
    from absl import flags
    from uvigu import train

    root, prior = tmp_path / "runs", tmp_path / "prior"
    (prior / "export" / "dit").mkdir(parents=True)  # a prior exists: nothing trains it
    s1, s2 = ablation.arm_stages("method", 0, root, prior, tmp_path / "world", (4, 6), evals=2, eval_examples=16)
    _write_eval(s1.workdir, 4, 0.6, 0.8, 0.1)  # stage 1 finished
    _write_eval(s2.workdir, 3, 0.7, 0.9, 0.5)  # stage 2 stopped after its first evaluation
    trained = []
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, workdir: trained.append(workdir) or {"stopped_early": True})
    flags.FLAGS(["prior_ablation", f"--runs={root}", f"--prior={prior}", f"--out={tmp_path / 'out'}",
                 f"--world={tmp_path / 'world'}", "--arms=method", "--seeds=0", "--evals=2"])
    monkeypatch.setattr(ablation, "tiny_steps", lambda scale: (4, 6))
    try:
        ablation.main([])
    finally:
        flags.FLAGS.unparse_flags()
    assert trained == [str(s2.workdir)]
