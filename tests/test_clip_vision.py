"""CLIP vision tower (HF CLIPVisionModelWithProjection) against clip_vision.npz, and the CLIP image preprocessing
against transformers' CLIPImageProcessor (PIL backend, runs without torch)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from cnc_jax.annotators.clip_image import CLIP_MEAN, CLIP_STD, CLIPImageEmbedder, preprocess
from cnc_jax.checkpoint import ConversionError, convert_state_dict
from cnc_jax.model_config import ConfigError
from cnc_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection, abstract_params, init_inputs
from cnc_jax.torchfile.state_dict import load_state_dict
from tests.conftest import check_parity, nchw_to_nhwc

PREPROCESS_TOL = 1e-5  # measured: 0.0 (same PIL resize, same float64 -> float32 casts as transformers)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dir(ref_dir):
    return ref_dir / "tiny_clip_vision"


@pytest.fixture(scope="module")
def config_dict(tiny_dir):
    with open(tiny_dir / "config.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def config(config_dict, tiny_dir):
    return CLIPVisionConfig.from_hf_dict(config_dict, str(tiny_dir / "config.json"))


@pytest.fixture(scope="module")
def state_dict(tiny_dir):
    return {k: np.asarray(v.numpy()) for k, v in load_state_dict(tiny_dir / "model.safetensors").items()}


@pytest.fixture(scope="module")
def params(state_dict, config):
    converted, report = convert_state_dict(state_dict, {"clip_vision": abstract_params(config)})
    assert report.ok
    return converted["clip_vision"]


@pytest.fixture(scope="module")
def forward(config):
    model = CLIPVisionModelWithProjection(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


@pytest.fixture(scope="module")
def hf_processor():
    import transformers  # installed by requirements.txt (the tokenizer); a missing install fails, never skips
    # Without torchvision transformers 5 falls back from CLIPImageProcessor to this PIL backend anyway (the
    # backend of the official transformers 4.29 environment); name it to stay on it when torchvision exists.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
               crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def hf_pixels(processor, images, **kwargs):
    out = processor(images, return_tensors="np", **kwargs)["pixel_values"]
    return nchw_to_nhwc(out)


def synthetic_image(height, width, seed=0):
    """A photo-like uint8 RGB image: smooth colour gradients, a disc, a box, a stripe pattern and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    img = np.stack([0.5 + 0.4 * np.sin(3 * x + 2 * y + rng.uniform(0, 6)),
                    0.3 + 0.5 * x * y,
                    0.6 - 0.4 * np.cos(5 * y - x)], axis=-1)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = rng.uniform(0, 1, 3)
    img[(np.abs(y - 0.25) < 0.1) & (np.abs(x - 0.7) < 0.15)] = rng.uniform(0, 1, 3)
    img[..., 1] += 0.15 * (np.sin(40 * x) > 0.6)
    img += rng.normal(0, 0.04, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- config
def test_config_from_file(config, config_dict):
    for field in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                  "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(config, field) == config_dict[field], field


def test_config_from_whole_clipmodel_config(config, config_dict):
    """A CLIPModel config.json: the tower is vision_config, projection_dim the top-level one."""
    vision = {k: v for k, v in config_dict.items() if k != "projection_dim"}
    whole = {"model_type": "clip", "projection_dim": config.projection_dim,
             "text_config": {"hidden_size": 16, "model_type": "clip_text_model"},
             "vision_config": dict(vision, model_type="clip_vision_model", projection_dim=config.projection_dim + 7)}
    assert CLIPVisionConfig.from_hf_dict(whole, "clip/config.json") == config


def test_default_config_is_vit_l14():
    cfg = CLIPVisionConfig()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.projection_dim, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_channels, cfg.image_size, cfg.patch_size, cfg.hidden_act,
            cfg.layer_norm_eps) == (1024, 4096, 768, 24, 16, 3, 224, 14, "quick_gelu", 1e-5)


