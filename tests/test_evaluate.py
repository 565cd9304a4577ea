"""The scorer: lm-eval metrics and fitness for live models and model directories (CPU, offline)."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from tiny_models import make_family
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ScoringError
from evomerge.evaluate import Score, Scorer, TaskSpec, print_scores, score_model_dir
from evomerge.vllm_backend import (
    VLLMEngine,
    check_fused_coverage,
    gpu_memory_fraction,
    vllm_target,
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


# -- vLLM backend: what can be checked without a GPU ----------------------------------------


class FusedStandIn:
    """Looks like a vLLM Llama to `load_weights`: q/k/v and gate/up stored as one parameter each."""

    parts = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_state: dict[str, torch.Tensor]):
        rows: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for name, tensor in hf_state.items():
            fused, position = self._fused(name)
            rows[fused][position] = tensor
        self.params = {
            name: torch.zeros(
                sum(t.shape[0] for t in p.values()), *next(iter(p.values())).shape[1:]
            )
            for name, p in rows.items()
        }
        self.offsets = {}
        for fused, parts in rows.items():
            start = 0
            for position in sorted(parts):
                self.offsets[(fused, position)] = slice(start, start + parts[position].shape[0])
                start += parts[position].shape[0]

    def _fused(self, name: str) -> tuple[str, int]:
        for part, (fused, position) in self.parts.items():
            if f".{part}." in name:
                return name.replace(part, fused), position
        return name, 0

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            fused, position = self._fused(name)
            self.params[fused][self.offsets[(fused, position)]] = tensor
            loaded.add(fused)
        return loaded

    def named_parameters(self):
        return iter(self.params.items())


class FakeLLM:
    def __init__(self, model):
        self.model, self.applied, self.resets = model, 0, 0

    def apply_model(self, func):
        self.applied += 1
        return [func(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True


def test_vllm_target_maps_hf_names_onto_fused_parameters(family):
    hf_names = list(_load(family["base"])[0].state_dict())
    targets = {name: vllm_target(name, tie_word_embeddings=False) for name in hf_names}
    assert targets["model.layers.1.self_attn.k_proj.weight"] == (
        "model.layers.1.self_attn.qkv_proj.weight",
        "k",
    )
    assert targets["model.layers.0.mlp.up_proj.weight"] == (
        "model.layers.0.mlp.gate_up_proj.weight",
        1,
    )
    assert targets["model.layers.0.self_attn.o_proj.weight"] == (
        "model.layers.0.self_attn.o_proj.weight",
        None,
    )
    assert targets["lm_head.weight"] == ("lm_head.weight", None)
    assert vllm_target("lm_head.weight", tie_word_embeddings=True) is None
    assert (
        vllm_target("model.layers.0.self_attn.rotary_emb.inv_freq", tie_word_embeddings=False)
        is None
    )
    fused = {t[0] for t in targets.values() if t[1] is not None}
    assert len(fused) == 2 * 4  # qkv_proj and gate_up_proj in each of the 4 layers
    check_fused_coverage(hf_names, tie_word_embeddings=False)
    with pytest.raises(
        ScoringError, match=r"model\.layers\.2\.self_attn\.qkv_proj\.weight lack shard\(s\) v"
    ):
        check_fused_coverage(
            [n for n in hf_names if n != "model.layers.2.self_attn.v_proj.weight"],
            tie_word_embeddings=False,
        )


def test_vllm_engine_loads_weights_in_place(family):
    model, _ = _load(family["base"])
    state = model.state_dict()
    llm = FakeLLM(FusedStandIn(state))
    engine = VLLMEngine(family["base"], lm=type("LM", (), {"model": llm})())
    engine.load(family["base"])
    assert llm.applied == 0  # the engine was built from these weights
    engine.load(model)
    engine.load(model)
    assert (llm.applied, llm.resets) == (2, 2)
    params = llm.model.params
    layer = "model.layers.3"
    expected_qkv = torch.cat(
        [state[f"{layer}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    )
    assert torch.equal(params[f"{layer}.self_attn.qkv_proj.weight"], expected_qkv)
    assert torch.equal(
        params[f"{layer}.mlp.gate_up_proj.weight"],
        torch.cat([state[f"{layer}.mlp.gate_proj.weight"], state[f"{layer}.mlp.up_proj.weight"]]),
    )
    engine.load(family["a"])  # another directory: read from disk, loaded into the same engine
    a_state = AutoModelForCausalLM.from_pretrained(family["a"]).state_dict()
    assert torch.equal(params["lm_head.weight"], a_state["lm_head.weight"])
    assert llm.applied == 3

    llm.model.params["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ScoringError, match="left vLLM parameter model.extra.weight unset"):
        engine.load(model)


def test_vllm_memory_share_leaves_room_for_a_merge(family):
    weights = sum(f.stat().st_size for f in family["base"].glob("*.safetensors"))
    gib = 2**30
    assert gpu_memory_fraction(family["base"], free=40 * gib, total=80 * gib) == pytest.approx(
        (36 * gib - 2 * weights) / (80 * gib)
    )
    with pytest.raises(ScoringError, match="not enough free GPU memory"):
        gpu_memory_fraction(family["base"], free=3 * weights, total=80 * gib)


def test_vllm_backend_is_imported_lazily_and_needs_the_extra(task_dir, family):
    assert "vllm" not in sys.modules
    scorer = Scorer([MC], include_paths=[task_dir], limit=2, backend="vllm")
    if "vllm" in sys.modules or _has_vllm():
        pytest.skip("checks the error shown without the [vllm] extra, and vllm is installed here")
    with pytest.raises(ScoringError, match=r"needs vLLM: pip install 'evomerge\[vllm\]'"):
        scorer.score(family["base"])


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
