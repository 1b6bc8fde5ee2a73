"""What a training run writes next to its checkpoints, on process 0 only, through etils.epath (local or gs://):
metrics.jsonl, TensorBoard events (tensorboard/, tensorboardX: no TensorFlow), the image log (images/ and
TensorBoard), data_order.jsonl, and W&B when config.wandb_project is set and the wandb package is installed.

A resumed run keeps these files consistent with its checkpoint: lines of steps after the restored one (logged
before a crash, never saved) are dropped and TensorBoard purges those events, so every step appears once. A last
line cut short by a crash or a full disk is dropped with a warning; the files are rewritten atomically (a crash
while rewriting leaves the old file, never half of it).
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Callable, Optional

import numpy as np
from etils import epath

from cnc_jax.io import write_atomic, write_png

# every metrics line; compile_secs (the train step's compilation, left out of the throughputs) only on the first
# line of a run or resumption
SCALARS = ("loss", "lr", "grad_norm", "steps_per_sec", "examples_per_sec", "compile_secs")


def is_remote(path: epath.Path) -> bool:
    return "://" in str(path)


def write_whole(path: epath.Path, text: str) -> None:
    """Replace a run file at once: locally through a temporary file (a crash leaves the old file or the new one,
    never a mix); object stores write whole objects anyway."""
    if is_remote(path):
        path.write_text(text)
    else:
        write_atomic(path, text.encode("utf-8"))


def parse_jsonl(data: bytes, path: epath.Path) -> list[tuple[int, str, dict]]:
    """(line number, line, object) of each non-blank line of `path`'s `data`. An unparsable LAST line is what a
    crash or a full disk leaves mid-write: dropped, with a warning naming the file. One before it is damage, not
    a crash artefact: a ValueError naming the file and the line."""
    numbered = [(i + 1, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]
    records = []
    for k, (number, line) in enumerate(numbered):
        try:
            text = line.decode("utf-8").strip()
            record = json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        else:
            reason = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        if reason is not None:
            if k == len(numbered) - 1:
                print(f"warning: {path}: dropped a truncated last line (line {number}, {len(line)} bytes: {reason})",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number}: not a JSON object ({reason}); only a cut-short last line is "
                             f"dropped by itself: delete or repair this line (or the file)")
        records.append((number, text, record))
    return records


class JsonlFile:
    """One JSON object per line. Local files are appended to; object stores (no append) get the whole file
    rewritten at each flush. Opening keeps the lines `keep` accepts (see parse_jsonl for damaged lines) and
    rewrites the file, atomically, when anything was dropped."""

    def __init__(self, path: epath.Path, keep: Callable[[dict], bool]):
        self.path = path
        self._lines = []
        data = path.read_bytes() if path.exists() else None
        for number, line, record in parse_jsonl(data or b"", path):
            try:
                kept = keep(record)
            except (KeyError, TypeError) as e:  # e.g. no "step", or not a number
                raise ValueError(f"{path}: line {number}: not a record of this file ({type(e).__name__}: {e}): "
                                 f"{line[:80]}") from None
            if kept:
                self._lines.append(line)
        text = "".join(line + "\n" for line in self._lines)
        if data != text.encode("utf-8"):
            write_whole(path, text)
        self._file = None if is_remote(path) else path.open("a")

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        if self._file:
            self._file.write(line + "\n")
        else:
            self._lines.append(line)

    def flush(self) -> None:
        """A failure (a full disk) is an OSError naming this file."""
        try:
            if self._file:
                self._file.flush()
            else:
                self.path.write_text("".join(line + "\n" for line in self._lines))  # one object: whole or not at all
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._file:
                file, self._file = self._file, None
                try:
                    file.close()
                except OSError:  # the data that did not fit: flush already said so
                    pass


TENSORBOARD_THREAD_ERRORS: list = []  # what tensorboardX's writer threads died of (see _quiet_tensorboard_threads)


def _quiet_tensorboard_threads(previous=threading.excepthook):
    """Keep the exceptions of tensorboardX's writer threads (a full disk: one traceback when the thread dies,
    another when the interpreter closes its queue at exit) off the console: RunLog raises the first as one OSError
    naming the folder. Other threads' exceptions are printed as before."""
    def hook(args):
        if type(args.thread).__module__.startswith("tensorboardX") and isinstance(args.exc_value, OSError):
            TENSORBOARD_THREAD_ERRORS.append(args.exc_value)
        else:
            previous(args)

    if not getattr(threading.excepthook, "quiets_tensorboard", False):
        hook.quiets_tensorboard = True
        threading.excepthook = hook


