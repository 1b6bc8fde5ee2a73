"""DPT depth (HF DPTForDepthEstimation layout) and the official depth procedure (GetDepthMap + sampling-time variants).

Reference: tiny_dpt/ (config.json + model.safetensors saved by transformers) and dpt.npz (pixel_values ->
predicted_depth). Every jitted function is compiled once per input shape (module-scoped fixtures).
"""

import json
import re
import types
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnc_jax.annotators import depth as depth_lib
from cnc_jax.checkpoint import convert_state_dict, names
from cnc_jax.checkpoint.convert import plan_conversion
from cnc_jax.checkpoint.midas import RowSlice, midas_to_hf
from cnc_jax.model_config import ConfigError
from cnc_jax.models import dpt
from cnc_jax.models.resize import bilinear_matrix
from cnc_jax.torchfile.state_dict import load_state_dict
from tests.conftest import check_parity, nchw_to_nhwc
from tests.torch_files import save_torch_zip

# Intel/dpt-large config.json (huggingface.co/Intel/dpt-large): the fields our defaults must equal.
INTEL_DPT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       hidden_act="gelu", layer_norm_eps=1e-12, image_size=384, patch_size=16, num_channels=3,
                       qkv_bias=True, backbone_out_indices=(5, 11, 17, 23), readout_type="project",
                       reassemble_factors=(4, 2, 1, 0.5), neck_hidden_sizes=(256, 512, 1024, 1024),
                       fusion_hidden_size=256, head_in_index=-1, use_batch_norm_in_fusion_residual=False,
                       add_projection=False, is_hybrid=False)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(ref_dir):
    """(config, params, conversion report, raw state dict) of the reference tiny DPT."""
    folder = ref_dir / "tiny_dpt"
    with open(folder / "config.json") as f:
        config = dpt.DPTConfig.from_hf_dict(json.load(f), str(folder / "config.json"))
    state_dict = load_state_dict(folder / "model.safetensors")
    params, report = convert_state_dict(state_dict, {"dpt": dpt.abstract_params(config)}, source=str(folder))
    return config, params["dpt"], report, state_dict


@pytest.fixture(scope="module")
def forward(tiny):
    """jitted (params, NHWC pixels) -> (predicted_depth, sown intermediates); one compile per shape."""
    model = dpt.DPTForDepthEstimation(tiny[0])

    @jax.jit
    def run(params, x):
        out, state = model.apply({"params": params}, x, mutable=["intermediates"])
        return out, state["intermediates"]

    return run


@pytest.fixture(scope="module")
def estimator(ref_dir):
    return depth_lib.DepthEstimator.from_pretrained(ref_dir / "tiny_dpt")


def _uniform_images(seed, shape):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------- config


def test_defaults_are_intel_dpt_large():
    config = dpt.DPTConfig()
    for key, value in INTEL_DPT_LARGE.items():
        assert getattr(config, key) == value, key
    assert config.fusion_bias  # use_bias_in_fusion_residual null -> not batch norm -> True
    # fields a config.json leaves out take transformers' class defaults (DPT-Base-like), as HF would
    assert dpt.DPTConfig.from_hf_dict({}).hidden_size == 768
    assert dpt.DPTConfig.from_hf_dict({**INTEL_DPT_LARGE, "image_size": [384, 384]}) == config


@pytest.mark.parametrize("field, value", [
    ("is_hybrid", True), ("use_batch_norm_in_fusion_residual", True), ("add_projection", True),
    ("readout_type", "concat"), ("hidden_act", "swish"), ("backbone_config", {"model_type": "dinov2"}),
    ("backbone_out_indices", [5, 11, 17]), ("backbone_out_indices", [5, 11, 17, 24]),
    ("reassemble_factors", [4, 2.5, 1, 0.5]), ("head_in_index", 4), ("num_attention_heads", 5),
])
def test_unsupported_settings_raise_config_error(field, value):
    with pytest.raises(ConfigError) as info:
        dpt.DPTConfig.from_hf_dict({**INTEL_DPT_LARGE, field: value}, "my/config.json")
    assert "my/config.json" in str(info.value) and field.split("_")[0] in str(info.value)


