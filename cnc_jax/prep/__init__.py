"""Dataset preparation: the official `data/*.py` scripts (steps) over their array operations (triplets), the
SD-inpainting sampler of the background step (inpaint), Pick-a-Pic parquet files (pickapic), synthetic shape
scenes (synthetic), random-weight stand-ins for every model the steps load (tiny_models) and the encoders of
cached TFDS builds (cache_encoders). Its command line is cnc_jax.cli.prepare; what it writes, the input
pipeline (cnc_jax.data) reads.

Every file the steps write goes through cnc_jax.io.write_atomic (whole or not at all; a killed run's
`<path>.partial-<pid>` goes with the next write of the path; a full disk is an OSError naming the path).
"""