class RunLog:
    """The run's logs; every method does nothing where `enabled` is false (the processes other than 0)."""

    def __init__(self, workdir: epath.Path, config, start_step: int, enabled: bool):
        self.workdir, self.enabled = workdir, enabled
        self.metrics = self.order = self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.metrics = JsonlFile(workdir / "metrics.jsonl", lambda r: r["step"] <= start_step)
        if config.record_data_order:  # its steps count from 0: a run resumed at step s has seen steps 0..s-1
            self.order = JsonlFile(workdir / "data_order.jsonl", lambda r: r["step"] < start_step)
        from tensorboardX import SummaryWriter

        _quiet_tensorboard_threads()

        # events of steps after the checkpoint (from before a crash) are hidden
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step else None)
        self.wandb = _wandb_run(config, workdir)

    def data_order(self, step: int, uids: list) -> None:
        if self.order:
            self.order.write({"step": step, "uids": uids})

    def scalars(self, record: dict) -> None:
        """record: {"step": N, name: value, ...} (one metrics.jsonl line)."""
        if not self.enabled:
            return
        self.metrics.write(record)
        self.metrics.flush()
        if self.order:
            self.order.flush()
        step = record["step"]
        for name, value in record.items():
            if name != "step":
                self.tensorboard.add_scalar(f"train/{name}", value, step)
        self._flush_tensorboard()
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def image(self, step: int, grid: np.ndarray) -> None:
        """The image log grid (H, W, 3) uint8: images/step_N.png, TensorBoard image 'image_log', W&B."""
        if not self.enabled:
            return
        write_png(self.workdir / "images" / f"step_{step:07d}.png", grid)
        self.tensorboard.add_image("image_log", grid, step, dataformats="HWC")
        self._flush_tensorboard()
        if self.wandb:
            import wandb

            self.wandb.log({"image_log": wandb.Image(grid)}, step=step)

    def _flush_tensorboard(self) -> None:
        """Flush TensorBoard's events. A failure (a full disk), here or in tensorboardX's writer thread, is an
        OSError naming the folder, and ends the writers for good: tensorboardX's exit hook would flush, fail and
        print a traceback again."""
        try:
            self.tensorboard.flush()
            if TENSORBOARD_THREAD_ERRORS:
                raise TENSORBOARD_THREAD_ERRORS[-1]
        except OSError as e:
            for writer in (self.tensorboard.all_writers or {}).values():
                writer.event_writer._closed = True  # tensorboardX has no public way to give up a writer
            self.tensorboard = None
            raise OSError(e.errno, e.strerror, str(self.workdir / "tensorboard")) from None

    def close(self) -> None:
        """Close every log, also when one fails (a full disk); the first failure is raised once all are closed."""
        failure = None
        for log in (self.metrics, self.order):
            if log:
                try:
                    log.close()
                except OSError as e:
                    failure = failure or e
        if self.tensorboard:
            try:
                self._flush_tensorboard()
                self.tensorboard.close()
            except OSError as e:
                failure = failure or e
        if self.wandb:
            self.wandb.finish()
        if failure:
            raise failure


def _wandb_run(config, workdir: epath.Path) -> Optional[object]:
    """A W&B run (resumed with the id kept in the run folder) when asked for and available; never required."""
    if not config.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        print("warning: config.wandb_project is set but the wandb package is not installed: not logging to W&B")
        return None
    id_file = workdir / "wandb_run_id.txt"
    run_id = id_file.read_bytes().decode("utf-8", "replace").strip() if id_file.exists() else ""
    if not run_id:  # first start (or an empty file a crash left): a new W&B run
        run_id = wandb.util.generate_id()
        write_whole(id_file, run_id)
    return wandb.init(project=config.wandb_project, id=run_id, resume="allow", config=config.to_dict(),
                      dir=None if is_remote(workdir) else str(workdir))
