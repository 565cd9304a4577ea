"""lm-eval groups and tags: expanded to their tasks, scored, and aggregated as lm-eval does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import make_family
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.evaluate import Scorer
from evomerge.run import search
from evomerge.run_dir import read_trials

TASK = """task: {name}
tag: [ev_tagged]
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module")
def group_dir(tmp_path_factory) -> Path:
    """Two tasks of different sizes (24 and 10 documents), two groups of them, one tag."""
    root = tmp_path_factory.mktemp("groups")
    rng = random.Random(1)
    for name, n in (("ev_g_big", 24), ("ev_g_small", 10)):
        rows = []
        for _ in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            gold = rng.randrange(4)
            wrong = [str(a + b + d) for d in rng.sample([1, 2, 10, 11], 3)]
            rows.append(
                {
                    "question": f"{a}+{b}=",
                    "choices": wrong[:gold] + [str(a + b)] + wrong[gold:],
                    "answer": gold,
                }
            )
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    for group, by_size in (("ev_sized", True), ("ev_flat", False)):
        (root / f"{group}.yaml").write_text(
            yaml.safe_dump(
                {
                    "group": group,
                    "task": ["ev_g_big", "ev_g_small"],
                    "aggregate_metric_list": [
                        {"metric": "acc", "aggregation": "mean", "weight_by_size": by_size}
                    ],
                }
            )
        )
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    family = make_family(tmp_path_factory.mktemp("models"), "llama", names=("base",), noise=0.5)
    path = family["base"]
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("group", ["ev_sized", "ev_flat"])
def test_group_aggregate_equals_lm_eval_simple_evaluate(group, group_dir, model):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    scorer = Scorer([group], include_paths=[group_dir], include_defaults=False)
    score = scorer.score(*model)
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model[0], tokenizer=model[1], batch_size=64),
        tasks=[group],
        task_manager=TaskManager(include_path=str(group_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert set(score.metrics) == {group, "ev_g_big", "ev_g_small"}
    for task in ("ev_g_big", "ev_g_small"):
        assert score.metrics[task]["acc"] == reference[task]["acc,none"]
    assert score.metrics[group]["acc"] == pytest.approx(reference[group]["acc,none"], rel=1e-12)
    assert score.fitness == score.metrics[group]["acc"]  # the group counts as its aggregate
    big, small = score.metrics["ev_g_big"]["acc"], score.metrics["ev_g_small"]["acc"]
    assert big != small  # so that weighting by size shows
    expected = (24 * big + 10 * small) / 34 if group == "ev_sized" else (big + small) / 2
    assert score.metrics[group]["acc"] == pytest.approx(expected, rel=1e-12)


def test_a_tag_stands_for_its_tasks(group_dir, model):
    scorer = Scorer(["ev_tagged"], include_paths=[group_dir], include_defaults=False)
    assert [(s.name, s.metric) for s in scorer.specs] == [
        ("ev_g_big", "acc"),
        ("ev_g_small", "acc"),
    ]
    score = scorer.score(*model)
    assert set(score.metrics) == {
        "ev_g_big",
        "ev_g_small",
    }  # lm-eval reports no aggregate for a tag
    assert score.fitness == pytest.approx(
        (score.metrics["ev_g_big"]["acc"] + score.metrics["ev_g_small"]["acc"]) / 2
    )


def test_eval_cli_scores_a_group_of_the_repo(quick_zoo, tmp_path):
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(quick_zoo.specialists["addition"]),
            "--tasks",
            "zoo_test",
            "--limit",
            "8",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    parts = [scores["metrics"][f"zoo_{s}_test"]["acc"] for s in ("addition", "reversal", "shift")]
    assert scores["metrics"]["zoo_test"]["acc"] == pytest.approx(
        sum(parts) / 3
    )  # zoo_test: weight_by_size false
    assert scores["fitness"] == scores["metrics"]["zoo_test"]["acc"]


def test_a_group_as_fitness_and_overrides_recorded_in_the_run_dir(quick_zoo, tmp_path):
    """tasks: [zoo_dev] scores the group's aggregate; --max-evals/--workers land in config.yaml."""
    skills = list(quick_zoo.skills)
    config = {
        "models": [str(quick_zoo.specialists[s]) for s in skills],
        "base_model": str(quick_zoo.base),
        "space": {"methods": ["task_arithmetic"], "knobs": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": ["zoo_dev"],
        "limit": 4,
        "optimizer": {"kind": "random", "seed": 0},
        "budget": {"max_evals": 50},
        "workers": 2,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = search(path, run_dir=tmp_path / "run", max_evals=2, workers=0, progress=False)
    trials = read_trials(summary.run_dir)
    assert len(trials) == 2 and summary.failed == 0
    for t in trials:
        assert t.fitness == t.metrics["zoo_dev"]["acc"]
        assert set(t.metrics) == {"zoo_dev", *(f"zoo_{s}_dev" for s in skills)}
    recorded = yaml.safe_load((summary.run_dir / "config.yaml").read_text())
    assert recorded["budget"]["max_evals"] == 2 and recorded["workers"] == 0
    assert {k: v for k, v in recorded.items() if k not in ("budget", "workers")} == {
        k: v for k, v in config.items() if k not in ("budget", "workers")
    }
    # a resume reads the recorded budget: nothing left to do
    resumed = search(None, run_dir=summary.run_dir, resume=True, progress=False)
    assert resumed.trials == 2
