"""The up-front check: malformed search configs fail in seconds, in one line, with no run directory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError, RecipeError
from evomerge.preflight import check_search
from evomerge.recipe import Recipe
from evomerge.search_config import parse_search_config
from evomerge.task_index import TaskSpec

runner = CliRunner()
DEMO = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"


@pytest.fixture(scope="module")
def zoo(quick_zoo) -> dict[str, str]:
    return {"base": str(quick_zoo.base), **{s: str(p) for s, p in quick_zoo.specialists.items()}}


@pytest.fixture(scope="module")
def broken(zoo, tmp_path_factory) -> dict[str, str]:
    """Model directories that look fine until their config or tensors are compared."""
    root = tmp_path_factory.mktemp("broken")
    source = Path(zoo["addition"])

    def variant(
        name: str,
        config_edit: dict | None = None,
        drop: str | None = None,
        with_config: bool = True,
    ) -> str:
        out = root / name
        shutil.copytree(source, out)
        if not with_config:
            (out / "config.json").unlink()
        if config_edit:
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**config, **config_edit}))
        if drop:
            tensors = load_file(out / "model.safetensors")
            del tensors[drop]
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return str(out)

    return {
        "no_config": variant("no_config", with_config=False),
        "wide": variant("wide", {"hidden_size": 256}),
        "deep": variant("deep", {"num_hidden_layers": 6}),
        "holey": variant("holey", drop="model.layers.1.mlp.up_proj.weight"),
    }


def demo_like(zoo: dict[str, str]) -> dict:
    """search_spaces/demo.yaml with the quick zoo's paths for `zoo:` names."""
    text = DEMO.read_text()
    for name, path in zoo.items():
        text = text.replace(f"zoo:{name}", path)
    return yaml.safe_load(text)


