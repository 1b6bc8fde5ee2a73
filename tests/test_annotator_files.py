"""Annotator weights through convert_torch_weights.py, and the annotate front end on real files."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cnc_jax.annotators.clip_image import CLIPImageEmbedder
from cnc_jax.annotators.depth import DepthEstimator
from cnc_jax.annotators.saliency import SaliencyMasker
from cnc_jax.checkpoint import load_annotator, read_info
from cnc_jax.cli import annotate
from cnc_jax.cli import convert as convert_cli
from cnc_jax.models.dpt import DPTForDepthEstimation
from cnc_jax.models.u2net import U2Net
from tests.conftest import check_parity, nchw_to_nhwc


def convert(capsys, src, out):
    code = convert_cli.main(["convert", str(src), "--out", str(out)])
    _, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ref_dir):
    """The four tiny annotator sources, converted once: {name: folder}."""
    out = tmp_path_factory.mktemp("annotators")
    folders = {}
    for name, src in (("u2netp", "tiny_u2netp.pth"), ("u2netp_legacy", "tiny_u2netp_legacy.pth"),
                      ("clip", "tiny_clip_vision"), ("dpt", "tiny_dpt")):
        assert convert_cli.main(["convert", str(ref_dir / src), "--out", str(out / name)]) == 0
        folders[name] = out / name
    return folders


def test_converted_annotators_reproduce_the_references(converted, ref):
    assert {read_info(str(f))["kind"] for f in converted.values()} == {"u2net", "clip_vision", "dpt"}
    r = ref("u2netp")
    for name in ("u2netp", "u2netp_legacy"):
        config, params = load_annotator(str(converted[name]), "u2net")
        d0 = U2Net(config).apply({"params": params}, nchw_to_nhwc(r["input"]))[0]
        check_parity("converted annotators", f"u2netp d0 [{name}]", np.asarray(d0)[..., 0], r["d0"][:, 0])
        assert SaliencyMasker.from_checkpoint(str(converted[name])).config == config
    r = ref("clip_vision")
    embedder = CLIPImageEmbedder.from_pretrained(str(converted["clip"]))
    check_parity("converted annotators", "clip image_embeds", embedder.embed_pixels(nchw_to_nhwc(r["pixel_values"])),
                 r["image_embeds"])
    r = ref("dpt")
    estimator = DepthEstimator.from_pretrained(str(converted["dpt"]))  # the raw net: pixels are normalised here
    depth = DPTForDepthEstimation(estimator.config).apply({"params": estimator.params}, nchw_to_nhwc(r["pixel_values"]))
    check_parity("converted annotators", "dpt predicted_depth", depth, r["predicted_depth"])


def test_wrong_size_weights_are_one_clear_error(tmp_path, capsys, ref_dir):
    folder = tmp_path / "clip"
    shutil.copytree(ref_dir / "tiny_clip_vision", folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    code, err = convert(capsys, folder, tmp_path / "out")
    assert code == 2 and err.count("error:") == 1 and "mis-shaped" in err and "mlp.fc1.weight" in err
    assert not (tmp_path / "out").exists()


def _write_images(folder):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120] / 120.0
    base = np.stack([yy, xx, 1 - xx], -1)
    good = []
    for i, ext in enumerate(("png", "jpg")):
        image = np.clip(base * 255 + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i}.{ext}"
        Image.fromarray(image if i == 0 else image.transpose(1, 0, 2).copy()).save(path)
        good.append(path)
    gray = folder / "gray.png"
    Image.fromarray((base[..., 0] * 255).astype(np.uint8), "L").save(gray)
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return good, [gray, broken, folder / "missing.png"]


def test_annotate_writes_depth_mask_embedding(tmp_path, capsys, converted, ref_dir):
    good, bad = _write_images(tmp_path)
    out = tmp_path / "annotations"
    code = annotate.main([str(p) for p in good + bad] + [
        "--out", str(out), "--clip-vision", str(converted["clip"]), "--u2net", str(converted["u2netp"]),
        "--dpt", str(converted["dpt"]), "--size", "64"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "gray.png: a grayscale image" in err and "broken.jpg: not a readable image" in err
    assert "missing.png: no such file" in err
    for path in good:
        stem = out / path.stem
        depth = np.asarray(Image.open(f"{stem}_depth.png"))
        mask = np.asarray(Image.open(f"{stem}_mask.png"))
        emb = np.load(f"{stem}_emb.npy")
        assert depth.shape == (64, 64) and depth.min() == 0 and depth.max() == 255  # min-max normalised
        width = json.loads((ref_dir / "tiny_clip_vision" / "config.json").read_text())["projection_dim"]
        assert mask.shape == (64, 64) and emb.shape == (width,) and np.all(np.isfinite(emb))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}_{kind}" for p in good for kind in ("depth.png", "emb.npy", "mask.png"))


def test_image_sizing_helpers():
    from cnc_jax.annotators.images import dataset_transform, demo_resize

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    crop = dataset_transform(image, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    resized = np.asarray(Image.fromarray(image).resize((113, 64), Image.BICUBIC))  # int(64 * 160 / 90) = 113
    np.testing.assert_array_equal(crop, resized[:, 24:88])  # torchvision rounds the offset: round(24.5) = 24
    np.testing.assert_array_equal(demo_resize(image, (90, 160)), image)  # same size: identity
    flat = np.full((37, 23, 3), 77, np.uint8)
    assert np.all(demo_resize(flat, (64, 96)) == 77)
    up = demo_resize(np.array([[[0] * 3, [255] * 3]], np.uint8), (1, 4))[0, :, 0]
    np.testing.assert_array_equal(up, [0, 64, 191, 255])  # bilinear, half-pixel centres: 0, .25, .75, 1
