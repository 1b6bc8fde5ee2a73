"""The README is a promise. Every ```bash block carries a marker on the line above it:

  <!-- readme-test: tests/test_readme.py runs this block as written[ (quick start)]; writes: GLOB, GLOB, ... -->
      run here, in README order, in one fresh copy of the repository (later blocks use what earlier ones wrote:
      `runs/tiny`); it must exit 0, every GLOB (relative to the checkout) must match a file it wrote, and what it
      wrote must be ignored by the repository's .gitignore
  <!-- readme-test: FILE ... -->
      FILE (another test, or .ci/run) runs these commands; it must exist and name the block's scripts and long
      flags (lines a block run here holds verbatim aside)
  <!-- needs: REASON -->
      not run: it needs downloaded weights or data, or hardware (a TPU pod)

so a new block is either run or says why not, and a block that needs nothing downloaded (`--random-init`,
`tiny_models`) cannot be marked `needs:`. The run blocks take minutes (the slow tests share one module fixture).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_jax.model_config import tiny

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests/test_readme.py"
BLOCK = re.compile(r"^(?:<!-- (?P<kind>[\w-]+): (?P<text>[^\n]*?) -->\n)?```bash\n(?P<body>.*?)^```", re.M | re.S)
# lines no README command run here may print (the quick starts above all): warnings of packages we do not use
NOISE = ("PyTorch was not found", "Metadata file does not exist", "share=True")
DOWNLOAD_FREE = ("--random-init", "tiny-models", "tiny_models")  # a block using these needs no weights


@dataclass
class Block:
    line: int
    kind: str  # readme-test | needs | "" (unmarked)
    text: str
    body: str

    @property
    def by(self) -> str:
        return self.text.split()[0] if self.kind == "readme-test" and self.text else ""

    @property
    def runs_here(self) -> bool:
        return self.by == HERE

    @property
    def quick_start(self) -> bool:
        return self.runs_here and "(quick start)" in self.text

    @property
    def writes(self) -> list[str]:
        return [g.strip() for g in self.text.split("; writes:", 1)[1].split(",")] if "; writes:" in self.text else []

    def __str__(self) -> str:
        return f"README.md:{self.line}:\n{self.body}"


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [Block(text.count("\n", 0, m.start("body")), m["kind"] or "", m["text"] or "", m["body"])
            for m in BLOCK.finditer(text)]


def run_here() -> list[Block]:
    return [b for b in readme_blocks() if b.runs_here]


def checkout_copy(folder: Path) -> Path:
    """A fresh copy of the checkout: the files git tracks or would track (not ignored), no outputs, no links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not in a fresh copy either
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


def run_bash(script: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout


def files_of(folder: Path) -> dict[str, int]:
    found = {}
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names:
            path = Path(top, name)
            found[path.relative_to(folder).as_posix()] = path.stat().st_mtime_ns
    return found


def long_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w.-]*)", text))


def scripts(text: str) -> set[str]:
    return {Path(s).name for s in re.findall(r"[\w./-]+\.py\b", text)}


def test_every_bash_block_is_run_or_says_what_it_needs():
    blocks = readme_blocks()
    assert len(blocks) >= 20, "README.md lost its bash blocks (or the block pattern broke)"
    for block in blocks:
        assert block.kind in ("readme-test", "needs"), (
            f"unclassified README block: put <!-- readme-test: ... --> (run by {HERE} or another test) or "
            f"<!-- needs: REASON --> on the line above it\n{block}")
        if block.kind == "needs":
            assert len(block.text) > 3, f"say what the block needs\n{block}"
            assert not any(s in block.body for s in DOWNLOAD_FREE), (
                f"this block needs no download: run it here or name the test that runs it\n{block}")
        else:
            assert (ROOT / block.by).is_file(), f"the marker names {block.by!r}, which does not exist\n{block}"
            if block.runs_here:
                assert block.writes, f"say what the block writes (; writes: GLOB, ...)\n{block}"


def test_blocks_run_elsewhere_are_the_commands_their_test_runs():
    """A block another test runs: that test names each of its scripts and long flags, so a README edit that adds
    a flag must also reach the test. Lines a block run here holds verbatim are that block's."""
    here = {line.strip() for b in run_here() for line in b.body.splitlines()}
    elsewhere = [b for b in readme_blocks() if b.kind == "readme-test" and not b.runs_here]
    assert {b.by for b in elsewhere} >= {"tests/test_demo.py", "tests/test_multiprocess.py", "tests/test_install.py",
                                         ".ci/run"}
    for block in elsewhere:
        source = (ROOT / block.by).read_text()
        own = "\n".join(line for line in block.body.splitlines() if line.strip() not in here)
        missing = sorted(x for x in long_flags(own) | scripts(own) if x not in source)
        assert not missing, f"{block.by} does not run {missing} of\n{block}"


