"""Evaluation networks converted torch-free vs pytorch-fid / lpips / transformers (CNC_REFERENCE_DIR/eval/)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.checkpoint import load_annotator, load_eval_net, read_info
from cnc_jax.cli import convert as convert_cli
from cnc_jax.data_parallel import DataParallel
from cnc_jax.eval import metrics
from cnc_jax.eval.nets import InceptionFeatures, fid_resize
from cnc_jax.models.clip_model import CLIPTextModelWithProjection
from cnc_jax.models.clip_vision import CLIPVisionModelWithProjection
from cnc_jax.models.inception import InceptionConfig
from cnc_jax.models.lpips import LPIPS
from cnc_jax.models.resize import resize_bilinear
from tests.conftest import check_parity, nchw_to_nhwc


@pytest.fixture(scope="module")
def eval_ref(ref):
    return ref("eval/eval_ref")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ref_dir):
    """The three evaluation sources converted once by the CLI: {kind: folder}."""
    out, src = tmp_path_factory.mktemp("eval_nets"), ref_dir / "eval"
    runs = {"fid_inception": [str(src / "fid_inception.pth")],
            "lpips": [str(src / "lpips_alexnet_features.pth"), "--lpips-lin", str(src / "lpips_alex_lin.pth")],
            "clip": [str(src / "tiny_clip_model")]}
    for kind, argv in runs.items():
        assert convert_cli.main(["convert", *argv, "--out", str(out / kind)]) == 0
    return {kind: str(out / kind) for kind in runs}


def test_converter_detects_the_kinds(converted):
    assert {kind: read_info(folder)["kind"] for kind, folder in converted.items()} == {
        "fid_inception": "fid_inception", "lpips": "lpips", "clip": "clip"}


def test_fid_inception_pool3_and_logits(converted, eval_ref):
    """Through evaluate.py's path: images resized to 299 on the host, then the network (sharded, padded batch)."""
    config, params = load_eval_net(converted["fid_inception"], "fid_inception")
    assert config.num_classes == eval_ref["fid_logits"].shape[1]
    features = InceptionFeatures(config, params["fid_inception"], DataParallel(), len(eval_ref["fid_images"]) + 1)
    pool3, logits = features(list(nchw_to_nhwc(eval_ref["fid_images"])))
    check_parity("eval fid_inception", "pool3", pool3, eval_ref["fid_pool3"])
    check_parity("eval fid_inception", "logits", logits, eval_ref["fid_logits"])


def test_host_resize_equals_the_networks_resize(eval_ref):
    """FIDInceptionV3 resizes inside (torch bilinear); InceptionFeatures does the same on the host first."""
    config = InceptionConfig()
    images = nchw_to_nhwc(eval_ref["fid_images"])
    host = np.stack([fid_resize(x, config.input_size) for x in images])
    inside = resize_bilinear(jnp.asarray(images), (config.input_size, config.input_size))
    np.testing.assert_allclose(host, inside, rtol=0, atol=1e-6)


def test_lpips_alex(converted, eval_ref):
    config, params = load_eval_net(converted["lpips"], "lpips")
    assert config.net == "alex"
    d = jax.jit(lambda p, a, b: LPIPS(config).apply({"params": p}, a, b))(
        params["lpips"], nchw_to_nhwc(eval_ref["lpips_a"]), nchw_to_nhwc(eval_ref["lpips_b"]))
    check_parity("eval lpips", "lpips_alex", d, eval_ref["lpips_alex"])


def test_clip_embeddings_and_score(converted, eval_ref):
    config, params = load_eval_net(converted["clip"], "clip")
    image = jax.jit(lambda p, x: CLIPVisionModelWithProjection(config.vision).apply({"params": p}, x)[0])(
        params["clip_vision"], nchw_to_nhwc(eval_ref["clip_pixel_values"]))
    text = jax.jit(lambda p, ids: CLIPTextModelWithProjection(config).apply({"params": p}, ids))(
        params["clip_text"], eval_ref["clip_input_ids"])
    check_parity("eval clip", "image_embeds", image, eval_ref["clip_image_embeds"], tol=1e-5)
    check_parity("eval clip", "text_embeds", text, eval_ref["clip_text_embeds"], tol=1e-5)
    pairs = metrics.clip_pair_scores(image, text)
    check_parity("eval clip", "per_pair", pairs, eval_ref["clip_per_pair"], tol=1e-5)
    check_parity("eval clip", "clip_score", metrics.clip_score(pairs), eval_ref["clip_score"], tol=1e-5)


