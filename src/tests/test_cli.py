"""``optorch verify``: the report, its exit codes, and both ways of starting it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optorch
from optorch import cli, verify

SMALL = ["verify", "--algo", "adam", "--steps", "10", "--dtype", "float64", "--device", "cpu", "--no-compile"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_small_run_passes_and_prints_a_row_per_check(capsys):
    assert cli.main(SMALL) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("adam ")]
    assert len(rows) == len(verify.flag_grid("adam")) * 3 * 2  # pure, shim:torch, shim:eager; None grads off, on
    assert all(row.endswith("PASS") for row in rows)
    assert sum("+none-grads" in row for row in rows) == len(rows) // 2
    assert {"pure", "shim:torch", "shim:eager"} <= {word for row in rows for word in row.split()}
    assert "0 failed" in out


def test_a_failing_check_exits_1(capsys, monkeypatch):
    monkeypatch.setattr(verify, "FLOAT64_TOLERANCE", -1.0)
    assert cli.main([*SMALL, "--engine", "pure"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"{len(verify.flag_grid('adam')) * 2} failed" in out


def test_a_crashing_check_is_reported_and_the_run_goes_on(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(verify, "run_shim", crash)
    assert cli.main([*SMALL, "--engine", "pure", "--engine", "eager", "--none-grads", "off"]) == 1
    out = capsys.readouterr().out
    grid = len(verify.flag_grid("adam"))
    assert out.count("ERROR") == grid and out.count("RuntimeError: simulated crash") == grid
    assert f"{grid} passed, {grid} failed" in out


def test_unknown_algorithm_exits_2_with_the_registry_message(capsys):
    assert cli.main(["verify", "--algo", "adamm"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adamm'" in err and "Did you mean 'adam'?" in err
    assert "Traceback" not in err


def test_module_entry_point_help():
    src = str(Path(optorch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "optorch", "verify", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--no-compile" in result.stdout and "representative subset" in result.stdout


def test_reductions_are_verified_against_their_torch_optimizers(capsys):
    """AutoSGM has no single reference class: verify checks each of its torch.optim reductions."""
    assert cli.main(["verify", "--algo", "autosgm", "--dtype", "float64", "--device", "cpu", "--engine", "pure", "--engine", "eager", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    reductions = optorch.autosgm.REDUCTIONS
    assert f"OK: {2 * len(reductions)} checks" in out
    assert "= SGD: heavy-ball " in out and "= Adam: adam-cosine-restarts" in out
