"""The README is a promise: its quick-start blocks run as written on a fresh checkout, in a temporary folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnc_jax.model_config import tiny

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- quickstart"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r".*?-->\n```bash\n(.*?)^```", re.M | re.S)


def quickstart_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def checkout_copy(folder: Path) -> Path:
    """A folder that looks like a fresh clone (the tracked top-level entries, linked) and holds no outputs."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in sorted({line.split("/")[0] for line in tracked.splitlines()}):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run_bash(script: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_readme_marks_the_quickstart_blocks():
    blocks = quickstart_blocks()
    assert len(blocks) >= 2, "README lost its quick-start blocks"
    assert any("sample.py --random-init" in b for b in blocks) and any("train.py" in b for b in blocks)


@pytest.mark.slow
def test_quickstart_blocks_run_as_written(tmp_path):
    """Seconds to a minute: sampling with the tiny random model, a synthetic dataset and 20 tiny training steps."""
    folder = checkout_copy(tmp_path)
    for block in quickstart_blocks():
        before = {p for p in folder.rglob("*") if not p.is_symlink()}
        result = run_bash(block, folder)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        written = {p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()} - before
        assert written, f"README block wrote nothing:\n{block}"
    assert list(folder.glob("samples/smoke/*/image_000.png"))
    assert (folder / "runs/tiny/metrics.jsonl").read_text().strip()


def test_training_names_a_misfit_condition_before_the_first_step(tmp_path):
    """Embeddings of another width: one error line naming the file, the field and both shapes; exit 2."""
    folder = checkout_copy(tmp_path)
    width = tiny().global_fuser.in_dim
    result = run_bash(
        f"python -m cnc_jax.cli.prepare synthetic --base-dir data/s --split train --count 4 --emb-dim {2 * width}\n"
        "python train.py --config configs/tiny.py --workdir runs/t --config.data.sources=data/s:train", folder)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "train_foreground_embeddings/" in errors[0] and ".pt" in errors[0]
    assert f"fg_emb has shape ({2 * width},), the model expects ({width},)" in errors[0]
    assert not (folder / "runs/t/checkpoints").exists() or not any((folder / "runs/t/checkpoints").iterdir())
