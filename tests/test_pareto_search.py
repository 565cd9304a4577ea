"""A short NSGA-II search of the quick zoo, resumed once: its front in the log, the study, the
summary, `evomerge export --pareto` and the report."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from test_pareto import brute_force_front
from test_search import write_config
from typer.testing import CliRunner

from evomerge import pareto
from evomerge.cli import app
from evomerge.export import trial_recipe
from evomerge.recipe import Recipe
from evomerge.run import search
from evomerge.run_dir import read_trials

runner = CliRunner()


@pytest.fixture(scope="module")
def nsga2_run(quick_zoo, tmp_path_factory):
    """8 trials from the CLI, then resumed to 14; `optimizer.select: maximin`."""
    tmp = tmp_path_factory.mktemp("nsga2")
    optimizer = {
        "kind": "optuna-nsga2",
        "seed": 0,
        "select": "maximin",
        "options": {"population_size": 4},
    }
    config = write_config(tmp, quick_zoo, optimizer=optimizer, budget={"max_evals": 14})
    run_dir = tmp / "run"
    first = runner.invoke(
        app,
        [
            "search",
            str(config),
            "--out",
            str(run_dir),
            "--max-evals",
            "8",
            "--no-save-best",
            "--no-report",
        ],
    )
    assert first.exit_code == 0, first.output
    first_front = pareto.trial_front(read_trials(run_dir))
    resumed = search(None, run_dir=run_dir, resume=True, max_evals=14, progress=False)
    return {
        "run_dir": run_dir,
        "output": first.output,
        "first_front": first_front,
        "summary": resumed,
    }


def _ids(trials):
    return [t.id for t in trials]


def test_the_front_survives_a_resume_and_equals_the_studys_and_a_brute_force_filter(nsga2_run):
    run_dir, summary = nsga2_run["run_dir"], nsga2_run["summary"]
    trials = read_trials(run_dir)
    assert summary.trials == len(trials) == 14 and summary.failed == 0
    front = pareto.trial_front(trials)
    assert len(front) >= 2
    expected = brute_force_front([t.objectives for t in trials], ["maximize"] * 3)
    assert _ids(front) == [trials[i].id for i in expected]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'study.db'}")
    assert _ids(front) == sorted(t.number for t in study.best_trials)
    assert list(summary.front_ids) == _ids(front)
    # the first session's members are still on the front unless a resumed trial beats them
    later = [t for t in trials if t.id >= 8]
    for member in nsga2_run["first_front"]:
        beaten = any(pareto.dominates(t.objectives, member.objectives) for t in later)
        assert (member.id in _ids(front)) != beaten


def test_the_search_summary_names_the_rule_and_best_yaml_is_its_pick(nsga2_run):
    output = " ".join(nsga2_run["output"].split())
    first_front = nsga2_run["first_front"]
    picked = pareto.select(first_front, "maximin")
    assert f"best trial #{picked.id} (picked by maximin: the highest worst dev objective)" in output
    listed = ", ".join(f"#{t.id}" for t in first_front)
    assert (
        f"Pareto front: {len(first_front)} trial" in output and f"({listed}); export them" in output
    )
    run_dir, summary = nsga2_run["run_dir"], nsga2_run["summary"]
    best = pareto.select(pareto.trial_front(read_trials(run_dir)), "maximin")
    assert summary.best_id == best.id and summary.select == "maximin"
    assert Recipe.load(run_dir / "best.yaml") == Recipe.from_dict(best.recipe)
    assert trial_recipe(run_dir)[1].id == best.id  # export's default follows the run's rule


def test_export_pareto_writes_each_member_and_trial_exports_any_of_them(nsga2_run, tmp_path):
    run_dir = nsga2_run["run_dir"]
    trials = {t.id: t for t in read_trials(run_dir)}
    front = _ids(pareto.trial_front(trials.values()))
    out = tmp_path / "front"
    result = runner.invoke(app, ["export", str(run_dir), "--pareto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"trial-{i:04d}.yaml" for i in front]
    for i in front:
        text = (out / f"trial-{i:04d}.yaml").read_text()
        assert text.startswith(f"# evomerge trial #{i}, dev fitness") and "dev objectives" in text
        assert Recipe.from_dict(yaml.safe_load(text)) == Recipe.from_dict(trials[i].recipe)
        single = tmp_path / f"single-{i}.yaml"
        assert (
            runner.invoke(
                app, ["export", str(run_dir), "--trial", str(i), "--out", str(single)]
            ).exit_code
            == 0
        )
        assert Recipe.load(single) == Recipe.load(out / f"trial-{i:04d}.yaml")
    # the default place, twice: an earlier front export is replaced
    for _ in range(2):
        assert runner.invoke(app, ["export", str(run_dir), "--pareto", "--mergekit"]).exit_code == 0
    assert sorted(p.name for p in (run_dir / "pareto").iterdir()) == [
        f"trial-{i:04d}.yaml" for i in front
    ]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".pareto")]


def test_export_refuses_what_it_cannot_do(nsga2_run, tmp_path):
    run_dir = nsga2_run["run_dir"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["export", str(run_dir), "--pareto", "--out", str(foreign)])
    assert result.exit_code == 2 and "holds notes.txt, which is not a front export" in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, ["export", str(run_dir), "--pareto", "--trial", "3"])
    assert result.exit_code == 2 and "takes no --trial" in result.output
    result = runner.invoke(app, ["export", str(run_dir), "--select", "median"])
    assert result.exit_code == 2 and "--select: unknown rule 'median'" in result.output
    by_mean = runner.invoke(app, ["export", str(run_dir), "--select", "weighted-mean"])
    best = max(read_trials(run_dir), key=lambda t: (t.fitness, -t.id))
    assert by_mean.exit_code == 0 and by_mean.output.startswith(f"# evomerge trial #{best.id},")


@pytest.mark.slow
def test_report_lists_the_front_with_test_scores_and_plots_it_beside_the_sources(nsga2_run):
    run_dir = nsga2_run["run_dir"]
    trials = read_trials(run_dir)
    front = pareto.trial_front(trials)
    result = runner.invoke(
        app, ["report", str(run_dir), "--select", "weighted-mean", "--front-test", "2"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    best = pareto.select(front, "weighted-mean")
    assert report["select"] == "weighted-mean" and report["best_id"] == best.id
    members = report["front"]
    assert [m["id"] for m in members] == _ids(front)
    tested = [m["id"] for m in members if m["test"] is not None]
    assert len(tested) == min(2, len(front)) and best.id in tested
    by_id = {t.id: t for t in trials}
    for m in members:
        assert m["objectives"] == pytest.approx(by_id[m["id"]].objectives)
        assert m["dev"] == pytest.approx({k: v["acc"] for k, v in by_id[m["id"]].metrics.items()})
        assert sorted(m["picked_by"]) == sorted(
            r for r in pareto.RULES if pareto.select(front, r).id == m["id"]
        )
    evolved, *marks = report["rows"]
    assert evolved["name"] == f"evolved (trial #{best.id})"
    # every point on the plot is on the same dev samples: the report's re-scoring of the pick
    # gives back the objectives the search logged for it
    assert list(evolved["search_dev"].values()) == pytest.approx(best.objectives, abs=1e-6)
    assert [r["kind"] for r in marks] == ["source"] * 4 + ["baseline"]
    assert all(set(r["search_dev"]) == set(by_id[0].metrics) for r in marks)
    png = run_dir / "pareto.png"
    assert png.exists() and png.stat().st_size < 200_000
    text = (run_dir / "report.md").read_text()
    assert (
        f"## Pareto front: {len(front)} of 14 trials" in text
        and "picked by `weighted-mean`" in text
    )
    assert "![Pareto front](pareto.png)" in text and "first 16 items of each dev split" in text
    if len(front) > 2:
        assert f"the other {len(front) - 2}: dev only" in text
    assert "Pareto front on the dev tasks" in result.output
