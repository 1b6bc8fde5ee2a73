"""The training input pipeline on synthetic triplets: official transforms, file tree == TFDS, resume, host
sharding, skipped records, and the torch-format embedding writer."""

import multiprocessing
import os
import shutil
import zipfile

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cnc_jax.torchfile.state_dict import load_raw
from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.data.pipeline import TFDSSpec, make_train_iterator
from cnc_jax.prep.synthetic import random_scene, render, write_synthetic
from cnc_jax.data.tfds import build_tfds
from cnc_jax.torchfile.torch_save import save_torch
from cnc_jax.io import read_embedding
from cnc_jax.text_encoder import byte_level_tokenizer, tokenize

R = 64
TOKENIZER = byte_level_tokenizer()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A COCO-like tree (10 records, 96x128 images) and a Pick-a-Pic-like one (6 records), and their TFDS build."""
    root = tmp_path_factory.mktemp("data")
    coco = SourceSpec(str(root / "coco" / "images"), "train2017")
    pick = SourceSpec(str(root / "pickapic"), "train")
    write_synthetic(coco.base_dir, coco.split, 10, resolution=R, seed=0)
    write_synthetic(pick.base_dir, pick.split, 6, resolution=R, image_size=(R, R), seed=1)
    tfds_dir = str(root / "tfds")
    build_tfds(tfds_dir, {"train": [coco, pick]}, resolution=R)
    return {"root": root, "specs": [coco, pick], "tfds": TFDSSpec(tfds_dir)}


def iterate(sources, **kwargs):
    options = dict(batch_size=4, resolution=R, tokenizer=TOKENIZER, seed=0, num_epochs=1)
    options.update(kwargs)
    return make_train_iterator(sources, **options)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_torch_save_roundtrip(tmp_path):
    for array in (np.random.default_rng(0).standard_normal(768).astype(np.float32),
                  np.arange(6, dtype=np.float32).reshape(1, 6), np.arange(5, dtype=np.int64)):
        path = str(tmp_path / "emb.pt")
        save_torch(path, np.asarray(array))
        loaded = load_raw(path).numpy()
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        assert loaded.tobytes() == array.tobytes()
        with zipfile.ZipFile(path) as archive:  # torch's layout: <name>/..., data 64-byte aligned
            assert {i.filename for i in archive.infolist()} >= {"emb/data.pkl", "emb/data/0", "emb/byteorder"}
            for info in archive.infolist():
                assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0
    np.testing.assert_array_equal(read_embedding(path), np.arange(5))


def test_captions_keep_text_after_first_colon(tmp_path):
    path = tmp_path / "train_captions.txt"
    path.write_text("a1:a cat: sitting\n\nno colon here\nb2:plain\n  c3:spaces  \n")
    records, dropped = read_captions(str(path))
    assert records == [("a1", "a cat: sitting"), ("b2", "plain"), ("c3", "spaces")]
    assert dropped == 1


def test_synthetic_scene_is_exact(trees):
    coco = trees["specs"][0]
    records, _ = read_captions(coco.captions_file)
    assert any(caption.startswith("photo: ") for _, caption in records)
    uid = records[0][0]
    mask = np.asarray(Image.open(coco.path("mask", uid)))
    assert mask.shape == (R, R) and set(np.unique(mask)) <= {0, 255}
    fg_depth = np.asarray(Image.open(coco.path("fg_depth", uid)))
    assert fg_depth.shape == (R, R, 3)
    assert np.mean(fg_depth[mask == 0] <= 8) > 0.95  # black outside the mask (up to JPEG ringing at edges)
    scene = random_scene(np.random.default_rng(0))
    y, x = np.meshgrid((np.arange(R) + 0.5) / R, (np.arange(R) + 0.5) / R, indexing="ij")
    np.testing.assert_array_equal(render(scene, y, x)["mask"], mask == 255)


def test_batches_follow_the_official_transforms(trees):
    coco = trees["specs"][0]
    batch = next(iterate([coco], drop_caption_prob=0.0, drop_condition_prob=0.0, batch_size=10))
    assert batch["image"].shape == (10, R, R, 3) and batch["image"].dtype == np.float32
    assert batch["uid"].dtype.kind == "S" and batch["input_ids"].dtype == np.int32
    captions = dict(read_captions(coco.captions_file)[0])
    i = 0
    uid = batch["uid"][i].decode()
    image = Image.open(coco.path("image", uid)).convert("RGB")  # torchvision Resize(R, BICUBIC) + CenterCrop(R)
    w, h = image.size
    resized = np.asarray(image.resize((int(R * w / h), R), Image.BICUBIC), np.float32)
    left = int(round((resized.shape[1] - R) / 2.0))
    expected = (resized[:, left:left + R] / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(batch["image"][i], expected)
    mask = np.asarray(Image.open(coco.path("mask", uid)), np.float32)[..., None] / np.float32(255)
    np.testing.assert_array_equal(batch["mask"][i], mask)
    depth = np.asarray(Image.open(coco.path("bg_depth", uid)), np.float32) / np.float32(255)
    np.testing.assert_array_equal(batch["bg_depth"][i], depth)
    np.testing.assert_array_equal(batch["fg_emb"][i], read_embedding(coco.path("fg_emb", uid)))
    np.testing.assert_array_equal(batch["input_ids"][i], tokenize(TOKENIZER, [captions[uid]], 77)[0])


def test_file_tree_and_tfds_give_identical_batches(trees):
    kwargs = dict(num_epochs=2, drop_caption_prob=0.5, drop_condition_prob=0.5)
    from_files = list(iterate(trees["specs"], **kwargs))
    from_tfds = list(iterate([trees["tfds"]], **kwargs))
    assert len(from_files) == len(from_tfds) == 2 * 16 // 4
    for a, b in zip(from_files, from_tfds):
        assert_same(a, b)
    uids = np.concatenate([b["uid"] for b in from_files])
    assert sorted(uids[:16]) == sorted(uids[16:]) and list(uids[:16]) != list(uids[16:])  # reshuffled per epoch
    # dropout: zeros where dropped, about half the time, and the empty caption's ids
    dropped = np.concatenate([np.all(b["fg_emb"] == 0, axis=1) for b in from_files])
    assert 0 < dropped.sum() < len(dropped)
    empty = tokenize(TOKENIZER, [""], 77)[0]
    assert any((b["input_ids"] == empty).all(axis=1).any() for b in from_files)
    for b in from_files:
        assert b["mask"].max() == 1.0  # never dropped


def test_state_round_trips_through_orbax(trees, tmp_path):
    it = iterate(trees["specs"], batch_size=3, num_epochs=None)
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    resumed = iterate(trees["specs"], batch_size=3, num_epochs=None)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for batch in expected:
        assert_same(batch, next(resumed))


def test_two_hosts_see_disjoint_records_covering_the_dataset(trees):
    seen = []
    for shard in (0, 1):
        it = iterate(trees["specs"], batch_size=1, shard_index=shard, shard_count=2)
        seen.append([b["uid"][0] for b in it])
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    all_uids = {uid.encode() for spec in trees["specs"] for uid, _ in read_captions(spec.captions_file)[0]}
    assert set(seen[0]) | set(seen[1]) == all_uids


def test_global_batches_are_the_same_on_one_or_two_hosts(trees):
    """Host h's k-th batch is rows [h*b, (h+1)*b) of the one-host k-th batch of 2b (dropout draws included), also
    after two passes and when both start later in the stream."""
    records = sum(len(read_captions(spec.captions_file)[0]) for spec in trees["specs"])
    for start in (0, 6):
        one = list(iterate(trees["specs"], batch_size=4, num_epochs=2, start_position=start, drop_condition_prob=0.5))
        hosts = [list(iterate(trees["specs"], batch_size=2, num_epochs=2, shard_index=h, shard_count=2,
                              start_position=start, drop_condition_prob=0.5)) for h in (0, 1)]
        assert len(one) == len(hosts[0]) == len(hosts[1]) == (2 * records - start) // 4 > 0
        for whole, first, second in zip(one, *hosts):
            assert_same(whole, {k: np.concatenate([first[k], second[k]]) for k in whole})


@pytest.fixture(scope="module")
def damaged(trees):
    """A copy of the COCO-like tree with one corrupt image and one missing depth map."""
    coco = trees["specs"][0]
    base = str(trees["root"] / "damaged" / "images")
    shutil.copytree(coco.base_dir, base)
    spec = SourceSpec(base, coco.split)
    uids = [uid for uid, _ in read_captions(spec.captions_file)[0]]
    with open(spec.path("image", uids[2]), "r+b") as f:
        f.write(b"this is not a jpeg")
    os.remove(spec.path("bg_depth", uids[5]))
    return spec, {uids[2], uids[5]}


def test_missing_and_corrupt_files_are_skipped_and_counted(damaged, caplog):
    spec, bad = damaged
    it = iterate([spec], batch_size=2)
    uids = [uid.decode() for batch in it for uid in batch["uid"]]
    assert it.skipped == 2
    assert len(uids) == 8 and not set(uids) & bad
    assert sum("skipped record" in r.message for r in caplog.records) == 2
    assert any("bg_depth" in r.message or "no such file" in r.message for r in caplog.records)


def test_resume_mid_batch_after_skips(damaged):
    spec, _ = damaged
    reference = iterate([spec], batch_size=3, num_epochs=None)
    batches = [next(reference) for _ in range(5)]
    it = iterate([spec], batch_size=3, num_epochs=None)
    next(it)
    next(it)
    state = it.get_state()
    resumed = iterate([spec], batch_size=3, num_epochs=None)
    resumed.set_state(state)
    for expected in batches[2:]:
        assert_same(expected, next(resumed))
    assert resumed.skipped == reference.skipped


def test_tfds_build_leaves_out_bad_records(damaged, tmp_path):
    spec, bad = damaged
    build_tfds(str(tmp_path), {"train": [spec]}, resolution=R)
    it = iterate([TFDSSpec(str(tmp_path))], batch_size=1)
    uids = {b["uid"][0].decode() for b in it}
    assert len(uids) == 8 and not uids & bad and it.skipped == 0


def test_worker_processes(trees, damaged):
    spec, _ = damaged
    kwargs = dict(batch_size=2, num_workers=2, num_epochs=None)
    it = iterate([spec, trees["specs"][1]], **kwargs)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    assert it.skipped == 2  # 10 batches of 2 cover the 16 records of the first epoch
    workers = multiprocessing.active_children()
    it.close()
    assert workers and not any(worker.is_alive() for worker in workers)
    resumed = iterate([spec, trees["specs"][1]], **kwargs)
    resumed.set_state(state)
    for batch in expected:
        assert_same(batch, next(resumed))
    assert resumed.skipped == 2
    resumed.close()


def test_bad_arguments(trees):
    with pytest.raises(ValueError, match="shard_index"):
        iterate(trees["specs"], shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="not a cached build"):
        iterate([trees["tfds"]], cached=True)
    with pytest.raises(FileNotFoundError, match="captions"):
        iterate([SourceSpec(str(trees["root"]), "nothing")])