def test_tiny_config_reads(tiny, ref_dir):
    config, hf = tiny[0], json.loads((ref_dir / "tiny_dpt" / "config.json").read_text())
    assert (config.hidden_size, config.num_hidden_layers, config.image_size) == (
        hf["hidden_size"], hf["num_hidden_layers"], hf["image_size"])
    assert config.neck_hidden_sizes == tuple(hf["neck_hidden_sizes"])
    assert config.backbone_out_indices == tuple(hf["backbone_out_indices"])


# ------------------------------------------------------------------------------------------ parity


def test_conversion_report_is_clean(tiny):
    config, params, report, state_dict = tiny
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    ignored = sorted(k for k in state_dict if names.is_ignored(k, ("dpt",)))
    assert ignored == ["dpt.layernorm.bias", "dpt.layernorm.weight"]  # never used by DPTForDepthEstimation
    assert dpt.expected_param_count(config) == sum(v.size for v in jax.tree_util.tree_leaves(params))


def test_parity_with_reference(tiny, forward, ref):
    data = ref("dpt")
    pixels = nchw_to_nhwc(data["pixel_values"])
    ours, _ = forward(tiny[1], pixels)
    assert ours.shape == data["predicted_depth"].shape
    check_parity("dpt", "predicted_depth", ours, data["predicted_depth"])


def test_conv_transpose_equals_torch_definition():
    """torch ConvTranspose2d(k = stride): out[o, s*i + p, s*j + q] += x[c, i, j] * W[c, o, p, q] (+ bias)."""
    rng = np.random.default_rng(0)
    for k in (2, 4):
        cin, cout, h, w = 3, 5, 2, 3
        x = rng.standard_normal((1, h, w, cin)).astype(np.float32)
        weight = rng.standard_normal((cin, cout, k, k)).astype(np.float32)  # torch layout (in, out, kh, kw)
        bias = rng.standard_normal(cout).astype(np.float32)
        want = np.zeros((1, h * k, w * k, cout), np.float32) + bias
        for i in range(h):
            for j in range(w):
                for c in range(cin):
                    want[0, i * k:(i + 1) * k, j * k:(j + 1) * k, :] += x[0, i, j, c] * weight[c].transpose(1, 2, 0)
        kernel = names.to_ours(weight, "kernel")  # the converter's generic 4-D rule
        assert names.ours_shape_to_official(kernel.shape, "kernel") == weight.shape
        got = dpt.ConvTranspose(cout, k).apply({"params": {"kernel": kernel, "bias": bias}}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- position-embedding interpolation


def _hf_resize_pos_embed(posemb, grid_h, grid_w):
    """numpy transcription of HF DPTViTEmbeddings._resize_pos_embed (NCHW, torch bilinear align_corners=False)."""
    tok, grid = posemb[:, :1], posemb[0, 1:]
    old = int(len(grid) ** 0.5)
    grid = grid.reshape(1, old, old, -1).transpose(0, 3, 1, 2)  # (1, D, g, g)
    grid = np.einsum("oh,ndhw,pw->ndop", bilinear_matrix(old, grid_h, False).astype(np.float64), grid,
                     bilinear_matrix(old, grid_w, False).astype(np.float64))
    grid = grid.transpose(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return np.concatenate([tok, grid], axis=1)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (128, 128), (80, 48)])
