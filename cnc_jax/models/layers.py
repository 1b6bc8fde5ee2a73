"""Basic linen layers with PyTorch semantics, NHWC, and logical axis names on every parameter.

Why our own instead of nn.Dense/nn.Conv/nn.GroupNorm: the official numbers need torch's exact
normalisation (two-pass variance, float32 statistics, per-layer epsilons), torch's default
initialisers (so layers we create from scratch start where the official code starts), and one
fixed set of logical axis names that `cnc_jax.sharding` maps to the device mesh.

Logical axes used here:
  conv kernels  ('conv_h', 'conv_w', 'conv_in', 'conv_out'), conv bias ('conv_out',)
  dense kernels ('dense_in', 'dense_out'),                   dense bias ('dense_out',)
  norm scale/bias ('norm',), embeddings ('vocab', 'embed')
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Dtype = Any
Padding = Union[int, Sequence[tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class Init:
    """A parameter initialiser that can run in JAX (flax init) or in numpy (fast host-side init).

    kinds: 'zeros', 'ones', 'uniform' (U(-scale, scale): torch's nn.Linear / nn.Conv2d default with
    scale = 1/sqrt(fan_in)), 'normal' (N(0, scale^2): torch's nn.Embedding).
    """

    kind: str
    scale: float = 0.0

    def __call__(self, key, shape, dtype=jnp.float32):
        if self.kind == "zeros":
            return jnp.zeros(shape, dtype)
        if self.kind == "ones":
            return jnp.ones(shape, dtype)
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -self.scale, self.scale)
        return self.scale * jax.random.normal(key, shape, dtype)

    def numpy(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        if self.kind == "zeros":
            return np.zeros(shape, dtype)
        if self.kind == "ones":
            return np.ones(shape, dtype)
        if self.kind == "uniform":
            return rng.uniform(-self.scale, self.scale, shape).astype(dtype)
        return (self.scale * rng.standard_normal(shape)).astype(dtype)


ZEROS, ONES = Init("zeros"), Init("ones")


def torch_uniform(fan_in: int) -> Init:
    """torch's default for nn.Linear / nn.Conv2d weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return Init("uniform", 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


@struct.dataclass
class InitialisedParam(nn.LogicallyPartitioned):
    """A parameter's box: its logical axis names (nn.LogicallyPartitioned) and the `Init` that made it, so a
    traced abstract tree (jax.eval_shape of `init`) says how to draw each leaf (`cnc_jax.models.params.fresh`)."""

    init: Optional[Init] = struct.field(default=None, pytree_node=False)


def logical_param(module: nn.Module, name: str, init: Init, shape, axes, dtype):
    """`module.param` boxed with logical axis names (one per dim), so `cnc_jax.sharding`'s rule table can place it
    on the mesh; every parameter of every model is made here, and every name in `axes` needs a rule there."""
    return module.param(name, lambda key, *args: InitialisedParam(init(key, *args), axes, init=init), shape, dtype)


class Dense(nn.Module):
    """nn.Linear: y = x @ W + b with W stored (in, out)."""

    features: int
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = ZEROS if self.zero_init else torch_uniform(fan_in)
        kernel = logical_param(self, "kernel", init, (fan_in, self.features), ("dense_in", "dense_out"),
                               self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias_init = ZEROS if self.zero_init else torch_uniform(fan_in)
            bias = logical_param(self, "bias", bias_init, (self.features,), ("dense_out",), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


BAND_POSITIONS = 4096  # output positions per row band of a large CPU convolution
IM2COL_POSITIONS = 512  # output positions (N x Ho x Wo) up to which a CPU convolution is one im2col matmul ...
IM2COL_MIN_KERNEL = 1 << 20  # ... if its kernel has at least this many weights (the UNet's low levels: 3.7M-29M)
POLYPHASE_MIN_CHANNELS = 128  # a strided CPU convolution with this many input and output channels runs by phases


def _xla_conv2d(x, kernel, stride: int, pad, dilation: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_bands(h: int, w: int, stride: int, dilation: int) -> int:
    """How many row bands a stride-1 convolution with an h x w output is split into on CPU (1: none)."""
    bands = h * w // BAND_POSITIONS
    if stride != 1 or dilation != 1 or bands < 2:
        return 1
    while h % bands:
        bands -= 1
    return bands


def forward_form(x_shape, kernel_shape, out_hw, stride: int, dilation: int) -> str:
    """How a convolution runs on CPU: 'im2col' (few output positions and a kernel that outweighs the input: the
    taps' windows side by side on the channels, one matmul against the whole kernel; XLA CPU's convolution is
    slow there, 2-core Xeon, B=2, 3x3: 8² 2560->1280 93 ms vs 34, 16² 1280->1280 93 vs 64, 16² -> 8² stride 2
    49 vs 16, but 32² 640->640 56 vs 73; small kernels gain nothing there and the second form of the program
    only adds compile time: the tiny test models compile ~20% slower with it), 'polyphase' (strided, undilated,
    at least POLYPHASE_MIN_CHANNELS channels in and out: `polyphase_conv2d`; with fewer channels the phase
    convolutions are slower than XLA's strided one, 512² x 16 -> 256² x 32 11.5 vs 18.0 ms), 'bands' (large
    stride-1 outputs, `banded_conv2d`) or 'xla'."""
    kernel_size = math.prod(kernel_shape)
    if (x_shape[0] * math.prod(out_hw) <= IM2COL_POSITIONS and kernel_size >= max(IM2COL_MIN_KERNEL,
                                                                                   math.prod(x_shape))):
        return "im2col"
    if stride > 1 and dilation == 1 and min(kernel_shape[-2:]) >= POLYPHASE_MIN_CHANNELS:
        return "polyphase"
    return "bands" if conv_bands(*out_hw, stride, dilation) > 1 else "xla"


def banded_conv2d(x, kernel, pad, bands: int):
    """A stride-1 convolution as `bands` convolutions of row bands (each reads its rows plus the kernel's halo),
    concatenated. XLA CPU's convolution slows down on large images: 3x3 convs at 512² x 128, 256² x 256 and
    128² x 512 channels run at 66-74 GFLOP/s whole and 79-93 GFLOP/s in bands of 4096 positions (2-core x86)."""
    kh = kernel.shape[0]
    (top, bottom), cols = pad
    xp = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    rows = (xp.shape[1] - kh + 1) // bands
    return jnp.concatenate([_xla_conv2d(xp[:, i * rows:(i + 1) * rows + kh - 1], kernel, 1, ((0, 0), cols), 1)
                            for i in range(bands)], axis=1)


def _tap_windows(kernel_shape, out_hw, stride: int, dilation: int):
    """(i, j, row start, col start, row span, col span): where kernel tap (i, j) reads the padded input of a
    convolution with an out_hw output (each window has stride `stride`)."""
    (ho, wo), (kh, kw) = out_hw, kernel_shape[:2]
    for i in range(kh):
        for j in range(kw):
            yield i, j, i * dilation, j * dilation, stride * (ho - 1) + 1, stride * (wo - 1) + 1


def _window_slices(x, kernel_shape, out_hw, stride: int, pad, dilation: int):
    """Every tap's strided window of the padded input, each (N, Ho, Wo, Cin), in the kernel's tap order."""
    n, cin = x.shape[0], x.shape[-1]
    xp = jnp.pad(x, ((0, 0),) + tuple(pad) + ((0, 0),))
    return [jax.lax.slice(xp, (0, row, col, 0), (n, row + rows, col + cols, cin), (1, stride, stride, 1))
            for _, _, row, col, rows, cols in _tap_windows(kernel_shape, out_hw, stride, dilation)]


def im2col_conv2d(x, kernel, stride: int, pad, dilation: int, out_hw):
    """A convolution as one (positions, taps x Cin) x (taps x Cin, Cout) matmul."""
    windows = _window_slices(x, kernel.shape, out_hw, stride, pad, dilation)
    return jnp.einsum("nhwc,co->nhwo", jnp.concatenate(windows, axis=-1), kernel.reshape(-1, kernel.shape[-1]),
                      preferred_element_type=jnp.float32).astype(x.dtype)


def _phase_rows(size: int, before: int, stride: int, phase: int, taps: int, out: int):
    """Along one axis of a strided convolution (input `size`, `before` zeros of padding in front): the first input
    index of padded-input phase `phase` (padded positions phase, phase + stride, ...) and the zeros to put before
    and after its real entries so that a valid `taps`-tap convolution gives `out` outputs."""
    lead = max(-(-(before - phase) // stride), 0)  # phase positions that fall in the front padding
    first = phase - before + stride * lead
    real = len(range(first, size, stride))
    return first, lead, out + taps - 1 - lead - real  # trailing zeros (negative: that many real rows unused)


def polyphase_conv2d(x, kernel, stride: int, pad, out_hw):
    """A strided convolution as stride-1 convolutions of the padded input's phases, summed: output row i reads
    padded row stride * i + r, so the kernel's rows r = a + stride * q read phase a (padded rows a, a + stride,
    ...) at row i + q, and phase (a, b) is convolved (valid, stride 1) with the sub-kernel
    kernel[a::stride, b::stride]. The same multiply-adds as the strided convolution, which XLA CPU runs well
    below its stride-1 rate (2-core AMD EPYC, 3x3 stride 2 C->C, one image: 512² x 128 470 -> 275 ms,
    256² x 256 413 -> 201, 128² x 512 266 -> 169 (the VAE encoder's Downsample layers); B=2 64² x 320 37 -> 35);
    each phase convolution takes its own CPU form (`_conv2d`)."""
    s, (ho, wo), (kh, kw) = stride, out_hw, kernel.shape[:2]
    total = None
    for a in range(min(s, kh)):
        row, top, bottom = _phase_rows(x.shape[1], pad[0][0], s, a, len(range(a, kh, s)), ho)
        for b in range(min(s, kw)):
            col, left, right = _phase_rows(x.shape[2], pad[1][0], s, b, len(range(b, kw, s)), wo)
            phase = x[:, row::s, col::s]
            phase = phase[:, :phase.shape[1] + min(bottom, 0), :phase.shape[2] + min(right, 0)]
            y = _conv2d(phase, kernel[a::s, b::s], 1, ((top, max(bottom, 0)), (left, max(right, 0))), 1)
            total = y if total is None else total + y
    return total


def _conv2d(x, kernel, stride: int, pad, dilation: int):
    kh, kw = kernel.shape[:2]
    h = (x.shape[1] + sum(pad[0]) - dilation * (kh - 1) - 1) // stride + 1
    w = (x.shape[2] + sum(pad[1]) - dilation * (kw - 1) - 1) // stride + 1
    form = forward_form(x.shape, kernel.shape, (h, w), stride, dilation)
    if form == "xla":
        return _xla_conv2d(x, kernel, stride, pad, dilation)
    cpu = {"im2col": partial(im2col_conv2d, stride=stride, pad=pad, dilation=dilation, out_hw=(h, w)),
           "bands": partial(banded_conv2d, pad=pad, bands=conv_bands(h, w, stride, dilation)),
           "polyphase": partial(polyphase_conv2d, stride=stride, pad=pad, out_hw=(h, w))}[form]
    return jax.lax.platform_dependent(x, kernel, cpu=cpu,
                                      default=partial(_xla_conv2d, stride=stride, pad=pad, dilation=dilation))


SMALL_CONV_POSITIONS = 256  # dy positions (N x Ho x Wo) up to which a CPU conv gradient is one matmul for all taps
TAP_MATMUL_POSITIONS = 1024  # ... and up to which the input gradient is tap matmuls rather than XLA's convolution


def input_grad_form(dy_shape) -> str:
    """How a convolution's input gradient is computed on CPU: 'whole_kernel' (one matmul of dy against all taps),
    'per_tap' (one matmul per tap) or 'xla' (XLA's input-gradient convolution, faster from a few thousand
    positions on)."""
    positions = math.prod(dy_shape[:-1])
    if positions <= SMALL_CONV_POSITIONS:
        return "whole_kernel"
    return "per_tap" if positions <= TAP_MATMUL_POSITIONS else "xla"


def kernel_grad_form(x_shape, dy_shape, kernel_shape) -> str:
    """How `conv_kernel_grad_matmul` contracts a convolution's input windows with dy over the positions.

    XLA CPU's dot wants its contraction on the minor dimension of the left operand, so one side of each tap
    product is transposed in memory first. 'im2col': few positions, one (P, taps x Cin) x (P, Cout) matmul;
    otherwise the cheaper transpose: 'dy_transposed' (dy once, shared by all taps, then each small (Cout, Cin)
    result) or 'windows_transposed' (every tap's window: cheaper only for a few input channels)."""
    positions = math.prod(dy_shape[:-1])
    if positions <= SMALL_CONV_POSITIONS:
        return "im2col"
    taps, cin, cout = math.prod(kernel_shape[:2]), x_shape[-1], dy_shape[-1]
    return "dy_transposed" if positions * cout + taps * cin * cout < taps * positions * cin else "windows_transposed"


def conv_kernel_grad_matmul(x, dy, kernel_shape, stride: int, pad, dilation: int):
    """d loss / d kernel of `_conv2d` as matmuls over the positions: the tap's strided window of the padded input
    (N, Ho, Wo, Cin) against dy (N, Ho, Wo, Cout), in the form `kernel_grad_form` picks. XLA CPU's own
    kernel-gradient convolution transposes each window and runs at a fraction of the matmul rate (2-core x86,
    one image: 256² x 64 channels 154 ms vs 95 here, 8² x 1280 42 vs 26, 64² x 320 44 vs 31), so this is the
    CPU path; GPU/TPU keep XLA's convolution."""
    windows = _window_slices(x, kernel_shape, dy.shape[1:3], stride, pad, dilation)
    contract = partial(jnp.einsum, preferred_element_type=jnp.float32)
    form = kernel_grad_form(x.shape, dy.shape, kernel_shape)
    if form == "im2col":
        grad = contract("nhwc,nhwo->co", jnp.concatenate(windows, axis=-1), dy)
    elif form == "windows_transposed":
        grad = jnp.stack([contract("nhwc,nhwo->co", window, dy) for window in windows])
    else:
        grad = jnp.stack([contract("nhwo,nhwc->oc", dy, window) for window in windows]).swapaxes(1, 2)
    return grad.reshape(kernel_shape).astype(dy.dtype)


def conv_input_grad_matmul(dy, kernel, x_shape, stride: int, pad, dilation: int):
    """d loss / d x of `_conv2d` as tap matmuls (dy @ kernel[i, j]^T, placed at the tap's strided window of the
    padded input by lax.pad, summed, padding cropped); with few positions all taps are one matmul against the
    whole kernel, which saves copying out each tap's (Cin, Cout) slice. XLA's input-gradient convolution
    first copies the kernel flipped and transposed, which is most of its cost where the kernel outweighs the
    activations (2-core x86, one image, 3x3 2560->1280: 8² 263 ms vs 17, 16² 313 vs 64, 32² 1920->640 133
    vs 107)."""
    _, h, w, _ = x_shape
    (top, bottom), (left, right) = pad
    hp, wp = h + top + bottom, w + left + right
    taps = list(_tap_windows(kernel.shape, dy.shape[1:3], stride, dilation))
    contract = partial(jnp.einsum, preferred_element_type=jnp.float32)
    if input_grad_form(dy.shape) == "whole_kernel":  # (taps, N, Ho, Wo, Cin), indexed by tap below
        products = contract("nhwo,tio->tnhwi", dy, kernel.reshape((len(taps),) + kernel.shape[2:]))
    else:
        products = [contract("nhwo,io->nhwi", dy, kernel[i, j]) for i, j, *_ in taps]
    total = None
    for product, (_, _, row, col, rows, cols) in zip(products, taps):
        placement = ((0, 0, 0), (row, hp - row - rows, stride - 1), (col, wp - col - cols, stride - 1), (0, 0, 0))
        tap = jax.lax.pad(product, jnp.zeros((), jnp.float32), placement)
        total = tap if total is None else total + tap
    return total[:, top:top + h, left:left + w].astype(dy.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, stride: int, pad, dilation: int):
    """NHWC x HWIO convolution. On CPU its kernel gradient is `conv_kernel_grad_matmul` and, where the kernel
    has few positions, its input gradient `conv_input_grad_matmul`; elsewhere both are XLA's."""
    return _conv2d(x, kernel, stride, pad, dilation)


def _conv2d_fwd(x, kernel, stride, pad, dilation):
    return _conv2d(x, kernel, stride, pad, dilation), (x, kernel)


def _conv2d_bwd(stride, pad, dilation, residuals, dy):
    x, kernel = residuals

    def xla_input_grad(dy, kernel):
        _, input_vjp = jax.vjp(lambda x: _xla_conv2d(x, kernel, stride, pad, dilation), x)
        return input_vjp(dy)[0]

    if input_grad_form(dy.shape) != "xla":
        dx = jax.lax.platform_dependent(
            dy, kernel, cpu=lambda dy, k: conv_input_grad_matmul(dy, k, x.shape, stride, pad, dilation),
            default=xla_input_grad)
    else:
        dx = xla_input_grad(dy, kernel)

    def xla_kernel_grad(x, dy):
        _, kernel_vjp = jax.vjp(lambda k: _xla_conv2d(x, k, stride, pad, dilation), kernel)
        return kernel_vjp(dy)[0]

    dkernel = jax.lax.platform_dependent(
        x, dy, cpu=lambda x, dy: conv_kernel_grad_matmul(x, dy, kernel.shape, stride, pad, dilation),
        default=xla_kernel_grad)
    return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _phase_taps(kernel, axis: int):
    """The 3 taps of a 3x3 kernel along `axis`, seen from the two output phases of a nearest 2x upsample: phase 0
    reads source offsets (-1, 0) with taps (k0, k1 + k2), phase 1 offsets (0, +1) with (k0 + k1, k2)."""
    k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)


def upsampled_conv3x3(x, kernel):
    """conv3x3(nearest_upsample_2x(x), kernel) with padding 1, as four 2x2 convolutions of x itself, one per output
    phase (row parity a, column parity b), interleaved: output (2i + a, 2j + b) only ever reads x's rows i - 1 + a,
    i + a and columns j - 1 + b, j + b, so the duplicated pixels' taps are summed into the kernel first. 4/9 of
    the multiply-adds of convolving the upsampled image (the VAE decoder's three upsample convolutions are 28%
    of its FLOPs). 2-core Xeon, 3x3 C->C: 256² -> 512² x 256 1319 -> 712 ms, 128² -> 256² x 512 1223 -> 596,
    B=2 32² -> 64² x 640 251 -> 128."""
    phases = []
    for a, rows in enumerate(_phase_taps(kernel, 0)):
        phases.append(jnp.stack([conv2d(x, taps, 1, ((1 - a, a), (1 - b, b)), 1)
                                 for b, taps in enumerate(_phase_taps(rows, 1))], axis=3))
    n, h, w, c = x.shape[:3] + kernel.shape[-1:]
    return jnp.stack(phases, axis=2).reshape(n, 2 * h, 2 * w, c)  # (n, h, a, w, b, c) -> (n, 2h, 2w, c)


def upsample_conv2d(x, kernel, stride: int, pad, dilation: int):
    """conv2d of x upsampled 2x (nearest): a 3x3, stride-1, padding-1 kernel as `upsampled_conv3x3`, unless the
    plain convolution of the upsampled image is one CPU im2col matmul (`forward_form`), which is faster than
    four smaller ones (B=2 8² -> 16² x 1280: 74 vs 90 ms); anything else upsamples first."""
    up_shape = (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3])
    if (kernel.shape[:2] == (3, 3) and stride == dilation == 1 and pad == ((1, 1), (1, 1))
            and forward_form(up_shape, kernel.shape, up_shape[1:3], 1, 1) != "im2col"):
        return upsampled_conv3x3(x, kernel)
    return conv2d(nearest_upsample_2x(x), kernel, stride, pad, dilation)


class Conv(nn.Module):
    """nn.Conv2d on NHWC input; kernel stored HWIO.

    `kernel_size` is an int or (kh, kw) (Inception's 1x7 / 7x1); `padding` is torch's symmetric int padding,
    or explicit ((top, bottom), (left, right)). `upsample_input`: the convolution reads x upsampled 2x (nearest),
    as the UNet's and the VAE's Upsample layers do (`upsample_conv2d`).
    """

    features: int
    kernel_size: Union[int, tuple[int, int]] = 3
    stride: int = 1
    padding: Padding = 1
    dilation: int = 1
    use_bias: bool = True
    zero_init: bool = False
    upsample_input: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        cin = x.shape[-1]
        fan_in = cin * kh * kw
        init = ZEROS if self.zero_init else torch_uniform(fan_in)
        kernel = logical_param(self, "kernel", init, (kh, kw, cin, self.features),
                               ("conv_h", "conv_w", "conv_in", "conv_out"), self.param_dtype)
        pad = (((self.padding, self.padding),) * 2 if isinstance(self.padding, int)
               else tuple(tuple(side) for side in self.padding))
        if self.upsample_input:
            y = upsample_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.dilation)
        elif kh == kw == 1 and self.stride == 1 and pad == ((0, 0), (0, 0)):
            y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        else:
            y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.dilation)
        if not self.use_bias:
            return y
        bias = logical_param(self, "bias", init, (self.features,), ("conv_out",), self.param_dtype)
        return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """nn.GroupNorm over NHWC, statistics in float32 (as LDM's GroupNorm32), torch's two-pass variance."""

    num_groups: int = 32
    epsilon: float = 1e-5
    affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        # Statistics as per-channel sums over the positions, then summed within each group: XLA CPU reduces a
        # (positions, channels) array along its major axis far faster than it reduces a (positions, groups,
        # channels per group) view over two axes (512² x 128 channels, the VAE's outer level: forward 411 ->
        # 278 ms, gradient 1071 -> 647 ms; UNet sizes gain 10-50%).
        n, g = x.shape[0], self.num_groups
        flat = x.astype(jnp.float32).reshape(n, -1, c)
        count = flat.shape[1] * (c // g)

        def group_mean(channel_sums):  # (n, c) -> (n, 1, g, 1)
            return (channel_sums.reshape(n, g, c // g).sum(-1) / count)[:, None, :, None]

        centred = flat.reshape(n, -1, g, c // g) - group_mean(flat.sum(1))
        var = group_mean(jnp.square(centred).reshape(n, -1, c).sum(1))
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if self.affine:
            scale = logical_param(self, "scale", ONES, (c,), ("norm",), self.param_dtype)
            bias = logical_param(self, "bias", ZEROS, (c,), ("norm",), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last axis, statistics in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = logical_param(self, "scale", ONES, (c,), ("norm",), self.param_dtype)
        bias = logical_param(self, "bias", ZEROS, (c,), ("norm",), self.param_dtype)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """nn.Embedding (torch initialises it N(0, 1))."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = logical_param(self, "embedding", Init("normal", 1.0), (self.num_embeddings, self.features),
                              ("vocab", "embed"), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of LDM's openaimodel: [cos, sin] (cos first), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def gelu_exact(x):
    """torch's F.gelu default (erf); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def nearest_upsample_2x(x):
    """F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
