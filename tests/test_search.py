"""The search end to end on the quick zoo: Ray pool, failures, resume, export, report."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import yaml
from tiny_models import load_state
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.export import to_mergekit_documents, trial_recipe
from evomerge.merge import merge_to_disk
from evomerge.recipe import Recipe
from evomerge.run import search
from evomerge.run_dir import read_trials
from evomerge.workers import CandidateEvaluator, Job, RayPool, TrialResult, make_pool

runner = CliRunner()


def write_config(tmp_path, zoo, **overrides):
    skills = list(zoo.skills)
    config = {
        "models": [str(zoo.specialists[s]) for s in skills],
        "base_model": str(zoo.base),
        "space": {
            "methods": ["task_arithmetic"],
            "layer_granularity": 2,
            "knobs": {"weight": {"low": 0.0, "high": 1.0}},
        },
        "tasks": [f"zoo_{s}_dev" for s in skills],
        "test_tasks": [f"zoo_{s}_test" for s in skills],
        "limit": 16,
        "optimizer": {"kind": "cma", "popsize": 4, "seed": 0},
        "warm_start": [
            {
                "merge_method": "task_arithmetic",
                "base_model": str(zoo.base),
                "models": [
                    {"model": str(zoo.specialists[s]), "parameters": {"weight": 1 / 3}}
                    for s in skills
                ],
            }
        ],
        "baselines": {
            "linear": {
                "merge_method": "linear",
                "models": [
                    {"model": str(zoo.specialists[s]), "parameters": {"weight": 1.0}}
                    for s in skills
                ],
            }
        },
        "budget": {"max_evals": 8},
        "workers": 0,
    }
    for key, value in overrides.items():
        config[key] = value
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serial_search_logs_every_trial_and_warm_start_comes_first(quick_zoo, tmp_path):
    summary = search(write_config(tmp_path, quick_zoo), run_dir=tmp_path / "run", progress=False)
    trials = read_trials(summary.run_dir)
    assert summary.trials == len(trials) == 8 and summary.failed == 0
    assert [t.id for t in trials] == list(range(8))
    first = Recipe.from_dict(trials[0].recipe)
    weights = [
        src.parameters["weight"] for sl in first.slices for src in sl.sources if src.parameters
    ]
    assert weights and weights == pytest.approx(
        [1 / 3] * len(weights), abs=1e-5
    )  # the warm start, encoded then decoded
    for t in trials:
        assert set(t.metrics) == {f"zoo_{s}_dev" for s in quick_zoo.skills}
        assert t.merge_seconds > 0 and t.score_seconds > 0
    best = max(trials, key=lambda t: t.fitness)
    assert Recipe.load(summary.run_dir / "best.yaml") == Recipe.from_dict(best.recipe)
    assert (summary.run_dir / "cma_state.pkl").exists()


class FailingEvaluator(CandidateEvaluator):
    """Scoring raises for every third candidate."""

    def evaluate(self, job: Job) -> TrialResult:
        if job.candidate_id % 3 == 1:
            self.scorer = _Raising(self.scorer)
        result = super().evaluate(job)
        if isinstance(self.scorer, _Raising):
            self.scorer = self.scorer.inner
        return result


class _Raising:
    def __init__(self, inner):
        self.inner = inner

    def score(self, *args, **kwargs):
        raise RuntimeError("injected scoring failure")


def test_failed_candidates_are_logged_and_the_run_goes_on(quick_zoo, tmp_path):
    factory = lambda setup, n: make_pool(setup, 0, evaluator_cls=FailingEvaluator)  # noqa: E731
    summary = search(
        write_config(tmp_path, quick_zoo),
        run_dir=tmp_path / "run",
        progress=False,
        pool_factory=factory,
    )
    trials = read_trials(summary.run_dir)
    failed = [t for t in trials if t.status == "failed"]
    assert len(trials) == 8 and [t.id for t in failed] == [1, 4, 7]
    assert all("injected scoring failure" in t.error and t.fitness is None for t in failed)
    assert summary.best_fitness == max(t.fitness for t in trials if t.fitness is not None)


def test_interrupted_run_resumes_without_losing_or_rerunning_trials(quick_zoo, tmp_path):
    config = write_config(tmp_path, quick_zoo)
    full = search(config, run_dir=tmp_path / "full", progress=False)
    partial = search(config, run_dir=tmp_path / "resumed", max_evals=5, progress=False)
    assert partial.trials == 5
    # a crash after a candidate was asked but before it was scored: the optimizer has it pending
    # the run directory recorded --max-evals 5: resuming keeps that budget unless told otherwise
    assert search(None, run_dir=tmp_path / "resumed", resume=True, progress=False).trials == 5
    resumed = search(None, run_dir=tmp_path / "resumed", resume=True, max_evals=8, progress=False)
    trials = read_trials(resumed.run_dir)
    assert [t.id for t in trials] == list(range(8))
    uninterrupted = read_trials(full.run_dir)
    for a, b in zip(trials, uninterrupted, strict=True):  # CMA state restored: the same points
        assert a.x == pytest.approx(b.x), a.id


def test_export_rebuilds_the_scored_weights(quick_zoo, tmp_path):
    summary = search(
        write_config(tmp_path, quick_zoo, budget={"max_evals": 4}),
        run_dir=tmp_path / "run",
        progress=False,
    )
    out_yaml = tmp_path / "best.yaml"
    result = runner.invoke(app, ["export", str(summary.run_dir), "--out", str(out_yaml)])
    assert result.exit_code == 0, result.output
    recipe, record = trial_recipe(summary.run_dir)
    assert Recipe.load(out_yaml) == recipe
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(out_yaml), "--out", str(merged), "-q"]).exit_code == 0
    # the weights on disk score exactly what the search logged
    from dataclasses import replace

    from evomerge.run import build_setup
    from evomerge.search_config import load_search_config

    setup = build_setup(load_search_config(summary.run_dir / "config.yaml")[0])
    evaluator = CandidateEvaluator(replace(setup.worker, device="cpu"))
    rescored = evaluator.score_model_dir(str(merged))
    assert rescored.fitness == pytest.approx(record.fitness, abs=1e-6)


def test_per_layer_method_choice_exports_a_mergekit_multi_file_with_the_same_weights(
    quick_zoo, tmp_path
):
    mergekit_multi = pytest.importorskip("mergekit.scripts.multimerge")
    skills = list(quick_zoo.skills)
    data = {
        "merge_method": "ties",
        "base_model": str(quick_zoo.base),
        "slices": [
            {
                "merge_method": method,
                "sources": [{"model": str(quick_zoo.base), "layer_range": [lo, lo + 1]}]
                + [
                    {
                        "model": str(quick_zoo.specialists[s]),
                        "layer_range": [lo, lo + 1],
                        "parameters": {"weight": 0.4, "density": 0.6},
                    }
                    for s in skills
                ],
            }
            for lo, method in enumerate(
                ["ties", "task_arithmetic", "ties", "breadcrumbs"][: _layers(quick_zoo)]
            )
        ],
    }
    recipe = Recipe.from_dict(data)
    ours = tmp_path / "ours"
    merge_to_disk(recipe, ours, progress=False)
    docs = to_mergekit_documents(recipe)
    assert docs[-1]["merge_method"] == "passthrough" and len(docs) == len(set(recipe.methods())) + 1
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump_all(docs))
    from click.testing import CliRunner as ClickRunner  # mergekit's commands are plain click

    result = ClickRunner().invoke(
        mergekit_multi.main,
        [
            str(multi),
            "--intermediate-dir",
            str(tmp_path / "parts"),
            "--out-path",
            str(tmp_path / "theirs"),
        ],
    )
    assert result.exit_code == 0, result.output
    a, b = load_state(ours), load_state(tmp_path / "theirs")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _layers(zoo) -> int:
    return json.loads((zoo.base / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.slow
def test_ray_pool_two_workers_and_a_killed_worker_is_replaced(quick_zoo, ray_session, tmp_path):
    from evomerge.run import build_setup
    from evomerge.search_config import load_search_config

    config, _ = load_search_config(write_config(tmp_path, quick_zoo))
    setup = build_setup(config)
    pool = RayPool(setup.worker, 2)
    try:
        names = pool.worker_names()
        assert len(set(names)) == 2
        recipe = setup.space.decode([0.5] * setup.space.dim).to_dict()
        pool.submit(Job(0, recipe))
        pool.submit(Job(1, recipe))
        results = []
        while len(results) < 2:
            results += pool.poll(timeout=60)
        assert {r.candidate_id for r in results} == {0, 1}
        assert {r.worker for r in results} == set(names)
        assert results[0].fitness == pytest.approx(results[1].fitness)  # same recipe, same score
        # kill a worker while it holds a candidate: it is replaced and the candidate retried once
        pool.submit(Job(2, recipe))
        victim = next(iter(pool._running.values()))[0]
        pid = int(names[victim].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 120
        got = []
        while not got and time.time() < deadline:
            got = pool.poll(timeout=5)
        assert got and got[0].candidate_id == 2 and got[0].status == "ok"
    finally:
        pool.close()


def test_ray_pool_larger_than_the_running_ray_is_refused_not_hung(quick_zoo, ray_session, tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.run import build_setup
    from evomerge.search_config import load_search_config

    setup = build_setup(load_search_config(write_config(tmp_path, quick_zoo))[0])
    with pytest.raises(EvomergeError, match="need 3 CPUs but the running Ray has 2"):
        RayPool(setup.worker, 3)
    assert ray_session.is_initialized()  # a Ray the pool did not start stays up


@pytest.mark.slow
def test_cli_search_with_ray_workers_writes_report(quick_zoo, ray_session, tmp_path):
    config = write_config(
        tmp_path, quick_zoo, workers=2, optimizer={"kind": "optuna-tpe", "seed": 1}
    )
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["search", str(config), "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "held-out test tasks" in result.output and "evolved" in result.output
    for f in (
        "trials.jsonl",
        "best.yaml",
        "study.db",
        "fitness.png",
        "knobs.png",
        "report.md",
        "report.json",
    ):
        assert (run_dir / f).exists(), f
    # the best merge is materialized by default, as the recipe that scored best
    assert (
        list((run_dir / "best_model").glob("*.safetensors"))
        and (run_dir / "best_model" / "config.json").exists()
    )
    assert Recipe.load(run_dir / "best_model" / "evomerge_recipe.yaml") == Recipe.load(
        run_dir / "best.yaml"
    )
    report = json.loads((run_dir / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert (
        names[0].startswith("evolved")
        and "linear" in names
        and len(names) == 1 + 1 + len(quick_zoo.skills) + 1
    )
    assert (
        "front" not in report and not (run_dir / "pareto.png").exists()
    )  # one objective: no front section
    workers = {t.worker for t in read_trials(run_dir)}
    assert len(workers) == 2


def test_bad_search_config_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": ["x"],
                "space": {"methods": ["ties"], "knobs": {"weight": None}},
                "tasks": ["t"],
                "optimzer": {},
            }
        )
    )
    result = runner.invoke(app, ["search", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "optimzer: unknown field" in result.output
    assert not (tmp_path / "run").exists()


def test_search_scores_the_users_own_tasks_from_task_paths(quick_zoo, tmp_path):
    """`task_paths` adds a folder of lm-eval YAMLs; its tasks score like the built-in ones."""
    from pathlib import Path

    data = Path(__file__).parents[1] / "tasks" / "zoo" / "data" / "addition_dev.jsonl"
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_add.yaml").write_text(
        "task: my_add\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: '{data}'}}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    config = write_config(
        tmp_path, quick_zoo, tasks=["my_add"], task_paths=[str(folder)], budget={"max_evals": 2}
    )
    summary = search(config, run_dir=tmp_path / "run", progress=False)
    trials = read_trials(summary.run_dir)
    assert summary.failed == 0 and all(set(t.metrics) == {"my_add"} for t in trials)
    assert trials[0].fitness == trials[0].metrics["my_add"]["acc"]


def test_nsga2_searches_one_objective_per_task(quick_zoo, tmp_path):
    import optuna

    config = write_config(
        tmp_path, quick_zoo, optimizer={"kind": "optuna-nsga2", "seed": 0}, budget={"max_evals": 6}
    )
    summary = search(config, run_dir=tmp_path / "run", progress=False)
    trials = read_trials(summary.run_dir)
    assert len(trials) == 6 and summary.failed == 0
    for t in trials:
        per_task = [t.metrics[f"zoo_{s}_dev"]["acc"] for s in quick_zoo.skills]
        assert t.objectives == pytest.approx(per_task)
        assert t.fitness == pytest.approx(sum(per_task) / len(per_task))
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{summary.run_dir / 'study.db'}")
    assert len(study.directions) == len(quick_zoo.skills)
    assert [tuple(tr.values) for tr in study.trials] == [
        pytest.approx(t.objectives) for t in trials
    ]


def test_search_without_a_config_runs_the_demo():
    from evomerge.run import demo_config_path
    from evomerge.search_config import load_search_config

    config, _ = load_search_config(demo_config_path())
    assert (
        config.models == ["zoo:addition", "zoo:reversal", "zoo:shift"]
        and config.base_model == "zoo:base"
    )


def test_a_worker_that_cannot_start_fails_the_search_with_its_own_error(
    quick_zoo, ray_session, tmp_path
):
    from evomerge.errors import EvomergeError

    # the up-front check reads task YAMLs only; a data file that is not there stops the workers
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_broken.yaml").write_text(
        "task: my_broken\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: '{tmp_path / 'missing.jsonl'}'}}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    config = write_config(
        tmp_path, quick_zoo, tasks=["my_broken"], task_paths=[str(folder)], workers=2
    )
    with pytest.raises(EvomergeError, match="task my_broken cannot be loaded"):
        search(config, run_dir=tmp_path / "run", progress=False)
