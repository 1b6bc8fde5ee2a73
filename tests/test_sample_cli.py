"""sample.py end to end with --random-init: outputs, bad jobs, resuming, seeds vs batching and device count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_jax.cli import sample

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _image(path, seed, size=(96, 80)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    base = np.stack([yy, xx, (yy + xx) / 2], -1) * 255
    Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(path)
    return str(path)


def _manifest(path, jobs):
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    _image(d / "fg.png", 0), _image(d / "bg.jpg", 1), _image(d / "emb.png", 2, (50, 70))
    np.save(d / "fg_depth.npy", np.linspace(0, 1, 128 * 192, dtype=np.float32).reshape(128, 192))
    mask = np.zeros((128, 192), np.uint8)
    mask[32:96, 48:144] = 255
    Image.fromarray(mask).save(d / "mask.png")
    np.save(d / "fg_emb.npy", np.random.default_rng(3).standard_normal(32).astype(np.float32))
    return d


def test_manifest_outputs_errors_and_resume(tmp_path, capsys, inputs):
    manifest = _manifest(tmp_path / "jobs.jsonl", [
        {"prompt": "a red ball", "fg_image": "inputs/fg.png", "bg_image": "inputs/bg.jpg",
         "fg_emb_image": "inputs/emb.png", "num_images": 2, "seed": 1},
        {"prompt": "a cat", "bg_image": "inputs/nope.jpg"},
        {"prompt": "a house", "size": [128, 192], "fg_depth": "inputs/fg_depth.npy", "mask": "inputs/mask.png",
         "fg_emb": "inputs/fg_emb.npy", "cfg_scale": 1.0, "depth_version": "v3", "name": "house"},
        {"prompt": "a dog", "cfg_scale": float("nan")},  # json writes NaN, and reads it back
    ])
    os.symlink(inputs, tmp_path / "inputs")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--random-init", "--manifest", manifest, "--out", out)
    assert code == 1
    assert "line 2, field 'bg_image'" in err and "nope.jpg: no such file" in err
    assert "line 4, field 'cfg_scale': expected a finite number, got nan" in err
    jobs = sorted(p.name for p in out.iterdir())
    assert len(jobs) == 2 and "house" in jobs and not any(j.startswith(".") for j in jobs)
    first = out / next(j for j in jobs if j != "house")
    assert sorted(p.name for p in first.iterdir()) == ["bg_depth.png", "fg_depth.png", "grid.png", "image_000.png",
                                                       "image_001.png", "job.json", "mask.png"]
    image = np.asarray(Image.open(first / "image_000.png"))
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert np.asarray(Image.open(first / "grid.png")).shape == (128, 256, 3)
    info = json.loads((first / "job.json").read_text())
    assert info["settings"]["num_images"] == 2 and info["settings"]["seed"] == 1 and info["manifest_line"] == 1
    house = out / "house"
    assert np.asarray(Image.open(house / "image_000.png")).shape == (128, 192, 3)
    mask = np.asarray(Image.open(house / "mask.png"))
    assert mask.shape == (128, 192) and mask[64, 96] == 255 and mask[0, 0] == 0  # the given mask, unchanged
    # fg_depth v3 is not recomputed from a given depth file: the map is the file's ramp (3 equal channels)
    depth = np.asarray(Image.open(house / "fg_depth.png"))
    assert depth.shape == (128, 192, 3) and np.all(depth == depth[..., :1])
    assert depth[0, 0, 0] == 0 and depth[-1, -1, 0] == 255

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = run(capsys, "--random-init", "--manifest", manifest, "--out", out)
    assert code == 1 and "2 already done, 0 to run, 2 invalid" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_missing_checkpoint_explains_conversion(tmp_path, capsys):
    code, _, err = run(capsys, "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and "convert_torch_weights.py convert" in err


def _dog_image(out):
    return np.asarray(Image.open(out / "dog" / "image_001.png"))


def test_same_seed_same_pixels_alone_batched_and_on_8_devices(tmp_path, capsys):
    dog = {"prompt": "a dog", "seed": 5, "num_images": 2, "name": "dog", "cfg_scale": 5.0}
    cat = {"prompt": "a cat on a mat", "seed": 9, "num_images": 3, "name": "cat", "cfg_scale": 5.0}
    alone = _manifest(tmp_path / "alone.jsonl", [dog])
    mixed = _manifest(tmp_path / "mixed.jsonl", [cat, dog])
    for name, manifest in (("alone", alone), ("mixed", mixed)):
        code, _, err = run(capsys, "--random-init", "--manifest", manifest, "--out", tmp_path / name,
                           "--per-device-batch", "4")
        assert code == 0, err
    np.testing.assert_array_equal(_dog_image(tmp_path / "alone"), _dog_image(tmp_path / "mixed"))

    code, _, err = run(capsys, "--random-init", "--manifest", alone, "--out", tmp_path / "one_device")
    assert code == 0, err
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), "--random-init", "--manifest", str(mixed),
                           "--out", str(tmp_path / "eight")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eight" / "dog" / "job.json").read_text())["devices"] == 8
    np.testing.assert_array_equal(_dog_image(tmp_path / "one_device"), _dog_image(tmp_path / "eight"))
    assert not np.array_equal(_dog_image(tmp_path / "eight"), np.asarray(
        Image.open(tmp_path / "eight" / "dog" / "image_000.png")))  # images of a job differ from each other


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    """A converted folder of the tiny preset with random weights (what `convert` writes), no annotators."""
    from cnc_jax.checkpoint import save_converted
    from cnc_jax.model_config import tiny
    from cnc_jax.models.build import init_params

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_converted(str(path), tiny(), init_params(tiny(), seed=0))


def test_checkpoint_without_images_or_masker_samples_with_an_all_background_mask(tmp_path, capsys, converted_tiny):
    """No fg image and no fg-embedding image: nothing to take a mask from, so no masker weights are needed."""
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--checkpoint", converted_tiny, "--tokenizer", "byte_level", "--size", 64,
                            "--steps", 2, "--out", out)
    assert code == 0, err
    assert "no --prompt: sampling 'a photo'" in err and "error" not in err
    (job,) = out.iterdir()
    assert not np.asarray(Image.open(job / "mask.png")).any()
    assert json.loads((job / "job.json").read_text())["settings"]["prompt"] == "a photo"


def test_every_check_runs_before_sampling_and_a_failed_job_never_fills_the_bar(tmp_path, capsys, inputs):
    manifest = _manifest(tmp_path / "jobs.jsonl", [
        {"prompt": "off the ddim grid", "steps": 3},
        {"prompt": "an unreadable image", "fg_image": str(tmp_path / "broken.png")},
    ])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "--random-init", "--manifest", manifest, "--out", tmp_path / "out")
    assert code == 1
    assert "line 1, field 'steps'" in err and "line 2, field 'fg_image'" in err
    assert "100%" not in err and "sampling: 0img" in err  # both jobs left the bar's total: it never filled
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_checkpoint_is_one_error_line_without_a_manifest_line(tmp_path, capsys):
    code, _, err = run(capsys, "--checkpoint", tmp_path / "nope", "--tokenizer", "byte_level", "--prompt", "x",
                       "--out", tmp_path / "o")
    assert code == 2 and err.count("error:") == 1 and "line 0" not in err and "Traceback" not in err, err
    assert "cannot load the models" in err and str(tmp_path / "nope") in err
