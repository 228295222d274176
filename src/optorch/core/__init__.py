"""The bottom layer: what every other layer builds on and nothing here imports from above.

``config`` (frozen, validated hyperparameter models and their field types), ``errors`` (one error
type, one way to word a problem), ``ops`` (the tensor operations the per-tensor updates are written
in), ``algorithm`` (the contract an algorithm fulfils), ``distributed`` (DTensor and process-group
helpers) and ``compat`` (the one home of torch's private APIs).
"""
