"""What a training run writes next to its checkpoints, on process 0 only, through etils.epath (local or gs://):
metrics.jsonl, TensorBoard events (tensorboard/, tensorboardX: no TensorFlow), the image log (images/ and
TensorBoard), data_order.jsonl, and W&B when config.wandb_project is set and the wandb package is installed.

A resumed run keeps these files consistent with its checkpoint: lines of steps after the restored one (logged
before a crash, never saved) are dropped and TensorBoard purges those events, so every step appears once.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import numpy as np
from etils import epath

from cnc_jax.io import write_png

# every metrics line; compile_secs (the train step's compilation, left out of the throughputs) only on the first
# line of a run or resumption
SCALARS = ("loss", "lr", "grad_norm", "steps_per_sec", "examples_per_sec", "compile_secs")


def is_remote(path: epath.Path) -> bool:
    return "://" in str(path)


class JsonlFile:
    """One JSON object per line. Local files are appended to; object stores (no append) get the whole file
    rewritten at each flush."""

    def __init__(self, path: epath.Path, keep: Callable[[dict], bool]):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        self._lines = [line for line in lines if line.strip() and keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in self._lines))
        self._file = None if is_remote(path) else path.open("a")

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        if self._file:
            self._file.write(line + "\n")
        else:
            self._lines.append(line)

    def flush(self) -> None:
        if self._file:
            self._file.flush()
        else:
            self.path.write_text("".join(line + "\n" for line in self._lines))

    def close(self) -> None:
        self.flush()
        if self._file:
            self._file.close()


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
        self.tensorboard.flush()
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def image(self, step: int, grid: np.ndarray) -> None:
        """The image log grid (H, W, 3) uint8: images/step_N.png, TensorBoard image 'image_log', W&B."""
        if not self.enabled:
            return
        write_png(self.workdir / "images" / f"step_{step:07d}.png", grid)
        self.tensorboard.add_image("image_log", grid, step, dataformats="HWC")
        self.tensorboard.flush()
        if self.wandb:
            import wandb

            self.wandb.log({"image_log": wandb.Image(grid)}, step=step)

    def close(self) -> None:
        for log in (self.metrics, self.order, self.tensorboard):
            if log:
                log.close()
        if self.wandb:
            self.wandb.finish()


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
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=config.wandb_project, id=run_id, resume="allow", config=config.to_dict(),
                      dir=None if is_remote(workdir) else str(workdir))
