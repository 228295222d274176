"""Options and shared fixtures of the test suite.

``--full`` also runs what ``optorch verify --full`` runs: every flag combination on every path, the
compiled engine included (long). Without it the suite runs what ``optorch verify`` runs by default.

``--fuzz-examples N`` runs the fuzz suite (``test_fuzz.py``, marked ``fuzz``) with N hypothesis
examples per test and algorithm instead of its bounded CI count, e.g. before a release::

    pytest src/tests/test_fuzz.py --fuzz-examples 2000 -n 2
"""

from __future__ import annotations

import os

import pytest

import optorch
from optorch.core.opaque import DESIGNS


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the whole verification grid (optorch verify --full)")
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        metavar="N",
        help="hypothesis examples per fuzz test and algorithm (default: the bounded CI count of test_fuzz.py)",
    )


def pytest_configure(config):
    examples = config.getoption("--fuzz-examples")
    if examples is not None:  # read by test_fuzz.py when it is imported, after this
        os.environ["OPTORCH_FUZZ_EXAMPLES"] = str(examples)


@pytest.fixture(params=DESIGNS)
def design(request):
    """Each compiled design of the pure step in turn (``optorch.set_compiled_design``), the default
    put back after."""
    optorch.set_compiled_design(request.param)
    yield request.param
    optorch.set_compiled_design("regions")
