"""DPT depth estimation of HF `DPTForDepthEstimation` (ViT backbone, non-hybrid) in Flax linen, NHWC.

The official code (utils/primitives.py GetDepthMap) runs torch-hub MiDaS 'DPT_Large'; HF `Intel/dpt-large`
is the port of that model, and our defaults are its config. Forward pass, as transformers 5.x computes it:

  embeddings   patch conv (kernel = stride = patch_size) -> [cls | patches (row-major)] + position embeddings,
               bilinearly resized (torch semantics, align_corners=False) to the input's patch grid;
  encoder      pre-LN ViT layers; the hidden states AFTER layers `backbone_out_indices` (not layer-normed:
               the final `dpt.layernorm` is never used for depth, so its checkpoint entries are ignored);
  reassemble   per stage: readout ('project': gelu(Linear([token | cls])); 'add'; 'ignore') -> (B, h, w, D) ->
               1x1 conv to neck_hidden_sizes[i] -> ConvTranspose(k = s = factor) / identity / 3x3 conv stride
               1/factor; then a bias-free 3x3 conv to fusion_hidden_size;
  fusion       deepest stage first: x (+ residual unit(previous skip), the skip bilinearly resized,
               align_corners=False, when shapes differ) -> residual unit -> 2x bilinear (align_corners=True)
               -> 1x1 conv;
  head         3x3 conv (F -> F/2) -> 2x bilinear (align_corners=True) -> 3x3 conv (-> 32) -> ReLU -> 1x1 conv
               (-> 1) -> ReLU; output (B, 16 h, 16 w) for an input grid of h x w patches (h, w even; for odd
               sides see DPTForDepthEstimation.fusion_upsampling).

All resizes use `cnc_jax.models.resize` (torch's exact F.interpolate), not jax.image.resize. Module names
follow `cnc_jax.checkpoint.names.DPT_RULES`: official `dpt.encoder.layer.3.attention.attention.query` is our
`layers_3/attention/query`, `neck.fusion_stage.layers.1.residual_layer2.convolution1` our
`neck/fusion_1/residual_layer2/convolution1`, `head.head.4` our `head/conv_3`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnc_jax.model_config import ConfigError
from cnc_jax.models import layers
from cnc_jax.models import params as module_params
from cnc_jax.models.layers import Conv, Dense, LayerNorm, gelu_exact, quick_gelu
from cnc_jax.models.resize import resize_bilinear

Dtype = Any

# transformers' ACT2FN names we support ("gelu" is the exact erf GELU).
ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}
READOUT_TYPES = ("project", "add", "ignore")

# HF DPTConfig's own class defaults (a DPT-Base-like ViT): what transformers assumes for a field a config.json
# leaves out. Our dataclass defaults are Intel/dpt-large's config.json instead.
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", layer_norm_eps=1e-12, image_size=384, patch_size=16, num_channels=3,
                   qkv_bias=True, backbone_out_indices=(2, 5, 8, 11), readout_type="project",
                   reassemble_factors=(4, 2, 1, 0.5), neck_hidden_sizes=(96, 192, 384, 768), fusion_hidden_size=256,
                   head_in_index=-1, use_batch_norm_in_fusion_residual=False, use_bias_in_fusion_residual=None,
                   add_projection=False, is_hybrid=False)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """HF `DPTConfig` fields of the non-hybrid ViT DPT; defaults = Intel/dpt-large (the port of MiDaS DPT-Large)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    backbone_out_indices: tuple[int, ...] = (5, 11, 17, 23)
    readout_type: str = "project"
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (256, 512, 1024, 1024)
    fusion_hidden_size: int = 256
    head_in_index: int = -1
    use_batch_norm_in_fusion_residual: bool = False
    use_bias_in_fusion_residual: Optional[bool] = None
    add_projection: bool = False
    is_hybrid: bool = False

    def __post_init__(self):
        for name in ("image_size", "patch_size"):  # HF allows [h, w]; square only here (the position grid is)
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
                object.__setattr__(self, name, value[0])
        for name in ("backbone_out_indices", "reassemble_factors", "neck_hidden_sizes"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                     "patch_size", "num_channels", "fusion_hidden_size"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (one of {sorted(ACTIVATIONS)})")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"layer_norm_eps must be a positive number, got {eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ConfigError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")
        for name in ("qkv_bias", "use_batch_norm_in_fusion_residual", "add_projection", "is_hybrid"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.use_bias_in_fusion_residual is not None and not isinstance(self.use_bias_in_fusion_residual, bool):
            raise ConfigError(f"use_bias_in_fusion_residual must be true, false or null, "
                              f"got {self.use_bias_in_fusion_residual!r}")
        if self.is_hybrid:
            raise ConfigError("is_hybrid: DPT-Hybrid (ResNet + ViT backbone) is not supported, only the ViT DPT")
        if self.use_batch_norm_in_fusion_residual:
            raise ConfigError("use_batch_norm_in_fusion_residual: batch norm in the fusion residual units is "
                              "not supported (DPT-Large / MiDaS have none)")
        if self.add_projection:
            raise ConfigError("add_projection: the extra head projection (DPT-Hybrid KITTI/NYU) is not supported")
        if self.readout_type not in READOUT_TYPES:
            raise ConfigError(f"readout_type {self.readout_type!r} is not one of {READOUT_TYPES}")
        stages = len(self.neck_hidden_sizes)
        if stages == 0:
            raise ConfigError("neck_hidden_sizes must not be empty")
        for name in ("backbone_out_indices", "reassemble_factors"):
            if len(getattr(self, name)) != stages:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries but neck_hidden_sizes has {stages}")
        for size in self.neck_hidden_sizes:
            if not _positive_int(size):
                raise ConfigError(f"neck_hidden_sizes must be positive integers, got {self.neck_hidden_sizes!r}")
        idx = self.backbone_out_indices
        if (not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
                or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= self.num_hidden_layers):
            raise ConfigError(f"backbone_out_indices must be increasing layer indices in [0, "
                              f"{self.num_hidden_layers}), got {list(idx)!r}")
        for f in self.reassemble_factors:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
                raise ConfigError(f"reassemble_factors must be positive numbers, got {self.reassemble_factors!r}")
            if f > 1 and f != int(f):
                raise ConfigError(f"reassemble factor {f} > 1 must be an integer (a ConvTranspose2d kernel size)")
        if not isinstance(self.head_in_index, int) or not -stages <= self.head_in_index < stages:
            raise ConfigError(f"head_in_index {self.head_in_index!r} does not index the {stages} fusion outputs")
        if self.fusion_hidden_size < 2:
            raise ConfigError(f"fusion_hidden_size must be at least 2, got {self.fusion_hidden_size}")

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid the position embeddings were trained for."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2 + 1

    @property
    def fusion_bias(self) -> bool:
        """HF: use_bias_in_fusion_residual, or (when null) not use_batch_norm_in_fusion_residual."""
        if self.use_bias_in_fusion_residual is None:
            return not self.use_batch_norm_in_fusion_residual
        return self.use_bias_in_fusion_residual

    @classmethod
    def from_hf_dict(cls, d: Mapping, source: str = "DPT config") -> "DPTConfig":
        """From a transformers DPT config.json (dict). Fields the file leaves out take HF's class defaults
        (HF_DEFAULTS), as transformers would. Raises ConfigError naming `source` and the field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "dpt":
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'dpt'")
        for name in ("backbone_config", "backbone"):
            if d.get(name) is not None:
                raise ConfigError(f"{source}: {name}: DPT with an external backbone (e.g. DINOv2, BEiT, Swin) "
                                  f"is not supported, only the built-in ViT")
        kwargs = {f.name: d.get(f.name, HF_DEFAULTS[f.name]) for f in dataclasses.fields(cls)}
        if kwargs["num_hidden_layers"] is None:
            raise ConfigError(f"{source}: num_hidden_layers is null")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------- layers


class BiasFreeConv(nn.Module):
    """torch nn.Conv2d(..., bias=False) on NHWC; kernel HWIO (the neck's 3x3 convs)."""

    features: int
    kernel_size: int = 3
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel = layers.logical_param(self, "kernel", layers.torch_uniform(cin * k * k), (k, k, cin, self.features),
                                      ("conv_h", "conv_w", "conv_in", "conv_out"), self.param_dtype)
        pad = ((self.padding, self.padding),) * 2
        return jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvTranspose(nn.Module):
    """torch nn.ConvTranspose2d(C_in, features, kernel_size=k, stride=k, padding=0) on NHWC.

    With stride == kernel the output blocks do not overlap: y[b, i*k+p, j*k+q, o] = sum_c x[b, i, j, c] *
    W_torch[c, o, p, q] + bias[o]. The converter turns every 4-D torch kernel (d0, d1, kh, kw) into (kh, kw, d1, d0)
    — for a transposed conv's (in, out, kh, kw) that is (kh, kw, out, in), the layout stored here.
    torch's init: kaiming_uniform(a=sqrt(5)) with fan_in = weight.size(1) * k * k = out * k * k.
    """

    features: int
    factor: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.factor, x.shape[-1]
        init = layers.torch_uniform(self.features * k * k)
        kernel = layers.logical_param(self, "kernel", init, (k, k, self.features, cin),
                                      ("conv_h", "conv_w", "conv_out", "conv_in"), self.param_dtype)
        bias = layers.logical_param(self, "bias", init, (self.features,), ("conv_out",), self.param_dtype)
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,pqoc->bipjqo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, h * k, w * k, self.features) + bias.astype(self.dtype)


def interpolate_pos_encoding(position_embeddings: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """HF `DPTViTEmbeddings._resize_pos_embed`: (1, 1 + g*g, D) -> (1, 1 + grid_h*grid_w, D).

    The class-token row is kept; the g x g grid (g = int(sqrt(N))) is resized with torch's bilinear
    F.interpolate (align_corners=False). At the training grid this is the identity (returned as is).
    """
    tok, grid = position_embeddings[:, :1], position_embeddings[0, 1:]
    g = math.isqrt(grid.shape[0])
    if g * g != grid.shape[0]:
        raise ValueError(f"{grid.shape[0]} position embeddings do not form a square grid")
    if (grid_h, grid_w) == (g, g):
        return position_embeddings
    grid = resize_bilinear(grid.reshape(1, g, g, -1), (grid_h, grid_w), align_corners=False)
    return jnp.concatenate([tok, grid.reshape(1, grid_h * grid_w, -1)], axis=1)


class DPTEmbeddings(nn.Module):
    """[cls | patch tokens (row-major)] + position embeddings resized to the input's patch grid.

    The resized position embeddings are sown as intermediates/position_embeddings (for inspection).
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt, d = self.config, self.dtype, self.config.hidden_size
        p = cfg.patch_size
        x = Conv(d, kernel_size=p, stride=p, padding=0, dtype=dt, param_dtype=self.param_dtype,
                 name="patch_embeddings")(pixel_values)
        b, gh, gw, _ = x.shape
        # HF initialises both raw parameters with zeros
        cls = layers.logical_param(self, "cls_token", layers.ZEROS, (1, 1, d), ("cls_batch", "cls_token", "embed"),
                                   self.param_dtype)
        pos = layers.logical_param(self, "position_embeddings", layers.ZEROS, (1, cfg.num_positions, d),
                                   ("pos_batch", "positions", "embed"), self.param_dtype)
        pos = interpolate_pos_encoding(pos, gh, gw)
        self.sow("intermediates", "position_embeddings", pos)
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, d)), x.reshape(b, gh * gw, d)], axis=1)
        return h + pos.astype(dt)


class DPTSelfAttention(nn.Module):
    """ViT self-attention (query/key/value/out projections); logits and softmax in float32."""

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        b, n, d = x.shape
        heads = cfg.num_attention_heads
        head_dim = d // heads

        def proj(name):
            return Dense(d, use_bias=cfg.qkv_bias, dtype=dt, name=name)(x).reshape(b, n, heads, head_dim)

        q, k, v = proj("query"), proj("key"), proj("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * (head_dim ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return Dense(d, dtype=dt, name="out")(out)


class DPTLayer(nn.Module):
    """Pre-LN ViT layer (HF DPTViTLayer)."""

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        eps = cfg.layer_norm_eps
        x = x + DPTSelfAttention(cfg, dt, name="attention")(LayerNorm(eps, dtype=dt, name="layernorm_before")(x))
        h = LayerNorm(eps, dtype=dt, name="layernorm_after")(x)
        h = ACTIVATIONS[cfg.hidden_act](Dense(cfg.intermediate_size, dtype=dt, name="fc1")(h))
        return x + Dense(cfg.hidden_size, dtype=dt, name="fc2")(h)


class DPTReassembleLayer(nn.Module):
    """1x1 conv to `channels`, then ConvTranspose (factor > 1) / identity (1) / 3x3 conv stride 1/factor (< 1)."""

    channels: int
    factor: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv(self.channels, kernel_size=1, padding=0, dtype=self.dtype, name="projection")(x)
        if self.factor > 1:
            return ConvTranspose(self.channels, int(self.factor), dtype=self.dtype, name="resize")(x)
        if self.factor < 1:
            return Conv(self.channels, kernel_size=3, stride=int(1 / self.factor), padding=1, dtype=self.dtype,
                        name="resize")(x)
        return x


class DPTResidualLayer(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x)))) (no batch norm)."""

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, dt = self.config.fusion_hidden_size, self.dtype

        def conv(name):
            if self.config.fusion_bias:
                return Conv(f, kernel_size=3, padding=1, dtype=dt, name=name)
            return BiasFreeConv(f, kernel_size=3, padding=1, dtype=dt, name=name)

        h = conv("convolution1")(jax.nn.relu(x))
        return x + conv("convolution2")(jax.nn.relu(h))


class DPTFusionLayer(nn.Module):
    """HF DPTFeatureFusionLayer: (x [+ residual_layer1(skip)]) -> residual_layer2 -> 2x bilinear -> 1x1 conv.

    `size` (MiDaS v3.1's FeatureFusionBlock_custom(size=...)) replaces the 2x upsampling by a resize to `size`
    (bilinear, align_corners=True).
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip=None, size: Optional[tuple[int, int]] = None):
        cfg, dt = self.config, self.dtype
        residual_layer1 = DPTResidualLayer(cfg, dt, name="residual_layer1")
        if skip is not None:
            if skip.shape != x.shape:
                skip = resize_bilinear(skip, x.shape[1:3], align_corners=False)
            x = x + residual_layer1(skip)
        elif self.is_initializing():
            residual_layer1(x)  # the first fusion layer has (unused) weights for it in every checkpoint
        x = DPTResidualLayer(cfg, dt, name="residual_layer2")(x)
        x = resize_bilinear(x, tuple(size) if size is not None else (2 * x.shape[1], 2 * x.shape[2]),
                            align_corners=True)
        return Conv(cfg.fusion_hidden_size, kernel_size=1, padding=0, dtype=dt, name="projection")(x)


class DPTNeck(nn.Module):
    """Reassemble (readout, projection, resize, bias-free 3x3 conv) and fuse the backbone's hidden states.

    hidden_states: one (B, 1 + gh*gw, D) array per stage; returns the fusion outputs, deepest first.
    fusion_upsampling: see DPTForDepthEstimation.
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32
    fusion_upsampling: str = "hf"

    @nn.compact
    def __call__(self, hidden_states, grid: tuple[int, int]):
        cfg, dt = self.config, self.dtype
        features = []
        for i, hs in enumerate(hidden_states):
            cls, tokens = hs[:, :1], hs[:, 1:]
            if cfg.readout_type == "project":
                readout = jnp.broadcast_to(cls, tokens.shape)
                tokens = Dense(cfg.hidden_size, dtype=dt, name=f"readout_project_{i}")(
                    jnp.concatenate([tokens, readout], axis=-1))
                tokens = ACTIVATIONS[cfg.hidden_act](tokens)
            elif cfg.readout_type == "add":
                tokens = tokens + cls
            x = tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
            x = DPTReassembleLayer(cfg.neck_hidden_sizes[i], cfg.reassemble_factors[i], dt,
                                   name=f"reassemble_{i}")(x)
            features.append(BiasFreeConv(cfg.fusion_hidden_size, 3, 1, dtype=dt, name=f"conv_{i}")(x))
        features = features[::-1]
        fused, outputs = None, []
        for j, x in enumerate(features):
            size = None
            if self.fusion_upsampling == "midas" and j + 1 < len(features):
                size = features[j + 1].shape[1:3]
            layer = DPTFusionLayer(cfg, dt, name=f"fusion_{j}")
            fused = layer(x, size=size) if fused is None else layer(fused, x, size=size)
            outputs.append(fused)
        return outputs


class DPTDepthHead(nn.Module):
    """3x3 conv (F -> F/2) -> 2x bilinear (align_corners=True) -> 3x3 conv (-> 32) -> ReLU -> 1x1 conv -> ReLU."""

    config: DPTConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, dt = self.config.fusion_hidden_size, self.dtype
        x = Conv(f // 2, kernel_size=3, padding=1, dtype=dt, name="conv_1")(x)
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
        x = jax.nn.relu(Conv(32, kernel_size=3, padding=1, dtype=dt, name="conv_2")(x))
        x = jax.nn.relu(Conv(1, kernel_size=1, padding=0, dtype=dt, name="conv_3")(x))
        return x[..., 0]


class DPTForDepthEstimation(nn.Module):
    """pixel_values NHWC (B, H, W, num_channels) -> predicted_depth (B, H', W'), non-negative, in `dtype`.

    Any H, W of at least one patch work (non-square too): the position embeddings are resized to the
    patch grid as HF does; sizes that are not multiples of the patch size are cropped by the patch conv,
    as in torch. With DPT-Large's factors (4, 2, 1, 0.5) the output is (16 gh, 16 gw) for a patch grid of
    gh x gw when both are even. For an odd grid side the two reference implementations differ:

      fusion_upsampling="hf"     transformers: every fusion layer upsamples 2x and a skip of another size is
                                 bilinearly resized (align_corners=False) to it; an odd side g gives 32*ceil(g/2);
      fusion_upsampling="midas"  MiDaS v3.1 (torch hub, the official GetDepthMap): each fusion layer resizes
                                 (align_corners=True) to the next skip's size, so the output is always 16 g.

    Both are identical for even grids (e.g. 384 or 512 inputs with patch 16).
    """

    config: DPTConfig
    dtype: Dtype = jnp.float32
    fusion_upsampling: str = "hf"

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt = self.config, self.dtype
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(f"DPT expects NHWC pixel_values (B, H, W, {cfg.num_channels}), "
                             f"got shape {tuple(pixel_values.shape)}")
        if self.fusion_upsampling not in ("hf", "midas"):
            raise ValueError(f"fusion_upsampling must be 'hf' or 'midas', got {self.fusion_upsampling!r}")
        grid = (pixel_values.shape[1] // cfg.patch_size, pixel_values.shape[2] // cfg.patch_size)
        if min(grid) < 1:
            raise ValueError(f"DPT input {pixel_values.shape[1]}x{pixel_values.shape[2]} is smaller than one "
                             f"{cfg.patch_size}x{cfg.patch_size} patch")
        h = DPTEmbeddings(cfg, dt, name="embeddings")(pixel_values)
        hidden_states = []
        for i in range(cfg.num_hidden_layers):
            h = DPTLayer(cfg, dt, name=f"layers_{i}")(h)
            if i in cfg.backbone_out_indices:
                hidden_states.append(h)
        fused = DPTNeck(cfg, dt, self.fusion_upsampling, name="neck")(hidden_states, grid)
        return DPTDepthHead(cfg, dt, name="head")(fused[cfg.head_in_index])


# ------------------------------------------------------------------ helpers: inputs, trees, counts


def init_inputs(config: DPTConfig, batch: int = 1) -> dict:
    """Example keyword arguments for `DPTForDepthEstimation(config).init` (zeros at one 2x2 patch grid;
    the parameter shapes do not depend on the size). Use under jax.eval_shape."""
    side = 2 * config.patch_size
    return {"pixel_values": jnp.zeros((batch, side, side, config.num_channels), jnp.float32)}


def abstract_params(config: DPTConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters (boxed: nn.Partitioned leaves with logical axis names)."""
    return module_params.trace(DPTForDepthEstimation(config), init_inputs(config), boxed=boxed)


def init_params(config: DPTConfig, seed: int = 0) -> dict:
    """Fresh numpy parameters (torch default inits), e.g. for random-weight smoke runs."""
    return module_params.init(DPTForDepthEstimation(config), init_inputs(config), seed)


def expected_param_count(config: DPTConfig, *, with_final_layernorm: bool = False) -> int:
    """The parameter count from the architecture alone.

    Our tree has no `dpt.layernorm` (unused for depth); with_final_layernorm=True adds its 2 * hidden_size
    to give the count transformers reports for DPTForDepthEstimation.
    """
    d, f, p, c = config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels
    q = d if config.qkv_bias else 0
    embeddings = d + config.num_positions * d + (p * p * c * d + d)
    layer = 3 * (d * d + q) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    neck = 0
    fh = config.fusion_hidden_size
    for size, factor in zip(config.neck_hidden_sizes, config.reassemble_factors):
        if config.readout_type == "project":
            neck += 2 * d * d + d
        neck += d * size + size  # 1x1 projection
        if factor > 1:
            neck += size * size * int(factor) ** 2 + size
        elif factor < 1:
            neck += size * size * 9 + size
        neck += size * fh * 9  # bias-free 3x3 conv
    unit = 2 * (fh * fh * 9 + (fh if config.fusion_bias else 0))
    neck += len(config.neck_hidden_sizes) * (2 * unit + fh * fh + fh)
    head = (fh * (fh // 2) * 9 + fh // 2) + ((fh // 2) * 32 * 9 + 32) + (32 + 1)
    total = embeddings + config.num_hidden_layers * layer + neck + head
    return total + (2 * d if with_final_layernorm else 0)


__all__ = ["DPTConfig", "DPTForDepthEstimation", "DPTEmbeddings", "DPTLayer", "DPTSelfAttention", "DPTNeck",
           "DPTReassembleLayer", "DPTFusionLayer", "DPTResidualLayer", "DPTDepthHead", "ConvTranspose",
           "BiasFreeConv", "interpolate_pos_encoding", "init_inputs", "abstract_params", "expected_param_count",
           "HF_DEFAULTS", "ACTIVATIONS"]
