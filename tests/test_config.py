"""Model configs: presets, official YAMLs (incl. bad ones), JSON round trip, configs/*.py."""

import dataclasses

import pytest
import yaml

from cnc_jax.model_config import (PRESETS, CnCConfig, ConfigError, LocalFuserConfig, UNetConfig, config_from_official_yaml,
                            load_config)


def _write_yaml(tmp_path, ref_dir, edit):
    doc = yaml.safe_load((ref_dir / "tiny_cnc_config.yaml").read_text())
    edit(doc["model"]["params"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_tiny_yamls_give_their_modes(ref_dir):
    for name, mode in (("tiny_cnc_config.yaml", "cnc"), ("tiny_local_config.yaml", "local"),
                       ("tiny_global_config.yaml", "global")):
        cfg = config_from_official_yaml(str(ref_dir / name))
        params = yaml.safe_load((ref_dir / name).read_text())["model"]["params"]
        assert cfg.mode == mode and cfg.latent_size == params["image_size"]
        assert cfg.unet.model_channels == params["unet_config"]["params"]["model_channels"]
        assert cfg.unet.channel_mult == tuple(params["unet_config"]["params"]["channel_mult"])
        assert cfg.text_encoder.hidden_size == cfg.unet.context_dim  # picked up tiny_clip_text_config.json


def test_presets_are_the_official_full_size_models():
    cnc = PRESETS["cnc_v1"]()
    assert cnc.unet == UNetConfig() and cnc.unet.level_channels == (320, 640, 1280, 1280)
    assert cnc.local_fuser.inject_channels == (192, 256, 384, 512) and cnc.global_fuser.num_tokens == 4
    assert len(cnc.unet.encoder_plan()) == 12 and len(cnc.unet.decoder_plan()) == 12
    assert [b["kind"] for b in cnc.unet.encoder_plan()].count("down") == 3


def test_json_round_trip_and_folder(tmp_path, ref_dir):
    cfg = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert load_config(str(tmp_path / "config.json")) == cfg
    assert load_config(str(tmp_path)) == cfg  # a converted checkpoint folder


def test_python_stage_configs_name_their_preset():
    from configs import cnc_v1, global_fuser_v1, local_fuser_v1

    for module in (cnc_v1, local_fuser_v1, global_fuser_v1):
        name = module.__name__.rsplit(".", 1)[-1]
        assert module.get_config().model == name and load_config(name) == PRESETS[name]()


def test_python_files_are_refused_as_model_configs_without_running_them(tmp_path):
    ran = tmp_path / "ran"
    script = tmp_path / "cnc_v1.py"
    script.write_text(f"open({str(ran)!r}, 'w').close()\ndef get_config(): ...\n")
    with pytest.raises(ConfigError, match=r"cnc_v1.py: a Python file is a training config .* give the preset 'cnc_v1'"):
        load_config(str(script))
    assert not ran.exists()


def _shift_second_inject_layer(params):
    """The reference's own inject_layers with the second one moved off its level's first ResBlock
    (e.g. [1, 4, 7, 10] -> [1, 3, 7, 10])."""
    layers = list(params["inject_layers"])
    layers[1] -= 1
    params["inject_layers"] = layers


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["unet_config"]["params"].update(num_res_blockz=2), "unet_config.params.num_res_blockz"),
    (lambda p: p["unet_config"]["params"].update(use_scale_shift_norm=True), "use_scale_shift_norm=True"),
    (lambda p: p["unet_config"]["params"].update(model_channels=48), "multiple of 32"),
    (lambda p: _shift_second_inject_layer(p["local_control_config"]["params"]), "inject_layers"),
    (lambda p: p.pop("global_control_config"), "global_control_config is missing"),
    (lambda p: p.update(mode="both"), "mode 'both'"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(dropout=0.1), "dropout"),
])
def test_bad_yaml_names_the_field(tmp_path, ref_dir, edit, message):
    path = _write_yaml(tmp_path, ref_dir, edit)
    with pytest.raises(ConfigError, match="edited.yaml") as info:
        config_from_official_yaml(str(path))
    assert message in str(info.value)


def test_config_consistency_checks():
    with pytest.raises(ConfigError, match="needs a local fuser"):
        CnCConfig(mode="cnc")
    with pytest.raises(ConfigError, match="has no a global fuser|has no"):
        dataclasses.replace(PRESETS["cnc_v1"](), mode="local")
    with pytest.raises(ConfigError, match="inject_channels"):
        LocalFuserConfig(inject_channels=(192, 256))
