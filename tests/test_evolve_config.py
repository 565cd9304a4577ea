"""mergekit-evolve configs: the genome space decodes as mergekit's own genome code does, bad configs are
refused as mergekit refuses them, `evomerge search evolve.yaml` runs, `evomerge migrate` writes a native config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError
from evomerge.evolve_config import EvolveFlags, native_config, parse_evolve_config
from evomerge.genome_space import GenomeSpace
from evomerge.recipe import Recipe
from evomerge.run_dir import read_trials
from evomerge.search_config import parse_search_config

runner = CliRunner()


@pytest.fixture(scope="module")
def zoo(quick_zoo) -> dict[str, str]:
    return {"base": str(quick_zoo.base), **{s: str(p) for s, p in quick_zoo.specialists.items()}}


def evolve_raw(zoo: dict[str, str], method: str, **genome) -> dict:
    models = [zoo["addition"], zoo["reversal"], zoo["shift"]]
    data = {"models": models, "merge_method": method, **genome}
    if method in ("ties", "dare_ties", "task_arithmetic") and "base_model" not in genome:
        data["base_model"] = zoo["base"]
    tasks = [{"name": "zoo_addition_dev", "weight": 2.0, "metric": "acc,none"}, "zoo_reversal_dev"]
    return {"genome": data, "tasks": tasks, "limit": 8}


def build(raw: dict) -> GenomeSpace:
    """Our space, through the native config, as `evomerge search` builds it."""
    native = parse_search_config(native_config(parse_evolve_config(raw)))
    return GenomeSpace(
        native.space,
        models=native.models,
        base_model=native.base_model,
        num_layers=4,
        tokenizer_source=native.tokenizer_source,
    )


def mergekit_genome(raw: dict):
    """mergekit's own genome for the same config (the `mergekit` extra)."""
    genome_mod = pytest.importorskip("mergekit.evo.genome")
    return genome_mod.ModelGenome(genome_mod.ModelGenomeDefinition.model_validate(raw["genome"]))


def mergekit_recipe(genome, genotype) -> dict:
    return Recipe.from_yaml(
        genome.genotype_merge_config(np.asarray(genotype, dtype=np.float64)).to_yaml()
    ).to_dict()


def rounded(obj, digits: int):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


CASES = {
    "linear": {},
    "linear_base_in_models": {"layer_granularity": 2},
    "linear_smooth_filters": {
        "smooth": True,
        "filters": ["self_attn", "mlp"],
        "layer_granularity": 1,
    },
    "task_arithmetic_granularity": {"layer_granularity": 2},
    "task_arithmetic_negative": {"allow_negative_weights": True, "layer_granularity": 2},
    "ties_filters": {"filters": ["mlp"]},
    "ties_granularity_filters": {
        "layer_granularity": 2,
        "filters": ["self_attn"],
        "normalize": False,
    },
    "dare_ties_smooth": {"smooth": True, "layer_granularity": 2},
    "dare_ties_base_in_models": {"layer_granularity": 4},
    "slerp": {"layer_granularity": 1},
    "slerp_one_group": {},
    "slerp_tokenizer_source": {"layer_granularity": 2, "tokenizer_source": "base"},
}


def case_raw(zoo, name: str) -> dict:
    method = next(
        m for m in ("task_arithmetic", "dare_ties", "linear", "ties", "slerp") if name.startswith(m)
    )
    genome = {k: v for k, v in CASES[name].items() if v is not None}
    raw = evolve_raw(zoo, method, **genome)
    if name in ("dare_ties_base_in_models", "linear_base_in_models"):
        raw["genome"]["base_model"] = zoo["base"]
        raw["genome"]["models"].append(zoo["base"])
    return raw


@pytest.mark.mergekit
@pytest.mark.parametrize("name", list(CASES))
def test_start_point_decodes_to_mergekits_initial_genotype(zoo, name):
    raw = case_raw(zoo, name)
    space, genome = build(raw), mergekit_genome(raw)
    x0 = genome.initial_genotype().view(-1).numpy()
    assert space.dim == x0.size
    assert space.initial_genotype() == pytest.approx(x0.tolist(), abs=1e-7)
    ours = space.decode(space.start_point()).to_dict()
    assert rounded(ours, 6) == rounded(
        mergekit_recipe(genome, x0), 6
    )  # mergekit's start is float32
    assert ours["parameters"]["int8_mask"] is True and ours["dtype"] == "bfloat16"


