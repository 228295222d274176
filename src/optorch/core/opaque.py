"""The compiled pure step as one opaque operator call per block of params: the compile-time side of
the trade that :mod:`optorch.core.stepping`'s traced regions make the other way.

A graph that takes n params, their grads and state and returns new ones costs Dynamo, AOTAutograd and
Inductor ~25 ms a param even when it computes nothing (measured: a graph of views only, torch 2.13,
one CPU thread), and Inductor's first C++ kernel build takes seconds more. The ``"regions"`` design
(the default) traces each kind of param once and builds one fused kernel for it: the fastest steps,
at ~25 s for 200 params. The ``"blocks"`` design builds no kernel and traces no update: each block of
params (:func:`stepping.blocks`) goes through one call of the custom operator
``optorch::step_block``, which the compiler sees by its shapes only and which runs the eager joined
step (:func:`stepping.step_in_blocks`) when the graph runs. Its results are flat tensors per block,
which the graph cuts into each param's views, so a block's next step reads them without a copy.
Compiling costs little more than the floor; a step costs what the eager step costs.

The operator runs at the graph's run time, when the Python objects of its trace are gone: it gets the
algorithm by the key it registered under when it was made (:func:`register`), and the config from
the exact text of its numbers and flags (``repr`` round-trips floats), its tensor hyperparameters as
inputs. Where that cannot hold (an unregistered copy, a nested setting, autograd recording, another
device or tensor type) the regions run instead.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import stepping
from .config import Config

__all__ = ["DESIGNS", "compiled_design", "register", "set_compiled_design", "step_as_blocks", "takes"]

DESIGNS = ("regions", "blocks")
"""How a compiled pure step runs its updates: ``"regions"`` (each kind of param traced once into a
fused kernel: fast steps, slow compile) or ``"blocks"`` (one opaque call per block: fast compile,
eager-speed steps)."""

_design = "regions"
_ALGORITHMS: dict[str, Any] = {}


def set_compiled_design(design: str) -> None:
    """Choose how ``torch.compile`` runs the pure steps it compiles from now on (see :data:`DESIGNS`).

    Dynamo guards on the choice: a compiled step made under the other one recompiles."""
    global _design
    if design not in DESIGNS:
        raise ValueError(f"set_compiled_design: {design!r} is not one of {', '.join(map(repr, DESIGNS))}")
    _design = design


def compiled_design() -> str:
    """The design chosen by :func:`set_compiled_design` (``"regions"`` unless changed)."""
    return _design


def register(algorithm: Any) -> None:
    """Make ``algorithm`` findable by the operator at run time (``Algorithm`` does this when made)."""
    _ALGORITHMS[_key(algorithm)] = algorithm


def _key(algorithm: Any) -> str:
    return f"{algorithm.name}@{id(algorithm)}"


def takes(algorithm: Any, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict]) -> bool:
    """Whether a compiled step of these leaves runs as blocks: the design is chosen, the algorithm is
    registered, and every tensor is a plain CPU tensor that no autograd graph records."""
    return _design == "blocks" and _key(algorithm) in _ALGORITHMS and stepping.plain_cpu(params, grads, states)


def step_as_blocks(
    algorithm: Any, params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], config: Config
) -> list[tuple[Tensor, dict]]:
    """New ``(param, state)`` of each leaf (traced): one operator call per block, cut into views."""
    keys = tuple(states[0])
    kind, hyper = _kind(algorithm, keys, config)
    results: list = [None] * len(params)
    for block in stepping.blocks(params, grads, states, algorithm.is_elementwise(config)):
        flat = torch.ops.optorch.step_block(
            kind,
            [params[i] for i in block],
            [grads[i] for i in block],
            [states[i][k] for i in block for k in keys],
            hyper,
        )
        columns = [(flat[0], [params[i] for i in block])]
        columns += [(out, [states[i][k] for i in block]) for k, out in zip(keys, flat[1:])]
        param_pieces, *state_pieces = (_cut(out, like) for out, like in columns)
        for j, i in enumerate(block):
            results[i] = (param_pieces[j], {k: pieces[j] for k, pieces in zip(keys, state_pieces)})
    return results


def _cut(out: Tensor, like: list[Tensor]) -> Sequence[Tensor]:
    """A block's flat result cut into tensors shaped like ``like`` (each op here costs compile time
    per tensor: scalars come out of one ``unbind``, and a piece already in shape is not viewed)."""
    if all(t.dim() == 0 for t in like):
        return out.unbind()
    pieces = out.split([t.numel() for t in like])
    return [p if p.shape == t.shape else p.view(t.shape) for p, t in zip(pieces, like)]


def _kind(algorithm: Any, keys: tuple[str, ...], config: Config) -> tuple[str, list[Tensor]]:
    """The text the operator rebuilds the step from, and the config's tensors (its inputs)."""
    constants, hyper = stepping.split_config(config)
    return f"{_key(algorithm)} {[keys, constants]!r}", hyper


