"""The Pareto front and the rules that pick one member: against a brute-force filter and by hand."""

from __future__ import annotations

import itertools
import random

import pytest

from evomerge import pareto
from evomerge.errors import ConfigError
from evomerge.run_dir import TrialRecord
from evomerge.search_config import parse_search_config


def brute_force_front(points, directions):
    """Index i is on the front iff no j is >= on every objective and > on one (directions applied)."""
    signs = [1 if d == "maximize" else -1 for d in directions]

    def better_or_equal(a, b):
        return all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True))

    def strictly_better_somewhere(a, b):
        return any(s * x > s * y for s, x, y in zip(signs, a, b, strict=True))

    return [
        i
        for i, p in enumerate(points)
        if not any(
            better_or_equal(q, p) and strictly_better_somewhere(q, p)
            for j, q in enumerate(points)
            if j != i
        )
    ]


@pytest.mark.parametrize("seed", range(40))
def test_front_equals_brute_force_on_random_sets_with_ties_and_minimized_objectives(seed):
    rng = random.Random(seed)
    k = rng.choice([2, 3, 4])
    directions = [rng.choice(["maximize", "minimize"]) for _ in range(k)]
    n = rng.randint(1, 60)
    # few distinct values: many ties, duplicated points and points equal on some objectives
    points = [tuple(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(k)) for _ in range(n)]
    assert pareto.non_dominated(points, directions) == brute_force_front(points, directions)


def test_equal_points_are_both_on_the_front_and_a_dominated_copy_is_not():
    points = [(0.5, 0.5), (0.5, 0.5), (0.5, 0.4), (0.9, 0.1)]
    assert pareto.non_dominated(points) == [0, 1, 3]
    assert pareto.non_dominated(points, ["minimize", "minimize"]) == [2, 3]
    assert pareto.dominates((0.5, 0.5), (0.5, 0.4)) and not pareto.dominates((0.5, 0.5), (0.5, 0.5))
    assert pareto.dominates((1.0, 2.0), (1.0, 3.0), ["maximize", "minimize"])


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="point 1 has 3 objectives, expected 2"):
        pareto.non_dominated([(1, 2), (1, 2, 3)])
    with pytest.raises(ValueError, match="NaN"):
        pareto.non_dominated([(1.0, float("nan"))])
    with pytest.raises(ValueError, match="direction 'up'"):
        pareto.non_dominated([(1.0, 2.0)], ["maximize", "up"])


def _trial(i, acc, ppl, *, failed=False):
    """A trials.jsonl record as the search writes it: perplexity is lower-is-better, so its
    objective is negated (what `Scorer.objectives` does)."""
    if failed:
        return TrialRecord(i, "failed", None)
    return TrialRecord(
        i,
        "ok",
        (acc - ppl) / 2,
        objectives=(acc, -ppl),
        metrics={"qa": {"acc": acc}, "lm": {"ppl": ppl}},
    )


def test_trial_front_with_a_lower_is_better_metric_equals_brute_force_on_the_raw_metrics():
    rng = random.Random(7)
    trials = [
        _trial(i, rng.choice([0.2, 0.4, 0.6, 0.8]), rng.choice([5.0, 7.5, 10.0]), failed=i % 7 == 3)
        for i in range(50)
    ]
    rng.shuffle(trials)  # the front is in id order whatever the log order
    ok = sorted((t for t in trials if t.fitness is not None), key=lambda t: t.id)
    raw = [(t.metrics["qa"]["acc"], t.metrics["lm"]["ppl"]) for t in ok]
    expected = [ok[i].id for i in brute_force_front(raw, ["maximize", "minimize"])]
    assert [t.id for t in pareto.trial_front(trials)] == expected
    assert all(t.fitness is not None for t in pareto.trial_front(trials))


def test_the_search_loops_incremental_front_equals_the_front_of_every_prefix():
    rng = random.Random(3)
    trials = [
        _trial(i, rng.random(), rng.choice([1.0, 2.0, 3.0]), failed=rng.random() < 0.2)
        for i in range(80)
    ]
    front: list = []
    for n, t in enumerate(trials, start=1):
        front = pareto.updated_front(front, t)
        assert [m.id for m in front] == [m.id for m in pareto.trial_front(trials[:n])]


def _member(i, *values, fitness=None):
    return TrialRecord(
        i, "ok", sum(values) / len(values) if fitness is None else fitness, objectives=values
    )


def test_each_rule_picks_its_member():
    # A: best at the first task; B: good at both; C: best mean, poor at the second task
    a, b, c = _member(1, 0.9, 0.1), _member(2, 0.45, 0.45), _member(3, 0.99, 0.05)
    front = [a, b, c]
    assert pareto.select(front, "weighted-mean") is c
    assert pareto.select(front, "maximin") is b
    # rescaled to [0, 1] over the front, A is (0.17, 0.875) short of the ideal (0.89); B and C 1.0
    assert pareto.select(front, "closest-to-ideal") is a
    assert pareto.picked_by(front) == {
        3: ["weighted-mean"],
        2: ["maximin"],
        1: ["closest-to-ideal"],
    }


def test_ties_go_to_the_higher_mean_then_the_earlier_trial():
    front = [_member(4, 0.5, 0.5), _member(2, 0.5, 0.5), _member(9, 0.5, 0.7)]
    assert pareto.select(front, "maximin").id == 9  # equal minimum, higher mean
    assert pareto.select(front[:2], "maximin").id == 2
    assert pareto.select(front[:2], "weighted-mean").id == 2
    assert pareto.select([], "maximin") is None


def test_weighted_mean_on_the_front_is_the_highest_fitness_of_all_trials():
    """Today's rule, unchanged: with positive weights the best mean is never dominated."""
    rng = random.Random(11)
    weights = (1.0, 2.0, 0.5)
    trials = []
    for i in range(100):
        values = [rng.choice([0.1, 0.3, 0.5, 0.7]) for _ in weights]
        fitness = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
        trials.append(_member(i, *values, fitness=fitness))
    best = max(trials, key=lambda t: (t.fitness, -t.id))
    assert pareto.select(pareto.trial_front(trials), "weighted-mean") is best


def test_select_rule_in_the_search_config():
    base = {
        "models": ["m"],
        "space": {"methods": ["ties"], "knobs": {"weight": None}},
        "tasks": ["a", "b"],
    }
    assert parse_search_config(base).optimizer.select == "weighted-mean"
    for rule in pareto.RULES:
        assert (
            parse_search_config(
                {**base, "optimizer": {"kind": "optuna-nsga2", "select": rule}}
            ).optimizer.select
            == rule
        )
    with pytest.raises(ConfigError, match="optimizer.select"):
        parse_search_config({**base, "optimizer": {"select": "median"}})
    with pytest.raises(ValueError, match="unknown selection rule 'median'"):
        pareto.select([_member(0, 1.0, 1.0)], "median")


def test_every_rule_picks_a_front_member():
    rng = random.Random(5)
    for _ in range(20):
        trials = [_member(i, *(rng.random() for _ in range(3))) for i in range(30)]
        front = pareto.trial_front(trials)
        for rule in pareto.RULES:
            assert pareto.select(front, rule) in front
        # and no rule can be beaten on every objective by another trial
        for t, u in itertools.product(front, trials):
            assert not pareto.dominates(u.objectives, t.objectives)
