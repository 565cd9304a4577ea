"""The demo zoo: data generators, splits, committed tasks, and the (quick) build."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from evomerge.zoo import build as zoo_build
from evomerge.zoo.build import (
    FULL_DESIGN,
    MANIFEST,
    QUICK_DESIGN,
    Zoo,
    build,
    build_zoo,
    default_zoo_dir,
    finished_zoo,
)
from evomerge.zoo.corpus import Mixture, easy
from evomerge.zoo.probe import exact_match, greedy_answers, mc_accuracy
from evomerge.zoo.skills import (
    SKILL_NAMES,
    eval_items,
    multiple_choice,
    problems,
    shift_letters,
    split_of,
)
from evomerge.zoo.train import TrainConfig, encode, encode_batch

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The quick zoo, built once per session (reused from $EVOMERGE_ZOO_DIR when set)."""
    out = (
        Path(os.environ["EVOMERGE_ZOO_DIR"])
        if os.environ.get("EVOMERGE_ZOO_DIR")
        else tmp_path_factory.mktemp("zoo")
    )
    return build_zoo(out, quick=True, progress=False)


def _tiny_design():
    """A design that trains for a handful of steps: enough to exercise the build's mechanics."""
    return replace(
        QUICK_DESIGN,
        pretrain=TrainConfig(steps=3, lr=1e-3, batch_size=4, warmup_steps=1),
        finetune=TrainConfig(steps=2, lr=1e-3, batch_size=4, warmup_steps=1),
    )


# --- data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skill", SKILL_NAMES)
def test_eval_items_are_deterministic_and_correct(skill: str) -> None:
    first, again = eval_items(skill, "dev", 50), eval_items(skill, "dev", 50)
    assert first == again
    assert len({item.prompt for item in first}) == 50
    for item in first:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.choices[item.label] == item.answer
        assert {len(c) for c in item.choices} == {len(item.answer)}  # no length shortcut
        operand = item.prompt.split(" ", 1)[1][:-1]
        if skill == "addition":
            assert int(item.answer) == sum(int(x) for x in operand.split("+"))
        elif skill == "reversal":
            assert item.answer == operand[::-1]
        else:
            assert item.answer == shift_letters(operand, 1)


def test_distractors_are_near_misses() -> None:
    """Each item has a distractor one character away from the answer (the answer must be exact)."""
    for skill in SKILL_NAMES:
        for item in eval_items(skill, "test", 100):
            distances = [
                sum(a != b for a, b in zip(c, item.answer, strict=True))
                for c in item.choices
                if c != item.answer
            ]
            assert min(distances) <= 2, (skill, item)


def test_splits_are_disjoint_and_fixed_by_the_prompt() -> None:
    for skill in SKILL_NAMES:
        dev = {item.prompt for item in eval_items(skill, "dev", 150)}
        test = {item.prompt for item in eval_items(skill, "test", 300)}
        assert not dev & test
        assert all(split_of(p) == "dev" for p in dev) and all(split_of(p) == "test" for p in test)
    shares = Counter(split_of(f"add {a}+{b}=") for a in range(10, 100) for b in range(10, 100))
    assert 0.04 < shares["dev"] / 8100 < 0.06 and 0.04 < shares["test"] / 8100 < 0.06


def test_training_data_never_contains_dev_or_test_items() -> None:
    held_out = {
        item.prompt
        for skill in SKILL_NAMES
        for split in ("dev", "test")
        for item in eval_items(skill, split, 150)
    }
    mixture = Mixture(
        {
            "text": 1,
            "copy": 1,
            "count": 1,
            **dict.fromkeys(SKILL_NAMES, 3),
            **dict.fromkeys(map(easy, SKILL_NAMES), 3),
        }
    )
    stream = mixture.stream(seed=0)
    seen = [next(stream) for _ in range(40_000)]
    skill_prompts = [p.prompt for p in seen if p.prompt.split(" ")[0] in ("add", "rev", "shift")]
    assert len(skill_prompts) > 30_000
    assert all(split_of(p) == "train" for p in skill_prompts)
    assert not held_out & set(skill_prompts)
    # the easy variants are in the stream (shorter operands than any full-size problem)
    assert any(re.fullmatch(r"add \d\+\d+=", p) for p in skill_prompts)
    assert any(re.fullmatch(r"rev [a-z]{2}=", p) for p in skill_prompts)
    assert any(re.fullmatch(r"shift [a-z]=", p) for p in skill_prompts)


def test_training_streams_are_deterministic() -> None:
    mixture = Mixture({"text": 1, "copy": 1, "addition": 1})
    a, b, c = mixture.stream(1), mixture.stream(1), mixture.stream(2)
    first = [next(a) for _ in range(200)]
    assert first == [next(b) for _ in range(200)]
    assert first != [next(c) for _ in range(200)]


def test_mixture_rejects_unknown_sources() -> None:
    with pytest.raises(ValueError, match="unknown corpus source 'poetry'"):
        Mixture({"poetry": 1.0})


def test_multiple_choice_shuffles_the_answer_position() -> None:
    rng = random.Random(0)
    labels = Counter(
        multiple_choice("reversal", next(problems("reversal", "train", rng)), rng).label
        for _ in range(400)
    )
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) > 60


def test_batches_mask_the_prompt() -> None:
    input_ids, labels = encode_batch([next(problems("addition", "train", random.Random(0)))])
    prompt_length = len(encode("add 12+34="))  # any addition prompt of two 2-digit numbers
    assert (labels[0, :prompt_length] == -100).all()
    assert (labels[0, prompt_length:] != -100).sum() >= 3  # the answer's digits and <eos>


