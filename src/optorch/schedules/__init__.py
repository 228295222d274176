r"""Learning-rate schedules: pure ``step -> value`` functions.

A schedule is a frozen, validated pydantic model with a ``name`` discriminator (so it is built from a
config dict by :func:`from_config`) and ``__call__(step)``, as in optax. ``step`` may be

- a Python ``int`` or ``float``: the value is a Python ``float``, computed in double precision with
  the same operations, in the same order, as ``torch.optim.lr_scheduler``'s closed forms;
- a tensor (usually 0-dim, any device, any shape works element-wise): the value is a tensor
  (float64, float32 on MPS) computed with torch ops only. Nothing reads the tensor back to the host
  and no Python branch depends on its value, so a schedule runs inside
  ``torch.compile(fullgraph=True)`` and a new step never recompiles.

Negative steps count as 0. Every schedule is total: no step makes it divide by zero, go negative
where its values are non-negative, or rise again after its end (the bugs of the original optorch's
``rsqrt``, ``cosine`` and ``linear_warmdown``).

Notation: :math:`s` is the step, :math:`v` ``init_value`` (the peak), :math:`e` ``end_value``,
:math:`a` ``warmup_start_value``, :math:`W` ``warmup_steps``, and
:math:`\operatorname{ramp}(x, y; k, n) = x + (y - x)\,k / n` with :math:`k` clamped to :math:`[0, n]`.
The formulas of every schedule are in docs/schedules.md and in each class's docstring.
"""

from .base import Constant, Cosine, Linear, Schedule, WarmupStableDecay
from .catalog import (
    SCHEDULES,
    AnySchedule,
    AutosgmWindow,
    CosineWarmRestarts,
    Exponential,
    Join,
    LinearWarmdown,
    MultiStep,
    OneCycle,
    Polynomial,
    Rsqrt,
    Step,
    UnknownScheduleError,
    from_config,
    names,
)

__all__ = [
    "SCHEDULES",
    "AnySchedule",
    "AutosgmWindow",
    "Constant",
    "Cosine",
    "CosineWarmRestarts",
    "Exponential",
    "Join",
    "Linear",
    "LinearWarmdown",
    "MultiStep",
    "OneCycle",
    "Polynomial",
    "Rsqrt",
    "Schedule",
    "Step",
    "UnknownScheduleError",
    "WarmupStableDecay",
    "from_config",
    "names",
]