def test_position_embeddings_follow_input_size(tiny, forward, ref, size):
    config, params = tiny[:2]
    batch = ref("dpt")["pixel_values"].shape[0]  # the reference batch: its own size reuses the parity test's compile
    pixels = _uniform_images(1, (batch,) + size + (3,))
    out, intermediates = forward(params, pixels)
    grid_h, grid_w = size[0] // config.patch_size, size[1] // config.patch_size
    # transformers: the 1/2-resolution stage has ceil(g / 2) rows; 5 fusion/head 2x upsamplings follow
    assert out.shape == (batch, 32 * -(-grid_h // 2), 32 * -(-grid_w // 2)) and bool(jnp.all(jnp.isfinite(out)))
    pos = np.asarray(intermediates["embeddings"]["position_embeddings"][0])
    assert pos.shape == (1, 1 + grid_h * grid_w, config.hidden_size)
    table = np.asarray(params["embeddings"]["position_embeddings"])
    if size == (config.image_size, config.image_size):
        np.testing.assert_array_equal(pos, table)  # the identity at the training size
    else:
        np.testing.assert_allclose(pos, _hf_resize_pos_embed(table.astype(np.float64), grid_h, grid_w),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pos, np.asarray(dpt.interpolate_pos_encoding(table, grid_h, grid_w)))


def test_odd_patch_grid_follows_midas_in_the_annotator(estimator):
    """80 x 48 pixels = a 5 x 3 patch grid: MiDaS v3.1 (official) keeps the input size, HF gives 96 x 64."""
    images = _uniform_images(5, (1, 80, 48, 3))
    assert estimator.predict(images).shape == (1, 80, 48)
    out = np.asarray(estimator(images))
    assert out.shape == (1, 80, 48, 3) and out.min() == 0.0 and out.max() == 1.0


# ------------------------------------------------------------------------------------------ full size


def hf_depth_state_dict_shapes(config: dpt.DPTConfig) -> dict:
    """{key: shape} of transformers' DPTForDepthEstimation state dict, from the architecture in modeling_dpt.py."""
    d, f, p, c, fh = (config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels,
                      config.fusion_hidden_size)
    s = {"dpt.embeddings.cls_token": (1, 1, d),
         "dpt.embeddings.position_embeddings": (1, (config.image_size // p) ** 2 + 1, d),
         "dpt.embeddings.patch_embeddings.projection.weight": (d, c, p, p),
         "dpt.embeddings.patch_embeddings.projection.bias": (d,),
         "dpt.layernorm.weight": (d,), "dpt.layernorm.bias": (d,)}

    def linear(key, n_out, n_in, bias=True):
        s[key + ".weight"] = (n_out, n_in)
        if bias:
            s[key + ".bias"] = (n_out,)

    def conv(key, n_out, n_in, k, bias=True):
        s[key + ".weight"] = (n_out, n_in, k, k)
        if bias:
            s[key + ".bias"] = (n_out,)

    for i in range(config.num_hidden_layers):
        pre = f"dpt.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear(pre + "attention.attention." + name, d, d, config.qkv_bias)
        linear(pre + "attention.output.dense", d, d)
        linear(pre + "intermediate.dense", f, d)
        linear(pre + "output.dense", d, f)
        for name in ("layernorm_before", "layernorm_after"):
            s[pre + name + ".weight"] = s[pre + name + ".bias"] = (d,)
    for i, (size, factor) in enumerate(zip(config.neck_hidden_sizes, config.reassemble_factors)):
        if config.readout_type == "project":
            linear(f"neck.reassemble_stage.readout_projects.{i}.0", d, 2 * d)
        conv(f"neck.reassemble_stage.layers.{i}.projection", size, d, 1)
        if factor > 1:
            s[f"neck.reassemble_stage.layers.{i}.resize.weight"] = (size, size, int(factor), int(factor))  # (in, out)
            s[f"neck.reassemble_stage.layers.{i}.resize.bias"] = (size,)
        elif factor < 1:
            conv(f"neck.reassemble_stage.layers.{i}.resize", size, size, 3)
        conv(f"neck.convs.{i}", fh, size, 3, bias=False)
        conv(f"neck.fusion_stage.layers.{i}.projection", fh, fh, 1)
        for r in (1, 2):
            for j in (1, 2):
                conv(f"neck.fusion_stage.layers.{i}.residual_layer{r}.convolution{j}", fh, fh, 3, config.fusion_bias)
    conv("head.head.0", fh // 2, fh, 3)
    conv("head.head.2", 32, fh // 2, 3)
    conv("head.head.4", 1, 32, 1)
    return s


def test_hf_key_generator_matches_the_tiny_checkpoint(tiny):
    config, _, _, state_dict = tiny
    assert hf_depth_state_dict_shapes(config) == {k: tuple(v.shape) for k, v in state_dict.items()}


def test_full_size_parameter_count_and_name_map():
    config = dpt.DPTConfig()
    boxed = dpt.abstract_params(config, boxed=True)
    params = nn.unbox(boxed)
    leaves = flatten_dict({"dpt": params})
    count = sum(int(np.prod(v.shape)) for v in leaves.values())
    official = hf_depth_state_dict_shapes(config)
    assert count == dpt.expected_param_count(config) == 343_028_417
    # transformers' count of Intel/dpt-large's DPTForDepthEstimation (ours + the unused final LayerNorm)
    assert sum(int(np.prod(s)) for s in official.values()) == dpt.expected_param_count(
        config, with_final_layernorm=True) == 343_030_465
    fake = {k: types.SimpleNamespace(shape=s) for k, s in official.items()}
    plan, report = plan_conversion(fake, {"dpt": params})
    assert report.ok, report.format("Intel/dpt-large key list")
    assert set(plan) == set(leaves) and len(set(plan.values())) == len(plan)
    for path, key in plan.items():
        assert names.ours_shape_to_official(tuple(leaves[path].shape), path[-1]) == official[key], key
    assert sorted(set(official) - set(plan.values())) == ["dpt.layernorm.bias", "dpt.layernorm.weight"]
    for leaf in jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape)
        assert all(isinstance(n, str) for n in leaf.names)


# ------------------------------------------------------------------------------------ depth procedure


def test_normalisation_is_over_the_whole_batch():
    pred = jnp.stack([jnp.linspace(1.0, 2.0, 16 * 16).reshape(16, 16), jnp.linspace(5.0, 9.0, 16 * 16).reshape(16, 16)])
    out = np.asarray(depth_lib.normalize_depth(pred))
    assert out.shape == (2, 16, 16, 3)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[0].max(), 1.0 / 8.0, rtol=1e-6)  # not stretched per image
    np.testing.assert_allclose(out[1].min(), 4.0 / 8.0, rtol=1e-6)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert not np.any(depth_lib.normalize_depth(jnp.ones((1, 4, 4))))  # constant: zeros, not NaN


def test_estimator_runs_the_official_procedure(estimator, tiny, forward):
    images = _uniform_images(2, (2, 64, 64, 3))
    images[1] *= 0.3  # a different range of inputs
    got = np.asarray(estimator(images))
    raw, _ = forward(tiny[1], images)  # same weights, converted directly
    raw = np.asarray(raw, np.float64)
    want = (raw - raw.min()) / (raw - raw.min()).max()
    np.testing.assert_allclose(got[..., 0], want, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 64, 64, 3) and got.min() == 0.0 and got.max() == 1.0
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
    per_image_max = got.reshape(2, -1).max(axis=1)
    assert per_image_max.min() < 1.0  # one image does not reach 1: min-max over the batch, not per image
    np.testing.assert_allclose(np.asarray(estimator.predict(images)), raw, rtol=1e-5, atol=1e-6)


def test_foreground_versions_controls_and_missing_images(estimator):
    fg = _uniform_images(3, (2, 64, 64, 3))
    mask = np.zeros((2, 64, 64, 1), np.float32)
    mask[:, 16:48, 8:40] = 1.0
    v1 = np.asarray(depth_lib.foreground_depth(estimator, fg, mask, "v1"))
    v2 = np.asarray(depth_lib.foreground_depth(estimator, fg, mask, "v2"))
    v3 = np.asarray(depth_lib.foreground_depth(estimator, fg, mask[..., 0], "v3"))
    np.testing.assert_array_equal(v1, np.asarray(estimator(fg)))
    np.testing.assert_array_equal(v2, np.asarray(estimator(fg * mask)))
    np.testing.assert_array_equal(v3, v1 * mask)
    assert not np.allclose(v1, v2) and not np.allclose(v2, v3) and not np.allclose(v1, v3)
    assert np.array_equal(np.asarray(depth_lib.foreground_depth(estimator, fg, mask)), v2)  # v2 is the default
    # controls: scale then clip to [0, 1]
    for scale in (0.0, 0.5, 1.0, 1.7, 2.0):
        ctl = np.asarray(depth_lib.apply_depth_control(v1, scale))
        np.testing.assert_allclose(ctl, np.clip(v1 * np.float32(scale), 0, 1), rtol=0, atol=0)
        assert ctl.min() >= 0.0 and ctl.max() <= 1.0
    assert np.asarray(depth_lib.apply_depth_control(v1, 2.0)).max() == 1.0
    # a missing image gives zeros
    for got in (depth_lib.foreground_depth(estimator, None, mask, "v2"),
                depth_lib.foreground_depth(estimator, np.zeros_like(fg), mask, "v1"),
                depth_lib.image_depth(estimator, None, shape=(2, 64, 64)),
                depth_lib.image_depth(estimator, np.zeros_like(fg))):
        assert got.shape == (2, 64, 64, 3) and not np.any(np.asarray(got))
    np.testing.assert_array_equal(np.asarray(depth_lib.image_depth(estimator, fg)), v1)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64, 3), np.float32), "NHWC"),
    (np.zeros((1, 64, 64, 4), np.float32), "NHWC"),
    (np.zeros((1, 64, 64, 3), np.uint8), "float"),
    (np.full((1, 64, 64, 3), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((1, 64, 64, 3), -0.1, np.float32), r"\[0, 1\]"),
    (np.full((1, 64, 64, 3), np.nan, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 72, 64, 3), np.float32), "multiples"),
    (np.zeros((1, 64, 8, 3), np.float32), "multiples"),
])
def test_bad_images_raise(estimator, bad, match):
    with pytest.raises(ValueError, match=match):
        estimator(bad)


