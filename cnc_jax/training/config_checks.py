"""Every field of a stage config (cnc_jax/configs/common.py) checked before anything is built or written.

Why: a bad value used to surface late and far from its cause (checkpoint_every=0: a ZeroDivisionError after the
compile; keep_checkpoints=0: orbax deleting each checkpoint as it is saved; batch_size=0: silently 4 per device;
a misspelt field in a config file: silently ignored). One table, FIELDS, says each field's type and what it
allows; `check_config` raises ValueError("config.<field>: ...") naming the first bad one, and a field the table
lacks (or one the config lacks) is refused too, so a new config field cannot go unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from cnc_jax import sharding as sh
from cnc_jax.models.attention_kernels import IMPLEMENTATIONS
from cnc_jax.sampling.sampler_names import SAMPLER_NAMES
from cnc_jax.training.state import SCHEDULES
from cnc_jax.validation import checked_number

KIND_TEXT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its type and the values it allows (a range, extra special values, choices, a parser)."""
    kind: type
    low: float | None = None
    high: float | None = None
    special: tuple = ()  # allowed outside the range, e.g. (-1,) = automatic
    note: str = ""  # what the special values mean
    choices: tuple = ()
    multiple_of: int = 1
    nonempty: bool = False
    parse: Callable[[Any], Any] | None = None  # raises ValueError("config.<name>: ...") for a bad value

    def allowed(self) -> str:
        text = "a non-empty string" if self.nonempty else KIND_TEXT[self.kind]
        if self.multiple_of > 1:
            text = f"a positive multiple of {self.multiple_of}"
        elif self.low is not None:
            text += f" in [{self.low}, {self.high}]" if self.high is not None else f" >= {self.low}"
        return " or ".join([*map(str, self.special), text]) + (f" ({self.note})" if self.note else "")

    def check(self, name: str, value: Any) -> None:
        """Raise ValueError("config.<name>: <what is wrong; what is allowed>") for a value the field refuses."""
        if self.kind is float:  # also refuses NaN / ±Inf, with checked_number's message
            try:
                checked_number(value, float)
            except ValueError as e:
                raise ValueError(f"config.{name}: {e}") from None
        elif isinstance(value, bool) != (self.kind is bool) or not isinstance(value, self.kind):
            raise ValueError(f"config.{name}: expected {KIND_TEXT[self.kind]}, got {value!r}")
        if value in self.special:
            return
        if self.choices and value not in self.choices:  # the form cnc_jax.training.state's own check has
            raise ValueError(f"config.{name} must be one of {self.choices}, got {value!r}")
        if ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
                or (self.kind is int and value % self.multiple_of) or (self.nonempty and not value)):
            raise ValueError(f"config.{name}: got {value!r}; expected {self.allowed()}")
        if self.parse:  # its ValueError names the field already
            self.parse(value)


def ints(low: int | None = None, special: tuple = (), note: str = "", **kw) -> Field:
    return Field(int, low=low, special=special, note=note, **kw)


def floats(low: float = 0.0, high: float | None = None) -> Field:
    return Field(float, low=low, high=high)


TEXT, NAME, FLAG = Field(str), Field(str, nonempty=True), Field(bool)

