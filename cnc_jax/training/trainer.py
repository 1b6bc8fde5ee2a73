"""The training loop of a CnC stage, from a stage config: `train(config, workdir)` builds the model, optimizer and
jitted step on the device mesh, resumes from the run folder's newest intact checkpoint and runs the steps (metrics,
checkpoints, image log, the non-finite guard, SIGTERM / SIGINT). A configuration mistake raises ValueError before
the run folder is written; a checkpoint that cannot be written raises OSError naming the file. Kept apart from the
command line (cnc_jax/cli/train.py: flags -> config -> `train`) so that tests and notebooks run the same loop on a
config object, without absl flags.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from cnc_jax import distributed
from cnc_jax import sharding as sh
from cnc_jax.checkpoint import record_run, starting_params
from cnc_jax.checkpoint.library_errors import short_reason
from cnc_jax.data.pipeline import SourceSpec, TFDSSpec, make_train_iterator, open_sources
from cnc_jax.io import write_atomic
from cnc_jax.models.attention_kernels import resolve
from cnc_jax.models.build import abstract_params, count_params
from cnc_jax.models.parts import merge_params, split_params
from cnc_jax.sampling.samplers import get_sampler
from cnc_jax.text_encoder import tokenize, tokenizer_by_name
from cnc_jax.training.checkpoints import TrainCheckpoints, abstract_with_shardings, package_version
from cnc_jax.training.config_checks import check_config
from cnc_jax.training.image_log import log_images
from cnc_jax.training.metrics import RunLog
from cnc_jax.training.state import TrainState, make_optimizer
from cnc_jax.training.step import diffusion_conditions, make_train_step


class NonFiniteLoss(RuntimeError):
    """A step's loss or gradient was not finite: the run stopped, with nothing after that step saved."""


class _StopWhileWaiting(BaseException):
    """Raised by the SIGTERM / SIGINT handler while the loop waits for data (a search through unreadable records
    can take long): a BaseException, so that no `except Exception` of the data pipeline swallows it."""


def load_model(config):
    """(model config, {part: numpy params}) from the init checkpoint (converted or run folder), or fresh weights."""
    model_config, params, fresh = starting_params(config.model, config.init_checkpoint, config.random_init,
                                                  config.seed)
    if fresh:
        print(f"fresh weights (seed {config.seed}) for: {', '.join(fresh)}")
    return model_config, params


def config_tokenizer(config):
    """The tokenizer config.tokenizer names (cnc_jax.text_encoder.tokenizer_by_name); unset is a mistake."""
    if not config.tokenizer:
        raise ValueError("set config.tokenizer (folder of the CLIP tokenizer files, or 'byte_level')")
    return tokenizer_by_name(config.tokenizer)


def data_sources(config) -> list:
    """The config's data sources (SourceSpec / TFDSSpec); none is a configuration mistake."""
    sources = []
    for entry in filter(None, config.data.sources.split(",")):
        base_dir, _, split = entry.rpartition(":") if ":" in entry else (entry, "", "train")
        sources.append(SourceSpec(base_dir=base_dir, split=split or "train"))
    if config.data.tfds_dir:
        sources.append(TFDSSpec(data_dir=config.data.tfds_dir, split=config.data.tfds_split))
    if not sources:
        raise ValueError("no training data: set config.data.sources or config.data.tfds_dir")
    return sources


def make_iterator(config, model_config, tokenizer, batch_size: int, text_length: int, start_position: int = 0):
    return make_train_iterator(
        data_sources(config), batch_size=batch_size // jax.process_count(), resolution=config.data.resolution,
        tokenizer=tokenizer, text_length=text_length, drop_caption_prob=config.drop_caption_prob,
        drop_condition_prob=config.drop_condition_prob, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), num_workers=config.data.num_workers, cached=config.data.cached,
        model_shapes=model_data_shapes(model_config, config.data.resolution, text_length),
        start_position=start_position, max_consecutive_skips=config.data.max_consecutive_skips)


def count_records(sources: list) -> int:
    """The records of the config's sources; a missing or unreadable source is a configuration mistake, found
    before anything is written."""
    try:
        return len(open_sources(sources))
    except OSError as e:
        raise ValueError(f"config.data: {e}") from None


