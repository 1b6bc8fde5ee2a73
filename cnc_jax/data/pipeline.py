"""The training input pipeline: official file trees and/or TFDS builds -> grain -> batches for one host.

  it = make_train_iterator([SourceSpec(".../cocostuff/dataset/images", "train2017"),
                            SourceSpec(".../pickapic", "train")], batch_size=4, tokenizer=tok, seed=0,
                           shard_index=jax.process_index(), shard_count=jax.process_count(), num_workers=8)
  batch = next(it)            # dict of numpy arrays, batch-major (see make_train_iterator)
  state = it.get_state()      # bytes; it.set_state(state) resumes exactly (also grain.checkpoint.* + orbax)

How it runs: a grain DataLoader over the merged sources (MergedDataset order) with a global shuffle
(IndexSampler, `seed`, a new permutation every epoch), sharded over hosts by batch-sized blocks of positions
(host h of H with per-host batch b takes positions [(k*H + h)*b, (k*H + h + 1)*b) for k = 0, 1, ...: disjoint,
together the whole shuffled stream, and global batch k, the hosts' k-th batches in host order, holds the
positions [k*H*b, (k+1)*H*b) in order: the same examples in the same rows as one host with batch H*b, so a run
gives the same steps on any number of hosts; `start_position` starts the stream later). In the worker processes
each record is read, decoded with the official transforms (cnc_jax.data.records), given its condition
dropout from grain's per-record rng (Philox(seed + position): the same decisions on every resume and for
every worker count), tokenised and batched. Missing or unreadable records travel as rows with valid=False;
the host-side TrainIterator drops them, counts them (`skipped`, also logged: the first ones one by one, then
a summary now and then) and refills the batch from the next one, so every batch has exactly `batch_size` examples.
A run of `max_consecutive_skips` unreadable records in a row (config.data.max_consecutive_skips) is a missing or
broken source, not bad luck: the iterator raises a ValueError naming the source instead of searching forever.

Determinism: the stream is a function of (sources, seed, shard, batch_size, num_workers, start_position): each
grain worker batches its own share of positions, so another worker count gives the same records in other batches
(num_workers=0 keeps the position order above). A state restores only into an iterator made with the same
arguments (grain checks sources and sampler).
"""

from __future__ import annotations

import gc
import json
import logging
from typing import Optional, Sequence, Union

import grain
import numpy as np
from grain.python import SharedMemoryArray

from cnc_jax.data.layout import SourceSpec, TFDSSpec
from cnc_jax.data.records import RecordError, decode_record, image_to_signed, image_to_unit, skip_marker
from cnc_jax.data.sources import FileTreeSource, MergedSource, probe_embedding
from cnc_jax.text_encoder import tokenize

__all__ = ["SourceSpec", "TFDSSpec", "TrainIterator", "make_train_iterator", "open_sources"]

log = logging.getLogger(__name__)
_MAX_REASON_BYTES = 400
# skipped records are logged one by one up to LOG_SKIPS_FIRST per process, then one summary line per LOG_SKIPS_EVERY:
# a broken source must not write megabytes of log before max_consecutive_skips ends it
LOG_SKIPS_FIRST = 20
LOG_SKIPS_EVERY = 1000
# Raw records are read ahead by threads (file I/O); grain's default read-ahead of 500 records per process only
# costs memory here, where decoding, not reading, is the bottleneck.
READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=64)


class DecodeRecord(grain.transforms.Map):
    """raw record -> uint8 arrays at `resolution` (or a skip marker naming the bad file)."""

    def __init__(self, resolution: int, emb_dim: int):
        self.resolution, self.emb_dim = resolution, emb_dim

    def map(self, raw: dict) -> dict:
        if "skip" in raw:
            return raw
        try:
            return decode_record(raw, self.resolution, self.emb_dim)
        except RecordError as e:
            return skip_marker(raw["uid"], str(e))
        except Exception as e:  # anything else a strange file provokes is a skipped record too (bounded by
            # max_consecutive_skips), never a traceback from a worker process; BaseException (a stop) passes
            return skip_marker(raw["uid"], f"{raw.get('origin', '?')} {raw['uid']}: {type(e).__name__}: {e}")


