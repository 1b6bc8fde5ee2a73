"""Model-aware weights: the official, diffusers and transformers files in, our converted folders, run folders and
every export format out. This is the package's public entry; its modules:

  names, diffusers_names   the name tables (official <-> ours; diffusers <-> official), both directions each
  convert                  a state dict -> our parameter trees by the table, one report of what does not fit
  official                 the official state dict in and out, and the official prepare_weights.py steps
  diffusers                diffusers SD 1.5 folders in and out
  annotator_weights        CLIP vision, U²-Net, DPT sources (hf_folder: transformers folders; midas: torch hub)
  eval_net_weights         FID Inception, LPIPS, CLIPModel sources
  kinds, store             our converted folders (config.json "kind" -> config class; orbax params)
  run_folder, weights      train.py run folders; load_weights, the one loader of whole models
  export                   export_model in FORMATS
  library_errors           orbax / tensorstore / safetensors failures said once: the OSError behind them, their
                           thread tracebacks off the console (LibraryLog), a command's error line
The torch-file readers and writer these stand on are cnc_jax.torchfile.
"""

from cnc_jax.checkpoint.annotator_weights import detect_kind, load_annotator, load_official_annotator
from cnc_jax.checkpoint.convert import ConversionError, convert_state_dict
from cnc_jax.checkpoint.diffusers import SD_PARTS, config_from_diffusers, diffusers_state_dict, is_diffusers_folder
from cnc_jax.checkpoint.eval_net_weights import LPIPS_USAGE, detect_eval_kind, load_eval_net, load_official_eval_net
from cnc_jax.checkpoint.export import DTYPES, FORMATS, export_model
from cnc_jax.checkpoint.official import (detect_config, init_global_params, init_local_params, integrate_params,
                                         load_official_params, official_state_dict)
from cnc_jax.checkpoint.run_folder import RUN_INFO, RunError, is_run_folder, read_run_info, record_run
from cnc_jax.checkpoint.store import StoreError, load_converted, read_info, save_converted
from cnc_jax.checkpoint.weights import load_run, load_weights, starting_params

__all__ = ["ConversionError", "DTYPES", "FORMATS", "LPIPS_USAGE", "RUN_INFO", "RunError", "SD_PARTS", "StoreError",
           "config_from_diffusers", "convert_state_dict", "detect_config", "detect_eval_kind", "detect_kind",
           "diffusers_state_dict", "export_model", "init_global_params", "init_local_params", "integrate_params",
           "is_diffusers_folder", "is_run_folder", "load_annotator", "load_converted", "load_eval_net",
           "load_official_annotator", "load_official_eval_net", "load_official_params", "load_run", "load_weights",
           "official_state_dict", "read_info", "read_run_info", "record_run", "save_converted", "starting_params"]
