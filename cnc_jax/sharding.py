"""The device mesh and THE table of logical-axis rules (logical names on params -> mesh axes).

Mesh axes: 'data' (pure data parallelism) and 'fsdp' (data parallelism whose parameters and optimizer
state are sharded across the axis, gathered per layer by XLA). Every parameter carries logical axis names
(cnc_jax.models.layers); the rules below shard each parameter along its output dimension over 'fsdp'
and replicate the rest. A dimension the mesh axis does not divide stays replicated. Training takes the table
from its config (config.mesh.rules, text: "batch=data+fsdp,conv_out=fsdp,embed=,..."), so the sharding can be
changed without editing code.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axes (None = replicated). 'batch' is the leading axis of every input.
LOGICAL_AXIS_RULES: tuple[tuple[str, Optional[tuple[str, ...]]], ...] = (
    ("batch", ("data", "fsdp")),
    ("conv_out", ("fsdp",)),
    ("dense_out", ("fsdp",)),
    ("vocab", ("fsdp",)),
    ("embed", None),
    ("conv_in", None),
    ("dense_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    # DPT's position table shards its rows like the 'vocab' rows of CLIP's; its size-1 dims stay replicated
    ("positions", ("fsdp",)),
    ("pos_batch", None),
    ("cls_batch", None),
    ("cls_token", None),
)
MESH_AXES = ("data", "fsdp")
Rules = tuple[tuple[str, Optional[tuple[str, ...]]], ...]


def rules_text(rules: Rules = LOGICAL_AXIS_RULES) -> str:
    """The table as config text: "logical=axis+axis" entries, comma separated; "logical=" is replicated."""
    return ",".join(f"{name}={'+'.join(axes or ())}" for name, axes in rules)


def parse_rules(text: str, default: Rules = LOGICAL_AXIS_RULES) -> Rules:
    """Config text -> a rule table: its entries replace those of `default` (the others stay)."""
    rules = dict(default)
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, axes = (part.strip() for part in entry.partition("="))
        unknown = [a for a in axes.split("+") if a and a not in MESH_AXES]
        if not sep or not name or unknown:
            raise ValueError(f"config.mesh.rules: {entry!r} is not 'logical_axis=mesh_axis+...' with mesh axes "
                             f"from {MESH_AXES} (or none, for replicated)")
        rules[name] = tuple(a for a in axes.split("+") if a) or None
    return tuple(rules.items())


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 for one axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data and n % data == 0 else 0
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def _rule(name: Optional[str], rules: Rules = LOGICAL_AXIS_RULES):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    if name is None:
        return None
    raise ValueError(f"logical axis {name!r} has no sharding rule (config.mesh.rules)")


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec of one array from its logical axis names, replicating dims the mesh axes don't divide."""
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axes = _rule(name, rules)
        if axes:
            axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
            size = math.prod(mesh.shape[a] for a in axes)
            if axes and dim % size == 0:
                used.update(axes)
                out.append(axes if len(axes) > 1 else axes[0])
                continue
        out.append(None)
    return PartitionSpec(*out)


def param_shardings(boxed_abstract, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of nn.Partitioned abstract params (leaves carry logical names)."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(_rule("batch", rules), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def bytes_per_device(tree) -> dict:
    """{device: bytes held} of a tree of jax.Arrays (what each device really stores)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
