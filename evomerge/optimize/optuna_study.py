"""Optuna samplers behind the ask/tell interface.

One study named "evomerge", every direction "maximize", one parameter ``x{i}`` per
coordinate as ``FloatDistribution(0, 1)``. A candidate's id is its trial number, so
``tell`` goes straight to ``study.tell(number, ...)``. A failed candidate is told as
``TrialState.FAIL``: samplers leave failed trials out of their models, so a failure
never looks better than a success.

With a run directory the study lives in ``run_dir/study.db`` (SQLite; optuna-dashboard
reads it), and every ask and tell is committed as it happens, which is what makes a
resume possible. Trials a crashed run asked but never told stay RUNNING in the file;
after a resume ``unfinished()`` offers them again.

Each ``ask`` samples with a sampler seeded from (seed, trials in the study so far), not
from one random stream that lives only in memory: a resumed run, given the same tells,
asks exactly the points the uninterrupted run would have asked.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers import (
    BaseSampler,
    CmaEsSampler,
    GPSampler,
    NSGAIISampler,
    RandomSampler,
    TPESampler,
)
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import ConfigError
from evomerge.optimize.base import (
    Candidate,
    OptimizerError,
    check_point,
    check_values,
    derive_seed,
)

STUDY_NAME = "evomerge"
STUDY_FILE = "study.db"
DIM_ATTR = "evomerge_dim"

SAMPLERS: dict[str, type[BaseSampler]] = {
    "optuna-tpe": TPESampler,
    "optuna-cmaes": CmaEsSampler,
    "optuna-gp": GPSampler,
    "optuna-nsga2": NSGAIISampler,
    "random": RandomSampler,
}
# Packages a sampler imports only when it first samples; checked up front instead.
SAMPLER_REQUIRES: dict[str, tuple[str, ...]] = {
    "optuna-cmaes": ("cmaes",),
    "optuna-gp": ("scipy", "torch"),
}
SINGLE_OBJECTIVE_ONLY = {"optuna-cmaes"}
MULTI_OBJECTIVE_ONLY = {"optuna-nsga2"}
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def sampler_options(kind: str) -> list[str]:
    """The keyword options ``kind``'s sampler accepts (its constructor's, less ``seed``)."""
    signature = inspect.signature(SAMPLERS[kind].__init__)
    return sorted(p for p in signature.parameters if p not in ("self", "seed"))


def check_sampler(kind: str, n_objectives: int, options: dict[str, Any]) -> None:
    """Fail early, with the fix in the message, on what the sampler would reject later."""
    valid = sampler_options(kind)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"{kind}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    missing = [m for m in SAMPLER_REQUIRES.get(kind, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{kind} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    if kind in SINGLE_OBJECTIVE_ONLY and n_objectives != 1:
        raise ConfigError(f"{kind} optimizes one objective, got n_objectives={n_objectives}")
    if kind in MULTI_OBJECTIVE_ONLY and n_objectives < 2:
        raise ConfigError(
            f"{kind} is for n_objectives >= 2, got {n_objectives}; use optuna-tpe or cma"
        )


class OptunaOptimizer:
    """An Optuna study driven through ``ask``/``tell`` by trial number."""

    def __init__(
        self,
        kind: str,
        dim: int,
        n_objectives: int,
        study: optuna.Study,
        db: Path | None,
        *,
        seed: int,
        options: dict[str, Any],
    ) -> None:
        self.name = kind
        self.dim = dim
        self.n_objectives = n_objectives
        self.study = study
        self._db = db
        self._seed = seed
        self._options = dict(options)
        self._distributions = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(dim)}
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self._pending: dict[int, Candidate] = {
            t.number: self._candidate(self._finish_ask(t)) for t in running
        }

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        kind: str,
        dim: int,
        *,
        seed: int,
        run_dir: Path | None,
        n_objectives: int,
        options: dict[str, Any],
    ) -> OptunaOptimizer:
        check_sampler(kind, n_objectives, options)
        db = None if run_dir is None else Path(run_dir) / STUDY_FILE
        if db is not None and db.exists():
            raise OptimizerError(f"{db} already exists; resume it with load_optimizer")
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            storage=None if db is None else _sqlite_url(db),
            sampler=_sampler(kind, seed, 0, options),
            study_name=STUDY_NAME,
            directions=["maximize"] * n_objectives,
        )
        study.set_user_attr(DIM_ATTR, dim)
        return cls(kind, dim, n_objectives, study, db, seed=seed, options=options)

    @classmethod
    def load(
        cls,
        kind: str,
        dim: int,
        *,
        seed: int,
        run_dir: Path,
        n_objectives: int,
        options: dict[str, Any],
    ) -> OptunaOptimizer:
        """Reopen ``run_dir/study.db``; it goes on asking what the first run would have."""
        check_sampler(kind, n_objectives, options)
        db = Path(run_dir) / STUDY_FILE
        if not db.is_file():
            raise OptimizerError(f"{db}: no study to resume from")
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=_sqlite_url(db))
        except KeyError:
            raise OptimizerError(f"{db}: has no study named {STUDY_NAME!r}") from None
        saved_dim = study.user_attrs.get(DIM_ATTR)
        if saved_dim != dim:
            raise ConfigError(f"{db}: study searched dim={saved_dim}, resume asked for {dim}")
        if len(study.directions) != n_objectives:
            raise ConfigError(
                f"{db}: study has {len(study.directions)} objective(s), "
                f"resume asked for {n_objectives}"
            )
        study.sampler = _sampler(kind, seed, len(study.get_trials(deepcopy=False)), options)
        return cls(kind, dim, n_objectives, study, db, seed=seed, options=options)

    # -- ask / tell -------------------------------------------------------------------

    def ask(self, n: int = 1) -> list[Candidate]:
        if n < 0:
            raise OptimizerError(f"ask(n) needs n >= 0, got {n}")
        asked = []
        for _ in range(n):
            n_trials = len(self.study.get_trials(deepcopy=False))
            self.study.sampler = _sampler(self.name, self._seed, n_trials, self._options)
            trial = self.study.ask(self._distributions)
            candidate = Candidate(trial.number, tuple(trial.params[k] for k in self._distributions))
            self._pending[candidate.id] = candidate
            asked.append(candidate)
        return asked

    def tell(self, candidate_id: int, values: Sequence[float] | None) -> None:
        if candidate_id not in self._pending:
            finished = self.study.get_trials(deepcopy=False, states=FINISHED_STATES)
            if any(t.number == candidate_id for t in finished):
                raise OptimizerError(f"candidate {candidate_id} was already told")
            raise OptimizerError(f"candidate {candidate_id} was never asked")
        told = check_values(candidate_id, values, self.n_objectives)
        if told is None:
            self.study.tell(candidate_id, state=TrialState.FAIL)
        else:
            self.study.tell(candidate_id, list(told))
        del self._pending[candidate_id]

    def enqueue(self, x: Sequence[float]) -> None:
        """The next ``ask`` hands out ``x`` (``study.enqueue_trial``), before sampled points."""
        point = check_point(x, self.dim, "enqueued point")
        self.study.enqueue_trial({f"x{i}": v for i, v in enumerate(point)})

    @property
    def pending(self) -> int:
        return len(self._pending)

    def unfinished(self) -> list[Candidate]:
        return [self._pending[i] for i in sorted(self._pending)]

    def best(self) -> tuple[Candidate, tuple[float, ...]] | None:
        """Single objective: the best trial. Several: the Pareto-optimal trial with the
        highest mean over objectives (ties: the earliest)."""
        front = self.pareto_front()
        if not front:
            return None
        return max(front, key=lambda cv: (sum(cv[1]) / len(cv[1]), -cv[0].id))

    def pareto_front(self) -> list[tuple[Candidate, tuple[float, ...]]]:
        """The non-dominated completed trials (for one objective: the best one)."""
        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return []
        return [(self._candidate(t), tuple(t.values)) for t in self.study.best_trials]

    # -- state --------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the study to an SQLite file at ``path``.

        The study's own file needs nothing: every ask and tell is already committed.
        Any other path (or an in-memory study) gets a copy, written to a temporary file
        and moved into place.
        """
        path = Path(path)
        if self._db is not None and path.resolve() == self._db.resolve():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        tmp.unlink()  # the copy creates its own database file
        storage = optuna.storages.RDBStorage(_sqlite_url(tmp))
        try:
            copy = optuna.create_study(
                storage=storage, study_name=STUDY_NAME, directions=self.study.directions
            )
            for key, value in self.study.user_attrs.items():
                copy.set_user_attr(key, value)
            copy.add_trials(self.study.get_trials(deepcopy=False))
            storage.engine.dispose()
            os.replace(tmp, path)
        except BaseException:
            storage.engine.dispose()
            tmp.unlink(missing_ok=True)
            raise

    def _finish_ask(self, frozen: FrozenTrial) -> FrozenTrial:
        """A trial the driver was killed while asking (in the study, without all its params) gets
        them now, from the sampler as it was at that ask: the resumed run asks what it would have."""
        if len(frozen.params) == self.dim:
            return frozen
        self.study.sampler = _sampler(self.name, self._seed, frozen.number, self._options)
        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        for name, distribution in self._distributions.items():
            trial.suggest_float(name, distribution.low, distribution.high)
        return self.study._storage.get_trial(frozen._trial_id)

    def _candidate(self, trial: FrozenTrial) -> Candidate:
        return Candidate(trial.number, tuple(float(trial.params[f"x{i}"]) for i in range(self.dim)))


def _sampler(kind: str, seed: int, n_trials: int, options: dict[str, Any]) -> BaseSampler:
    """The sampler for the study's next trial: its seed depends on how many trials came before."""
    return SAMPLERS[kind](seed=derive_seed(seed, n_trials), **options)


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"
