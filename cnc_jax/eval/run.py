"""One evaluation: generated images + a reference -> every metric asked for, the counts, what was skipped.

Generated images are read in rounds of `round_size`, grouped by size (one compiled program per size and
network), and every metric consumes the same decoded images. FID / IS features stream into float64
statistics on the host; an unreadable image is reported by name, skipped and counted, never fatal.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np

from cnc_jax.data_parallel import DataParallel
from cnc_jax.eval import metrics
from cnc_jax.eval import nets as eval_nets
from cnc_jax.eval.inputs import Item, Reference, read_image, read_resized
from cnc_jax.io import InputError

METRICS = ("fid", "is", "clip", "lpips", "ssim", "depth")
PAIRED = ("lpips", "ssim")


@dataclasses.dataclass
class Options:
    metrics: Sequence[str] = METRICS
    per_device_batch: int = 8
    round_size: int = 64
    is_splits: int = 10


class _Log:
    """Skipped images: [{'name', 'metric', 'error'}] ('metric' None = the image could not be used at all)."""

    def __init__(self):
        self.entries: list[dict] = []

    def skip(self, name: str, error: str, metric: Optional[str] = None) -> None:
        self.entries.append({"name": name, "metric": metric, "error": error})


def _read_all(items: Sequence[Item], log: _Log, what: str) -> list[tuple[Item, np.ndarray]]:
    out = []
    for item in items:
        try:
            out.append((item, read_image(item.path)))
        except InputError as e:
            log.skip(f"{what}:{item.name}", str(e))
    return out


def _by_shape(pairs):
    groups = defaultdict(list)
    for item, image in pairs:
        groups[image.shape].append((item, image))
    return [groups[k] for k in sorted(groups)]


def _rounds(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def reference_stats(items: Sequence[Item], features: eval_nets.InceptionFeatures, options: Options, log: _Log,
                    progress: Callable[[int], None] = lambda n: None) -> metrics.FeatureStats:
    """pool3 statistics of reference images."""
    stats = metrics.FeatureStats()
    for chunk in _rounds(list(items), options.round_size):
        images = [image for _, image in _read_all(chunk, log, "reference")]
        if images:
            stats.update(features(images)[0])
        progress(len(chunk))
    return stats


class _Paired:
    """The reference side of a generated image: its paired image and depth conditions, by key."""

    def __init__(self, reference: Optional[Reference]):
        self.items = reference.by_key() if reference is not None and reference.kind != "stats" else {}

    def image(self, item: Item, size: tuple[int, int]) -> np.ndarray:
        ref = self.items.get(item.key)
        if ref is None:
            raise InputError(f"no reference image with key {item.key!r}")
        if size[0] != size[1]:
            raise InputError(f"paired metrics need square images (the dataset's resize + centre crop), got {size}")
        return read_resized(ref.path, size[0], 3)

    def conditions(self, item: Item, size: tuple[int, int]) -> dict:
        found = dict(item.conditions)
        if not found and item.key in self.items:
            found = dict(self.items[item.key].conditions)
        if "fg_depth" not in found and "bg_depth" not in found:
            raise InputError("no depth condition (fg_depth.png / bg_depth.png in the job folder, or the dataset's "
                             "depth maps)")
        if size[0] != size[1]:
            raise InputError(f"depth conditions are square (the dataset's resize + centre crop), got {size}")
        out = {}
        for field, path in found.items():
            array = read_resized(path, size[0], 1 if field == "mask" else 3)
            out[field] = array[..., 0].astype(np.float32) / np.float32(255)
        return out


def evaluate(generated: Sequence[Item], reference: Optional[Reference], nets: eval_nets.EvalNets,
             options: Options = Options(), progress: Callable[[int], None] = lambda n: None,
             save_stats: Optional[Callable] = None) -> dict:
    """The metrics of `generated` against `reference` as a JSON-ready dict (see evaluate.py for the layout)."""
    wanted = [m for m in METRICS if m in options.metrics]
    parallel = DataParallel()
    batch = options.per_device_batch * parallel.size
    log = _Log()
    features = None
    if "fid" in wanted or "is" in wanted:
        features = eval_nets.InceptionFeatures(*nets.inception, parallel, batch)
    lpips_fn = eval_nets.LPIPSDistance(*nets.lpips, parallel, batch) if "lpips" in wanted else None
    ssim_fn = eval_nets.SSIM(parallel, batch) if "ssim" in wanted else None
    clip_fn = eval_nets.CLIPScorer(*nets.clip, nets.tokenizer, parallel, batch) if "clip" in wanted else None
    depth_fn = eval_nets.DepthMaps(*nets.dpt, parallel, batch) if "depth" in wanted else None

    ref_stats, num_reference = None, None
    if "fid" in wanted:
        if reference.kind == "stats":
            ref_stats = reference.stats
        else:
            stats = reference_stats(reference.items, features, options, log, progress)
            ref_stats, num_reference = (stats.mean, stats.cov), stats.n
            if save_stats is not None:
                save_stats(stats.mean, stats.cov, stats.n)

    paired = _Paired(reference)
    gen_stats, logits = metrics.FeatureStats(), []
    values = {m: [] for m in ("clip", "lpips", "ssim")}
    depth_sums = defaultdict(lambda: [0.0, 0])
    counts = defaultdict(int)
    used = 0
    for chunk in _rounds(list(generated), options.round_size):
        for group in _by_shape(_read_all(chunk, log, "generated")):
            items, images = [i for i, _ in group], np.stack([im for _, im in group])
            used += len(items)
            size = images.shape[1:3]
            if features is not None:
                pool3, logit = features(images)
                gen_stats.update(pool3)
                logits.append(logit)
            if clip_fn is not None:
                keep = []
                for k, item in enumerate(items):
                    caption = item.caption if item.caption is not None else getattr(
                        paired.items.get(item.key), "caption", None)
                    if caption is None:
                        log.skip(f"generated:{item.name}", "no caption (job.json prompt or dataset caption)", "clip")
                    else:
                        keep.append((k, caption))
                if keep:
                    values["clip"].append(clip_fn([images[k] for k, _ in keep], [c for _, c in keep]))
            if lpips_fn is not None or ssim_fn is not None:
                pairs = []
                for k, item in enumerate(items):
                    try:
                        pairs.append((k, paired.image(item, size)))
                    except InputError as e:
                        for m in PAIRED:
                            if m in wanted:
                                log.skip(f"generated:{item.name}", str(e), m)
                if pairs:
                    a, b = images[[k for k, _ in pairs]], np.stack([r for _, r in pairs])
                    for m, fn in (("lpips", lpips_fn), ("ssim", ssim_fn)):
                        if fn is not None:
                            values[m].append(fn(a, b))
            if depth_fn is not None:
                _depth_round(depth_fn, items, images, paired, size, depth_sums, counts, log)
        progress(len(chunk))

    result = {"metrics": {}, "counts": {}}
    if "fid" in wanted:
        result["metrics"]["fid"] = metrics.frechet_distance(gen_stats.mean, gen_stats.cov, *ref_stats) \
            if gen_stats.n >= 2 else None
        result["counts"]["fid"] = {"generated": gen_stats.n, "reference": num_reference}
    if "is" in wanted:
        all_logits = np.concatenate(logits) if logits else np.zeros((0, 1))
        if len(all_logits) >= options.is_splits:
            mean, std = metrics.inception_score(all_logits, options.is_splits)
            result["metrics"]["is"] = {"mean": mean, "std": std, "splits": options.is_splits}
        else:
            result["metrics"]["is"] = None
            log.skip("generated", f"the Inception Score needs at least {options.is_splits} images "
                                  f"(--is-splits), got {len(all_logits)}", "is")
        result["counts"]["is"] = len(all_logits)
    for m, key in (("clip", "clip_score"), ("lpips", "lpips"), ("ssim", "ssim")):
        if m in wanted:
            got = np.concatenate(values[m]) if values[m] else np.zeros((0,))
            value = (metrics.clip_score(got) if m == "clip" else float(np.mean(got.astype(np.float64)))) \
                if len(got) else None
            result["metrics"][key] = value
            result["counts"][m] = int(len(got))
    if "depth" in wanted:
        result["metrics"]["depth"] = {f"mae{'' if part == 'all' else '_' + part}":
                                      (depth_sums[part][0] / depth_sums[part][1] if depth_sums[part][1] else None)
                                      for part in ("all", "fg", "bg")}
        result["counts"]["depth"] = counts["depth"]
    result["num_generated"] = len(generated)
    result["num_generated_used"] = used
    result["skipped"] = log.entries
    result["num_skipped_images"] = len({e["name"] for e in log.entries if e["metric"] is None})
    return result


def _depth_round(depth_fn, items, images, paired, size, sums, counts, log) -> None:
    rows, conds = [], []
    for k, item in enumerate(items):
        try:
            conds.append(paired.conditions(item, size))
            rows.append(k)
        except InputError as e:
            log.skip(f"generated:{item.name}", str(e), "depth")
    if not rows:
        return
    try:
        predicted = depth_fn(images[rows])
    except ValueError as e:
        for k in rows:
            log.skip(f"generated:{items[k].name}", str(e), "depth")
        return
    for row, cond in zip(predicted, conds):
        errors = metrics.depth_errors(row[None], *(cond[f][None] if f in cond else None
                                                   for f in ("fg_depth", "bg_depth", "mask")))
        for part, (total, n) in errors.items():
            sums[part][0] += float(np.asarray(total, np.float64).sum())
            sums[part][1] += int(np.asarray(n).sum())
        counts["depth"] += 1


__all__ = ["METRICS", "Options", "evaluate", "reference_stats"]