_PARSED: dict[str, tuple[Any, tuple[str, ...], Config]] = {}


def _parsed(kind: str) -> tuple[Any, tuple[str, ...], Config]:
    """The algorithm, the state keys and the config (tensors written ``...``) a kind names."""
    if kind not in _PARSED:
        key, text = kind.split(" ", 1)
        keys, constants = ast.literal_eval(_Constants().visit(ast.parse(text, mode="eval")))
        algorithm = _ALGORITHMS[key]
        _PARSED[kind] = algorithm, tuple(keys), algorithm.config.model_construct(**dict(constants))
    return _PARSED[kind]


class _Constants(ast.NodeTransformer):
    """The names ``repr`` writes for constants that are not literals."""

    NAMES = {"inf": math.inf, "nan": math.nan, "Ellipsis": ...}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Constant(self.NAMES[node.id]), node)


@torch.library.custom_op("optorch::step_block", mutates_args=())
def _step_block(
    kind: str, params: list[Tensor], grads: list[Tensor], states: list[Tensor], hyper: list[Tensor]
) -> list[Tensor]:
    algorithm, keys, config = _parsed(kind)
    config = stepping.with_tensors(config, hyper)
    count = len(keys)
    leaf_states = [dict(zip(keys, states[i * count : (i + 1) * count])) for i in range(len(params))]
    if len(params) == 1:
        results = [stepping.apply_update(algorithm.update, params[0], grads[0], leaf_states[0], config)]
    else:
        results = stepping.step_in_blocks(algorithm.update, params, grads, leaf_states, config)
    outputs = [stepping.flat([p for p, _ in results])]
    outputs += [stepping.flat([state[k] for _, state in results]) for k in keys]
    for out, column in zip(outputs, _columns(params, states)):
        if out.numel() != sum(t.numel() for t in column) or out.dtype != column[0].dtype:
            raise RuntimeError(f"{algorithm.name}: an update changed the shape or dtype of a param or state entry")
    return _unaliased(outputs, [*params, *grads, *states, *hyper])


@_step_block.register_fake
def _step_block_fake(kind, params, grads, states, hyper):
    return [column[0].new_empty(sum(t.numel() for t in column)) for column in _columns(params, states)]


def _columns(params: list[Tensor], states: list[Tensor]) -> list[list[Tensor]]:
    """The operator's inputs per result: the params, then each state key's entries (``states`` holds
    the block's leaves one after another, their keys in order)."""
    count = len(states) // len(params)
    return [params] + [states[k::count] for k in range(count)]


def _unaliased(outputs: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """An operator's results may share memory with neither its inputs nor each other: an unchanged
    state entry comes back as a copy, and so does an empty result (its storage may be anyone's)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.untyped_storage().nbytes()}
    fresh = []
    for out in outputs:
        pointer = out.untyped_storage().data_ptr()
        if not out.untyped_storage().nbytes() or pointer in taken:
            out = out.clone()
        taken.add(out.untyped_storage().data_ptr())
        fresh.append(out)
    return fresh
