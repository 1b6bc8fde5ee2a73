"""The samplers: diffusers' schedulers (0.42, SD 1.5 config) as one lax.scan each, plus the official DDIM.

Each sampler is two halves. The host half (numpy, float32/float64 exactly where diffusers uses them) turns
(beta config, step count, settings) into per-step arrays: model timesteps and the scalar coefficients of that
step. Those arrays are DATA to the compiled program, so a new step count is a new shape but a new eta, seed or
guidance scale is not a new program. The device half is a small step function over a carry that holds the
sample and the solver state (previous data predictions / eps, PNDM's saved sample, UniPC's last sample); the
whole loop is one lax.scan. Stochastic samplers draw image i's noise at step timestep t from
fold_in(key_i, t) (the DDIM rule), or replay given noise (tests).

The diffusers arithmetic is mirrored operation by operation: per-step scalars are computed in float32 numpy
where diffusers computes them on float32 torch tensors (sigma, alpha_t, lambda, h, ...) and in float64 where it
uses numpy float64 (np.interp of sigmas, the Karras ramp, sigma -> t).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnc_jax.model_config import DiffusionConfig
from cnc_jax.diffusion import Schedule
from cnc_jax.sampling.ddim import DDIMSchedule, EpsFn, ddim_step
from cnc_jax.sampling.sampler_names import ETA_SAMPLERS, SAMPLER_NAMES

f32 = np.float32


# ---------------------------------------------------------------------------------------------------- host half
def diffusers_alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """The schedulers' alphas_cumprod: float32 betas (linspace of square roots, squared), 1 - beta in float32, the
    cumulative product accumulated in double (torch's CPU cumprod) and stored as float32."""
    betas = np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=np.float32) ** 2
    return np.cumprod((f32(1) - betas).astype(np.float64)).astype(np.float32)


