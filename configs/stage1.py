"""Stage 1, Knowledge Recall: UniViGU initialised from a Wan generator (a converted Wan2.1 folder, or the toy
world's `pretrain_t2v` export); the target text is the conditioning prompt itself, with condition dropout so the
text must be recovered from the video. lr 2e-4 at full scale (40K steps).

Variants: `--config=configs/stage1.py` (tiny, CPU), `:wan2.1-1.3b`, `:wan2.1-14b`. Every value can be overridden,
e.g. `--config.model.univigu.text_flow=discrete`.
"""

from uvigu.run_config import base_config


def get_config(arg=None):
    c = base_config("stage1", arg)
    c.init.kind = "wan"
    c.init.path = "runs/pretrain_t2v/export/dit" if c.variant == "tiny" else ""  # set --config.init.path
    return c