def num_train_steps(config, batch_size: int, records: int) -> int:
    """config.num_steps, or config.num_epochs passes over the data (whole global batches)."""
    if config.num_epochs <= 0:
        return config.num_steps
    steps = int(config.num_epochs * records) // batch_size
    if steps < 1:
        raise ValueError(f"config.num_epochs={config.num_epochs} of {records} records is not one batch of "
                         f"{batch_size}")
    return steps


def data_layout(saved: dict | None, step: int, batch_size: int) -> tuple[dict, str | None]:
    """(where this run's data stream starts, this process's saved iterator state or None) from a checkpoint's
    data item. Global batch k holds stream positions [k*B, (k+1)*B) on any number of processes, so a run
    resumed on another process count (or global batch) restarts the stream where the saved steps ended."""
    layout = {"processes": jax.process_count(), "global_batch": batch_size, "start_position": 0, "start_step": 0}
    if saved is None:
        return layout, None
    if "iterator" in saved:  # a checkpoint of one process, written before the data layout was recorded
        saved = {"processes": 1, "global_batch": batch_size, "start_position": 0, "start_step": 0,
                 "iterators": [saved["iterator"]]}
    if saved["processes"] == layout["processes"] and saved["global_batch"] == batch_size:
        return {k: saved[k] for k in layout}, saved["iterators"][jax.process_index()]
    position = saved["start_position"] + (step - saved["start_step"]) * saved["global_batch"]
    print(f"the checkpoint's data stream was read by {saved['processes']} processes with global batch "
          f"{saved['global_batch']}: this run reads it on {layout['processes']} from position {position} "
          f"(exact unless unreadable records were skipped)")
    return {**layout, "start_position": position, "start_step": step}, None


def model_data_shapes(model_config, resolution: int, text_length: int) -> dict:
    """{field: per-example shape} of the data conditions this model takes (checked before the first step)."""
    shapes = {"text_embedding": (text_length, model_config.text_encoder.hidden_size),
              "latent_moments": (resolution // 8, resolution // 8, 2 * model_config.vae.embed_dim)}
    if model_config.has_global:
        shapes.update(fg_emb=(model_config.global_fuser.in_dim,), bg_emb=(model_config.global_fuser.in_dim,))
    return shapes


def state_shardings(tx, trainable_boxed, mesh, rules=sh.LOGICAL_AXIS_RULES):
    params_sh = sh.param_shardings(trainable_boxed, mesh, rules)
    abstract_params_ = nn.unbox(trainable_boxed)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params_), params_sh,
                                   transform_non_params=lambda _: sh.replicated(mesh))
    rep = sh.replicated(mesh)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep, nonfinite_step=rep)


def optimizer_settings(config, num_steps: int) -> tuple:
    """The make_optimizer keywords of a config, hashable (a _program cache key)."""
    return (("learning_rate", config.learning_rate), ("b1", config.adam_b1), ("b2", config.adam_b2),
            ("eps", config.adam_eps), ("weight_decay", config.weight_decay), ("warmup_steps", config.warmup_steps),
            ("schedule", config.lr_schedule), ("total_steps", num_steps), ("grad_clip_norm", config.grad_clip_norm))


@functools.lru_cache(maxsize=8)
def _program(model_config, opt_settings: tuple, compute_dtype: str, remat: bool, attention: str, sd_locked: bool,
             mesh, rules):
    """(jitted train step, optimizer, lr schedule, state shardings); cached so repeated runs in one process
    (tests, notebooks) reuse the compiled step."""
    tx, schedule = make_optimizer(**dict(opt_settings))
    boxed_trainable, boxed_frozen = split_params(model_config, abstract_params(model_config, boxed=True), sd_locked)
    state_sh = state_shardings(tx, boxed_trainable, mesh, rules)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[compute_dtype]
    step = jax.jit(make_train_step(model_config, tx, dtype=dtype, remat=remat, attention=attention),
                   in_shardings=(state_sh, sh.param_shardings(boxed_frozen, mesh, rules), None),
                   out_shardings=(state_sh, sh.replicated(mesh)), donate_argnums=(0,))
    return step, tx, schedule, state_sh


