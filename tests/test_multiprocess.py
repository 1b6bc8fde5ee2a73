"""train.py and sample.py as 2 processes x 4 forced CPU devices on localhost (jax.distributed, gloo collectives)
against 1 process x 8 devices: the same steps (mesh data=8: every global batch split across both processes),
one set of run files, a joint checkpoint that resumes in one process, SIGTERM on one process stopping both after
one final save; sampling split without duplicates.

Every run is a group of subprocesses with bounded time, killed on failure; runs that do not depend on each other
go together (the machine's cores compile them side by side) and the module fixtures share them between tests.
All runs share one persistent compilation cache (process 0 writes it; the 1-process restart loads its step). The
mesh is data-parallel because GSPMD compiles the tiny step sharded over fsdp ~3x slower (82 s against 30 s on CPU);
restoring fsdp-sharded checkpoints on other device counts is tested in tests/test_train_cli.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_jax import model_config as config_lib
from cnc_jax.prep.synthetic import write_synthetic
from tests.test_train_cli import assert_trees, lines, params_at

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1500  # seconds for a group of runs, against hangs (a cold compile of the 8-device step takes minutes on
#                 a busy 2-core machine)
# The programs here are tiny and run a few times: XLA's unoptimised backend compiles them ~30% faster. Every run
# uses the same flags, so the comparisons are between identical programs.
FAST_COMPILE = "--xla_backend_optimization_level=0"
TRAIN = [str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py"), "--config.batch_size=8",
         "--config.log_every=1", "--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.record_data_order=True",
         "--config.image_log_every=0", "--config.attention=xla"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One script as `processes` processes with `devices` forced CPU devices each; output in log files."""

    def __init__(self, name: str, argv: list[str], logs: Path, processes: int = 1, devices: int = 8,
                 style: str = "config"):
        cache = logs / "compile_cache"  # the module's runs share it (train.py: config.compile_cache_dir)
        self.name, self.procs, self.logs = name, [], []
        port = free_port()
        for i in range(processes):
            flags = []
            if processes > 1 and style == "config":
                flags = ["--config.distributed=True", f"--config.coordinator_address=127.0.0.1:{port}",
                         f"--config.num_processes={processes}", f"--config.process_id={i}"]
            elif processes > 1:
                flags = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                         str(processes), "--process-id", str(i)]
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
                   "JAX_COMPILATION_CACHE_DIR": str(cache)}
            log = logs / f"{name}.{i}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen([sys.executable, *argv, *flags], cwd=REPO, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def wait(jobs: list[Job], timeout: float = TIMEOUT, codes=(0,)) -> None:
    """Wait for every process of `jobs`; on a bad exit status or timeout kill them all and fail with the output."""
    deadline = time.time() + timeout
    try:
        for job in jobs:
            for i, p in enumerate(job.procs):
                try:
                    code = p.wait(timeout=max(deadline - time.time(), 1))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{job.name} process {i} still running after {timeout} s:\n{job.output(i)[-3000:]}")
                assert code in codes, f"{job.name} process {i} exit status {code}:\n{job.output(i)[-5000:]}"
    finally:
        for job in jobs:
            job.kill()


def metric_steps(workdir: Path) -> list[int]:
    return [m["step"] for m in lines(workdir / "metrics.jsonl")]


def logged(workdir: Path) -> list[int]:
    """metric_steps of a running run ([] while the file is missing or being rewritten)."""
    try:
        return metric_steps(workdir)
    except (OSError, ValueError):
        return []


JOBS = [{"prompt": "a red ball", "seed": 1, "num_images": 2, "name": "ball"},
        {"prompt": "a broken file", "fg_image": "broken.png", "name": "broken"},  # fails on the process it lands on
        {"prompt": "a dog", "seed": 2, "cfg_scale": 5.0, "name": "dog"},
        {"prompt": "a cat on a mat", "seed": 3, "num_images": 3, "name": "cat"},
        {"prompt": "a house", "seed": 4, "name": "house"}]
SAMPLE = [str(REPO / "sample.py"), "--random-init", "--size", "64", "--steps", "2"]


def wrote(job: Job, i: int) -> list[str]:
    return [Path(line.split(": wrote ")[1]).name for line in job.output(i).splitlines() if ": wrote " in line]


