"""optorch: purely functional optimizers for PyTorch.

Each algorithm is a module with a frozen ``Config``, ``init(params, config) -> state`` and a pure
``step(params, grads, state, config) -> (params, state)``; :func:`build` turns a config into a
``torch.optim.Optimizer`` that runs the same math in place, :func:`build_stepper` into the pure stepper.

The code lives in layers (``core``, ``algorithms`` and ``schedules``, ``functional``, ``shim``,
``builder``, ``tools``; see docs/architecture.md); this namespace is the public API, and every
algorithm is also ``optorch.<name>`` (``optorch.adam.Config``).
"""

from . import _moved, schedules
from .algorithms import (
    ALGORITHMS,
    UnknownOptimizerError,
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    adopt,
    asgd,
    autosgm,
    dag,
    decoupled_adam,
    lars,
    nadam,
    radam,
    register,
    rmsprop,
    rprop,
    sgd,
)
from .builder import ConfigError, build, build_stepper, load_config, parse_config
from .core.algorithm import Algorithm, Grid
from .core.config import Config
from .core.opaque import compiled_design, set_compiled_design
from .functional import amp
from .functional.adaptive import AdaptiveConfig
from .functional.combinators import bind
from .functional.inject import InjectedHyperparams, inject_hyperparams
from .shim import Optimizer
from .shim.adaptive import AdaptiveOpt
from .shim.checkpoint import complete as complete_state_dict
from .shim.layout import contiguous

_moved.install()
from . import adaptive, combinators  # noqa: E402 - old paths, answered by _moved: after install()

__version__ = "0.2.0.dev0"

__all__ = [
    "ALGORITHMS",
    "AdaptiveConfig",
    "AdaptiveOpt",
    "Algorithm",
    "Config",
    "ConfigError",
    "Grid",
    "InjectedHyperparams",
    "Optimizer",
    "UnknownOptimizerError",
    "bind",
    "build",
    "build_stepper",
    "compiled_design",
    "complete_state_dict",
    "contiguous",
    "inject_hyperparams",
    "load_config",
    "parse_config",
    "register",
    "set_compiled_design",
    "adadelta",
    "adafactor",
    "adaptive",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "adopt",
    "amp",
    "asgd",
    "autosgm",
    "combinators",
    "dag",
    "decoupled_adam",
    "lars",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "schedules",
    "sgd",
]


def __getattr__(name: str):
    return _moved.attribute(name)
