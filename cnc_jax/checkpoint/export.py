"""The files a trained model leaves as: export_model writes one of FORMATS (cnc folder, official .ckpt,
.safetensors, diffusers folder), atomically, after checking the merged model against its config
(cnc_jax.checkpoint.official.check_params). The official state dict itself is cnc_jax.checkpoint.official's; an
official .ckpt comes with its model YAML (and CLIP text config), cnc_jax.checkpoint.official_yaml's, and is refused
for a model the official code cannot build unless asked for anyway.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Mapping, Optional

import numpy as np
from etils import epath

from cnc_jax.checkpoint.diffusers import save_safetensors, write_diffusers
from cnc_jax.checkpoint.official import cast_array, check_params, official_state_dict
from cnc_jax.checkpoint.official_yaml import OFFICIAL_COMMIT, official_build_problems, official_files, yaml_path
from cnc_jax.checkpoint.library_errors import library_os_error
from cnc_jax.checkpoint.store import save_converted
from cnc_jax.io import atomic_path, progress_bar
from cnc_jax.model_config import CnCConfig, TextEncoderConfig, text_config_path
from cnc_jax.torchfile import torch_save

FORMATS = ("cnc", "official", "safetensors", "diffusers")
DTYPES = ("float32", "float16", "bfloat16")


def write_official(path: str, state: Mapping[str, np.ndarray], **extra) -> None:
    """`{"state_dict": ...}` (plus `extra`, e.g. global_step) as a torch zip file, atomically. A full disk is an
    OSError naming `path` (a write() error names no file)."""
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f, \
                progress_bar(sum(a.nbytes for a in state.values()), f"write {os.path.basename(path)}") as bar:
            torch_save.write_torch_zip(f, {"state_dict": OrderedDict(state), **extra}, archive, on_tensor=bar.update)
    except OSError as e:
        raise library_os_error(e, path) from None


def write_safetensors(path: str, state: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """One .safetensors file (the `safetensors` package; metadata format=pt as torch users expect), atomically.
    safetensors writes its own hidden temporary file (.tmpXXXXXX) beside the file it is given and renames it: so
    it is given a file inside a folder that bears our partial name (`<path>.partial-<pid>.partial-<pid>`), and a
    killed export leaves nothing the next export of `path` does not remove (cnc_jax.io.remove_stale_partials)."""
    with atomic_path(path) as tmp:
        folder = epath.Path(f"{tmp}.partial-{os.getpid()}")
        try:
            folder.mkdir()
            save_safetensors(os.fspath(folder / "model.safetensors"), state, metadata, name=path)
            (folder / "model.safetensors").replace(tmp)
        except OSError as e:
            raise library_os_error(e, path) from None
        finally:
            folder.rmtree(missing_ok=True)


def export_model(config: CnCConfig, params: Mapping[str, dict], out: str, fmt: str, *,
                 dtype: Optional[str] = None, info: Optional[dict] = None, tokenizer: Optional[str] = None,
                 overwrite: bool = False, global_step: int = 0, allow_unofficial: bool = False,
                 warn: Optional[Callable[[str], None]] = None) -> str:
    """Write the model in format `fmt` to `out` (a file for official/safetensors, a folder otherwise); returns `out`.

    official: `out` ({"state_dict", "global_step"}) and its model files beside it (official_yaml.official_files).
    A model the official code cannot build is refused (ValueError naming each field) unless `allow_unofficial`,
    then written with each problem handed to `warn`. The merged params are checked against the config first;
    nothing appears at `out` (or beside it) unless the whole write succeeded.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    beside, stale, problems = {}, [], []
    if fmt == "official":
        if yaml_path(out) == out:
            raise ValueError(f"{out}: the official .ckpt goes to --out and its model YAML beside it as "
                             f"{os.path.basename(yaml_path(out))}; give the .ckpt's name (e.g. model.ckpt)")
        problems = official_build_problems(config)
        if problems and not allow_unofficial:
            raise ValueError(f"{out}: the official code ({OFFICIAL_COMMIT}) cannot build this model: "
                             + "; ".join(problems) + " (--allow-unofficial writes it anyway)")
        beside = official_files(out, config)
        if config.text_encoder == TextEncoderConfig():  # a text config left by an earlier export of another tower
            stale = [p for p in [text_config_path(yaml_path(out))] if os.path.exists(p)]
    for path in [out, *beside, *stale]:
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} already exists (pass --force to replace it)")
    check_params(config, params)
    if fmt == "cnc":
        cast = {part: _cast_tree(tree, dtype) for part, tree in params.items()}
        return save_converted(out, config, cast, overwrite=overwrite, **(info or {}))
    if fmt == "diffusers":
        return write_diffusers(out, config, params, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)
    state = official_state_dict(config, params, dtype)
    if fmt == "safetensors":
        write_safetensors(out, state)
        return out
    with contextlib.ExitStack() as files:  # the YAML and JSON appear only once the .ckpt is complete
        for path, content in beside.items():
            try:
                files.enter_context(atomic_path(path)).write_bytes(content)
            except OSError as e:
                raise library_os_error(e, path) from None
        write_official(out, state, global_step=int(global_step))
    for path in stale:
        os.remove(path)
    for problem in problems if warn else ():
        warn(f"the official code cannot build {out}: {problem}")
    return out


def _cast_tree(tree, dtype: Optional[str]):
    if isinstance(tree, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in tree.items()}
    return cast_array(np.asarray(tree), dtype)
