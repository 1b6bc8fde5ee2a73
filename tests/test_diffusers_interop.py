"""Our diffusers export's scheduler config as diffusers 0.42.1 reads it (diffusers does not run here): every
sampler's class, built from it the way the README says, resolves the config the reference resolved
(scheduler_ref.json) and runs the reference's timestep grids (scheduler_ref.npz)."""

import json
import pathlib

import numpy as np
import pytest

from cnc_jax.checkpoint.diffusers import (SCHEDULER_DEFAULTS, scheduler_call, scheduler_diffusion_config,
                                          scheduler_kwargs)
from cnc_jax.cli import convert as convert_cli
from cnc_jax.sampling.samplers import SAMPLERS

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE = ("_use_default_values", "_class_name", "_diffusers_version")


@pytest.fixture(scope="module")
def exported(ref_dir, tmp_path_factory):
    """scheduler/scheduler_config.json of the tiny diffusers reference, converted and exported again."""
    root = tmp_path_factory.mktemp("interop")
    assert convert_cli.main(["convert", str(ref_dir / "tiny_diffusers"), "--out", str(root / "ours")]) == 0
    assert convert_cli.main(["export", str(root / "ours"), "--out", str(root / "sd"), "--format", "diffusers"]) == 0
    return json.loads((root / "sd" / "scheduler" / "scheduler_config.json").read_text())


def from_config(config: dict, kwargs: dict, resolved: dict) -> dict:
    """What diffusers' `Class.from_config(config, **kwargs)` sets explicitly, for the class whose full config the
    reference resolved: the config's keys that class takes, updated by the keyword arguments (a key given
    neither way takes the class default)."""
    takes = set(resolved) - set(PRIVATE)
    return {k: v for k, v in {**config, **kwargs}.items() if k in takes}


def differences(given: dict, resolved: dict) -> list[str]:
    """Where `given` (from_config's explicit keys) would not resolve to the reference's config: an explicitly set
    reference key missing (the class default would apply) or any key of another value."""
    defaults = set(resolved["_use_default_values"])
    missing = [f"{k} missing (reference {resolved[k]!r})" for k in resolved
               if k not in PRIVATE and k not in defaults and k not in given]
    other = [f"{k}={given[k]!r} (reference {resolved[k]!r})" for k in given
             if json.dumps(given[k]) != json.dumps(resolved[k])]
    return missing + other


def test_every_sampler_class_reads_the_export_as_the_reference_did(exported, sched_ref):
    """Class.from_config(exported config, **sampler settings) sets every key the reference set, to its value
    (diffusers' own default would otherwise apply, e.g. DDIM's clip_sample=True), and our plan of the
    sampler on the exported betas gives the reference's timesteps."""
    arrays, meta = sched_ref
    cfg = scheduler_diffusion_config(exported)
    bad = []
    for name in ("pndm", "ddim"):  # the pipeline's own class as loaded, and the DDIMScheduler.from_config
        resolved = meta["configs"][name]
        bad += [f"{name} with no settings: {d}" for d in differences(from_config(exported, {}, resolved), resolved)]
    for name, resolved in meta["configs"].items():
        sampler = SAMPLERS[name]
        given = from_config(exported, sampler.settings, resolved)
        bad += [f"{name}: {d}" for d in differences(given, resolved)]
        for steps in meta["steps"]:
            timesteps = sampler.plan(cfg, steps, settings=given)["timesteps"]
            if not np.array_equal(timesteps, arrays[f"{name}_S{steps}_timesteps"]):
                bad.append(f"{name}: S={steps} timesteps {timesteps.tolist()}")
    assert bad == []
    takes = set().union(*(set(c) for c in meta["configs"].values()))
    assert set(exported) - set(PRIVATE) <= takes  # nothing a scheduler would warn about as unexpected


def test_the_from_config_lines_build_the_reference_schedulers(exported, sched_ref):
    """The README's lines (scheduler_call) leave out only what the export or a class default gives; with the
    defaults the reference shows, each resolves the reference's config exactly."""
    _, meta = sched_ref
    shown = {}  # class -> {key: default}, from the keys the reference left at the class default
    for name, resolved in meta["configs"].items():
        cls = SAMPLERS[name].scheduler_class
        shown.setdefault(cls, {}).update({k: resolved[k] for k in resolved["_use_default_values"]})
    for cls, defaults in SCHEDULER_DEFAULTS.items():
        assert {k: shown[cls].get(k, "not shown") for k in defaults} == defaults, cls
    for name, resolved in meta["configs"].items():
        sampler = SAMPLERS[name]
        assert set(sampler.diffusers_settings) <= set(resolved) - set(PRIVATE), name
        kwargs = scheduler_kwargs(sampler.scheduler_class, sampler.diffusers_settings)
        given = from_config(exported, kwargs, resolved)
        implied = {k: v for k, v in SCHEDULER_DEFAULTS.get(sampler.scheduler_class, {}).items() if k not in given}
        assert differences({**given, **implied}, resolved) == [], name


def test_the_readme_sampler_table_has_each_line():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Samplers\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1]: line for line in section.splitlines() if line.startswith("| `")}
    for name, sampler in SAMPLERS.items():
        line = scheduler_call(sampler.scheduler_class, sampler.diffusers_settings)
        assert f"`{line}`" in rows.get(name, ""), f"README's {name} row lacks `{line}`"