@dataclasses.dataclass
class Run:
    """Everything the training loop needs, built (and every configuration checked) by `setup`."""
    config: ml_collections.ConfigDict
    workdir: epath.Path
    model_config: object
    mesh: jax.sharding.Mesh
    rules: tuple
    batch_size: int
    num_steps: int
    step_fn: object
    lr_schedule: object
    state: TrainState
    frozen: dict
    tokenizer: object
    checkpoints: TrainCheckpoints
    start: int
    layout: dict
    iterator: object
    run_log: RunLog
    used_keys: frozenset


def train(config, workdir: str) -> dict:
    """The training run: `setup`, then `loop`; returns the last logged metrics."""
    return loop(setup(config, workdir))


def setup(config, workdir: str) -> Run:
    """Check the configuration, build the model, optimizer and jitted step on the mesh, resume from the latest
    checkpoint and open the data stream; a mistake raises ValueError before the run folder is written."""
    check_config(config)
    distributed.from_config(config)
    if config.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compile_cache_dir)
    workdir = epath.Path(workdir)
    rules = sh.parse_rules(config.mesh.rules)
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp)
    batch_size = config.batch_size if config.batch_size > 0 else 4 * mesh.size
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ValueError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices and "
                         f"{jax.process_count()} processes")
    num_steps = num_train_steps(config, batch_size, count_records(data_sources(config)))
    model_config, params = load_model(config)
    if config.image_log_every:  # a bad image-log sampler / step count fails now, not after the first 1000 steps
        get_sampler(config.image_log_sampler).plan(model_config.diffusion, config.image_log_steps)

    trainable, frozen = split_params(model_config, params, config.sd_locked)
    _, boxed_frozen = split_params(model_config, abstract_params(model_config, boxed=True), config.sd_locked)
    frozen_sh = sh.param_shardings(boxed_frozen, mesh, rules)
    step_fn, tx, lr_schedule, state_sh = _program(model_config, optimizer_settings(config, num_steps),
                                                  config.compute_dtype, config.remat, resolve(config.attention),
                                                  config.sd_locked, mesh, rules)
    tokenizer = config_tokenizer(config)
    run_record = None
    if distributed.is_main():  # after every configuration check: a mistake leaves no run folder behind
        run_record = record_run(str(workdir), config, model_config, frozen)  # what export needs to rebuild the model
    frozen = jax.device_put(frozen, frozen_sh)
    create = jax.jit(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(config.seed)), out_shardings=state_sh)
    state = create(jax.device_put(trainable, state_sh.params))
    del params, trainable  # the host copies (as large as the model) are not needed any more

    text_length = model_config.text_encoder.max_position_embeddings
    # every step's orbax metadata: the run record and the package version (orbax writes it from process 0 only)
    metadata = run_record and {**run_record, "cnc_jax_version": package_version()}
    checkpoints = TrainCheckpoints(str(workdir / "checkpoints"), max_to_keep=config.keep_checkpoints,
                                   metadata=metadata, error_log=error_log_path(workdir))
    try:  # from here a mistake (a damaged checkpoint, say) closes the checkpoints: their log filter goes too
        abstract_state = abstract_with_shardings(jax.eval_shape(lambda s: s, state), state_sh)
        start, restored, saved_data = resume(checkpoints, abstract_state, config.resume_from_step)
        if start:
            state = restored
            print(f"resumed from step {start}")
        layout, data_state = data_layout(saved_data, start, batch_size)
        iterator = make_iterator(config, model_config, tokenizer, batch_size, text_length, layout["start_position"])
        if data_state:
            iterator.set_state(data_state.encode())
        main_process = distributed.is_main()
        if main_process:
            write_atomic(workdir / "config.json", config.to_json_best_effort(indent=1).encode())
        _write_run_info(workdir, mesh, state, frozen, main_process)
        run_log = RunLog(workdir, config, start, enabled=main_process)
    except BaseException:
        with contextlib.suppress(Exception):
            checkpoints.close()
        raise
    # cached builds carry latents + text embeddings: the decoded image would only cost a host->device copy
    used_keys = ({"latent_moments", "text_embedding"} if config.data.cached else {"image", "input_ids"}) | set(
        diffusion_conditions(model_config, dict.fromkeys(("fg_depth", "bg_depth", "fg_emb", "bg_emb", "mask"))))
    return Run(config=config, workdir=workdir, model_config=model_config, mesh=mesh, rules=rules,
               batch_size=batch_size, num_steps=num_steps, step_fn=step_fn, lr_schedule=lr_schedule, state=state,
               frozen=frozen, tokenizer=tokenizer, checkpoints=checkpoints, start=start, layout=layout,
               iterator=iterator, run_log=run_log, used_keys=frozenset(used_keys))


