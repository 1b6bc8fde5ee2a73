"""Train a CnC stage (local fuser, global fuser, or CnC fine-tuning) on a device mesh.

  python train.py --config configs/cnc_v1.py --workdir runs/cnc \\
      --config.init_checkpoint=ckpt/init_cnc --config.tokenizer=clip_tokenizer/ \\
      --config.data.sources=/data/pickapic/samples:train,/data/cocostuff/dataset/images:train2017
  cnc-train --config cnc_v1 --workdir runs/cnc ...    (installed package: the stage configs by name, from any folder)

One jitted step (trainable params + optimizer state donated, sharded by the logical-axis rules over a
('data', 'fsdp') mesh); the frozen weights are sharded the same way but never enter the optimizer state.
Re-running with the same workdir resumes from the latest checkpoint (params, optimizer, step, rng and data
iterator state) on any device and process count; SIGTERM (on any process) saves a final checkpoint and exits.
With config.distributed one process runs per host: each reads its own block of every global batch, the
checkpoint is written jointly, and process 0 alone writes the run's other files (cnc_jax/training/metrics.py).
The workdir may be any etils.epath path (local, gs://...).
"""

from __future__ import annotations

import sys

from cnc_jax.cli import host_memory  # noqa: F401, I001  first: the host allocator, before numpy/jax start threads

from absl import app, flags, logging
from ml_collections import config_flags

from cnc_jax.configs import NAMES as CONFIG_NAMES, config_file
from cnc_jax.platform import configure_cpu
from cnc_jax.training.trainer import NonFiniteLoss, train
from cnc_jax.validation import checked_number

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"stage config: a packaged one by name ({', '.join(CONFIG_NAMES)}) or a config file "
                    "(configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, images)")


# the float fields of a stage config (cnc_jax/configs/common.py) and their ranges; NaN would pass a plain range check
CONFIG_FLOATS = {
    "learning_rate": (0.0, None), "adam_b1": (0.0, 1.0), "adam_b2": (0.0, 1.0), "adam_eps": (0.0, None),
    "weight_decay": (0.0, None), "drop_caption_prob": (0.0, 1.0), "drop_condition_prob": (0.0, 1.0),
    "image_log_guidance": (0.0, 100.0), "grad_clip_norm": (0.0, None), "num_epochs": (0.0, None),
}


def check_config_numbers(config) -> None:
    """Refuse a non-finite or out-of-range float in the config before anything is built (ValueError naming it)."""
    for field, (low, high) in CONFIG_FLOATS.items():
        try:
            checked_number(config[field], float, low, high)
        except ValueError as e:
            raise ValueError(f"config.{field}: {e}") from None


def _main(argv) -> int:
    del argv
    configure_cpu()  # before the first JAX computation
    logging.set_verbosity(logging.WARNING)  # orbax / grain are chatty at INFO
    if _WORKDIR.value is None or _CONFIG.value is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        check_config_numbers(_CONFIG.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # configuration and data mistakes, each with one message naming what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def packaged_config_args(argv: list) -> list:
    """argv with `--config NAME` / `--config=NAME` of a packaged stage config (cnc_jax.configs.NAMES) replaced by
    that config's file, so the name works from any folder; `--config.FIELD=VALUE` overrides are untouched."""
    out, i = list(argv), 0
    while i < len(out):
        if out[i] in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = config_file(out[i + 1])
            i += 1
        elif out[i].startswith(("--config=", "-config=")):
            flag, _, value = out[i].partition("=")
            out[i] = f"{flag}={config_file(value)}"
        i += 1
    return out


def main(argv=None) -> int:
    """Run train with absl flags (`--config`, `--config.FIELD=VALUE`, `--workdir`); argv without the program
    name (default: sys.argv[1:]). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # absl's --help prints __main__'s docstring and the flags of the program file (sys.argv[0]): here both are
    # this module's, whether the program is the top-level train.py or the cnc-train console script
    main_module = sys.modules["__main__"]
    main_doc, main_module.__doc__ = main_module.__doc__, __doc__
    for name in ("config", "workdir"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    try:
        app.run(_main, argv=[sys.argv[0], *packaged_config_args(argv)])
    except SystemExit as e:  # app.run always exits: with _main's status, or absl's for --help / a bad flag
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        main_module.__doc__ = main_doc
    return 0
