"""Pick-a-Pic parquet files -> the official file tree (data/parse_pickapic.py): the preferred image of each pair
as `{split}/uid.jpg` (Resize(R, bicubic) + CenterCrop(R)) and `{split}_captions.txt`.

The official selection, row by row in file order: the caption loses every ':'; a caption containing one of the
STOPWORDS as a (lower-cased, whitespace-separated) word, or with fewer than 3 words, is dropped; the image with
the higher label wins, a tie goes to image 1; a uid already taken is skipped.

On purpose we differ in three places: parquet files are read in sorted name order (the official os.listdir order
is arbitrary); line breaks in captions become spaces (they would break the captions file); an unreadable image
is reported and left out (the official script stops). Images already on disk are not decoded again (a re-run
resumes); with --shard I/N a process writes the images of selected rows I, I+N, ... and shard 0 the captions.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterator, Optional, Sequence

from cnc_jax.data.layout import SourceSpec
from cnc_jax.data.records import RecordError, decode_rgb
from cnc_jax.io import image_bytes, write_atomic

# the official utils/utils.py STOPWORDS
STOPWORDS = frozenset((
    "naked", "nude", "sex", "porn", "adult", "erotic", "explicit", "xxx", "nsfw", "breast", "boobs", "genital",
    "vagina", "penis", "ass", "butt", "bdsm", "fetish", "kinky", "nudity", "violence", "gore", "blood", "killing",
    "murder", "rape", "abuse", "suicide", "death", "prostitute", "escort", "stripper", "drug", "cocaine",
    "marijuana", "weed", "meth", "lsd", "heroin", "ecstasy", "acid", "girl", "teen", "woman", "boy", "milf",
    "female", "seductress", "kiss", "gloryhole", "testicle", "boob", "women", "cleavage", "sexy", "女", "giantess",
    "fuck", "fuuck", "fuucking", "waifu", "risqué", "spread", "spreaded", "spreading", "dildo", "erection",
    "vibrator", "naturist",
))
METADATA_COLUMNS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


@dataclasses.dataclass
class PickapicReport:
    rows: int = 0
    filtered: int = 0       # stopword or fewer than 3 words
    duplicates: int = 0     # uid already selected
    selected: int = 0
    already_done: int = 0
    written: int = 0
    failed: dict = dataclasses.field(default_factory=dict)


def clean_caption(caption: str) -> Optional[str]:
    """The official caption filter: ':' removed; None when the caption is dropped."""
    caption = str(caption).replace(":", "").replace("\r", " ").replace("\n", " ")
    words = caption.split()
    if len(words) < 3 or any(word in STOPWORDS for word in caption.lower().split()):
        return None
    return caption


def preferred(label_0: float, label_1: float) -> int:
    """Which image of the pair the official parser keeps: the higher label, image 1 on a tie."""
    return 0 if label_0 > label_1 else 1


def parquet_files(parquet_dir: str) -> list[str]:
    if not os.path.isdir(parquet_dir):
        raise ValueError(f"{parquet_dir}: no such folder of parquet files")
    files = sorted(f for f in os.listdir(parquet_dir) if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"{parquet_dir}: no .parquet files")
    return [os.path.join(parquet_dir, f) for f in files]


def _rows(path: str, batch_rows: int = 64) -> Iterator[dict]:
    """The rows of one parquet file, a few at a time (the image columns make files large)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in METADATA_COLUMNS + IMAGE_COLUMNS if c not in table.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: not a Pick-a-Pic file, it lacks the columns {', '.join(missing)}")
    for batch in table.iter_batches(batch_size=batch_rows, columns=list(METADATA_COLUMNS + IMAGE_COLUMNS)):
        yield from batch.to_pylist()


def parse_pickapic(parquet_dir: str, spec: SourceSpec, *, resolution: int = 512,
                   shard: tuple[int, int] = (0, 1)) -> PickapicReport:
    """Select, resize and write the preferred images of every parquet file in `parquet_dir` into `spec`."""
    from tqdm import tqdm

    files, report, lines, seen = parquet_files(parquet_dir), PickapicReport(), [], set()
    with tqdm(desc=f"pickapic {spec}", unit="row") as bar:
        for path in files:
            for row in _rows(path):
                report.rows += 1
                bar.update(1)
                caption = clean_caption(row["caption"])
                if caption is None:
                    report.filtered += 1
                    continue
                pick = preferred(row["label_0"], row["label_1"])
                uid = str(row[f"image_{pick}_uid"])
                if uid in seen:
                    report.duplicates += 1
                    continue
                seen.add(uid)
                position, report.selected = report.selected, report.selected + 1
                if position % shard[1] != shard[0]:
                    lines.append(f"{uid}:{caption}\n")
                    continue
                target = spec.path("image", uid)
                if os.path.exists(target):
                    report.already_done += 1
                else:
                    try:
                        image = decode_rgb(row[f"jpg_{pick}"] or b"", resolution, f"{path} uid {uid}")
                    except RecordError as e:
                        report.failed[uid] = str(e)
                        tqdm.write(f"error: {e}", file=sys.stderr)
                        continue
                    write_atomic(target, image_bytes(image, "JPEG"))
                    report.written += 1
                lines.append(f"{uid}:{caption}\n")
    if shard[0] == 0:
        write_atomic(spec.captions_file, "".join(lines).encode("utf-8"))
    return report


def summary(report: PickapicReport, spec: SourceSpec) -> str:
    return (f"pickapic {spec}: {report.rows} rows, {report.filtered} filtered, {report.duplicates} duplicate uids, "
            f"{report.selected} selected, {report.already_done} already done, {report.written} written, "
            f"{len(report.failed)} failed")


__all__: Sequence[str] = ("STOPWORDS", "clean_caption", "preferred", "parse_pickapic", "summary")
