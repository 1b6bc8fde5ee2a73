"""sample.py under faults and bad input (issue 32): each bad job is one `error:` line naming its manifest line and
field (or its folder, for a full disk), the other jobs are sampled and written, nothing is half-written, nothing
silently black; bad flags are refused before anything runs (exit status 2).

One in-process run of a manifest with many bad lines (tiny random-init models, 64 px, 2 steps) is shared by the
tests of its findings; the full disk and the damaged job.json have runs of their own.
"""

import contextlib
import io
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnc_jax.cli import sample
from cnc_jax.sampling import pipeline as pipeline_module

FAST = ("--random-init", "--size", 64, "--steps", 2)
FILES = ["bg_depth.png", "fg_depth.png", "grid.png", "image_000.png", "job.json", "mask.png"]
LONG_FITS = "é" * 119  # 238 bytes of UTF-8: with '.partial-' and '-<7-digit pid>', 255
BAD_LINES = {  # manifest line -> (field or None, what the error says)
    2: ("fg_emb", "nan_emb.npy: 3 of 32 values are not finite"),
    3: ("fg_depth", "inf_depth.npy: 1 of 4096 values are not finite"),
    4: ("bg_emb", "nan_emb.npy: 3 of 32 values are not finite"),
    5: ("fg_emb", "strings.npy: holds <U3 values, not numbers"),
    6: ("bg_depth", "empty.npy: empty array of shape (0, 0)"),
    7: ("fg_image", "bomb.png"),
    8: ("prompt", "not valid Unicode: a lone surrogate '\\udcff'"),
    9: ("name", "NUL"),
    10: ("name", "250 bytes of UTF-8; at most 238 fit"),
    11: (None, "not valid UTF-8 (byte 0xe9"),
    12: (None, "images are not finite (1 of 1 hold NaN or Inf"),
    13: (None, "writing it: RuntimeError: a bug in writing (traceback in "),
}


def _call(*argv):
    """(exit status, stdout, stderr) of sample.main in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sample.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _errors(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    return lines


def _manifest(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
                     + b"\n")
    return path


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One run of a manifest of good jobs and one of each fault; (folder, exit status, stdout, stderr)."""
    d = tmp_path_factory.mktemp("faults")
    emb = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    emb[[1, 5, 7]] = [np.nan, np.inf, -np.inf]
    np.save(d / "nan_emb.npy", emb)
    depth = np.full((64, 64), 0.5, np.float32)
    depth[3, 4] = np.inf
    np.save(d / "inf_depth.npy", depth)
    np.save(d / "strings.npy", np.array(["abc", "def"]))
    np.save(d / "empty.npy", np.zeros((0, 0), np.float32))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "bomb.png")  # a bomb under the limit set below
    manifest = _manifest(d / "jobs.jsonl", [
        {"prompt": "a good job", "name": "good"},
        {"prompt": "x", "fg_emb": "nan_emb.npy"},
        {"prompt": "x", "fg_depth": "inf_depth.npy"},
        {"prompt": "x", "bg_emb": "nan_emb.npy"},
        {"prompt": "x", "fg_emb": "strings.npy"},
        {"prompt": "x", "bg_depth": "empty.npy"},
        {"prompt": "x", "fg_image": "bomb.png"},
        {"prompt": "\udcff"},  # json.dumps writes the escape "\udcff", and json.loads reads it back
        {"prompt": "x", "name": "a\0b"},
        {"prompt": "x", "name": "n" * 250},
        b'{"prompt": "caf\xe9"}',  # latin-1, not UTF-8
        {"prompt": "images that are not finite", "cfg_scale": 5.0, "name": "nan-images"},
        {"prompt": "a bug while writing", "name": "buggy"},
        {"prompt": "a long name that fits", "name": LONG_FITS},
    ])
    real_sample, real_write = pipeline_module.sample_latents, sample.write_job

    def broken_sampler(config, params, cond, keys, steps, scale, **kwargs):  # breaks down at guidance 5 only
        latents = real_sample(config, params, cond, keys, steps, scale, **kwargs)
        return latents * jnp.nan if np.asarray(scale)[0] == 5.0 else latents

    def buggy_write(out_dir, job, images, info):
        if job.spec.name == "buggy":
            raise RuntimeError("a bug in writing")
        return real_write(out_dir, job, images, info)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL's DecompressionBombError
        mp.setattr(pipeline_module, "sample_latents", broken_sampler)
        mp.setattr(sample, "write_job", buggy_write)
        code, stdout, err = _call(*FAST, "--manifest", manifest, "--out", d / "out")
    return d / "out", code, stdout, err


def test_each_bad_job_is_one_error_line_by_line_and_field_and_the_good_jobs_are_written(faulty_run):
    out, code, stdout, err = faulty_run
    assert code == 1, err
    errors = _errors(err)
    assert len(errors) == len(BAD_LINES), errors
    for line, (field, text) in BAD_LINES.items():
        where = f"line {line}" + (f", field '{field}'" if field else "") + ":"
        (match,) = [e for e in errors if e.startswith((f"error: line {line},", f"error: line {line}:"))]
        assert match.startswith(f"error: {where}") and text in match, (match, where, text)
    assert sorted(p.name for p in out.iterdir()) == sorted(["good", LONG_FITS, "errors.log"])
    for name in ("good", LONG_FITS):
        assert sorted(p.name for p in (out / name).iterdir()) == FILES
        assert f"wrote {out / name}" in stdout


def test_non_finite_inputs_and_images_are_never_written_or_marked_done(faulty_run):
    """Finding 2: NaN / Inf in an embedding or depth .npy, or images the sampler made NaN, were black images in a
    folder whose job.json said done."""
    out, _, stdout, _ = faulty_run
    assert not (out / "nan-images").exists() and "nan-images" not in stdout
    assert not any(p.name.startswith(".partial-") for p in out.iterdir())
    image = np.asarray(Image.open(out / "good" / "image_000.png"))
    assert image.std() > 0  # a real image, not the black of a NaN converted to uint8


