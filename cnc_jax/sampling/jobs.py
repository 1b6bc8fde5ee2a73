"""Sampling jobs: one manifest line (JSON object) -> a validated JobSpec, with errors naming line and field.

Fields (all optional except prompt):
  prompt, negative_prompt (default: the official demo's), prompt_suffix (bool: append the demo's suffix),
  fg_image, bg_image, fg_emb_image, bg_emb_image            images, as in the official demo
  fg_depth, bg_depth, mask (png/jpg/npy), fg_emb, bg_emb (npy/pt)   precomputed conditions (they win over images)
  depth_version (v1|v2|v3, default v2), fg_depth_control, bg_depth_control, fg_global_control,
  bg_global_control (default 1.0), size (int or [H, W], multiples of 64), num_images, sampler (one of
  SAMPLER_NAMES, default ddim), steps, cfg_scale, eta (DDIM samplers only), seed, name (output folder name;
  default "<line>-<hash of the settings>"; a plain folder name that the file system can hold, with room for
the temporary ".partial-<name>-<pid>" folder it is written in).
Relative paths are relative to the manifest's folder. Numbers must be finite (json reads NaN and Infinity); text
must be valid Unicode (json reads a lone surrogate escape such as "\\udcff", which no file or tokenizer takes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from cnc_jax.sampling.sampler_names import DEFAULT_SAMPLER, ETA_SAMPLERS, SAMPLER_NAMES
from cnc_jax.sampling.demo_prompts import DEFAULT_NEGATIVE_PROMPT
from cnc_jax.validation import checked_number

IMAGE_FIELDS = ("fg_image", "bg_image", "fg_emb_image", "bg_emb_image")
CONDITION_FIELDS = ("fg_depth", "bg_depth", "mask", "fg_emb", "bg_emb")
PATH_FIELDS = IMAGE_FIELDS + CONDITION_FIELDS
DEPTH_VERSIONS = ("v1", "v2", "v3")
TEXT_FIELDS = ("prompt", "negative_prompt", "name")
PARTIAL_PREFIX = ".partial-"  # a job is written into <out>/.partial-<name>-<pid>, then renamed (outputs.py)
PID_DIGITS = 7  # Linux pids are below 2 ** 22 (kernel.pid_max): at most 7 digits
NAME_MAX = 255  # bytes in a file name on the common file systems (ext4, xfs, btrfs, tmpfs, NTFS)


class JobError(ValueError):
    """A job cannot run; names the manifest line and the field. `reason` is the message without them."""

    def __init__(self, line: int, field: Optional[str], message: str):
        self.line, self.field, self.reason = line, field, message
        where = f"line {line}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class JobFault(JobError):
    """An unexpected exception while preparing or writing one job (raised `from` it): the job fails with its type
    and message, and the front end keeps the traceback (a bug must not be hidden), while the other jobs run."""


def name_budget(name_max: int = NAME_MAX) -> int:
    """The most UTF-8 bytes a job name may have so that its temporary folder's name still fits in `name_max`."""
    return name_max - len(PARTIAL_PREFIX) - 1 - PID_DIGITS


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start} (an unpaired "
                "\\ud800-\\udfff escape, or a byte that was not UTF-8)")
    return None