class MakeExample(grain.transforms.RandomMap):
    """The official per-sample condition dropout, and tokenisation.

    Draws five uniforms per record in the official order (caption, bg_depth, fg_depth, bg_emb, fg_emb);
    each condition is dropped (caption -> "", maps and embeddings -> zeros) when its draw is below its
    probability. The mask is never dropped. A skip marker becomes an all-zero row with valid=False.
    Pixels stay uint8 here; Collate converts them to float32 once per batch.
    """

    def __init__(self, tokenizer, text_length: int, drop_caption_prob: float, drop_condition_prob: float,
                 resolution: int, emb_dim: int, cached_shapes: Optional[dict] = None,
                 empty_text_embedding: Optional[np.ndarray] = None):
        self.tokenizer, self.text_length = tokenizer, text_length
        self.drop_caption_prob, self.drop_condition_prob = drop_caption_prob, drop_condition_prob
        self.resolution, self.emb_dim = resolution, emb_dim
        self.cached_shapes = cached_shapes or {}
        self.empty_text_embedding = empty_text_embedding

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        draws = rng.random(5)
        if "skip" in element:
            return self._placeholder(element)
        drop_caption = draws[0] < self.drop_caption_prob
        drop = dict(zip(("bg_depth", "fg_depth", "bg_emb", "fg_emb"), draws[1:] < self.drop_condition_prob))
        try:
            input_ids = tokenize(self.tokenizer, ["" if drop_caption else element["caption"]], self.text_length)[0]
        except Exception as e:  # a caption the tokenizer refuses is a skipped record, as in DecodeRecord
            return self._placeholder(skip_marker(element["uid"], f"{element['uid']} caption: {type(e).__name__}: {e}"))
        out = {
            "image": element["image"],
            "input_ids": input_ids,
            **{k: np.zeros_like(element[k]) if dropped else element[k] for k, dropped in drop.items()},
            "mask": element["mask"],
            "uid": np.bytes_(element["uid"].encode("utf-8")),
            "valid": np.bool_(True), "skip_reason": np.bytes_(b""),
        }
        if self.cached_shapes:
            out["latent_moments"] = element["latent_moments"]
            out["text_embedding"] = self.empty_text_embedding if drop_caption else element["text_embedding"]
        return out

    def _placeholder(self, marker: dict) -> dict:
        r, c = self.resolution, self.emb_dim
        out = {"image": np.zeros((r, r, 3), np.uint8), "input_ids": np.zeros((self.text_length,), np.int32),
               "fg_depth": np.zeros((r, r, 3), np.uint8), "bg_depth": np.zeros((r, r, 3), np.uint8),
               "fg_emb": np.zeros((c,), np.float32), "bg_emb": np.zeros((c,), np.float32),
               "mask": np.zeros((r, r, 1), np.uint8), "uid": np.bytes_(marker["uid"].encode("utf-8")),
               "valid": np.bool_(False),
               "skip_reason": np.bytes_(marker["skip"].encode("utf-8")[:_MAX_REASON_BYTES])}
        out.update({k: np.zeros(shape, np.float32) for k, shape in self.cached_shapes.items()})
        return out


class Collate:
    """grain batch_fn: stacks the records of a batch, turning uint8 pixels into float32 in the same pass
    (image -> [-1, 1], depth maps and mask -> [0, 1]); with worker processes grain asks for the output in
    shared memory, so batches reach the trainer without being pickled."""

    def __init__(self):
        self._shared = False

    def enable_shared_memory_output(self) -> None:
        self._shared = True

    def __call__(self, values: Sequence[dict]) -> dict:
        batch = {}
        for key in values[0]:
            items = [v[key] for v in values]
            if items[0].dtype.kind in "SU":
                batch[key] = np.stack(items)
                continue
            convert = _PIXEL_CONVERSIONS.get(key)
            shape, dtype = (len(items),) + items[0].shape, np.float32 if convert else items[0].dtype
            out = SharedMemoryArray(shape, dtype=dtype) if self._shared else np.empty(shape, dtype)
            for i, item in enumerate(items):
                if convert:
                    convert(item, out[i])
                else:
                    out[i] = item
            batch[key] = out
        return batch