def error_log_path(workdir: epath.Path) -> str:
    """Where orbax's error records go (cnc_jax.checkpoint.library_errors.LibraryLog): the run folder's
    train_errors.log (one file per process), a local temporary file for a remote run folder."""
    name = "train_errors.log" if distributed.is_main() else f"train_errors.process_{jax.process_index()}.log"
    if "://" in str(workdir):  # the log is appended to with plain open()
        return os.path.join(tempfile.gettempdir(), f"cnc_jax_{name}")
    return str(workdir / name)


def resume(checkpoints: TrainCheckpoints, abstract_state: Any,
           from_step: int = -1) -> tuple[int, TrainState | None, dict | None]:
    """(start step, restored state, saved data state) of the run folder's checkpoints; (0, None, None) for none.

    from_step -1: the newest intact checkpoint. A step whose restore fails is moved aside to checkpoints/corrupt-N
    (never deleted: the user can inspect it, and this run's saves of step N cannot collide with it), with one
    warning line, and the next older one is tried; when none restores, ValueError and nothing is moved. Why
    automatic: a preempted job on a TPU pod is restarted unattended, an error would stall it until someone comes,
    and the fallback costs only the steps since the previous save (the warning says which) and deletes nothing.
    from_step N >= 1: exactly checkpoints/N (ValueError when it is missing or unreadable); 0: the start. The newer
    steps are moved aside to checkpoints/abandoned-K (with a warning), so that this run's saves replace them.
    Every process takes the same decision; process 0 alone renames folders."""
    steps, folder = checkpoints.all_steps(), checkpoints.directory
    listing = f"the steps there: {', '.join(map(str, steps)) or 'none'}"
    if from_step >= 0:
        restored = None, None
        if from_step and from_step not in steps:
            raise ValueError(f"config.resume_from_step={from_step}: {folder} has no checkpoint {from_step} "
                             f"({listing})")
        if from_step:
            restored, error = _try_restore(checkpoints, from_step, abstract_state)
            if error:
                raise ValueError(f"config.resume_from_step={from_step}: {folder / str(from_step)} is unreadable "
                                 f"({error}; {listing})")
        newer = [step for step in steps if step > from_step]
        for step, name in zip(newer, _set_aside(checkpoints, newer, "abandoned")):  # process 0 says it
            print(f"warning: config.resume_from_step={from_step}: moved the newer {folder / str(step)} to "
                  f"{folder / name}")
        return from_step, *restored
    failed = []
    for step in reversed(steps):
        restored, error = _try_restore(checkpoints, step, abstract_state)
        if not error:
            break
        failed.append((step, error))
    else:
        if failed:
            raise ValueError(f"{folder}: no checkpoint restores ({'; '.join(f'{s}: {e}' for s, e in failed)}): "
                             f"remove the folder (or set config.resume_from_step=0) to start over, or restore its "
                             f"damaged files")
        return 0, None, None
    for (bad, error), name in zip(failed, _set_aside(checkpoints, [bad for bad, _ in failed], "corrupt")):  # on 0
        print(f"warning: {folder / str(bad)} is unreadable ({error}): moved to {folder / name}; resuming from step "
              f"{step} (the steps after {step} are trained again)")
    return step, *restored


def _try_restore(checkpoints: TrainCheckpoints, step: int, abstract_state: Any) -> tuple[tuple, str | None]:
    """((state, data) or (None, None), why it failed or None); it failed when it failed on any process."""
    try:
        restored, error = checkpoints.restore(step, abstract_state), None
    except Exception as e:  # noqa: BLE001  what orbax / tensorstore raise varies with the damage
        restored, error = (None, None), short_reason(e)
    if distributed.any_process(error is not None):
        return (None, None), error or "unreadable on another process"
    return restored, None


