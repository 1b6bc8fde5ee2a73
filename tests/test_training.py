"""The training step: what trains, overfitting a fixed batch, frozen weights untouched, non-finite guard; the
optimizer's named stages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnc_jax.checkpoint import load_official_params
from cnc_jax.model_config import config_from_official_yaml, load_config
from cnc_jax.models.build import abstract_params
from cnc_jax.models.parts import merge_params, split_params
from cnc_jax.training.state import OPTIMIZER_STAGES, TrainState, make_optimizer, named_opt_state, unnamed_opt_state
from cnc_jax.training.step import make_train_step


@pytest.mark.parametrize("mode", ["cnc_v1", "local_fuser_v1", "global_fuser_v1"])
def test_trainable_parts_per_stage(mode):
    config = load_config(mode)
    params = abstract_params(config)
    trainable, frozen = split_params(config, params, sd_locked=True)
    assert set(trainable) == {p for p in ("local_fuser", "global_fuser") if p in params}
    assert set(frozen) == {"unet", "vae", "text_encoder"}
    assert merge_params(trainable, frozen).keys() == params.keys()
    unlocked, frozen_unlocked = split_params(config, params, sd_locked=False)
    unet_blocks = set(unlocked["unet"])
    assert unet_blocks == {k for k in params["unet"] if k.startswith("output_")} | {"norm_out", "conv_out"}
    assert not unet_blocks & set(frozen_unlocked["unet"])
    assert flatten_dict(merge_params(unlocked, frozen_unlocked)).keys() == flatten_dict(params).keys()


@pytest.fixture(scope="module")
def tiny(ref_dir):
    """The tiny reference model, its trainable / frozen split, an optimizer and the step, compiled once."""
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    trainable, frozen = split_params(config, load_official_params(ref_dir / "tiny_cnc.ckpt", config), sd_locked=True)
    tx, _ = make_optimizer(1e-3)
    return config, trainable, frozen, tx, jax.jit(make_train_step(config, tx))


def _batch(config, b=2, size=None, seed=0):
    # default: the smallest image the reference config takes (its deepest UNet level / last local-fuser feature
    # at 1x1), whatever the reference set's own image size and channel_mult
    size = size or config.vae.downsample_factor * 2 ** (len(config.unet.channel_mult) - 1)
    rng = np.random.default_rng(seed)
    dim = config.global_fuser.in_dim
    return {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
            "input_ids": rng.integers(0, config.text_encoder.vocab_size,
                                      (b, config.text_encoder.max_position_embeddings)).astype(np.int32),
            "fg_depth": rng.random((b, size, size, 3), np.float32), "bg_depth": rng.random((b, size, size, 3), np.float32),
            "fg_emb": rng.standard_normal((b, dim)).astype(np.float32),
            "bg_emb": rng.standard_normal((b, dim)).astype(np.float32),
            "mask": (rng.random((b, size, size, 1)) > 0.5).astype(np.float32)}


def test_overfit_fixed_batch_and_frozen_untouched(tiny):
    config, trainable, frozen, tx, step = tiny
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
    # the optimizer state holds exactly the trainable leaves (Adam's mu and nu), nothing frozen
    adam = state.opt_state["scale_by_adam"]
    for moment in (adam.mu, adam.nu):
        assert jax.tree_util.tree_structure(moment) == jax.tree_util.tree_structure(trainable)
    opt_arrays = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)  # step counts are scalars
    assert opt_arrays == 2 * sum(x.size for x in jax.tree_util.tree_leaves(trainable))

    batch = _batch(config)
    losses = []
    for _ in range(50):  # same batch, same t and noise (step counter held at 0): pure overfitting
        state, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), frozen, batch)
        losses.append(float(metrics["loss"]))
    print(f"overfit loss: step 0 {losses[0]:.4g} -> step 49 {losses[-1]:.4g} (x{losses[0] / losses[-1]:.1f} lower)")
    assert losses[-1] < losses[0] / 5, losses[::10]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen), frozen_before)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                       jax.tree_util.tree_leaves(trainable))]
    assert all(moved[:3]) and np.mean(moved) > 0.9


def test_non_finite_loss_keeps_the_state_and_records_the_step(tiny):
    config, trainable, frozen, tx, step = tiny
    state = TrainState.create(trainable, tx, jax.random.PRNGKey(0))
    state, _ = step(state, frozen, _batch(config))
    good = jax.device_get(state.params)
    bad_batch = _batch(config)
    bad_batch["image"][0, 0, 0, 0] = np.nan
    state, metrics = step(state, frozen, bad_batch)
    assert not np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 1
    state, _ = step(state, frozen, _batch(config))  # later steps are no-ops too
    assert int(state.nonfinite_step) == 1 and int(state.step) == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), good)
    assert optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, state.params, good)) == 0


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_the_optimizer_is_adamw_with_named_stages(clip):
    """The state names optax.adamw's stages (a checkpoint shows opt_state/scale_by_adam/mu/...) and the updates
    are optax.adamw's (after clipping: chain(clip, adamw)) bit for bit, so nothing but the names changed."""
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)},
              "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    tx, lr = make_optimizer(1e-2, warmup_steps=1, schedule="cosine", total_steps=4, grad_clip_norm=clip)
    reference = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    if clip:
        reference = optax.chain(optax.clip_by_global_norm(clip), reference)
    state, ref_state = tx.init(params), reference.init(params)
    assert tuple(state) == OPTIMIZER_STAGES[0 if clip else 1:]
    assert set(state["scale_by_adam"]._fields) == {"count", "mu", "nu"}
    for _ in range(4):
        grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, updates, ref_updates)
        params = optax.apply_updates(params, updates)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, named_opt_state(ref_state))
    assert jax.tree_util.tree_structure(unnamed_opt_state(state)) == jax.tree_util.tree_structure(ref_state)