_PIXEL_CONVERSIONS = {"image": image_to_signed, "fg_depth": image_to_unit, "bg_depth": image_to_unit,
                      "mask": image_to_unit}


class TrainIterator:
    """Batches of exactly `batch_size` valid examples from a grain DataLoader iterator of padded batches.

    `skipped` counts the records dropped as missing/unreadable (the first LOG_SKIPS_FIRST of this process are
    logged with their reason, then a summary every LOG_SKIPS_EVERY); `consecutive` counts the unreadable records
    since the last readable one, and reaching `max_consecutive_skips` raises a ValueError naming `source_name`.
    The check runs here, in the main process, whatever the worker count: the workers only mark records invalid.
    get_state() -> bytes and set_state(bytes) resume exactly, mid-batch included: the state is the grain
    state before the loader batch in use, how many of its valid rows were already handed out, and the skip
    counts before it. Works with grain.checkpoint.CheckpointSave / CheckpointRestore (orbax).
    """

    def __init__(self, loader: grain.DataLoader, batch_size: int, num_records: int = 0,
                 max_consecutive_skips: int = 1000, source_name: str = "the data"):
        self.loader, self.batch_size, self.num_records = loader, batch_size, num_records
        self.max_consecutive_skips, self.source_name = max_consecutive_skips, source_name
        self.loader_iterator = iter(loader)
        self.skipped = self.consecutive = 0
        self._logged = 0  # skips seen by this process (not in the state: a resumed run logs its own first ones)
        self._reset_current()

    def _reset_current(self):
        self._current, self._valid_rows, self._used = None, np.zeros((0,), np.int64), 0
        self._state_before, self._skipped_before, self._consecutive_before = None, self.skipped, self.consecutive

    def __iter__(self):
        return self

    def _fetch(self) -> None:
        state_before = self.loader_iterator.get_state()
        batch = next(self.loader_iterator)
        valid = np.asarray(batch["valid"], bool)
        skipped, consecutive, too_many = self.skipped, self.consecutive, None
        for row in range(len(valid)):
            if valid[row]:
                consecutive = 0
                continue
            skipped, consecutive = skipped + 1, consecutive + 1
            uid = batch["uid"][row].decode("utf-8", "replace")
            reason = batch["skip_reason"][row].decode("utf-8", "replace").replace("\n", " ")
            self._log_skip(skipped, consecutive, uid, reason)
            if consecutive >= self.max_consecutive_skips and too_many is None:
                too_many = ValueError(
                    f"{self.source_name}: {consecutive} unreadable records in a row (last: {uid}: {reason}); "
                    f"the data is missing or broken (an unmounted, half-copied or mistyped data folder?): fix "
                    f"it, or raise config.data.max_consecutive_skips (now {self.max_consecutive_skips}) if it "
                    f"really holds runs of that many bad records")
        self._state_before, self._skipped_before = state_before, self.skipped
        self._consecutive_before = self.consecutive
        self.skipped, self.consecutive = skipped, consecutive
        self._current, self._valid_rows, self._used = batch, np.nonzero(valid)[0], 0
        if too_many is not None:  # raised with the state consistent: this batch fetched, none of its rows used
            raise too_many

    def _log_skip(self, skipped: int, consecutive: int, uid: str, reason: str) -> None:
        self._logged += 1
        if self._logged <= LOG_SKIPS_FIRST:
            more = (f" (further skipped records are summarised every {LOG_SKIPS_EVERY})"
                    if self._logged == LOG_SKIPS_FIRST else "")
            log.warning("skipped record %s: %s%s", uid, reason, more)
        elif self._logged % LOG_SKIPS_EVERY == 0:
            log.warning("skipped %d unreadable records so far (%d in a row; last: %s: %s)", skipped,
                        consecutive, uid, reason)

    def __next__(self) -> dict:
        pieces, need = [], self.batch_size
        while need:
            if self._used == len(self._valid_rows):
                self._fetch()
            rows = self._valid_rows[self._used:self._used + need]
            batch = _strip(self._current)
            whole = len(rows) == len(self._current["valid"])
            pieces.append(batch if whole else {k: v[rows] for k, v in batch.items()})
            self._used += len(rows)
            need -= len(rows)
        if len(pieces) == 1:
            return pieces[0]
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def get_state(self) -> bytes:
        if self._current is None or self._used == len(self._valid_rows):
            state = {"loader": self.loader_iterator.get_state().decode(), "used": 0, "skipped": self.skipped,
                     "consecutive": self.consecutive}
        else:
            state = {"loader": self._state_before.decode(), "used": self._used, "skipped": self._skipped_before,
                     "consecutive": self._consecutive_before}
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        self.loader_iterator.set_state(state["loader"].encode())
        self.skipped = int(state["skipped"])
        self.consecutive = int(state.get("consecutive", 0))  # absent from states saved before it was counted
        self._reset_current()
        if state["used"]:
            self._fetch()
            self._used = int(state["used"])

    def start_prefetch(self) -> None:
        self.loader_iterator.start_prefetch()

    def close(self) -> None:
        """Stop the worker processes now. grain's DataLoaderIterator has no public close: the dataset iterator
        it holds closes when collected (DatasetIterator.__del__), so drop the only reference and collect."""
        self.loader_iterator = None
        gc.collect()


