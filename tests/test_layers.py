"""layers.conv2d: the CPU forms of the convolution (im2col and row bands forward, matmuls over the positions for
the gradients) against XLA's own convolution and its gradients."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.models.layers import (BAND_POSITIONS, IM2COL_MIN_KERNEL, IM2COL_POSITIONS, POLYPHASE_MIN_CHANNELS,
                                  SMALL_CONV_POSITIONS, TAP_MATMUL_POSITIONS, Conv, _conv2d, _xla_conv2d, banded_conv2d,
                                  conv2d, conv_bands, conv_input_grad_matmul, conv_kernel_grad_matmul, forward_form,
                                  im2col_conv2d, input_grad_form, kernel_grad_form, nearest_upsample_2x,
                                  polyphase_conv2d, upsampled_conv3x3)
from tests.conftest import rel_err

# (kernel h, kernel w, stride, padding, dilation): UNet/VAE 3x3, UNet downsample, VAE's (0,1,0,1) downsample,
# Inception's 1x7 / 3x3 valid, DPT's dilated conv
CASES = [(3, 3, 1, ((1, 1), (1, 1)), 1), (3, 3, 2, ((1, 1), (1, 1)), 1), (3, 3, 2, ((0, 1), (0, 1)), 1),
         (1, 7, 1, ((0, 0), (3, 3)), 1), (3, 3, 2, ((0, 0), (0, 0)), 1), (3, 3, 1, ((2, 2), (2, 2)), 2)]


def _loss(conv, x, kernel, stride, pad, dilation, target):
    return jnp.sum(jnp.tanh(conv(x, kernel, stride, pad, dilation)) * target)


@pytest.mark.parametrize("kh,kw,stride,pad,dilation", CASES)
def test_conv2d_gradients_match_xla(kh, kw, stride, pad, dilation):
    rng = np.random.default_rng(kh * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 13, 11, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, 5, 7)) * 0.3, jnp.float32)
    y = _xla_conv2d(x, kernel, stride, pad, dilation)
    target = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    assert rel_err(conv2d(x, kernel, stride, pad, dilation), y) <= 1e-6
    assert rel_err(im2col_conv2d(x, kernel, stride, pad, dilation, y.shape[1:3]), y) <= 1e-6
    ours = jax.grad(_loss, argnums=(1, 2))(conv2d, x, kernel, stride, pad, dilation, target)
    xla = jax.grad(_loss, argnums=(1, 2))(_xla_conv2d, x, kernel, stride, pad, dilation, target)
    for a, b in zip(ours, xla):
        assert rel_err(a, b) <= 1e-5
    direct = conv_kernel_grad_matmul(x, jnp.ones_like(y), kernel.shape, stride, pad, dilation)
    _, vjp = jax.vjp(lambda k: _xla_conv2d(x, k, stride, pad, dilation), kernel)
    assert rel_err(direct, vjp(jnp.ones_like(y))[0]) <= 1e-5
    _, input_vjp = jax.vjp(lambda x: _xla_conv2d(x, kernel, stride, pad, dilation), x)
    assert rel_err(conv_input_grad_matmul(target, kernel, x.shape, stride, pad, dilation),
                   input_vjp(target)[0]) <= 1e-5


# (x shape, kernel shape): one case per form of the kernel gradient and of the input gradient; the expected
# forms are asserted, so a change of the rules that leaves a form untested fails here
SIDE = int(np.sqrt(SMALL_CONV_POSITIONS))
FORM_CASES = [((1, SIDE // 2, SIDE // 2, 6), (3, 3, 6, 5), "im2col", "whole_kernel"),
              ((1, 2 * SIDE, SIDE, 6), (3, 3, 6, 5), "dy_transposed", "per_tap"),
              ((1, 2 * SIDE, SIDE, 1), (3, 3, 1, 16), "windows_transposed", "per_tap")]


@pytest.mark.parametrize("x_shape,kernel_shape,kernel_form,input_form", FORM_CASES)
def test_every_gradient_form_matches_xla(x_shape, kernel_shape, kernel_form, input_form):
    rng = np.random.default_rng(sum(x_shape))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.3, jnp.float32)
    pad = ((1, 1), (1, 1))
    y = _conv2d(x, kernel, 1, pad, 1)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    assert kernel_grad_form(x.shape, dy.shape, kernel.shape) == kernel_form
    assert input_grad_form(dy.shape) == input_form
    assert input_grad_form((1, TAP_MATMUL_POSITIONS + 1, 1, 5)) == "xla"  # larger images: XLA's convolution
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv2d(x, k, 1, pad, 1), kernel)
    assert rel_err(conv_kernel_grad_matmul(x, dy, kernel.shape, 1, pad, 1), kernel_vjp(dy)[0]) <= 1e-5
    _, input_vjp = jax.vjp(lambda x: _xla_conv2d(x, kernel, 1, pad, 1), x)
    assert rel_err(conv_input_grad_matmul(dy, kernel, x.shape, 1, pad, 1), input_vjp(dy)[0]) <= 1e-5


def test_big_kernel_small_image_gradient_matches_xla():
    """A case that takes the im2col forward and the whole-kernel input gradient inside conv2d (few positions)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 2, 3, 384)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 384, 320)) * 0.02, jnp.float32)
    assert forward_form(x.shape, kernel.shape, (2, 3), 1, 1) == "im2col"
    pad = ((1, 1), (1, 1))
    target = jnp.asarray(rng.standard_normal((1, 2, 3, 320)), jnp.float32)
    ours = jax.grad(_loss, argnums=(1, 2))(conv2d, x, kernel, 1, pad, 1, target)
    xla = jax.grad(_loss, argnums=(1, 2))(_xla_conv2d, x, kernel, 1, pad, 1, target)
    for a, b in zip(ours, xla):
        assert rel_err(a, b) <= 1e-5