def name_problem(name: str, name_max: int = NAME_MAX) -> str | None:
    """Why `name` cannot be a job folder's name on a file system with `name_max`-byte names, or None."""
    if "\0" in name:
        return "contains a NUL character, which no file name may hold"
    if not name or "/" in name or os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        return "must be a plain folder name (not empty, no '/', not starting with '.')"
    problem = text_problem(name)
    if problem:
        return problem
    size, budget = len(name.encode("utf-8")), name_budget(name_max)
    if size > budget:
        return (f"{size} bytes of UTF-8; at most {budget} fit (the file system's {name_max}-byte limit on names, "
                f"less the temporary folder's '{PARTIAL_PREFIX}' and '-<pid>')")
    return None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    line: int
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    prompt_suffix: bool = False
    fg_image: Optional[str] = None
    bg_image: Optional[str] = None
    fg_emb_image: Optional[str] = None
    bg_emb_image: Optional[str] = None
    fg_depth: Optional[str] = None
    bg_depth: Optional[str] = None
    mask: Optional[str] = None
    fg_emb: Optional[str] = None
    bg_emb: Optional[str] = None
    depth_version: str = "v2"
    fg_depth_control: float = 1.0
    bg_depth_control: float = 1.0
    fg_global_control: float = 1.0
    bg_global_control: float = 1.0
    height: int = 512
    width: int = 512
    num_images: int = 1
    sampler: str = DEFAULT_SAMPLER
    steps: int = 50
    cfg_scale: float = 7.5
    eta: float = 0.0
    seed: int = 0
    name: str = ""

    def settings(self) -> dict:
        """Every setting that determines the images (the JSON written next to them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("line", "name")}

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def _number(line, field, value, kind, low=None, high=None):
    try:
        return checked_number(value, kind, low, high)
    except ValueError as e:
        raise JobError(line, field, str(e)) from None


def parse_job(record: Any, line: int, base_dir: str, defaults: Optional[dict] = None,
              name_max: int = NAME_MAX) -> JobSpec:
    """Validate one manifest record (paths must exist). `defaults` (e.g. from flags) fill absent fields;
    `name_max`: the output file system's limit on a name, in bytes (os.pathconf's PC_NAME_MAX)."""
    if not isinstance(record, dict):
        raise JobError(line, None, f"expected a JSON object, got {type(record).__name__}")
    record = {**(defaults or {}), **record}
    known = {f.name for f in dataclasses.fields(JobSpec)} - {"line", "height", "width"} | {"size"}
    unknown = sorted(set(record) - known)
    if unknown:
        raise JobError(line, unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    if not isinstance(record.get("prompt"), str):
        raise JobError(line, "prompt", "a prompt (string) is required")
    kw: dict[str, Any] = {"prompt": record["prompt"]}
    for field in ("negative_prompt", "name"):
        if field in record:
            if not isinstance(record[field], str):
                raise JobError(line, field, "expected a string")
            kw[field] = record[field]
    for field in TEXT_FIELDS:
        problem = text_problem(kw[field]) if field in kw else None
        if problem:
            raise JobError(line, field, problem)
    if "prompt_suffix" in record:
        if not isinstance(record["prompt_suffix"], bool):
            raise JobError(line, "prompt_suffix", "expected true or false")
        kw["prompt_suffix"] = record["prompt_suffix"]
    for field in PATH_FIELDS:
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise JobError(line, field, "expected a file path")
        path = value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))
        if not os.path.isfile(path):
            raise JobError(line, field, f"{path}: no such file")
        kw[field] = path
    if "depth_version" in record:
        if record["depth_version"] not in DEPTH_VERSIONS:
            raise JobError(line, "depth_version", f"must be one of {DEPTH_VERSIONS}")
        kw["depth_version"] = record["depth_version"]
    for field in ("fg_depth_control", "bg_depth_control", "fg_global_control", "bg_global_control"):
        if field in record:
            kw[field] = _number(line, field, record[field], float, 0.0, 10.0)
    if "size" in record:
        size = record["size"]
        hw = (size, size) if not isinstance(size, (list, tuple)) else tuple(size)
        if len(hw) != 2:
            raise JobError(line, "size", "expected an integer or [height, width]")
        h, w = (_number(line, "size", v, int, 64, 4096) for v in hw)
        if h % 64 or w % 64:
            raise JobError(line, "size", f"{h}x{w}: height and width must be multiples of 64")
        kw["height"], kw["width"] = h, w
    limits = {"num_images": (int, 1, 1024), "steps": (int, 1, 1000), "cfg_scale": (float, 0.0, 100.0),
              "eta": (float, 0.0, 10.0), "seed": (int, 0, 2 ** 31 - 1)}
    for field, (kind, low, high) in limits.items():
        if field in record:
            kw[field] = _number(line, field, record[field], kind, low, high)
    if "sampler" in record:
        if record["sampler"] not in SAMPLER_NAMES:
            raise JobError(line, "sampler", f"unknown sampler {record['sampler']!r}; valid samplers: "
                                            f"{', '.join(SAMPLER_NAMES)}")
        kw["sampler"] = record["sampler"]
    if kw.get("eta") and kw.get("sampler", DEFAULT_SAMPLER) not in ETA_SAMPLERS:
        raise JobError(line, "eta", f"eta applies to the samplers {', '.join(ETA_SAMPLERS)} only")
    spec = JobSpec(line=line, **kw)
    if not spec.name:
        digest = hashlib.sha1(json.dumps(spec.settings(), sort_keys=True).encode()).hexdigest()[:8]
        spec = dataclasses.replace(spec, name=f"{line:04d}-{digest}")
    else:
        problem = name_problem(spec.name, name_max)
        if problem:
            raise JobError(line, "name", problem)
    return spec


def check_flag_defaults(defaults: dict, base_dir: str, name_max: int = NAME_MAX) -> None:
    """Validate the job flags that every manifest / dataset job inherits, before any job is read: JobError (line 0)
    naming the field. File paths are left to each job (they are relative to its manifest's folder)."""
    record = {k: v for k, v in defaults.items() if k not in PATH_FIELDS}
    parse_job({"prompt": "", **record}, 0, base_dir, name_max=name_max)


def read_manifest(path: str, defaults: Optional[dict] = None,
                  name_max: int = NAME_MAX) -> tuple[list[JobSpec], list[JobError]]:
    """All jobs of a JSONL manifest (blank lines and lines starting with # are skipped) and the bad lines.
    A line that is not UTF-8 is a bad line, not the end of the run. OSError if the file cannot be read."""
    jobs, errors = [], []
    base = os.path.dirname(os.path.abspath(path))
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate (\udc80-\udcff), reported by line
    # below; valid UTF-8 never decodes to one
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                errors.append(JobError(number, None, f"not valid UTF-8 (byte 0x{ord(text[bad]) - 0xdc00:02x} at "
                                                     f"character {bad + 1}); save the manifest as UTF-8"))
                continue
            try:
                record = json.loads(text)
            except ValueError as e:  # JSONDecodeError, or an integer literal too long to convert
                errors.append(JobError(number, None, f"not valid JSON ({getattr(e, 'msg', e)})"))
                continue
            try:
                jobs.append(parse_job(record, number, base, defaults, name_max))
            except JobError as e:
                errors.append(e)
    names = [j.name for j in jobs]
    for job in jobs:
        if names.count(job.name) > 1:
            errors.append(JobError(job.line, "name", f"{job.name!r} is used by more than one job"))
    bad = {e.line for e in errors}
    return [j for j in jobs if j.line not in bad], errors