@pytest.mark.parametrize("make_bad, problem", [
    (lambda d: [1, 2], "JSON object"),
    (lambda d: dict(d, hidden_act="relu"), "hidden_act"),
    (lambda d: dict(d, hidden_size=30, num_attention_heads=4), "divisible"),
    (lambda d: dict(d, hidden_size="32"), "hidden_size"),
    (lambda d: dict(d, num_hidden_layers=0), "num_hidden_layers"),
    (lambda d: dict(d, model_type="clip_text_model"), "model_type"),
    (lambda d: {"text_config": {}}, "vision_config"),
    (lambda d: {"model_type": "clip", "vision_config": None}, "vision_config"),
])
def test_config_errors_name_the_source(config_dict, make_bad, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        CLIPVisionConfig.from_hf_dict(make_bad(config_dict), "somewhere/config.json")
    assert "somewhere/config.json" in str(info.value)


# ---------------------------------------------------------------- model
def test_parity(params, forward, ref):
    r = ref("clip_vision")
    image_embeds, last_hidden_state = forward(params, nchw_to_nhwc(r["pixel_values"]))
    check_parity("clip_vision", "image_embeds", image_embeds, r["image_embeds"])
    check_parity("clip_vision", "last_hidden_state", last_hidden_state, r["last_hidden_state"])


def test_old_and_whole_clipmodel_state_dicts_convert(state_dict, config, params):
    """Older transformers write embeddings.position_ids; a whole CLIPModel adds the text tower: both ignored."""
    extra = dict(state_dict)
    extra["vision_model.embeddings.position_ids"] = np.arange(config.num_positions, dtype=np.int64)[None]
    extra["text_model.embeddings.position_ids"] = np.arange(7, dtype=np.int64)[None]
    extra["text_model.embeddings.token_embedding.weight"] = np.zeros((11, 8), np.float32)
    extra["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
    extra["text_model.final_layer_norm.weight"] = np.ones((8,), np.float32)
    extra["text_projection.weight"] = np.zeros((config.projection_dim, 8), np.float32)
    extra["logit_scale"] = np.array(2.6592, np.float32)
    converted, _ = convert_state_dict(extra, {"clip_vision": abstract_params(config)})
    want, got = flatten_dict(params), flatten_dict(converted["clip_vision"])
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))
    beyond = f"vision_model.encoder.layers.{config.num_hidden_layers}.mlp.fc1.weight"  # one layer too many
    with pytest.raises(ConversionError, match=beyond):
        convert_state_dict(dict(extra, **{beyond: np.zeros((2, 2))}), {"clip_vision": abstract_params(config)})


