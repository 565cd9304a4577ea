"""CMA-ES (pycma) behind the ask/tell interface, one generation at a time.

pycma asks and tells whole generations; evaluations arrive one by one and out of
order. This adapter hands a generation's members out as candidates, collects their
fitness, and calls ``es.tell`` once every member is told. Until then ``ask`` returns
only the members not yet handed out (possibly none).

The strategy owns its random stream (pycma's ``randn`` option bound to a private
``RandomState``), so other code reseeding numpy's global RNG (lm-eval does) cannot
change which points are sampled, and a pickled strategy resumes the same stream.

A generation in progress is saved as the strategy *before* its ``es.ask`` plus the points
injected into it; loading replays that ask. pycma keys each sampled solution's genotype by
``hash(x.tobytes())``, which Python salts per process, so a strategy pickled after its ask
and unpickled in another process cannot find its own genotypes and ``es.tell`` would update
from approximations of them: the resumed run would leave the uninterrupted run's path.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cma
import numpy as np

from evomerge.atomic import atomic_write_bytes
from evomerge.errors import ConfigError
from evomerge.optimize.base import (
    Candidate,
    OptimizerError,
    check_point,
    check_values,
    derive_seed,
)

STATE_FORMAT = 2
# A failed member's cost is the generation's worst told cost plus this margin (at least):
# pycma only ranks costs, so any value above the worst ranks it last.
FAILURE_MARGIN = 1.0


@dataclass(frozen=True)
class CmaSettings:
    """What the strategy was created with; a resume must ask for the same."""

    dim: int
    seed: int
    popsize: int | None = None  # None: pycma's default 4 + 3 ln(dim)
    sigma0: float = 0.25
    x0: tuple[float, ...] | None = None  # None: the first enqueued point, else the center

    def __post_init__(self) -> None:
        if self.popsize is not None and (not isinstance(self.popsize, int) or self.popsize < 2):
            raise ConfigError(f"cma option popsize must be an integer >= 2, got {self.popsize!r}")
        if not 0.0 < float(self.sigma0) <= 1.0:
            raise ConfigError(f"cma option sigma0 must be in (0, 1], got {self.sigma0!r}")
        if self.x0 is not None:
            object.__setattr__(self, "x0", check_point(self.x0, self.dim, "cma option x0"))


class CmaOptimizer:
    """pycma's CMAEvolutionStrategy on [0, 1]^d; fitness is maximized (pycma minimizes -f)."""

    name = "cma"
    n_objectives = 1

    def __init__(self, settings: CmaSettings, state_path: Path | None) -> None:
        self.dim = settings.dim
        self.settings = settings
        self._state_path = state_path  # saved after every ask and tell when set
        self._es: cma.CMAEvolutionStrategy | None = None  # created on the first ask
        self._queue: list[tuple[float, ...]] = []  # enqueued points waiting for a generation
        self._generation: list[Candidate] = []
        self._solutions: list[np.ndarray] = []  # what es.ask returned, for es.tell
        self._es_before_ask: bytes | None = None  # the generation's strategy before es.ask
        self._injected: list[tuple[float, ...]] = []  # the enqueued points in this generation
        self._handed_out = 0
        self._told: dict[int, tuple[float, ...] | None] = {}
        self._next_id = 0
        self._best: tuple[Candidate, tuple[float, ...]] | None = None

    # -- ask / tell -------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        if n < 0:
            raise OptimizerError(f"ask(n) needs n >= 0, got {n}")
        if not self._generation:
            self._start_generation()
        start = self._handed_out
        self._handed_out = min(len(self._generation), start + n)
        asked = self._generation[start : self._handed_out]
        if asked:
            self._autosave()
        return asked

    def tell(self, candidate_id: int, values: Sequence[float] | None) -> None:
        member = self._handed_out_member(candidate_id)
        told = check_values(candidate_id, values, self.n_objectives)
        self._told[candidate_id] = told
        if told is not None and (self._best is None or told[0] > self._best[1][0]):
            self._best = (member, told)
        if len(self._told) == len(self._generation):
            self._finish_generation()
        self._autosave()

    def enqueue(self, x: Sequence[float]) -> None:
        """Evaluate ``x`` as a member of the next generation that starts (injected into pycma)."""
        self._queue.append(check_point(x, self.dim, "enqueued point"))
        self._autosave()

    @property
    def pending(self) -> int:
        return self._handed_out - len(self._told)

    def unfinished(self) -> list[Candidate]:
        return [c for c in self._generation[: self._handed_out] if c.id not in self._told]

    def best(self) -> tuple[Candidate, tuple[float, ...]] | None:
        return self._best

    @property
    def mean(self) -> tuple[float, ...]:
        """The distribution mean in [0, 1]^d (before the first ask: where it will start)."""
        if self._es is None:
            return self._x0()
        return tuple(float(v) for v in self._es.boundary_handler.transform(self._es.mean))

    @property
    def generation(self) -> int:
        """How many generations have been told to pycma."""
        return 0 if self._es is None else int(self._es.countiter)

    # -- generations --------------------------------------------------------------------

    def _x0(self) -> tuple[float, ...]:
        if self.settings.x0 is not None:
            return self.settings.x0
        if self._queue:
            return self._queue[0]
        return (0.5,) * self.dim

    def _new_strategy(self) -> cma.CMAEvolutionStrategy:
        rng = np.random.RandomState(derive_seed(self.settings.seed))
        options: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "BoundaryHandler": cma.BoundTransform,
            "randn": rng.randn,
            "seed": np.nan,  # nan: pycma leaves numpy's global RNG alone
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no outcmaes/ files
        }
        if self.settings.popsize is not None:
            options["popsize"] = self.settings.popsize
        return cma.CMAEvolutionStrategy(list(self._x0()), self.settings.sigma0, options)

    def _start_generation(self) -> None:
        if self._es is None:
            self._es = self._new_strategy()
        injected = self._queue[: self._es.popsize]
        del self._queue[: self._es.popsize]
        self._es_before_ask = pickle.dumps(self._es, protocol=pickle.HIGHEST_PROTOCOL)
        self._injected = injected
        self._solutions = _sample(self._es, injected)
        points = [*injected, *(_clip_to_cube(s) for s in self._solutions[len(injected) :])]
        self._generation = [Candidate(self._next_id + i, x) for i, x in enumerate(points)]
        self._next_id += len(points)
        self._handed_out = 0
        self._told = {}

    def _finish_generation(self) -> None:
        assert self._es is not None
        costs = generation_costs([self._told[c.id] for c in self._generation])
        self._es.tell(self._solutions, costs)
        self._generation, self._solutions, self._handed_out, self._told = [], [], 0, {}
        self._es_before_ask, self._injected = None, []

    def _handed_out_member(self, candidate_id: int) -> Candidate:
        for member in self._generation[: self._handed_out]:
            if member.id == candidate_id:
                if candidate_id in self._told:
                    raise OptimizerError(f"candidate {candidate_id} was already told")
                return member
        first_current = self._generation[0].id if self._generation else self._next_id
        if 0 <= candidate_id < first_current:
            raise OptimizerError(f"candidate {candidate_id} was already told")
        raise OptimizerError(f"candidate {candidate_id} was never asked")

    # -- state --------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        state = {
            "format": STATE_FORMAT,
            "settings": asdict(self.settings),
            # mid-generation: the strategy before its ask (see the module docstring)
            "es": None if self._generation else self._es,
            "es_before_ask": self._es_before_ask if self._generation else None,
            "injected": self._injected,
            "queue": self._queue,
            "generation": self._generation,
            "solutions": self._solutions,
            "handed_out": self._handed_out,
            "told": self._told,
            "next_id": self._next_id,
            "best": self._best,
        }
        atomic_write_bytes(Path(path), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: Path, settings: CmaSettings, *, autosave: bool) -> CmaOptimizer:
        """Resume from a file written by ``save``; ``settings`` must match the saved ones."""
        path = Path(path)
        try:
            state = pickle.loads(path.read_bytes())
        except FileNotFoundError:
            raise OptimizerError(f"{path}: no saved cma state to resume from") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise OptimizerError(f"{path}: unreadable cma state ({e})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OptimizerError(f"{path}: not a cma state file of format {STATE_FORMAT}")
        saved = CmaSettings(**state["settings"])
        if saved != settings:
            raise ConfigError(f"{path}: saved cma run used {saved}, resume asked for {settings}")
        opt = cls(saved, path if autosave else None)
        opt._queue = state["queue"]
        opt._generation = state["generation"]
        if opt._generation:
            opt._es_before_ask, opt._injected = state["es_before_ask"], state["injected"]
            opt._es = pickle.loads(opt._es_before_ask)
            opt._solutions = _sample(opt._es, opt._injected)
            if not all(
                np.array_equal(a, b)
                for a, b in zip(opt._solutions, state["solutions"], strict=True)
            ):
                raise OptimizerError(f"{path}: replaying the saved generation gave other points")
        else:
            opt._es = state["es"]
        opt._handed_out = state["handed_out"]
        opt._told = state["told"]
        opt._next_id = state["next_id"]
        opt._best = state["best"]
        return opt

    def _autosave(self) -> None:
        if self._state_path is not None:
            self.save(self._state_path)


def _sample(
    es: cma.CMAEvolutionStrategy, injected: Sequence[tuple[float, ...]]
) -> list[np.ndarray]:
    """One generation's solutions: the injected points first, then sampled ones."""
    # pycma injects genotypes; the inverse bound transform makes the sampled
    # phenotype land exactly on the enqueued point, boundary points included.
    es.inject([es.boundary_handler.inverse(np.asarray(x)) for x in injected], force=True)
    return list(es.ask())


def generation_costs(told: Sequence[tuple[float, ...] | None]) -> list[float]:
    """pycma minimizes, so a member's cost is -fitness; a failed member (None) costs more
    than the generation's worst scored member. A generation that failed whole is flat."""
    scored = [-v[0] for v in told if v is not None]
    if not scored:
        return [0.0] * len(told)
    penalty = max(scored) + max(FAILURE_MARGIN, max(scored) - min(scored))
    return [penalty if v is None else -v[0] for v in told]


def _clip_to_cube(solution: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.clip(solution, 0.0, 1.0))
