"""`prepare pickapic` (the official data/parse_pickapic.py) on small parquet files the test writes."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnc_jax.cli import prepare
from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.prep.pickapic import STOPWORDS, clean_caption

R = 64  # output side for the test; the official 512 is the CLI default


def jpg(seed: int, size=(70, 90)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def official_transform(data: bytes, size: int) -> np.ndarray:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, written out with PIL."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


ROWS = [  # caption, label_0, label_1, uid_0, uid_1, expected (uid, caption) or None
    ("a red fox: in the snow", 1.0, 0.0, "a0", "a1", ("a0", "a red fox in the snow")),
    ("an old tram at night", 0.0, 1.0, "b0", "b1", ("b1", "an old tram at night")),
    ("two boats on a lake", 0.5, 0.5, "c0", "c1", ("c1", "two boats on a lake")),   # tie -> image 1
    ("a Girl with a hat", 1.0, 0.0, "d0", "d1", None),                              # stopword (case-insensitive)
    ("girlfriend of a painter", 1.0, 0.0, "e0", "e1", ("e0", "girlfriend of a painter")),  # whole words only
    ("castle", 1.0, 0.0, "f0", "f1", None),                                         # fewer than 3 words
    ("same picture again here", 0.0, 1.0, "g0", "b1", None),                        # uid b1 already taken
    ("a:b c", 1.0, 0.0, "h0", "h1", None),                                          # 'ab c': 2 words
]


@pytest.fixture()
def parquet_dir(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    columns = {k: [] for k in ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1")}
    for i, (caption, l0, l1, u0, u1, _) in enumerate(ROWS):
        for key, value in zip(columns, (caption, l0, l1, u0, u1, jpg(2 * i), jpg(2 * i + 1, (90, 70)))):
            columns[key].append(value)
    half = len(ROWS) // 2
    for name, part in (("b.parquet", slice(half, None)), ("a.parquet", slice(0, half))):  # read in name order
        pq.write_table(pa.table({k: v[part] for k, v in columns.items()}), folder / name)
    (folder / "notes.txt").write_text("not a parquet file")
    return folder


def expected_images() -> dict:
    out = {}
    for i, (*_, picked) in enumerate(ROWS):
        if picked:
            pick = int(picked[0].endswith("1"))
            out[picked[0]] = jpg(2 * i + pick, (90, 70) if pick else (70, 90))
    return out


def test_official_selection_captions_and_images(parquet_dir, tmp_path, capsys):
    spec = SourceSpec(str(tmp_path / "pickapic"), "val")
    args = ["pickapic", "--base-dir", spec.base_dir, "--split", "val", "--parquet-dir", str(parquet_dir),
            "--resolution", str(R)]
    assert prepare.main(args) == 0
    records, dropped = read_captions(spec.captions_file)
    assert dropped == 0 and records == [r[-1] for r in ROWS if r[-1]]
    for uid, data in expected_images().items():
        written = np.asarray(Image.open(spec.path("image", uid)))
        assert written.shape == (R, R, 3)
        reference = np.asarray(Image.open(io.BytesIO(
            _jpeg(official_transform(data, R)))))  # the official pipeline then image.save (JPEG quality 75)
        np.testing.assert_array_equal(written, reference)
    out = capsys.readouterr().out
    assert f"{len(ROWS)} rows, 3 filtered, 1 duplicate uids, 4 selected" in out and "4 written" in out

    # a re-run decodes nothing and writes the same captions
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "pickapic" / "val").iterdir()}
    assert prepare.main(args) == 0
    assert "4 already done, 0 written" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "pickapic" / "val").iterdir()}


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_shards_split_the_images(parquet_dir, tmp_path):
    spec = SourceSpec(str(tmp_path / "pickapic"), "val")
    written = []
    for index in range(2):
        assert prepare.main(["pickapic", "--base-dir", spec.base_dir, "--split", "val", "--parquet-dir",
                             str(parquet_dir), "--resolution", str(R), "--shard", f"{index}/2"]) == 0
        written.append({p.stem for p in (tmp_path / "pickapic" / "val").iterdir()} - set().union(*written))
    assert written[0] and written[1] and written[0] | written[1] == set(expected_images())
    assert [uid for uid, _ in read_captions(spec.captions_file)[0]] == [r[-1][0] for r in ROWS if r[-1]]


def test_bad_inputs(tmp_path, capsys):
    assert prepare.main(["pickapic", "--base-dir", str(tmp_path), "--split", "val", "--parquet-dir",
                         str(tmp_path / "none")]) == 2
    assert "none: no such folder of parquet files" in capsys.readouterr().err
    folder = tmp_path / "p"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["a b c"]}), folder / "x.parquet")
    assert prepare.main(["pickapic", "--base-dir", str(tmp_path), "--split", "val", "--parquet-dir", str(folder)]) == 2
    assert "x.parquet: not a Pick-a-Pic file, it lacks the columns label_0" in capsys.readouterr().err
    columns = {"caption": ["a broken jpeg here"], "label_0": [1.0], "label_1": [0.0], "image_0_uid": ["z0"],
               "image_1_uid": ["z1"], "jpg_0": [b"not a jpeg"], "jpg_1": [jpg(0)]}
    pq.write_table(pa.table(columns), folder / "x.parquet")
    assert prepare.main(["pickapic", "--base-dir", str(tmp_path), "--split", "val", "--parquet-dir", str(folder)]) == 1
    assert "uid z0: not a readable image" in capsys.readouterr().err
    assert (tmp_path / "val_captions.txt").read_text() == ""


def test_caption_filter_is_the_official_one():
    assert "girl" in STOPWORDS and "女" in STOPWORDS
    assert clean_caption("a: b: c d") == "a b c d"
    assert clean_caption("one two") is None and clean_caption("nude statue in a park") is None