def _set(config: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


# (case, {dotted field: new value} using {zoo names} / {broken names} in strings, what the one line says)
CASES = [
    (
        "model path missing",
        {"models.1": "/nowhere/model"},
        "models[1]: /nowhere/model does not exist",
    ),
    ("no config.json", {"models.0": "{no_config}"}, "models[0]: {no_config} has no config.json"),
    (
        "hidden_size differs",
        {"models.2": "{wide}"},
        "models[2] ({wide}): config.json hidden_size=256, the base's is 128",
    ),
    (
        "layer count differs",
        {"models.2": "{deep}"},
        "models[2] ({deep}): config.json has 6 layers, the base 4",
    ),
    (
        "tensor missing",
        {"models.1": "{holey}"},
        "models[1] ({holey}): tensor model.layers.1.mlp.up_proj.weight is missing",
    ),
    (
        "tokenizer_source missing",
        {"tokenizer_source": "/nowhere/tok"},
        "tokenizer_source: /nowhere/tok does not exist",
    ),
    (
        "unknown task",
        {"tasks.1": "zoo_reversal_dve"},
        "tasks[1]: unknown task 'zoo_reversal_dve'; close names: zoo_reversal_dev",
    ),
    (
        "metric not reported",
        {"tasks.0": "zoo_addition_dev:exact_match"},
        "tasks: task zoo_addition_dev does not report metric exact_match (it reports: acc)",
    ),
    (
        "duplicate task",
        {"tasks.2": "zoo_addition_dev"},
        "tasks: task zoo_addition_dev: metric acc is listed twice",
    ),
    (
        "task alone and in its group",
        {"tasks.2": "zoo_dev"},
        "tasks: task zoo_addition_dev is listed twice (through zoo_addition_dev and zoo_dev)",
    ),
    (
        "task_paths folder missing",
        {"task_paths": ["/nowhere/tasks"]},
        "task_paths[0]: folder not found: /nowhere/tasks",
    ),
    (
        "unknown test task",
        {"test_tasks.0": "zoo_addition_tset"},
        "test_tasks[0]: unknown task 'zoo_addition_tset'",
    ),
    (
        "knob above its range",
        {"space.knobs.density": {"high": 1.5}},
        "space.knobs.density.high=1.5 is outside density's range [0, 1] (ties)",
    ),
    (
        "knob below its range",
        {"space.knobs.density": {"low": -0.1}},
        "space.knobs.density.low=-0.1 is outside density's range [0, 1] (ties)",
    ),
    (
        "unknown knob",
        {"space.knobs.densty": None},
        "space.knobs.densty: unknown parameter 'densty' for ties; valid: density, int8_mask",
    ),
    (
        "inverted knob bounds",
        {"space.knobs.weight": {"low": 1.0, "high": 0.5}},
        "error: space.knobs.weight: needs finite bounds low <= high, got [1.0, 0.5]",
    ),
    (
        "log knob with low 0",
        {"space.methods": ["multislerp"], "space.knobs": {"weight": None, "eps": {"low": 0.0}}},
        "space.knobs.eps.low=0 is outside eps's range (0, inf) (multislerp)",
    ),
    (
        "knob that decodes to 0",
        {
            "space.methods": ["multislerp"],
            "space.knobs": {"weight": None, "eps": {"low": 1e-12, "high": 1e-9, "log": False}},
        },
        "space.knobs.eps: the range [1e-12, 1e-09] decodes to eps=0, outside eps's range (0, inf) (multislerp)",
    ),
    (
        "unknown fixed parameter",
        {"space.fixed": {"bogus_param": 1}},
        "space.fixed.bogus_param: unknown parameter 'bogus_param' for ties; valid: density",
    ),
    (
        "fixed value out of range",
        {"space.fixed": {"lambda": "big"}},
        "space.fixed.lambda='big' must be a number (ties)",
    ),
    (
        "baseline with a bad parameter",
        {"baselines.ties.models.0.parameters": {"weight": 0.3, "densty": 0.5}},
        "baselines.ties: models[0] ('{addition}').parameters: merge_method 'ties' has no parameter 'densty'",
    ),
    (
        "baseline value out of range",
        {"baselines.ties.models.0.parameters": {"weight": 0.3, "density": 1.5}},
        "density=1.5 for baselines.ties: models[0] ('{addition}').parameters.density is outside [0, 1] (ties)",
    ),
    (
        "baseline reads another model",
        {"baselines.linear.models.0.model": "{no_config}"},
        "baselines.linear: model {no_config} is not one of the search's models or base_model",
    ),
    (
        "warm start with a bad parameter",
        {"warm_start.0.models.0.parameters": {"weight": 0.5, "dens": 0.5}},
        "warm_start[0]: models[0] ('{addition}').parameters: merge_method 'ties' has no parameter 'dens'",
    ),
    (
        "warm start reads another model",
        {"warm_start.0.models.0.model": "{wide}"},
        "warm_start[0]: model {wide} is not one of",
    ),
    ("unknown field", {"optimzer": {}}, "optimzer: unknown field"),
    ("task spec typo", {"tasks.0": {"name": "zoo_addition_dev", "wieght": 2}}, "tasks: task spec"),
]


def _fill(value, names: dict[str, str]):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return value


@pytest.mark.parametrize(("edits", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_search_config_fails_in_one_line_before_any_work(
    edits, expected, zoo, broken, tmp_path, capfd
):
    names = {**zoo, **broken}
    config = demo_like(zoo)
    for dotted, value in edits.items():
        _set(config, dotted, _fill(value, names))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    # (a case the check missed would run a cheap in-process search and fail the asserts below)
    args = ["--workers", "0", "--max-evals", "1", "--no-save-best", "--no-report"]
    result = runner.invoke(app, ["search", str(path), "--out", str(run_dir), *args])
    seconds = time.perf_counter() - started
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert _fill(expected, names) in lines[0]
    assert not run_dir.exists()
    assert capfd.readouterr().err == ""  # nothing from the libraries either
    assert seconds < 60


def test_a_valid_demo_config_passes_in_seconds_and_resolves_main_metrics(zoo):
    config = parse_search_config(demo_like(zoo))
    started = time.perf_counter()
    checked = check_search(config)
    seconds = time.perf_counter() - started
    assert seconds < 15, f"preflight took {seconds:.1f} s"
    # a bare name means the main metric; zoo's multiple-choice tasks report acc, as before
    assert [t.metric for t in checked.tasks + checked.test_tasks] == ["acc"] * 6
    assert [t.name for t in checked.tasks] == [t.name for t in config.tasks]


def test_multislerp_eps_on_its_registry_range_decodes_above_zero(zoo):
    config = demo_like(zoo)
    config["space"] = {"methods": ["multislerp"], "knobs": {"weight": None, "eps": None}}
    config["warm_start"], config["baselines"] = [], {}
    checked = check_search(parse_search_config(config))
    assert checked.tasks


def test_search_preflight_runs_before_the_pool_starts(zoo, tmp_path):
    """search() calls the check before asking for any worker: no pool, no run directory."""
    from evomerge.run import search

    config = demo_like(zoo)
    config["tasks"] = ["zoo_addition_dev:exact_match"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))

    def no_pool(*args):
        raise AssertionError("a pool was asked for")

    with pytest.raises(ConfigError, match="does not report metric exact_match"):
        search(path, run_dir=tmp_path / "run", progress=False, pool_factory=no_pool)
    assert not (tmp_path / "run").exists()


def test_recipe_with_an_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(
        RecipeError,
        match=r"models\[0\] \('a'\)\.parameters: merge_method 'ties' has no parameter 'densty'; valid: density, int8_mask, lambda, normalize, rescale, weight",
    ):
        Recipe.from_dict(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1, "densty": 0.5}}],
            }
        )
    # a global parameter read by only one of the recipe's methods is fine; one no method reads is not
    slices = [
        {
            "merge_method": "ties",
            "sources": [
                {"model": "b", "layer_range": [0, 1]},
                {"model": "a", "layer_range": [0, 1], "parameters": {"weight": 1}},
            ],
        },
        {
            "merge_method": "linear",
            "sources": [{"model": "a", "layer_range": [1, 2], "parameters": {"weight": 1}}],
        },
    ]
    Recipe.from_dict(
        {"merge_method": "ties", "base_model": "b", "slices": slices, "parameters": {"lambda": 1.0}}
    )
    with pytest.raises(
        RecipeError, match=r"parameters: merge_method 'ties' or 'linear' has no parameter 'lamda'"
    ):
        Recipe.from_dict(
            {
                "merge_method": "ties",
                "base_model": "b",
                "slices": slices,
                "parameters": {"lamda": 1.0},
            }
        )


