"""``optorch compare``: the table, the plots and the JSON of a short run, determinism, the default
set of configs, and bad config files rejected before any training."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The compare extra; found, not imported (importing scikit-learn takes seconds, and compare never does).
if any(importlib.util.find_spec(module) is None for module in ("sklearn", "tqdm", "matplotlib")):
    pytest.skip("needs the compare extra: scikit-learn, tqdm, matplotlib", allow_module_level=True)

import optorch  # noqa: E402
from optorch import adam  # noqa: E402
from optorch.algorithms import registry
from optorch.tools import cli, compare, compare_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_configs(tmp_path):
    (tmp_path / "sgd_fast.yaml").write_text("name: sgd\nlr: 0.1\nmomentum: 0.9\n")
    (tmp_path / "adam_small.json").write_text(json.dumps({"name": "adam", "lr": 1e-3}))
    return [str(tmp_path / "sgd_fast.yaml"), str(tmp_path / "adam_small.json")]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_short_run_writes_the_table_the_plot_and_the_json(two_configs, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "r" / "results.json"
    assert cli.main(["compare", *two_configs, "--steps", "30", "--out", str(out), "--json", str(report)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert (
        "sgd_fast: 100%" in captured.err and "adam_small: 100%" in captured.err and "30/30" in captured.err
    )  # progress bars
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("sgd_fast ", "adam_small "))}
    assert set(rows) == {"sgd_fast", "adam_small"}
    assert rows["sgd_fast"].split()[1] == "sgd" and rows["adam_small"].split()[1] == "adam"
    assert "1.00x" in printed  # the fastest run's step time is the unit
    assert (out / "table.txt").read_text().splitlines()[0].split()[:2] == ["config", "algorithm"]
    width, height = _png_size(out / "loss.png")
    assert width > 300 and height > 200
    assert not list(out.glob("knob-*.png"))  # nothing changed during these runs

    results = json.loads(report.read_text())
    assert results["meta"]["steps"] == 30 and results["meta"]["seed"] == 0
    runs = {run["label"]: run for run in results["runs"]}
    assert set(runs) == {"sgd_fast", "adam_small"}
    for run in runs.values():
        assert run["steps"] == 30 and not run["diverged"] and len(run["batch_loss"]) == 30
        steps, losses = run["curve"]["step"], run["curve"]["train_loss"]
        assert steps[0] == 0 and steps[-1] == 30 and steps == sorted(set(steps))
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0]  # both configs learn something in 30 steps
        assert run["final_train_loss"] == losses[-1]
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["step_time_s"] > 0 and run["step_time_ratio"] >= 1.0
    assert min(run["step_time_ratio"] for run in runs.values()) == 1.0
    assert runs["sgd_fast"]["config"]["momentum"] == 0.9 and runs["adam_small"]["config"]["lr"] == 1e-3
    # Same init: every run starts from the same loss (ln 10 or so for an untrained 10-class model).
    assert runs["sgd_fast"]["curve"]["train_loss"][0] == runs["adam_small"]["curve"]["train_loss"][0]
    assert abs(runs["sgd_fast"]["curve"]["train_loss"][0] - math.log(10)) < 0.2


def test_same_seed_same_results_and_the_same_batches_for_every_config(two_configs):
    specs = compare.load_specs([two_configs[0], two_configs[0], two_configs[1]])
    assert [s.label for s in specs] == [two_configs[0], two_configs[0], "adam_small"]  # a shared stem: the paths
    first = compare.compare(specs, steps=15, seed=3, eval_every=5, progress=False)
    again = compare.compare(specs, steps=15, seed=3, eval_every=5, progress=False)
    for a, b in zip(first, again):
        assert a.batch_loss == b.batch_loss and a.train_loss == b.train_loss and a.test_accuracy == b.test_accuracy
    # One config twice: same init and same batch order, so bit-identical runs.
    assert first[0].batch_loss == first[1].batch_loss and first[0].train_loss == first[1].train_loss
    other = compare.compare(specs[:1], steps=15, seed=4, eval_every=5, progress=False)
    assert other[0].batch_loss != first[0].batch_loss


def test_batches_are_shuffled_epochs_of_the_training_set():
    order = compare.batch_order(100, steps=7, batch_size=30, seed=0)
    assert order.shape == (7, 30)
    epoch = order[:3].flatten()  # 90 = three whole batches of the first epoch, no sample twice
    assert len(set(epoch.tolist())) == 90 and int(order.max()) < 100
    assert compare.batch_order(100, steps=3 * 40, batch_size=30, seed=0).shape == (120, 30)  # 40 epochs
    with pytest.raises(compare.CompareError, match="batch size"):
        compare.batch_order(100, steps=1, batch_size=101, seed=0)
    data = compare.digits(0)
    assert len(data.y_train) + len(data.y_test) == 1797 and len(data.y_test) == 359
    assert data.x_train.shape[1] == 64 and float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("negative_lr.yaml", "name: adam\nlr: -0.1\n", ["negative_lr.yaml, line 2: lr: must be >= 0, got -0.1"]),
        (
            "typo.yaml",
            "name: adam\nbetas: [0.9, 0.99]\nweight_decy: 0.1\n",
            ["typo.yaml", "'weight_decy'", "did you mean 'weight_decay'"],
        ),
        (
            "bad_beta.json",
            '{"name": "adam", "betas": [0.9, 1.5]}',
            ["bad_beta.json, line 1: betas.1: must be in [0, 1), got 1.5"],
        ),
        ("no_such.yaml", "name: adamm\n", ["no_such.yaml", "unknown optimizer 'adamm'"]),
        ("broken.yaml", "name: adam\nlr: [1e-3\n", ["broken.yaml"]),
    ],
)
def test_a_bad_config_fails_before_any_training_naming_file_and_field(
    two_configs, tmp_path, capsys, monkeypatch, name, text, expected
):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(compare, "_train", no_training)
    bad = tmp_path / name
    bad.write_text(text)
    out = tmp_path / "out"
    assert cli.main(["compare", two_configs[0], str(bad), two_configs[1], "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("optorch compare: error: ") and "Traceback" not in captured.err
    for part in expected:
        assert part in captured.err
    assert not out.exists() and captured.out == ""


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "nowhere.yaml"), "--no-progress", "--out", str(tmp_path)]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err


def test_the_default_set_covers_every_registered_algorithm_and_the_repo_configs():
    specs = compare.default_specs()
    assert {s.algorithm.name for s in specs} == set(registry.names())
    config_dir = compare.default_config_dir()
    # The tests run from a checkout: its configs/ is the default set's first part, file by file.
    repo_configs = Path(__file__).resolve().parents[2] / "configs"
    assert config_dir == repo_configs
    assert [s.source for s in specs if s.source != "defaults"] == [str(p) for p in sorted(repo_configs.glob("*.yaml"))]
    # A directory argument means its config files, by name.
    assert [s.source for s in compare.load_specs([repo_configs])] == [
        str(p) for p in sorted(repo_configs.glob("*.yaml"))
    ]


def test_without_config_files_every_algorithm_gets_its_default_config(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.ALGORITHMS, "toy_adam", dataclasses.replace(adam.algorithm, name="toy_adam"))
    specs = compare.default_specs(tmp_path)  # an empty directory: as an installed wheel without configs
    assert [s.label for s in specs] == [f"{name} (defaults)" for name in registry.names()]
    assert all(s.source == "defaults" and s.config == s.algorithm.config() for s in specs)
    toy = next(s for s in specs if s.algorithm.name == "toy_adam")
    (result,) = compare.compare([toy], steps=3, progress=False)
    assert result.steps == 3 and result.algorithm == "toy_adam"


def test_every_default_config_runs(tmp_path):
    results = compare.compare(compare.default_specs(), steps=3, eval_every=1, progress=False)
    assert len(results) == len(compare.default_specs())
    for r in results:
        assert r.steps == 3 and len(r.train_loss) == 4 and all(math.isfinite(v) for v in r.train_loss), r.label
    table = compare_report.format_table(results, target=0.3)
    assert len(table.splitlines()) == 2 + len(results) + 1


def test_a_changing_learning_rate_is_recorded_and_plotted(two_configs, tmp_path):
    (spec,) = compare.load_specs(two_configs[:1])
    scheduled = dataclasses.replace(
        spec, label="sgd_steplr", scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    )
    results = compare.compare([spec, scheduled], steps=10, progress=False)
    assert results[0].changing_knobs() == {}
    # StepLR: the lr used by step k (1-based) is 0.1 * 0.5 ** ((k - 1) // 4).
    expected = [0.1 * 0.5 ** ((k - 1) // 4) for k in range(1, 11)]
    assert results[1].changing_knobs() == {"lr": pytest.approx(expected, rel=1e-12)}
    assert results[1].knobs["momentum"] == [0.9] * 10
    (path,) = compare_report.plot_knobs(results, tmp_path)
    assert path.name == "knob-lr.png" and _png_size(path)[0] > 300


def test_a_diverging_run_is_reported_not_raised(tmp_path):
    (spec,) = compare.load_specs([_write(tmp_path / "huge.yaml", "name: sgd\nlr: 1e30\n")])
    (result,) = compare.compare([spec], steps=20, eval_every=1, progress=False)
    assert result.diverged and result.steps < 20 and math.isnan(result.final_train_loss)
    assert "diverged after" in compare_report.format_table([result], 0.3)
    document = compare_report.results_json([result], {})
    json.dumps(document, allow_nan=False)  # non-finite values became null
    assert document["runs"][0]["final_train_loss"] is None


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_module_entry_point_help():
    src = str(Path(optorch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "optorch", "compare", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "CONFIG" in result.stdout and "--json PATH" in result.stdout and "before any training" in result.stdout


def test_step_counters_are_not_plotted_as_knobs():
    knobs = {"lr": [0.1, 0.05, 0.025], "shared.global_step": [0.0, 1.0, 2.0], "shared.d_total": [5.0, 5.0, 5.0]}
    result = compare.Result("dag", "defaults", "dag", {}, 3, knobs=knobs)
    assert result.changing_knobs() == {"lr": [0.1, 0.05, 0.025]}


def test_another_groups_copy_of_group_0_is_not_plotted_again():
    knobs = {"lr": [0.1, 0.05], "g1.lr": [0.1, 0.05], "g2.lr": [0.2, 0.1], "weight_decay": [0.1, 0.1]}
    result = compare.Result("recipe", "defaults", "adamw", {}, 2, knobs=knobs)
    assert result.changing_knobs() == {"lr": [0.1, 0.05], "g2.lr": [0.2, 0.1]}