def test_every_parameter_has_logical_axes(config):
    boxed = abstract_params(config, boxed=True)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    emb = boxed["embeddings"]
    assert emb["class_embedding"].names == ("embed",)
    assert emb["patch_embedding"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")
    assert set(emb["patch_embedding"]) == {"kernel"}  # torch Conv2d(bias=False)
    assert set(boxed["visual_projection"]) == {"kernel"}


def test_wrong_image_size_is_refused(config, params, forward):
    with pytest.raises(ValueError, match="expects NHWC"):
        jax.eval_shape(forward, params, jnp.zeros((1, config.image_size // 2, config.image_size // 2, 3)))
    assert init_inputs(config)["pixel_values"].shape == (1, config.image_size, config.image_size, 3)


def test_full_size_parameter_count():
    cfg = CLIPVisionConfig()
    d, f, p, c, n = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels, cfg.num_hidden_layers
    positions = (cfg.image_size // p) ** 2 + 1
    embeddings = d + p * p * c * d + positions * d  # class token, bias-free patch conv, position table
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # q/k/v/out, fc1, fc2, layer_norm1/2
    vision_model = embeddings + 2 * d + n * layer + 2 * d  # + pre_layrnorm, post_layernorm
    tree = abstract_params(cfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert total == vision_model + d * cfg.projection_dim
    assert (vision_model, total) == (303_179_776, 303_966_208)


# ---------------------------------------------------------------- preprocessing
SHAPES = [(200, 300), (300, 200), (224, 224), (480, 640), (513, 97), (40, 50)]  # (H, W); the last needs upscaling


def test_preprocess_matches_transformers(hf_processor):
    images = [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)]
    mixed = [im if i % 2 else Image.fromarray(im) for i, im in enumerate(images)]  # PIL and numpy inputs
    ours = preprocess(mixed)
    theirs = hf_pixels(hf_processor, images)
    assert ours.shape == theirs.shape == (len(SHAPES), 224, 224, 3) and ours.dtype == np.float32
    assert float(np.max(np.abs(ours - theirs))) <= PREPROCESS_TOL


def test_preprocess_pads_like_transformers_when_crop_exceeds_resize(hf_processor):
    images = [synthetic_image(90, 61, seed=7)]
    theirs = hf_pixels(hf_processor, images, size={"shortest_edge": 100}, crop_size={"height": 150, "width": 120})
    ours = preprocess(images, size=100, crop_size=(150, 120))
    assert ours.shape == theirs.shape == (1, 150, 120, 3)
    assert float(np.max(np.abs(ours - theirs))) <= PREPROCESS_TOL


def test_pil_modes_convert_like_transformers(hf_processor):
    rgba = synthetic_image(120, 90, seed=3)
    alpha = synthetic_image(120, 90, seed=4)[..., :1]
    rgba = np.concatenate([rgba, alpha], axis=-1)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = 0
    images = [Image.fromarray(rgba[..., 0], "L"), Image.fromarray(rgba, "RGBA"),
              Image.fromarray(rgba[..., ::3].copy(), "LA"), palette, Image.fromarray(rgba[..., :3]).convert("CMYK")]
    for image in images:
        diff = np.max(np.abs(preprocess([image], composite_alpha=True) - hf_pixels(hf_processor, [image])))
        assert diff <= PREPROCESS_TOL, image.mode
    # default: transformers 4.29 (the official environment) dropped the alpha channel instead of compositing
    rgba_image = images[1]
    np.testing.assert_array_equal(preprocess([rgba_image]), preprocess([rgba_image.convert("RGB")]))


@pytest.mark.parametrize("bad, problem", [
    (np.zeros((40, 50, 3), np.float32), "uint8"),
    (np.zeros((40, 50), np.uint8), "grayscale"),
    (np.zeros((40, 50, 4), np.uint8), "RGBA"),
    (np.zeros((40, 50, 1), np.uint8), "single-channel"),
    (np.zeros((3, 40, 50), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((0, 50, 3), np.uint8), "empty"),
    ("cat.png", "PIL.Image.Image"),
])
def test_preprocess_rejects_wrong_arrays(bad, problem):
    with pytest.raises(ValueError, match=problem):
        preprocess([synthetic_image(30, 30), bad])
    with pytest.raises(ValueError, match="no images"):
        preprocess([])


# ---------------------------------------------------------------- embedder
def test_embedder_end_to_end(config, params, forward, tiny_dir):
    images = [Image.fromarray(synthetic_image(h, w, seed=10 + i)) for i, (h, w) in enumerate(SHAPES[:4])]
    embedder = CLIPImageEmbedder(config, params)
    got = np.asarray(embedder(images))
    pixels = preprocess(images, size=config.image_size, crop_size=config.image_size)
    want = np.asarray(forward(params, pixels)[0])
    assert got.shape == (len(images), config.projection_dim)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(embedder(images[::-1])), want[::-1], rtol=1e-6, atol=1e-6)
    if hasattr(embedder._forward, "_cache_size"):
        assert embedder._forward._cache_size() == 1  # one compile per batch shape
    loaded = CLIPImageEmbedder.from_pretrained(tiny_dir)
    assert loaded.config == config
    np.testing.assert_allclose(np.asarray(loaded.embed_pixels(pixels)), want, rtol=1e-6, atol=1e-6)
