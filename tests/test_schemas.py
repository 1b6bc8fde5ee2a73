"""Full-size presets vs the official key/shape listings (schema_*.json): counts and a complete name map."""

import json
import os
import types

import flax.linen as nn
import jax
import pytest
from flax.traverse_util import flatten_dict

from cnc_jax import model_config as config_lib
from cnc_jax.checkpoint import names
from cnc_jax.checkpoint.convert import plan_conversion
from cnc_jax.models.build import abstract_params, count_params

PART_OF_PREFIX = {"model.diffusion_model": "unet", "local_adapter": "local_fuser", "global_adapter": "global_fuser",
                  "first_stage_model": "vae", "cond_stage_model": "text_encoder"}
SCHEMAS = ["schema_cnc_v1.json", "schema_local_fuser_v1.json", "schema_global_fuser_v1.json"]


def _schema(ref_dir, name):
    with open(ref_dir / name) as f:
        schema = json.load(f)
    preset = os.path.splitext(os.path.basename(schema["config"]))[0]  # "configs/cnc_v1.yaml" -> "cnc_v1"
    return schema, config_lib.PRESETS[preset]()


@pytest.fixture(scope="module", params=SCHEMAS)
def schema_and_params(request, ref_dir):
    schema, config = _schema(ref_dir, request.param)
    return request.param, schema, config, abstract_params(config)


def test_parameter_counts_per_part(schema_and_params):
    name, schema, config, params = schema_and_params
    ours = {part: count_params(tree) for part, tree in params.items()}
    theirs = {PART_OF_PREFIX[prefix]: count for prefix, count in schema["param_count_by_prefix"].items()}
    assert ours == theirs, name


def test_name_map_covers_every_key_and_shape(schema_and_params):
    """Every official key maps to one of our leaves with the right (re-laid-out) shape, and back."""
    name, schema, config, params = schema_and_params
    fake_state_dict = {k: types.SimpleNamespace(shape=tuple(shape)) for k, shape in schema["state_dict"].items()}
    plan, report = plan_conversion(fake_state_dict, params)
    assert report.ok, report.format(name)
    leaves = flatten_dict(params)
    assert set(plan) == set(leaves)
    assert len(set(plan.values())) == len(plan)  # one official key per leaf
    back, unmapped = names.official_keys(plan)  # ours -> official, derived from the same rules
    assert not unmapped and back == plan
    ignored = [k for k in schema["state_dict"] if names.IGNORED.search(k)]
    assert sorted(ignored) == sorted(k for k in schema["state_dict"] if k not in plan.values())
    assert set(ignored) >= set(schema["non_parameter_entries (buffers)"])


def test_every_parameter_has_logical_axis_names(ref_dir):
    _, config = _schema(ref_dir, "schema_cnc_v1.json")
    boxed = abstract_params(config, boxed=True)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape) and all(isinstance(n, str) for n in leaf.names)


@pytest.mark.parametrize("source, kind, weights", [
    ("tiny_dpt", "dpt", "tiny_dpt/model.safetensors"),
    ("tiny_clip_vision", "clip_vision", "tiny_clip_vision/model.safetensors"),
    ("tiny_u2netp.pth", "u2net", "tiny_u2netp.pth"),
])
def test_reverse_names_of_the_annotators(ref_dir, source, kind, weights):
    """The derived reverse covers every rule kind (number arithmetic in DPT's head, prefixes, suffixes)."""
    from cnc_jax.checkpoint import load_official_annotator
    from cnc_jax.torchfile.state_dict import load_state_dict

    _, _, params = load_official_annotator(str(ref_dir / source), kind)
    keys, unmapped = names.official_keys(flatten_dict(params))
    assert not unmapped
    official = {k for k in load_state_dict(ref_dir / weights) if not names.is_ignored(k, (kind,))}
    assert sorted(keys.values()) == sorted(official)
