"""Stage 1, Knowledge Recall: UniViGU initialised from a Wan generator (a converted Wan2.1 folder, or the toy
world's `pretrain_t2v` export); the target text is the conditioning prompt itself, with condition dropout so the
text must be recovered from the video. Paper: lr 2e-4, 40K steps.

    python -m uvigu.main --config=configs/stage1.py[:tiny|wan2.1-1.3b|wan2.1-14b] --workdir=runs/stage1 \
        [--config.init.path=CONVERTED_WAN_FOLDER --config.data.path=SHARDS]
"""

from uvigu import run_config


def get_config(arg=None):
    variant = run_config.parse_variant(arg)
    c = run_config.common("stage1", variant)

    # ---- run-local ----
    c.init.kind, c.init.path = "wan", ""  # set --config.init.path
    c.data.text_target = "prompt"
    c.flow.cond_dropout = 0.3
    c.optim.lr = 2e-4
    c.total_steps = 40_000

    if variant == "tiny":
        run_config.use_toy_world(c)
        c.init.path = "runs/pretrain_t2v/export/dit"
        c.flow.cond_dropout = 0.3  # the exact V2T examples (most of them) drop the prompt anyway
        c.total_steps = 400
        c.eval_examples = 64  # a progress report only; the demo's budget goes to stage 2's training
    return c
