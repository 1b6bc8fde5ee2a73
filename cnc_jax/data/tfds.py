"""`cnc_triplets`: a TFDS ArrayRecord build of official file trees, written (CncTriplets, build_tfds) and read
(TFDSSource) without TensorFlow; the encoders of a cached build are cnc_jax.prep.cache_encoders.CacheEncoders.

Why: one pre-packed, checksummed dataset of a few large files reads faster and more reliably on a pod
than millions of small files. TFDS needs no TensorFlow as long as no feature is TF-encoded, so:
  uid, caption                        Text
  image, mask, fg_depth, bg_depth     the original encoded file bytes (jpg / png), decoded in the grain map
                                      exactly like the file tree's -> identical batches from both paths
  fg_emb, bg_emb                      float32 (C,), zlib
config "cached" adds, for a fixed resolution R:
  latent_moments  (R/8, R/8, 2z)      VAE posterior moments of the training image (ToTensor+Normalize of the
                                      official Resize/CenterCrop), zlib; sample with DiagonalGaussian
  text_embedding  (L, C)              CLIP text encoder output of the caption, zlib
and the empty prompt's embedding (for caption dropout) in the dataset metadata.

Records are written in source order (shuffling at write time is disabled; the pipeline shuffles) and every
record is fully decoded first: missing or unreadable ones are left out, counted, and listed in the metadata.

  python -m cnc_jax.cli.prepare tfds --source BASE_DIR:SPLIT ... --data-dir DIR [--cached --sd CKPT ...]
  make_train_iterator([TFDSSpec(DIR)], ...)  or  [TFDSSpec(DIR, "cnc_triplets/cached")] with cached=True
"""

from __future__ import annotations

import base64
import logging
import os
import zlib
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from cnc_jax.data.layout import SourceSpec, TFDSSpec
from cnc_jax.data.records import IMAGE_FIELDS, RecordError, decode_record, skip_marker
from cnc_jax.data.sources import FileTreeSource, MergedSource, embedding_dim

log = logging.getLogger(__name__)
NAME = "cnc_triplets"


def _pack(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, np.float32)
    return {"shape": list(array.shape), "zlib_base64": base64.b64encode(zlib.compress(array.tobytes())).decode()}


def _unpack(packed: dict) -> np.ndarray:
    data = zlib.decompress(base64.b64decode(packed["zlib_base64"]))
    return np.frombuffer(data, np.float32).reshape(packed["shape"]).copy()


def cache_settings(metadata: dict, where: str, resolution: int, text_length: int) -> tuple[dict, np.ndarray]:
    """({field: shape} of the cached arrays, empty-prompt embedding) of a cached build, checked against the
    pipeline's resolution and text length."""
    if not metadata.get("cached"):
        raise ValueError(f"{where}: not a cached build (build it with --cached, read it as {NAME}/cached)")
    if metadata["resolution"] != resolution:
        raise ValueError(f"{where}: latents were cached at resolution {metadata['resolution']}, not {resolution}")
    empty = _unpack(metadata["empty_text_embedding"])
    if empty.shape[0] != text_length:
        raise ValueError(f"{where}: text embeddings have length {empty.shape[0]}, not text_length {text_length}")
    shapes = {"latent_moments": tuple(metadata["latent_shape"]), "text_embedding": tuple(empty.shape)}
    return shapes, empty