def spaced_timesteps(total: int, steps: int, spacing: str, offset: int, multistep: bool = False) -> np.ndarray:
    """Descending int64 timesteps of diffusers' set_timesteps. multistep: the DPM-Solver / UniPC variant, which
    spaces S + 1 points and drops the last."""
    n = steps + 1 if multistep else steps
    if spacing == "leading":
        t = (np.arange(0, n) * (total // n)).round()[::-1]
        t = (t[:-1] if multistep else t).astype(np.int64) + offset
    elif spacing == "trailing":
        t = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        t = np.linspace(0, total - 1, n).round()[::-1]
        t = (t[:-1] if multistep else t).astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    return t.copy()


def _check_grid(name: str, timesteps: np.ndarray, total: int, steps: int) -> None:
    """diffusers would index alphas_cumprod out of range (leading S = T, or trailing's float arange overshooting)."""
    bad = timesteps[(timesteps >= total) | (timesteps < 0)]
    if len(bad):
        raise ValueError(f"steps={steps}: diffusers' {name} grid would need timestep {bad[0]} of 0..{total - 1}; "
                         f"choose another step count")


def _sigmas_all(ac: np.ndarray) -> np.ndarray:
    """((1 - ac) / ac) ** 0.5 on the float32 buffer, as the schedulers compute it."""
    return np.sqrt((f32(1) - ac) / ac)


def karras_sigmas(sigmas_all: np.ndarray, steps: int, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float64 (S,), timesteps float64 (S,), rounded): _convert_to_karras and _sigma_to_t."""
    sigma_min, sigma_max = float(sigmas_all[0]), float(sigmas_all[-1])
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    log_sigmas = np.log(sigmas_all)  # float32
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # float64
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)  # lo - hi in float32, as on numpy float32 scalars
    return sigmas, ((1 - w) * low + w * (low + 1)).round()


def _final_sigma(ac: np.ndarray, kind: str) -> float:
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(_sigmas_all(ac[:1])[0])
    raise ValueError(f"final_sigmas_type {kind!r} is not one of zero, sigma_min")


def _alpha_sigma_lambda(sigmas: np.ndarray):
    """_sigma_to_alpha_sigma_t and lambda = log(alpha) - log(sigma), float32 (lambda is +inf at sigma 0)."""
    s = sigmas.astype(np.float32)
    alpha = f32(1) / np.sqrt(s * s + f32(1))
    sigma = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def _alphas_prev(ac: np.ndarray, prev: np.ndarray, set_alpha_to_one: bool) -> np.ndarray:
    """alphas_cumprod[prev], and final_alpha_cumprod (1 or alphas_cumprod[0]) where prev < 0."""
    final = f32(1) if set_alpha_to_one else ac[0]
    return np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)


def _plan_ddim_diffusers(cfg, steps, s, eta):
    """DDIMScheduler.set_timesteps / step: prev = t - T // S, alpha_prev of t < 0 = final_alpha_cumprod."""
    total, ac = cfg.timesteps, diffusers_alphas_cumprod(cfg)
    t = spaced_timesteps(total, steps, s["timestep_spacing"], s["steps_offset"])
    _check_grid("DDIM", t, total, steps)
    a_t, a_prev = ac[t], _alphas_prev(ac, t - total // steps, s["set_alpha_to_one"])
    variance = ((f32(1) - a_prev) / (f32(1) - a_t)) * (f32(1) - a_t / a_prev)
    sched = DDIMSchedule(timesteps=t[::-1].astype(np.int32), alphas=a_t[::-1], alphas_prev=a_prev[::-1],
                         sigmas=(f32(eta) * np.sqrt(variance))[::-1].astype(np.float32),
                         sqrt_one_minus_alphas=np.sqrt(f32(1) - a_t)[::-1])
    return {k: np.asarray(v) for k, v in sched.arrays().items()}


def _plan_ddim_official(cfg, steps, s, eta):
    return {k: np.asarray(v) for k, v in DDIMSchedule.make(Schedule.from_config(cfg), steps, eta).arrays().items()}


def _plan_pndm(cfg, steps, s, eta):
    """PNDMScheduler with skip_prk_steps: S + 1 model calls (the second repeats the first's neighbour timestep),
    then the PLMS combinations of up to 4 previous eps (Adams-Bashforth weights) per step."""
    if not s["skip_prk_steps"]:
        raise ValueError("pndm: only skip_prk_steps=True (PLMS) is supported")
    total, ac = cfg.timesteps, diffusers_alphas_cumprod(cfg)
    base = spaced_timesteps(total, steps, s["timestep_spacing"], s["steps_offset"])[::-1]  # ascending
    model_t = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
    _check_grid("PNDM", model_t, total, steps)
    ratio = total // steps
    n = len(model_t)
    counter = np.arange(n)
    t_cur = np.where(counter == 1, model_t + ratio, model_t)
    t_prev = np.where(counter == 1, model_t, model_t - ratio)
    a_t, a_prev = ac[t_cur], _alphas_prev(ac, t_prev, s["set_alpha_to_one"])
    weights = np.zeros((n, 4), np.float32)
    table = {0: [1], 1: [1 / 2, 1 / 2], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12]}
    for c in range(n):
        w = table.get(c, [55 / 24, -59 / 24, 37 / 24, -9 / 24])
        weights[c, :len(w)] = w
    beta_t, beta_prev = f32(1) - a_t, f32(1) - a_prev
    return {"timesteps": model_t.astype(np.int32),
            "sample_coeff": np.sqrt(a_prev / a_t), "numer": a_prev - a_t,
            "denom": a_t * np.sqrt(beta_prev) + np.sqrt(a_t * beta_t * a_prev),
            "weights": weights, "push": (counter != 1).astype(np.float32),
            "save": (counter == 0).astype(np.float32), "use_saved": (counter == 1).astype(np.float32)}


def _solver_sigmas(cfg, steps, s):
    """(model timesteps, sigmas (S + 1,) float32) of DPMSolverMultistep / UniPCMultistep."""
    total, ac = cfg.timesteps, diffusers_alphas_cumprod(cfg)
    sig_all = _sigmas_all(ac)
    if s.get("use_karras_sigmas"):
        sigmas, t = karras_sigmas(sig_all, steps)
        t = t.astype(np.int64)
    else:
        t = spaced_timesteps(total, steps, s["timestep_spacing"], s["steps_offset"], multistep=True)
        sigmas = np.interp(t, np.arange(total), sig_all)  # clamps at t = T (leading, S = T - 1), as diffusers
    sigmas = np.concatenate([sigmas, [_final_sigma(ac, s["final_sigmas_type"])]]).astype(np.float32)
    if np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"steps={steps}: the sigmas of this grid repeat (timesteps {t.tolist()[:4]}...; diffusers "
                         "divides by zero there); choose fewer steps")
    return t, sigmas


def _check_order(s):
    if s.get("solver_order", 2) != 2:
        raise ValueError("only solver_order=2 is supported")
    if s.get("prediction_type", "epsilon") != "epsilon" or s.get("thresholding"):
        raise ValueError("only prediction_type='epsilon' without thresholding is supported")


def _plan_dpm(cfg, steps, s, eta):
    """DPMSolverMultistepScheduler, order 2 (dpmsolver++ / sde-dpmsolver++, midpoint / heun):
    x' = cx x + a0 m + a1 (inv_r0 (m - m_prev)) + cn noise, m the data prediction; first order (a1 = 0) at the
    first step and wherever diffusers lowers the order at the end."""
    _check_order(s)
    t, sigmas = _solver_sigmas(cfg, steps, s)
    alpha, sigma, lam = _alpha_sigma_lambda(sigmas)
    n = len(t)
    k = np.arange(n)
    nxt, prv = k + 1, np.maximum(k - 1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h, h0 = lam[nxt] - lam[k], lam[k] - lam[prv]
        inv_r0 = f32(1) / (h0 / h)
        em = np.exp(-h)
        sde = s["algorithm_type"] == "sde-dpmsolver++"
        if s["algorithm_type"] == "dpmsolver++":
            cx, a0 = sigma[nxt] / sigma[k], -(alpha[nxt] * (em - f32(1)))
            a1 = (f32(-0.5) * (alpha[nxt] * (em - f32(1))) if s["solver_type"] == "midpoint"
                  else alpha[nxt] * ((em - f32(1)) / h + f32(1)))
            cn = np.zeros(n, np.float32)
        elif sde:
            em2 = np.exp(f32(-2.0) * h)
            cx, a0 = sigma[nxt] / sigma[k] * em, alpha[nxt] * (f32(1) - em2)
            a1 = (f32(0.5) * (alpha[nxt] * (f32(1) - em2)) if s["solver_type"] == "midpoint"
                  else alpha[nxt] * ((f32(1) - em2) / (f32(-2.0) * h) + f32(1)))
            cn = sigma[nxt] * np.sqrt(f32(1) - np.exp(f32(-2) * h))
        else:
            raise ValueError(f"algorithm_type {s['algorithm_type']!r} is not one of dpmsolver++, sde-dpmsolver++")
    final = (k == n - 1) & (s.get("euler_at_final") or (s["lower_order_final"] and n < 15)
                            or s["final_sigmas_type"] == "zero")
    first = (k == 0) | final
    return {"timesteps": t.astype(np.int32), "alpha": alpha[:n], "sigma": sigma[:n], "cx": cx, "a0": a0,
            "a1": np.where(first, 0, a1).astype(np.float32), "inv_r0": np.where(first, 0, inv_r0).astype(np.float32),
            "cn": cn.astype(np.float32)}


def _unipc_coeffs(alpha, sigma, lam, t, s0, s1, order, solver_type):
    """One UniP / UniC B(h) update from point s0 to t (s1 the point before s0, used at order 2):
    (sigma_t / sigma_s0, alpha_t h_phi_1, alpha_t B_h, rk, b (2,)); float32 like diffusers' 0-d tensors."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[t] - lam[s0]
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = hh if solver_type == "bh1" else np.expm1(hh)
        rk = (lam[s1] - lam[s0]) / h if order == 2 else f32(1)
        h_phi_k = h_phi_1 / hh - f32(1)
        b1 = h_phi_k * f32(1) / b_h
        h_phi_k = h_phi_k / hh - f32(1 / 2)
        b2 = h_phi_k * f32(2) / b_h
        return sigma[t] / sigma[s0], alpha[t] * h_phi_1, alpha[t] * b_h, f32(rk), np.array([b1, b2], np.float32)


def _plan_unipc(cfg, steps, s, eta):
    """UniPCMultistepScheduler (predict_x0, bh1/bh2, order 2): per step the UniC corrector of the sample the
    model just saw (from the step before's order) and then the UniP predictor. Coefficient names:
    corrector xc = ccx last - cc0 m1 - ccb (rc0 (m2 - m1) / crk + rc1 (m - m1));
    predictor x' = pcx xc - pc0 m - pcb (rp (m1 - m) / prk)."""
    _check_order(s)
    if not s.get("predict_x0", True) or s.get("disable_corrector") or s.get("solver_p"):
        raise ValueError("unipc: only predict_x0=True, no disable_corrector, no solver_p is supported")
    t, sigmas = _solver_sigmas(cfg, steps, s)
    alpha, sigma, lam = _alpha_sigma_lambda(sigmas)
    n, order = len(t), 2
    orders = [min(min(order, n - k) if s["lower_order_final"] else order, min(k, order) + 1) for k in range(n)]
    rows = []
    for k in range(n):
        p = orders[k]
        pcx, pc0, pcb, prk, _ = _unipc_coeffs(alpha, sigma, lam, k + 1, k, k - 1, p, s["solver_type"])
        row = {"pcx": pcx, "pc0": pc0, "pcb": pcb, "prk": prk, "rp": f32(0.5 if p == 2 else 0.0),
               "use_corrector": f32(k > 0), "ccx": f32(0), "cc0": f32(0), "ccb": f32(0), "crk": f32(1),
               "rc0": f32(0), "rc1": f32(0)}
        if k > 0:
            q = orders[k - 1]
            ccx, cc0, ccb, crk, b = _unipc_coeffs(alpha, sigma, lam, k, k - 1, k - 2, q, s["solver_type"])
            if q == 1:
                rc0, rc1 = f32(0), f32(0.5)
            else:
                rc0, rc1 = np.linalg.solve(np.array([[1, 1], [crk, 1]], np.float32), b)
            row.update(ccx=ccx, cc0=cc0, ccb=ccb, crk=crk, rc0=f32(rc0), rc1=f32(rc1))
        rows.append(row)
    out = {key: np.array([r[key] for r in rows], np.float32) for key in rows[0]}
    return {"timesteps": t.astype(np.int32), "alpha": alpha[:n], "sigma": sigma[:n], **out}


def _plan_euler(cfg, steps, s, eta):
    """EulerDiscrete (dt = sigma_next - sigma) and EulerAncestralDiscrete (dt = sigma_down - sigma, + sigma_up
    noise); the model sees x / sqrt(sigma^2 + 1); x_T is scaled by init_noise_sigma."""
    total, ac = cfg.timesteps, diffusers_alphas_cumprod(cfg)
    if s.get("use_karras_sigmas") or s.get("interpolation_type", "linear") != "linear":
        raise ValueError("euler: only linear sigma interpolation is supported")
    if s["timestep_spacing"] == "linspace":
        raise ValueError("euler: linspace spacing gives fractional timesteps, which the UNet here does not take")
    t = spaced_timesteps(total, steps, s["timestep_spacing"], s["steps_offset"])
    sigmas = np.interp(t.astype(np.float32), np.arange(total), _sigmas_all(ac))
    sigmas = np.concatenate([sigmas, [_final_sigma(ac, s.get("final_sigmas_type", "zero"))]]).astype(np.float32)
    sig, nxt = sigmas[:-1], sigmas[1:]
    if s["ancestral"]:
        up = np.sqrt(nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2)
        dt = np.sqrt(nxt ** 2 - up ** 2) - sig
    else:
        up, dt = np.zeros_like(sig), nxt - sig
    init = sigmas.max() if s["timestep_spacing"] == "trailing" else np.sqrt(sigmas.max() ** 2 + f32(1))
    return {"timesteps": t.astype(np.int32), "sigma": sig, "in_denom": np.sqrt(sig ** 2 + f32(1)), "dt": dt,
            "sigma_up": up.astype(np.float32), "init_noise_sigma": np.float32(init)}


# -------------------------------------------------------------------------------------------------- device half
def _data_prediction(x, e, step):
    """convert_model_output (dpmsolver++, UniPC predict_x0): x0 = (x - sigma_t eps) / alpha_t."""
    return (x - step["sigma"] * e) / step["alpha"]


def _step_ddim(carry, e, step, noise):
    x, pred_x0 = ddim_step(carry["x"], e, step, noise)
    return {"x": x}, pred_x0


def _step_pndm(carry, e, step, noise):
    x, saved, hist = carry["x"], carry["saved"], carry["hist"]  # hist: the last 3 stored eps, newest first
    w = step["weights"]
    e_eff = w[0] * e + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]
    base = jnp.where(step["use_saved"] > 0, saved, x)
    x_prev = step["sample_coeff"] * base - step["numer"] * e_eff / step["denom"]
    hist = jnp.where(step["push"] > 0, jnp.concatenate([e[None], hist[:2]]), hist)
    return {"x": x_prev, "saved": jnp.where(step["save"] > 0, x, saved), "hist": hist}, None


def _step_dpm(carry, e, step, noise):
    x, m_prev = carry["x"], carry["m_prev"]
    m = _data_prediction(x, e, step)
    x_next = step["cx"] * x + step["a0"] * m + step["a1"] * (step["inv_r0"] * (m - m_prev))
    if noise is not None:
        x_next = x_next + step["cn"] * noise
    return {"x": x_next, "m_prev": m}, m


def _step_unipc(carry, e, step, noise):
    x, last, m1, m2 = carry["x"], carry["last"], carry["m1"], carry["m2"]
    m = _data_prediction(x, e, step)
    corrected = step["ccx"] * last - step["cc0"] * m1 - step["ccb"] * (
        step["rc0"] * ((m2 - m1) / step["crk"]) + step["rc1"] * (m - m1))
    xc = jnp.where(step["use_corrector"] > 0, corrected, x)
    x_next = step["pcx"] * xc - step["pc0"] * m - step["pcb"] * (step["rp"] * ((m1 - m) / step["prk"]))
    return {"x": x_next, "last": xc, "m1": m, "m2": m1}, m


def _step_euler(carry, e, step, noise):
    x = carry["x"]
    pred = x - step["sigma"] * e
    x_next = x + (x - pred) / step["sigma"] * step["dt"]
    if noise is not None:
        x_next = x_next + noise * step["sigma_up"]
    return {"x": x_next}, pred


def _state(names):
    """The initial carry: the sample and zeroed solver state of the sample's shape."""
    return lambda x: {"x": x, **{n: jnp.zeros_like(x) for n in names}}


def _pndm_state(x):
    return {"x": x, "saved": jnp.zeros_like(x), "hist": jnp.zeros((3,) + x.shape, x.dtype)}


def _identity_input(x, step):
    return x


def _euler_input(x, step):
    """scale_model_input: x / sqrt(sigma^2 + 1)."""
    return x / step["in_denom"]


_OUR_SETTINGS = ("ancestral",)  # picks our Euler variant, which diffusers picks by class: no config entry


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler: its diffusers class and settings, how its per-step arrays are built and how one step runs."""

    name: str
    diffusers_class: str
    settings: dict  # the diffusers config entries that define it (beyond the beta schedule)
    stochastic: bool
    suggested_steps: str
    plan_fn: Callable
    step_fn: Callable
    init_fn: Callable = _state(())
    model_input: Callable = _identity_input
    noise_gate: Optional[str] = None  # a per-step array whose zero entries mean "no noise" (DDIM's sigmas: eta)

    @property
    def scheduler_class(self) -> str:
        """The diffusers class name alone (diffusers_class may add a note after it)."""
        return self.diffusers_class.split()[0]

    @property
    def diffusers_settings(self) -> dict:
        """The settings as diffusers config entries of scheduler_class (what its `from_config` takes)."""
        return {k: v for k, v in self.settings.items() if k not in _OUR_SETTINGS}

    def plan(self, cfg: DiffusionConfig, steps: int, eta: float = 0.0, settings: Optional[dict] = None) -> dict:
        """Per-step numpy arrays in sampling order (plus a scalar init_noise_sigma where it is not 1).
        `settings` overrides this sampler's diffusers config (tests replay other configs)."""
        if not 1 <= steps <= cfg.timesteps:
            raise ValueError(f"steps must be in 1..{cfg.timesteps}, got {steps}")
        if eta and self.name not in ETA_SAMPLERS:
            raise ValueError(f"eta applies to the DDIM samplers only, not to {self.name!r}")
        return self.plan_fn(cfg, steps, {**self.settings, **(settings or {})}, eta)


_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}
_SOLVER = {**_LEADING, "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero",
           "use_karras_sigmas": False, "prediction_type": "epsilon"}
_DPM = {**_SOLVER, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False}

_DEFINED = {s.name: s for s in (
    Sampler("ddim", "DDIMScheduler (the official LDM grid: range(0, T, T // S) + 1)",
            {**_LEADING, "set_alpha_to_one": False}, False, "50 (the official default)",
            _plan_ddim_official, _step_ddim, noise_gate="sigmas"),
    Sampler("ddim_trailing", "DDIMScheduler", {"timestep_spacing": "trailing", "steps_offset": 0,
                                               "set_alpha_to_one": False}, False, "25-50",
            _plan_ddim_diffusers, _step_ddim, noise_gate="sigmas"),
    Sampler("pndm", "PNDMScheduler (PLMS)", {**_LEADING, "skip_prk_steps": True, "set_alpha_to_one": False},
            False, "25-50 (S + 1 model calls)", _plan_pndm, _step_pndm, _pndm_state),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", _DPM, False, "20-25", _plan_dpm, _step_dpm,
            _state(("m_prev",))),
    Sampler("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": True}, False, "20-25",
            _plan_dpm, _step_dpm, _state(("m_prev",))),
    Sampler("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**_DPM, "algorithm_type": "sde-dpmsolver++"}, True,
            "25-50", _plan_dpm, _step_dpm, _state(("m_prev",))),
    Sampler("unipc", "UniPCMultistepScheduler", {**_SOLVER, "solver_type": "bh2", "predict_x0": True}, False,
            "15-25", _plan_unipc, _step_unipc, _state(("last", "m1", "m2"))),
    Sampler("euler", "EulerDiscreteScheduler", {**_LEADING, "ancestral": False, "interpolation_type": "linear"},
            False, "25-50", _plan_euler, _step_euler, model_input=_euler_input),
    Sampler("euler_ancestral", "EulerAncestralDiscreteScheduler", {**_LEADING, "ancestral": True}, True, "25-50",
            _plan_euler, _step_euler, model_input=_euler_input),
)}
SAMPLERS = {name: _DEFINED[name] for name in SAMPLER_NAMES}  # in the public order; every name has a definition


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def sampler_arrays(name: str, cfg: DiffusionConfig, steps: int, eta: float = 0.0) -> dict:
    """The jnp per-step arrays of a named sampler (the `steps` argument of sample_loop / sample_latents)."""
    return {k: jnp.asarray(v) for k, v in get_sampler(name).plan(cfg, steps, eta).items()}