def test_converted_clip_model_serves_as_the_samplers_clip_vision(converted):
    """sample.py --clip-vision may take the whole converted CLIPModel: its vision tower."""
    config, params = load_eval_net(converted["clip"], "clip")
    vision_config, vision = load_annotator(converted["clip"], "clip_vision")
    assert vision_config == config.vision
    assert jax.tree.all(jax.tree.map(np.array_equal, vision, params["clip_vision"]))


@pytest.mark.parametrize("argv, message", [
    (["lpips_alex_lin.pth"], "only LPIPS heads"),
    (["lpips_alexnet_features.pth"], "--lpips-lin"),
    (["lpips_alexnet_features.pth", "--lpips-lin", "fid_inception.pth"], "not an lpips heads file"),
    (["fid_inception.pth", "--lpips-lin", "lpips_alex_lin.pth"], "only for an LPIPS trunk"),
    (["eval_ref.json"], "not a recognised checkpoint"),
])
def test_wrong_files_give_one_clear_error(tmp_path, ref_dir, capsys, argv, message):
    argv = [a if a.startswith("--") else str(ref_dir / "eval" / a) for a in argv]
    assert convert_cli.main(["convert", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # beside it: the reading progress bar
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_clip_config_sizes_come_from_the_folder(converted, ref_dir):
    hf = json.loads((ref_dir / "eval" / "tiny_clip_model" / "config.json").read_text())
    config, _ = load_eval_net(converted["clip"], "clip")
    assert config.projection_dim == hf["projection_dim"]
    assert config.vision.image_size == hf["vision_config"]["image_size"]
    assert config.text.eos_token_id == hf["text_config"]["eos_token_id"]


def test_vgg16_trunk_and_a_whole_torchvision_file_convert(tmp_path):
    """lpips' VGG16 taps go through the same code path: torchvision `features.N` names (with `classifier.*` of a
    whole torchvision file ignored) and the five heads sized by the tap widths."""
    from safetensors.numpy import save_file

    from cnc_jax.models.lpips import TRUNKS

    rng = np.random.default_rng(0)
    tensors, cin, widths, divisor = {}, 3, [], 8  # widths / 8: the real ones would be a 59 MB file
    for layer in TRUNKS["vgg"]:
        if layer[0] == "conv":
            _, index, out, kernel, _, _ = layer
            out //= divisor
            tensors[f"features.{index}.weight"] = rng.standard_normal((out, cin, kernel, kernel)).astype(np.float32)
            tensors[f"features.{index}.bias"] = np.zeros(out, np.float32)
            cin = out
        elif layer[0] == "tap":
            widths.append(cin)
    tensors["classifier.0.weight"] = np.zeros((4, 8), np.float32)
    heads = {f"lin{k}.model.1.weight": np.ones((1, w, 1, 1), np.float32) for k, w in enumerate(widths)}
    save_file(tensors, str(tmp_path / "vgg16.safetensors"))
    save_file(heads, str(tmp_path / "vgg.safetensors"))
    assert convert_cli.main(["convert", str(tmp_path / "vgg16.safetensors"), "--lpips-lin",
                                       str(tmp_path / "vgg.safetensors"), "--out", str(tmp_path / "out")]) == 0
    config, params = load_eval_net(str(tmp_path / "out"), "lpips")
    assert config.net == "vgg" and config.channel_divisor == divisor
    assert [w * divisor for w in widths] == [64, 128, 256, 512, 512]
    got = params["lpips"]
    np.testing.assert_array_equal(got["trunk"]["features_28"]["kernel"],
                                  tensors["features.28.weight"].transpose(2, 3, 1, 0))
    assert [got[f"lin{k}"]["kernel"].shape for k in range(5)] == [(1, 1, w, 1) for w in widths]


def test_clip_captions_are_cut_not_truncated():
    """torchmetrics cuts over-long token sequences at max_position_embeddings (the end token is lost), and pads."""
    from cnc_jax.eval.nets import CLIPScorer, random_nets

    nets = random_nets(["clip"])
    config, params = nets.clip
    scorer = CLIPScorer(config, params, nets.tokenizer, DataParallel(), 2)
    length = config.text.max_position_embeddings
    ids = scorer.tokenize(["x " * (2 * length), "a cat"])
    assert ids.shape == (2, length)
    assert ids[0, 0] == config.text.bos_token_id and config.text.eos_token_id not in ids[0]
    full = nets.tokenizer(["a cat"])["input_ids"][0]
    assert list(ids[1, :len(full)]) == full and set(ids[1, len(full):]) == {config.text.pad_token_id}
