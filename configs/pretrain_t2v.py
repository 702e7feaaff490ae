"""Toy-world (or real-data) video-only flow training of the Wan DiT: the "pretrained generator" that stage 1
starts from, standing where the released Wan2.1 weights stand. Its final params are exported as a Wan model folder
(`WORKDIR/export/dit`) that loads exactly like a converted Wan2.1 release.

Variants: `--config=configs/pretrain_t2v.py` (tiny, CPU), `:wan2.1-1.3b`, `:wan2.1-14b`. Every value can be overridden,
e.g. `--config.model.univigu.text_flow=discrete`.
"""

from uvigu.run_config import base_config

def get_config(arg=None):
    c = base_config("pretrain_t2v", arg)

    return c
