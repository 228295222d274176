"""optorch: purely functional optimizers for PyTorch.

Each algorithm is a module with a frozen ``Config``, ``init(params, config) -> state`` and a pure
``step(params, grads, state, config) -> (params, state)``; :func:`build` turns a config into a
``torch.optim.Optimizer`` that runs the same math in place.
"""

from . import (
    adadelta, adafactor, adagrad, adam, adamax, adamw, adopt, asgd, autosgm, dag, decoupled_adam, lars, nadam, radam, rmsprop, rprop, schedules, sgd,
)
from . import amp
from . import adaptive
from .adaptive import AdaptiveConfig, AdaptiveOpt
from .algorithm import Algorithm, Grid
from .builder import ConfigError, build, load_config, parse_config
from . import combinators
from .combinators import bind
from .config import Config
from .inject import InjectedHyperparams, inject_hyperparams
from .layout import contiguous
from .registry import ALGORITHMS, UnknownOptimizerError, register
from .shim import Optimizer
from .checkpoint import complete as complete_state_dict

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
    "complete_state_dict",
    "contiguous",
    "inject_hyperparams",
    "load_config",
    "parse_config",
    "register",
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
