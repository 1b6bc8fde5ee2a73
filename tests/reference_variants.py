"""Test helper (not a test module): a self-consistent variant of the reference folder with a smaller batch.

Why it exists: the suite must pass against any reference set the generator makes (another seed, batch size,
image size, context width, channel multipliers), but only the public set is shared. Slicing every batched
array of the public set to its first B' images gives a valid set of another batch size without torch (the
models treat images independently; the few batch-mean scalars are recomputed), so tests that hard-code the
public batch size fail against it:

  python -m tests.reference_variants --out ref_b1 --batch 1
  CNC_REFERENCE_DIR=ref_b1 python -m pytest -q tests/test_cnc_parity.py

Everything that is not sliced (checkpoints, configs, schemas, eval/, scheduler_ref.*, README, ...) is linked.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

# Arrays of shape (2,) that are NOT per image: the (fg, bg) strength pair, and DDIM's scalars.
NOT_BATCHED = {"global_strength", "global_strength_gs1", "global_strength_gs2", "guidance_scale", "scale_factor",
               "heads", "dim_head"}
# (S + 1, B, ...) stacks: the batch is axis 1.
BATCH_AXIS_1 = {("ddim_sample", "x_inter"), ("ddim_sample", "pred_x0"), ("ddim_sample", "x_inter_nocfg")}
# npz files whose arrays are batched (the others are linked unchanged).
BATCHED_FILES = ("cnc_apply_model", "local_apply_model", "global_apply_model", "ddim_sample", "training_loss",
                 "text_encoder", "vae", "masked_attention", "clip_vision", "dpt", "diffusers_sd")


def _slice_file(name: str, arrays: dict, batch: int, keep: int) -> dict:
    out = {}
    for key, value in arrays.items():
        if key in NOT_BATCHED or key.startswith("to_"):
            out[key] = value
        elif (name, key) in BATCH_AXIS_1:
            assert value.shape[1] == batch, (name, key, value.shape)
            out[key] = value[:, :keep]
        elif value.ndim and value.shape[0] == batch:
            out[key] = value[:keep]
        else:
            out[key] = value
    if name == "training_loss":  # the batch means (p_losses with l_simple_weight 1, logvar 0, eps parameterisation)
        per_sample = out["loss_simple_per_sample"].astype(np.float64)
        lvlb = arrays["lvlb_weights"].astype(np.float64)[out["t"]]
        for key, value in (("loss", per_sample.mean()), ("loss_simple", per_sample.mean()),
                           ("loss_vlb", (lvlb * per_sample).mean())):
            out[key] = np.asarray(value, arrays[key].dtype)
    return out


def check_recomputed_losses(reference: Path) -> None:
    """The batch-mean formulas above reproduce the reference's own scalars (so the variant stays consistent)."""
    with np.load(reference / "training_loss.npz") as f:
        arrays = {k: f[k] for k in f.files}
    batch = len(arrays["t"])
    again = _slice_file("training_loss", arrays, batch, batch)
    for key in ("loss", "loss_simple", "loss_vlb"):
        np.testing.assert_allclose(again[key], arrays[key], rtol=1e-5, err_msg=key)


def write_variant(reference: Path, out: Path, keep: int) -> None:
    reference, out = Path(reference).resolve(), Path(out)
    with np.load(reference / "cnc_apply_model.npz") as f:
        batch = f["x_noisy"].shape[0]
    if not 0 < keep < batch:
        raise SystemExit(f"--batch must be in 1..{batch - 1} (the reference batch is {batch})")
    check_recomputed_losses(reference)
    out.mkdir(parents=True, exist_ok=False)
    for entry in sorted(reference.iterdir()):
        stem = entry.name[:-len(".npz")] if entry.name.endswith(".npz") else None
        if stem in BATCHED_FILES:
            with np.load(entry) as f:
                arrays = {k: f[k] for k in f.files}
            np.savez(out / entry.name, **_slice_file(stem, arrays, batch, keep))
        else:
            os.symlink(entry, out / entry.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=os.environ.get(
        "CNC_REFERENCE_DIR", str(Path(__file__).resolve().parents[1] / ".." / "shared" / "reference")))
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    write_variant(Path(args.reference), Path(args.out), args.batch)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
