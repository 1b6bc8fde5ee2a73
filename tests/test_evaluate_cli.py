"""evaluate.py end to end with --random-init on a sample.py --from-dataset folder and a synthetic dataset tree."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnc_jax.cli import evaluate, sample
from cnc_jax.cli import prepare
from cnc_jax.eval.inputs import load_stats
from tests.conftest import run_main

REPO = Path(__file__).resolve().parents[1]
RECORDS, IMAGES_PER_JOB = 4, 3  # 12 generated images: enough for the Inception Score's 10 splits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(dataset spec 'BASE:SPLIT', sample.py output folder) made once."""
    root = tmp_path_factory.mktemp("evaluate")
    base = root / "data"
    assert prepare.main(["synthetic", "--base-dir", str(base), "--split", "val", "--count", str(RECORDS),
                         "--resolution", "64", "--emb-dim", "32"]) == 0
    spec = f"{base}:val"
    generated = root / "generated"
    assert sample.main(["--random-init", "--from-dataset", spec, "--out", str(generated), "--size", "64",
                        "--steps", "1", "--num-images", str(IMAGES_PER_JOB)]) == 0
    return spec, generated


def run(capsys, *argv):
    return run_main(evaluate.main, capsys, *argv)


@pytest.fixture(scope="module")
def full_run(folders, tmp_path_factory):
    spec, generated = folders
    out = tmp_path_factory.mktemp("full")
    results = []
    for name in ("a.json", "b.json"):
        assert evaluate.main(["--generated", str(generated), "--reference", spec, "--random-init",
                              "--out", str(out / name)]) == 0
        results.append(json.loads((out / name).read_text()))
    return results


def test_sample_from_dataset_names_jobs_by_uid(folders):
    spec, generated = folders
    base, split = spec.rsplit(":", 1)
    uids = [line.split(":", 1)[0] for line in open(f"{base}/{split}_captions.txt") if line.strip()]
    assert sorted(p.name for p in generated.iterdir() if p.is_dir()) == sorted(uids)
    job = json.loads((generated / uids[0] / "job.json").read_text())
    assert job["settings"]["fg_depth"].endswith(f"{split}_foreground_depthmaps/{uids[0]}.jpg")
    caption = next(line.split(":", 1)[1].strip() for line in open(f"{base}/{split}_captions.txt")
                   if line.startswith(uids[0]))
    assert job["settings"]["prompt"] == caption


def test_all_six_metrics_and_identical_reruns(full_run):
    first, second = full_run
    assert first["metrics"] == second["metrics"]
    m = first["metrics"]
    assert set(m) == {"fid", "is", "clip_score", "lpips", "ssim", "depth"}
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert m["is"]["mean"] >= 1 and m["is"]["splits"] == 10
    assert m["clip_score"] >= 0 and 0 < m["lpips"] and -1 <= m["ssim"] <= 1
    assert all(np.isfinite(m["depth"][k]) for k in ("mae", "mae_fg", "mae_bg"))
    n = RECORDS * IMAGES_PER_JOB
    assert first["counts"] == {"fid": {"generated": n, "reference": RECORDS}, "is": n, "clip": n, "lpips": n,
                               "ssim": n, "depth": n}
    assert first["num_skipped_images"] == 0 and first["weights"]["inception"].startswith("random-init")


def test_corrupt_image_is_skipped_and_counted(folders, tmp_path, capsys):
    spec, generated = folders
    copy = tmp_path / "generated"
    shutil.copytree(generated, copy)
    job = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    (job / "image_009.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = run(capsys, "--generated", copy, "--reference", spec, "--random-init", "--metrics", "fid,ssim",
                         "--out", tmp_path / "e.json")
    assert code == 0
    result = json.loads((tmp_path / "e.json").read_text())
    n = RECORDS * IMAGES_PER_JOB
    assert result["num_generated"] == n + 1 and result["num_generated_used"] == n
    assert result["num_skipped_images"] == 1
    assert [e["name"] for e in result["skipped"]] == [f"generated:{job.name}/image_009.png"]
    assert "image_009.png" in err and result["counts"]["ssim"] == n


def test_fid_against_itself_and_saved_statistics(folders, tmp_path, capsys):
    _, generated = folders
    images = tmp_path / "images"  # a plain image folder (no job.json)
    for i, png in enumerate(sorted(generated.glob("*/image_*.png"))):
        images.mkdir(exist_ok=True)
        shutil.copy(png, images / f"{i:03d}.png")
    stats = tmp_path / "stats.npz"
    code, _, _ = run(capsys, "--generated", generated, "--reference", images, "--random-init", "--metrics", "fid",
                     "--save-stats", stats, "--out", tmp_path / "self.json")
    assert code == 0
    self_fid = json.loads((tmp_path / "self.json").read_text())["metrics"]["fid"]
    assert abs(self_fid) <= 1e-3
    mu, sigma = load_stats(str(stats))
    assert mu.shape == (sigma.shape[0],) and sigma.shape[0] == sigma.shape[1]
    code, _, _ = run(capsys, "--generated", generated, "--reference", stats, "--random-init", "--metrics", "fid",
                     "--out", tmp_path / "reload.json")
    assert code == 0
    assert json.loads((tmp_path / "reload.json").read_text())["metrics"]["fid"] == self_fid


