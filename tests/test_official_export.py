"""export --format official: the model YAML (and CLIP text config) beside the .ckpt, read back by our own official-YAML
reader into the same config; a model the official code cannot build refused (or written with --allow-unofficial);
global_step in the .ckpt."""

import dataclasses
import json
import os

import pytest
import yaml

from cnc_jax.checkpoint import load_weights, save_converted
from cnc_jax.checkpoint.official_yaml import official_build_problems, official_files
from cnc_jax.cli import convert as convert_cli
from cnc_jax.model_config import (PRESETS, CnCConfig, GlobalFuserConfig, TextEncoderConfig, config_from_official_yaml,
                                  load_config, load_text_config, tiny)
from cnc_jax.models.build import init_params
from cnc_jax.torchfile.state_dict import load_raw
from tests.conftest import run_main

OFFICIAL_TARGETS = {"cnc": ("models.local_global_fuser.CnCUNetModel", "models.local_global_fuser.LocalFuser",
                            "models.local_global_fuser.GlobalFuser"),
                    "local": ("models.local_fuser.LocalControlUNetModel", "models.local_fuser.LocalFuser", None),
                    "global": ("models.global_fuser.GlobalControlUNetModel", None, "models.global_fuser.GlobalFuser")}


def run(capsys, *argv):
    return run_main(convert_cli.main, capsys, *argv)


def one_error(code, err):
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def converted(ref_dir, tmp_path_factory):
    """{mode: converted folder} of the reference tiny cnc / local / global checkpoints and their official YAMLs."""
    root = tmp_path_factory.mktemp("official_export")
    folders = {}
    for mode in ("cnc", "local", "global"):
        folders[mode] = root / mode
        assert convert_cli.main(["convert", str(ref_dir / f"tiny_{mode}.ckpt"), "--config",
                                 str(ref_dir / f"tiny_{mode}_config.yaml"), "--out", str(folders[mode])]) == 0
    return folders


@pytest.mark.parametrize("mode", ["cnc", "local", "global"])
def test_the_yaml_beside_the_ckpt_reads_back_as_the_same_model(converted, ref_dir, tmp_path, capsys, mode):
    reference = config_from_official_yaml(str(ref_dir / f"tiny_{mode}_config.yaml"))
    assert reference.text_encoder != TextEncoderConfig()  # the reference tower is not ViT-L/14
    # another export's text config in the same folder must not be taken for this one's
    other = dataclasses.replace(reference.text_encoder, vocab_size=77, num_hidden_layers=1)
    (tmp_path / "other_clip_text_config.json").write_text(json.dumps(other.to_hf_dict()))
    ckpt = tmp_path / "model.ckpt"
    code, out, err = run(capsys, "export", converted[mode], "--out", ckpt, "--format", "official")
    assert code == 0, err
    assert "model.yaml" in out and "warning" not in err
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt", "model.yaml", "model_clip_text_config.json",
                                            "other_clip_text_config.json"]
    assert load_config(str(tmp_path / "model.yaml")) == reference == load_weights(str(converted[mode]))[0]
    assert load_text_config(str(tmp_path / "model_clip_text_config.json")) == reference.text_encoder
    text = json.loads((tmp_path / "model_clip_text_config.json").read_text())
    assert text["model_type"] == "clip_text_model" and text["vocab_size"] == reference.text_encoder.vocab_size
    # the official format: targets, mode, schedule, latent size, sections as configs/*.yaml has them
    ours = yaml.safe_load((tmp_path / "model.yaml").read_text())["model"]
    theirs = yaml.safe_load((ref_dir / f"tiny_{mode}_config.yaml").read_text())["model"]
    assert ours["target"] == theirs["target"] == "models.cnc.CnC"
    for key in ("mode", "linear_start", "linear_end", "timesteps", "image_size", "scale_factor", "channels",
                "conditioning_key", "use_ema"):
        assert ours["params"][key] == theirs["params"][key], key
    sections = ("unet_config", "local_control_config", "global_control_config")
    for section, target in zip(sections, OFFICIAL_TARGETS[mode]):
        assert (ours["params"][section]["target"] if section in ours["params"] else None) == target
        if target:  # the reference's keys and values; ours adds the official defaults it leaves out
            mine, ref = dict(ours["params"][section]["params"]), dict(theirs["params"][section]["params"])
            added = {k: mine.pop(k) for k in ("num_head_channels", "use_linear_in_transformer") if k in mine}
            assert added in ({}, {"num_head_channels": -1, "use_linear_in_transformer": False})
            assert mine.pop("use_checkpoint", True) is True and ref.pop("use_checkpoint", False) in (True, False)
            assert mine == ref, section
    assert ours["params"]["first_stage_config"]["params"]["ddconfig"] == \
        theirs["params"]["first_stage_config"]["params"]["ddconfig"]
    assert ours["params"]["cond_stage_config"] == theirs["params"]["cond_stage_config"]
    assert load_raw(ckpt)["global_step"] == 0


def test_a_vit_l_tower_is_named_and_needs_no_text_config(tmp_path):
    """The official presets carry CLIP ViT-L/14: the YAML names it (version), no JSON is written, and a stray
    `*clip_text_config.json` beside it is not taken for its tower."""
    (tmp_path / "stray_clip_text_config.json").write_text(json.dumps(tiny().text_encoder.to_hf_dict()))
    for name in ("cnc_v1", "local_fuser_v1", "global_fuser_v1", "sd15"):
        config = PRESETS[name]()
        files = official_files(str(tmp_path / f"{name}.ckpt"), config)
        assert list(files) == [str(tmp_path / f"{name}.yaml")]
        for path, content in files.items():
            with open(path, "wb") as f:
                f.write(content)
        assert load_config(str(tmp_path / f"{name}.yaml")) == config, name
        doc = yaml.safe_load(files[str(tmp_path / f"{name}.yaml")])["model"]
        assert doc["params"]["cond_stage_config"]["params"] == {"version": "openai/clip-vit-large-patch14"}
        assert doc["params"].get("mode") == {"sd15": None}.get(name, config.mode)  # the official CnC asserts a mode
        assert doc["target"] == ("ldm.models.diffusion.ddpm.LatentDiffusion" if name == "sd15" else "models.cnc.CnC")
        assert official_build_problems(config) == []


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_preset") / "tiny"
    save_converted(str(folder), tiny(), init_params(tiny(), seed=0))
    return folder


