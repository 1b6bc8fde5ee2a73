"""diffusers folders in and out: tiny_diffusers parity, full-size SD 1.5 (inpainting) schema, round trips, errors,
and the exported tokenizer as transformers (local files only) reads it."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file
from transformers import CLIPTokenizer, CLIPTokenizerFast

from cnc_jax.checkpoint import RUN_INFO, config_from_diffusers, load_converted, load_official_params, names
from cnc_jax.checkpoint import diffusers_names as dn
from cnc_jax.checkpoint.convert import plan_conversion
from cnc_jax.checkpoint.diffusers import unet_config_json, vae_config_json
from cnc_jax.checkpoint.run_folder import RUN_FORMAT
from cnc_jax.cli import convert as convert_cli
from cnc_jax.model_config import config_from_official_yaml, sd15
from cnc_jax.models.build import abstract_params, count_params
from cnc_jax.models.clip_text import CLIPTextTransformer
from cnc_jax.models.unet import UNet
from cnc_jax.models.vae import AutoencoderKL, DiagonalGaussian
from cnc_jax.prep.inpaint import inpainting_config
from cnc_jax.prep.tiny_models import write_tiny_models
from cnc_jax.text_encoder import byte_level_tokenizer, load_tokenizer, tokenize
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw, run_main

TOL = 1e-5
FILES = {part: f"{part}/{file}" for part, (_, _, file) in dn.PARTS.items()}


def run(capsys, *argv):
    return run_main(convert_cli.main, capsys, *argv)


@pytest.fixture(scope="module")
def converted(ref_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusers") / "tiny_sd"
    assert convert_cli.main(["convert", str(ref_dir / "tiny_diffusers"), "--out", str(out)]) == 0
    return out


def test_converted_diffusers_matches_diffusers_outputs(converted, ref, ref_dir):
    config, params = load_converted(str(converted))
    assert config.mode == "sd"
    # the same weights as the official checkpoint diffusers converted them from
    official = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    assert config.unet == official.unet and config.vae == official.vae and config.text_encoder == official.text_encoder
    from_ckpt = load_official_params(ref_dir / "tiny_cnc.ckpt", config, skip_other_parts=True)
    for path, value in flatten_dict(from_ckpt).items():
        np.testing.assert_array_equal(flatten_dict(params)[path], value, err_msg="/".join(path))
    r = ref("diffusers_sd")
    eps = jax.jit(UNet(config.unet).apply)({"params": params["unet"]}, nchw_to_nhwc(r["unet_x"]), r["unet_t"],
                                            r["unet_context"])
    check_parity("diffusers", "unet_eps", nhwc_to_nchw(eps), r["unet_eps"], TOL)
    vae = AutoencoderKL(config.vae)
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(
        params["vae"], nchw_to_nhwc(r["vae_z"]))
    check_parity("diffusers", "vae_decoded", nhwc_to_nchw(decoded), r["vae_decoded"], TOL)
    moments = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(
        params["vae"], nchw_to_nhwc(r["vae_image"]))
    check_parity("diffusers", "vae_posterior_mean", nhwc_to_nchw(DiagonalGaussian.from_moments(moments).mean),
                 r["vae_posterior_mean"], TOL)
    hidden = jax.jit(CLIPTextTransformer(config.text_encoder).apply)({"params": params["text_encoder"]},
                                                                      r["text_ids"])
    check_parity("diffusers", "text_hidden", hidden, r["text_hidden"], TOL)


def test_diffusers_round_trip_is_identical(converted, ref_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    code, _, err = run(capsys, "export", converted, "--out", out, "--format", "diffusers")
    assert code == 0, err
    source = ref_dir / "tiny_diffusers"
    for part, file in FILES.items():
        theirs, ours = load_file(str(source / file)), load_file(str(out / file))
        assert ours.keys() == theirs.keys(), part
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype, key
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
        assert json.loads((out / part / "config.json").read_text()) == json.loads(
            (source / part / "config.json").read_text()), part
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["tokenizer"] == [None, None]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    config = config_from_diffusers(str(source))
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == (
        config.diffusion.linear_start, config.diffusion.linear_end, config.diffusion.timesteps)
    assert config_from_diffusers(str(out)) == config  # and it reads back (model_index.json detection)


def _fake(shapes: dict) -> dict:
    return {k: types.SimpleNamespace(shape=tuple(v)) for k, v in shapes.items()}


@pytest.mark.parametrize("unet_key", ["unet", "unet_inpainting"])
def test_full_size_schema_maps_onto_the_presets_and_back(ref_dir, unet_key):
    with open(ref_dir / "schema_diffusers_sd15.json") as f:
        schema = json.load(f)
    config = inpainting_config() if unet_key == "unet_inpainting" else sd15()
    target = abstract_params(config)  # shapes only
    assert {k: v for k, v in unet_config_json(config).items() if k in schema["unet_config"]} == schema["unet_config"]
    assert {k: v for k, v in vae_config_json(config).items() if k in schema["vae_config"]} == schema["vae_config"]
    for part, key in (("unet", unet_key), ("vae", "vae"), ("text_encoder", "text_encoder")):
        diffusers_keys = schema[key]
        official = {}
        for name, shape in diffusers_keys.items():
            mapped = dn.to_official(config, part, name)
            assert mapped is not None, name
            official[mapped] = shape + [1, 1] if dn.is_vae_linear(part, name) else shape
        plan, report = plan_conversion(_fake(official), {part: target[part]})
        assert report.ok, report.format(key)
        assert len(plan) == len(diffusers_keys) == len(flatten_dict({part: target[part]}))
        assert count_params(target[part]) == sum(int(np.prod(s)) for s in diffusers_keys.values())
        keys, unmapped = names.official_keys(plan)  # and back: ours -> official -> diffusers
        assert not unmapped
        assert sorted(dn.to_diffusers(config, part, keys[p]) for p in plan) == sorted(diffusers_keys)
    print(f"schema_diffusers_sd15 {unet_key}: unet {count_params(target['unet']):,}, vae "
          f"{count_params(target['vae']):,}, text {count_params(target['text_encoder']):,} parameters")


def _copy(ref_dir, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(ref_dir / "tiny_diffusers", folder)
    return folder


def test_a_missing_part_is_one_error(ref_dir, tmp_path, capsys):
    folder = _copy(ref_dir, tmp_path)
    shutil.rmtree(folder / "vae")
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", folder, "--out", out)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "vae/" in err and not out.exists()
    os.remove(folder / FILES["unet"])  # a missing weights file names the file
    shutil.copytree(ref_dir / "tiny_diffusers" / "vae", folder / "vae")
    code, _, err = run(capsys, "convert", folder, "--out", out)
    assert code == 2 and err.count("error:") == 1 and "unet/diffusion_pytorch_model.safetensors: missing" in err
    assert not out.exists()


def test_a_tensor_of_another_shape_is_named(ref_dir, tmp_path, capsys):
    folder = _copy(ref_dir, tmp_path)
    tensors = load_file(str(folder / FILES["unet"]))
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :3]
    del tensors["conv_out.bias"]
    save_file(tensors, str(folder / FILES["unet"]))
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", folder, "--out", out)
    assert code == 2 and err.count("error:") == 1
    conv_in = tensors["conv_in.weight"].shape
    assert f"unet/diffusion_pytorch_model.safetensors: conv_in.weight: file {conv_in}" in err
    assert "unet/diffusion_pytorch_model.safetensors: conv_out.bias" in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["sd"]


def test_text_encoder_keys_without_text_model_prefix(ref_dir, tmp_path, converted):
    folder = _copy(ref_dir, tmp_path)
    tensors = load_file(str(folder / FILES["text_encoder"]))
    save_file({k[len("text_model."):]: v for k, v in tensors.items()}, str(folder / FILES["text_encoder"]))
    from cnc_jax.checkpoint import load_weights

    _, params = load_weights(str(folder))
    _, expected = load_converted(str(converted))
    for path, value in flatten_dict(expected["text_encoder"]).items():
        np.testing.assert_array_equal(flatten_dict(params["text_encoder"])[path], value)


def test_init_global_and_init_local_take_a_diffusers_folder(ref_dir, tmp_path, capsys, converted):
    _, sd = load_converted(str(converted))
    for command, yaml in (("init-global", "tiny_global_config.yaml"), ("init-local", "tiny_local_config.yaml")):
        out = tmp_path / command
        code, _, err = run(capsys, command, ref_dir / "tiny_diffusers", "--config", ref_dir / yaml, "--out", out)
        assert code == 0, err
        _, params = load_converted(str(out))
        for part in ("unet", "vae", "text_encoder"):
            for path, value in flatten_dict(sd[part]).items():
                np.testing.assert_array_equal(flatten_dict(params[part])[path], value, err_msg=f"{command} {path}")


def test_an_inpainting_folder_loads_for_prepare_background(ref_dir, tmp_path):
    """A 9-channel diffusers UNet (SD 1.5 inpainting's layout) written, read back and taken by the inpainter."""
    import dataclasses

    from cnc_jax.checkpoint.diffusers import write_diffusers
    from cnc_jax.models.build import init_params
    from cnc_jax.prep.inpaint import Inpainter
    from cnc_jax.text_encoder import byte_level_tokenizer

    tiny = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    config = inpainting_config(dataclasses.replace(tiny, mode="sd", local_fuser=None, global_fuser=None))
    params = init_params(config, seed=0)
    folder = tmp_path / "inpainting"
    write_diffusers(str(folder), config, params)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert load_file(str(folder / FILES["unet"]))["conv_in.weight"].shape[1] == 9
    inpainter = Inpainter.from_checkpoint(str(folder), byte_level_tokenizer(), steps=1)
    assert inpainter.config == config


# ---- the tokenizer travels -------------------------------------------------------------------------------------

PROMPTS = ["a red ball on a wooden table", "Ünïcödé straße, 東京の猫 🐱 — naïve café", "", "a long prompt " * 9]


def _one_error(code, err):
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err


def _export(capsys, src, out, *tokenizer):
    code, stdout, err = run(capsys, "export", src, "--out", out, "--format", "diffusers", *tokenizer)
    assert code == 0, err
    return stdout


def _assert_tokenizer_travelled(export, ours, tmp_path):
    """export/tokenizer loads in CLIPTokenizer and CLIPTokenizerFast (transformers, local files only), from both
    layouts, with model_max_length = the text encoder's positions, and tokenizes as diffusers does (padding to
    model_max_length) to our ids."""
    index = json.loads((export / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    positions = json.loads((export / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    expected = tokenize(ours, PROMPTS, positions)
    legacy = tmp_path / "legacy_layout"  # what transformers 4's python CLIPTokenizer reads
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(export / "tokenizer" / name, legacy / name)
    for folder, cls in ((export / "tokenizer", CLIPTokenizer), (export / "tokenizer", CLIPTokenizerFast),
                        (legacy, CLIPTokenizer)):
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
        assert tokenizer.model_max_length == positions, (folder, cls)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        np.testing.assert_array_equal(np.asarray(ids["input_ids"]), expected, err_msg=f"{folder} {cls.__name__}")


def test_the_byte_level_tokenizer_travels(converted, tmp_path, capsys):
    stdout = _export(capsys, converted, tmp_path / "sd", "--tokenizer", "byte_level")
    assert "tokenizer=None" not in stdout
    _assert_tokenizer_travelled(tmp_path / "sd", byte_level_tokenizer(), tmp_path)


def test_a_transformers5_tokenizer_folder_travels(converted, ref_dir, tmp_path, capsys):
    """tokenizer.json + tokenizer_config.json only (save_pretrained of transformers 5), with transformers'
    unlimited model_max_length, which diffusers cannot pad to."""
    source = tmp_path / "tok5"
    CLIPTokenizer(vocab=byte_level_tokenizer().get_vocab(), merges=[]).save_pretrained(str(source))
    assert sorted(os.listdir(source)) == ["tokenizer.json", "tokenizer_config.json"]
    text = json.loads((ref_dir / "tiny_diffusers" / "text_encoder" / "config.json").read_text())
    assert json.loads((source / "tokenizer_config.json").read_text())["model_max_length"] > \
        text["max_position_embeddings"]
    _export(capsys, converted, tmp_path / "sd", "--tokenizer", source)
    _assert_tokenizer_travelled(tmp_path / "sd", load_tokenizer(str(source)), tmp_path)


def test_the_tiny_models_tokenizer_travels_with_the_tiny_models(tmp_path, capsys):
    """python -m cnc_jax.cli.prepare tiny-models: its sd_inpaint exported with its tokenizer/."""
    paths = write_tiny_models(str(tmp_path / "tiny_models"))
    _export(capsys, paths["sd_inpaint"], tmp_path / "sd", "--tokenizer", paths["tokenizer"])
    _assert_tokenizer_travelled(tmp_path / "sd", load_tokenizer(paths["tokenizer"]), tmp_path)


def test_a_run_exports_the_tokenizer_it_trained_with(tmp_path):
    """run_model.json's tokenizer (byte_level, or a folder that still exists) unless --tokenizer says otherwise."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for recorded, expected in (("byte_level", "byte_level"), (str(tmp_path), str(tmp_path)),
                               (str(tmp_path / "gone"), None), ("", None)):
        (run_dir / RUN_INFO).write_text(json.dumps({"format": RUN_FORMAT, "tokenizer": recorded}))
        assert convert_cli.export_tokenizer(str(run_dir), None) == expected, recorded
        assert convert_cli.export_tokenizer(str(run_dir), "given") == "given"
    assert convert_cli.export_tokenizer(str(tmp_path), None) is None  # not a run folder


def test_an_export_without_tokenizer_says_how_to_prompt(converted, tmp_path, capsys):
    stdout = _export(capsys, converted, tmp_path / "sd")
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["tokenizer"] == [None, None]
    assert not (tmp_path / "sd" / "tokenizer").exists()
    advice = [line for line in stdout.splitlines() if "tokenizer=None" in line]
    assert len(advice) == 1 and "prompt_embeds" in advice[0] and "--tokenizer" in advice[0], stdout


def test_tokenizer_files_go_into_the_export(converted, ref_dir, tmp_path, capsys):
    """vocab.json + merges.txt (the hub's SD 1.5 layout) are copied and completed; bad folders are one error."""
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    vocab = byte_level_tokenizer().get_vocab()
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    _export(capsys, converted, tmp_path / "sd", "--tokenizer", tokenizer)
    assert sorted(os.listdir(tmp_path / "sd" / "tokenizer")) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert json.loads((tmp_path / "sd" / "tokenizer" / "vocab.json").read_text()) == vocab
    _assert_tokenizer_travelled(tmp_path / "sd", byte_level_tokenizer(), tmp_path)

    os.remove(tokenizer / "merges.txt")
    code, _, err = run(capsys, "export", converted, "--out", tmp_path / "sd2", "--format", "diffusers",
                       "--tokenizer", tokenizer)
    _one_error(code, err)
    assert "merges.txt" in err and "tokenizer.json" in err and not (tmp_path / "sd2").exists()
    (tokenizer / "tokenizer.json").write_text("{not json")
    code, _, err = run(capsys, "export", converted, "--out", tmp_path / "sd2", "--format", "diffusers",
                       "--tokenizer", tokenizer)
    _one_error(code, err)
    assert "cannot read" in err and not (tmp_path / "sd2").exists()
    os.remove(tokenizer / "tokenizer.json")
    vocab_size = json.loads((ref_dir / "tiny_diffusers" / "text_encoder" / "config.json").read_text())["vocab_size"]
    (tokenizer / "vocab.json").write_text(json.dumps({**vocab, **{f"w{i}</w>": len(vocab) + i
                                                                  for i in range(vocab_size + 1 - len(vocab))}}))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    code, _, err = run(capsys, "export", converted, "--out", tmp_path / "sd2", "--format", "diffusers",
                       "--tokenizer", tokenizer)
    _one_error(code, err)
    assert f"only {vocab_size} ids" in err and not (tmp_path / "sd2").exists()
    code, _, err = run(capsys, "export", converted, "--out", tmp_path / "sd2", "--format", "diffusers",
                       "--tokenizer", tmp_path / "missing")
    _one_error(code, err)
    assert "missing" in err and not (tmp_path / "sd2").exists()
