"""Optimizers behind the ask/tell interface: search, bookkeeping, failures, warm starts, resume."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest

from evomerge.errors import ConfigError
from evomerge.optimize import (
    KINDS,
    Candidate,
    Optimizer,
    OptimizerError,
    load_optimizer,
    make_optimizer,
    state_path,
)
from evomerge.optimize.cma_es import CmaOptimizer, generation_costs
from evomerge.optimize.optuna_study import OptunaOptimizer

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIM = 4
TARGET = 0.3
SINGLE_OBJECTIVE_KINDS = [k for k in KINDS if k != "optuna-nsga2"]


def sphere(x: tuple[float, ...]) -> float:
    """Maximized at x = (0.3, ..., 0.3), where it is 0."""
    return -float(np.sum((np.asarray(x) - TARGET) ** 2))


def one_objective(x: tuple[float, ...]) -> tuple[float]:
    return (sphere(x),)


def two_objectives(x: tuple[float, ...]) -> tuple[float, float]:
    return sphere(x), -abs(x[0] - 0.8)


def ask_batch(opt: Optimizer, n: int) -> list[Candidate]:
    """Ask until ``n`` candidates are out or the optimizer must wait for tells."""
    batch: list[Candidate] = []
    while len(batch) < n:
        got = opt.ask(n - len(batch))
        if not got:
            break
        batch += got
    return batch


def run_batches(
    opt: Optimizer, n_batches: int, batch_size: int, objective=one_objective
) -> list[list[tuple[float, ...]]]:
    """Evaluate ``n_batches`` batches; returns each batch's told values."""
    history = []
    for _ in range(n_batches):
        batch = ask_batch(opt, batch_size)
        values = [objective(c.x) for c in batch]
        for c, v in zip(batch, values, strict=True):
            opt.tell(c.id, v)
        history.append(values)
    return history


# Small, fast settings that still let each kind learn within a few batches.
FAST_OPTIONS = {
    "cma": {"popsize": 8},
    "optuna-tpe": {"n_startup_trials": 8},
    "optuna-cmaes": {"popsize": 8},
    "optuna-gp": {"n_startup_trials": 8},
    "optuna-nsga2": {"population_size": 8},
    "random": {},
}
N_BATCHES = {
    "optuna-gp": 3
}  # each GP suggestion fits a model: keep it short (2 is too few to rely on)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_improves_over_its_first_batch(kind: str) -> None:
    n_objectives = 2 if kind == "optuna-nsga2" else 1
    objective = two_objectives if n_objectives == 2 else one_objective
    opt = make_optimizer(
        kind, DIM, seed=3, run_dir=None, n_objectives=n_objectives, **FAST_OPTIONS[kind]
    )
    assert isinstance(opt, Optimizer)
    assert (opt.name, opt.dim, opt.n_objectives) == (kind, DIM, n_objectives)

    history = run_batches(opt, N_BATCHES.get(kind, 6), 8, objective)

    first = [v[0] for v in history[0]]
    later = [v[0] for batch in history[1:] for v in batch]
    assert max(later) > max(first)
    if kind != "random":  # a model-based sampler moves its whole batch towards the optimum
        assert np.mean([v[0] for v in history[-1]]) > np.mean(first)
    best_candidate, best_values = opt.best()
    assert best_values == objective(best_candidate.x)
    if n_objectives == 1:
        assert best_values[0] == max(first + later)


@pytest.mark.parametrize("kind", ["cma", "optuna-tpe"])
def test_ids_are_unique_and_increasing_and_pending_counts_untold(kind: str) -> None:
    opt = make_optimizer(kind, DIM, seed=0, run_dir=None, **FAST_OPTIONS[kind])
    seen: list[int] = []
    for _ in range(3):
        batch = ask_batch(opt, 8)
        assert opt.pending == len(batch) == 8
        assert opt.unfinished() == batch
        seen += [c.id for c in batch]
        for told, c in enumerate(batch, start=1):
            opt.tell(c.id, (sphere(c.x),))
            assert opt.pending == len(batch) - told
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert all(len(c.x) == DIM and all(0.0 <= v <= 1.0 for v in c.x) for c in batch)