def files(out: Path) -> dict:
    return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def small_model(path: Path) -> Path:
    """The tiny preset with one UNet level and one text layer, as a config.json: the same program structure
    (every part, multi-process collectives, checkpoints, the image log) at ~2/3 of the tiny step's compile time."""
    tiny = config_lib.tiny()
    one_level = {"channel_mult": (1,), "attention_resolutions": (1,)}
    model = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, **one_level),
                                local_fuser=dataclasses.replace(tiny.local_fuser, **one_level, inject_channels=(32,),
                                                                inject_layers=(1,)),
                                text_encoder=dataclasses.replace(tiny.text_encoder, num_hidden_layers=1))
    path.write_text(json.dumps(model.to_dict()))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All the module's runs, in two rounds (the cores take the independent ones side by side):
    round 1: training `two` = 2 processes (checkpoints at 3 and 6, image log at step 4) until process 1 alone
    gets SIGTERM after step 5 is logged (both stop after step 6 or 7), beside `one` = 1 process x 8 devices for
    3 steps on the same data;
    sampling a 5-job manifest (one job fails) by 2 processes x 4 devices and by 1 process x 8 devices;
    round 2: training `resumed` = a copy of `two` cut back to its step-3 checkpoint, resumed in 1 process to
    step 6; sampling `again` = the 2 processes on the finished output."""
    root = tmp_path_factory.mktemp("multiprocess")
    write_synthetic(str(root / "data"), "train", 24)
    train = [*TRAIN, f"--config.data.sources={root / 'data'}:train",
             f"--config.model={small_model(root / 'model.json')}"]
    two, one, resumed = root / "two", root / "one", root / "resumed"
    (root / "broken.png").write_bytes(b"not a png")
    manifest = root / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(j) + "\n" for j in JOBS))
    sample = [*SAMPLE, "--manifest", str(manifest), "--out"]
    t0 = time.time()
    job = Job("two", [*train, "--workdir", str(two), "--config.num_steps=100000", "--config.checkpoint_every=3",
                      "--config.keep_checkpoints=100000", "--config.image_log_every=4", "--config.image_log_steps=2"],
              root, processes=2, devices=4)
    single = Job("one", [*train, "--workdir", str(one), "--config.num_steps=3"], root)
    sample_two = Job("sample_two", [*sample, str(root / "sample_two")], root, processes=2, devices=4, style="cli")
    sample_one = Job("sample_one", [*sample, str(root / "sample_one")], root)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and 5 not in logged(two):
            assert all(p.poll() is None for p in job.procs), job.output(0)[-3000:] + job.output(1)[-3000:]
            time.sleep(0.5)
        job.procs[1].send_signal(signal.SIGTERM)
        wait([job, single])
        wait([sample_two, sample_one], codes=(1,))  # the broken job makes every process exit 1
    finally:
        for j in (job, single, sample_two, sample_one):
            j.kill()
    round_1 = time.time() - t0
    shutil.copytree(two, resumed)
    for checkpoint in (resumed / "checkpoints").iterdir():
        if checkpoint.name.isdigit() and int(checkpoint.name) > 3:
            shutil.rmtree(checkpoint)
    before = files(root / "sample_two")
    t0 = time.time()
    again = Job("sample_again", [*sample, str(root / "sample_two")], root, processes=2, devices=4, style="cli")
    wait([Job("resumed", [*train, "--workdir", str(resumed), "--config.num_steps=6"], root)])
    wait([again], codes=(1,))
    print(f"multi-process runs: round 1 {round_1:.0f} s, round 2 {time.time() - t0:.0f} s")
    return {"two": two, "one": one, "resumed": resumed, "job": job, "root": root, "sample_two": sample_two,
            "sample_one": sample_one, "again": again, "before": before}


def test_two_processes_take_the_same_steps_as_one(runs):
    two, one = runs["two"], runs["one"]
    losses_two = [m["loss"] for m in lines(two / "metrics.jsonl")][:3]
    losses_one = [m["loss"] for m in lines(one / "metrics.jsonl")]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses_two, losses_one))
    print(f"2 processes vs 1: worst relative loss difference over 3 steps {worst:.2e}")
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
    assert_trees(params_at(two, 3)[1], params_at(one, 3)[1], rtol=1e-5)
    # the same examples in the same rows of every global batch
    assert lines(two / "data_order.jsonl")[:3] == lines(one / "data_order.jsonl")


def test_process_zero_alone_writes_the_run_files(runs):
    two, job = runs["two"], runs["job"]
    for i in (0, 1):
        assert f"process {i} of 2: 4 local / 8 global cpu devices" in job.output(i)
    info = json.loads((two / "run_info.json").read_text())
    assert info["processes"] == 2 and info["devices"] == 8 and info["local_devices"] == 4
    assert len(list((two / "tensorboard").iterdir())) == 1  # one events file, process 0's
    assert sorted(p.name for p in (two / "images").iterdir()) == ["step_0000004.png"]  # image_log_every=4
    grid = np.asarray(Image.open(two / "images" / "step_0000004.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3


def test_sigterm_on_one_process_stops_both_after_one_joint_save(runs):
    two, job = runs["two"], runs["job"]
    stopped = {int(m) for i in (0, 1)
               for m in re.findall(r"^SIGTERM: saved step (\d+), stopping$", job.output(i), re.M)}
    assert len(stopped) == 1, (job.output(0)[-2000:], job.output(1)[-2000:])
    step = stopped.pop()
    assert step >= 6 and params_at(two)[0] == step
    # exactly one metrics line per step; one data_order line per step
    assert metric_steps(two) == list(range(1, step + 1))
    assert [r["step"] for r in lines(two / "data_order.jsonl")] == list(range(step))


def test_the_two_process_checkpoint_resumes_in_one_process(runs):
    two, resumed = runs["two"], runs["resumed"]
    continued = {m["step"]: m["loss"] for m in lines(two / "metrics.jsonl")}
    after = [m for m in lines(resumed / "metrics.jsonl") if m["step"] > 3]
    assert [m["step"] for m in after] == [4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in after], [continued[s] for s in (4, 5, 6)], rtol=1e-5)
    assert_trees(params_at(two, 6)[1], params_at(resumed, 6)[1], rtol=1e-5)  # two's checkpoint 6: checkpoint_every
    assert lines(resumed / "data_order.jsonl") == lines(two / "data_order.jsonl")[:6]


def test_tensorboard_events_hold_the_scalars_and_the_image_log(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    two = runs["two"]
    events = EventAccumulator(str(two / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = metric_steps(two)
    metrics = {m["step"]: m for m in lines(two / "metrics.jsonl")}
    for name in ("loss", "lr", "grad_norm", "steps_per_sec", "examples_per_sec"):
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == steps, name  # the restart purged nothing twice
        np.testing.assert_allclose([e.value for e in scalars], [metrics[s][name] for s in steps], rtol=1e-6)
    (image,) = [e for e in events.Images("image_log") if e.step == 4]
    png = Image.open(two / "images" / "step_0000004.png")
    assert image.step == 4 and (image.width, image.height) == png.size
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), np.asarray(png))


def test_two_processes_sample_each_job_once_with_the_same_pixels(runs):
    one_out, two_out, two = runs["root"] / "sample_one", runs["root"] / "sample_two", runs["sample_two"]
    good = sorted(j["name"] for j in JOBS if j["name"] != "broken")
    assert sorted(p.name for p in two_out.iterdir()) == sorted(p.name for p in one_out.iterdir()) == good
    written = wrote(two, 0) + wrote(two, 1)
    assert sorted(written) == good and set(wrote(two, 0)) and set(wrote(two, 1))  # once each, both processes busy
    for i in (0, 1):
        for name in wrote(two, i):
            assert json.loads((two_out / name / "job.json").read_text())["process"] == i
    pngs = sorted(p.relative_to(one_out) for p in one_out.rglob("*.png"))
    assert pngs == sorted(p.relative_to(two_out) for p in two_out.rglob("*.png"))
    assert len(pngs) > len(good)
    for path in pngs:
        np.testing.assert_array_equal(np.asarray(Image.open(two_out / path)),
                                      np.asarray(Image.open(one_out / path)), err_msg=str(path))


def test_a_bad_job_on_one_process_fails_every_process(runs):
    two = runs["sample_two"]
    holder = [i for i in (0, 1) if "line 2, field 'fg_image'" in two.output(i)]
    assert len(holder) == 1  # reported once, by the process that ran it; both exited 1 (the fixture's wait)


def test_finished_jobs_are_skipped_across_processes(runs):
    again = runs["again"]
    assert f"{len(JOBS)} jobs: {len(JOBS) - 1} already done, 1 to run, 0 invalid" in again.output(0)
    assert wrote(again, 0) == wrote(again, 1) == []
    assert files(runs["root"] / "sample_two") == runs["before"]
