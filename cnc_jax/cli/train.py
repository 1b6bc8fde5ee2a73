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
The workdir may be any etils.epath path (local, gs://...). A mistake in the flags, the config file or a config
field (cnc_jax/training/config_checks.py) is one `error:` line and exit status 2, before anything is built or
written; a disk that cannot be written (full, read-only) is `error: PATH: reason` and exit status 1.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from cnc_jax.cli import host_memory  # noqa: F401, I001  first: the host allocator, before numpy/jax start threads

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cnc_jax.configs import NAMES as CONFIG_NAMES, config_file
from cnc_jax.platform import configure_cpu
from cnc_jax.training.config_checks import (  # noqa: F401  CONFIG_FLOATS, check_config_numbers: tests' names
    CONFIG_FLOATS, FIELDS, GROUPS, KIND_TEXT, check_config, check_config_numbers, unknown_field)
from cnc_jax.training.trainer import NonFiniteLoss, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"stage config: a packaged one by name ({', '.join(CONFIG_NAMES)}) or a config file "
                    "(configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, images)")


def _main(argv) -> int:
    del argv
    configure_cpu()  # before the first JAX computation
    logging.set_verbosity(logging.WARNING)  # orbax / grain are chatty at INFO
    if _WORKDIR.value is None or _CONFIG.value is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        check_config(_CONFIG.value)  # every field, before anything is built or written
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # configuration and data mistakes, each with one message naming what is wrong
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk: the library sets the path it could not write
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    return 0


# --config.FIELD=VALUE / --config.FIELD VALUE / --noconfig.FIELD (absl's forms of ml_collections' overrides)
OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)
PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser()}  # config_flags'


def override_mistake(args: list) -> str | None:
    """What is wrong with the `--config.FIELD` overrides of `args` (an unknown field, a value not of the field's
    type), or None; checked before absl parses them, which would end in a traceback or a FATAL line."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        match = OVERRIDE.match(arg)
        if not match:
            continue
        negated, name, value = match.groups()
        if name in GROUPS:  # a whole group (`--config.mesh="{...}"`): check_config checks its fields
            continue
        if name not in FIELDS:
            return unknown_field(name, "--config.")
        kind = FIELDS[name].kind
        if negated or kind not in PARSERS or (value is None and (kind is bool or i + 1 == len(args))):
            continue
        value = args[i + 1] if value is None else value
        try:
            PARSERS[kind].parse(value)
        except ValueError:
            return f"--config.{name}: {value!r} is not {KIND_TEXT[kind]}"
    return None


def config_path(args: list) -> str | None:
    """The file of the (last, as absl takes it) `--config` value of `args` (after packaged_config_args), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in ("--config", "-config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.partition("=")[2]
    return None if value is None else value.partition(":")[0]  # config_flags' `FILE:ARG`


def config_file_mistake(path: str | None) -> str | None:
    """What is wrong with the `--config` file's path (not its content), or None."""
    if path is None or os.path.isfile(path):
        return None
    if not path:
        return "--config: empty (a packaged config's name or a config file)"
    if os.path.exists(path):
        return f"--config {path}: not a file"
    return f"--config {path}: no such file (nor one of the packaged configs: {', '.join(CONFIG_NAMES)})"


def _same_file(a: str, b: str | None) -> bool:
    return bool(a and b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _described(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""  # a wrapped traceback's last line is its message
    return text.removeprefix("flag ") if isinstance(error, flags.Error) else f"{type(error).__name__}: {text}"


def failure_line(error: BaseException, config: str | None) -> str:
    """One line for an exception of flag parsing or of the config file (absl and ml_collections wrap the cause,
    traceback text and all): the innermost cause raised in the config file, with its line, else the root cause."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) not in (None, *chain):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for e in reversed(chain):
        if isinstance(e, SyntaxError) and _same_file(e.filename, config):
            return f"--config {config}: line {e.lineno}: SyntaxError: {e.msg}"
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if _same_file(f.filename, config)]
        if lines:
            return f"--config {config}: line {lines[-1]}: {_described(e)}"
    return _described(chain[-1])


def parse_flags(argv: list) -> list:
    """app.run's flags_parser: absl's, with every mistake in the flags or the config file one `error:` line and
    exit status 2 instead of absl's FATAL line or a traceback; also when main() runs again in one process."""
    flags.FLAGS.unparse_flags()  # an earlier in-process run's values and --config.FIELD flags must not linger
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)
    config = config_path(argv[1:])
    mistake = config_file_mistake(config) or override_mistake(argv[1:])
    if mistake is None and config is None and any(map(OVERRIDE.match, argv[1:])):
        mistake = "--config.FIELD overrides need a --config"
    if mistake is None:
        try:
            args = flags.FLAGS(argv)
            value = _CONFIG.value
            if config is None or isinstance(value, ml_collections.ConfigDict):
                return args
            try:  # ml_collections' stand-in for a config file that failed to load raises its error on any use
                value.lock  # noqa: B018
            except AttributeError:
                pass
            returned = "None" if value is None else f"a {type(value).__name__}"
            mistake = f"--config {config}: get_config() returned {returned}, not an ml_collections.ConfigDict"
        except Exception as e:  # noqa: BLE001  whatever the config file or absl raised: one line
            mistake = failure_line(e, config)
    print(f"error: {mistake}", file=sys.stderr)
    raise SystemExit(2)


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
    args = [sys.argv[0], *packaged_config_args(argv)]
    argv_before, sys.argv = sys.argv, args  # config_flags reads the --config.FIELD overrides from sys.argv
    try:
        app.run(_main, argv=args, flags_parser=parse_flags)
    except SystemExit as e:  # app.run always exits: with _main's status, or absl's for --help / a bad flag
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        main_module.__doc__ = main_doc
        sys.argv = argv_before
    return 0
