"""Diffusion schedule, q_sample and the training loss against training_loss.npz."""

import jax
import numpy as np

from cnc_jax.checkpoint import load_official_params
from cnc_jax.diffusion import Schedule, loss_terms, q_sample
from cnc_jax.model_config import config_from_official_yaml
from cnc_jax.models.cnc import CnC
from tests.conftest import check_parity, nchw_to_nhwc, nhwc_to_nchw


def test_schedule_buffers(ref_dir, ref):
    r = ref("training_loss")
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    schedule = Schedule.from_config(config.diffusion)
    np.testing.assert_allclose(schedule.alphas_cumprod_f64, r["alphas_cumprod_f64"], rtol=1e-14, atol=0)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "lvlb_weights"):
        check_parity("training_loss", name, getattr(schedule, name), r[name], tol=1e-6)
    np.testing.assert_array_equal(schedule.alphas_cumprod, r["alphas_cumprod"])  # same float64 -> float32 rounding


def test_q_sample_model_output_and_loss(ref_dir, ref):
    r, c = ref("training_loss"), ref("cnc_apply_model")
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    params = load_official_params(ref_dir / "tiny_cnc.ckpt", config, ["unet", "local_fuser", "global_fuser"],
                                  skip_other_parts=True)
    schedule = Schedule.from_config(config.diffusion)
    x_start, noise, t = nchw_to_nhwc(r["x_start"]), nchw_to_nhwc(r["noise"]), r["t"]
    x_noisy = q_sample(schedule, x_start, t, noise)
    check_parity("training_loss", "q_sample", nhwc_to_nchw(x_noisy), r["q_sample"])

    model = CnC(config)
    eps = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, t, r["context"], nchw_to_nhwc(c["fg_depth"]), nchw_to_nhwc(c["bg_depth"]),
        r["fg_emb"], r["bg_emb"], nchw_to_nhwc(c["mask"])))(params, x_noisy)
    check_parity("training_loss", "model_output", nhwc_to_nchw(eps), r["model_output"])
    terms = loss_terms(schedule, eps, noise, t)
    check_parity("training_loss", "loss_simple_per_sample", terms["loss_per_sample"], r["loss_simple_per_sample"])
    for name in ("loss", "loss_simple", "loss_vlb"):
        check_parity("training_loss", name, terms[name], r[name])
