"""What the commands write follows the umask like any other file: exports and converted folders get the modes of a
plain open() / mkdir() (temporary-file writers would leave 0600 files and 0700 folders)."""

import os
import stat

import pytest

from cnc_jax.cli import convert as convert_cli
from cnc_jax.io import current_umask


def modes(path: str) -> dict[str, int]:
    """{relative path: permission bits} of a file, or of a folder and everything in it."""
    found = {".": stat.S_IMODE(os.stat(path).st_mode)}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = stat.S_IMODE(os.stat(full).st_mode)
    return found


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask


def test_converted_folder_and_every_export_follow_the_umask(ref_dir, tmp_path, umask):
    plain_file, plain_dir = tmp_path / "plain", tmp_path / "plain_dir"
    plain_file.write_bytes(b"")
    plain_dir.mkdir()
    file_mode, dir_mode = modes(str(plain_file))["."], modes(str(plain_dir))["."]
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)

    converted = tmp_path / "tiny_cnc"
    assert convert_cli.main(["convert", str(ref_dir / "tiny_cnc.ckpt"), "--config",
                             str(ref_dir / "tiny_cnc_config.yaml"), "--out", str(converted)]) == 0
    outputs = {"cnc": tmp_path / "out_cnc", "official": tmp_path / "out.ckpt",
               "safetensors": tmp_path / "out.safetensors", "diffusers": tmp_path / "out_diffusers"}
    for fmt, out in outputs.items():
        assert convert_cli.main(["export", str(converted), "--format", fmt, "--out", str(out)]) == 0, fmt
    for out in [converted, *outputs.values()]:
        for name, mode in modes(str(out)).items():
            want = dir_mode if os.path.isdir(os.path.join(out, name)) else file_mode
            assert mode == want, f"{out}/{name}: {oct(mode)}, a plain one gets {oct(want)}"
        assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or p.startswith(".tmp")]
