"""The training input pipeline: the official synthetic-triplet file tree, read through grain, directly or from a
TFDS ArrayRecord build.

Modules: layout (file tree, captions, source specs), records (decode + official transforms), sources (grain
data sources over file trees), tfds (the cnc_triplets build: its builder and its reader), pipeline
(make_train_iterator). Dataset preparation, which writes these trees, is cnc_jax.prep.
"""