@pytest.mark.parametrize("extra, message", [
    (["--metrics", "fid,bleu"], "unknown"),
    (["--metrics", "fid"], "needs --inception"),
    (["--metrics", "lpips", "--random-init", "--reference", "STATS"], "image pairs"),
    (["--metrics", "clip", "--random-init", "--generated-plain", "--reference", "PLAIN"], "needs captions"),
    (["--reference", "nowhere:val", "--random-init"], "BASE_DIR:SPLIT"),
])
def test_bad_usage_is_one_error_line(folders, tmp_path, capsys, extra, message):
    spec, generated = folders
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(next(generated.glob("*/image_000.png")), plain / "x.png")
    argv = ["--generated", str(plain if "--generated-plain" in extra else generated), "--out", str(tmp_path / "o.json")]
    extra = [{"STATS": str(stats), "PLAIN": str(plain)}.get(a, a) for a in extra if a != "--generated-plain"]
    if "--reference" not in extra:
        extra += ["--reference", spec]
    code, _, err = run(capsys, *argv, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "o.json").exists()


def test_dataset_jobs_relative_tree_and_missing_files(tmp_path, monkeypatch):
    from cnc_jax.sampling.dataset_jobs import dataset_jobs, parse_dataset_spec

    monkeypatch.chdir(tmp_path)
    assert prepare.main(["synthetic", "--base-dir", "data", "--split", "val", "--count", "3", "--resolution", "64",
                         "--emb-dim", "32"]) == 0
    spec = parse_dataset_spec("data:val")
    missing = spec.path("bg_emb", "000000000002")
    (tmp_path / missing).unlink()
    jobs, errors = dataset_jobs(spec, {"steps": 2}, limit=None)
    assert [j.name for j in jobs] == ["000000000001", "000000000003"] and all(j.steps == 2 for j in jobs)
    assert all(os.path.isfile(getattr(j, f)) for j in jobs for f in ("fg_depth", "bg_depth", "mask", "fg_emb"))
    assert len(errors) == 1 and "000000000002" in str(errors[0]) and missing in str(errors[0])
    assert [j.name for j in dataset_jobs(spec, limit=1)[0]] == ["000000000001"]
    with pytest.raises(ValueError, match="BASE_DIR:SPLIT"):
        parse_dataset_spec("data")


def test_two_devices_and_other_batches_give_the_same_metrics(folders, full_run, tmp_path):
    """Batches split over 2 (forced host) devices, padded differently: the same numbers up to float rounding."""
    spec, generated = folders
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--generated", str(generated), "--reference",
                           spec, "--random-init", "--metrics", "fid,is,lpips,ssim", "--per-device-batch", "2",
                           "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    two, one = json.loads(out.read_text())["metrics"], full_run[0]["metrics"]
    for key in ("fid", "lpips", "ssim"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["is"]["mean"] == pytest.approx(one["is"]["mean"], rel=1e-6)


def test_converted_and_transformers_weights(folders, ref_dir, tmp_path, capsys):
    """--lpips (a converted folder), --clip (a transformers CLIPModel folder as is) + --tokenizer, --dpt."""
    from cnc_jax.cli import convert as convert_cli
    from cnc_jax.text_encoder import byte_level_tokenizer

    spec, generated = folders
    src = ref_dir / "eval"
    assert convert_cli.main(["convert", str(src / "lpips_alexnet_features.pth"), "--lpips-lin",
                                       str(src / "lpips_alex_lin.pth"), "--out", str(tmp_path / "lpips")]) == 0
    byte_level_tokenizer().save_pretrained(str(tmp_path / "tok"))
    code, _, err = run(capsys, "--generated", generated, "--reference", spec, "--metrics", "lpips,clip,depth",
                       "--lpips", tmp_path / "lpips", "--clip", src / "tiny_clip_model", "--tokenizer", tmp_path / "tok",
                       "--dpt", ref_dir / "tiny_dpt", "--out", tmp_path / "w.json")
    assert code == 0, err
    result = json.loads((tmp_path / "w.json").read_text())
    n = RECORDS * IMAGES_PER_JOB
    assert result["counts"] == {"clip": n, "lpips": n, "depth": n}
    assert result["weights"]["lpips"]["converted_from"] == str(src / "lpips_alexnet_features.pth")
    assert result["weights"]["clip"] == {"path": str(src / "tiny_clip_model"), "converted_from": None}
    assert 0 < result["metrics"]["lpips"] and np.isfinite(result["metrics"]["depth"]["mae"])
