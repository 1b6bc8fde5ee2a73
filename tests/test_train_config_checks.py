"""Every training config field checked before anything runs (cnc_jax/training/config_checks.py), and every
mistake in train.py's flags or config file one `error:` line: a bad range, a bad type, an unknown field on the
command line or in a config file, a missing or broken config file, a disk that cannot be written."""

import errno
import importlib

import pytest

from cnc_jax.cli import train as train_cli
from cnc_jax.configs import NAMES
from cnc_jax.configs.common import stage_config
from cnc_jax.training.config_checks import FIELDS, check_config, flat_fields
from tests.conftest import run_main


def run_train(capsys, workdir, *args):
    """(exit status, the `error:` lines, stderr) of train.py's main() on the tiny config, in-process."""
    code, _, err = run_main(train_cli.main, capsys, "--workdir", workdir, *args)
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def assert_refused(result, message, workdir, code=2):
    status, errors, err = result
    assert status == code and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: {message}"), errors
    assert "Traceback" not in err and "FATAL" not in err, err[-3000:]
    assert not workdir.exists()  # nothing built, nothing written


@pytest.mark.parametrize("override, message", [
    ("--config.keep_checkpoints=0", "config.keep_checkpoints: got 0; expected an integer >= 1"),
    ("--config.checkpoint_every=0", "config.checkpoint_every: got 0; expected an integer >= 1"),
    ("--config.log_every=0", "config.log_every: got 0; expected an integer >= 1"),
    ("--config.num_steps=0", "config.num_steps: got 0; expected an integer >= 1 (or config.num_epochs > 0)"),
    ("--config.batch_size=0", "config.batch_size: got 0; expected -1 or an integer >= 1 (-1 = 4 per device)"),
    ("--config.batch_size=-3", "config.batch_size: got -3; expected -1 or an integer >= 1"),
    ("--config.warmup_steps=-1", "config.warmup_steps: got -1; expected an integer >= 0"),
    ("--config.image_log_steps=0", "config.image_log_steps: got 0"),
    ("--config.resume_from_step=-2", "config.resume_from_step: got -2; expected -1 or an integer >= 0"),
    ("--config.mesh.fsdp=0", "config.mesh.fsdp: got 0"),
    ("--config.data.resolution=100", "config.data.resolution: got 100; expected a positive multiple of 8"),
    ("--config.data.max_consecutive_skips=0", "config.data.max_consecutive_skips: got 0"),
    ("--config.seed=-1", "config.seed: got -1; expected an integer in [0, 2147483647]"),
    ("--config.compute_dtype=float16", "config.compute_dtype must be one of ('float32', 'bfloat16'), got 'float16'"),
    ("--config.attention=flash", "config.attention must be one of"),
    ("--config.image_log_sampler=ddpm", "config.image_log_sampler must be one of ('ddim', "),
    ("--config.model=", "config.model: got ''; expected a non-empty string"),
    # the command line itself: an unknown field (was an AttributeError traceback), a value of the wrong type (was
    # absl's "FATAL Flags parsing error")
    ("--config.fild=1", "--config.fild: no such config field"),
    ("--config.keep_chekpoints=1",
     "--config.keep_chekpoints: no such config field (did you mean --config.keep_checkpoints?)"),
    ("--config.data.resolutoin=64",
     "--config.data.resolutoin: no such config field (did you mean --config.data.resolution?)"),
    ("--config.batch_size=abc", "--config.batch_size: 'abc' is not an integer"),
    ("--config.learning_rate=fast", "--config.learning_rate: 'fast' is not a number"),
    ("--config.remat=maybe", "--config.remat: 'maybe' is not true or false"),
])
def test_a_bad_config_value_is_one_error_line_before_anything_runs(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert_refused(run_train(capsys, workdir, "--config", "tiny", override), message, workdir)


CONFIG_FILES = {
    "misspelt_field": ("c.batch_sise = 4",
                       "config.batch_sise: no such config field (did you mean config.batch_size?)"),
    "misspelt_data_field": ("c.data.resoluton = 64", "config.data.resoluton: no such config field"),
    "bool_for_int": ("c.keep_checkpoints = True", "config.keep_checkpoints: expected an integer, got True"),
    "missing_field": ("del c['wandb_project']", "config.wandb_project: missing"),
    "raises": ("raise RuntimeError('boom')", "--config {path}: line 6: RuntimeError: boom"),
    "wrong_type": ("c.batch_size = 'x'", "--config {path}: line 6: TypeError: Could not override field 'batch_size'"),
    "syntax_error": ("c.batch_size = (", "--config {path}: line 6: SyntaxError: "),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_a_bad_config_file_is_one_error_line_naming_it(tmp_path, capsys, case):
    line, message = CONFIG_FILES[case]
    path = tmp_path / "my_config.py"
    path.write_text(f"from cnc_jax.configs import tiny\n\n\ndef get_config():\n    c = tiny.get_config()\n"
                    f"    {line}\n    return c\n")  # `line` is line 6
    workdir = tmp_path / "run"
    assert_refused(run_train(capsys, workdir, "--config", path), message.format(path=path), workdir)


@pytest.mark.parametrize("config, message", [
    ("nonexistent.py", "--config {tmp}/nonexistent.py: no such file (nor one of the packaged configs: cnc_v1, "),
    ("tinyy", "--config tinyy: no such file"),
    (".", "--config {tmp}/.: not a file"),
])
def test_a_missing_config_file_is_one_error_line_naming_it(tmp_path, capsys, config, message):
    workdir = tmp_path / "run"
    config = config if config == "tinyy" else f"{tmp_path}/{config}"
    assert_refused(run_train(capsys, workdir, "--config", config), message.format(tmp=tmp_path), workdir)


def test_main_runs_again_in_one_process(tmp_path, capsys):
    """Each in-process run parses its own flags: no override of an earlier run lingers or is defined twice."""
    workdir = tmp_path / "run"
    assert_refused(run_train(capsys, workdir, "--config", "tiny", "--config.batch_size=0"), "config.batch_size",
                   workdir)
    assert_refused(run_train(capsys, workdir, "--config", "tiny", "--config.batch_size=abc"), "--config.batch_size",
                   workdir)
    assert_refused(run_train(capsys, workdir, "--config", "tiny", "--config.log_every=0"), "config.log_every",
                   workdir)
    code, out, err = run_main(train_cli.main, capsys, "--help")
    assert code == 1 and "--config" in out and "--workdir" in out and "error:" not in err  # absl's help status


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/run.json"),
     "/runs/x/run.json: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "/runs/x: Permission denied"),
])
def test_a_disk_that_cannot_be_written_is_one_error_line(tmp_path, capsys, monkeypatch, error, message):
    """The library's OSError (a full disk at resume, a read-only workdir; raised at once here) names the path,
    exit status 1."""

    def train(config, workdir):
        raise error

    monkeypatch.setattr(train_cli, "train", train)
    workdir = tmp_path / "run"
    assert_refused(run_train(capsys, workdir, "--config", "tiny"), message, workdir, code=1)


@pytest.mark.parametrize("name", NAMES)
def test_every_packaged_config_passes_the_checks(name):
    check_config(importlib.import_module(f"cnc_jax.configs.{name}").get_config())


def test_the_checks_cover_every_config_field():
    """A field added to stage_config without a check (or a check left for a removed field) fails here."""
    assert sorted(flat_fields(stage_config("tiny"))) == sorted(FIELDS)
