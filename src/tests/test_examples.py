"""The scripts in examples/ run, and do what their docstrings say."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # each example sets one thread for itself
    yield
    torch.set_num_threads(threads)


def _main(name: str):
    path = EXAMPLES / name
    if not path.is_file():
        pytest.skip(f"no {path} (optorch is not running from a checkout)")
    return runpy.run_path(str(path))["main"]


def test_custom_loop_learns_and_matches_the_shim(capsys):
    result = _main("custom_loop.py")(steps=120)
    assert result["steps"] == 120
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["accuracy"] > 0.8  # a circle's inside vs outside; half the points are either (about)
    # The pure loop and optorch.build (torch's fused Adam, float32) agree to float32 rounding.
    assert result["max_diff_vs_shim"] < 1e-5
    assert "custom loop with optorch.adam.step" in capsys.readouterr().out


def test_meta_learning_raises_the_learning_rate_and_lowers_the_meta_loss(capsys):
    result = _main("meta_learning_lr.py")(meta_steps=12)
    losses, lrs = result["meta_losses"], result["lrs"]
    assert len(losses) == 13 and losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # every meta-step helps, from a too-small lr
    assert lrs[-1] > lrs[0]
    assert "learned lr" in capsys.readouterr().out


def test_ensemble_members_learn_and_equal_a_member_trained_alone(capsys):
    result = _main("ensemble_vmap.py")(steps=60)
    first, final = result["first_losses"], result["final_losses"]
    assert len(final) == len(result["lrs"]) == 8
    assert all(b < a for a, b in zip(first, final))  # every member, whatever its lr, improved
    assert final[0] > final[4]  # lr 3e-4 trails lr 3e-2 after 60 steps: the lrs really differ per member
    assert result["max_diff_vs_alone"] < 1e-5
    assert "best lr" in capsys.readouterr().out