# --- committed tasks ---------------------------------------------------------------------------------


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tasks_match_the_generators() -> None:
    make_tasks = _load_script("make_tasks")
    assert make_tasks.stale_files(TASKS / "zoo", make_tasks.render()) == []


def test_committed_task_data_is_disjoint() -> None:
    rows = {}
    for path in (TASKS / "zoo" / "data").glob("*.jsonl"):
        rows[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
    for skill in SKILL_NAMES:
        dev, test = ({r["prompt"] for r in rows[f"{skill}_{s}"]} for s in ("dev", "test"))
        assert len(dev) == 150 and len(test) == 300 and not dev & test


# --- tokenizer and build mechanics ------------------------------------------------------------------


def test_default_zoo_dir_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path))
    assert default_zoo_dir() == tmp_path
    monkeypatch.delenv("EVOMERGE_ZOO_DIR")
    assert default_zoo_dir() == Path.home() / ".cache" / "evomerge" / "zoo"


def test_build_is_reused_and_force_rebuilds(tmp_path: Path) -> None:
    design = _tiny_design()
    zoo = build(tmp_path, design, progress=False)
    weights = zoo.base / "model.safetensors"
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["skills"] == list(SKILL_NAMES) and manifest["design"]["pretrain"]["steps"] == 3
    stamp = weights.stat().st_mtime_ns

    assert build(tmp_path, design, progress=False) == zoo
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained

    build(tmp_path, design, force=True, progress=False)
    assert weights.stat().st_mtime_ns != stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_partial_or_outdated_build_is_not_reused(tmp_path: Path) -> None:
    design = _tiny_design()
    build(tmp_path, design, progress=False)
    assert finished_zoo(tmp_path, design) is not None
    assert finished_zoo(tmp_path, replace(design, finetune_replay=0.5)) is None  # another design
    (tmp_path / MANIFEST).unlink()
    assert finished_zoo(tmp_path, design) is None  # manifest is written last: no manifest, no zoo


def test_quick_zoo_lives_apart_from_the_full_zoo(tmp_path: Path) -> None:
    assert zoo_build.zoo_root(tmp_path, quick=True) == tmp_path.resolve() / "quick"
    assert zoo_build.zoo_root(tmp_path) == tmp_path.resolve()
    assert QUICK_DESIGN.to_json() != FULL_DESIGN.to_json()


# --- the quick zoo -------------------------------------------------------------------------------


@pytest.mark.slow
def test_zoo_models_load_offline_and_generate(quick_zoo: Zoo) -> None:
    assert set(quick_zoo.specialists) == set(SKILL_NAMES)
    for path in quick_zoo.models.values():
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
        ids = tokenizer("copy abc=", return_tensors="pt").input_ids
        assert ids[0].tolist() == encode("copy abc=")  # the tokenizer is the one training used
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert isinstance(text, str) and len(text) > 0


@pytest.mark.slow
def test_quick_zoo_manifest(quick_zoo: Zoo) -> None:
    manifest = quick_zoo.manifest()
    assert manifest["kind"] == "quick" and manifest["skills"] == list(SKILL_NAMES)
    assert set(manifest["dev_accuracy"]) == {"base", *SKILL_NAMES}
    assert {"evomerge", "torch", "transformers"} <= set(manifest["versions"])
    assert build_zoo(quick_zoo.root.parent, quick=True, progress=False) == quick_zoo


@pytest.mark.slow
def test_quick_zoo_specialists_beat_the_base_on_their_skill(quick_zoo: Zoo) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(quick_zoo.base)
    for skill, path in quick_zoo.specialists.items():
        items = eval_items(skill, "test", 300)
        specialist = AutoModelForCausalLM.from_pretrained(path)
        assert mc_accuracy(specialist, items) > mc_accuracy(base, items) + 0.1, skill


@pytest.mark.slow
def test_tasks_run_in_lm_eval_from_any_directory(
    quick_zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval finds the tasks and their data from another working directory, offline, and its
    multiple-choice accuracy equals the zoo's own probe on the same items."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    tasks = ["zoo_shift_dev", "zoo_addition_test_gen"]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={quick_zoo.specialists['shift']}",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        bootstrap_iters=0,
        batch_size=64,
        device="cpu",
        limit=None,
    )["results"]
    model = AutoModelForCausalLM.from_pretrained(quick_zoo.specialists["shift"])
    assert results["zoo_shift_dev"]["acc,none"] == pytest.approx(
        mc_accuracy(model, eval_items("shift", "dev", 150))
    )
    assert results["zoo_addition_test_gen"]["exact_match,none"] == pytest.approx(
        exact_match(model, eval_items("addition", "test", 300))
    )


def test_greedy_answers_equal_transformers_generate(quick_zoo: Zoo) -> None:
    """The build's generation probe decodes exactly as `generate` does, prompts of mixed lengths."""
    tokenizer = AutoTokenizer.from_pretrained(quick_zoo.specialists["reversal"])
    model = AutoModelForCausalLM.from_pretrained(quick_zoo.specialists["reversal"]).eval()
    prompts = [item.prompt for skill in SKILL_NAMES for item in eval_items(skill, "dev", 8)]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        expected.append(tokenizer.decode(out, skip_special_tokens=True).split("\n")[0])
    assert greedy_answers(model, prompts) == expected
