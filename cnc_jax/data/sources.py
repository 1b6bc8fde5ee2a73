"""grain random-access sources of raw records (cnc_jax.data.records): official file trees and the concatenation of
sources (the official MergedDataset: source after source, in the order given). TFDS builds are read by
cnc_jax.data.tfds.TFDSSource; cnc_jax.data.pipeline.open_sources opens any list of both.

Sources never raise for a bad record: a missing or unreadable file gives a skip marker, so one broken file
cannot stop a pod run. They are plain picklable objects (grain workers are spawned processes).
"""

from __future__ import annotations

import bisect
import logging
from typing import Sequence

import numpy as np

from cnc_jax.data.layout import SourceSpec, read_captions
from cnc_jax.data.records import EMBEDDING_FIELDS, IMAGE_FIELDS, RecordError, skip_marker
from cnc_jax.io import read_embedding

log = logging.getLogger(__name__)


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except OSError as e:
        raise RecordError(f"{path}: unreadable ({e})") from None


def read_embedding_file(path: str) -> np.ndarray:
    """A torch .pt (or .npy) embedding as float32, unsqueezed; RecordError naming the file otherwise."""
    try:
        return read_embedding(path)
    except Exception as e:  # any unreadable file is a skipped record, never a crash
        message = str(e) if str(e).startswith(path) else f"{path}: {e}"
        raise RecordError(message) from None


class FileTreeSource:
    """The records of one official file tree, in captions-file order."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.records, dropped = read_captions(spec.captions_file)
        if dropped:
            log.warning("%s: %d caption lines without ':' dropped", spec.captions_file, dropped)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:  # grain checks it when restoring a state: keep it stable across runs
        return f"FileTreeSource({self.spec.base_dir!r}, {self.spec.split!r}, {len(self)} records)"

    def __getitem__(self, index: int) -> dict:
        uid, caption = self.records[index]
        raw = {"uid": uid, "caption": caption, "origin": str(self.spec)}
        try:
            for field in IMAGE_FIELDS:
                raw[field] = read_bytes(self.spec.path(field, uid))
            for field in EMBEDDING_FIELDS:
                raw[field] = read_embedding_file(self.spec.path(field, uid))
        except RecordError as e:
            return skip_marker(uid, str(e))
        return raw


class MergedSource:
    """Concatenation of sources (index i of the merge = record i - offset of the source holding it)."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __repr__(self) -> str:
        return f"MergedSource([{', '.join(map(repr, self.parts))}])"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range (0..{len(self) - 1})")
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][index - self.offsets[part]]


def probe_embedding(source, field: str = "fg_emb", probe: int = 100) -> tuple[int, str]:
    """(CLIP embedding width, where it was read) from the first readable record among the first `probe` ones."""
    last = ""
    for index in range(min(probe, len(source))):
        raw = source[index]
        emb = np.squeeze(np.asarray(raw.get(field, ())))
        if emb.ndim == 1 and emb.size:
            return int(emb.size), record_location(source, index, field, raw["uid"])
        last = raw.get("skip", f"{raw['uid']}: {field} of shape {emb.shape}")
    raise ValueError(f"{source_name(source)}: none of the first {min(probe, len(source))} records has a readable "
                     f"{field} embedding (last: {last})")


def source_name(source) -> str:
    """The data folders / builds a source reads, for messages."""
    parts = source.parts if isinstance(source, MergedSource) else [source]
    return ", ".join(str(part.spec) for part in parts)


def embedding_dim(source, probe: int = 100) -> int:
    """The CLIP embedding width of the source's records."""
    return probe_embedding(source, probe=probe)[0]


def record_location(source, index: int, field: str, uid: str) -> str:
    """Where record `index`'s `field` is stored: its file in a file tree, the build and uid in TFDS."""
    while isinstance(source, MergedSource):
        part = bisect.bisect_right(source.offsets, index) - 1
        source, index = source.parts[part], index - source.offsets[part]
    if isinstance(source, FileTreeSource):
        return source.spec.path(field, uid)
    return f"{source.spec} record {uid}"
