"""One module per algorithm (its frozen ``Config``, its pure per-tensor ``update``, its verification
data) and the registry that names them. Each is also importable as ``optorch.<name>``."""

from .registry import ALGORITHMS, UnknownOptimizerError, for_config, get, names, register

__all__ = ["ALGORITHMS", "UnknownOptimizerError", "for_config", "get", "names", "register"]