def test_cpu_kernel_gradient_replaces_xla_convolution():
    """On CPU the kernel gradient lowers to dots, not to XLA's (slower) kernel-gradient convolution."""
    x = jnp.ones((1, 32, 32, 4))  # more positions than IM2COL_POSITIONS: the forward is XLA's convolution
    kernel = jnp.ones((3, 3, 4, 4))
    pad = ((1, 1), (1, 1))
    grad_kernel = jax.jit(jax.grad(lambda k: jnp.sum(conv2d(x, k, 1, pad, 1) ** 2)))
    hlo = grad_kernel.lower(kernel).compile().as_text()
    assert "convolution(" in hlo  # the forward conv (its output feeds dy)
    plain = jax.jit(jax.grad(lambda k: jnp.sum(_xla_conv2d(x, k, 1, pad, 1) ** 2))).lower(kernel).compile().as_text()
    assert hlo.count("convolution(") < plain.count("convolution(")


@pytest.mark.parametrize("pad", [((1, 1), (1, 1)), ((0, 1), (2, 0))])
def test_banded_conv_matches_one_convolution(pad):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 17, 9, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 6, 5)), jnp.float32)
    whole = _xla_conv2d(x, kernel, 1, pad, 1)
    bands = whole.shape[1]  # one band per output row
    assert rel_err(banded_conv2d(x, kernel, pad, bands), whole) <= 1e-6


def test_conv_bands_rule():
    side = int(np.sqrt(BAND_POSITIONS))
    assert conv_bands(side, side, 1, 1) == 1  # small enough: one convolution
    assert conv_bands(8 * side, 8 * side, 1, 1) == 64
    assert conv_bands(8 * side, 8 * side, 2, 1) == conv_bands(8 * side, 8 * side, 1, 2) == 1
    assert (8 * side * 3) % conv_bands(8 * side * 3, 7, 1, 1) == 0  # always whole rows per band
    x = jnp.ones((1, 4 * side, 2 * side, 3))
    kernel = jnp.ones((3, 3, 3, 2))
    hlo = jax.jit(lambda x: _conv2d(x, kernel, 1, ((1, 1), (1, 1)), 1)).lower(x).as_text()
    assert hlo.count("convolution") >= conv_bands(4 * side, 2 * side, 1, 1) > 1  # the CPU program is banded