def test_the_download_free_blocks_are_marked_to_run_here():
    blocks = run_here()
    quick = [b.body for b in blocks if b.quick_start]
    assert len(quick) >= 2, "README lost its quick-start blocks"
    assert any("sample.py --random-init" in b for b in quick) and any("train.py" in b for b in quick)
    bodies = "\n".join(b.body for b in blocks)
    for command in ("sample.py --checkpoint runs/tiny", "export runs/tiny", "--format official", "--format diffusers",
                    "$C ckpt/tiny_run", "evaluate.py", "--random-init --from-dataset", "tiny-models",
                    "masks-cocostuff", "background", "primitives", "$P tfds"):
        assert command in bodies, f"no README block run here holds {command!r}"
    demo = [b for b in readme_blocks() if "demo.py --random-init" in b.body]
    assert demo and all(b.by == "tests/test_demo.py" for b in demo)


# ---- the blocks, run ----

@dataclass
class Ran:
    block: Block
    result: subprocess.CompletedProcess
    seconds: float
    wrote: set[str]

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Every block marked to run here, in README order, in one fresh copy (a git repository of the copied files,
    all staged, so that git can say what the commands leave behind). Stops at the first block that fails."""
    folder = checkout_copy(tmp_path_factory.mktemp("checkout"))
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    ran = []
    for block in run_here():
        before = files_of(folder)
        t0 = time.time()
        result = run_bash(block.body, folder)
        after = files_of(folder)
        ran.append(Ran(block, result, time.time() - t0,
                       {p for p, mtime in after.items() if before.get(p) != mtime}))
        print(f"README.md:{block.line}: exit {result.returncode} in {ran[-1].seconds:.0f} s")
        if result.returncode:
            break
    return folder, ran


def by_command(readme, command: str) -> Ran:
    (found,) = [r for r in readme[1] if command in r.block.body]
    assert found.result.returncode == 0, found.output[-3000:]
    return found


@pytest.mark.slow
def test_download_free_blocks_run_in_order_and_write_what_they_say(readme):
    """Minutes: the two quick starts, sampling the tiny run, its exports and their conversion back, the evaluation
    smoke run and the dataset preparation chain with tiny models, at 64²."""
    _, ran = readme
    assert len(ran) == len(run_here()), "a block failed; the later ones did not run"
    for r in ran:
        assert r.result.returncode == 0, f"README block failed:\n{r.block}\n{r.output[-4000:]}"
        assert "Traceback" not in r.output, f"{r.block}\n{r.output[-4000:]}"
        for glob in r.block.writes:
            assert any(Path(p).match(glob) and len(Path(p).parts) == len(Path(glob).parts) for p in r.wrote), (
                f"the README says this block writes {glob}; it did not\n{r.block}")


@pytest.mark.slow
def test_readme_commands_print_no_noise(readme):
    for r in readme[1]:
        for line in NOISE:
            assert line not in r.output, f"{line!r} in the output of\n{r.block}"


@pytest.mark.slow
def test_git_status_stays_clean_after_the_readme_and_pip_install(readme, tmp_path):
    """Every file the README's commands wrote, and what `pip install .` builds in the checkout (build/,
    *.egg-info: the same in-tree build as a wheel's), is ignored by the repository's .gitignore."""
    folder, ran = readme
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."], cwd=folder,
                   check=True, capture_output=True, text=True, timeout=300)
    assert list(tmp_path.glob("cnc_jax-*.whl")) and (folder / "build").is_dir()
    assert sum(len(r.wrote) for r in ran) > 100
    untracked = git(folder, "ls-files", "--others", "--exclude-standard").split()
    changed = git(folder, "diff", "--name-only").split()
    assert not untracked and not changed, f"git status after the README: new {untracked[:20]}, changed {changed}"
    written = sorted(p for r in ran for p in r.wrote)
    ignored = subprocess.run(["git", "check-ignore", "--stdin"], cwd=folder, input="\n".join(written),
                             capture_output=True, text=True).stdout.splitlines()
    assert set(ignored) == set(written), sorted(set(written) - set(ignored))[:20]


def job_folder(folder: Path, out: str) -> Path:
    (job,) = [p for p in (folder / out).iterdir() if p.is_dir()]
    return job


@pytest.mark.slow
def test_sampling_blocks_write_whole_job_folders(readme):
    folder = readme[0]
    by_command(readme, "sample.py --random-init --out samples/smoke")
    by_command(readme, "sample.py --checkpoint runs/tiny")
    for out, checkpoint, size, prompt in (("samples/smoke", "random-init", 128, "a photo"),
                                          ("samples/tiny_run", str(folder / "runs" / "tiny"), 64, "a red ball")):
        job = job_folder(folder, out)
        assert {p.name for p in job.iterdir()} == {"image_000.png", "grid.png", "fg_depth.png", "bg_depth.png",
                                                  "mask.png", "job.json"}
        info = json.loads((job / "job.json").read_text())
        assert info["checkpoint"].startswith(checkpoint) and info["settings"]["prompt"] == prompt
        assert Image.open(job / "image_000.png").size == (size, size)
    # the run folder without --u2net and without a fg image: the all-background mask the README promises
    # (--random-init brings random annotators, whose U²-Net makes the mask of the smoke run)
    assert not np.asarray(Image.open(job / "mask.png")).any()


@pytest.mark.slow
def test_tiny_training_block_writes_its_run_folder(readme):
    folder = readme[0]
    by_command(readme, "train.py --config configs/tiny.py")
    run = folder / "runs" / "tiny"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics) and "compile_secs" in metrics[0]
    assert Image.open(run / "images" / "step_0000020.png").size[0] > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "20").is_dir() and json.loads((run / "run_model.json").read_text())["model"]


@pytest.mark.slow
def test_tiny_run_exports_convert_back_to_the_same_weights(readme):
    from cnc_jax.checkpoint import load_converted, load_weights

    folder = readme[0]
    ran = by_command(readme, "export runs/tiny")
    assert ran.output.count("warning: the official code cannot build") >= 1  # --allow-unofficial warns
    run_config, run_params = load_weights(str(folder / "runs" / "tiny"))
    for name in ("tiny_run", "tiny_from_safetensors", "tiny_from_official", "tiny_from_diffusers"):
        config, params = load_converted(str(folder / "ckpt" / name))
        assert config == run_config, name
        assert set(params) == set(run_params), name
        for part in params:
            flat, ref = _flatten(params[part]), _flatten(run_params[part])
            assert flat.keys() == ref.keys(), (name, part)
            for key in flat:
                np.testing.assert_array_equal(flat[key], ref[key], err_msg=f"{name}: {part}/{key}")


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): np.asarray(tree)}


@pytest.mark.slow
def test_evaluation_smoke_block_reports_every_metric(readme):
    folder = readme[0]
    by_command(readme, "evaluate.py --generated samples/s")
    report = json.loads((folder / "eval" / "smoke.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"fid", "is", "clip_score", "lpips", "ssim", "depth"}
    assert all(math.isfinite(v) for v in (metrics["fid"], metrics["is"]["mean"], metrics["clip_score"],
                                          metrics["lpips"], metrics["ssim"], *metrics["depth"].values()))
    uids = sorted(p.stem for p in (folder / "data" / "s" / "val").glob("*.jpg"))
    assert len(uids) == 4 and sorted(p.name for p in (folder / "samples" / "s").iterdir()) == uids
    assert report["num_generated_used"] == 4 * 3 and not report["skipped"]


@pytest.mark.slow
def test_data_block_prepares_a_training_tree_and_a_tfds_build(readme):
    from cnc_jax.data.layout import SourceSpec, read_captions
    from cnc_jax.data.pipeline import TFDSSpec, make_train_iterator
    from cnc_jax.text_encoder import load_tokenizer

    folder = readme[0]
    by_command(readme, "$P tfds")
    spec = SourceSpec(str(folder / "data" / "s" / "images"), "train2017")
    uids = [uid for uid, _ in read_captions(spec.captions_file)[0]]
    assert len(uids) == 4
    for uid in uids:  # the masks at 64², and every later step at the side of the maps
        for field in ("mask", "foreground", "background", "fg_depth", "bg_depth"):
            assert Image.open(spec.path(field, uid)).size == (64, 64), (field, uid)
    tokenizer = load_tokenizer(str(folder / "tiny_models" / "tokenizer"))
    width = tiny().global_fuser.in_dim
    for source in ([spec], [TFDSSpec(str(folder / "tfds"))]):
        batch = next(make_train_iterator(source, batch_size=4, resolution=64, tokenizer=tokenizer, num_epochs=1))
        assert batch["image"].shape == (4, 64, 64, 3) and batch["fg_emb"].shape == (4, width)
        assert sorted(u.decode() for u in batch["uid"]) == sorted(uids)


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
