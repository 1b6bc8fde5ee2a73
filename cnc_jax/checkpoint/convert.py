"""Official state dict -> cnc_jax parameter trees, with one complete report of everything that does not fit.

The conversion is planned on shapes alone first (nothing is read from a lazily loaded checkpoint
until the whole plan fits), then each tensor is materialised, re-laid out and cast once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np
from tqdm import tqdm

from cnc_jax.checkpoint import names
from flax.traverse_util import flatten_dict, unflatten_dict

Tree = dict[str, Any]


class ConversionError(ValueError):
    """The checkpoint does not fit the model config; the message lists every problem (`report`, where one was made)."""

    def __init__(self, message: str, report: Optional["ConversionReport"] = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class ConversionReport:
    missing: list[str] = dataclasses.field(default_factory=list)      # official keys the config needs
    unexpected: list[str] = dataclasses.field(default_factory=list)   # official keys the config has no place for
    mismatched: list[str] = dataclasses.field(default_factory=list)   # "key: checkpoint (a, b) vs config (c, d)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, source: str = "checkpoint", limit: int = 40) -> str:
        lines = [f"{source} does not fit the model config: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped keys"]
        for title, items in (("mis-shaped", self.mismatched), ("missing (cnc_jax names)", self.missing),
                             ("unexpected", self.unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {k}" for k in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


def _target_leaf(flat_target: Mapping, part: str, module: tuple[str, ...], leaf: str) -> Optional[tuple[str, ...]]:
    candidates = names.WEIGHT_LEAVES if leaf == "weight" else (leaf,)
    for cand in candidates:
        path = (part,) + module + (cand,)
        if path in flat_target:
            return path
    return None


def plan_conversion(state_dict: Mapping[str, Any], targets: Mapping[str, Tree], *, ema: bool = False,
                    skip_other_parts: bool = False) -> tuple[dict[tuple[str, ...], str], ConversionReport]:
    """Match official keys to our leaves using shapes only.

    Returns {our full path: official key to read} and the report. `targets` maps our part names
    ('unet', 'local_fuser', ...) to (abstract) parameter trees; keys of parts not in `targets` are
    unexpected, or skipped with `skip_other_parts` (to load e.g. only the VAE of a full checkpoint).
    With `ema`, UNet weights are read from the LitEma buffers (model_ema.*) instead.
    """
    flat_target = flatten_dict(targets)
    plan: dict[tuple[str, ...], str] = {}
    report = ConversionReport()
    parts = tuple(targets)
    for key, value in state_dict.items():
        if names.is_ignored(key, parts):
            continue
        where = names.our_path(key, parts)
        if where is None and skip_other_parts and names.our_path(key) is not None:
            continue  # a weight of another CnC part
        if where is None or where[0] not in targets:
            report.unexpected.append(key)
            continue
        part, module, leaf = where
        path = _target_leaf(flat_target, part, module, leaf)
        if path is None:
            report.unexpected.append(key)
            continue
        if path in plan:
            report.unexpected.append(f"{key} (a second source for {'/'.join(path)}, already read from {plan[path]})")
            continue
        source = key
        if ema and part == "unet":
            source = names.ema_key(key)
            if source not in state_dict:
                report.missing.append(f"{source} (EMA copy of {key})")
                continue
            value = state_dict[source]
        want = names.ours_shape_to_official(tuple(flat_target[path].shape), path[-1])
        if tuple(value.shape) != want:
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs config {want}")
            plan[path] = source  # counted as present, not missing
            continue
        plan[path] = source
    for path in flat_target:
        if path not in plan:
            report.missing.append(_describe_missing(path))
    return plan, report


def _describe_missing(path: tuple[str, ...]) -> str:
    """Best-effort official name of one of our leaves (for messages)."""
    return "/".join(path)


def convert_state_dict(state_dict: Mapping[str, Any], targets: Mapping[str, Tree], *, ema: bool = False,
                       source: str = "checkpoint", allow_missing: tuple[str, ...] = (),
                       skip_other_parts: bool = False) -> tuple[Tree, ConversionReport]:
    """Convert an official state dict into our parameter trees (numpy leaves in the targets' dtypes).

    Raises ConversionError listing every missing / unexpected / mis-shaped key, before reading any data.
    Leaves under a part named in `allow_missing` may be absent (they stay absent from the result).
    """
    plan, report = plan_conversion(state_dict, targets, ema=ema, skip_other_parts=skip_other_parts)
    report.missing = [m for m in report.missing if m.split("/", 1)[0] not in allow_missing]
    if not report.ok:
        raise ConversionError(report.format(source), report)
    flat_target = flatten_dict(targets)
    flat = {}
    for path, key in tqdm(plan.items(), total=len(plan), unit="tensor", desc=f"read {source}"[-60:], leave=False):
        array = np.asarray(state_dict[key].numpy() if hasattr(state_dict[key], "numpy") else state_dict[key])
        array = names.to_ours(array, path[-1])
        flat[path] = np.ascontiguousarray(array.astype(np.dtype(flat_target[path].dtype), copy=False))
    return unflatten_dict(flat), report
