"""Shared bench helpers: timing, XLA cost analysis, peak memory, the one-JSON-line report."""

from __future__ import annotations

import collections
import datetime
import glob
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
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


PARTS = {"denoise": "UNet", "controls": "local fuser", "context": "global fuser", "global_tokens": "global fuser",
         "conditions": "conditions"}


def op_category(op_name: str) -> str:
    """Which part of a CnC sampling or training step an HLO op belongs to, from its op_name (jax's trace path):
    model part, forward or backward, and the kind of work."""
    if "AutoencoderKL" in op_name or "CLIPTextTransformer" in op_name:
        return "frozen VAE encode + text encoder"
    if "rematted_computation" in op_name:
        return "attention scores recomputed in the backward pass"
    if re.match(r"jit\([^)]*\)/cond/", op_name):  # the step's own conditional (a model's conds are deeper)
        return "AdamW update"
    parts = re.findall(r"CnC\.(\w+)", op_name)  # the innermost CnC method (denoise calls controls)
    if not parts:
        return "other (gradient norm, loss, noise, sampler update)"
    kind = ("self-attention" if "/attn1/" in op_name else "cross-attention" if "/attn2/" in op_name
            else op_kind(op_name))
    return f"{PARTS.get(parts[-1], parts[-1])} {'backward' if 'transpose(' in op_name else 'forward'}: {kind}"


def op_kind(op_name: str) -> str:
    """'conv' (XLA's convolution, or the matmul of `layers.im2col_conv2d`), 'matmul' or 'elementwise/reduce'."""
    op = op_name.rsplit("/", 1)[-1]
    if op.startswith("conv") or "nhwc,co->nhwo" in op_name:
        return "conv"
    return "matmul" if op.startswith("dot") else "elementwise/reduce"


def vae_op_category(op_name: str) -> str:
    """Which part of a VAE decode an HLO op belongs to: the decoder level (mid, up_0 at full size ... up_3 at the
    latent size, or the Upsample conv into a level) and the kind of work."""
    level = re.search(r"decoder/(mid|up_\d)(_upsample)?", op_name)
    where = "in/out" if not level else level.group(1) + (" upsample" if level.group(2) else "")
    return f"decoder {where}: {'attention' if 'attn' in op_name else op_kind(op_name)}"


def hlo_op_names(hlo_text: str) -> dict:
    """HLO instruction name -> the op_name (jax trace path) in its metadata; an instruction without metadata
    takes the op_name of its fused computation's root (or first named) instruction, else of its first named
    user (XLA drops the metadata of some gradient convolutions)."""
    named, calls, last_in, user = {}, {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        instruction = re.match(r"^\s*(ROOT )?%?([\w.-]+) = ", line)
        if not instruction:
            continue
        name = instruction.group(2)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name:
            named[name] = op_name.group(1)
            for operand in re.findall(r"[(,] ?%([\w.-]+)", line.split(" = ", 1)[1]):
                user.setdefault(operand, op_name.group(1))
            if instruction.group(1) or computation not in last_in:
                last_in[computation] = op_name.group(1)
        called = re.search(r"calls=%?([\w.-]+)", line)
        if called:
            calls[name] = called.group(1)
    for name, computation in calls.items():
        if name not in named and computation in last_in:
            named[name] = last_in[computation]
    return {**user, **named}


def thunk_profile(compiled, args, categorize, top_thunks: int = 25) -> dict:
    """Where one call of `compiled` spends its time: the call is traced with jax.profiler, every leaf thunk the
    XLA runtime executed (a fusion, a convolution, a loop body's op; loops themselves are not counted twice) is
    named by the `op_name` metadata of its HLO instruction, and `categorize(op_name) -> str` groups them.
    Returns {category: {"thunk_s", "share"}} sorted by time, the `top_thunks` slowest thunks and the traced
    wall time. Thunks of one call can run on several threads at once, so thunk seconds add up to more than the
    wall time; the shares are of the thunk seconds."""
    import jax

    op_names = hlo_op_names(compiled.as_text())
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "hlo_module" in e.get("args", {}):
            by_thread[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    seconds, per_thunk = collections.Counter(), collections.Counter()
    for spans in by_thread.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        for i, (begin, end, name) in enumerate(spans):
            if i + 1 < len(spans) and spans[i + 1][0] < end:  # it encloses the next thunk: a loop, not a leaf
                continue
            seconds[categorize(op_names.get(name, name))] += (end - begin) / 1e6
            per_thunk[name] += (end - begin) / 1e6
    total = sum(seconds.values()) or 1.0
    top = [{"thunk": name, "op_name": op_names.get(name, ""), "thunk_s": round(v, 3)}
           for name, v in per_thunk.most_common(top_thunks)]
    return {"traced_wall_s": round(wall, 3), "thunk_s": round(total, 3),
            "categories": {k: {"thunk_s": round(v, 3), "share": round(v / total, 4)}
                           for k, v in seconds.most_common()}, "top_thunks": top}
