"""Shared bench helpers: timing, XLA cost analysis, peak memory, the one-JSON-line report."""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# fp32 / bf16 peak TFLOP/s per device when --peak-tflops is not given (datasheet dense numbers)
DEFAULT_PEAK_TFLOPS = {"cpu": None, "gpu": {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0)},
                       "tpu": {"v4": (275.0, 275.0), "v5e": (197.0, 197.0), "v5p": (459.0, 459.0)}}


def add_common_args(parser) -> None:
    parser.add_argument("--config", default="cnc_v1", help="preset, official YAML or converted config.json")
    parser.add_argument("--size", type=int, nargs="+", default=[512], help="image side S, or H W")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", default="auto", help="xla | dot_product | chunked | splash | auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--no-onednn", action="store_true", help="CPU: keep XLA's default Eigen kernels")


def setup_backend(args) -> None:
    from cnc_jax.platform import configure_cpu

    configure_cpu(not args.no_onednn)


def image_hw(args) -> tuple[int, int]:
    h, w = (args.size[0], args.size[0]) if len(args.size) == 1 else args.size[:2]
    if h % 64 or w % 64:
        raise SystemExit(f"--size {h} {w}: multiples of 64 expected")
    return h, w


def compile_timed(fn, *args):
    """(compiled, seconds)."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def model_flops(fn, *args) -> float:
    """FLOPs of one call from XLA's cost analysis of the unoptimised program. Pass the plain-attention ('xla')
    variant: loop bodies (lax.map / scan in other kernels) are counted once by the analysis."""
    cost = fn.lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def time_calls(fn, args, repeats: int) -> list[float]:
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def peak_memory_gb() -> dict:
    import jax

    out = {"process_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    return out


def measured_matmul_tflops(n: int = 2048, dtype: str = "fp32") -> float:
    """The machine's practical peak: best of a few n x n matmuls (CPU has no datasheet number to use)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32 if dtype == "fp32" else jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n ** 3 / min(time_calls(f, (a,), 5)) / 1e12


def peak_tflops(args, dtype: str):
    import jax

    if args.peak_tflops:
        return args.peak_tflops
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_tflops(dtype=dtype)
    table = DEFAULT_PEAK_TFLOPS.get(device.platform) or {}
    for name, (fp32, bf16) in table.items():
        if name.lower() in device.device_kind.lower():
            return fp32 if dtype == "fp32" else bf16
    return None


def report(record: dict) -> None:
    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    device = jax.devices()[0]
    record = {"date": datetime.date.today().isoformat(), "commit": commit, "backend": device.platform,
              "device": device.device_kind, "devices": jax.device_count(), **record}
    print(json.dumps(record))


def median(values) -> float:
    return statistics.median(values)
