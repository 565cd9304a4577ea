"""The Pareto front of a search's trials, and the rules that pick one member of it.

A trial's objectives are its per-task dev metrics as the optimizer saw them (`TrialRecord.objectives`
in `trials.jsonl`: lower-is-better metrics already negated, so higher is better). A trial is on the
front when no other trial is at least as good on every objective and better on one; two trials
with equal objectives are both on it (as in Optuna's `study.best_trials`).

The rules that pick one member (the run's "best": `best.yaml`, the report's evolved row, the
default of `evomerge export`):

- `weighted-mean`: the highest fitness, the weighted mean of the objectives (the default; with
  positive weights the highest mean is never dominated, so it is always on the front);
- `maximin`: the highest worst objective -- the merge that is good at everything (it assumes the
  objectives share a scale, as accuracies do);
- `closest-to-ideal`: the smallest distance to the ideal point (each objective's best value on
  the front), each objective rescaled to [0, 1] over the front.

Ties go to the higher fitness, then to the earlier trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from evomerge.run_dir import TrialRecord

Direction = Literal["maximize", "minimize"]
SelectRule = Literal["weighted-mean", "maximin", "closest-to-ideal"]
RULES: tuple[SelectRule, ...] = ("weighted-mean", "maximin", "closest-to-ideal")
DEFAULT_RULE: SelectRule = "weighted-mean"
RULE_DESCRIPTIONS: dict[str, str] = {
    "weighted-mean": "the highest weighted mean of the dev objectives",
    "maximin": "the highest worst dev objective",
    "closest-to-ideal": "the closest to the ideal point of the front",
}


# ---- points ----------------------------------------------------------------------------


def dominates(
    a: Sequence[float], b: Sequence[float], directions: Sequence[Direction] | None = None
) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    if len(b) != len(a):
        raise ValueError(f"points with {len(a)} and {len(b)} objectives cannot be compared")
    return _dominates(a, b, _signs(directions, len(a)))


def non_dominated(
    points: Sequence[Sequence[float]], directions: Sequence[Direction] | None = None
) -> list[int]:
    """Indices (ascending) of the points no other point dominates; `directions` default: maximize all."""
    if not points:
        return []
    signs = _signs(directions, len(points[0]))
    keep: list[int] = []
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ValueError(f"point {i} has {len(p)} objectives, expected {len(signs)}")
        if any(math.isnan(v) for v in p):
            raise ValueError(f"point {i} has a NaN objective")
        keep = _insert(keep, i, points, signs)
    return sorted(keep)


def _insert(
    front: list[int], i: int, points: Sequence[Sequence[float]], signs: Sequence[float]
) -> list[int]:
    """The archive step: drop `i` if a member dominates it, else add it and drop what it dominates.

    Dominance is transitive, so what is left after every point went through is the front.
    """
    p = points[i]
    if any(_dominates(points[j], p, signs) for j in front):
        return front
    return [j for j in front if not _dominates(p, points[j], signs)] + [i]


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    better = False
    for s, x, y in zip(signs, a, b, strict=True):
        if s * x < s * y:
            return False
        better = better or s * x > s * y
    return better


def _signs(directions: Sequence[Direction] | None, n: int) -> list[float]:
    if directions is None:
        return [1.0] * n
    if len(directions) != n:
        raise ValueError(f"{len(directions)} directions for {n} objectives")
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise ValueError(f"direction {bad[0]!r}: use maximize or minimize")
    return [1.0 if d == "maximize" else -1.0 for d in directions]


# ---- trials ----------------------------------------------------------------------------


def objectives(trial: TrialRecord) -> tuple[float, ...] | None:
    """A scored trial's objectives (higher is better); a trial logged without them: its fitness."""
    if trial.fitness is None:
        return None
    return tuple(trial.objectives or (trial.fitness,))


def trial_front(trials: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated scored trials, in id order (failed trials are never on the front)."""
    scored = sorted((t for t in trials if t.fitness is not None), key=lambda t: t.id)
    keep = non_dominated([objectives(t) for t in scored])  # type: ignore[misc]
    return [scored[i] for i in keep]


def updated_front(front: Sequence[TrialRecord], trial: TrialRecord) -> list[TrialRecord]:
    """`front` after `trial` finished (a failed trial changes nothing); for the search loop."""
    if trial.fitness is None:
        return list(front)
    points = [objectives(t) for t in [*front, trial]]
    keep = _insert(list(range(len(front))), len(front), points, [1.0] * len(points[-1]))  # type: ignore[arg-type]
    members = [(front[i] if i < len(front) else trial) for i in keep]
    return sorted(members, key=lambda t: t.id)


def select(front: Sequence[TrialRecord], rule: str = DEFAULT_RULE) -> TrialRecord | None:
    """The member `rule` picks (see the module docstring), or None for an empty front."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r} (known: {', '.join(RULES)})")
    if not front:
        return None
    values = [objectives(t) for t in front]
    if rule == "weighted-mean":
        score = [0.0] * len(front)
    elif rule == "maximin":
        score = [min(v) for v in values]  # type: ignore[type-var]
    else:
        score = [-_distance_to_ideal(v, values) for v in values]  # type: ignore[arg-type]
    best = max(range(len(front)), key=lambda i: (score[i], front[i].fitness, -front[i].id))
    return front[best]


def picked_by(front: Sequence[TrialRecord]) -> dict[int, list[str]]:
    """Trial id -> the rules that pick it (each rule picks exactly one member)."""
    picks: dict[int, list[str]] = {}
    for rule in RULES:
        chosen = select(front, rule)
        if chosen is not None:
            picks.setdefault(chosen.id, []).append(rule)
    return picks


def _distance_to_ideal(v: Sequence[float], values: Sequence[Sequence[float]]) -> float:
    total = 0.0
    for k, x in enumerate(v):
        column = [w[k] for w in values]
        lo, hi = min(column), max(column)
        if hi > lo:
            total += ((hi - x) / (hi - lo)) ** 2
    return math.sqrt(total)