def test_bad_masks_versions_and_scales_raise(estimator):
    fg = _uniform_images(4, (2, 64, 64, 3))
    with pytest.raises(ValueError, match="version"):
        depth_lib.foreground_depth(estimator, fg, np.ones((2, 64, 64)), "v4")
    with pytest.raises(ValueError, match="mask"):
        depth_lib.foreground_depth(estimator, fg, np.ones((2, 32, 32)), "v1")
    with pytest.raises(ValueError, match="mask"):
        depth_lib.foreground_depth(estimator, fg, np.full((2, 64, 64), 2.0), "v1")
    with pytest.raises(ValueError, match="shape"):
        depth_lib.image_depth(estimator, None)
    with pytest.raises(ValueError, match="finite"):
        depth_lib.apply_depth_control(np.zeros((1, 4, 4, 3)), float("nan"))


# ------------------------------------------------------------------------------- MiDaS (torch hub) layout


def _hf_to_midas(state_dict, stages):
    """Inverse of midas_to_hf on numpy arrays: fuse q/k/v, MiDaS names (+ timm's classifier head, dropped)."""
    hf = {k: v.numpy() for k, v in state_dict.items()}
    out = OrderedDict()
    block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    blocks = r"layernorm_before|layernorm_after|attention\.output\.dense|intermediate\.dense|output\.dense"
    stage = lambda m: int(m[1]) + 1  # noqa: E731
    rules = [
        (r"dpt\.embeddings\.cls_token", lambda m: "pretrained.model.cls_token"),
        (r"dpt\.embeddings\.position_embeddings", lambda m: "pretrained.model.pos_embed"),
        (r"dpt\.embeddings\.patch_embeddings\.projection\.(\w+)",
         lambda m: f"pretrained.model.patch_embed.proj.{m[1]}"),
        (rf"dpt\.encoder\.layer\.(\d+)\.({blocks})\.(\w+)",
         lambda m: f"pretrained.model.blocks.{m[1]}.{block[m[2]]}.{m[3]}"),
        (r"dpt\.layernorm\.(\w+)", lambda m: f"pretrained.model.norm.{m[1]}"),
        (r"neck\.reassemble_stage\.readout_projects\.(\d)\.0\.(\w+)",
         lambda m: f"pretrained.act_postprocess{stage(m)}.0.project.0.{m[2]}"),
        (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.(\w+)",
         lambda m: f"pretrained.act_postprocess{stage(m)}.3.{m[2]}"),
        (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.(\w+)",
         lambda m: f"pretrained.act_postprocess{stage(m)}.4.{m[2]}"),
        (r"neck\.convs\.(\d)\.(\w+)", lambda m: f"scratch.layer{stage(m)}_rn.{m[2]}"),
        (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(\w+)",
         lambda m: f"scratch.refinenet{stages - int(m[1])}.out_conv.{m[2]}"),
        (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(\w+)",
         lambda m: f"scratch.refinenet{stages - int(m[1])}.resConfUnit{m[2]}.conv{m[3]}.{m[4]}"),
        (r"head\.head\.(\d)\.(\w+)", lambda m: f"scratch.output_conv.{m[1]}.{m[2]}"),
    ]
    for key, value in hf.items():
        m = re.fullmatch(r"dpt\.encoder\.layer\.(\d+)\.attention\.attention\.query\.(\w+)", key)
        if m:
            parts = [hf[key.replace(".query.", f".{n}.")] for n in ("query", "key", "value")]
            out[f"pretrained.model.blocks.{m[1]}.attn.qkv.{m[2]}"] = np.concatenate(parts, axis=0)
            continue
        if re.search(r"\.attention\.attention\.(key|value)\.", key):
            continue
        for pattern, repl in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[repl(m)] = value
                break
        else:
            raise AssertionError(f"no MiDaS name for {key}")
    out["pretrained.model.head.weight"] = np.ones((10, hf["dpt.layernorm.weight"].shape[0]), np.float32)
    out["pretrained.model.head.bias"] = np.zeros((10,), np.float32)
    return out


