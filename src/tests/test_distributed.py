"""Beyond one process: every algorithm under FSDP2, DDP, ZeroRedundancyOptimizer, tensor parallel and
torch.distributed.checkpoint equals the single-process run of the same model and global batch.

The cases run in ``optorch.verify_distributed`` (what ``optorch verify --distributed`` runs on a
user's machine), in two gloo processes on the CPU that run many cases each. CI runs its
representative subset (ADOPT and AutoSGM also under the default engine, whose compiled kernels step
FSDP2's local shards and ZeRO's bucket views); the full matrix (every config in every mode, the
compiled engine under FSDP2, torch's kernels where ``auto`` or ``torch`` picks them, a 2-D mesh in
four processes) is behind the ``matrix`` marker::

    pytest src/tests/test_distributed.py -m matrix
"""

from __future__ import annotations

import copy
import functools
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_docs import python_blocks

import optorch
from optorch import distributed  # the public path (its names live in optorch.core.distributed and optorch.builder)
from optorch.tools import verify_distributed
from optorch.tools.verify_distributed import RESUME_TOLERANCE, TOLERANCE, Case

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _check(result: dict) -> None:
    assert result["error"] is None, result["error"]
    assert result["diff"] <= TOLERANCE, f"{result['diff']:.3g} from the single-process run"
    if result["torch_diff"] is not None:
        assert result["torch_diff"] <= TOLERANCE, f"{result['torch_diff']:.3g} from torch.optim in the same mode"
    if result["resume_diff"] is not None:
        assert result["resume_diff"] <= RESUME_TOLERANCE, (
            f"resumed {result['resume_diff']:.3g} from the run without a break"
        )
    if result["init_step_change"] is not None:
        assert result["init_step_change"] == 0.0, "DCP's state-creating step changed a param, a position or a counter"


# -- the representative subset (CI) --------------------------------------------------------------

CI = verify_distributed.cases()


@pytest.fixture(scope="module")
def ci_results():
    return verify_distributed.spawn(CI, extra=_refusals)


@pytest.mark.parametrize("case", CI, ids=lambda case: case.label)
def test_equals_the_single_process_run(ci_results, case):
    _check(ci_results[case.label])


def test_the_subset_covers_every_mode_and_the_cross_parameter_entries():
    modes = {case.mode for case in CI}
    assert modes == set(verify_distributed.MODES) - {"fsdp2-tp"}  # a 2-D mesh needs four processes: the matrix has it
    configs = {verify_distributed.CONFIGS[case.config]["name"] for case in CI}
    assert {"dag", "lars", "adafactor", "autosgm"} <= configs  # the algorithms that reduce over a tensor or the params


def test_sharded_reductions_communicate(ci_results):
    """The per-tensor reductions of a sharded param really run across the ranks (an all-reduce each:
    a norm read on one rank alone would be that rank's shard's), and element-wise algorithms step
    their shards with no communication at all."""
    assert ci_results["adamw fsdp2"]["comm"] == {}
    assert ci_results["lars fsdp2"]["comm"] == {"all_reduce": 8}  # |param| and |grad| of 4 tensors
    assert ci_results["dag zero"]["comm"] == {"all_reduce": 1}  # the shrink's sums over the partition
    assert ci_results["adam+amp fsdp2"]["comm"] == {"all_reduce": 1}  # one finiteness decision


# -- the full matrix -------------------------------------------------------------------------------

MATRIX = [case for case in verify_distributed.cases(full=True) if case.mode != "fsdp2-tp"]
ALGORITHMS = [name for name, config in verify_distributed.CONFIGS.items() if not verify_distributed.entries(config)]
TORCH_KERNELS = ("sgd", "adam", "adamw", "adagrad")
MATRIX_ENGINES = (
    [Case(name, "fsdp2", "compiled") for name in ALGORITHMS]  # element-wise shards through the compiled kernels
    + [
        Case(name, mode, engine)
        for name in TORCH_KERNELS
        for engine in ("auto", "torch")
        for mode in ("fsdp2", "ddp", "zero")
    ]
)
MATRIX_2D = [Case(name, "fsdp2-tp") for name in verify_distributed.CONFIGS]


@pytest.fixture(scope="module")
def matrix_results():
    return verify_distributed.spawn(MATRIX + MATRIX_ENGINES)


@pytest.fixture(scope="module")
def matrix_2d_results():
    return verify_distributed.spawn(MATRIX_2D, world=4)


@pytest.mark.matrix
@pytest.mark.parametrize("case", MATRIX + MATRIX_ENGINES, ids=lambda case: case.label)
def test_matrix(matrix_results, case):
    _check(matrix_results[case.label])


@pytest.mark.matrix
@pytest.mark.parametrize("case", MATRIX_2D, ids=lambda case: case.label)
def test_matrix_on_a_2d_mesh(matrix_2d_results, case):
    _check(matrix_2d_results[case.label])


