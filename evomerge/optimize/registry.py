"""The one place that maps an optimizer kind to its adapter, fresh or resumed.

Where each kind keeps its state inside a run directory (``state_path``):

* ``cma``: ``cma_state.pkl``, a pickle of pycma's strategy plus the generation
  bookkeeping, rewritten atomically after every ask, tell and enqueue.
* ``optuna-*`` and ``random``: ``study.db``, the Optuna study in SQLite, committed by
  Optuna on every ask and tell.

Options per kind (everything else is a ConfigError):

* ``cma``: ``popsize`` (pycma's default 4 + 3 ln d), ``sigma0`` (0.25), ``x0`` (the
  first enqueued point, else the center).
* Optuna kinds: the sampler's own constructor keywords, verbatim (``population_size``
  for optuna-nsga2, ``n_startup_trials`` for optuna-tpe, ``popsize``/``sigma0`` for
  optuna-cmaes, ...); the seed is always evomerge's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.optimize.base import Optimizer
from evomerge.optimize.cma_es import CmaOptimizer, CmaSettings
from evomerge.optimize.optuna_study import SAMPLERS, STUDY_FILE, OptunaOptimizer

CMA_STATE_FILE = "cma_state.pkl"
CMA_OPTIONS = ("popsize", "sigma0", "x0")
KINDS = ("cma", *SAMPLERS)


def state_path(kind: str, run_dir: Path) -> Path:
    """The file in ``run_dir`` that holds ``kind``'s state and that ``load_optimizer`` reads."""
    _check_kind(kind)
    return Path(run_dir) / (CMA_STATE_FILE if kind == "cma" else STUDY_FILE)


def make_optimizer(
    kind: str,
    dim: int,
    *,
    seed: int,
    run_dir: Path | None,
    n_objectives: int = 1,
    **options: Any,
) -> Optimizer:
    """A fresh optimizer over [0, 1]^dim; with ``run_dir`` its state is kept there."""
    _check_common(kind, dim, n_objectives)
    if kind == "cma":
        settings = _cma_settings(dim, seed, n_objectives, options)
        path = None if run_dir is None else state_path(kind, run_dir)
        return CmaOptimizer(settings, path)
    return OptunaOptimizer.create(
        kind, dim, seed=seed, run_dir=run_dir, n_objectives=n_objectives, options=options
    )


def load_optimizer(
    kind: str,
    dim: int,
    *,
    seed: int,
    run_dir: Path,
    n_objectives: int = 1,
    **options: Any,
) -> Optimizer:
    """Resume the optimizer saved in ``run_dir``, created with the same arguments.

    Candidates the interrupted run asked but never told come back from ``unfinished()``.
    """
    _check_common(kind, dim, n_objectives)
    if kind == "cma":
        settings = _cma_settings(dim, seed, n_objectives, options)
        return CmaOptimizer.load(state_path(kind, run_dir), settings, autosave=True)
    return OptunaOptimizer.load(
        kind, dim, seed=seed, run_dir=run_dir, n_objectives=n_objectives, options=options
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown optimizer kind {kind!r}; valid: {', '.join(KINDS)}")


def _check_common(kind: str, dim: int, n_objectives: int) -> None:
    _check_kind(kind)
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"optimizer dim must be a positive integer, got {dim!r}")
    if not isinstance(n_objectives, int) or n_objectives < 1:
        raise ConfigError(f"n_objectives must be a positive integer, got {n_objectives!r}")


def _cma_settings(dim: int, seed: int, n_objectives: int, options: dict[str, Any]) -> CmaSettings:
    if n_objectives != 1:
        raise ConfigError(f"cma optimizes one objective, got n_objectives={n_objectives}")
    unknown = sorted(set(options) - set(CMA_OPTIONS))
    if unknown:
        raise ConfigError(
            f"cma: unknown option(s) {', '.join(unknown)}; valid: {', '.join(CMA_OPTIONS)}"
        )
    return CmaSettings(dim=dim, seed=seed, **options)
