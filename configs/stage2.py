"""Stage 2, Capability Refinement: UniViGU initialised from a stage-1 workdir; the target text is the detailed
caption, which holds facts the prompt lacks (size, speed, start, background in the toy world). Paper: lr 5e-5, 60K
steps.

    python -m uvigu.main --config=configs/stage2.py[:tiny|wan2.1-1.3b|wan2.1-14b] --workdir=runs/stage2 \
        [--config.init.path=STAGE1_WORKDIR --config.data.path=SHARDS]
"""

from uvigu import run_config


def get_config(arg=None):
    variant = run_config.parse_variant(arg)
    c = run_config.common("stage2", variant)

    # ---- run-local ----
    c.init.kind, c.init.path = "stage", ""  # set --config.init.path
    c.data.text_target = "caption"
    c.flow.cond_dropout = 0.1
    c.optim.lr = 5e-5
    c.total_steps = 60_000

    if variant == "tiny":
        run_config.use_toy_world(c)
        c.init.path = "runs/stage1"
        c.flow.cond_dropout = 0.1  # the exact V2T examples drop the prompt anyway; the rest keep T2V conditional
        c.total_steps = 2500  # most of the demo's budget: captions teach perception
    return c
