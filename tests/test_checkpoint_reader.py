"""Tests of the torch-free, code-execution-free checkpoint reader (cnc_jax.checkpoint)."""

from __future__ import annotations

import copy
import json
import pickle
import re
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

from cnc_jax.torchfile.errors import CheckpointError, reading
from cnc_jax.torchfile.pickle_scan import MAX_NESTING
from cnc_jax.torchfile.safetensors_header import read_header
from cnc_jax.torchfile.state_dict import detect_format, load_raw, load_safetensors, load_state_dict
from cnc_jax.torchfile.tensor import (
    MAX_EXPANDED_BYTES, InMemoryBytes, LazyTensor, MappedFile, SafetensorsEntry, Storage,
)
from cnc_jax.torchfile.torch_pickle import Opaque
from tests.conftest import REFERENCE_DIR
from tests.torch_files import Call, Global, Parameter, Raw, View, save_torch_legacy, save_torch_zip

WRITERS = {"zip": save_torch_zip, "legacy": save_torch_legacy}


def reference(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.fail(f"reference file {path} not found: set CNC_REFERENCE_DIR")
    return path


def text_positions() -> int:
    """The tiny CLIP text encoder's sequence length (its position_ids buffer), from the reference config."""
    return json.loads(reference("tiny_clip_text_config.json").read_text())["max_position_embeddings"]


def diffusion_timesteps() -> int:
    """Length of the diffusion-schedule buffers (betas, ...) of the reference models."""
    return int(yaml.safe_load(reference("tiny_cnc_config.yaml").read_text())["model"]["params"]["timesteps"])


def readme_global_step() -> int:
    """The global_step the README says tiny_cnc.ckpt's Lightning wrapper holds."""
    match = re.search(r"'global_step':\s*(\d+)", reference("README.md").read_text())
    assert match, "README.md does not state tiny_cnc.ckpt's global_step"
    return int(match[1])


def text_op(value: str) -> bytes:
    """The BINUNICODE opcode pushing `value`."""
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def assert_same_tensors(left: dict[str, LazyTensor], right: dict[str, LazyTensor]) -> None:
    assert list(left) == list(right)
    for key in left:
        a, b = left[key].numpy(), right[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), key


def assert_bit_exact(tensor: LazyTensor, expected: np.ndarray) -> None:
    array = tensor.numpy()
    assert array.dtype == expected.dtype and array.shape == expected.shape
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.tobytes() == np.ascontiguousarray(expected).tobytes()


# --------------------------------------------------------------------------------------------
# Reference files written by real torch
# --------------------------------------------------------------------------------------------


def test_tiny_cnc_ckpt_matches_safetensors():
    ckpt = load_state_dict(reference("tiny_cnc.ckpt"))
    safetensors = load_state_dict(reference("tiny_cnc.safetensors"))
    assert sorted(ckpt) == sorted(safetensors)
    assert_same_tensors(ckpt, {key: safetensors[key] for key in ckpt})
    position_ids = ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    positions = text_positions()
    assert position_ids.dtype == np.int64 and position_ids.shape == (1, positions)
    np.testing.assert_array_equal(position_ids.numpy(), np.arange(positions)[None])
    float_dtypes = {tensor.dtype for key, tensor in ckpt.items() if tensor.dtype != np.int64}
    assert float_dtypes == {np.dtype(np.float32)}


def test_tiny_cnc_ckpt_is_a_lightning_wrapper():
    raw = load_raw(reference("tiny_cnc.ckpt"))
    assert raw["global_step"] == readme_global_step()
    assert detect_format(reference("tiny_cnc.ckpt")) == "torch_zip"


def test_tiny_local_has_float16_params_and_float32_buffers():
    state = load_state_dict(reference("tiny_local.ckpt"))
    assert state["betas"].dtype == np.float32 and state["betas"].shape == (diffusion_timesteps(),)
    assert {tensor.dtype for tensor in state.values()} == {np.dtype(t) for t in (np.float16, np.float32, np.int64)}


def test_u2netp_zip_and_legacy_are_identical():
    zipped = load_state_dict(reference("tiny_u2netp.pth"))
    legacy = load_state_dict(reference("tiny_u2netp_legacy.pth"))
    assert detect_format(reference("tiny_u2netp_legacy.pth")) == "torch_legacy"
    assert_same_tensors(zipped, legacy)
    counters = [key for key in zipped if key.endswith("num_batches_tracked")]
    assert counters and all(zipped[key].dtype == np.int64 and zipped[key].shape == () for key in counters)


def test_lazy_loading_reads_no_storage_bytes_until_numpy():
    state = load_state_dict(reference("tiny_cnc.ckpt"), lazy=True)
    tensor = state["betas"]
    source = tensor.storage.source
    timesteps = diffusion_timesteps()
    assert isinstance(source, MappedFile) and tensor.shape == (timesteps,)
    assert source.bytes_read == 0
    values = tensor.numpy()
    assert source.bytes_read == 4 * timesteps and values.shape == (timesteps,)


def test_eager_loading_copies_into_memory():
    state = load_state_dict(reference("tiny_u2netp_legacy.pth"), lazy=False)
    assert all(isinstance(tensor.storage.source, InMemoryBytes) for tensor in state.values())
    assert_same_tensors(state, load_state_dict(reference("tiny_u2netp.pth")))


# --------------------------------------------------------------------------------------------
# Round trips through our own writers
# --------------------------------------------------------------------------------------------


def roundtrip_values() -> tuple[dict, dict[str, np.ndarray]]:
    """Values for the writers, and the arrays each key must read back as."""
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal(12).astype(np.float32)
    shared = rng.standard_normal(20).astype(ml_dtypes.bfloat16)
    expanded = np.array([1.5, -2.0, 3.25], dtype=np.float16)
    arrays = {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "bf16": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((2, 2)),
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-100, 100, (3,)).astype(np.int32),
        "u8": rng.integers(0, 255, (6,)).astype(np.uint8),
        "bool": rng.random((2, 3)) > 0.5,
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    obj = dict(arrays)
    expected = dict(arrays)
    obj["matrix"] = View(matrix, (3, 4), (4, 1))
    obj["matrix_t"] = View(matrix, (4, 3), (1, 4))  # transposed view sharing the storage
    expected["matrix"] = matrix.reshape(3, 4)
    expected["matrix_t"] = matrix.reshape(3, 4).T
    obj["tail"] = View(shared, (2, 5), (5, 1), offset=10)  # storage_offset > 0
    obj["every_other"] = View(shared, (5,), (2,), offset=1)
    expected["tail"] = shared[10:].reshape(2, 5)
    expected["every_other"] = shared[1::2][:5]
    obj["expanded"] = View(expanded, (2, 3), (0, 1))  # expand(): stride 0
    expected["expanded"] = np.broadcast_to(expanded, (2, 3))
    obj["scalar_view"] = View(expanded, (), (), offset=2)
    expected["scalar_view"] = expanded[2]
    obj["param"] = Parameter(arrays["f32"] * 2)
    expected["param"] = arrays["f32"] * 2
    return obj, expected


@pytest.mark.parametrize("writer", WRITERS)
def test_roundtrip_is_bit_exact(tmp_path, writer):
    obj, expected = roundtrip_values()
    path = tmp_path / f"roundtrip_{writer}.pt"
    WRITERS[writer](path, obj)
    for lazy in (True, False):
        state = load_state_dict(path, lazy=lazy)
        assert list(state) == list(expected)
        for key, array in expected.items():
            assert_bit_exact(state[key], np.asarray(array))
    state = load_state_dict(path)
    assert state["matrix"].storage is state["matrix_t"].storage
    assert state["matrix_t"].stride == (1, 4) and state["tail"].storage_offset == 10


def test_state_dict_metadata_attribute_is_not_an_entry(tmp_path):
    state = OrderedDict(weight=np.ones((2, 2), np.float32), bias=np.zeros(2, np.float32))
    state._metadata = OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    path = tmp_path / "ordered.pth"
    save_torch_zip(path, state)
    assert list(load_state_dict(path)) == ["weight", "bias"]
    assert load_raw(path)._metadata["layer"] == {"version": 2}


def test_v3_tensor_over_untyped_storage(tmp_path):
    values = np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000
    path = tmp_path / "v3.pt"
    save_torch_zip(path, {"u16": values, "u32": values.astype(np.uint32).T})
    state = load_state_dict(path)
    assert_bit_exact(state["u16"], values)
    assert_bit_exact(state["u32"], values.astype(np.uint32).T)


def test_parameter_and_tensor_subclass_rebuilders(tmp_path):
    weight = np.arange(6, dtype=np.float16).reshape(3, 2)
    path = tmp_path / "params.pt"
    save_torch_zip(path, {
        "with_state": Call("torch._utils", "_rebuild_parameter_with_state", (weight, True, OrderedDict(), {"tag": 1})),
        "subclass": Call("torch._tensor", "_rebuild_from_type_v2", (
            Global("torch._utils", "_rebuild_parameter"), Global("torch.nn.parameter", "Parameter"),
            (weight, True, OrderedDict()), OrderedDict(),
        )),
    })
    state = load_state_dict(path)
    assert_bit_exact(state["with_state"], weight)
    assert_bit_exact(state["subclass"], weight)


def test_legacy_storage_views(tmp_path):
    storage = np.arange(10, dtype=np.float32)
    path = tmp_path / "legacy_views.pth"
    save_torch_legacy(path, {"slice": View(storage, (2, 2), (2, 1), offset=1, storage_slice=(3, 6)), "all": storage})
    state = load_state_dict(path)
    assert_bit_exact(state["slice"], storage[4:8].reshape(2, 2))
    assert_bit_exact(state["all"], storage)


def test_compressed_zip_entries_are_read(tmp_path):
    obj, expected = roundtrip_values()
    path = tmp_path / "deflated.pt"
    save_torch_zip(path, obj, compressed=True)
    state = load_state_dict(path)
    for key, array in expected.items():
        assert_bit_exact(state[key], np.asarray(array))


def test_safetensors_roundtrip(tmp_path):
    _, expected = roundtrip_values()
    arrays = {key: np.ascontiguousarray(value) for key, value in expected.items()}
    path = tmp_path / "weights.safetensors"
    save_file(arrays, path, metadata={"format": "pt"})
    assert detect_format(path) == "safetensors"
    for lazy in (True, False):
        state = load_safetensors(path, lazy=lazy)
        for key, array in arrays.items():
            assert_bit_exact(state[key], array)



def test_safetensors_are_read_lazily_by_the_library_and_survive_copy_and_pickle(tmp_path):
    path = tmp_path / "lazy.safetensors"
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"w": values, "b": values.astype(ml_dtypes.bfloat16)}, path)
    state = load_state_dict(path)
    source = state["w"].storage.source
    assert isinstance(source, SafetensorsEntry) and source.bytes_read == 0
    for tensor in (state["w"], copy.deepcopy(state["w"]), pickle.loads(pickle.dumps(state["w"]))):
        assert_bit_exact(tensor, values)
    assert source.bytes_read == values.nbytes
    assert_bit_exact(state["b"], values.astype(ml_dtypes.bfloat16))


