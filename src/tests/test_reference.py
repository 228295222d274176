"""The recorded trajectories of the originals (``optorch/data``): every case is replayed at 1e-12 by the
plan ``test_equivalence`` runs (``verify.check_recorded``: the pure stepper and the eager engine, the
compiled one on DAG; every engine with ``--full``; DAG under a float64 default dtype as a known failure).
Here: the documented deviation at its own scale, per case, and mutations of eps-scale size, which those
checks must catch."""

from __future__ import annotations

import pytest
import torch

import optorch
from optorch.tools import recorded, verify

AUTOSGM_EPS_SCALE = 8
"""Without the emulated first-step nudge, AutoSGM's replay is off by the nudge's effect: measured 1.0 to
3.7 eps over the cases (eps 1e-10, and 1e-8 in the maximize case)."""


def _autosgm_eps(case: dict) -> float:
    return optorch.parse_config(case["config"])[1].eps


@pytest.mark.parametrize("case_id", [c["id"] for c in recorded.cases("autosgm")])
def test_autosgm_without_the_nudge_is_off_by_eps_scale_only(case_id):
    """The deviation optorch documents (no first-step nudge of weights below eps) moves AutoSGM by
    about eps, and no more: a check at eps scale, per case."""
    case = recorded.case("autosgm", case_id)
    diff = verify.max_abs_diff(recorded.replay("autosgm", case, nudge=False), recorded.expected("autosgm", case))
    assert diff <= AUTOSGM_EPS_SCALE * _autosgm_eps(case), diff


@pytest.mark.parametrize(
    "case_id", [c["id"] for c in recorded.cases("autosgm") if recorded.config(c).get("adaptive", True)]
)
def test_an_eps_ten_times_too_large_is_caught_in_autosgm(case_id):
    """eps enters AutoSGM's adaptive learning rate (the cases with ``adaptive=False`` have none): ten
    times too large, it moves the replay by 2e-8 to 5e-8 (1.8e-6 at eps 1e-8), far above either check."""
    case = recorded.case("autosgm", case_id)
    eps = _autosgm_eps(case)
    expected = recorded.expected("autosgm", case)
    for nudge, tolerance in ((True, verify.FLOAT64_TOLERANCE), (False, AUTOSGM_EPS_SCALE * eps)):
        diff = verify.max_abs_diff(recorded.replay("autosgm", case, changes={"eps": 10 * eps}, nudge=nudge), expected)
        assert diff > 10 * tolerance, (nudge, diff)


@pytest.mark.parametrize("case_id", [c["id"] for c in recorded.cases("dag")])
def test_a_dag_eps_off_by_a_tenth_of_a_percent_is_caught(case_id):
    case = recorded.case("dag", case_id)
    hyper = recorded.config(case).get("hyper", {})
    changed = {"hyper": {**hyper, "eps": 1.001 * hyper.get("eps", 1e-5)}}
    diff = verify.max_abs_diff(recorded.replay("dag", case, changes=changed), recorded.expected("dag", case))
    assert diff > 1e3 * verify.FLOAT64_TOLERANCE, diff


def test_the_recordings_differ_where_their_readme_says():
    """The float32 and float64 recordings of DAG differ by the float32 kappa and saturation mean, up to
    2.2e-7: more than enough for the 1e-12 checks to tell which one optorch follows."""
    for case in recorded.cases("dag"):
        f32, f64 = recorded.expected("dag", case), recorded.expected("dag", case, torch.float64)
        assert 1e-9 < verify.max_abs_diff(f32, f64) <= 2.2e-7, case["id"]
