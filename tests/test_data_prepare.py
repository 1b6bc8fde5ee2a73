"""Dataset preparation end to end on synthetic scenes with tiny random-weight models: every step of
`python -m cnc_jax.cli.prepare`, resuming, and a cached TFDS build read back through the pipeline."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cnc_jax.annotators.saliency import SaliencyMasker
from cnc_jax.checkpoint import load_converted
from cnc_jax.cli.prepare import main
from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.data.pipeline import TFDSSpec, make_train_iterator
from cnc_jax.data.records import resize_crop
from cnc_jax.data_parallel import DataParallel
from cnc_jax.model_config import load_config
from cnc_jax.models.vae import AutoencoderKL
from cnc_jax.prep.synthetic import write_synthetic
from cnc_jax.prep.tiny_models import write_tiny_models
from cnc_jax.prep.triplets import dilate_mask, foreground_image, thing_mask
from cnc_jax.text_encoder import TextEncoder, load_tokenizer

R = 64
STEP_OUTPUTS = {"masks-cocostuff": ["mask"], "masks-saliency": ["mask"], "foreground": ["foreground"],
                "background": ["background"], "primitives": ["fg_depth", "bg_depth", "fg_emb", "bg_emb"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")))


def run(step, spec, *extra):
    return main([step, "--base-dir", spec.base_dir, "--split", spec.split, *extra])


def step_args(step, models):
    common = ["--resolution", str(R), "--batch-size", "4"]
    return {"masks-cocostuff": common, "foreground": common,
            "masks-saliency": common + ["--u2net", models["u2net"]],
            "background": common + ["--inpaint", models["sd_inpaint"], "--tokenizer", models["tokenizer"],
                                    "--steps", "2"],
            "primitives": common + ["--clip-vision", models["clip_vision"], "--dpt", models["dpt"]]}[step]


def mtimes(spec, fields):
    return {f: sorted(os.path.getmtime(os.path.join(spec.folder(f), n)) for n in os.listdir(spec.folder(f)))
            for f in fields}


def run_and_rerun(steps, spec, models, capsys):
    """Run each step; re-running it must find every uid done and write nothing."""
    for step in steps:
        assert run(step, spec, *step_args(step, models)) == 0, step
        before = mtimes(spec, STEP_OUTPUTS[step])
        assert run(step, spec, *step_args(step, models)) == 0
        assert "0 written" in capsys.readouterr().out
        assert mtimes(spec, STEP_OUTPUTS[step]) == before


def test_official_array_operations():
    labels = np.array([[0, 1, 90, 91], [181, 255, 45, 120]], np.uint8)
    np.testing.assert_array_equal(thing_mask(labels), [[255, 255, 255, 0], [0, 0, 255, 0]])
    mask = np.zeros((100, 100), np.uint8)
    mask[50, 50] = 255
    ys, xs = np.nonzero(dilate_mask(mask))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 74, 25, 74)  # scipy: 50x50 square, origin 25
    image = np.full((2, 2, 3), 201, np.uint8)
    half = np.full((2, 2, 1), 128, np.uint8)
    assert foreground_image(image, half)[0, 0, 0] == int(np.float32(201 / 255) * np.float32(128 / 255) * 255)


def test_cocostuff_steps(tmp_path, models, capsys):
    spec = SourceSpec(str(tmp_path / "cocostuff" / "images"), "train2017")
    uids = write_synthetic(spec.base_dir, spec.split, 6, layout="coco", resolution=R, seed=3)
    coco_json = str(tmp_path / "cocostuff" / "annotations" / "captions_train2017.json")
    assert run("captions", spec, "--coco-json", coco_json) == 0
    records, _ = read_captions(spec.captions_file)
    assert [uid for uid, _ in records] == uids  # the image without a file is not listed
    assert all("\n" not in caption and "another" not in caption for _, caption in records)
    assert any(caption.startswith("photo: ") for _, caption in records)
    assert run("captions", spec, "--coco-json", coco_json) == 0 and "nothing to do" in capsys.readouterr().out

    run_and_rerun(["masks-cocostuff", "foreground", "background", "primitives"], spec, models, capsys)
    uid = uids[0]
    labels = np.asarray(Image.open(os.path.join(tmp_path, "cocostuff", "annotations", spec.split, f"{uid}.png")))
    mask = np.asarray(Image.open(spec.path("mask", uid)))
    np.testing.assert_array_equal(mask, thing_mask(resize_crop(labels, R)))
    assert 0 < (mask == 255).mean() < 1
    for field in ("foreground", "background", "fg_depth", "bg_depth"):
        assert Image.open(spec.path(field, uid)).size == (R, R)
    batch = next(make_train_iterator([spec], batch_size=3, resolution=R, tokenizer=load_tokenizer(models["tokenizer"])))
    assert batch["fg_emb"].shape == (3, 32) and batch["fg_depth"].max() == 1.0  # per-image min-max depth


def test_saliency_masks(tmp_path, models, capsys):
    spec = SourceSpec(str(tmp_path / "pickapic"), "train")
    uids = write_synthetic(spec.base_dir, spec.split, 5, layout="pickapic", resolution=R, seed=4)
    run_and_rerun(["masks-saliency"], spec, models, capsys)
    masker, parallel = SaliencyMasker.from_checkpoint(models["u2net"], size=R), DataParallel()
    masker.params = parallel.replicate(masker.params)  # as the step does: its compiled program is reused
    images = np.stack([np.asarray(Image.open(spec.path("image", u))) for u in uids[:4]]) / np.float32(255)
    expected = (parallel.map(masker, images)[..., 0] * np.float32(255)).astype(np.uint8)  # ToPILImage truncates
    for uid, mask in zip(uids, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(spec.path("mask", uid))), mask)


def test_steps_default_to_the_trees_resolution_and_say_when_they_compile(tmp_path, models, capsys):
    """A tree the synthetic generator wrote at --resolution 64 is prepared at 64 unless told otherwise (not at the
    official 512, which takes minutes a step on a CPU); a step that runs a model says its first batch compiles."""
    spec = SourceSpec(str(tmp_path / "t"), "train")
    write_synthetic(spec.base_dir, spec.split, 3, resolution=R, seed=6)
    shutil.rmtree(spec.folder("foreground"))
    assert run("foreground", spec, "--batch-size", "4") == 0
    out = capsys.readouterr().out
    assert f"resolution {R}: the side of the maps in {spec}" in out and "3 written" in out
    assert all(Image.open(os.path.join(spec.folder("foreground"), n)).size == (R, R)
               for n in os.listdir(spec.folder("foreground")))
    shutil.rmtree(spec.folder("mask"))
    assert run("masks-saliency", spec, "--batch-size", "4", "--u2net", models["u2net"]) == 0
    captured = capsys.readouterr()
    assert f"resolution {R}:" in captured.out and "first batch: compiling the model" in captured.err


def test_bad_inputs_are_reported(tmp_path, models, capsys):
    spec = SourceSpec(str(tmp_path / "t"), "train")
    write_synthetic(spec.base_dir, spec.split, 3, resolution=R, seed=5)
    assert run("captions", spec, "--coco-json", str(tmp_path / "missing.json"), "--force") == 2
    assert "missing.json" in capsys.readouterr().err
    uids = [uid for uid, _ in read_captions(spec.captions_file)[0]]
    for field, uid in (("foreground", uids[0]), ("foreground", uids[1]), ("mask", uids[1])):
        os.remove(spec.path(field, uid))
    assert run("foreground", spec, *step_args("foreground", models)) == 1  # uids[1] lacks its mask
    captured = capsys.readouterr()
    assert "_mask" in captured.err and "1 written, 1 failed" in captured.out


def test_inpainting_config(capsys, tmp_path):
    assert main(["inpainting-config"]) == 0
    path = tmp_path / "sd_inpaint.json"
    path.write_text(capsys.readouterr().out)
    config = load_config(str(path))
    assert config.mode == "sd" and config.unet.in_channels == 9 and config.unet.model_channels == 320


def test_inpainting_checkpoint_converts(tmp_path, ref_dir, capsys):
    """The documented route: an SD checkpoint whose UNet takes 9 channels converts with an inpainting config."""
    from cnc_jax.cli import convert as convert_cli
    from cnc_jax.prep.inpaint import inpainting_config
    from cnc_jax.torchfile.state_dict import load_state_dict
    from tests.torch_files import save_torch_zip

    sd_keys = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    weights = {k: v.numpy() for k, v in load_state_dict(ref_dir / "tiny_local.ckpt").items() if k.startswith(sd_keys)}
    conv_in = weights["model.diffusion_model.input_blocks.0.0.weight"]
    extra = np.random.default_rng(0).standard_normal((conv_in.shape[0], 5) + conv_in.shape[2:]).astype(conv_in.dtype)
    weights["model.diffusion_model.input_blocks.0.0.weight"] = np.concatenate([conv_in, extra], axis=1)
    save_torch_zip(tmp_path / "inpaint.ckpt", {"state_dict": weights})
    base = load_config(str(ref_dir / "tiny_local_config.yaml"))
    config = inpainting_config(dataclasses.replace(base, mode="sd", local_fuser=None, global_fuser=None))
    (tmp_path / "inpaint.json").write_text(config.to_json())
    assert convert_cli.main(["convert", str(tmp_path / "inpaint.ckpt"), "--config",
                                       str(tmp_path / "inpaint.json"), "--out", str(tmp_path / "out")]) == 0
    converted, params = load_converted(str(tmp_path / "out"))
    assert converted == config
    kernel = params["unet"]["conv_in"]["kernel"]  # HWIO: the 5 new input channels land after the 4 latent ones
    np.testing.assert_array_equal(kernel[..., 4:, :], np.transpose(extra, (2, 3, 1, 0)))


def test_cached_tfds_build(tmp_path, models):
    spec = SourceSpec(str(tmp_path / "full"), "train")
    write_synthetic(spec.base_dir, spec.split, 6, resolution=R, seed=6)
    data_dir = str(tmp_path / "tfds")
    assert main(["tfds", "--source", f"{spec.base_dir}:{spec.split}", "--data-dir", data_dir, "--resolution", str(R),
                 "--cached", "--sd", models["sd_inpaint"], "--tokenizer", models["tokenizer"],
                 "--batch-size", "4"]) == 0
    tokenizer = load_tokenizer(models["tokenizer"])
    kwargs = dict(batch_size=6, resolution=R, tokenizer=tokenizer, drop_caption_prob=0.5, num_epochs=1, seed=1)
    batch = next(make_train_iterator([TFDSSpec(data_dir, "cnc_triplets/cached")], cached=True, **kwargs))
    plain = next(make_train_iterator([spec], **kwargs))
    for key in plain:
        np.testing.assert_array_equal(batch[key], plain[key], err_msg=key)
    config, params = load_converted(models["sd_inpaint"], ("vae", "text_encoder"))
    vae = AutoencoderKL(config.vae)
    moments = vae.apply({"params": params["vae"]}, batch["image"], method=AutoencoderKL.encode)
    np.testing.assert_allclose(batch["latent_moments"], moments, atol=1e-4)
    assert batch["latent_moments"].shape == (6, R // 8, R // 8, 8)
    captions = dict(read_captions(spec.captions_file)[0])
    texts = TextEncoder(config.text_encoder, params["text_encoder"], tokenizer)(
        [captions[u.decode()] for u in batch["uid"]] + [""])
    empty_ids = tokenizer([""], padding="max_length", max_length=77)["input_ids"][0]
    dropped = (batch["input_ids"] == np.asarray(empty_ids)).all(axis=1)
    assert 0 < dropped.sum() < 6
    for i in range(6):
        np.testing.assert_allclose(batch["text_embedding"][i], texts[-1] if dropped[i] else texts[i], atol=1e-5)
    with pytest.raises(ValueError, match="resolution"):
        make_train_iterator([TFDSSpec(data_dir, "cnc_triplets/cached")], cached=True,
                            **{**kwargs, "resolution": 2 * R})
    with open(os.path.join(data_dir, "cnc_triplets", "cached", "1.0.0", "metadata.json")) as f:
        assert json.load(f)["skipped"] == []
