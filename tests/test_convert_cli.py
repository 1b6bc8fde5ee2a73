"""convert_torch_weights.py end to end: convert, misfit reports, hostile pickles, init-global/-local, integrate."""

import json
import os
import pickle
import struct

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnc_jax.checkpoint import load_converted, load_official_params
from cnc_jax.cli import convert as convert_cli
from cnc_jax.model_config import config_from_official_yaml
from cnc_jax.models.cnc import CnC
from cnc_jax.torchfile.state_dict import load_state_dict
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw, run_main
from tests.torch_files import Call, Raw, save_torch_zip


def run(capsys, *argv):
    return run_main(convert_cli.main, capsys, *argv)


def numpy_state_dict(path, keep=lambda k: True):
    return {k: v.numpy() for k, v in load_state_dict(path).items() if keep(k)}


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_convert_tiny_cnc_with_yaml_and_reuse(tmp_path, capsys, ref_dir, ref):
    out = tmp_path / "cnc"
    code, stdout, err = run(capsys, "convert", ref_dir / "tiny_cnc.ckpt", "--config",
                            ref_dir / "tiny_cnc_config.yaml", "--out", out)
    assert code == 0, err
    assert "wrote" in stdout
    info = json.loads((out / "config.json").read_text())
    assert info["model"]["mode"] == "cnc" and info["parts"] == sorted(
        ["unet", "local_fuser", "global_fuser", "vae", "text_encoder"])
    config, params = load_converted(str(out))
    assert config == config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    assert_trees_equal(params, load_official_params(ref_dir / "tiny_cnc.safetensors", config))
    # the converted checkpoint reproduces the official eps
    r = ref("cnc_apply_model")
    eps = jax.jit(CnC(config).apply)(
        {"params": {k: params[k] for k in ("unet", "local_fuser", "global_fuser")}}, nchw_to_nhwc(r["x_noisy"]),
        r["t"], r["context"], nchw_to_nhwc(r["fg_depth"]), nchw_to_nhwc(r["bg_depth"]), r["fg_emb"], r["bg_emb"],
        nchw_to_nhwc(r["mask"]), global_strength=r["global_strength_gs1"])
    check_parity("converted checkpoint", "eps_gs1", nhwc_to_nchw(eps), r["eps_gs1"])
    # an existing output is never overwritten without --force
    code, _, err = run(capsys, "convert", ref_dir / "tiny_cnc.ckpt", "--config", ref_dir / "tiny_cnc_config.yaml",
                       "--out", out)
    assert code == 2 and "already exists" in err


def test_wrong_config_lists_every_mismatch_and_writes_nothing(tmp_path, capsys, ref_dir):
    out = tmp_path / "x"
    code, _, err = run(capsys, "convert", ref_dir / "tiny_cnc.ckpt", "--config", "cnc_v1", "--out", out)
    assert code == 2
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "does not fit the model config" in err and "mis-shaped" in err
    key = "model.diffusion_model.input_blocks.0.0.weight"
    theirs = tuple(load_state_dict(ref_dir / "tiny_cnc.ckpt")[key].shape)
    assert f"{key}: checkpoint {theirs} vs config (320, 4, 3, 3)" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_another_size_without_config_suggests_config_instead_of_listing_keys(tmp_path, capsys, ref_dir):
    """The detected full-size preset cannot fit a smaller model: one line that names --config, not every key."""
    out = tmp_path / "x"
    code, _, err = run(capsys, "convert", ref_dir / "tiny_cnc.ckpt", "--out", out)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error:") and "pass --config" in line and "mis-shaped" in line and "cnc" in line, line
    assert not out.exists() and os.listdir(tmp_path) == []


def test_fp16_checkpoints_convert_to_float32(tmp_path, capsys, ref_dir):
    for name, yaml in (("tiny_local.ckpt", "tiny_local_config.yaml"), ("tiny_global.ckpt", "tiny_global_config.yaml")):
        out = tmp_path / name
        code, _, err = run(capsys, "convert", ref_dir / name, "--config", ref_dir / yaml, "--out", out)
        assert code == 0, err
        _, params = load_converted(str(out))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}