def sample_loop(eps_fn: EpsFn, name: str, x_T: jax.Array, steps: dict, keys: Optional[jax.Array] = None,
                noise: Optional[jax.Array] = None, return_intermediates: bool = False):
    """Run sampler `name` as one lax.scan (call it under jit).

    steps: the sampler's per-step arrays (sampler_arrays; traced). keys: (B,) per-image keys for the step noise
    of stochastic samplers; noise: (N, B, ...) noise to replay instead. Returns x_0, or (x_0, {'x_inter':
    (N + 1, B, ...) with entry 0 = x_T scaled by init_noise_sigma, 'pred_x0': likewise, where the sampler has a
    data prediction}).
    """
    sampler = get_sampler(name)
    per_step = {k: v for k, v in steps.items() if k != "init_noise_sigma"}
    x0 = x_T * steps["init_noise_sigma"].astype(x_T.dtype) if "init_noise_sigma" in steps else x_T
    batch = x_T.shape[0]
    draws = sampler.stochastic or sampler.noise_gate is not None
    if keys is None:
        keys = jax.random.split(jax.random.PRNGKey(0), batch)

    def body(carry, xs):
        step, given = xs
        x = carry["x"]
        e = eps_fn(sampler.model_input(x, step), jnp.full((batch,), step["timesteps"], jnp.int32))
        eps_noise = None
        if draws:
            eps_noise = given if given is not None else jax.vmap(
                lambda k: jax.random.normal(jax.random.fold_in(k, step["timesteps"]), x.shape[1:]))(keys)
            if sampler.noise_gate:
                eps_noise = jnp.where(step[sampler.noise_gate] > 0, eps_noise, 0.0)
            eps_noise = eps_noise.astype(x.dtype)
        carry, pred = sampler.step_fn(carry, e.astype(x.dtype), step, eps_noise)
        return carry, ((carry["x"], pred) if return_intermediates else None)

    carry, trace = jax.lax.scan(body, sampler.init_fn(x0), (per_step, noise))
    if not return_intermediates:
        return carry["x"]
    xs, preds = trace
    out = {"x_inter": jnp.concatenate([x0[None], xs])}
    if preds is not None:
        out["pred_x0"] = jnp.concatenate([x0[None], preds])
    return carry["x"], out