def test_midas_layout_gives_identical_weights_and_outputs(tiny, forward, ref, tmp_path):
    config, params, _, state_dict = tiny
    midas = _hf_to_midas(state_dict, len(config.neck_hidden_sizes))
    assert any(".attn.qkv." in k for k in midas) and not any("attention.attention" in k for k in midas)
    path = tmp_path / "dpt_large_384.pt"
    save_torch_zip(path, midas)
    loaded = load_state_dict(path)
    renamed = midas_to_hf(loaded, source=str(path))
    assert isinstance(renamed["dpt.encoder.layer.0.attention.attention.key.weight"], RowSlice)
    assert sorted(renamed) == sorted(state_dict)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in state_dict.items()}
    converted, report = convert_state_dict(renamed, {"dpt": dpt.abstract_params(config)})
    assert report.ok
    ours, theirs = flatten_dict(converted["dpt"]), flatten_dict(params)
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg="/".join(key))
    pixels = nchw_to_nhwc(ref("dpt")["pixel_values"])
    np.testing.assert_array_equal(np.asarray(forward(converted["dpt"], pixels)[0]),
                                  np.asarray(forward(params, pixels)[0]))
    # the file route of DepthEstimator.from_pretrained (config given: the file is tiny, not DPT-Large)
    est = depth_lib.DepthEstimator.from_pretrained(path, config=config)
    for key, value in flatten_dict(est.params).items():
        np.testing.assert_array_equal(np.asarray(value), theirs[key])
