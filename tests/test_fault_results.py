"""Faults that must never turn into a wrong result: non-finite models, loads that fail, a search
in which nothing scored, a driver killed mid-generation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from procs import cli_env, search_command, wait_for
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import CheckpointError, ScoringError, SearchFailedError
from evomerge.evaluate import Scorer
from evomerge.io.reader import ModelReader
from evomerge.recipe import Recipe
from evomerge.run import search
from evomerge.run_dir import read_trials
from evomerge.workers import CandidateEvaluator, Job, WorkerSetup, make_pool

GEN_TASK = {"name": "zoo_shift_dev_gen", "metric": "exact_match"}


def config_file(tmp_path: Path, zoo, name: str = "search.yaml", **overrides) -> Path:
    config = {
        "models": [str(zoo.specialists[s]) for s in zoo.skills],
        "base_model": str(zoo.base),
        "space": {
            "methods": ["task_arithmetic"],
            "layer_granularity": 2,
            "knobs": {"weight": {"low": 0.0, "high": 1.0}},
        },
        "tasks": ["zoo_addition_dev", "zoo_reversal_dev"],
        "limit": 4,
        "optimizer": {"kind": "cma", "popsize": 4, "seed": 0},
        "budget": {"max_evals": 4},
        "workers": 0,
        **overrides,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def task_arithmetic(zoo, weight: float, dtype: str = "float32") -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo.base),
        "dtype": dtype,
        "models": [
            {"model": str(zoo.specialists[s]), "parameters": {"weight": weight}} for s in zoo.skills
        ],
    }


@pytest.fixture(scope="module")
def evaluator(quick_zoo) -> CandidateEvaluator:
    models = (str(quick_zoo.base), *(str(quick_zoo.specialists[s]) for s in quick_zoo.skills))
    setup = WorkerSetup(
        models=models,
        reference_model=str(quick_zoo.base),
        tasks=("zoo_addition_dev",),
        limit=4,
        device="cpu",
    )
    return CandidateEvaluator(setup)


# ---- non-finite models -----------------------------------------------------------------


class _FakeLM:
    """Stands in for any backend's lm-eval LM: only its responses matter to the check."""

    def __init__(self, logprob: float):
        self.logprob = logprob

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(self.logprob, False) for _ in requests]

    def generate_until(self, requests, disable_tqdm=False):
        return ["" for _ in requests]


def test_scorer_refuses_non_finite_loglikelihoods_whatever_the_backend(evaluator, monkeypatch):
    scorer = evaluator.scorer
    monkeypatch.setattr(scorer, "_lm", lambda model, tokenizer: _FakeLM(float("nan")))
    with pytest.raises(
        ScoringError, match=r"task zoo_addition_dev: 16 of 16 log-likelihoods are not finite"
    ):
        scorer.score(evaluator.model, evaluator.tokenizer)
    monkeypatch.setattr(scorer, "_lm", lambda model, tokenizer: _FakeLM(-1.0))
    assert math.isfinite(scorer.score(evaluator.model, evaluator.tokenizer).fitness)


def test_generation_only_tasks_get_a_loglikelihood_probe(monkeypatch):
    scorer = Scorer([GEN_TASK], limit=2)
    assert all(
        i.request_type == "generate_until" for p in scorer.tasks.values() for i in p.task.instances
    )
    for bad in (float("nan"), float("-inf")):
        monkeypatch.setattr(scorer, "_lm", lambda model, tokenizer, bad=bad: _FakeLM(bad))
        with pytest.raises(
            ScoringError, match="task zoo_shift_dev_gen: 1 of 1 log-likelihoods are not finite"
        ):
            scorer.score("unused")
    monkeypatch.setattr(scorer, "_lm", lambda model, tokenizer: _FakeLM(-2.0))
    assert scorer.score("unused").fitness == 0.0


def test_float16_overflowing_merges_fail_and_never_become_best(quick_zoo, tmp_path):
    """The issue's case: float16 task arithmetic with weights up to 1000 gives NaN logits."""
    config = config_file(
        tmp_path,
        quick_zoo,
        dtype="float16",
        tasks=["zoo_addition_dev"],
        space={
            "methods": ["task_arithmetic"],
            "layer_granularity": 2,
            "knobs": {"weight": {"low": 0.0, "high": 1000.0}},
        },
        warm_start=[task_arithmetic(quick_zoo, 0.3, "float16")],  # finite: the one that can win
    )
    summary = search(config, run_dir=tmp_path / "run", progress=False)
    trials = read_trials(summary.run_dir)
    assert len(trials) == 4 and trials[0].status == "ok"
    overflowed = [t for t in trials if t.status == "failed"]
    assert overflowed and all("not finite" in t.error and t.fitness is None for t in overflowed)
    assert summary.best_id == trials[0].id
    assert Recipe.load(summary.run_dir / "best.yaml") == Recipe.from_dict(trials[0].recipe)


class _NaNOnOddIds(CandidateEvaluator):
    """Odd candidates get NaN in one tensor, as a corrupt merge would."""

    def evaluate(self, job: Job):
        self._poison = job.candidate_id % 2 == 1
        return super().evaluate(job)

    def load_weights(self, state, **kwargs):
        if getattr(self, "_poison", False):
            name = next(n for n in state if "mlp.down_proj" in n)
            state = {**state, name: torch.full_like(state[name], float("nan"))}
        super().load_weights(state, **kwargs)