def test_forward_form_rule():
    side = int(np.sqrt(IM2COL_POSITIONS // 2))
    big, small = (3, 3, 512, 256), (3, 3, 64, 64)  # IM2COL_MIN_KERNEL weights and more; fewer
    assert np.prod(big) >= IM2COL_MIN_KERNEL > np.prod(small)
    assert forward_form((2, side, side, 512), big, (side, side), 1, 1) == "im2col"  # few positions, big kernel
    assert forward_form((1, 2 * side, 4 * side, 512), big, (side, 2 * side), 2, 1) == "im2col"  # any stride
    assert forward_form((2, side, side + 1, 512), big, (side, side + 1), 1, 1) == "xla"  # more positions
    assert forward_form((2, side, side, 64), small, (side, side), 1, 1) == "xla"  # a small kernel
    assert forward_form((2, 4 * side, 4 * side, 512), big, (side, side), 4, 1) == "polyphase"  # input outweighs it
    assert IM2COL_POSITIONS < BAND_POSITIONS
    band_side = int(np.sqrt(BAND_POSITIONS))
    x_shape = (1, 2 * band_side, band_side, 4)
    assert forward_form(x_shape, small, (2 * band_side, band_side), 1, 1) == "bands"
    assert forward_form(x_shape, small, (band_side, band_side // 2), 2, 1) == "xla"  # strided, few channels
    wide = (3, 3, POLYPHASE_MIN_CHANNELS, POLYPHASE_MIN_CHANNELS)
    assert forward_form((1, 2 * band_side, band_side, wide[2]), wide, (band_side, band_side // 2), 2, 1) == "polyphase"
    assert forward_form((1, 2 * band_side, band_side, wide[2]), wide, (band_side, band_side // 2), 2, 2) == "xla"
    narrow_out = wide[:3] + (POLYPHASE_MIN_CHANNELS - 1,)
    assert forward_form((1, 2 * band_side, band_side, wide[2]), narrow_out, (band_side, band_side // 2), 2, 1) == "xla"


# (x shape, kernel h, kernel w, stride, padding): the VAE's (0,1,0,1) and the UNet's (1,1,1,1) downsample on even
# and odd sides, valid (Inception), a 1x7, stride 3 with uneven padding, a kernel smaller than the stride
POLYPHASE_CASES = [((2, 12, 10, 4), 3, 3, 2, ((0, 1), (0, 1))), ((1, 13, 11, 4), 3, 3, 2, ((1, 1), (1, 1))),
                   ((1, 13, 12, 4), 3, 3, 2, ((0, 0), (0, 0))), ((1, 9, 16, 4), 1, 7, 2, ((0, 0), (3, 3))),
                   ((1, 14, 17, 4), 3, 3, 3, ((2, 0), (1, 2))), ((1, 10, 10, 4), 1, 1, 2, ((0, 0), (0, 0)))]


@pytest.mark.parametrize("x_shape,kh,kw,stride,pad", POLYPHASE_CASES)
def test_polyphase_conv_matches_the_strided_convolution(x_shape, kh, kw, stride, pad):
    rng = np.random.default_rng(sum(x_shape) + kh + kw)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, x_shape[-1], 3)), jnp.float32)
    strided = _xla_conv2d(x, kernel, stride, pad, 1)
    assert rel_err(polyphase_conv2d(x, kernel, stride, pad, strided.shape[1:3]), strided) <= 1e-6


def test_cpu_strided_convolution_runs_by_phases():
    """A wide strided convolution (the VAE encoder's Downsample) lowers to stride-1 convolutions on CPU, and its
    gradients still match XLA's."""
    c = POLYPHASE_MIN_CHANNELS
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, c)) * 0.03, jnp.float32)
    pad = ((0, 1), (0, 1))
    hlo = jax.jit(lambda x: _conv2d(x, kernel, 2, pad, 1)).lower(x).compile().as_text()
    convolutions = [line for line in hlo.splitlines() if "convolution(" in line]
    assert len(convolutions) == 4 and not any("stride=" in line for line in convolutions)
    target = jnp.asarray(rng.standard_normal((1, 3, 3, c)), jnp.float32)
    ours = jax.grad(_loss, argnums=(1, 2))(conv2d, x, kernel, 2, pad, 1, target)
    xla = jax.grad(_loss, argnums=(1, 2))(_xla_conv2d, x, kernel, 2, pad, 1, target)
    assert rel_err(conv2d(x, kernel, 2, pad, 1), _xla_conv2d(x, kernel, 2, pad, 1)) <= 1e-6
    for a, b in zip(ours, xla):
        assert rel_err(a, b) <= 1e-5


def test_cpu_forward_of_a_small_convolution_is_one_matmul():
    x = jnp.ones((2, 4, 4, 512))
    kernel = jnp.ones((3, 3, 512, 256))
    hlo = jax.jit(lambda x: conv2d(x, kernel, 1, ((1, 1), (1, 1)), 1)).lower(x).compile().as_text()
    assert "convolution(" not in hlo and "dot(" in hlo


def test_upsampled_conv_matches_convolving_the_upsampled_image():
    """The four phase convolutions equal the 3x3 convolution of the nearest-upsampled input, values and gradients."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 6, 4)) * 0.3, jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 10, 14, 4)), jnp.float32)

    def plain(x, kernel):
        return _xla_conv2d(nearest_upsample_2x(x), kernel, 1, ((1, 1), (1, 1)), 1)

    assert rel_err(upsampled_conv3x3(x, kernel), plain(x, kernel)) <= 1e-6
    loss = lambda conv, x, kernel: jnp.sum(jnp.tanh(conv(x, kernel)) * target)  # noqa: E731
    ours = jax.grad(partial(loss, upsampled_conv3x3), argnums=(0, 1))(x, kernel)
    reference = jax.grad(partial(loss, plain), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, reference):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("side", [4, int(np.sqrt(IM2COL_POSITIONS))])  # few positions: upsample + im2col; more: phases
def test_conv_module_upsample_input_keeps_its_parameters(side):
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, side, side, 3)), jnp.float32)
    upsampling = Conv(5, upsample_input=True)
    params = upsampling.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, Conv(5).init(jax.random.key(0), x))
    assert rel_err(upsampling.apply(params, x), Conv(5).apply(params, nearest_upsample_2x(x))) <= 1e-6
