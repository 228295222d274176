"""The pure layer around the algorithms: steppers and what wraps them, with no state of their own.

``combinators`` (clipping, skipping, accumulation, partitions, EMA as pure wrappers), ``settings``
(the builder's combinator entries as one frozen value), ``inject`` (hyperparameters in the state, for
schedules), ``amp`` (pure loss scaling), ``adaptive`` (the adaptive rules' config and pure update)
and ``knobs`` (where those rules read and write hyperparameters).
"""