def test_float8_safetensors_are_refused_as_the_library_cannot_read_them(tmp_path):
    path = write_safetensors_header(tmp_path / "f8.safetensors",
                                    b'{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}', bytes(4))
    with pytest.raises(AttributeError, match="float8"):  # safetensors' numpy reader, as of 0.8
        safe_open(path, framework="numpy").get_tensor("w")
    with pytest.raises(CheckpointError, match=f"{path}: tensor 'w' has an unsupported dtype 'F8_E4M3'"):
        load_state_dict(path)

def test_tensors_and_placeholders_survive_copy_and_pickle(tmp_path):
    path = tmp_path / "copyable.pt"
    save_torch_zip(path, {"w": np.arange(4, dtype=np.float32), "hook": Call("os", "system", ("true",))})
    raw = load_raw(path)
    for clone in (copy.deepcopy(raw), pickle.loads(pickle.dumps(raw))):
        assert_bit_exact(clone["w"], np.arange(4, dtype=np.float32))
        assert isinstance(clone["hook"], Opaque) and clone["hook"].qualname == "os.system"
        assert clone["hook"].args == ("true",)


# --------------------------------------------------------------------------------------------
# Lightning-style files with arbitrary objects
# --------------------------------------------------------------------------------------------


def lightning_checkpoint() -> dict:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {
        "epoch": 3,
        "global_step": 7,
        "pytorch-lightning_version": "1.5.0",
        "state_dict": OrderedDict([("model.weight", weight), ("model.bias", np.ones(2, np.float32))]),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": Call(
                "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", newobj=True,
                state={"best_model_score": None, "dirpath": "/ckpts", "kth": {"a": 1.5}},
                listitems=(1, 2), dictitems=(("k", "v"),),
            ),
        },
        "optimizer_states": [
            {
                "state": {0: {"step": 10, "exp_avg": np.full((2, 3), 0.5, np.float32),
                              "exp_avg_sq": np.ones((2, 3), np.float32)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1], "weight_decay": 0.0}],
            }
        ],
        "lr_schedulers": [
            {"last_epoch": 3, "_last_lr": [1e-4], "scheduler": Global("torch.optim.lr_scheduler", "LambdaLR")}
        ],
        "hparams_name": "kwargs",
        "hyper_parameters": Call("argparse", "Namespace", (), state={"lr": 1e-4, "data": b"\x00\xffbytes"}),
        "device": Call("torch", "device", ("cuda", 0)),
        "size": Call("torch", "Size", ((2, 3),)),
        "numpy_scalar": Call("numpy.core.multiarray", "scalar", (Global("numpy", "dtype"), b"\x00\x00\x80?")),
    }