def test_os_system_in_a_checkpoint_never_runs(tmp_path, capsys, ref_dir):
    marker = tmp_path / "pwned"
    evil = Call("os", "system", (f"touch {marker}",))
    weights = numpy_state_dict(ref_dir / "tiny_local.ckpt")

    # 1) the state_dict itself is an os.system call: a clear conversion error
    save_torch_zip(tmp_path / "evil_state_dict.ckpt", {"state_dict": evil, "global_step": 3})
    code, _, err = run(capsys, "convert", tmp_path / "evil_state_dict.ckpt", "--config",
                       ref_dir / "tiny_local_config.yaml", "--out", tmp_path / "out1")
    assert code == 2 and "os.system" in err and "NOT executed" in err
    assert not marker.exists() and not (tmp_path / "out1").exists()

    # 2) an extra top-level entry calls os.system: ignored, the weights convert, nothing runs
    save_torch_zip(tmp_path / "evil_extra.ckpt", {"state_dict": weights, "evil": evil})
    code, _, err = run(capsys, "convert", tmp_path / "evil_extra.ckpt", "--config",
                       ref_dir / "tiny_local_config.yaml", "--out", tmp_path / "out2")
    assert code == 0, err
    assert not marker.exists()
    _, params = load_converted(str(tmp_path / "out2"))
    assert_trees_equal(params, load_official_params(
        ref_dir / "tiny_local.ckpt", config_from_official_yaml(str(ref_dir / "tiny_local_config.yaml"))))


def test_ema_weights_used_only_on_request(tmp_path, capsys, ref_dir):
    sd_keys = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    weights = numpy_state_dict(ref_dir / "tiny_local.ckpt", lambda k: k.startswith(sd_keys))
    ema = {"model_ema." + k[len("model."):].replace(".", ""): (2 * v).astype(v.dtype)
           for k, v in weights.items() if k.startswith("model.diffusion_model.")}
    ema["model_ema.decay"] = np.array(0.9999, np.float32)
    save_torch_zip(tmp_path / "sd.ckpt", {"state_dict": {**weights, **ema}})
    yaml = ref_dir / "tiny_local_config.yaml"
    config = config_from_official_yaml(str(yaml))
    # a mode-'sd' view of the tiny config: same UNet / VAE / text, no adapters
    sd_config = type(config)(mode="sd", unet=config.unet, vae=config.vae, text_encoder=config.text_encoder,
                             diffusion=config.diffusion, latent_size=config.latent_size)
    (tmp_path / "sd.json").write_text(sd_config.to_json())
    for flag, factor in (((), 1), (("--ema",), 2)):
        out = tmp_path / f"out{factor}"
        code, _, err = run(capsys, "convert", tmp_path / "sd.ckpt", "--config", tmp_path / "sd.json", "--out", out,
                           *flag)
        assert code == 0, err
        _, params = load_converted(str(out))
        kernel = params["unet"]["conv_in"]["kernel"]
        source = weights["model.diffusion_model.input_blocks.0.0.weight"].astype(np.float32).transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(kernel, factor * source)


@pytest.fixture(scope="module")
def sd_only_checkpoint(tmp_path_factory, ref_dir):
    """An SD-style checkpoint: the UNet / VAE / text weights of tiny_local.ckpt, no adapters."""
    path = tmp_path_factory.mktemp("sd") / "sd.ckpt"
    keep = lambda k: not k.startswith("local_adapter.")
    save_torch_zip(path, {"state_dict": numpy_state_dict(ref_dir / "tiny_local.ckpt", keep)})
    return path


def test_init_global_then_integrate(tmp_path, capsys, ref_dir, sd_only_checkpoint):
    code, _, err = run(capsys, "init-global", sd_only_checkpoint, "--config", ref_dir / "tiny_global_config.yaml",
                       "--out", tmp_path / "g")
    assert code == 0, err
    gcfg, gparams = load_converted(str(tmp_path / "g"))
    local_cfg = config_from_official_yaml(str(ref_dir / "tiny_local_config.yaml"))
    local = load_official_params(ref_dir / "tiny_local.ckpt", local_cfg)
    for part in ("unet", "vae", "text_encoder"):
        assert_trees_equal(gparams[part], local[part])
    fresh = flatten_dict(gparams["global_fuser"])
    assert all(np.any(v != 0) for k, v in fresh.items() if k[-1] == "kernel")

    code, _, err = run(capsys, "convert", ref_dir / "tiny_local.ckpt", "--config", ref_dir / "tiny_local_config.yaml",
                       "--out", tmp_path / "l")
    assert code == 0, err
    code, _, err = run(capsys, "integrate", tmp_path / "l", tmp_path / "g", "--out", tmp_path / "cnc")
    assert code == 0, err
    config, params = load_converted(str(tmp_path / "cnc"))
    assert config.mode == "cnc"
    assert_trees_equal(params["local_fuser"], local["local_fuser"])
    assert_trees_equal(params["global_fuser"], gparams["global_fuser"])
    assert_trees_equal(params["unet"], local["unet"])