def _set_aside(checkpoints: TrainCheckpoints, steps: list, prefix: str) -> list:
    """Rename checkpoints/N of `steps` to <prefix>-N on process 0 (the new names there, [] elsewhere); every
    process then re-reads the steps."""
    if not steps:
        return []
    names = [checkpoints.set_aside(step, prefix) for step in steps] if distributed.is_main() else []
    distributed.barrier(f"checkpoints {prefix}")
    checkpoints.reload()
    return names


def loop(run: Run) -> dict:
    """The steps from run.start to run.num_steps: logging, checkpoints, image logs, the profiler and SIGTERM /
    SIGINT (a final checkpoint, then a stop after the same step on every process); returns the last logged metrics.

    A signal that comes while the loop waits for data (a search through unreadable records can take long) stops
    the wait at once with one process: the last completed step is saved (unless it is already) and the loop
    returns. With several processes it stops after the step, as always: a save is joint, and a process stopped in
    its wait cannot bring the others (each in its own wait or step) to one step; the data pipeline's
    config.data.max_consecutive_skips bounds the wait. A second SIGINT stops at once (KeyboardInterrupt).

    The step is compiled before the first one runs: its time is logged once as compile_secs (with the first
    metrics), and steps_per_sec / examples_per_sec count the time from then on, less the image logs'."""
    config, workdir, mesh, rules, state, frozen = run.config, run.workdir, run.mesh, run.rules, run.state, run.frozen
    step_fn, start, num_steps, batch_size, run_log = run.step_fn, run.start, run.num_steps, run.batch_size, run.run_log
    stop = {"signal": None, "waiting": False}
    wait_interruptible = jax.process_count() == 1

    def on_signal(signum, frame):
        if stop["signal"] and signum == signal.SIGINT:  # asked twice: stop now, without a save
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        if stop["waiting"]:
            stop["waiting"] = False
            raise _StopWhileWaiting

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    recent_uids = collections.deque(maxlen=max(config.log_every, 1) + 1)
    pending, last, tick, tracing, compile_secs = [], {}, time.perf_counter(), False, None
    saved, data_state = start, None  # the newest step on disk; the data state before the batch being read
    progress = tqdm(total=num_steps, initial=start, unit="step", desc="train", disable=jax.process_index())

    def log_metrics(done: int) -> None:
        nonlocal pending, last, tick, compile_secs
        _check_finite(state, recent_uids)
        values = jax.device_get(pending)
        now = time.perf_counter()
        last = {"step": done, "loss": float(np.mean([m["loss"] for m in values])),
                "grad_norm": float(values[-1]["grad_norm"]), "lr": float(run.lr_schedule(done - 1)),
                "steps_per_sec": len(values) / (now - tick),
                "examples_per_sec": len(values) * batch_size / (now - tick)}
        if compile_secs is not None:  # the first metrics of this run (or resumption)
            last["compile_secs"], compile_secs = compile_secs, None
        pending, tick = [], now
        run_log.scalars(last)
        progress.set_postfix(loss=f"{last['loss']:.4f}")

    def save(done: int, iterator_state: str) -> None:
        nonlocal saved
        _check_finite(state, recent_uids)
        run.checkpoints.save(done, state, {**run.layout, "iterators": distributed.gather_strings(iterator_state)})
        saved = done

    try:
        for step in range(start, num_steps):
            if config.profile_steps and step == config.profile_start:
                jax.profiler.start_trace(str(workdir / "profile"))
                tracing = True
            try:
                if wait_interruptible:
                    data_state = run.iterator.get_state().decode()  # what a stop in the wait saves
                    stop["waiting"] = True
                    if stop["signal"]:  # it came between the last step's check and here
                        raise _StopWhileWaiting
                host_batch = next(run.iterator)
                stop["waiting"] = False
            except _StopWhileWaiting:
                stop["waiting"] = False
                if step > saved:  # steps of this run not on disk yet
                    if pending:
                        log_metrics(step)
                    save(step, data_state)
                    run.checkpoints.wait()
                    print(f"{stop['signal']}: saved step {step}, stopping")
                else:
                    print(f"{stop['signal']}: stopping before step {step + 1}; nothing new to save")
                break
            recent_uids.append((step, [u.decode() if isinstance(u, bytes) else str(u) for u in host_batch["uid"]]))
            if config.record_data_order:  # the global batch's uids, in row order
                parts = distributed.gather_strings(json.dumps(recent_uids[-1][1]))
                run_log.data_order(step, [uid for part in parts for uid in json.loads(part)])
            batch = {k: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, np.ndim(v), rules),
                                                               np.asarray(v))
                     for k, v in host_batch.items() if k in run.used_keys}
            if step == start:
                # compile first, timed apart from the steps (compile_secs: ~0 for a program this process compiled
                # before, a load's time from the compilation cache). With several processes, start together: a
                # process that loads the step from the compilation cache would otherwise wait in its first
                # collective for one still compiling (gloo gives up after 30 s). Every process compiles at once:
                # only process 0 writes the cache and, on CPU, the other processes' cache keys differ from its
                # (they name their local devices), so none could load what process 0 compiled.
                began = time.perf_counter()
                step_fn = step_fn.lower(state, frozen, batch).compile()
                compile_secs = time.perf_counter() - began
                if jax.process_count() > 1:
                    distributed.barrier("train step compiled")
                tick = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch)
            pending.append(metrics)
            progress.update(1)
            done = step + 1
            if tracing and done == config.profile_start + config.profile_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            stopping = distributed.any_process(stop["signal"] is not None)  # every process stops after one step
            if done % config.log_every == 0 or done == num_steps or stopping:
                log_metrics(done)
            if done % config.checkpoint_every == 0 or done == num_steps or stopping:
                save(done, run.iterator.get_state().decode())
            if config.image_log_every and done % config.image_log_every == 0:
                jax.block_until_ready(state)  # the steps before it count as steps
                began = time.perf_counter()
                _image_log(config, run.model_config, state, frozen, host_batch, run.tokenizer, run_log, done)
                tick += time.perf_counter() - began  # the sampler's time is not the steps'
            if stopping:
                run.checkpoints.wait()  # on disk before it says so
                print(f"{stop['signal'] or 'SIGTERM'}: saved step {done}, stopping")
                break
    finally:
        failing, stop["waiting"] = sys.exc_info()[1] is not None, False
        run.state = state  # the donated input state is gone: keep the live one
        progress.close()
        closing_errors = []
        for close in ((jax.profiler.stop_trace,) if tracing else ()) + (run.checkpoints.close, run_log.close):
            try:
                close()
            except Exception as e:  # noqa: BLE001  every one runs; a full disk fails several with one cause
                closing_errors.append(e)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if closing_errors and not failing:  # else the error in flight is the one to report
            raise closing_errors[0]
    return last