def test_one_task_spec_rule_in_search_configs_and_eval():
    config = parse_search_config(
        {
            "models": ["a"],
            "space": {"methods": ["linear"], "knobs": {"weight": None}},
            "tasks": ["t", {"name": "u"}, "v:acc_norm"],
        }
    )
    assert config.tasks == [TaskSpec("t"), TaskSpec("u"), TaskSpec("v", "acc_norm")]
    assert TaskSpec.parse("t") == TaskSpec.parse({"name": "t"}) == TaskSpec("t", "")


def test_merge_preflight_names_the_model(zoo, broken, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": zoo["addition"], "parameters": {"weight": 1}},
                    {"model": broken["holey"], "parameters": {"weight": 1}},
                ],
            }
        )
    )
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert (
        result.exit_code == 2
        and "tensor model.layers.1.mlp.up_proj.weight not found in model" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_eval_preflight_names_the_task(zoo, broken):
    result = runner.invoke(
        app, ["eval", zoo["addition"], "--tasks", "zoo_addition_dev:exact_match"]
    )
    assert (
        result.exit_code == 2
        and "--tasks: task zoo_addition_dev does not report metric exact_match" in result.output
    )
    result = runner.invoke(app, ["eval", broken["no_config"], "--tasks", "zoo_addition_dev"])
    assert result.exit_code == 2 and "has no config.json" in result.output
