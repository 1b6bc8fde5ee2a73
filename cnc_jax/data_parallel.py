"""Data parallelism for the dataset tools: a 'data' mesh over all local devices, batches split along it.

Why: the prepare steps and cached TFDS builds run one model over many images; splitting each batch over
every local device (parameters replicated) is all they need, and batches padded to a multiple of the device
count keep one compiled program per batch size.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnc_jax.sharding import make_mesh


class DataParallel:
    def __init__(self, devices: Optional[Sequence] = None):
        self.mesh = make_mesh(devices=devices if devices is not None else jax.local_devices())

    @property
    def size(self) -> int:
        return self.mesh.size

    def replicate(self, tree):
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def padded_size(self, batch: int) -> int:
        return -(-batch // self.size) * self.size

    def shard(self, array: np.ndarray, size: Optional[int] = None) -> jax.Array:
        """(n, ...) -> (size, ...) split over the devices; rows past n repeat the last one."""
        array = np.asarray(array)
        size = self.padded_size(len(array)) if size is None else size
        if len(array) < size:
            array = np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])
        return jax.device_put(array, NamedSharding(self.mesh, PartitionSpec("data")))

    def map(self, fn: Callable, *arrays: np.ndarray, size: Optional[int] = None):
        """fn(*sharded arrays) for the first len(arrays[0]) rows, as numpy (a tuple if fn returns one)."""
        n = len(arrays[0])
        out = fn(*(self.shard(a, size) for a in arrays))
        return jax.tree_util.tree_map(lambda x: np.asarray(x)[:n], out)