# every field of cnc_jax.configs.common.stage_config, dotted; the comments there say what each one does
FIELDS = {
    "model": NAME, "init_checkpoint": TEXT, "random_init": FLAG,
    "tokenizer": TEXT,  # the packaged configs leave it "" for the command line; the trainer refuses "" when it loads
    "data.sources": TEXT, "data.tfds_dir": TEXT, "data.tfds_split": NAME,
    "data.resolution": ints(8, multiple_of=8), "data.num_workers": ints(0), "data.cached": FLAG,
    "data.max_consecutive_skips": ints(1),
    "learning_rate": floats(), "warmup_steps": ints(0), "lr_schedule": Field(str, choices=SCHEDULES),
    "grad_clip_norm": floats(), "adam_b1": floats(0.0, 1.0), "adam_b2": floats(0.0, 1.0), "adam_eps": floats(),
    "weight_decay": floats(), "batch_size": ints(1, (-1,), "-1 = 4 per device"),
    "num_steps": ints(), "num_epochs": floats(),  # num_steps >= 1 unless num_epochs > 0: RELATIONS
    "seed": ints(0, high=2 ** 31 - 1),  # grain's sampler seed
    "sd_locked": FLAG, "drop_caption_prob": floats(0.0, 1.0), "drop_condition_prob": floats(0.0, 1.0),
    "mesh.data": ints(1, (-1,), "-1 = the devices left"), "mesh.fsdp": ints(1, (-1,), "-1 = the devices left"),
    "mesh.rules": Field(str, parse=sh.parse_rules),
    "remat": FLAG, "compute_dtype": Field(str, choices=("float32", "bfloat16")),
    "attention": Field(str, choices=(*IMPLEMENTATIONS, "auto")),
    "distributed": FLAG, "coordinator_address": TEXT, "num_processes": ints(1, (-1,), "-1 = auto-detect"),
    "process_id": ints(0, (-1,), "-1 = auto-detect"), "compile_cache_dir": TEXT,
    "log_every": ints(1), "checkpoint_every": ints(1), "keep_checkpoints": ints(1),
    "resume_from_step": ints(0, (-1,), "-1 = the newest intact checkpoint"),
    "image_log_every": ints(0, note="0 = off"), "image_log_steps": ints(1),
    "image_log_sampler": Field(str, choices=SAMPLER_NAMES), "image_log_guidance": floats(0.0, 100.0),
    "record_data_order": FLAG, "profile_steps": ints(0, note="0 = off"), "profile_start": ints(0),
    "wandb_project": TEXT,
}
GROUPS = frozenset(name.rpartition(".")[0] for name in FIELDS if "." in name)

# checks between fields, after each field passed its own: (field, fails(config), what is allowed)
RELATIONS = (
    ("num_steps", lambda c: c.num_steps < 1 and c.num_epochs <= 0, "an integer >= 1 (or config.num_epochs > 0)"),
    ("mesh.fsdp", lambda c: c.mesh.data == -1 and c.mesh.fsdp == -1, "not -1 when config.mesh.data is -1"),
)

# the float fields and their ranges (cnc_jax.cli.train's earlier table, kept for its callers)
CONFIG_FLOATS = {name: (f.low, f.high) for name, f in FIELDS.items() if f.kind is float}


def unknown_field(name: str, prefix: str = "config.") -> str:
    """`<prefix><name>: no such config field (did you mean ...?)`."""
    close = difflib.get_close_matches(name, [*FIELDS, *GROUPS], n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else "see cnc_jax/configs/common.py for the fields"
    return f"{prefix}{name}: no such config field ({hint})"


def flat_fields(config, prefix: str = "") -> dict:
    """{dotted name: value} of a config's leaves (ConfigDicts and dicts are groups)."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items") and f"{prefix}{key}" in GROUPS:
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_config(config) -> None:
    """Raise ValueError("config.<field>: <what is wrong; what is allowed>") for the first bad, unknown or missing
    field of a stage config."""
    values = flat_fields(config)
    for name in values:
        if name in GROUPS:
            raise ValueError(f"config.{name}: expected a group of fields (a ConfigDict), got {values[name]!r}")
        if name not in FIELDS:
            raise ValueError(unknown_field(name))
    for name, field in FIELDS.items():
        if name not in values:
            raise ValueError(f"config.{name}: missing (a config file starts from "
                             "cnc_jax.configs.common.stage_config, which has every field)")
        field.check(name, values[name])
    for name, fails, allowed in RELATIONS:
        if fails(config):
            raise ValueError(f"config.{name}: got {values[name]!r}; expected {allowed}")


def check_config_numbers(config) -> None:
    """Refuse a non-finite or out-of-range float in the config (ValueError naming it); check_config does more."""
    for name, (low, high) in CONFIG_FLOATS.items():
        try:
            checked_number(config[name], float, low, high)
        except ValueError as e:
            raise ValueError(f"config.{name}: {e}") from None
