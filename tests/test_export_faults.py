"""Export / convert / prepare when the process is killed, the disk is full or read-only, or a run folder's checkpoint
is corrupt (issue 32, findings 5, 7, 8): one `error:` line naming the path, exit 1 for the disk and 2 for the
input, nothing half-written, and nothing left behind that the next run does not remove."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from cnc_jax.checkpoint import record_run, save_converted
from cnc_jax.cli import convert as convert_cli
from cnc_jax.cli import prepare as prepare_cli
from cnc_jax.configs import tiny
from cnc_jax.model_config import load_config
from cnc_jax.models.build import init_params
from cnc_jax.models.parts import split_params
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.training.checkpoints import TrainCheckpoints
from cnc_jax.training.state import TrainState, make_optimizer
from tests.conftest import converted_reference, run_main

REPO = Path(__file__).resolve().parents[1]
# --out of each export format (a file or a folder name), and what a finished export of it leaves there
OUTPUTS = {"safetensors": ("model.safetensors", ["model.safetensors"]),
           "official": ("model.ckpt", ["model.ckpt", "model.yaml", "model_clip_text_config.json"]),
           "diffusers": ("diffusers", ["diffusers"]),
           "cnc": ("cnc", ["cnc"])}


def export_args(src, out_dir: Path, fmt: str) -> list:
    return ["export", src, "--out", out_dir / OUTPUTS[fmt][0], "--format", fmt] + (
        ["--allow-unofficial"] if fmt == "official" else [])  # the tiny model is not one the official code builds


def leftovers(folder: Path) -> list:
    """Every partial file or folder, and every hidden temporary file (safetensors' .tmpXXXXXX), under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".partial-" in p.name
                  or p.name.startswith(".tmp"))


def one_error(err: str, *names) -> str:
    """The one `error:` line of stderr (progress bars may share its line), with every one of `names` in it."""
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = err[err.index("error:"):].splitlines()[0]
    for name in names:
        assert str(name) in line, (name, line)
    return line


@pytest.fixture(scope="module")
def converted(ref_dir, tmp_path_factory):
    return converted_reference(ref_dir, tmp_path_factory.mktemp("faults") / "tiny_cnc")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A train.py run folder of the tiny model with checkpoints of steps 1 and 2, written by the calls train.py
    makes (record_run, TrainCheckpoints) without training: seconds."""
    root = tmp_path_factory.mktemp("run")
    config = tiny.get_config()
    model = load_config(config.model)
    params = init_params(model, seed=3)
    save_converted(str(root / "init"), model, params)
    config.init_checkpoint, config.random_init = str(root / "init"), False
    trainable, frozen = split_params(model, params, bool(config.sd_locked))
    record = record_run(str(root / "run"), config, model, frozen)
    state = TrainState.create(trainable, make_optimizer(1e-3)[0], jax.random.PRNGKey(0))
    store = TrainCheckpoints(str(root / "run" / "checkpoints"), async_save=False, metadata=record)
    for step in (1, 2):
        store.save(step, state, {"iterators": []})
    store.close()
    return root / "run"


def fill(disk: Path) -> None:
    """Take the rest of the disk."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---- finding 5: a killed export / convert, then a re-run ------------------------------------------------------

KILLED = textwrap.dedent("""
    import resource, signal, sys
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; by default the kernel kills the process
    from cnc_jax.cli.convert import main
    sys.exit(main(sys.argv[1:]))
""")


