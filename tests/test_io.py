"""cnc_jax/io.py: the readers of user files refuse what would sample garbage; atomic writes leave nothing behind,
and a re-run removes what a killed writer left."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cnc_jax.io import InputError, atomic_path, read_embedding, read_map, remove_stale_partials, write_atomic
from cnc_jax.torchfile.torch_save import save_torch

BAD_ARRAYS = {
    "nan": np.array([[0.5, np.nan], [0.1, 0.2]], np.float32),
    "inf": np.array([[0.5, np.inf], [0.1, 0.2]], np.float32),
    "strings": np.array([["a", "b"], ["c", "d"]]),
    "empty": np.zeros((0, 0), np.float32),
}
REASONS = {"nan": "not finite", "inf": "not finite", "strings": "not numbers", "empty": "empty array"}


@pytest.mark.parametrize("kind", sorted(BAD_ARRAYS))
@pytest.mark.parametrize("reader", ["depth", "mask", "embedding"])
def test_bad_npy_inputs_are_refused_naming_the_file(tmp_path, kind, reader):
    path = str(tmp_path / f"{reader}_{kind}.npy")
    np.save(path, BAD_ARRAYS[kind])
    read = {"depth": lambda p: read_map(p, 3), "mask": lambda p: read_map(p, 1), "embedding": read_embedding}[reader]
    with pytest.raises(InputError, match=REASONS[kind]) as e:
        read(path)
    assert path in str(e.value)


def test_non_finite_torch_embedding_is_refused(tmp_path):
    path = str(tmp_path / "fg_emb.pt")
    save_torch(path, np.array([[1.0, np.nan, 2.0]], np.float32))
    with pytest.raises(InputError, match="1 of 3 values are not finite") as e:
        read_embedding(path)
    assert path in str(e.value)


def test_finite_inputs_still_read(tmp_path):
    np.save(tmp_path / "d.npy", np.full((4, 4), 0.25, np.float16))
    np.save(tmp_path / "e.npy", np.arange(3, dtype=np.int64))
    assert read_map(str(tmp_path / "d.npy"), 3).shape == (4, 4, 3)
    np.testing.assert_array_equal(read_embedding(str(tmp_path / "e.npy")), [0, 1, 2])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = _dead_pid()
    (tmp_path / f"model.safetensors.partial-{dead}").write_bytes(b"half")
    (tmp_path / f"model.safetensors.partial-{dead + 100000}").mkdir()  # a folder too (no such pid)
    (tmp_path / f"model.safetensors.partial-{os.getpid()}x").write_bytes(b"not ours")  # not a pid: kept
    (tmp_path / f"model.safetensors.partial-{os.getppid()}").write_bytes(b"a live writer")
    (tmp_path / f"other.bin.partial-{dead}").write_bytes(b"another output's")
    removed = remove_stale_partials(tmp_path / "model.safetensors")
    assert sorted(p.name for p in removed) == sorted([f"model.safetensors.partial-{dead}",
                                                      f"model.safetensors.partial-{dead + 100000}"])
    assert sorted(os.listdir(tmp_path)) == sorted([f"model.safetensors.partial-{os.getpid()}x",
                                                   f"model.safetensors.partial-{os.getppid()}",
                                                   f"other.bin.partial-{dead}"])


def test_a_killed_atomic_write_is_cleaned_by_the_next_write(tmp_path):
    """SIGKILL inside atomic_path leaves `<name>.partial-<pid>`; the next write of the same output removes it."""
    target = tmp_path / "out" / "weights"
    code = textwrap.dedent(f"""
        import sys, time
        from cnc_jax.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.mkdir()
            (tmp / "part.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert os.listdir(target.parent) == [f"weights.partial-{proc.pid}"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "part.bin").write_bytes(b"done")
    assert os.listdir(target.parent) == ["weights"]
    assert (target / "part.bin").read_bytes() == b"done"


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_decompression_bomb_is_an_input_error(tmp_path, monkeypatch):
    from PIL import Image

    path = str(tmp_path / "bomb.png")
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # more than twice the limit: PIL refuses it
    with pytest.raises(InputError, match="not a readable image") as e:
        read_map(path, 3)
    assert path in str(e.value)


def test_a_full_disk_names_the_output_and_leaves_nothing(small_disk):
    disk = small_disk("64k")
    with pytest.raises(OSError) as e:
        write_atomic(disk / "big.bin", b"x" * (1 << 20))
    assert e.value.filename == str(disk / "big.bin") and "No space left" in e.value.strerror
    assert os.listdir(disk) == []