@pytest.mark.parametrize("kind", ["cma", "optuna-tpe"])
def test_telling_an_unknown_or_already_told_id_is_an_error(kind: str) -> None:
    opt = make_optimizer(kind, DIM, seed=0, run_dir=None, **FAST_OPTIONS[kind])
    first, second = opt.ask(2)
    with pytest.raises(OptimizerError, match="candidate 99 was never asked"):
        opt.tell(99, (0.0,))
    opt.tell(first.id, (0.5,))
    with pytest.raises(OptimizerError, match=f"candidate {first.id} was already told"):
        opt.tell(first.id, (0.5,))
    with pytest.raises(OptimizerError, match="got 2 value"):
        opt.tell(second.id, (0.5, 0.1))  # two values for one objective
    with pytest.raises(OptimizerError, match="sequence"):
        opt.tell(second.id, 0.5)  # type: ignore[arg-type]
    assert opt.pending == 1
    opt.tell(second.id, np.array([0.25]))  # any sequence of floats will do
    assert opt.pending == 0


def test_cma_ask_never_crosses_the_generation_boundary() -> None:
    opt = make_optimizer("cma", DIM, seed=0, run_dir=None, popsize=6)
    first = opt.ask(4)
    rest = opt.ask(4)
    assert (len(first), len(rest)) == (4, 2)
    assert opt.ask(1) == []  # the generation is out; pycma needs all six told
    for c in first + rest[:1]:
        opt.tell(c.id, (sphere(c.x),))
    assert opt.ask(3) == []
    assert opt.generation == 0
    opt.tell(rest[1].id, (sphere(rest[1].x),))
    assert opt.generation == 1
    next_generation = opt.ask(10)
    assert [c.id for c in next_generation] == list(range(6, 12))


def test_cma_failed_members_rank_last_and_a_fully_failed_generation_is_survivable() -> None:
    opt = make_optimizer("cma", DIM, seed=1, run_dir=None, popsize=6)
    batch = opt.ask(6)
    for i, c in enumerate(batch):
        opt.tell(c.id, None if i % 2 else (sphere(c.x),))  # every second one fails
    scored = [c for i, c in enumerate(batch) if i % 2 == 0]
    best_scored = max(scored, key=lambda c: sphere(c.x))
    assert opt.best() == (best_scored, (sphere(best_scored.x),))
    for c in opt.ask(6):
        opt.tell(c.id, (float("nan"),))  # non-finite counts as failed
    assert opt.generation == 2
    run_batches(opt, 3, 6)
    assert opt.generation == 5
    assert opt.best()[1][0] >= sphere(best_scored.x)


def test_cma_costs_negate_fitness_and_put_failures_below_the_worst_success() -> None:
    assert generation_costs([(0.5,), None, (0.2,), None]) == [-0.5, 0.8, -0.2, 0.8]
    assert generation_costs([(0.5,), (0.1,), None]) == [-0.5, -0.1, 0.9]
    assert generation_costs([(3.0,), (-7.0,), None]) == [-3.0, 7.0, 17.0]  # margin = spread
    assert generation_costs([None, None]) == [0.0, 0.0]


def test_optuna_failed_candidates_are_fail_trials_and_never_best() -> None:
    opt = make_optimizer("optuna-tpe", DIM, seed=0, run_dir=None)
    a, b, c = opt.ask(3)
    opt.tell(a.id, None)
    opt.tell(b.id, (float("inf"),))
    assert opt.best() is None
    opt.tell(c.id, (-5.0,))
    states = [t.state for t in opt.study.get_trials()]
    assert states == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.COMPLETE,
    ]
    assert opt.best() == (c, (-5.0,))


@pytest.mark.parametrize("kind", KINDS)
def test_enqueued_point_is_handed_out_first_and_exactly(kind: str) -> None:
    n_objectives = 2 if kind == "optuna-nsga2" else 1
    opt = make_optimizer(
        kind, DIM, seed=0, run_dir=None, n_objectives=n_objectives, **FAST_OPTIONS[kind]
    )
    warm = (0.0, 1.0, 0.25, 1.0)  # boundary coordinates must survive exactly
    opt.enqueue(warm)
    first, *others = opt.ask(3)
    assert first == Candidate(0, warm)
    assert all(c.x != warm for c in others)
    with pytest.raises(ConfigError, match="x1=1.5"):
        opt.enqueue((0.0, 1.5, 0.0, 0.0))
    with pytest.raises(ConfigError, match="3 coordinates"):
        opt.enqueue((0.0, 0.5, 0.0))