def test_the_tiny_preset_is_refused_and_written_on_request(tiny_preset, tmp_path, capsys):
    out = tmp_path / "out" / "tiny.ckpt"
    code, _, err = run(capsys, "export", tiny_preset, "--out", out, "--format", "official")
    one_error(code, err)
    assert "the official code (7aac519) cannot build this model" in err
    assert "local_fuser.inject_channels=[16, 32]: the official FeatureExtractor hard-codes 4 injection levels" in err
    assert "local_fuser.inject_layers=[1, 3]" in err and "--allow-unofficial" in err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []

    code, _, err = run(capsys, "export", tiny_preset, "--out", out, "--format", "official", "--allow-unofficial")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and "local_fuser.inject_channels" in warnings[0] and "error:" not in err
    assert sorted(os.listdir(tmp_path / "out")) == ["tiny.ckpt", "tiny.yaml", "tiny_clip_text_config.json"]
    assert load_config(str(tmp_path / "out" / "tiny.yaml")) == tiny()
    assert load_raw(out)["global_step"] == 0

    code, _, err = run(capsys, "export", tiny_preset, "--out", tmp_path / "x.safetensors", "--format", "safetensors",
                       "--allow-unofficial")
    one_error(code, err)
    assert "--allow-unofficial is for --format official" in err and not (tmp_path / "x.safetensors").exists()


def test_existing_files_beside_and_a_yaml_out_are_refused(converted, tmp_path, capsys):
    (tmp_path / "model.yaml").write_text("mine\n")
    code, _, err = run(capsys, "export", converted["cnc"], "--out", tmp_path / "model.ckpt", "--format", "official")
    one_error(code, err)
    assert "model.yaml already exists (pass --force" in err
    assert sorted(os.listdir(tmp_path)) == ["model.yaml"] and (tmp_path / "model.yaml").read_text() == "mine\n"
    code, _, err = run(capsys, "export", converted["cnc"], "--out", tmp_path / "model.ckpt", "--format", "official",
                       "--force")
    assert code == 0, err
    assert load_config(str(tmp_path / "model.yaml")) == load_weights(str(converted["cnc"]))[0]

    code, _, err = run(capsys, "export", converted["cnc"], "--out", tmp_path / "other.yaml", "--format", "official")
    one_error(code, err)
    assert "give the .ckpt's name" in err and not (tmp_path / "other.yaml").exists()


def _with(config: CnCConfig, **changes) -> CnCConfig:
    """`config` with dotted fields replaced (part.field=value)."""
    parts = {}
    for dotted, value in changes.items():
        part, field = dotted.split("__")
        parts.setdefault(part, {})[field] = value
    return dataclasses.replace(config, **{part: dataclasses.replace(getattr(config, part), **fields)
                                          for part, fields in parts.items()})


@pytest.mark.parametrize("changes,field,why", [
    ({"unet__in_channels": 9}, "unet.in_channels=9", "noisy latent alone"),
    ({"text_encoder__max_position_embeddings": 64}, "text_encoder.max_position_embeddings=64",
     "pads every prompt to 77 tokens"),
    ({"global_fuser__channel_mult": (2, 8)}, "global_fuser.channel_mult=[2, 8]", "[:, :4] foreground"),
    ({"global_fuser__dropout1": 0.2}, "global_fuser.dropout1/dropout2=[0.2, 0.3]", "hard-codes 0.1 / 0.3"),
    ({"unet__num_res_blocks": 3, "local_fuser__num_res_blocks": 3, "local_fuser__inject_layers": (1,)},
     "local_fuser.num_res_blocks=3",
     "17 residuals, the official CnC passes at most 13"),
    ({"unet__num_res_blocks": 1, "local_fuser__num_res_blocks": 1, "local_fuser__inject_layers": (1, 3, 5, 7)},
     "local_fuser.inject_layers=[1, 3, 5, 7]", "makes LocalResBlocks of blocks [1, 5]"),
    ({"local_fuser__inject_layers": (4, 1, 7, 10)}, "local_fuser.inject_layers=[4, 1, 7, 10]",
     "inject layer k must lie in level k"),
    ({"local_fuser__out_channels": 8}, "local_fuser.out_channels=8", "the official YAML has no place for it"),
])
def test_what_the_official_code_cannot_build_is_named(ref_dir, changes, field, why):
    config = _with(config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml")), **changes)
    problems = official_build_problems(config)
    assert len(problems) == 1 and problems[0].startswith(field + ":") and why in problems[0], problems


def test_what_the_official_code_can_build_passes(ref_dir):
    reference = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    # one ResBlock a level still puts block 1 at 1 + 3*0 + 0 (checked against the official LocalFuser)
    one_block = _with(reference, unet__num_res_blocks=1, local_fuser__num_res_blocks=1, local_fuser__inject_layers=(1,))
    for config in (reference, one_block, dataclasses.replace(reference, global_fuser=GlobalFuserConfig(in_dim=32))):
        assert official_build_problems(config) == []