def test_integrate_refuses_different_sd_weights(tmp_path, capsys, ref_dir):
    code, _, err = run(capsys, "integrate", ref_dir / "tiny_local.ckpt", ref_dir / "tiny_global.ckpt",
                       "--local-config", ref_dir / "tiny_local_config.yaml",
                       "--global-config", ref_dir / "tiny_global_config.yaml", "--out", tmp_path / "cnc")
    assert code == 2 and "shared weights differ" in err and "unet/conv_in/kernel" in err
    assert not (tmp_path / "cnc").exists()


def test_init_local_from_uni_and_from_sd(tmp_path, capsys, ref_dir, sd_only_checkpoint):
    local_sd = numpy_state_dict(ref_dir / "tiny_local.ckpt")
    # a Uni-ControlNet-like source: same local_adapter names except its own feature extractor and no FDN
    uni = {k: v for k, v in local_sd.items() if not (k.startswith("local_adapter.") and (
        k.startswith("local_adapter.feature_extractor.") or ".norm_in." in k or ".norm_out." in k))}
    uni["local_adapter.feature_extractor.pre_extractor.0.weight"] = np.zeros((16, 21, 3, 3), np.float16)
    save_torch_zip(tmp_path / "uni.ckpt", {"state_dict": uni})
    yaml = ref_dir / "tiny_local_config.yaml"
    code, stdout, err = run(capsys, "init-local", tmp_path / "uni.ckpt", "--config", yaml, "--out", tmp_path / "l")
    assert code == 0, err
    assert "local_fuser/feature_extractor/fg_conv_0/kernel" in stdout and "norm_in/conv_gamma" in stdout
    _, params = load_converted(str(tmp_path / "l"))
    reference = load_official_params(ref_dir / "tiny_local.ckpt", config_from_official_yaml(str(yaml)))
    lf, ref_lf = flatten_dict(params["local_fuser"]), flatten_dict(reference["local_fuser"])
    np.testing.assert_array_equal(lf[("input_1_res", "conv_in", "kernel")], ref_lf[("input_1_res", "conv_in", "kernel")])
    np.testing.assert_array_equal(lf[("zero_conv_3", "kernel")], ref_lf[("zero_conv_3", "kernel")])
    assert not np.any(lf[("feature_extractor", "zero_conv_0", "kernel")])  # fresh zero conv is zero
    assert np.any(lf[("feature_extractor", "fg_conv_0", "kernel")])

    # from plain SD weights: the local fuser's encoder is a copy of the UNet encoder (ControlNet-style)
    code, _, err = run(capsys, "init-local", sd_only_checkpoint, "--config", yaml, "--out", tmp_path / "l2")
    assert code == 0, err
    _, params = load_converted(str(tmp_path / "l2"))
    np.testing.assert_array_equal(params["local_fuser"]["input_2_res"]["conv_in"]["kernel"],
                                  params["unet"]["input_2_res"]["conv_in"]["kernel"])
    assert not np.any(params["local_fuser"]["zero_conv_0"]["kernel"])


def test_bad_inputs_give_one_clear_error(tmp_path, capsys, ref_dir):
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    cases = [
        (("convert", tmp_path / "missing.ckpt"), "missing.ckpt"),
        (("convert", tmp_path / "garbage.ckpt"), "garbage.ckpt"),
        (("convert", ref_dir / "tiny_cnc.ckpt", "--config", "no_such_preset"), "neither a preset"),
    ]
    for argv, expected in cases:
        code, _, err = run(capsys, *argv, "--out", tmp_path / "out")
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_a_file_that_gave_memory_error_is_one_error_line(tmp_path, capsys):
    """A memo index of 2**32 - 1 made the C unpickler grow its memo to 2**33 slots: a bare MemoryError and
    a traceback. Now the pickle is checked first."""
    src = tmp_path / "huge_memo.ckpt"
    save_torch_zip(src, {"state_dict": Raw(pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1))})
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", src, "--out", out)
    assert code == 2
    assert err.count("error:") == 1 and "Traceback" not in err and "MemoryError" not in err
    assert f"error: {src}: refusing the pickle: memo index 4294967295" in err
    assert not out.exists()