def test_cma_starts_at_the_first_enqueued_point_and_spreads_extra_points_over_generations() -> None:
    opt = make_optimizer("cma", DIM, seed=0, run_dir=None, popsize=4)
    warm = [
        (0.1, 0.2, 0.3, 0.4),
        (0.9, 0.9, 0.9, 0.9),
        (0.5, 0.0, 1.0, 0.5),
        (0.2,) * 4,
        (0.7,) * 4,
    ]
    for x in warm:
        opt.enqueue(x)
    assert opt.mean == warm[0]
    generation = opt.ask(4)
    assert [c.x for c in generation] == warm[:4]
    for c in generation:
        opt.tell(c.id, (sphere(c.x),))
    assert opt.ask(1)[0].x == warm[4]


def test_cma_resume_continues_ids_unfinished_members_and_the_same_search(tmp_path: Path) -> None:
    def tell_all(opt: CmaOptimizer, batch: list[Candidate]) -> None:
        for c in batch:
            opt.tell(c.id, (sphere(c.x),))

    uninterrupted = make_optimizer("cma", DIM, seed=5, run_dir=None, popsize=6)
    run_batches(uninterrupted, 2, 6)
    tell_all(uninterrupted, uninterrupted.ask(6))
    expected_mean = uninterrupted.mean
    expected_next = uninterrupted.ask(6)

    crashed = make_optimizer("cma", DIM, seed=5, run_dir=tmp_path, popsize=6)
    run_batches(crashed, 2, 6)
    asked = crashed.ask(6)
    tell_all(crashed, asked[:2])
    del crashed  # the run dies with four members evaluated by no one

    resumed = load_optimizer("cma", DIM, seed=5, run_dir=tmp_path, popsize=6)
    assert resumed.unfinished() == asked[2:]
    assert resumed.pending == 4
    assert resumed.ask(1) == []  # nothing new until the unfinished members are told
    np.random.seed(0)  # whatever happens to numpy's global RNG must not matter
    tell_all(resumed, resumed.unfinished())
    assert resumed.mean == pytest.approx(expected_mean, abs=1e-12)
    assert resumed.ask(6) == expected_next


def test_cma_resume_in_a_new_process_continues_the_same_search(tmp_path: Path) -> None:
    """pycma keys genotypes by a hash Python salts per process: a resume is a new process."""
    import json
    import os
    import subprocess
    import sys

    uninterrupted = make_optimizer("cma", DIM, seed=5, run_dir=None, popsize=6)
    run_batches(uninterrupted, 3, 6)
    expected = [c.x for c in uninterrupted.ask(6)]

    crashed = make_optimizer("cma", DIM, seed=5, run_dir=tmp_path, popsize=6)
    run_batches(crashed, 2, 6)
    for c in crashed.ask(3):  # killed mid-generation: 3 members told, 3 never handed out
        crashed.tell(c.id, (sphere(c.x),))
    del crashed

    script = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_optimize import sphere, ask_batch
from evomerge.optimize import load_optimizer
opt = load_optimizer("cma", {DIM}, seed=5, run_dir={str(tmp_path)!r}, popsize=6)
for c in ask_batch(opt, 3):
    opt.tell(c.id, (sphere(c.x),))