@pytest.mark.parametrize("writer", WRITERS)
def test_lightning_checkpoint_loads_and_yields_only_weights(tmp_path, writer):
    path = tmp_path / "lightning.ckpt"
    WRITERS[writer](path, lightning_checkpoint())
    state = load_state_dict(path)
    assert list(state) == ["model.weight", "model.bias"]
    assert_bit_exact(state["model.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))

    raw = load_raw(path)
    callback = raw["callbacks"]["ModelCheckpoint{'monitor': None}"]
    assert isinstance(callback, Opaque)
    assert callback.qualname == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert callback.state["dirpath"] == "/ckpts" and callback.items == [1, 2] and callback.entries == [("k", "v")]
    assert raw["hyper_parameters"].qualname == "argparse.Namespace"
    assert raw["hyper_parameters"].state["data"] == b"\x00\xffbytes"
    assert raw["optimizer_states"][0]["state"][0]["exp_avg"].numpy().tolist() == [[0.5] * 3] * 2
    assert raw["device"] == "cuda:0" and raw["size"] == (2, 3)


def test_other_pickle_opcodes_on_placeholders(tmp_path):
    """INST, OBJ, NEWOBJ_EX, STACK_GLOBAL and ADDITEMS build placeholders without executing."""
    inst = b"(" + text_op("hi") + b"isubprocess\nPopen\n"
    obj = b"(" + pickle.GLOBAL + b"os\nsystem\n" + pickle.BININT1 + b"\x05" + pickle.OBJ
    newobj_ex = (
        pickle.GLOBAL + b"shutil\nrmtree\n" + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.MARK
        + text_op("path") + text_op("/")
        + pickle.SETITEMS + pickle.NEWOBJ_EX
    )
    stack_global = (
        text_op("builtins") + text_op("eval")
        + pickle.STACK_GLOBAL + text_op("1+1") + pickle.TUPLE1 + pickle.REDUCE
    )
    additems = (
        pickle.GLOBAL + b"weird\nBag\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.ADDITEMS
    )
    path = tmp_path / "opcodes.pt"
    save_torch_zip(path, {"inst": Raw(inst), "obj": Raw(obj), "newobj_ex": Raw(newobj_ex),
                          "stack_global": Raw(stack_global), "additems": Raw(additems)})
    raw = load_raw(path)
    assert (raw["inst"].qualname, raw["inst"].args) == ("subprocess.Popen", ("hi",))
    assert (raw["obj"].qualname, raw["obj"].args) == ("os.system", (5,))
    assert (raw["newobj_ex"].qualname, raw["newobj_ex"].kwargs) == ("shutil.rmtree", {"path": "/"})
    assert (raw["stack_global"].qualname, raw["stack_global"].args) == ("builtins.eval", ("1+1",))
    assert raw["additems"].items == [1]


# --------------------------------------------------------------------------------------------
# Hostile files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", WRITERS)
def test_state_dict_that_is_an_os_system_call_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "tiny.ckpt"
    WRITERS[writer](path, {"state_dict": Call("os", "system", (f"touch {marker}",)), "global_step": 1})
    with pytest.raises(CheckpointError, match="os.system") as error:
        load_state_dict(path)
    assert "'state_dict'" in str(error.value) and str(path) in str(error.value)
    assert "NOT executed" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_malicious_side_entry_is_ignored(tmp_path, writer):
    marker = tmp_path / "pwned2"
    path = tmp_path / "side.ckpt"
    weights = {"w": np.ones(3, np.float32)}
    WRITERS[writer](path, {"state_dict": weights, "evil": Call("os", "system", (f"touch {marker}",))})
    state = load_state_dict(path)
    assert list(state) == ["w"]
    assert_bit_exact(state["w"], np.ones(3, np.float32))
    assert not marker.exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_weight_that_is_an_eval_call_is_refused(tmp_path, writer):
    path = tmp_path / "eval.pth"
    evil = Call("builtins", "eval", ("__import__('os')",))
    WRITERS[writer](path, {"good": np.zeros(2, np.float32), "bad.weight": evil})
    with pytest.raises(CheckpointError, match=r"'bad\.weight'.*builtins\.eval"):
        load_state_dict(path)


def test_non_tensor_entries_are_reported_by_key(tmp_path):
    path = tmp_path / "mixed.pth"
    save_torch_zip(path, {"w": np.zeros(2, np.float32), "step": 3, "name": "x"})
    with pytest.raises(CheckpointError, match=r"'step'.*int.*'name'.*str"):
        load_state_dict(path)


def test_find_class_never_imports_modules(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "cnc_evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef boom(*a): pass\n")
    monkeypatch.syspath_prepend(str(module_dir))
    path = tmp_path / "imports.pt"
    save_torch_zip(path, {"state_dict": {"w": np.zeros(1, np.float32)}, "x": Call("cnc_evil_module", "boom", (1,))})
    assert list(load_state_dict(path)) == ["w"]
    assert not marker.exists() and "cnc_evil_module" not in sys.modules


def test_top_level_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    save_torch_zip(path, [np.zeros(1, np.float32)])
    with pytest.raises(CheckpointError, match="top-level object is a list"):
        load_state_dict(path)


def test_pickle_cannot_modify_tensors(tmp_path):
    build = Raw(pickle.EMPTY_DICT + pickle.BUILD)  # BUILD {} on the tensor just pushed (adds no object)
    path = tmp_path / "build.pt"
    save_torch_zip(path, {"w": [np.zeros(1, np.float32), build]})
    with pytest.raises(CheckpointError, match="modify LazyTensor"):
        load_raw(path)


@pytest.mark.parametrize("module, name", [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"), ("torch", "float32"),
    ("collections", "OrderedDict"), ("os", "system"),
])
def test_pickle_cannot_modify_allowed_globals(tmp_path, module, name):
    """BUILD (None, {'__doc__': 'x'}) on a global: setattr would change it for every later load."""
    build = (
        pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.NONE + pickle.EMPTY_DICT
        + pickle.MARK + text_op("__doc__") + text_op("x") + pickle.SETITEMS + pickle.TUPLE2 + pickle.BUILD
    )
    path = tmp_path / "build_global.pt"
    save_torch_zip(path, {"g": Raw(build)})
    with pytest.raises(CheckpointError):
        load_raw(path)
    save_torch_zip(path, {"w": np.ones(2, np.float32)})
    assert_bit_exact(load_state_dict(path)["w"], np.ones(2, np.float32))


def test_non_storage_persistent_id_is_refused(tmp_path):
    pid = text_op("module") + pickle.TUPLE1 + pickle.BINPERSID
    path = tmp_path / "pid.pt"
    save_torch_zip(path, {"w": Raw(pid)})
    with pytest.raises(CheckpointError, match="persistent id"):
        load_raw(path)


def rewrite_zip(source: Path, target: Path, drop: str = "", replace: tuple[str, bytes] = ("", b"")) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename == drop:
                continue
            new.writestr(info.filename, replace[1] if info.filename == replace[0] else old.read(info))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    save_torch_zip(good, {"w": np.arange(4, dtype=np.float32)})
    legacy = tmp_path / "good_legacy.pt"
    save_torch_legacy(legacy, {"w": np.arange(4, dtype=np.float32)})
    files = {
        "garbage": b"this is not a checkpoint at all",
        "empty": b"",
        "truncated_zip": good.read_bytes()[: len(good.read_bytes()) // 2],
        "truncated_legacy": legacy.read_bytes()[:-5],
        "plain_pickle": pickle.dumps({"w": 1}, protocol=2),
        "bad_safetensors": struct.pack("<Q", 5) + b'{"a":',
    }
    paths = {name: tmp_path / f"{name}.bin" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    paths["no_data_pkl"] = tmp_path / "no_data_pkl.pt"
    rewrite_zip(good, paths["no_data_pkl"], drop="good/data.pkl")
    paths["missing_storage"] = tmp_path / "missing_storage.pt"
    rewrite_zip(good, paths["missing_storage"], drop="good/data/0")
    paths["short_storage"] = tmp_path / "short_storage.pt"
    rewrite_zip(good, paths["short_storage"], replace=("good/data/0", b"\x00" * 8))
    paths["big_endian_legacy"] = tmp_path / "big_endian_legacy.pt"
    paths["big_endian_legacy"].write_bytes(legacy.read_bytes().replace(b"little_endian\x88", b"little_endian\x89"))
    paths["view_too_big"] = tmp_path / "view_too_big.pt"
    save_torch_zip(paths["view_too_big"], {"w": View(np.zeros(4, np.float32), (3, 2), (2, 1))})
    paths["big_endian"] = tmp_path / "big_endian.pt"
    save_torch_zip(paths["big_endian"], {"w": np.zeros(2, np.float32)}, byteorder="big")
    paths["safetensors_bad_offsets"] = tmp_path / "bad_offsets.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, paths["safetensors_bad_offsets"])
    data = paths["safetensors_bad_offsets"].read_bytes().replace(b"[0,16]", b"[0,99]")
    paths["safetensors_bad_offsets"].write_bytes(data)
    return paths


BAD_FILE_NAMES = [
    "garbage", "empty", "truncated_zip", "truncated_legacy", "plain_pickle", "bad_safetensors", "no_data_pkl",
    "missing_storage", "short_storage", "view_too_big", "big_endian", "big_endian_legacy", "safetensors_bad_offsets",
]


@pytest.mark.parametrize("name", BAD_FILE_NAMES)
def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path, name):
    path = bad_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as error:
        load_state_dict(path)
    assert str(path) in str(error.value)


# --------------------------------------------------------------------------------------------
# Sizes out of proportion to the file (tests/test_fuzz_checkpoints.py fuzzes the same)
# --------------------------------------------------------------------------------------------


def storage_of(elements: int) -> Storage:
    return Storage("0", np.float32, 4 * elements, InMemoryBytes(np.zeros(4 * elements, np.uint8)))


@pytest.mark.parametrize("shape, stride, offset", [
    ((5,), (1,), 0), ((2, 2), (3, 1), 0), ((4,), (1,), 1), ((2, 3), (1, 2), 0), ((1,) * 65, (1,) * 65, 0),
    ((2**63,), (0,), 0), ((4,), (1,), -1), ((True,), (1,), 0),
])
def test_views_that_do_not_fit_their_storage_are_refused_before_any_read(shape, stride, offset):
    storage = storage_of(4)
    with pytest.raises(CheckpointError):
        LazyTensor(storage, np.float32, shape, stride, offset)
    assert storage.source.bytes_read == 0


def test_views_repeating_their_storage_are_bounded():
    small = LazyTensor(storage_of(3), np.float32, (8, 3), (0, 1))
    assert small.numpy().shape == (8, 3)
    limit_elements = MAX_EXPANDED_BYTES // 4
    assert LazyTensor(storage_of(1), np.float32, (limit_elements,), (0,)).size == limit_elements
    with pytest.raises(CheckpointError, match="repeats"):
        LazyTensor(storage_of(1), np.float32, (limit_elements + 1,), (0,))


def test_a_size_one_dimension_may_have_any_stride():
    values = np.arange(4, dtype=np.float32)
    tensor = LazyTensor(Storage("0", np.float32, 16, InMemoryBytes(values.view(np.uint8))), np.float32, (1, 4),
                        (2**62, 1))
    np.testing.assert_array_equal(tensor.numpy(), values[None])


def huge_memo_index() -> bytes:
    """A dict memoised at index 2**32 - 1: the C unpickler would grow its memo to that many slots."""
    return pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 2**32 - 1)


@pytest.mark.parametrize("opcodes, message", [
    (huge_memo_index(), "memo index 4294967295 with only 1 memo writes"),
    (pickle.BINBYTES8 + struct.pack("<Q", 2**40) + b"ab", "expected 1099511627776 bytes"),
    (pickle.EMPTY_TUPLE + pickle.TUPLE1 * (MAX_NESTING + 1), "nested more than"),
    (pickle.MARK * (MAX_NESTING + 1), "nested marks"),
    (pickle.LONG_BINGET + struct.pack("<I", 7), "memo entry 7 is read but was never written"),
    (pickle.NONE + pickle.NONE, "ends with 2 objects"),
])
@pytest.mark.parametrize("writer", WRITERS)
def test_pickles_asking_for_more_than_the_stream_holds_are_refused(tmp_path, writer, opcodes, message):
    path = tmp_path / "hostile.pt"
    WRITERS[writer](path, Raw(opcodes))
    with pytest.raises(CheckpointError, match=message) as error:
        load_raw(path)
    assert str(path) in str(error.value)


def test_a_frame_longer_than_the_stream_is_refused(tmp_path):
    pickled = pickle.PROTO + b"\4" + pickle.FRAME + struct.pack("<Q", 2**40) + pickle.EMPTY_DICT + pickle.STOP
    path = tmp_path / "frame.pt"
    rewrite_zip(reference("tiny_u2netp.pth"), path, replace=("tiny_u2netp/data.pkl", pickled))
    with pytest.raises(CheckpointError, match="a frame of 1099511627776 bytes"):
        load_raw(path)


def test_nesting_below_the_limit_loads(tmp_path):
    path = tmp_path / "nested.pt"
    save_torch_zip(path, {"w": np.ones(2, np.float32), "deep": Raw(pickle.EMPTY_TUPLE + pickle.TUPLE1 * 100)})
    deep, levels = load_raw(path)["deep"], 0
    while deep:
        deep, levels = deep[0], levels + 1
    assert levels == 100


def test_zip_records_claiming_more_than_the_file_holds_are_refused(tmp_path):
    path = tmp_path / "claims.pt"
    save_torch_zip(path, {"w": np.ones(2, np.float32)})
    data = bytearray(path.read_bytes())
    start = zipfile.ZipFile(path).start_dir  # the first central record is data.pkl's
    data[start + 20 : start + 28] = struct.pack("<II", 2**32 - 1, 2**32 - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="claims 4294967295 bytes"):
        load_raw(path)


def test_a_deflated_pickle_may_not_expand_beyond_the_file(tmp_path):
    path = tmp_path / "bomb.pt"
    save_torch_zip(path, {"w": Raw(pickle.BINBYTES8 + struct.pack("<Q", 1 << 22) + bytes(1 << 22))}, compressed=True)
    assert path.stat().st_size < 1 << 16
    with pytest.raises(CheckpointError, match="more than the whole file"):
        load_raw(path)


def test_memory_errors_while_reading_become_checkpoint_errors():
    with pytest.raises(CheckpointError, match="x.ckpt: refused: reading it needs more memory") as error:
        with reading("x.ckpt"):
            raise MemoryError
    assert isinstance(error.value.__cause__, MemoryError)


def write_safetensors_header(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, message", [
    (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],'
     b'"data_offsets":[8,12]}}', "starts at byte 8 of the data, the one before ends at 4"),
    (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "cover 4 bytes of the 12-byte data buffer"),
    (b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', "holds NaN, which is not JSON"),
    (b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"__metadata__":{"a":1}}', "not a map of strings"),
    (b'{"w":{"dtype":"F32","shape":[true,3],"data_offsets":[0,12]}}', "invalid shape"),
    (b'{"w":{"dtype":"F32","shape":' + json.dumps([1] * 65 + [3]).encode() + b',"data_offsets":[0,12]}}',
     "invalid shape"),
])
def test_safetensors_headers_are_checked_before_any_read(tmp_path, header, message):
    path = write_safetensors_header(tmp_path / "bad.safetensors", header, bytes(12))
    with pytest.raises(CheckpointError, match=message):
        read_header(path)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)
