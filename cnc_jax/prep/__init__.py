"""Dataset preparation: the official `data/*.py` scripts (steps) over their array operations (triplets), the
SD-inpainting sampler of the background step (inpaint), Pick-a-Pic parquet files (pickapic), synthetic shape
scenes (synthetic), random-weight stand-ins for every model the steps load (tiny_models) and the encoders of
cached TFDS builds (cache_encoders). Its command line is cnc_jax.cli.prepare; what it writes, the input
pipeline (cnc_jax.data) reads.

Every file the steps write goes through `write_file`.
"""

from cnc_jax.checkpoint.library_errors import library_os_error
from cnc_jax.io import write_atomic


def write_file(path: str, data: bytes) -> None:
    """write_atomic: the file whole or not at all, and a killed run's `<path>.partial-<pid>` goes with the next
    write of `path`. A full or read-only disk is an OSError naming `path` (a write() error names no file)."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise library_os_error(e, path) from None

