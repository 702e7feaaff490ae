"""Stage 2, Capability Refinement: UniViGU initialised from a stage-1 workdir; the target text is the detailed
caption, which holds facts the prompt lacks (size, speed, start, background in the toy world). lr 5e-5 at full
scale (60K steps).

Variants: `--config=configs/stage2.py` (tiny, CPU), `:wan2.1-1.3b`, `:wan2.1-14b`. Every value can be overridden,
e.g. `--config.model.univigu.text_flow=discrete`.
"""

from uvigu.run_config import base_config


def get_config(arg=None):
    c = base_config("stage2", arg)
    c.init.kind = "stage"
    c.init.path = "runs/stage1" if c.variant == "tiny" else ""  # set --config.init.path
    return c
