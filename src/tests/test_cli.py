"""``optorch verify``: the report, its summary, its exit codes, and both ways of starting it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optorch
from optorch.shim import engines
from optorch.tools import cli, references, verify, verify_checks, verify_plan, verify_problem, verify_rule

SMALL = [
    "verify",
    "--algo",
    "adam",
    "--steps",
    "10",
    "--dtype",
    "float64",
    "--device",
    "cpu",
    "--no-compile",
    "--jobs",
    "1",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rows(out: str, name: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{name} ")]


def test_small_run_passes_and_prints_a_row_per_planned_check(capsys):
    assert cli.main(SMALL) == 0
    out = capsys.readouterr().out
    planned = verify.plan(
        algorithms=["adam"], dtypes=["float64"], devices=["cpu"], paths=["pure", "torch", "eager"], steps=10
    ).checks
    rows = _rows(out, "adam")
    assert len(rows) == len(planned) and all(row.endswith("PASS") for row in rows)
    assert {"pure", "shim:torch", "shim:eager", "torch:fused"} <= {word for row in rows for word in row.split()}
    assert any("+none-grads" in row for row in rows) and any("(default float64)" in row for row in rows)
    assert f"OK: {len(planned)} checks" in out and "subset: flag combinations" in out


def test_low_precision_rows_show_both_errors(capsys):
    assert (
        cli.main(
            [
                *SMALL[:-8],
                "--dtype",
                "float32",
                "--dtype",
                "bfloat16",
                "--engine",
                "eager",
                "--device",
                "cpu",
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = _rows(capsys.readouterr().out, "adam")
    assert rows and all(row.split()[-4] != "-" and row.split()[-3] != "-" for row in rows)  # error, reference error
    assert {row.split()[-6] for row in rows} == {"float32", "bfloat16"}


def test_a_failing_check_exits_1(capsys, monkeypatch):
    for module in (verify_checks, verify_rule):  # the check's limit and the rule's float64 tolerance
        monkeypatch.setattr(module, "FLOAT64_TOLERANCE", -1.0)
    assert cli.main([*SMALL, "--engine", "pure"]) == 1
    out = capsys.readouterr().out
    rows = _rows(out, "adam")
    failed = sum(row.endswith("FAIL") for row in rows)
    assert failed == len(rows) and f"FAILED: {len(rows)} checks" in out and f"{failed} failed" in out


def test_a_crashing_check_is_reported_and_the_run_goes_on(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(verify_problem, "_run_shim", crash)
    assert cli.main([*SMALL, "--engine", "pure", "--engine", "eager"]) == 1
    out = capsys.readouterr().out
    crashed = out.count("RuntimeError: simulated crash")
    assert crashed == out.count("ERROR") > 0 and f"{crashed} crashed" in out
    assert sum(row.endswith("PASS") for row in _rows(out, "adam")) > 0


def test_the_summary_names_what_is_skipped_and_why(capsys, monkeypatch):
    monkeypatch.setattr(engines, "compiler_available", lambda: False)
    monkeypatch.setitem(references.REFERENCES, "lars", references.Reference("pytorch_optimizer", lambda: None))
    assert (
        cli.main(
            [
                "verify",
                "--algo",
                "lars",
                "--algo",
                "sgd",
                "--dtype",
                "float64",
                "--steps",
                "5",
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped: engine compiled: torch.compile finds no C++ compiler" in out
    assert "skipped: lars: reference not installed (pip install pytorch_optimizer)" in out
    if not torch.cuda.is_available():
        assert "skipped: device cuda: no CUDA device here" in out


def test_expected_failures_are_named_and_do_not_fail_the_run(capsys, monkeypatch):
    """An entry of EXPECTED_FAILURES (empty today) marks its checks: here one that passes, so XPASS."""
    reason = "issue 0: a listed check"
    monkeypatch.setitem(verify.EXPECTED_FAILURES, ("nadam", verify_plan.DEFAULT_FLOAT64), reason)
    assert (
        cli.main(
            [
                "verify",
                "--algo",
                "nadam",
                "--dtype",
                "float64",
                "--device",
                "cpu",
                "--engine",
                "pure",
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    marked = [row for row in _rows(out, "nadam") if "(default float64)" in row]
    assert marked and all(row.endswith("XPASS") for row in marked)
    assert f"expected to fail: {reason}" in out


def test_a_progress_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main([*SMALL[:-1], "--engine", "pure"]) == 0
    err = capsys.readouterr().err
    assert "\r[" in err and "adam float64 pure" in err


def test_processes_report_what_one_process_reports(capsys):
    """--jobs 2 spreads the checks over two processes (whole cases each): the same rows, in another order."""
    args = [
        "verify",
        "--algo",
        "rprop",
        "--algo",
        "asgd",
        "--dtype",
        "float64",
        "--dtype",
        "float32",
        "--steps",
        "10",
        "--no-compile",
        "--no-progress",
    ]
    rows = []
    for jobs in ("1", "2"):
        assert cli.main([*args, "--jobs", jobs]) == 0
        rows.append(
            sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith(("rprop ", "asgd ")))
        )
    assert rows[0] == rows[1] and len(rows[0]) > 10


def test_unknown_algorithm_exits_2_with_the_registry_message(capsys):
    assert cli.main(["verify", "--algo", "adamm"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adamm'" in err and "Did you mean 'adam'?" in err
    assert "Traceback" not in err


def test_module_entry_point_help():
    src = str(Path(optorch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "optorch", "verify", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--full" in result.stdout and "representative subset" in result.stdout


def test_reductions_and_recordings_are_verified(capsys):
    """AutoSGM has no single reference class: verify checks its torch.optim reductions and replays the
    original's recorded trajectories."""
    args = [
        "verify",
        "--algo",
        "autosgm",
        "--dtype",
        "float64",
        "--device",
        "cpu",
        "--engine",
        "pure",
        "--engine",
        "eager",
        "--steps",
        "20",
        "--jobs",
        "1",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    expected = 2 * len(optorch.autosgm.REDUCTIONS) + 2 * len(optorch.tools.recorded.cases("autosgm"))
    assert f"OK: {expected} checks" in out
    assert "= SGD: heavy-ball " in out and "= Adam: adam-cosine-restarts" in out and "recorded: polywin_maximize" in out


def test_verify_distributed_is_a_command_of_its_own(capsys):
    """``optorch verify --distributed`` hands over to optorch.verify_distributed with its own options
    (test_distributed.py runs it)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(["verify", "--distributed", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "optorch verify --distributed" in out and "--nproc" in out and "--backend" in out
    assert "--distributed" in cli._parser()._subparsers._group_actions[0].choices["verify"].format_help()
