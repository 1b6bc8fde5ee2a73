"""Fuzzing the checkpoint readers: corrupt and hostile files either load or raise CheckpointError.

Each case (mutated reference checkpoints — zip data.pkl, zip directory, legacy, safetensors — and hand-made
hostile files) is loaded in a child process whose address space is capped at a few times the largest
reference file beyond its start-up size, with a time limit per case (tests/checkpoint_fuzz.py).
"""

import collections

from tests import checkpoint_fuzz


def test_corrupt_and_hostile_checkpoints_load_or_raise_checkpoint_error(ref_dir):
    cases = checkpoint_fuzz.all_cases()
    results = checkpoint_fuzz.run_cases(cases, ref_dir)
    assert [result.case for result in results] == cases
    assert not checkpoint_fuzz.unexpected(results), checkpoint_fuzz.summary(results)
    outcomes = collections.Counter((result.case.family, result.outcome) for result in results)
    assert outcomes[("original", "loaded")] == len({case.source for case in cases if case.family == "original"})
    for family in checkpoint_fuzz.PLAN:
        assert outcomes[(family, "refused")] > 0, f"no {family} case was refused: the mutators changed nothing"
