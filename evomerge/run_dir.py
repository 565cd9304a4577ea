"""A search's run directory: its layout, the trial record and its log, and what the loop needs of a pool.

RUN_DIR/
  config.yaml       the config that ran (file + command-line overrides)
  trials.jsonl      one `TrialRecord` per finished trial, one JSON object a line
  space.json        the knobs, in vector order
  best.yaml         the best recipe so far (atomic)
  best_config.yaml  the same recipe, mergekit-runnable (mergekit-multi when slices mix methods)
  cma_state.pkl | study.db    optimizer state, saved after every update (evomerge.optimize)
  best_model/       the best merge, written at the end of `evomerge search`
  report.md, report.json, *.png    `evomerge report`
  pareto/           `evomerge export --pareto`: one trial-NNNN.yaml per front member

The search loop (evomerge.run) writes it; export, report and pareto read it through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from evomerge.errors import RecipeError

if TYPE_CHECKING:  # kept light: the CLI imports this module (through evomerge.pareto) before torch
    from evomerge.recipe import Recipe
    from evomerge.workers import Job, TrialResult, WorkerSetup

CONFIG_FILE = "config.yaml"
TRIALS_FILE = "trials.jsonl"
SPACE_FILE = "space.json"
BEST_FILE = "best.yaml"
# best.yaml in mergekit-runnable form (mergekit-evolve's name)
MERGEKIT_BEST_FILE = "best_config.yaml"
BEST_MODEL_DIR = "best_model"
REPORT_FILE = "report.md"
REPORT_DATA_FILE = "report.json"
PARETO_DIR = "pareto"


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial, as a line of `trials.jsonl` holds it.

    The fields are the line's keys, in the order they are written. A line may lack some of them
    (logs written before `objectives` existed: they read as empty) and may hold keys this version
    does not know (kept in `extra` and written back after the known ones).
    """

    id: int
    status: Literal["ok", "failed"]
    fitness: float | None  # None: the trial failed
    # per fitness task, as the optimizer saw them (lower-is-better metrics negated); see evomerge.pareto
    objectives: tuple[float, ...] = ()
    # task -> metric -> value
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    error: str | None = None
    x: tuple[float, ...] | None = None  # the optimizer's point in [0, 1]^dim
    recipe_hash: str | None = None
    recipe: Mapping[str, Any] | None = None  # the recipe as scored, as a plain mapping
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    wall_seconds: float = 0.0  # from submission to result, in the driver
    worker: str = ""  # host:pid
    finished_at: float | None = None  # time.time()
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know

    @classmethod
    def from_result(
        cls,
        result: TrialResult,
        *,
        x: Sequence[float] | None,
        recipe: Mapping[str, Any] | None,
        wall_seconds: float,
    ) -> TrialRecord:
        """The record of a trial a worker just finished (timings rounded to 0.1 ms)."""
        return cls(
            id=result.candidate_id,
            status=result.status,
            fitness=result.fitness,
            objectives=tuple(result.objectives),
            metrics=result.metrics,
            error=result.error,
            x=tuple(x) if x is not None else None,
            recipe_hash=recipe_hash(recipe) if recipe else None,
            recipe=recipe,
            merge_seconds=round(result.merge_seconds, 4),
            score_seconds=round(result.score_seconds, 4),
            wall_seconds=round(wall_seconds, 4),
            worker=result.worker,
            finished_at=time.time(),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        known = {f.name for f in _FIELDS}
        values = {k: v for k, v in data.items() if k in known}
        if "objectives" in values:
            values["objectives"] = tuple(values["objectives"] or ())
        if values.get("x") is not None:
            values["x"] = tuple(values["x"])
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json(cls, line: str) -> TrialRecord:
        return cls.from_dict(json.loads(line))

    def to_dict(self) -> dict[str, Any]:
        """The line's object: the known keys in their order (sequences as lists), then `extra`."""
        data = {}
        for f in _FIELDS:
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return {**data, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_recipe(self) -> Recipe:
        """The recipe this trial scored."""
        from evomerge.recipe import Recipe

        if self.recipe is None:
            raise RecipeError(f"trial {self.id} has no recipe")
        return Recipe.from_dict(self.recipe, origin=f"trial {self.id}")


_FIELDS = tuple(f for f in fields(TrialRecord) if f.name != "extra")


class TrialLog:
    """`trials.jsonl`: append-only, one JSON object per finished trial, flushed to disk at once."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[TrialRecord]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(TrialRecord.from_json(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it stands
        return records

    def append(self, record: TrialRecord) -> None:
        with self.path.open("a") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_trials(run_dir: Path) -> list[TrialRecord]:
    """Every finished trial of a run, in the order they finished."""
    return TrialLog(Path(run_dir) / TRIALS_FILE).read()


class Pool(Protocol):
    """What the search loop needs of its workers (evomerge.workers: SerialPool, RayPool)."""

    @property
    def free_slots(self) -> int: ...
    @property
    def in_flight(self) -> Sequence[Job]: ...
    def submit(self, job: Job) -> None: ...
    def poll(self, timeout: float | None = None) -> Iterable[TrialResult]:
        """Results finished by now (waiting up to `timeout` seconds for the first)."""
        ...

    def close(self) -> None: ...


PoolFactory = Callable[["WorkerSetup", int], Pool]  # (worker setup, number of workers) -> pool


__all__ = [
    "BEST_FILE",
    "BEST_MODEL_DIR",
    "CONFIG_FILE",
    "MERGEKIT_BEST_FILE",
    "PARETO_DIR",
    "REPORT_DATA_FILE",
    "REPORT_FILE",
    "SPACE_FILE",
    "TRIALS_FILE",
    "Pool",
    "PoolFactory",
    "TrialLog",
    "TrialRecord",
    "read_trials",
    "recipe_hash",
]
