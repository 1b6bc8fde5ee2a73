"""Training under faults: a damaged latest checkpoint (the run resumes from the newest intact one, says so in one
line and moves the damaged one aside), config.resume_from_step, SIGTERM / SIGINT while the data iterator searches
through unreadable records, keep_checkpoints=0 refused by the library, a full disk while saving (one error line,
orbax's thread tracebacks kept off the console). One tiny-config run folder is trained once and copied per case;
the in-process runs share its compiled step."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cnc_jax.checkpoint.run_folder import restore_trainable
from cnc_jax.cli import train as train_cli
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.training import trainer
from cnc_jax.training.checkpoints import TrainCheckpoints, abstract_with_shardings
from tests.conftest import synthetic_train_source, tiny_train_config

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 6  # every in-process run trains to the same step count: the optimizer's schedule, so the compiled step


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_train_source(tmp_path_factory)


def tiny_config(dataset, **overrides):
    return tiny_train_config(dataset, **{"num_steps": NUM_STEPS, **overrides})


def cli_args(workdir, dataset, *overrides):
    return ["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.data.sources={dataset}", "--config.batch_size=8", f"--config.num_steps={NUM_STEPS}",
            *overrides]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def state_at(workdir, step) -> dict:
    """The whole train state of a one-device run's checkpoint (params, optimizer state, step, rng)."""
    store = TrainCheckpoints(str(Path(workdir, "checkpoints")))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = store.manager.metadata(step).item_metadata["state"].tree
    state = store.restore(step, abstract_with_shardings(tree, jax.tree_util.tree_map(lambda _: device, tree)))[0]
    store.close()
    return state


def assert_same_run(a, b):
    """Bit-identical final states (every leaf) and the same batches, each step once."""
    leaves_a, leaves_b = (jax.tree_util.tree_leaves(state_at(w, NUM_STEPS)) for w in (a, b))
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert lines(Path(b, "data_order.jsonl")) == lines(Path(a, "data_order.jsonl"))
    assert [m["step"] for m in lines(Path(b, "metrics.jsonl"))] == list(range(1, NUM_STEPS + 1))


