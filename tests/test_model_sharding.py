"""Every annotator / eval model's parameters shard over an 8-device (data 2 x fsdp 4) mesh with the rule table of
cnc_jax.sharding: each logical axis name a model uses has a rule, some leaves really split over 'fsdp', and the
placed shards are the leaf divided along the sharded dims. Runs in a subprocess with 8 forced host devices."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tiny configs of cnc_jax.models.tiny_annotators and of cnc_jax.eval.nets.random_nets.
SCRIPT = textwrap.dedent("""
    import math, sys
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from cnc_jax import sharding as sh
    from cnc_jax.model_config import tiny
    from cnc_jax.models import clip_model, clip_vision, dpt, inception, lpips, u2net
    from cnc_jax.models.tiny_annotators import tiny_annotator_configs

    tiny_cfgs = tiny_annotator_configs()
    vision = tiny_cfgs["clip_vision"]
    models = {
        "dpt": (dpt, tiny_cfgs["dpt"]),
        "clip_vision": (clip_vision, vision),
        "u2net": (u2net, tiny_cfgs["u2net"]),
        "inception": (inception, inception.InceptionConfig(input_size=75, channel_divisor=8)),
        "lpips": (lpips, lpips.LPIPSConfig("alex", channel_divisor=8)),
        "clip_model": (clip_model, clip_model.CLIPConfig(vision=vision, text=tiny().text_encoder,
                                                         projection_dim=vision.projection_dim)),
    }
    module, config = models[sys.argv[1]]
    mesh = sh.make_mesh(data=2, fsdp=4)
    boxed = module.abstract_params(config, boxed=True)
    shardings = sh.param_shardings(boxed, mesh)
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=is_box)
    assert all(is_box(leaf) for leaf in leaves)
    assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(nn.unbox(boxed))
    flat = jax.tree_util.tree_leaves(shardings)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in flat)
    assert any("fsdp" in jax.tree_util.tree_leaves(tuple(s.spec)) for s in flat), "nothing split over fsdp"

    params = module.init_params(config)
    placed = jax.device_put(params, shardings)
    for value, array, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(placed), flat):
        spec = tuple(s.spec) + (None,) * (value.ndim - len(s.spec))
        split = [math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
                 for axes in spec]
        want = tuple(dim // n for dim, n in zip(value.shape, split))
        assert all(dim % n == 0 for dim, n in zip(value.shape, split)), (value.shape, s.spec)
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape == want, (value.shape, s.spec, shard.data.shape)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(value)[shard.index])
    print(sum(1 for s in flat if "fsdp" in jax.tree_util.tree_leaves(tuple(s.spec))), "of", len(flat),
          "leaves split over fsdp")
""")


@pytest.mark.parametrize("model", ["dpt", "clip_vision", "u2net", "inception", "lpips", "clip_model"])
def test_model_params_shard_over_fsdp(model):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, model], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert " of " in out.stdout