def test_nan_weights_fail_a_generation_only_search(quick_zoo, tmp_path):
    config = config_file(tmp_path, quick_zoo, tasks=[GEN_TASK])
    factory = lambda setup, n: make_pool(setup, 0, evaluator_cls=_NaNOnOddIds)  # noqa: E731
    summary = search(config, run_dir=tmp_path / "run", progress=False, pool_factory=factory)
    trials = read_trials(summary.run_dir)
    assert [t.status for t in trials] == ["ok", "failed", "ok", "failed"]
    assert all("zoo_shift_dev_gen" in t.error and "not finite" in t.error for t in trials[1::2])
    assert summary.best_id in (0, 2) and summary.failed == 2


# ---- loads that fail --------------------------------------------------------------------


def _live(evaluator) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in evaluator.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_load_weights_checks_every_name_and_shape_before_copying(evaluator):
    before = _live(evaluator)
    names = list(before)
    poisoned = {n: torch.full_like(t, 7.0) for n, t in before.items()}
    wrong_shape = {**poisoned, names[-1]: torch.zeros(3, 3)}
    with pytest.raises(
        CheckpointError, match=f"tensor {names[-1]} of the merge has shape \\[3, 3\\]"
    ):
        evaluator.load_weights(wrong_shape)
    assert _same(_live(evaluator), before)
    missing = {n: t for n, t in poisoned.items() if n != names[3]}
    with pytest.raises(
        CheckpointError,
        match=f"the merge has no tensor {names[3]}, which the model being scored needs",
    ):
        evaluator.load_weights(missing)
    with pytest.raises(CheckpointError, match="tensor extra.weight of the merge has no place"):
        evaluator.load_weights({**poisoned, "extra.weight": torch.zeros(1)})
    assert _same(_live(evaluator), before)


def test_a_copy_that_fails_half_way_puts_the_reference_weights_back(evaluator, quick_zoo):
    names = list(evaluator.model.state_dict())
    state = {n: torch.full_like(t, float("nan")) for n, t in evaluator.model.state_dict().items()}
    state[names[-1]] = torch.empty(state[names[-1]].shape, device="meta")  # copy_ raises on it
    with pytest.raises(NotImplementedError):
        evaluator.load_weights(state)
    reference = ModelReader(quick_zoo.base)
    assert _same(_live(evaluator), {n: reference.get(n, dtype=torch.float32) for n in names})
    assert evaluator.evaluate(Job(0, task_arithmetic(quick_zoo, 0.3))).status == "ok"


def test_score_model_dir_refuses_a_directory_missing_a_tensor(evaluator, quick_zoo, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(quick_zoo.base).iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(Path(quick_zoo.base) / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    save_file(
        {n: t for n, t in state.items() if n != dropped},
        bad / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert (
        evaluator.evaluate(Job(0, task_arithmetic(quick_zoo, 0.5))).status == "ok"
    )  # live weights: a candidate's
    with pytest.raises(CheckpointError) as info:
        evaluator.score_model_dir(str(bad))
    assert (
        str(info.value)
        == f"model directory {bad} has no tensor {dropped}, which the model being scored needs"
    )
    assert evaluator.score_model_dir(str(quick_zoo.base)).status == "ok"


def test_a_search_in_which_no_candidate_scores_fails_with_the_first_error(quick_zoo, tmp_path):
    config = config_file(
        tmp_path,
        quick_zoo,
        dtype="float16",
        tasks=["zoo_addition_dev"],
        budget={"max_evals": 2},
        space={
            "methods": ["task_arithmetic"],
            "layer_granularity": 2,
            "knobs": {"weight": {"low": 900.0, "high": 1000.0}},
        },
        test_tasks=["zoo_addition_test"],
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", str(config), "--out", str(run_dir)])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert (
        f"error: no candidate scored in 2 trials (run directory {run_dir}); first error (trial #0): ScoringError: task zoo_addition_dev:"
        in line
    )
    assert "not finite" in line
    assert not (run_dir / "best.yaml").exists() and not (run_dir / "best_model").exists()
    assert not (run_dir / "report.md").exists() and not (run_dir / "report.json").exists()
    with pytest.raises(SearchFailedError):  # the library says so too
        search(None, run_dir=run_dir, resume=True, max_evals=3, progress=False)


# ---- a driver killed mid-generation -----------------------------------------------------


def _trial_lines(run_dir: Path) -> int:
    path = run_dir / "trials.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when_logged(config: Path, run_dir: Path, k: int) -> int:
    proc = subprocess.Popen(
        search_command(config, run_dir),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _trial_lines(run_dir) >= k, 300, proc, interval=0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return _trial_lines(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "kill_at"),
    [
        ({"kind": "cma", "popsize": 4, "seed": 0}, 6),
        ({"kind": "optuna-tpe", "seed": 0, "options": {"n_startup_trials": 3}}, 5),
    ],
    ids=["cma", "optuna-tpe"],
)
def test_a_driver_killed_mid_generation_resumes_the_same_search(
    quick_zoo, tmp_path, optimizer, kill_at
):
    config = config_file(tmp_path, quick_zoo, optimizer=optimizer, budget={"max_evals": 10})
    full = search(config, run_dir=tmp_path / "full", progress=False)

    run_dir = tmp_path / "killed"
    logged = _kill_when_logged(config, run_dir, kill_at)
    assert logged % 4 != 0  # mid-generation (popsize 4), a candidate in flight
    state = run_dir / ("cma_state.pkl" if optimizer["kind"] == "cma" else "study.db")
    assert state.exists()

    resumed = search(None, run_dir=run_dir, resume=True, progress=False)
    expected = [(t.id, t.x) for t in read_trials(full.run_dir)]
    got = sorted((t.id, t.x) for t in read_trials(resumed.run_dir))
    assert len(expected) == 10 and got == sorted(expected)
    assert [
        json.loads(line)["id"] for line in (run_dir / "trials.jsonl").read_text().splitlines()
    ] == list(range(10))
