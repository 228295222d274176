"""Every recorded case of every original implementation, replayed through the pure stepper and the
shim built from the case's config dict (see ``data/README.md``)."""

from __future__ import annotations

import pytest

import reference_cases

# The originals keep a few scalars in float32 (data/README.md); ADOPT has none.
TOLERANCE = {"adopt": 1e-9}
DEFAULT_TOLERANCE = 1e-5

CASES = [
    pytest.param(name, case, id=f"{name}-{case['id']}")
    for name in reference_cases.available()
    for case in reference_cases.cases(name)
]


@pytest.mark.parametrize("name, case", CASES)
def test_pure_stepper_reproduces_the_original(name, case):
    diff = reference_cases.max_abs_diff(reference_cases.replay_pure(name, case), case)
    assert diff <= TOLERANCE.get(name, DEFAULT_TOLERANCE), f"{name} {case['id']}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("engine", ["eager", "auto"])
@pytest.mark.parametrize("name, case", CASES)
def test_shim_reproduces_the_original(name, case, engine):
    diff = reference_cases.max_abs_diff(reference_cases.replay_shim(name, case, engine), case)
    assert diff <= TOLERANCE.get(name, DEFAULT_TOLERANCE), f"{name} {case['id']}: max |diff| {diff:.3g}"