class BlockSampler:
    """The positions of one host (see the module docstring): local position k is global position
    start + ((k // block) * count + index) * block + k % block of the global sampler, whose record key and
    rng (Philox(seed + global position)) it keeps, so every example is the same on any number of hosts."""

    def __init__(self, inner: grain.samplers.IndexSampler, index: int, count: int, block: int, start: int = 0,
                 num_positions: Optional[int] = None):
        self.inner, self.index, self.count, self.block, self.start = inner, index, count, block, start
        # a finite stream ends after the last global batch every host can fill
        self.length = None if num_positions is None else (num_positions - start) // (count * block) * block

    def __getitem__(self, k: int):
        if k < 0 or (self.length is not None and k >= self.length):
            raise IndexError(f"position {k} is out of this host's stream")
        return self.inner[self.start + ((k // self.block) * self.count + self.index) * self.block + k % self.block]

    def __repr__(self) -> str:  # grain compares it when a state is restored
        return (f"BlockSampler({self.inner!r}, index={self.index}, count={self.count}, block={self.block}, "
                f"start={self.start})")


def _strip(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("valid", "skip_reason")}


def open_sources(specs: Sequence[Union[SourceSpec, TFDSSpec]]) -> MergedSource:
    """One source of file trees (SourceSpec) and TFDS builds (TFDSSpec), in the order given."""
    if not specs:
        raise ValueError("no data sources given")
    parts = []
    for spec in specs:
        if isinstance(spec, SourceSpec):
            parts.append(FileTreeSource(spec))
        elif isinstance(spec, TFDSSpec):
            from cnc_jax.data.tfds import TFDSSource  # optional package: TFDS (the `data` extra) only for its builds

            parts.append(TFDSSource(spec))
        else:
            raise TypeError(f"a source must be a SourceSpec or a TFDSSpec, got {type(spec).__name__}")
        if not len(parts[-1]):
            raise ValueError(f"{spec}: no records")
    return MergedSource(parts)


def _cached_settings(sources, resolution: int, text_length: int) -> tuple[dict, np.ndarray]:
    """(shapes of the cached arrays, the stored empty-prompt embedding) of cached TFDS builds."""
    from cnc_jax.data.tfds import cache_settings  # optional package: TFDS (the `data` extra) only for its builds

    settings = []
    for part in sources.parts:
        if not isinstance(part.spec, TFDSSpec):
            raise ValueError(f"cached=True needs TFDS builds with cached latents; {part.spec} is a file tree")
        settings.append(cache_settings(part.metadata(), str(part.spec), resolution, text_length))
    shapes, empty = settings[0]
    for other_shapes, _ in settings[1:]:
        if other_shapes != shapes:
            raise ValueError(f"cached sources disagree on array shapes: {shapes} vs {other_shapes}")
    return shapes, empty


def _check_model_shapes(source, cached_shapes: dict, model_shapes: dict) -> None:
    """Fail before the first batch when the data's conditions do not fit the model (one message: file, field,
    found and expected shape) instead of a shape error deep inside the model."""
    for field, expected in model_shapes.items():
        if field in ("fg_emb", "bg_emb"):
            width, where = probe_embedding(source, field)
            found = (width,)
        elif field in cached_shapes:
            found, where = cached_shapes[field], str(source.parts[0].spec)
        else:
            continue
        if tuple(found) != tuple(expected):
            raise ValueError(f"{where}: field {field} has shape {tuple(found)}, the model expects {tuple(expected)}")


def _default_absl_flags() -> None:
    """grain's worker processes read absl flags; outside absl.app nobody parsed them: use the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(sources: Sequence[Union[SourceSpec, TFDSSpec]], *, batch_size: int, resolution: int = 512,
                        tokenizer, text_length: int = 77, drop_caption_prob: float = 0.1,
                        drop_condition_prob: float = 0.1, seed: int = 0, shard_index: int = 0,
                        shard_count: int = 1, num_workers: int = 0, num_epochs: Optional[int] = None,
                        cached: bool = False, model_shapes: Optional[dict] = None,
                        start_position: int = 0, max_consecutive_skips: int = 1000) -> TrainIterator:
    """Per-host training batches (see the module docstring). Each batch is a dict of numpy arrays:

    image (B, R, R, 3) float32 in [-1, 1]; input_ids (B, text_length) int32; fg_depth, bg_depth (B, R, R, 3)
    float32 in [0, 1]; fg_emb, bg_emb (B, C) float32; mask (B, R, R, 1) float32; uid (B,) bytes ('S');
    with cached=True also latent_moments (B, R/8, R/8, 2z) and text_embedding (B, L, C) (the stored
    empty-prompt embedding where the caption was dropped).
    num_epochs None repeats forever; with a number the stream ends after that many passes (the positions of a
    last global batch that not every host can fill are dropped).
    model_shapes ({field: shape} the model takes, e.g. {"fg_emb": (768,)}) is checked against the data before
    the first batch: a ValueError names the file, the field, the shape found and the one expected.
    max_consecutive_skips (config.data.max_consecutive_skips): after that many unreadable records in a row the
    iterator raises a ValueError naming the sources, where it would otherwise search an all-broken source forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    for name, p in (("drop_caption_prob", drop_caption_prob), ("drop_condition_prob", drop_condition_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in 0..{shard_count - 1}, got {shard_index}")
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in 0..2**31-1 (grain's sampler seed), got {seed}")
    if max_consecutive_skips < 1:
        raise ValueError(f"config.data.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
    if num_workers:
        _default_absl_flags()
    source = open_sources(sources)
    emb_dim = probe_embedding(source)[0]
    shapes, empty = _cached_settings(source, resolution, text_length) if cached else ({}, None)
    _check_model_shapes(source, shapes, model_shapes or {})
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    sampler = BlockSampler(
        grain.samplers.IndexSampler(num_records=len(source), shuffle=True, seed=seed, num_epochs=num_epochs),
        shard_index, shard_count, batch_size, start_position, None if num_epochs is None else num_epochs * len(source))
    operations = [
        DecodeRecord(resolution, emb_dim),
        MakeExample(tokenizer, text_length, drop_caption_prob, drop_condition_prob, resolution, emb_dim,
                    shapes, empty),
        grain.transforms.Batch(batch_size, drop_remainder=True, batch_fn=Collate()),
    ]
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=num_workers,
                              worker_buffer_size=2, read_options=READ_OPTIONS,
                              shard_options=grain.sharding.NoSharding())
    return TrainIterator(loader, batch_size, num_records=len(source), max_consecutive_skips=max_consecutive_skips,
                         source_name=", ".join(map(str, sources)))