def test_an_unexpected_exception_is_the_jobs_error_with_its_traceback_kept(faulty_run):
    out, _, _, err = faulty_run
    (line,) = [e for e in _errors(err) if e.startswith("error: line 13:")]
    assert str(out / "errors.log") in line
    log = (out / "errors.log").read_text()
    assert "line 13 (buggy), writing it" in log and "Traceback" in log and "RuntimeError: a bug in writing" in log


def test_a_finished_job_with_a_truncated_job_json_fails_alone(tmp_path, faulty_run):
    """It stopped the run before any job; now it is that job's error (the folder is kept: it cannot be shown to be
    this job, and it may be someone's work), and the other jobs run."""
    out = tmp_path / "out"
    shutil.copytree(faulty_run[0] / "good", out / "good")
    text = (out / "good" / "job.json").read_text()
    (out / "good" / "job.json").write_text(text[:len(text) // 2])
    manifest = _manifest(tmp_path / "jobs.jsonl", [{"prompt": "a good job", "name": "good"},
                                                   {"prompt": "another job", "name": "other"}])
    code, _, err = _call(*FAST, "--manifest", manifest, "--out", out)
    assert code == 1, err
    (line,) = _errors(err)
    assert line.startswith("error: line 1, field 'name': ") and str(out / "good" / "job.json") not in line
    assert f"{out / 'good'} exists, but its job.json cannot be read (JSONDecodeError" in line
    assert "remove the folder to redo the job" in line
    assert sorted(p.name for p in out.iterdir()) == ["good", "other"]
    assert (out / "good" / "job.json").read_text() == text[:len(text) // 2]  # left as it was
    assert sorted(p.name for p in (out / "other").iterdir()) == FILES


def test_a_full_disk_fails_the_job_that_does_not_fit_and_leaves_nothing_of_it(small_disk):
    """One job fits, the next of the same round does not: exit 1, one error line naming its folder, the first
    job complete, no partial folder; it was a traceback that lost every job of the round."""
    out = small_disk("96k")
    manifest = _manifest(out.parent / "jobs.jsonl", [{"prompt": "fits", "name": "small"},
                                                     {"prompt": "too big", "name": "big", "num_images": 12}])
    code, stdout, err = _call(*FAST, "--manifest", manifest, "--out", out)
    assert code == 1, err
    assert f"wrote {out / 'small'}" in stdout and "wrote" not in stdout.replace(f"wrote {out / 'small'}", "")
    (line,) = _errors(err)
    assert line == f"error: line 2: cannot write {out / 'big'}: No space left on device; nothing of it was kept"
    assert sorted(p.name for p in out.iterdir()) == ["small"]
    assert sorted(p.name for p in (out / "small").iterdir()) == FILES
    assert json.loads((out / "small" / "job.json").read_text())["settings"]["prompt"] == "fits"


@pytest.mark.parametrize("argv, message", [
    (("--jobs-per-round", 0), "--jobs-per-round: must be >= 1"),
    (("--jobs-per-round", -1), "--jobs-per-round: must be >= 1"),
    (("--per-device-batch", 0), "--per-device-batch: must be >= 1"),
    (("--per-device-batch", -1), "--per-device-batch: must be >= 1"),
    (("--steps", 0), "--steps: 0 is outside [1, 1000]"),
    (("--num-images", 0), "--num-images: 0 is outside [1, 1024]"),
    (("--seed", -1), "--seed: -1 is outside [0, 2147483647]"),
    (("--size", 100), "--size: 100x100: height and width must be multiples of 64"),
    (("--size", 64, 64, 64), "--size: expected an integer or [height, width]"),
    (("--cfg-scale", "inf"), "--cfg-scale: expected a finite number, got inf"),
    (("--eta", -1), "--eta: -1.0 is outside [0.0, 10.0]"),
    (("--fg-depth-control", "nan"), "--fg-depth-control: expected a finite number, got nan"),
    (("--name", "a/b"), "--name: must be a plain folder name"),
    (("--num-processes", 0), "--num-processes: -1 (auto-detect) or a count >= 1, got 0"),
    (("--process-id", -5), "--process-id: -1 (auto-detect) or an index in [0, --num-processes), got -5"),
    (("--num-processes", 2, "--process-id", 2), "--process-id: -1 (auto-detect) or an index"),
])
@pytest.mark.parametrize("manifest", [False, True])
def test_bad_counts_and_numbers_in_flags_are_refused_before_anything_runs(tmp_path, argv, message, manifest):
    extra = ("--manifest", _manifest(tmp_path / "jobs.jsonl", [{"prompt": "a"}, {"prompt": "b"}])) if manifest else ()
    code, _, err = _call("--random-init", *argv, *extra, "--out", tmp_path / "out")
    assert code == 2, err
    (line,) = _errors(err)
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "out").exists()


def test_a_captions_file_that_is_not_utf8_is_one_error_line_naming_it(tmp_path):
    """--from-dataset: a 0xff byte in the captions file was an error that named no file."""
    (tmp_path / "val_captions.txt").write_bytes(b"0001:a cat\n0002:caf\xff\n")
    code, _, err = _call("--random-init", "--from-dataset", f"{tmp_path}:val", "--out", tmp_path / "out")
    assert code == 2, err
    (line,) = _errors(err)
    assert line.startswith(f"error: --from-dataset {tmp_path / 'val_captions.txt'}: line 2: not UTF-8"), line
    assert not (tmp_path / "out").exists()