def _check_finite(state: TrainState, recent_uids) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        uids = dict(recent_uids).get(bad, ["(not kept)"])
        raise NonFiniteLoss(f"non-finite loss or gradient at step {bad} (batch uids: {', '.join(uids)}); "
                            f"the update was not applied and nothing after step {bad} was saved")


def _write_run_info(workdir: epath.Path, mesh, state, frozen, write: bool) -> None:
    held = sh.bytes_per_device({"params": state.params, "opt_state": state.opt_state})
    frozen_held = sh.bytes_per_device(frozen)
    info = {"devices": mesh.size, "mesh": dict(mesh.shape), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(),
            "trainable_params": count_params(state.params), "frozen_params": count_params(frozen),
            "trainable_and_optimizer_bytes_per_device": max(held.values()),
            "frozen_bytes_per_device": max(frozen_held.values())}
    if write:
        write_atomic(workdir / "run_info.json", json.dumps(info, indent=1).encode())
        print(json.dumps(info))


def _image_log(config, model_config, state, frozen, host_batch, tokenizer, run_log: RunLog, step) -> None:
    """Every process computes the grid (the params span them all) from process 0's first images."""
    params = merge_params(state.params, frozen)  # the device arrays as they are: no host copy of the model
    empty = tokenize(tokenizer, [""], model_config.text_encoder.max_position_embeddings)[0]
    batch = {k: np.asarray(v)[:4] for k, v in host_batch.items() if k != "uid"}
    if jax.process_count() > 1:
        batch = multihost_utils.broadcast_one_to_all(batch)
    grid = log_images(model_config, params, batch, empty, num=4, steps=config.image_log_steps,
                      guidance=config.image_log_guidance, seed=step, attention=resolve(config.attention),
                      sampler=config.image_log_sampler)
    run_log.image(step, grid)
