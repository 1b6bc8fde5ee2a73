"""CnC training data: the official synthetic-triplet file tree, read through grain (directly or via a TFDS
ArrayRecord build), the dataset-preparation steps that produce it, and a synthetic-scene generator.

Modules: layout (file tree, captions), records (decode + official transforms), sources (grain data sources),
pipeline (make_train_iterator), tfds_builder (cnc_triplets), prepare (CLI) over steps (the official data
scripts) and triplets (their array operations), inpaint (SD-inpainting sampler), devices (data parallelism),
synthetic (test/demo scenes), tiny (random-weight models), torch_save (.pt writer).
"""
