"""One training step of the official recipe, as one jitted function.

x_0 = scale_factor * posterior(image).sample() (frozen VAE, or cached posterior moments), text context from
the frozen CLIP text encoder (or cached), t ~ U{0..T-1}, eps ~ N(0, I), loss = mean((model(x_t) - eps)^2),
AdamW on the trainable leaves only. Condition dropout happens in the data pipeline, as in the official
dataset; the global fuser's own dropout is active here. A non-finite loss or gradient leaves the state
unchanged and records the step (the host stops the run at its next check, having saved nothing bad).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cnc_jax.diffusion import Schedule, eps_loss, q_sample
from cnc_jax.model_config import CnCConfig
from cnc_jax.models.clip_text import CLIPTextTransformer
from cnc_jax.models.cnc import CnC
from cnc_jax.models.parts import merge_params
from cnc_jax.models.vae import AutoencoderKL, DiagonalGaussian
from cnc_jax.training.state import TrainState


def diffusion_conditions(config: CnCConfig, batch: dict) -> dict:
    """The CnC keyword inputs the mode uses, taken from a batch."""
    names = (("fg_depth", "bg_depth") if config.has_local else ()) + (
        ("fg_emb", "bg_emb", "mask") if config.has_global else ())
    return {k: batch[k] for k in names}


def encode_batch(config: CnCConfig, frozen: dict, batch: dict, rng, dtype=jnp.float32):
    """(x_0 latents, text context) from the frozen VAE and text encoder, or from cached values in the batch."""
    if "latent_moments" in batch:
        moments = batch["latent_moments"]
    else:
        vae = AutoencoderKL(config.vae, dtype=dtype)
        moments = vae.apply({"params": frozen["vae"]}, batch["image"], method=AutoencoderKL.encode)
    x0 = config.diffusion.scale_factor * DiagonalGaussian.from_moments(moments.astype(jnp.float32)).sample(rng)
    if "text_embedding" in batch:
        context = batch["text_embedding"]
    else:
        text = CLIPTextTransformer(config.text_encoder, dtype=dtype)
        context = text.apply({"params": frozen["text_encoder"]}, batch["input_ids"])
    return jax.lax.stop_gradient(x0), jax.lax.stop_gradient(context.astype(jnp.float32))


def make_train_step(config: CnCConfig, tx: optax.GradientTransformation, *, dtype=jnp.float32,
                    remat: bool = False, attention: str = "xla"
                    ) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    model = CnC(config, dtype=dtype, remat=remat, attention=attention)
    schedule = Schedule.from_config(config.diffusion)

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(state.rng, state.step)
        r_post, r_t, r_noise, r_dropout = jax.random.split(rng, 4)
        x0, context = encode_batch(config, frozen, batch, r_post, dtype)
        t = jax.random.randint(r_t, (x0.shape[0],), 0, schedule.num_timesteps)
        noise = jax.random.normal(r_noise, x0.shape)
        x_noisy = q_sample(schedule, x0, t, noise)
        conditions = diffusion_conditions(config, batch)

        def loss_fn(trainable):
            params = merge_params(trainable, {k: v for k, v in frozen.items() if k not in ("vae", "text_encoder")})
            eps = model.apply({"params": params}, x_noisy, t, context, deterministic=False,
                              rngs={"dropout": r_dropout}, **conditions)
            return jnp.mean(eps_loss(eps, noise))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

        def update(operands):
            grads, params, opt_state = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # a conditional, not a select: the skipped branch costs no second copy of params + optimizer state
        params, opt_state = jax.lax.cond(ok, update, lambda operands: operands[1:],
                                         (grads, state.params, state.opt_state))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~ok, state.step, state.nonfinite_step))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return train_step
