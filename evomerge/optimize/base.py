"""The ask/tell interface every optimizer implements, and the checks they share.

Optimizers search the unit cube [0, 1]^d and MAXIMIZE fitness. They know nothing of
recipes or scores: the search space maps the cube to recipes, the run loop maps
candidates to fitness values.

Life of a candidate::

    [cand] = opt.ask()              # immutable Candidate(id, x)
    opt.tell(cand.id, (0.71,))      # one float per objective
    opt.tell(cand.id, None)         # ...or None: the evaluation failed

A failed candidate (``None``, or any non-finite value) counts as the worst possible
result: CMA-ES ranks it below every scored member of its generation, Optuna records
the trial as ``TrialState.FAIL``, which its samplers leave out of their models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from evomerge.errors import ConfigError, EvomergeError


class OptimizerError(EvomergeError):
    """The ask/tell protocol was broken, or saved optimizer state cannot be used."""


@dataclass(frozen=True)
class Candidate:
    """A point to evaluate. ``id`` is unique and increasing across the whole run."""

    id: int
    x: tuple[float, ...]


@runtime_checkable
class Optimizer(Protocol):
    name: str
    dim: int
    n_objectives: int

    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates; fewer (even none) while it waits for tells."""
        ...

    def tell(self, candidate_id: int, values: Sequence[float] | None) -> None:
        """Report one candidate's fitness (one value per objective), or None if it failed."""
        ...

    def enqueue(self, x: Sequence[float]) -> None:
        """Warm start: hand out exactly this point before sampled ones."""
        ...

    def save(self, path: Path) -> None:
        """Write the full optimizer state to ``path`` atomically."""
        ...

    @property
    def pending(self) -> int:
        """How many candidates were asked and not yet told."""
        ...

    def unfinished(self) -> list[Candidate]:
        """The asked-but-untold candidates, in id order.

        After a resume these are the candidates a crashed run never finished: evaluate
        them again and tell their ids, or tell ``None`` to drop them.
        """
        ...

    def best(self) -> tuple[Candidate, tuple[float, ...]] | None:
        """The best told candidate and its values, or None before the first success."""
        ...


def check_point(x: Sequence[float], dim: int, what: str = "point") -> tuple[float, ...]:
    """Validate a point of the unit cube and return it as a tuple of floats."""
    point = tuple(float(v) for v in x)
    if len(point) != dim:
        raise ConfigError(f"{what} has {len(point)} coordinates, the search space has {dim}")
    for i, v in enumerate(point):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{what} coordinate x{i}={v} is outside [0, 1]")
    return point


def check_values(
    candidate_id: int, values: Sequence[float] | None, n_objectives: int
) -> tuple[float, ...] | None:
    """Normalize told values: a tuple of ``n_objectives`` finite floats, or None for a failure."""
    if values is None:
        return None
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        told = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptimizerError(
            f"candidate {candidate_id}: values must be a sequence of {n_objectives} "
            f"float(s) or None, got {values!r}"
        ) from None
    if len(told) != n_objectives:
        raise OptimizerError(
            f"candidate {candidate_id}: got {len(told)} value(s), the optimizer has "
            f"{n_objectives} objective(s)"
        )
    if not all(math.isfinite(v) for v in told):
        return None
    return told


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from several integers (never 0, which pycma reads as 'time')."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)
    return int(state[0] % (2**31 - 1)) + 1