print(json.dumps([c.x for c in opt.ask(6)]))
"""
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [tuple(x) for x in json.loads(out)] == expected


def test_cma_save_writes_a_loadable_file_atomically(tmp_path: Path) -> None:
    opt = make_optimizer("cma", DIM, seed=2, run_dir=None, popsize=6)
    run_batches(opt, 1, 6)
    path = tmp_path / "elsewhere" / "cma.pkl"
    opt.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["cma.pkl"]  # no temp file left
    state = pickle.loads(path.read_bytes())
    assert state["next_id"] == 6 and state["es"].countiter == 1


def test_cma_resume_refuses_other_settings_and_missing_state(tmp_path: Path) -> None:
    opt = make_optimizer("cma", DIM, seed=5, run_dir=tmp_path, popsize=6)
    opt.ask(2)
    assert state_path("cma", tmp_path).is_file()
    with pytest.raises(ConfigError, match="popsize=6"):
        load_optimizer("cma", DIM, seed=5, run_dir=tmp_path, popsize=8)
    with pytest.raises(OptimizerError, match="no saved cma state"):
        load_optimizer("cma", DIM, seed=5, run_dir=tmp_path / "other")


def test_optuna_resume_keeps_finished_trials_and_offers_running_ones(tmp_path: Path) -> None:
    opt = make_optimizer("random", DIM, seed=7, run_dir=tmp_path)
    run_batches(opt, 1, 5)
    lost = opt.ask(2)
    first_points = [t.params for t in opt.study.get_trials()][:5]
    best_before = opt.best()
    del opt  # crash: trials 5 and 6 stay RUNNING in study.db

    resumed = load_optimizer("random", DIM, seed=7, run_dir=tmp_path)
    assert isinstance(resumed, OptunaOptimizer)
    finished = resumed.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in finished] == [0, 1, 2, 3, 4]
    assert resumed.best() == best_before
    assert resumed.unfinished() == lost and resumed.pending == 2
    for c in lost:
        resumed.tell(c.id, (sphere(c.x),))
    (new,) = resumed.ask()
    assert new.id == 7
    assert {f"x{i}": v for i, v in enumerate(new.x)} not in first_points  # no replayed draw


@pytest.mark.parametrize("kind", ["random", "optuna-tpe", "optuna-cmaes", "optuna-nsga2"])
def test_optuna_resume_asks_what_the_uninterrupted_study_asks(kind: str, tmp_path: Path) -> None:
    n_objectives = 2 if kind == "optuna-nsga2" else 1
    objective = two_objectives if n_objectives == 2 else one_objective
    options = {**FAST_OPTIONS[kind], **({"n_startup_trials": 4} if kind == "optuna-tpe" else {})}

    def make(run_dir: Path | None) -> Optimizer:
        return make_optimizer(
            kind, DIM, seed=3, run_dir=run_dir, n_objectives=n_objectives, **options
        )

    uninterrupted = make(None)
    run_batches(uninterrupted, 14, 1, objective)
    expected = [c.x for c in uninterrupted.unfinished() + [t for t in uninterrupted.ask(1)]]

    crashed = make(tmp_path)
    run_batches(crashed, 9, 1, objective)
    lost = crashed.ask(1)  # asked, committed RUNNING, never told
    del crashed
    resumed = load_optimizer(
        kind, DIM, seed=3, run_dir=tmp_path, n_objectives=n_objectives, **options
    )
    assert resumed.unfinished() == lost
    for c in lost:
        resumed.tell(c.id, objective(c.x))
    run_batches(resumed, 4, 1, objective)
    points = [tuple(t.params[f"x{i}"] for i in range(DIM)) for t in resumed.study.get_trials()]
    first = [tuple(t.params[f"x{i}"] for i in range(DIM)) for t in uninterrupted.study.get_trials()]
    assert points == first[: len(points)] and len(points) == 14
    assert resumed.ask(1)[0].x == expected[0]


def test_optuna_study_file_is_a_plain_optuna_study(tmp_path: Path) -> None:
    opt = make_optimizer("optuna-tpe", DIM, seed=0, run_dir=tmp_path)
    run_batches(opt, 1, 3)
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.trials[0].distributions["x3"] == optuna.distributions.FloatDistribution(0, 1)
    with pytest.raises(OptimizerError, match="already exists"):
        make_optimizer("optuna-tpe", DIM, seed=0, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="dim=4"):
        load_optimizer("optuna-tpe", DIM + 1, seed=0, run_dir=tmp_path)


def test_optuna_in_memory_study_saves_to_a_resumable_file(tmp_path: Path) -> None:
    opt = make_optimizer("optuna-tpe", DIM, seed=0, run_dir=None)
    run_batches(opt, 1, 4)
    running = opt.ask()
    opt.save(tmp_path / "study.db")
    assert [p.name for p in tmp_path.iterdir()] == ["study.db"]
    resumed = load_optimizer("optuna-tpe", DIM, seed=0, run_dir=tmp_path)
    assert len(resumed.study.trials) == 5
    assert resumed.unfinished() == running


def test_nsga2_takes_two_objectives_and_reports_a_pareto_optimal_best() -> None:
    opt = make_optimizer(
        "optuna-nsga2", DIM, seed=0, run_dir=None, n_objectives=2, population_size=6
    )
    run_batches(opt, 3, 6, two_objectives)
    front = opt.pareto_front()
    best_candidate, best_values = opt.best()
    assert (best_candidate, best_values) in front
    assert best_values == two_objectives(best_candidate.x)
    (c,) = opt.ask()
    with pytest.raises(OptimizerError, match="2 objective"):
        opt.tell(c.id, (0.0,))


@pytest.mark.parametrize(
    ("kind", "n_objectives", "message"),
    [
        ("cma", 2, "cma optimizes one objective"),
        ("optuna-cmaes", 2, "optuna-cmaes optimizes one objective"),
        ("optuna-nsga2", 1, "n_objectives >= 2"),
    ],
)
def test_objective_count_must_suit_the_kind(kind: str, n_objectives: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_optimizer(kind, DIM, seed=0, run_dir=None, n_objectives=n_objectives)


def test_unknown_kind_and_options_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown optimizer kind 'bayes'; valid: cma, optuna-tpe"):
        make_optimizer("bayes", DIM, seed=0, run_dir=None)
    with pytest.raises(ConfigError, match="cma: unknown option.*popsize, sigma0, x0"):
        make_optimizer("cma", DIM, seed=0, run_dir=None, population_size=8)
    with pytest.raises(ConfigError, match="optuna-nsga2: unknown option.*population_size"):
        make_optimizer("optuna-nsga2", DIM, seed=0, run_dir=None, n_objectives=2, popsize=8)
    with pytest.raises(ConfigError, match="sigma0"):
        make_optimizer("cma", DIM, seed=0, run_dir=None, sigma0=0.0)
    with pytest.raises(ConfigError, match="dim"):
        make_optimizer("random", 0, seed=0, run_dir=None)


def test_cma_sampling_ignores_numpy_global_rng() -> None:
    """lm-eval reseeds numpy's global RNG on every evaluation; the search must not repeat."""

    def points(reseed: bool) -> list[tuple[float, ...]]:
        opt = make_optimizer("cma", DIM, seed=4, run_dir=None, popsize=6)
        xs = []
        for _ in range(3):
            if reseed:
                np.random.seed(1234)
            batch = opt.ask(6)
            xs += [c.x for c in batch]
            for c in batch:
                opt.tell(c.id, (sphere(c.x),))
        return xs

    assert points(reseed=True) == points(reseed=False)


@pytest.mark.parametrize("kind", ["random", "optuna-tpe"])
def test_optuna_resume_after_a_kill_inside_ask_completes_that_ask(
    kind: str, tmp_path: Path
) -> None:
    """study.ask creates the trial, then sets its params one by one: a kill in between leaves a
    RUNNING trial with none or some of them, which the resumed run completes as that ask would have."""
    options = {**FAST_OPTIONS[kind], **({"n_startup_trials": 4} if kind == "optuna-tpe" else {})}
    uninterrupted = make_optimizer(kind, DIM, seed=3, run_dir=None, **options)
    run_batches(uninterrupted, 10, 1, one_objective)
    expected = [t for t in uninterrupted.study.get_trials() if t.number == 9][0]

    crashed = make_optimizer(kind, DIM, seed=3, run_dir=tmp_path, **options)
    run_batches(crashed, 9, 1, one_objective)
    crashed.study._storage.create_new_trial(
        crashed.study._study_id
    )  # killed before any param was set
    del crashed
    resumed = load_optimizer(kind, DIM, seed=3, run_dir=tmp_path, **options)
    (lost,) = resumed.unfinished()
    assert lost.id == 9 and lost.x == tuple(expected.params[f"x{i}"] for i in range(DIM))
