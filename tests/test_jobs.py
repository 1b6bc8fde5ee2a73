"""Manifest and flag validation (cnc_jax/sampling/jobs.py): non-finite and malformed numbers, by line and field."""

import dataclasses

import pytest

from cnc_jax.cli import sample
from cnc_jax.sampling.jobs import JobSpec, read_manifest

FLOAT_FIELDS = [field.name for field in dataclasses.fields(JobSpec) if field.type == "float"]
INT_FIELDS = [field.name for field in dataclasses.fields(JobSpec) if field.type == "int"
              and field.name not in ("line", "height", "width")] + ["size"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_reported_by_line_and_field_and_other_jobs_stay(tmp_path, literal):
    assert FLOAT_FIELDS and INT_FIELDS
    fields = FLOAT_FIELDS + INT_FIELDS
    lines = ['{"prompt": "a valid job"}'] + [f'{{"prompt": "x", "{field}": {literal}}}' for field in fields]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    jobs, errors = read_manifest(str(manifest))
    assert [job.line for job in jobs] == [1]
    assert [(error.line, error.field) for error in errors] == [(line, field) for line, field in enumerate(fields, 2)]
    assert all("expected a finite number" in str(error) for error in errors)


def test_an_integer_too_long_for_python_is_a_bad_line_not_a_crash(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"prompt": "x", "seed": ' + "9" * 5000 + '}\n{"prompt": "y", "seed": 1e300}\n')
    jobs, errors = read_manifest(str(manifest))
    assert jobs == [] and [(error.line, error.field) for error in errors] == [(1, None), (2, "seed")]
    assert "not valid JSON" in str(errors[0]) and "outside" in str(errors[1])


@pytest.mark.parametrize("flag", ["--cfg-scale", "--eta", "--fg-depth-control", "--bg-global-control"])
def test_non_finite_flags_are_refused_by_field(tmp_path, capsys, flag):
    code = sample.main(["--random-init", flag, "nan", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and f"error: {flag}: expected a finite number, got nan" in err
    assert not (tmp_path / "out").exists()  # refused before anything runs