class CncTriplets(tfds.core.GeneratorBasedBuilder):
    """CnC synthetic triplets (see the module docstring). Build with `build_tfds`."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="raw", description="encoded files and embeddings"),
        tfds.core.BuilderConfig(name="cached", description="plus VAE latent moments and text embeddings"),
    ]

    def __init__(self, *, splits: Optional[dict] = None, resolution: int = 512,
                 encoders=None, **kwargs):
        self._splits, self._resolution, self._encoders = splits, resolution, encoders
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        zlib_floats = dict(dtype=np.float32, encoding=tfds.features.Encoding.ZLIB)
        features = {"uid": tfds.features.Text(), "caption": tfds.features.Text(),
                    **{f: tfds.features.Tensor(shape=(), dtype=np.object_) for f in IMAGE_FIELDS},
                    "fg_emb": tfds.features.Tensor(shape=(None,), **zlib_floats),
                    "bg_emb": tfds.features.Tensor(shape=(None,), **zlib_floats)}
        if self.builder_config.name == "cached":
            features["latent_moments"] = tfds.features.Tensor(shape=(None, None, None), **zlib_floats)
            features["text_embedding"] = tfds.features.Tensor(shape=(None, None), **zlib_floats)
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict(features),
                                     metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._splits:
            raise ValueError(f"building {NAME} needs splits={{name: [SourceSpec, ...]}}")
        cached = self.builder_config.name == "cached"
        if cached and self._encoders is None:
            raise ValueError("the cached config needs encoders (CacheEncoders) to compute latents")
        metadata = self.info.metadata
        metadata.update(resolution=self._resolution, cached=cached, skipped=[],
                        sources={name: [str(s) for s in specs] for name, specs in self._splits.items()})
        if cached:
            metadata["empty_text_embedding"] = _pack(self._encoders.text_embeddings([""])[0])
            r = self._resolution // 8
            metadata["latent_shape"] = [r, r, int(self._encoders.moments(np.zeros((1, 8 * r, 8 * r, 3), np.uint8)).shape[-1])]
        return {name: self._generate_examples(specs) for name, specs in self._splits.items()}

    def _generate_examples(self, specs: Sequence[SourceSpec]):
        source = MergedSource([FileTreeSource(spec) for spec in specs])
        pending = []
        records = _decoded(source, self._resolution, embedding_dim(source))
        for index, raw, decoded in tqdm(records, total=len(source), desc=f"tfds {NAME}", unit="record"):
            if isinstance(decoded, RecordError):
                log.warning("left out %s: %s", raw["uid"], decoded)
                self.info.metadata["skipped"].append(f"{raw['uid']}: {decoded}")
                continue
            example = {"uid": raw["uid"], "caption": raw["caption"], **{f: raw[f] for f in IMAGE_FIELDS},
                       "fg_emb": decoded["fg_emb"], "bg_emb": decoded["bg_emb"]}
            if self._encoders is None:
                yield index, example
                continue
            pending.append((index, example, decoded["image"]))
            if len(pending) == self._encoders.batch_size:
                yield from self._with_cache(pending)
                pending = []
        if pending:
            yield from self._with_cache(pending)

    def _with_cache(self, pending):
        moments = self._encoders.moments(np.stack([image for _, _, image in pending]))
        texts = self._encoders.text_embeddings([example["caption"] for _, example, _ in pending])
        for (index, example, _), m, t in zip(pending, moments, texts):
            yield index, {**example, "latent_moments": m, "text_embedding": t}


def _decoded(source, resolution: int, emb_dim: int, window: int = 256):
    """(index, raw record, decoded record or RecordError) in source order; a thread pool reads and decodes
    (PIL releases the GIL), `window` records at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def work(index):
        raw = source[index]
        try:
            if "skip" in raw:
                raise RecordError(raw["skip"])
            return index, raw, decode_record(raw, resolution, emb_dim)
        except RecordError as e:
            return index, raw, e

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, len(source), window):
            yield from pool.map(work, range(start, min(start + window, len(source))))


def build_tfds(data_dir: str, splits: dict, *, resolution: int = 512,
               encoders=None) -> str:
    """Build cnc_triplets/raw (or /cached with `encoders`) under data_dir; returns the dataset folder.
    An existing complete build of the same version is kept as is (TFDS skips it)."""
    config = "cached" if encoders is not None else "raw"
    builder = CncTriplets(data_dir=data_dir, config=config, splits=splits, resolution=resolution,
                          encoders=encoders, file_format="array_record")
    builder.download_and_prepare()
    skipped = builder.info.metadata.get("skipped", [])
    if skipped:
        log.warning("%d records left out of %s (listed in its metadata.json)", len(skipped), builder.data_dir)
    return str(builder.data_dir)


class TFDSSource:
    """One split of a cnc_triplets build, read with tfds.data_source (opened lazily in each process)."""

    def __init__(self, spec: TFDSSpec):
        self.spec = spec
        self._source = None
        self._length = len(self._open())

    def _open(self):
        if self._source is None:
            self._source = tfds.data_source(self.spec.name, data_dir=self.spec.data_dir, split=self.spec.split)
        return self._source

    def metadata(self) -> dict:
        return dict(tfds.builder(self.spec.name, data_dir=self.spec.data_dir).info.metadata or {})

    def __getstate__(self):
        return {"spec": self.spec, "_source": None, "_length": self._length}

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TFDSSource({self.spec.data_dir!r}, {self.spec.name!r}, {self.spec.split!r}, {len(self)} records)"

    def __getitem__(self, index: int) -> dict:
        try:
            stored = self._open()[index]
        except Exception as e:  # a damaged shard: skip the record, never crash
            return skip_marker(f"#{index}", f"{self.spec} record {index}: unreadable ({e})")
        raw = {key: value for key, value in stored.items()}
        raw["uid"], raw["caption"] = _text(stored["uid"]), _text(stored["caption"])
        raw["origin"] = str(self.spec)
        return raw


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
