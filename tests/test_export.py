"""convert_torch_weights.py export: official / safetensors round trips, a tiny train.py run as a model, errors."""

import functools
import json
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnc_jax.checkpoint import (RUN_INFO, load_converted, load_official_params, load_run, load_weights, save_converted,
                                 starting_params)
from cnc_jax.cli import convert as convert_cli
from cnc_jax.cli import sample
from cnc_jax.configs import tiny
from cnc_jax.model_config import load_config
from cnc_jax.models.build import init_params
from cnc_jax.models.cnc import CnC
from cnc_jax.models.parts import split_params
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.torchfile.state_dict import load_raw, load_state_dict
from cnc_jax.training import trainer
from tests.conftest import converted_reference, run_main


def run(capsys, *argv):
    return run_main(convert_cli.main, capsys, *argv)


def arrays(path):
    return {k: v.numpy() for k, v in load_state_dict(path).items()}


def assert_identical(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def one_error(code, err):
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def converted(ref_dir, tmp_path_factory):
    return converted_reference(ref_dir, tmp_path_factory.mktemp("export") / "tiny_cnc")


def test_official_and_safetensors_round_trips_are_identical(converted, ref_dir, tmp_path, capsys):
    ckpt, st = tmp_path / "model.ckpt", tmp_path / "model.safetensors"
    for out, fmt in ((ckpt, "official"), (st, "safetensors")):
        code, _, err = run(capsys, "export", converted, "--out", out, "--format", fmt)
        assert code == 0, err
    assert_identical(arrays(ckpt), arrays(ref_dir / "tiny_cnc.ckpt"))  # every key, buffers included
    assert_identical(arrays(st), arrays(ref_dir / "tiny_cnc.safetensors"))
    # torch's container: <stem>/data.pkl, data/N 64-byte aligned, version and byteorder records
    with zipfile.ZipFile(ckpt) as archive, open(ckpt, "rb") as f:
        names = archive.namelist()
        assert names[0] == "model/data.pkl" and {"model/version", "model/byteorder"} <= set(names)
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = (int(n) for n in np.frombuffer(f.read(4), "<u2"))
            if info.filename.startswith("model/data/"):
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
    assert load_state_dict(ckpt) is not None and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_export_dtype(converted, tmp_path, capsys):
    out = tmp_path / "half.safetensors"
    code, _, err = run(capsys, "export", converted, "--out", out, "--format", "safetensors", "--dtype", "float16")
    assert code == 0, err
    state = arrays(out)
    assert state["betas"].dtype == np.float32  # buffers stay as the official code keeps them
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == np.int64
    assert state["model.diffusion_model.out.2.weight"].dtype == np.float16


def test_a_failed_write_leaves_nothing(converted, tmp_path, monkeypatch, capsys):
    from cnc_jax.torchfile import torch_save

    def broken(file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch_save, "write_torch_zip", broken)
    code, _, err = run(capsys, "export", converted, "--out", tmp_path / "x.ckpt", "--format", "official")
    one_error(code, err)
    assert "disk full" in err and os.listdir(tmp_path) == []


# ---- a tiny training run ------------------------------------------------------------------------------------

def _train_config(data, init, steps):
    config = tiny.get_config()
    config.data.sources = data
    config.random_init, config.init_checkpoint = False, str(init)
    # batch 8 at the tiny config's resolution: the train step test_train_cli compiles (one XLA cache entry)
    config.batch_size, config.num_steps, config.checkpoint_every, config.log_every = 8, steps, 1, 1
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """2 steps of configs/tiny.py from an init checkpoint folder (steps 1 and 2 saved)."""
    root = tmp_path_factory.mktemp("run")
    write_synthetic(str(root / "data"), "train", 8)
    model = load_config(tiny.get_config().model)
    save_converted(str(root / "init"), model, init_params(model, seed=3))
    trainer.train(_train_config(f"{root / 'data'}:train", root / "init", 2), str(root / "run"))
    return root


@functools.lru_cache(maxsize=2)
def _apply(config):
    return jax.jit(CnC(config).apply)


def _eps(config, params):
    """The CnC eps of fixed inputs (one compile per config)."""
    rng = np.random.default_rng(0)
    latent, side = config.latent_size, config.latent_size * config.vae.downsample_factor
    dim = config.unet.context_dim
    x = rng.standard_normal((1, latent, latent, 4)).astype(np.float32)
    context = rng.standard_normal((1, config.text_encoder.max_position_embeddings, dim)).astype(np.float32)
    depth = rng.uniform(size=(1, side, side, 3)).astype(np.float32)
    emb = rng.standard_normal((1, dim)).astype(np.float32)
    mask = (rng.uniform(size=(1, side, side, 1)) > 0.5).astype(np.float32)
    model_params = {k: params[k] for k in ("unet", "local_fuser", "global_fuser")}
    return np.asarray(_apply(config)({"params": model_params}, x, np.array([500]), context, depth,
                                                 depth[..., ::-1], emb, -emb, mask))


def test_run_exports_as_official_and_reads_back(tiny_run, tmp_path, capsys):
    run_dir = tiny_run / "run"
    info = json.loads((run_dir / RUN_INFO).read_text())
    assert info["init_checkpoint"] == str(tiny_run / "init") and info["sd_locked"] is False
    config, params, meta = load_run(str(run_dir))
    assert meta["step"] == 2
    init_config, init = load_converted(str(tiny_run / "init"))
    assert config == init_config
    trained, frozen = split_params(config, params, sd_locked=False)
    assert_trees_equal(frozen, split_params(config, init, sd_locked=False)[1])  # frozen = the init checkpoint's
    before = flatten_dict(init)
    assert any(not np.array_equal(v, before[k]) for k, v in flatten_dict(trained).items())  # training moved these
    out = tmp_path / "run.ckpt"
    # configs/tiny.py trains the tiny preset, which the official code cannot build (tests/test_official_export.py)
    code, _, err = run(capsys, "export", run_dir, "--out", out, "--format", "official", "--allow-unofficial")
    assert code == 0, err
    assert load_raw(out)["global_step"] == 2  # the step exported, as Lightning checkpoints record it
    back = load_official_params(str(out), config)
    assert_trees_equal(back, params)
    np.testing.assert_array_equal(_eps(config, back), _eps(config, params))
    # an earlier step, and train.py's init_checkpoint taking the run folder directly
    _, step1, _ = load_run(str(run_dir), 1)
    assert any(not np.array_equal(v, flatten_dict(step1)[k]) for k, v in flatten_dict(params).items())
    _, started, _ = starting_params("", str(run_dir), False, 0)
    assert_trees_equal(started, params)


def test_official_global_step_is_the_step_exported(tiny_run, tmp_path, capsys):
    """A run folder's --step (or its latest); a converted folder's recorded step (an `export --format cnc` of a run
    records the step it exported); 0 for a folder that records none."""
    run_dir, unofficial = tiny_run / "run", "--allow-unofficial"
    code, _, err = run(capsys, "export", run_dir, "--out", tmp_path / "step1.ckpt", "--format", "official", "--step", 1,
                       unofficial)
    assert code == 0, err
    code, _, err = run(capsys, "export", run_dir, "--out", tmp_path / "cnc", "--format", "cnc")
    assert code == 0, err
    assert json.loads((tmp_path / "cnc" / "config.json").read_text())["step"] == 2
    code, _, err = run(capsys, "export", tmp_path / "cnc", "--out", tmp_path / "from_cnc.ckpt", "--format", "official",
                       unofficial)
    assert code == 0, err
    code, _, err = run(capsys, "export", tiny_run / "init", "--out", tmp_path / "init.ckpt", "--format", "official",
                       unofficial)
    assert code == 0, err
    steps = {name: load_raw(tmp_path / f"{name}.ckpt")["global_step"] for name in ("step1", "from_cnc", "init")}
    assert steps == {"step1": 1, "from_cnc": 2, "init": 0}
    assert set(load_raw(tmp_path / "init.ckpt")) == {"state_dict", "global_step"}


def test_run_exports_as_diffusers_and_cnc(tiny_run, tmp_path, capsys):
    run_dir = tiny_run / "run"
    config, params = load_weights(str(run_dir))
    for fmt in ("diffusers", "cnc"):
        code, _, err = run(capsys, "export", run_dir, "--out", tmp_path / fmt, "--format", fmt)
        assert code == 0, err
    assert sorted(os.listdir(tmp_path / "diffusers")) == ["global_fuser", "local_fuser", "model_index.json",
                                                          "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    # the run's byte-level tokenizer travels with it (model_index.json names it)
    for folder in ("diffusers", "cnc"):
        back_config, back = load_weights(str(tmp_path / folder))
        assert back_config == config, folder
        assert_trees_equal(back, params)


def test_sample_from_the_run_folder(tiny_run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "depth.npy", rng.uniform(size=(64, 64)).astype(np.float32))
    np.save(tmp_path / "emb.npy", rng.standard_normal(32).astype(np.float32))
    from PIL import Image

    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "samples"
    code = sample.main(["--checkpoint", str(tiny_run / "run"), "--prompt", "a ball", "--size", "64", "--steps", "2",
                        "--fg-depth", str(tmp_path / "depth.npy"), "--bg-depth", str(tmp_path / "depth.npy"),
                        "--mask", str(tmp_path / "mask.png"), "--fg-emb", str(tmp_path / "emb.npy"),
                        "--bg-emb", str(tmp_path / "emb.npy"), "--name", "ball", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    job = json.loads((out / "ball" / "job.json").read_text())
    assert job["checkpoint"] == str(tiny_run / "run")
    image = np.asarray(Image.open(out / "ball" / "00000.png" if (out / "ball" / "00000.png").exists()
                                  else sorted((out / "ball").glob("*.png"))[0]))
    assert image.shape[:2] == (64, 64)


def _run_copy(tiny_run, tmp_path, **info_changes):
    copy = tmp_path / "run_copy"
    shutil.copytree(tiny_run / "run", copy)
    info = json.loads((copy / RUN_INFO).read_text())
    info.update(info_changes)
    (copy / RUN_INFO).write_text(json.dumps(info))
    return copy


def test_run_folder_errors(tiny_run, tmp_path, capsys):
    out = tmp_path / "out" / "x.ckpt"
    code, _, err = run(capsys, "export", tiny_run / "run", "--out", out, "--format", "official", "--step", "7")
    one_error(code, err)
    assert "no checkpoint of step 7 (saved steps: 1, 2)" in err

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "run" / RUN_INFO, empty / RUN_INFO)
    code, _, err = run(capsys, "export", empty, "--out", out, "--format", "official")
    one_error(code, err)
    assert "no training checkpoint" in err

    moved = _run_copy(tiny_run, tmp_path, init_checkpoint=str(tmp_path / "gone"))
    code, _, err = run(capsys, "export", moved, "--out", out, "--format", "official")
    one_error(code, err)
    assert f"init checkpoint {tmp_path / 'gone'} does not exist" in err
    shutil.rmtree(moved)

    model = load_config(tiny.get_config().model)
    save_converted(str(tmp_path / "other_init"), model, init_params(model, seed=4))
    changed = _run_copy(tiny_run, tmp_path, init_checkpoint=str(tmp_path / "other_init"))
    code, _, err = run(capsys, "export", changed, "--out", out, "--format", "official")
    one_error(code, err)
    assert "differ from those the run trained with" in err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_random_init_run_rebuilds_its_frozen_weights_from_the_seed(tiny_run, tmp_path):
    """configs/tiny.py runs start from random weights: the frozen ones come back from the recorded seed (the init
    folder of `tiny_run` holds init_params(seed=3), so the recorded fingerprint is that of seed 3)."""
    _, expected, _ = load_run(str(tiny_run / "run"))
    seeded = _run_copy(tiny_run, tmp_path, init_checkpoint="", random_init=True, seed=3)
    _, params, _ = load_run(str(seeded))
    assert_trees_equal(params, expected)
    shutil.rmtree(seeded)
    other = _run_copy(tiny_run, tmp_path, init_checkpoint="", random_init=True, seed=4)
    with pytest.raises(ValueError, match=r"random init \(seed 4\) differ from those the run trained with"):
        load_run(str(other))


@pytest.mark.parametrize("name", ["local", "global"])
def test_fp16_export_reproduces_the_fuser_checkpoints(ref_dir, name):
    """tiny_local/global.ckpt keep float16 parameters and float32/int64 buffers: `--dtype float16` writes exactly
    that state dict (every key of the official mode-local / mode-global model)."""
    from cnc_jax.checkpoint import official_state_dict
    from cnc_jax.model_config import config_from_official_yaml

    config = config_from_official_yaml(str(ref_dir / f"tiny_{name}_config.yaml"))
    theirs = arrays(ref_dir / f"tiny_{name}.ckpt")
    assert_identical(official_state_dict(config, load_official_params(theirs, config), "float16"), theirs)
