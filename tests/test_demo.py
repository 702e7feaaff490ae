"""uvigu.demo at test size: the three chained stages run, and demo_result.json holds the names that checks outside the
repo read (pretrain_t2v.test.t2v.<attribute>, stage2.test.{t2v,v2t}.<attribute>, exact_match, joint.agreement)."""

import json

from uvigu import demo, run_config
from uvigu.data.world import ATTRIBUTES, PROMPT_ATTRIBUTES

SMALL = {
    "model.wan.num_layers": 1, "model.wan.dim": 32, "model.wan.ffn_dim": 64, "model.wan.num_heads": 2,
    "data.train_size": 64, "data.val_size": 16, "data.test_size": 16, "data.global_batch_size": 4,
    "log_every": 1, "ckpt_every": 2, "eval_examples": 8, "eval_batch_size": 8,
    "sample.num_steps": 2, "sample.num_saved": 1,
}


def test_demo_writes_every_stage_and_the_names_checks_read(tmp_path, capsys):
    root = tmp_path / "demo"
    summary = demo.run(root, "discrete", steps=[2, 2, 2], overrides=SMALL)
    written = json.loads((root / "demo_result.json").read_text())
    assert written == json.loads(json.dumps(summary)) and written["seconds"] > 0
    for attribute in PROMPT_ATTRIBUTES:
        for stage in ("pretrain_t2v", "stage2"):
            assert 0.0 <= written[stage]["test"]["t2v"][attribute] <= 1.0
    for attribute in (*ATTRIBUTES, "exact_match"):
        assert 0.0 <= written["stage2"]["test"]["v2t"][attribute] <= 1.0
    assert 0.0 <= written["stage2"]["test"]["joint"]["agreement"] <= 1.0
    assert written["stage2"]["test"]["v2t"]["count"] == 8
    # Stage 1 is scored on the prompt's attributes, the generator on T2V only; stages chain through their workdirs.
    assert set(written["stage1"]["test"]["v2t"]) == {*PROMPT_ATTRIBUTES, "exact_match", "count"}
    assert "v2t" not in written["pretrain_t2v"]["test"]
    assert (root / "pretrain_t2v" / "export" / "dit").is_dir() and (root / "stage2" / "export").is_dir()
    table = demo.format_table(written["stage2"], written["stage2"]["chance"])
    assert "test  V2T acc" in table and "exact_match" in table
    assert capsys.readouterr().out.count("final loss") == 3


def test_video_lr_scale_reaches_stages_1_and_2_only(tmp_path):
    configs = demo.stage_configs(tmp_path, "discrete", None, video_lr_scale=0.25)
    assert [c.optim.video_lr_scale for c in configs.values()] == [1.0, 0.25, 0.25]
    for c in configs.values():
        run_config.validate(c)  # the generator's stage would refuse a scale (it has no text side)
    assert all(c.optim.video_lr_scale == 1.0 for c in demo.stage_configs(tmp_path, "discrete", None).values())