@pytest.mark.mergekit
@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_genotypes_decode_as_mergekits_genome(zoo, name):
    raw = case_raw(zoo, name)
    space, genome = build(raw), mergekit_genome(raw)
    n = space.dim
    picks = [
        np.linspace(-0.4, 1.7, n),  # negatives (abs), densities above 1 (clamp)
        np.linspace(1.2, -0.9, n),  # the top-2 of slerp in the other order
        np.random.default_rng(7).normal(0.3, 0.8, n),
        np.where(np.arange(n) % 2 == 0, 0.5, 0.25),  # ties between genes
    ]
    for genotype in picks:
        assert rounded(space.recipe_for_genotype(genotype.tolist()).to_dict(), 12) == rounded(
            mergekit_recipe(genome, genotype), 12
        )
    # a point of the unit cube decodes through its gene ranges to the same recipe as its genotype
    u = np.random.default_rng(1).uniform(size=n)
    genotype = space.genotype(u.tolist())
    assert space.point(genotype) == pytest.approx(u.tolist())
    assert rounded(space.decode(u.tolist()).to_dict(), 12) == rounded(
        mergekit_recipe(genome, genotype), 12
    )


def test_random_init_starts_from_uniform_genes_in_range(zoo):
    raw = evolve_raw(zoo, "ties", layer_granularity=2)
    raw["random_init"] = True
    space = build(raw)
    genes = space.initial_genotype(seed=3)
    assert genes == space.initial_genotype(seed=3) != space.initial_genotype(seed=4)
    assert all(0 <= g < 1 for g in genes) and len(set(genes)) == len(genes)
    assert space.genotype(space.start_point(seed=3)) == pytest.approx(genes)


def test_native_config_keeps_mergekits_defaults_and_fitness_ranking(zoo):
    raw = evolve_raw(zoo, "ties", layer_granularity=2)
    raw["tasks"].append(
        {"name": "zoo_shift_dev", "weight": -0.5, "metric": "exact_match,strict-match"}
    )
    native = parse_search_config(native_config(parse_evolve_config(raw)))
    assert native.budget.max_evals == 100 and native.dtype == "bfloat16"
    assert native.optimizer.kind == "cma" and native.optimizer.sigma0 == pytest.approx(1 / 6)
    tasks = [(t.name, t.metric, t.weight, t.higher_is_better) for t in native.tasks]
    assert tasks == [
        ("zoo_addition_dev", "acc", 2.0, True),
        ("zoo_reversal_dev", "acc", 1.0, True),
        ("zoo_shift_dev", "exact_match/strict-match", 0.5, False),
    ]
    # mergekit: sum of weight x metric; evomerge: that sum / sum(|weight|), so the ranking is the same
    metrics = np.random.default_rng(0).uniform(size=(20, 3))
    mergekit_fitness = metrics @ np.array([2.0, 1.0, -0.5])
    ours = (metrics * np.array([1, 1, -1])) @ np.array([2.0, 1.0, 0.5]) / 3.5
    assert list(np.argsort(ours)) == list(np.argsort(mergekit_fitness))


