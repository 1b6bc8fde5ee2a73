"""The official dataset file tree (README "Dataset Preparation", src/train/dataset_full.py) and its captions.

  base_dir/{split}_captions.txt            lines `uid:caption`
  base_dir/{split}/{uid}.jpg               images (any size)
  base_dir/{split}_mask/{uid}.png          foreground masks (512², foreground 255)
  base_dir/{split}_foreground/{uid}.jpg    image x mask
  base_dir/{split}_background/{uid}.jpg    inpainted background
  base_dir/{split}_{fore,back}ground_depthmaps/{uid}.jpg    depth maps (3 equal channels)
  base_dir/{split}_{fore,back}ground_embeddings/{uid}.pt    CLIP image embeddings (torch tensors)

Captions: the official parser does `uid, caption = line.split(":")` and silently drops every line whose
caption contains a ':' (the split yields more than two parts). We keep everything after the FIRST ':'
instead, so such captions are used (with the colon). Lines without any ':' are dropped, as there. The file
must be UTF-8 (a leading BOM is ignored): a bad byte is an error naming the file and its line, not a skipped line.
"""

from __future__ import annotations

import dataclasses
import io
import os

# record field -> (folder suffix, file extension)
FILES = {
    "image": ("", ".jpg"),
    "mask": ("_mask", ".png"),
    "foreground": ("_foreground", ".jpg"),
    "background": ("_background", ".jpg"),
    "fg_depth": ("_foreground_depthmaps", ".jpg"),
    "bg_depth": ("_background_depthmaps", ".jpg"),
    "fg_emb": ("_foreground_embeddings", ".pt"),
    "bg_emb": ("_background_embeddings", ".pt"),
}
TRAINING_FIELDS = ("image", "mask", "fg_depth", "bg_depth", "fg_emb", "bg_emb")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One official file tree: `base_dir` holds `{split}_captions.txt`, `{split}/`, `{split}_mask/`, ..."""

    base_dir: str
    split: str

    def folder(self, field: str) -> str:
        return os.path.join(self.base_dir, self.split + FILES[field][0])

    def path(self, field: str, uid: str) -> str:
        return os.path.join(self.folder(field), uid + FILES[field][1])

    @property
    def captions_file(self) -> str:
        return os.path.join(self.base_dir, f"{self.split}_captions.txt")

    def __str__(self) -> str:
        return f"{self.base_dir}:{self.split}"


def parse_caption_line(line: str):
    """(uid, caption) of one captions-file line, or None for a blank line or one without ':'."""
    line = line.strip()
    if ":" not in line:
        return None
    uid, caption = line.split(":", 1)
    return uid, caption


def read_captions(path: str) -> tuple[list[tuple[str, str]], int]:
    """([(uid, caption)] in file order, number of non-blank lines dropped for lacking a ':'); a file that is not
    UTF-8 text is a ValueError naming the file, the line and the byte offset of the first bad byte."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: captions file not found")
    with open(path, "rb") as f:
        text = decode_text(f.read(), path).removeprefix("\ufeff")  # a BOM (Windows editors) is no part of a uid
    records, dropped = [], 0
    with io.StringIO(text, newline=None) as f:  # universal newlines, as open() in text mode
        for line in f:
            parsed = parse_caption_line(line)
            if parsed is not None:
                records.append(parsed)
            elif line.strip():
                dropped += 1
    return records, dropped


def decode_text(data: bytes, path: str) -> str:
    """UTF-8 bytes of a text file -> str; otherwise a ValueError naming the file, the line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start].decode("utf-8")  # valid up to the first bad byte
        line = before.count("\n") + before.count("\r") - before.count("\r\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset "
                         f"{e.start}: {e.reason}); save the file as UTF-8") from None


@dataclasses.dataclass(frozen=True)
class TFDSSpec:
    """A `cnc_triplets` TFDS ArrayRecord build (cnc_jax.data.tfds); name may carry the config,
    e.g. "cnc_triplets/cached"."""

    data_dir: str
    name: str = "cnc_triplets"
    split: str = "train"

    def __str__(self) -> str:
        return f"tfds {self.name}/{self.split} in {self.data_dir}"
