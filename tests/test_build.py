"""Fresh parameters: torch-default initialisation drawn on the host, zero convs zero, stable per path."""

import math

import jax
import numpy as np
import pytest

from cnc_jax.model_config import ConfigError, config_from_official_yaml, load_config
from cnc_jax.models.build import abstract_params, init_params, parts_of
from cnc_jax.models.cnc import CnC
from flax.traverse_util import flatten_dict


@pytest.fixture(scope="module")
def tiny(ref_dir):
    return config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))


def test_init_matches_the_official_initialisers(tiny):
    params = flatten_dict(init_params(tiny, seed=0))
    abstract = flatten_dict(abstract_params(tiny))
    assert params.keys() == abstract.keys()

    def zero_initialised(path):
        module, parent = path[-2], path[-3] if len(path) > 2 else ""
        return ("zero_conv" in module  # local fuser outputs and feature-extractor outputs
                or (module == "proj_out" and parent.endswith("_attn"))  # spatial transformer output
                or (module == "conv_out" and "_res" in parent)  # ResBlock second conv
                or path[:2] == ("unet", "conv_out"))  # UNet output conv

    for path, value in params.items():
        assert value.shape == abstract[path].shape and value.dtype == np.float32, path
        name = "/".join(path)
        if zero_initialised(path):
            assert not value.any(), f"{name} should start at zero"
        elif path[-1] == "scale":
            assert np.all(value == 1), name
        elif path[-1] == "embedding":
            assert 0.8 < value.std() < 1.2, name
        elif path[-1] == "kernel":
            fan_in = math.prod(value.shape[:-1])
            assert np.abs(value).max() <= 1 / math.sqrt(fan_in) + 1e-7 and value.any(), name


def test_init_is_deterministic_per_path(tiny):
    a = flatten_dict(init_params(tiny, seed=3))
    b = flatten_dict(init_params(tiny, seed=3, parts=["global_fuser"]))
    c = flatten_dict(init_params(tiny, seed=4, parts=["global_fuser"]))
    for path, value in b.items():
        np.testing.assert_array_equal(value, a[path])
    assert any(not np.array_equal(value, c[path]) for path, value in b.items() if value.any())


def test_numpy_init_has_the_flax_init_structure(tiny):
    """Our host-side init and flax's own init (module.init) give the same tree of shapes."""
    import flax.linen as nn
    from cnc_jax.models.build import diffusion_inputs

    flax_tree = jax.eval_shape(lambda k: CnC(tiny).init(k, **diffusion_inputs(tiny)), jax.random.PRNGKey(0))
    flax_shapes = {k: v.shape for k, v in flatten_dict(nn.unbox(flax_tree["params"])).items()}
    ours = init_params(tiny, parts=["unet", "local_fuser", "global_fuser"])
    assert {k: v.shape for k, v in flatten_dict(ours).items()} == flax_shapes


def test_parts_and_presets():
    assert parts_of(load_config("cnc_v1")) == ("unet", "local_fuser", "global_fuser", "vae", "text_encoder")
    assert parts_of(load_config("global_fuser_v1")) == ("unet", "global_fuser", "vae", "text_encoder")
    assert parts_of(load_config("sd15")) == ("unet", "vae", "text_encoder")
    with pytest.raises(ValueError, match="has no"):
        abstract_params(load_config("sd15"), ["local_fuser"])
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("cnc_v2")