# -- what is refused, and why (in the CI processes) -------------------------------------------------


def _refusals() -> dict[str, str | None]:
    """Run in the CI processes after the cases: each attempt's error message (None: it worked)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    outcomes = {}

    def attempt(name, make):
        try:
            make()
            outcomes[name] = None
        except Exception as error:  # noqa: BLE001 - the message is what is checked
            outcomes[name] = f"{type(error).__name__}: {error}"

    def zero(config, params=None, **options):
        model = torch.nn.Linear(4, 3)
        local = functools.partial(optorch.build, config, **options)
        return ZeroRedundancyOptimizer(params if params is not None else model.parameters(), optimizer_class=local)

    attempt("dag without partition_group", lambda: zero({"name": "dag"}))
    attempt("clip without partition_group", lambda: zero({"name": "adamw", "clip_grad_norm": 1.0}))
    attempt("amp without partition_group", lambda: zero({"name": "adamw", "amp": {}}))
    attempt("adamw without partition_group", lambda: zero({"name": "adamw", "ema": 0.9}))
    attempt("dag with partition_group", lambda: zero({"name": "dag"}, partition_group=dist.group.WORLD))
    attempt(
        "adapt inside zero",
        lambda: zero({"name": "sgd", "lr": 0.1, "adapt": {"lr_rule": "trend"}}, partition_group=dist.group.WORLD),
    )
    attempt(
        "param_groups inside zero",
        lambda: zero({"name": "adamw", "param_groups": [{"match": "bias", "weight_decay": 0.0}]}),
    )
    model = torch.nn.Linear(4, 3)
    attempt(
        "a schedule as zero's keyword",
        lambda: ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=optorch.optim.AdamW,
            lr=0.01,
            schedule={"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 10}},
        ),
    )

    # a whole (unsharded) state loaded into a sharded optimizer by hand: refused at the next step
    torch.manual_seed(0)
    whole = torch.nn.Linear(4, 3)
    reference = optorch.build({"name": "adafactor"}, whole.parameters(), engine="eager")
    whole(torch.randn(2, 4)).sum().backward()
    reference.step()
    sharded = fully_shard(copy.deepcopy(whole))
    optimizer = optorch.build({"name": "adafactor"}, sharded.parameters(), engine="eager")
    optimizer.load_state_dict(reference.state_dict())
    sharded(torch.randn(2, 4)).sum().backward()
    attempt("a whole state in a sharded optimizer", optimizer.step)
    return outcomes


@pytest.fixture(scope="module")
def refusals(ci_results):
    return ci_results["extra"]


@pytest.mark.parametrize(
    "name", ["dag without partition_group", "clip without partition_group", "amp without partition_group"]
)
def test_zero_refuses_cross_parameter_reductions_without_a_partition_group(refusals, name):
    assert (
        refusals[name].startswith("ValueError")
        and "partition_group=dist.group.WORLD" in refusals[name]
        and "partial result" in refusals[name]
    )


def test_zero_builds_per_tensor_configs_and_a_partition_group(refusals):
    assert refusals["adamw without partition_group"] is None
    assert refusals["dag with partition_group"] is None


def test_zero_refuses_what_it_would_undo_or_cannot_name(refusals):
    assert "AdaptiveOpt(zero_optimizer" in refusals["adapt inside zero"]
    assert "split_param_groups" in refusals["param_groups inside zero"]
    assert (
        "'schedule'" in refusals["a schedule as zero's keyword"]
        and "functools.partial(optorch.optim" in refusals["a schedule as zero's keyword"]
    )


def test_a_whole_state_in_a_sharded_optimizer_is_refused(refusals):
    message = refusals["a whole state in a sharded optimizer"]
    assert message.startswith("ValueError") and "placements" in message and "full_state_dict=True" in message


# -- a partition group, by itself ----------------------------------------------------------------


def test_a_partition_group_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        optorch.build({"name": "dag"}, [torch.nn.Parameter(torch.ones(2))], partition_group=object())


# -- optimizer in backward (one process) -------------------------------------------------------------


def _in_backward(config, steps=5):
    """``config`` stepped per parameter from post-accumulate-grad hooks, and as one optimizer after
    backward; the params of each."""
    results = []
    for hooked in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
        if hooked:
            optimizers = {p: optorch.build(config, [p], engine="eager") for p in model.parameters()}

            def step(param, optimizers=optimizers):  # this iteration's optimizers
                optimizers[param].step()
                optimizers[param].zero_grad()

            for p in model.parameters():
                p.register_post_accumulate_grad_hook(step)
        else:
            optimizer = optorch.build(config, model.parameters(), engine="eager")
        for _ in range(steps):
            torch.nn.functional.mse_loss(model(x), y).backward()
            if not hooked:
                optimizer.step()
                optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    return results


@pytest.mark.parametrize(
    "config",
    [
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
        {"name": "adopt", "lr": 0.01},
        {"name": "lars", "lr": 0.1, "weight_decay": 0.01},
        {"name": "adafactor", "lr": 0.01},
        {"name": "autosgm", "lr": 0.01, "numerator": 2},
        {
            "name": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "ema": 0.9,
            "schedule": {"lr": {"name": "cosine", "init_value": 0.1, "decay_steps": 5}},
        },
    ],
    ids=lambda config: config["name"],
)
def test_an_optimizer_per_parameter_in_backward_equals_one_after_it(config):
    hooked, plain = _in_backward(config)
    for a, b in zip(hooked, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_optimizer_in_backward_equals_torch_optim_in_backward():
    hooked, _ = _in_backward({"name": "adamw", "lr": 0.01, "weight_decay": 0.1})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    optimizers = {p: torch.optim.AdamW([p], lr=0.01, weight_decay=0.1) for p in model.parameters()}

    def step(param):
        optimizers[param].step()
        optimizers[param].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step)
    for _ in range(5):
        torch.nn.functional.mse_loss(model(x), y).backward()
    for a, b in zip(hooked, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "config, what",
    [
        ({"name": "dag"}, "dag's shared state"),
        ({"name": "adamw", "clip_grad_norm": 1.0}, "'clip_grad_norm'"),
        ({"name": "adamw", "skip_nonfinite": True}, "'skip_nonfinite'"),
        ({"name": "adamw", "amp": {}}, "'amp'"),
    ],
)
def test_optimizer_in_backward_is_refused_where_a_step_reduces_over_all_params(config, what):
    with pytest.raises(RuntimeError, match="inside backward") as error:
        _in_backward(config, steps=1)
    assert what in str(error.value)


# -- optorch.optim, split_param_groups, pickling ------------------------------------------------------


def test_every_builtin_algorithm_has_a_class():
    assert set(optorch.optim.NAMES) == set(optorch.ALGORITHMS)
    for name, class_name in optorch.optim.NAMES.items():
        optimizer = getattr(optorch.optim, class_name)([torch.nn.Parameter(torch.ones(2))])
        assert isinstance(optimizer, optorch.Optimizer) and optimizer.algorithm.name == name


def test_a_class_steps_as_build_and_pickles_as_itself():
    params = {kind: torch.nn.Parameter(torch.arange(4.0, dtype=torch.float64)) for kind in ("class", "build")}
    config = {
        "lr": 0.01,
        "momentum": 0.9,
        "clip_grad_norm": 1.0,
        "schedule": {"lr": {"name": "cosine", "init_value": 0.01, "decay_steps": 4}},
    }
    optimizers = {
        "class": optorch.optim.DAG([params["class"]], engine="eager", **config),
        "build": optorch.build({"name": "dag", **config}, [params["build"]], engine="eager"),
    }
    for _ in range(3):
        for kind, optimizer in optimizers.items():
            params[kind].grad = params[kind].detach().sin()
            optimizer.step()
    torch.testing.assert_close(params["class"], params["build"], rtol=0, atol=0)
    copied = pickle.loads(pickle.dumps(optimizers["class"]))
    assert (
        type(copied) is optorch.optim.DAG
        and copied.state_dict()["param_groups"] == optimizers["class"].state_dict()["param_groups"]
    )


def test_split_param_groups_builds_what_the_config_builds():
    config = {
        "name": "adamw",
        "lr": 0.01,
        "weight_decay": 0.1,
        "param_groups": [{"match": "*.bias", "weight_decay": 0.0}],
    }
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups, rest = distributed.split_param_groups(config, model)
    assert (
        "param_groups" not in rest and [len(g["params"]) for g in groups] == [2, 2] and groups[1]["weight_decay"] == 0.0
    )
    split, whole = optorch.build(rest, groups), optorch.build(config, model)
    assert [{k: v for k, v in g.items() if k != "params"} for g in split.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in whole.param_groups
    ]


def test_a_partition_copies_as_itself_and_refuses_pickling():
    partition = distributed.Partition.__new__(distributed.Partition)
    assert copy.deepcopy(partition) is partition
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(partition)


def test_the_fsdp2_and_dcp_example_of_the_docs_runs_in_two_processes(tmp_path):
    """docs/distributed.md's first example, as a user runs it: torchrun, 2 gloo processes, a DCP save
    and a resume into a fresh optimizer."""
    page = Path(__file__).parents[2] / "docs" / "distributed.md"
    line, code, _ = next(block for block in python_blocks(page.read_text()) if "fully_shard" in block[1])
    (tmp_path / "train.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"docs/distributed.md line {line}:\n{result.stderr[-3000:]}"
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