def entries(workdir) -> list:
    return sorted(os.listdir(Path(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dataset):
    """6 uninterrupted steps on one device (checkpoints at 3 and 6)."""
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train(tiny_config(dataset), str(workdir))
    return workdir


def truncate_a_tensor_file(step_dir):
    files = sorted(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    with open(files[-1], "r+b") as f:
        f.truncate(os.path.getsize(files[-1]) // 2)


DAMAGE = {
    "truncated tensor file": truncate_a_tensor_file,
    "no data/metadata": lambda step_dir: os.remove(f"{step_dir}/data/metadata"),
    "no state/_METADATA": lambda step_dir: os.remove(f"{step_dir}/state/_METADATA"),
}


def test_the_library_refuses_keep_checkpoints_below_one(tmp_path, dataset):
    """orbax reads max_to_keep=0 as "keep none": each checkpoint was deleted as soon as it was saved."""
    for keep in (0, -1):
        with pytest.raises(ValueError, match=f"max_to_keep must be an integer >= 1 .*got {keep}"):
            TrainCheckpoints(str(tmp_path / "ckpt"), max_to_keep=keep)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="config.keep_checkpoints"):  # the trainer checks its config first
        trainer.train(tiny_config(dataset, keep_checkpoints=0), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, dataset, straight, capsys, damage):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    DAMAGE[damage](workdir / "checkpoints" / "6")
    began = time.perf_counter()
    trainer.train(tiny_config(dataset), str(workdir))
    print(f"{damage}: resumed and trained in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out
    assert f"{workdir / 'checkpoints' / '6'} is unreadable (" in warnings[0]
    assert f"moved to {workdir / 'checkpoints' / 'corrupt-6'}; resuming from step 3" in warnings[0]
    assert "resumed from step 3" in out and "Traceback" not in out
    assert entries(workdir) == ["3", "6", "corrupt-6"]  # the damaged step kept aside, a new step 6 saved
    assert_same_run(straight, workdir)


def test_resume_from_step(tmp_path, dataset, straight, capsys):
    """config.resume_from_step=N resumes from exactly checkpoints/N; the newer steps are moved aside, not deleted;
    a step that is not there, or is unreadable, is a ValueError listing the steps there."""
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    with pytest.raises(ValueError, match=r"config.resume_from_step=5: .*checkpoints has no checkpoint 5 "
                                         r"\(the steps there: 3, 6\)"):
        trainer.train(tiny_config(dataset, resume_from_step=5), str(workdir))
    assert entries(workdir) == ["3", "6"]
    trainer.train(tiny_config(dataset, resume_from_step=3), str(workdir))
    out = capsys.readouterr().out
    moved = (f"warning: config.resume_from_step=3: moved the newer {workdir / 'checkpoints' / '6'} to "
             f"{workdir / 'checkpoints' / 'abandoned-6'}")
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [moved]
    assert "resumed from step 3" in out
    assert entries(workdir) == ["3", "6", "abandoned-6"]
    assert_same_run(straight, workdir)
    abandoned = restore_trainable(str(workdir / "checkpoints" / "abandoned-6" / "state"))
    for x, y in zip(jax.tree_util.tree_leaves(abandoned), jax.tree_util.tree_leaves(state_at(straight, 6)["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    os.remove(workdir / "checkpoints" / "3" / "data" / "metadata")
    with pytest.raises(ValueError, match=r"config.resume_from_step=3: .*checkpoints/3 is unreadable "
                                         r"\(FileNotFoundError: .*; the steps there: 3, 6\)"):
        trainer.train(tiny_config(dataset, resume_from_step=3), str(workdir))


def test_no_intact_checkpoint_is_one_error_line(tmp_path, dataset, straight, capsys):
    """Every checkpoint damaged: exit 2 with one line naming the folder and the remedy; nothing is moved."""
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    DAMAGE["truncated tensor file"](workdir / "checkpoints" / "6")
    DAMAGE["no state/_METADATA"](workdir / "checkpoints" / "3")
    assert train_cli.main(cli_args(workdir, dataset)) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith(f"error: {workdir / 'checkpoints'}: no checkpoint restores (6: ValueError: ")
    assert "3: FileNotFoundError: " in errors[0] and "remove the folder" in errors[0]
    assert "Traceback" not in captured.err + captured.out and "warning:" not in captured.out
    assert entries(workdir) == ["3", "6"]


class Stalls:
    """The trainer's data iterator, whose `after`-th next() waits (a slow search through unreadable records),
    and has the process sent `signum` meanwhile; a wait the signal does not end fails after 30 s."""

    def __init__(self, inner, after, signum):
        self.inner, self.after, self.signum, self.count = inner, after, signum, 0

    def __next__(self):
        if self.count == self.after:
            threading.Timer(0.5, os.kill, (os.getpid(), self.signum)).start()
            time.sleep(30)
            raise AssertionError("the signal did not stop the wait for data")
        self.count += 1
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_stop_while_waiting_for_data_saves_the_last_step(tmp_path, dataset, straight, monkeypatch, capsys):
    """SIGTERM while next() waits: step 2 (the last completed) is saved with the data state before the wait and
    the run returns; resumed, it ends bit-identical to a straight run."""
    make_iterator = trainer.make_iterator
    monkeypatch.setattr(trainer, "make_iterator", lambda *a, **k: Stalls(make_iterator(*a, **k), 2, signal.SIGTERM))
    workdir, handlers = tmp_path / "run", (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    trainer.train(tiny_config(dataset, checkpoint_every=5), str(workdir))
    assert "SIGTERM: saved step 2, stopping" in capsys.readouterr().out.splitlines()
    assert entries(workdir) == ["2"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    monkeypatch.setattr(trainer, "make_iterator", make_iterator)
    trainer.train(tiny_config(dataset), str(workdir))
    assert_same_run(straight, workdir)


def test_sigint_while_the_data_search_runs_stops_at_once(tmp_path):
    """Every record unreadable and a bound too large to end the search: SIGINT (Ctrl-C; SIGTERM alike) stops the
    run within seconds, exit 0, with its one line and nothing saved (no step was completed)."""
    write_synthetic(str(tmp_path / "bad"), "train", 8)
    for image in (tmp_path / "bad" / "train").glob("*.jpg"):
        image.write_bytes(b"not an image")
    workdir = tmp_path / "run"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                 *cli_args(workdir, f"{tmp_path / 'bad'}:train",
                                           "--config.data.max_consecutive_skips=1000000000")],
                                cwd=REPO, stdout=out, stderr=err, text=True)
        try:
            deadline = time.time() + 300
            while not (workdir / "run_info.json").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(3)  # in the data search by now
            assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            began = time.time()
            status = proc.wait(timeout=30)
            print(f"stopped {time.time() - began:.1f} s after SIGINT", file=sys.stderr)
        finally:
            proc.kill()
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert status == 0, stderr[-3000:]
    assert "SIGINT: stopping before step 1; nothing new to save" in stdout.splitlines()
    assert "skipped record" in stderr  # it was searching
    assert "Traceback" not in stderr + stdout and "error:" not in stderr
    assert entries(workdir) == []


def test_a_full_disk_while_saving_is_one_error_line(small_disk, dataset, straight, capsys):
    """A run folder on a disk with room for the run's files but not a checkpoint: exit 1 with one error line
    naming the file orbax could not write; orbax's thread tracebacks go to a log file, not the console; nothing
    is left in checkpoints/."""
    workdir = small_disk("4m") / "run"
    status = train_cli.main(cli_args(workdir, dataset, "--config.checkpoint_every=1", "--config.log_every=100",
                                     "--config.record_data_order=false"))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert status == 1, captured.err[-3000:]
    assert len(errors) == 1, captured.err[-3000:]
    assert errors[0].startswith(f"error: {workdir / 'checkpoints' / '1.orbax-checkpoint-tmp'}/")
    assert "No space left on device (saving checkpoints in" in errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert not any(line.startswith(("E1", "E0")) for line in captured.err.splitlines())  # absl's error lines
    assert entries(workdir) == []  # the partial step folder is removed (it holds what space there was)


def test_an_unset_tokenizer_leaves_no_run_folder(tmp_path, dataset):
    """The packaged configs leave config.tokenizer to the command line: unset, it is refused before record_run
    writes the run folder."""
    with pytest.raises(ValueError, match="set config.tokenizer"):
        trainer.train(tiny_config(dataset, tokenizer=""), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
