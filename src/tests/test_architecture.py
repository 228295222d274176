"""The layers of the package (docs/architecture.md), enforced: who may import whom, no cycles, no
hidden imports, the public paths of before the layers had folders, and a shim pickled back then.

The import graph is read from the source (``ast``), not by importing, so a violation names the file
and the line; an import under ``if TYPE_CHECKING:`` is an annotation, not a dependency, and is left out.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import optorch

PACKAGE = Path(optorch.__file__).parent
DATA = Path(__file__).parent / "data"

LAYERS = ("core", "schedules", "algorithms", "functional", "shim", "builder", "tools", "")
"""Bottom to top: a module may import from its own layer and the layers before it. ``""`` is the top
package (``optorch/__init__.py``, ``__main__``, ``_moved``), the public namespace above everything."""

TOP_MODULES = {"__init__", "__main__", "_moved"}
MAX_TOP_MODULES = 8
MAX_LINES = 500

LAZY = {
    "torch.distributed": "not in every torch build; needed only where a process group or DTensor is in use",
    "torch.nn.parallel": "DDP, for the distributed checks only",
    "torch.multiprocessing": "starts processes for the distributed checks only",
    "torch._inductor": "heavy; only a compiled engine needs to know whether a C++ compiler is there",
    "matplotlib": "optional (the compare extra): plots only",
    "numpy": "read with the compare extra's dataset",
    "sklearn": "optional (the compare extra): the digits dataset",
    "importlib": "finds the optional dataset without importing it",
    "concurrent.futures": "verify's parallel jobs, started only with --jobs",
    "multiprocessing": "verify's parallel jobs, started only with --jobs",
    "adopt": "torch-adopt, a reference implementation that only verification runs (dev extra)",
    "pytorch_optimizer": "a reference implementation that only verification runs (dev extra)",
}
"""The packages a module may import inside a function, and why: optional or heavy third-party ones.
An optorch module is never imported inside a function."""


class Import(NamedTuple):
    module: str  # the importing module
    target: str  # the imported module (for ``from x import y``: x, or x.y where y is a module)
    line: int
    local: bool  # inside a function


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    modules = _modules()
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = (
                    _resolve(module, path.name == "__init__.py", child.level, child.module)
                    if child.level
                    else child.module
                )
                for alias in child.names:  # `from . import x`: the module x, where x is one
                    sub = f"{target}.{alias.name}"
                    found.append(Import(module, sub if sub in modules else target, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


ALL = {module: _imports(module, path) for module, path in _modules().items()}
EDGES = {
    module: {i.target for i in imports if i.target.startswith("optorch") and i.target != module}
    for module, imports in ALL.items()
}


def test_every_import_goes_to_the_same_layer_or_below():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{i.module}:{i.line} imports {i.target} ({_layer(i.target) or 'the top package'} is above {_layer(i.module)})"
        for imports in ALL.values()
        for i in imports
        if i.target.startswith("optorch.") and rank[_layer(i.target)] > rank[_layer(i.module)]
    ]
    assert upward == []


def test_the_modules_import_each_other_without_cycles():
    # a package's __init__ re-exports its modules: its edges to them are not a dependency of theirs on it
    edges = {
        m: {t for t in targets if not (t.startswith(m + ".") and _modules()[m].name == "__init__.py")}
        for m, targets in EDGES.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_no_module_imports_optorch_inside_a_function_and_third_party_lazily_only_where_documented():
    local = [
        f"{i.module}:{i.line} imports {i.target} inside a function"
        for imports in ALL.values()
        for i in imports
        if i.local
        and (i.target.startswith("optorch") or not any(i.target == p or i.target.startswith(p + ".") for p in LAZY))
    ]
    assert local == []


def test_the_top_package_holds_few_modules_and_no_module_is_long():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == TOP_MODULES and len(top) <= MAX_TOP_MODULES
    long = {module: n for module, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_torch_private_apis_are_used_in_compat_alone():
    private = re.compile(
        r"torch\.utils\._pytree|torch\._C\.|torch\._inductor\.|torch\._dynamo\.|from torch\.optim\.\w+ import"
    )
    users = sorted(
        f"{module}: {match}"
        for module, path in _modules().items()
        if module != "optorch.core.compat"
        for match in private.findall(path.read_text())
    )
    assert users == []


PUBLIC_PATHS = [
    "import optorch.adam; assert optorch.adam.Config is optorch.algorithms.adam.Config",
    "from optorch.adam import Config; import optorch; assert Config is optorch.adam.Config",
    "import optorch; assert optorch.sgd.algorithm.name == 'sgd' and callable(optorch.build) and "
    "callable(optorch.build_stepper)",
    "import optorch; assert optorch.adam.Config().lr == 1e-3",
    "from optorch.combinators import Combinators, clip_by_global_norm, from_config; import optorch; assert from_config "
    "is optorch.build_stepper",
    "from optorch.adaptive import AdaptiveConfig, AdaptiveOpt, flatten_state, update; import optorch; assert "
    "AdaptiveOpt is optorch.AdaptiveOpt",
    "from optorch.shim import Optimizer; import optorch; assert Optimizer is optorch.Optimizer",
    "import optorch.optim; assert optorch.optim.AdamW.__module__ == 'optorch.optim'",
    "from optorch.distributed import split_param_groups, is_dtensor",
    "import optorch.verify; assert optorch.verify is optorch.tools.verify",
    "from optorch.registry import names; assert 'adam' in names()",
    "from optorch import schedules; assert schedules.from_config({'name': 'constant', 'value': 1.0})(3) == 1.0",
]


@pytest.mark.parametrize("statement", PUBLIC_PATHS)
def test_public_paths_of_before_the_layers_still_work(statement):
    # a fresh interpreter: nothing imported earlier by the suite can make a path work
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True, text=True)


def test_a_shim_pickled_before_the_layers_loads_and_continues_as_its_code_did():
    recorded = pickle.loads((DATA / "shims_before_layers.pkl").read_bytes())
    payload = pickle.loads(recorded["pickled"])
    for key in ("built", "dag"):
        optimizer = payload[key]
        assert isinstance(optimizer, optorch.Optimizer)
        saved = payload["state_dicts"][key]
        assert optimizer.state_dict()["param_groups"] == saved["param_groups"]
        for step in range(2, 4):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.full_like(p, 0.5 + step)
            if key == "built":
                optimizer.adaptive.step_loss(1.0 / (1 + step))
            optimizer.step()
        params = [p.detach() for group in optimizer.param_groups for p in group["params"]]
        assert all(torch.equal(a, b) for a, b in zip(params, recorded["after"][key], strict=True)), key


def test_every_old_module_path_answers():
    for old in optorch._moved.MOVED:
        module = importlib.import_module(f"optorch.{old}")
        assert module.__name__.startswith("optorch."), old