BAD = {
    "unknown method": ({"merge_method": "della"}, "genome.merge_method"),
    "granularity not dividing": ({"layer_granularity": 3}, "genome.layer_granularity"),
    "smooth with slerp": ({"merge_method": "slerp", "smooth": True}, "genome.smooth"),
    "filters with slerp": ({"merge_method": "slerp", "filters": ["mlp"]}, "genome.filters"),
    "missing base model": ({"merge_method": "ties", "base_model": None}, "genome.base_model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_evolve_config_is_refused_as_mergekit_refuses_it(zoo, tmp_path, case):
    change, field = BAD[case]
    raw = evolve_raw(zoo, "ties")
    raw["genome"].update(change)
    raw["genome"] = {k: v for k, v in raw["genome"].items() if v is not None}
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(raw))
    for command in (["search", str(path), "--out", str(tmp_path / "run")], ["migrate", str(path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert "\n" not in message and f"{field}:" in message, message
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception):  # noqa: B017 (mergekit raises AssertionError or pydantic's ValidationError)
        mergekit_genome(raw)


def test_unknown_evolve_field_is_refused(zoo):
    raw = evolve_raw(zoo, "ties")
    raw["genome"]["smoth"] = True
    with pytest.raises(ConfigError, match=r"genome\.smoth: unknown field"):
        parse_evolve_config(raw)


def test_migrate_writes_a_native_config_with_the_flags_mapped(zoo, tmp_path):
    raw = evolve_raw(
        zoo, "dare_ties", layer_granularity=2, filters=["mlp"], allow_negative_weights=True
    )
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "search.yaml"
    flags = [
        "--max-fevals",
        "40",
        "--vllm",
        "--num-gpus",
        "4",
        "--storage-path",
        "/data/evo",
        "--strategy",
        "buffered",
        "--sigma0",
        "0.5",
        "--force-population-size",
        "8",
        "--timeout",
        "600",
        "--in-memory",
        "--batch-size",
        "16",
        "--wandb",
        "--task-search-path",
        str(tmp_path),
    ]
    result = runner.invoke(app, ["migrate", str(path), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    native = parse_search_config(yaml.safe_load(text))
    assert native.budget.max_evals == 40 and native.budget.max_minutes == 10
    assert (
        native.backend == "vllm"
        and native.workers == 4
        and native.device == "cuda"
        and native.batch_size == 16
    )
    assert native.optimizer.popsize == 8 and native.optimizer.sigma0 == pytest.approx(
        0.25
    )  # gene range [-1, 1]
    assert native.task_paths == [str(tmp_path)]
    assert native.space.genome is not None and native.space.genome.allow_negative_weights
    assert native.space.filters == ["mlp"] and native.space.layer_granularity == 2
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("--strategy buffered: no counterpart" in c for c in comments)
    assert any("--in-memory: no counterpart" in c for c in comments)
    assert any("--wandb: no counterpart" in c for c in comments)
    assert any(f"evomerge search {out} --out /data/evo --gpus-per-worker 1" in c for c in comments)
    # without --out: the same config on stdout
    printed = runner.invoke(app, ["migrate", str(path)])
    assert (
        printed.exit_code == 0
        and parse_search_config(yaml.safe_load(printed.stdout)).budget.max_evals == 100
    )


def test_flags_without_counterpart_each_get_a_comment():
    from evomerge.evolve_config import flag_comments

    every = EvolveFlags(
        in_memory=True,
        merge_cuda=False,
        trust_remote_code=True,
        allow_crimes=True,
        wandb=True,
        save_final_model=False,
        reshard=False,
        load_in_8bit=True,
        load_in_4bit=True,
        allow_benchmark_tasks=True,
        strategy="pool",
    )
    no_counterpart = [c for c in flag_comments(every) if "no counterpart" in c]
    assert len(no_counterpart) == 10


def test_search_runs_an_evolve_config_as_it_is(zoo, tmp_path):
    raw = evolve_raw(zoo, "ties", layer_granularity=2, filters=["mlp"])
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "search",
            str(path),
            "--out",
            str(run_dir),
            "--max-evals",
            "3",
            "--workers",
            "0",
            "--no-save-best",
            "--no-report",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "genes are searched in bounded ranges" in result.output
        and "sum of |weight|" in result.output
    )
    assert "not applied by evomerge: apply_chat_template" in result.output
    trials = read_trials(run_dir)
    assert len(trials) == 3 and all(t.status == "ok" for t in trials)
    space = build(raw)  # trial 0 is the genome's start point: weight 1/3, density 1 everywhere
    assert rounded(trials[0].recipe, 9) == rounded(space.decode(space.start_point()).to_dict(), 9)
    # the fitness is the weighted mean (weights 2 and 1) of the two dev accuracies
    m = trials[0].metrics
    assert trials[0].fitness == pytest.approx(
        (2 * m["zoo_addition_dev"]["acc"] + m["zoo_reversal_dev"]["acc"]) / 3
    )
    best = max(trials, key=lambda t: t.fitness)
    assert Recipe.load(run_dir / "best.yaml").to_dict() == best.recipe
    documents = list(yaml.safe_load_all((run_dir / "best_config.yaml").read_text()))
    assert len(documents) == 1 and documents[0] == best.recipe
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_config.MergeConfiguration.model_validate(documents[0])  # mergekit reads it
    assert (
        Path(run_dir / "config.yaml").exists()
        and "genome" in yaml.safe_load((run_dir / "config.yaml").read_text())["space"]
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tokenizer_source": "union"}, "genome.tokenizer_source"),
        (
            {"merge_method": "slerp", "layer_granularity": 2},
            "genome.base_model",
        ),  # base outside models: a third source
        (
            {"merge_method": "linear"},
            "genome.base_model",
        ),  # base outside models: a source without a weight
        ({"models": []}, "genome.models"),
    ],
)
def test_configs_mergekit_would_fail_on_later_are_refused_up_front(zoo, change, field):
    raw = evolve_raw(zoo, "ties")
    raw["genome"].update(change)
    with pytest.raises(ConfigError, match=rf"{field}: "):
        parse_evolve_config(raw)


def test_evolve_config_without_tasks_is_refused(zoo):
    raw = evolve_raw(zoo, "ties")
    raw["tasks"] = []
    with pytest.raises(ConfigError, match=r"^<evolve config>: tasks: give at least one task$"):
        parse_evolve_config(raw)


def test_weight_zero_task_is_refused(zoo):
    raw = evolve_raw(zoo, "ties")
    raw["tasks"][0]["weight"] = 0
    with pytest.raises(ConfigError, match=r"tasks\.0\.weight: 0 adds nothing"):
        parse_evolve_config(raw)


def test_an_evolve_run_resumes_from_its_run_directory(zoo, tmp_path):
    from evomerge.run import search

    raw = evolve_raw(zoo, "linear", layer_granularity=4)
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    first = search(path, run_dir=run_dir, max_evals=2, workers=0, progress=False)
    assert first.trials == 2
    resumed = search(None, run_dir=run_dir, resume=True, max_evals=3, workers=0, progress=False)
    trials = read_trials(run_dir)
    assert resumed.trials == 3 and [t.id for t in trials] == [0, 1, 2]
    assert (run_dir / "best_config.yaml").exists()
