"""Data: the procedurally generated toy world (`world`, `codec`, `tokenizer`, `toy_world`, `toy_world_tfds`) and the
grain input pipeline (`pipeline`).

Nothing is imported here on purpose: TFDS and sentencepiece are slow to import and only some entry points need them.
"""