def killed_mid_write(*argv) -> None:
    """Run the convert command in a process that the kernel kills (SIGXFSZ: no handler, no cleanup, like SIGKILL)
    in the middle of its first write beyond 1 MiB, which every output of the tiny model has."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no cache file over the limit
    done = subprocess.run([sys.executable, "-c", KILLED, *map(str, argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-3000:]


def test_a_rerun_removes_what_a_killed_export_or_convert_left(converted, ref_dir, tmp_path, capsys):
    """Each export format and convert, killed mid-write, leaves its partial files (and safetensors its own hidden
    temporary file, which it writes beside the file it is given: inside our partial folder now); the next run
    writing the same output removes them all, and leaves only the finished output."""
    for fmt in OUTPUTS:
        out_dir = tmp_path / fmt
        out_dir.mkdir()
        killed_mid_write(*export_args(converted, out_dir, fmt))
        assert leftovers(out_dir), fmt  # what the kill left
        code, _, err = run_main(convert_cli.main, capsys, *export_args(converted, out_dir, fmt))
        assert code == 0, err
        assert leftovers(out_dir) == [] and sorted(os.listdir(out_dir)) == sorted(OUTPUTS[fmt][1]), fmt
    argv = ["convert", ref_dir / "tiny_cnc.ckpt", "--config", ref_dir / "tiny_cnc_config.yaml",
            "--out", tmp_path / "convert" / "tiny"]
    killed_mid_write(*argv)
    assert leftovers(tmp_path / "convert")
    code, _, err = run_main(convert_cli.main, capsys, *argv)
    assert code == 0, err
    assert os.listdir(tmp_path / "convert") == ["tiny"] and leftovers(tmp_path / "convert") == []


def test_prepare_synthetic_removes_its_stale_partials(tmp_path, capsys):
    base = tmp_path / "scenes"
    write_synthetic(str(base), "train", 2)
    image = min((base / "train").glob("*.jpg"))
    stale = [image.with_name(f"{image.name}.partial-{dead_pid()}"),
             base / f"train_captions.txt.partial-{dead_pid()}"]
    for path in stale:
        path.write_bytes(b"what a killed run left")
    code, _, err = run_main(prepare_cli.main, capsys, "synthetic", "--base-dir", base, "--split", "train",
                            "--count", 2)
    assert code == 0, err
    assert leftovers(base) == []


# ---- findings 7, 8: a read-only or full disk --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_export_to_a_read_only_disk(converted, small_disk, capsys, fmt):
    disk = small_disk("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    code, _, err = run_main(convert_cli.main, capsys, *export_args(converted, disk, fmt))
    assert code == 1
    line = one_error(err, "Read-only file system")
    assert line.split(": ")[1].startswith(str(disk / Path(OUTPUTS[fmt][0]).stem)), line  # the output, not a partial
    assert os.listdir(disk) == []


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_export_to_a_full_disk(converted, small_disk, capsys, fmt):
    disk = small_disk("1m")  # the tiny model is ~9.5 MB in every format
    code, _, err = run_main(convert_cli.main, capsys, *export_args(converted, disk, fmt))
    assert code == 1
    one_error(err, disk / OUTPUTS[fmt][0], "No space left on device")
    assert os.listdir(disk) == []  # nothing half-written, no partial, no library temporary file


def test_convert_to_a_full_disk(ref_dir, small_disk, capsys):
    disk = small_disk("1m")
    code, _, err = run_main(convert_cli.main, capsys, "convert", ref_dir / "tiny_cnc.ckpt", "--config",
                            ref_dir / "tiny_cnc_config.yaml", "--out", disk / "tiny")
    assert code == 1
    one_error(err, disk / "tiny", "No space left on device")
    assert os.listdir(disk) == []


def test_export_cnc_to_a_full_disk_prints_one_line(converted, small_disk):
    """orbax writes from its threads: on a full disk each failed tensor was a traceback (168 "Event loop is
    closed" among them). Only a process of its own shows all it prints, at exit too."""
    disk = small_disk("1m")
    done = subprocess.run([sys.executable, "-m", "cnc_jax.cli.convert", *map(str, export_args(converted, disk, "cnc"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == f"error: {disk / 'cnc'}: No space left on device"
    assert os.listdir(disk) == []


def test_prepare_on_a_full_disk(tmp_path, small_disk, capsys):
    write_synthetic(str(tmp_path / "scenes"), "train", 4)
    disk = small_disk("1m")
    shutil.copytree(tmp_path / "scenes", disk / "scenes")
    shutil.rmtree(disk / "scenes" / "train_foreground")
    fill(disk)
    code, _, err = run_main(prepare_cli.main, capsys, "foreground", "--base-dir", disk / "scenes", "--split", "train")
    assert code == 1
    one_error(err, disk / "scenes" / "train_foreground", "No space left on device")
    assert leftovers(disk) == []


# ---- finding 7: a corrupt checkpoint in a run folder --------------------------------------------------------------

def _truncate_tensors(state: Path) -> None:
    for path in (state / "d").iterdir():
        with open(path, "r+b") as f:
            f.truncate(10)


def _garbage_tensors(state: Path) -> None:
    biggest = max((state / "d").iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(os.urandom(5000))


CORRUPTIONS = {"no _METADATA": lambda state: (state / "_METADATA").unlink(),
               "truncated _METADATA": lambda state: (state / "_METADATA").write_text('{"tree_metadata": {"par'),
               "no manifest": lambda state: (state / "manifest.ocdbt").unlink(),
               "truncated tensors": _truncate_tensors,
               "garbage tensors": _garbage_tensors}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_is_one_error_line(run_folder, tmp_path, capsys, corruption):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    CORRUPTIONS[corruption](run / "checkpoints" / "2" / "state")
    code, _, err = run_main(convert_cli.main, capsys, "export", run, "--out", tmp_path / "out.safetensors",
                            "--format", "safetensors")
    assert code == 2
    # the step folder, what is wrong with it, and the remedy: the step before, or moving this one away
    one_error(err, f"{run / 'checkpoints' / '2'}: unreadable checkpoint", "--step 1",
              f"move {run / 'checkpoints' / '2'} out of")
    assert "tensorstore_spec" not in err and not (tmp_path / "out.safetensors").exists()
    code, _, err = run_main(convert_cli.main, capsys, "export", run, "--step", 1, "--out", tmp_path / "out.safetensors",
                            "--format", "safetensors")
    assert code == 0, err
