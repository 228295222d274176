"""The module paths of optorch before its layers had folders, kept working.

``import optorch.adam``, ``from optorch.combinators import ema``, ``optorch.sgd.algorithm`` and a
pickle that names ``optorch.shim.Optimizer`` or ``optorch.combinators.Combinators`` all resolve to the
module that holds the code now. Nothing here is a file in the top package: an import of an old path
is answered by :class:`_Finder` with the module itself (so ``optorch.adam is optorch.algorithms.adam``),
or, where one old module became several, with a read-only union of their public names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

from .algorithms import registry

_ALGORITHMS = tuple(registry.names())  # at import, the built-in ones: each module was optorch.<name>

MOVED: dict[str, tuple[str, ...]] = {
    **{name: (f"algorithms.{name}",) for name in _ALGORITHMS},
    "registry": ("algorithms.registry",),
    "algorithm": ("core.algorithm",),
    "config": ("core.config",),
    "ops": ("core.ops",),
    "distributed": ("core.distributed", "builder.make:split_param_groups"),
    "amp": ("functional.amp",),
    "inject": ("functional.inject",),
    "combinators": (
        "functional.combinators",
        "functional.settings",
        "shim.runtime:InPlace",
        "builder.make:build_stepper=from_config",
    ),
    "adaptive": ("functional.adaptive", "functional.knobs", "shim.adaptive"),
    "engines": ("shim.engines",),
    "checkpoint": ("shim.checkpoint",),
    "configfile": ("builder.files", "core.errors:ConfigError"),
    "cli": ("tools.cli",),
    "compare": ("tools.compare",),
    "docgen": ("tools.docgen",),
    "recorded": ("tools.recorded",),
    "verify": ("tools.verify",),
    "verify_distributed": ("tools.verify_distributed",),
    "optim": ("builder.classes",),
}
"""Old module name (under ``optorch``) -> where its names live now: modules (all their public names),
or ``module:name`` (one name; ``module:name=old`` under its old name). One entry: the module itself."""


def resolve(old: str) -> types.ModuleType:
    """The module an old path stands for now."""
    parts = MOVED[old]
    if len(parts) == 1:
        return importlib.import_module(f"{__package__}.{parts[0]}")
    union = types.ModuleType(f"{__package__}.{old}", f"optorch.{old}, whose names now live in {', '.join(parts)}.")
    exported: list[str] = []
    for part in parts:
        path, _, names = part.partition(":")
        module = importlib.import_module(f"{__package__}.{path}")
        if names:
            pairs = [tuple(n.split("=")) if "=" in n else (n, n) for n in names.split(",")]
        else:  # its public names; the first module's win (the others import some of them from it)
            pairs = [(n, n) for n in vars(module) if not n.startswith("_") and not hasattr(union, n)]
        for name, as_name in pairs:
            setattr(union, as_name, getattr(module, name))
        exported += [as_name for name, as_name in pairs if name in getattr(module, "__all__", ()) or names]
    union.__all__ = exported
    return union


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: Any) -> types.ModuleType:
        return resolve(spec.name.rpartition(".")[2])

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # the module it answers with is already loaded


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


def install() -> None:
    """Answer imports of the old paths (once per interpreter)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())


def attribute(name: str) -> types.ModuleType:
    """``optorch.<old name>`` without an import statement (the package's ``__getattr__``)."""
    if name not in MOVED:
        raise AttributeError(f"module {__package__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__package__}.{name}")
