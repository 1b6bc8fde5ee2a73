"""Our converted checkpoints: an orbax PyTree of {part: params} plus config.json, written atomically.

Layout of a converted checkpoint folder:
  config.json   {"format": "cnc_jax/1", "kind": "cnc" | "clip_vision" | "u2net" | "dpt",
                 "model": <config dict>, "parts": [...], "source": ..., ...}
  params/       orbax StandardCheckpointer tree {part: {...}} (annotators: {kind: {...}})
Nothing appears at the destination unless the whole write succeeded.

What orbax prints and raises when a write or read fails is said once (cnc_jax.checkpoint.library_errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp

from cnc_jax.checkpoint.kinds import config_from_dict
from cnc_jax.checkpoint.library_errors import LibraryLog, library_os_error, short_reason
from cnc_jax.io import atomic_path
from cnc_jax.model_config import ConfigError

FORMAT = "cnc_jax/1"


class StoreError(ValueError):
    """A converted checkpoint folder is missing, incomplete or of another format."""


def settle(folder, quiet_for: float = 0.3, limit: float = 5.0) -> None:
    """Wait until nothing changes in `folder` any more (at most `limit` seconds): after a failed orbax write,
    tensorstore's threads still finish (and fail) the writes in flight, creating files in a folder being removed."""
    def listing():
        found = []
        for root, _, files in os.walk(folder):
            for name in files:
                with contextlib.suppress(OSError):
                    found.append((root, name, os.path.getsize(os.path.join(root, name))))
        return sorted(found)

    start, last, still_since = time.monotonic(), listing(), time.monotonic()
    while time.monotonic() - still_since < quiet_for and time.monotonic() - start < limit:
        time.sleep(0.05)
        now = listing()
        if now != last:
            last, still_since = now, time.monotonic()


def save_converted(out_dir: str, config, params: dict, *, kind: str = "cnc", overwrite: bool = False, **info) -> str:
    """Write params + config (a CnCConfig, or an annotator config with its `kind`) to `out_dir` atomically
    (temp folder beside it, then rename; orbax's own temporary folder is inside it, so a killed write leaves one
    `<out_dir>.partial-<pid>` that the next write of `out_dir` removes). A full or read-only disk is an OSError
    naming the file it could not write (`out_dir` when none is known), with nothing left behind."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise StoreError(f"{out_dir} already exists (pass --force to replace it)")
    meta = {"format": FORMAT, "kind": kind, "model": dataclasses.asdict(config), "parts": sorted(params), **info}
    with atomic_path(out_dir) as tmp:
        tmp = os.fspath(tmp)
        try:
            os.makedirs(tmp)
            with LibraryLog():
                checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous: no thread to outlive
                try:
                    checkpointer.save(os.path.join(tmp, "params"), params)
                except Exception:
                    settle(tmp)
                    raise
                finally:
                    checkpointer.close()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=1)
        except Exception as e:
            disk = library_os_error(e, out_dir)
            if disk is None:
                raise
            raise disk from None
    return out_dir


def read_info(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{ckpt_dir}: not a converted cnc_jax checkpoint (no config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_converted(ckpt_dir: str, parts: Optional[Iterable[str]] = None, *, kind: str = "cnc"):
    """(config, {part: numpy tree}) of a converted checkpoint of the given kind; `parts` restricts the parts."""
    meta = read_info(ckpt_dir)
    found = meta.get("kind", "cnc")
    if found != kind:
        raise StoreError(f"{ckpt_dir}: holds a {found!r} model, not a {kind!r} one")
    source = os.path.join(ckpt_dir, "config.json")
    try:
        config = config_from_dict(kind, meta["model"], source=source)
    except ConfigError as e:
        raise StoreError(f"{source}: {e}") from None
    params_dir = os.path.join(os.path.abspath(ckpt_dir), "params")
    if not os.path.isdir(params_dir):
        raise StoreError(f"{ckpt_dir}: params/ is missing")
    checkpointer = ocp.StandardCheckpointer()
    try:
        with LibraryLog():
            params = checkpointer.restore(params_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:  # a missing / truncated / foreign file of the tree
        raise StoreError(f"{params_dir}: unreadable ({short_reason(e)}); convert or export it again") from None
    finally:
        checkpointer.close()
    if parts is not None:
        missing = set(parts) - set(params)
        if missing:
            raise StoreError(f"{ckpt_dir}: has no {sorted(missing)} (it holds {sorted(params)})")
        params = {p: params[p] for p in parts}
    return config, {k: _as_numpy(v) for k, v in params.items()}


def _as_numpy(tree):
    if isinstance(tree, dict):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
