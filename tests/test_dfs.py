"""Data-flow-space search: decode keeps paths valid, a path scores in memory without weight copies,
and the exported passthrough recipe builds (evomerge and mergekit) the model that was scored."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.dfs import DfsSpace, build_dfs_setup, read_source
from evomerge.errors import ConfigError, EvomergeError
from evomerge.io.reader import ModelReader
from evomerge.merge import LoadedModel, merge_to_disk
from evomerge.path_model import PathModel, ScaledOutput, live_model
from evomerge.recipe import Recipe
from evomerge.search_config import DfsConfig, parse_search_config


def _space(
    family, *, repeats=2, min_layers=1, max_layers=None, per="transition", low=0.5, high=2.0
):
    refs = [str(family["a"]), str(family["b"]), str(family["base"])]
    config = DfsConfig(
        repeats=repeats,
        min_layers=min_layers,
        max_layers=max_layers,
        scale={"low": low, "high": high, "per": per},
    )
    return DfsSpace(config, [read_source(r) for r in refs], dtype="float32"), refs


def _live(refs):
    return {
        r: live_model(src.config, src.tensors)
        for r, src in ((r, LoadedModel(ModelReader(r))) for r in refs)
    }


def _path_of(recipe: Recipe) -> list[tuple[str, int, float]]:
    steps = []
    for s in recipe.slices or []:
        src = s.sources[0]
        scale = (src.parameters or {}).get("scale")
        factor = scale[0].value if scale else 1.0
        steps += [(src.model, layer, factor) for layer in range(*src.layer_range)]
    return steps


def _random_points(space, n, seed=0):
    rng = random.Random(seed)
    return [[rng.random() for _ in range(space.dim)] for _ in range(n)]


# ---- the space ---------------------------------------------------------------------------


@pytest.mark.parametrize("per", ["transition", "layer"])
def test_decode_keeps_every_path_valid(llama_family, per):
    space, refs = _space(llama_family, repeats=2, min_layers=3, max_layers=6, per=per)
    assert space.dim == 24 + (13 * 12 if per == "transition" else 12)
    extremes = [[0.0] * space.dim, [1.0] * space.dim, [0.5] * space.dim]
    for x in extremes + _random_points(space, 50):
        recipe = space.decode(x)
        steps = _path_of(recipe)
        assert (
            steps[0][0] == refs[0] and steps[-1][0] == refs[0]
        )  # embeddings and head from model A
        real = [s for s in steps if s[2] != 0.0]
        no_ops = [s for s in steps if s[2] == 0.0]
        assert 3 <= len(real) <= 6
        assert len(no_ops) <= 2 and all(s[0] == refs[0] for s in no_ops)
        assert all(f > 0 for _, _, f in real)
        assert (
            recipe.merge_method == "passthrough"
            and Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict()
        )


def test_scale_folds_into_output_projections_only(llama_family):
    space, refs = _space(llama_family)
    recipe = space.decode(_random_points(space, 1, seed=3)[0])
    for s in recipe.slices or []:
        scale = (s.sources[0].parameters or {}).get("scale")
        if scale:
            assert [c.filter for c in scale] == ["o_proj", "down_proj", None]
            assert scale[0].value == scale[1].value and scale[2].value == 1.0


def test_encode_round_trips_the_path(llama_family):
    space, refs = _space(llama_family, max_layers=8)
    for x in _random_points(space, 30, seed=1):
        recipe = space.decode(x)
        again = space.decode(space.encode(recipe))
        a, b = _path_of(recipe), _path_of(again)
        assert [s[:2] for s in a] == [s[:2] for s in b]
        # each scale knob is rounded to 6 significant digits; a path's cumulative scales compound that
        assert [s[2] for s in a] == pytest.approx([s[2] for s in b], rel=1e-4)


def test_warm_start_model_a_alone_is_model_a(llama_family):
    space, refs = _space(llama_family)
    alone = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": refs[0], "layer_range": [0, 4]}]}],
        }
    )
    assert space.decode(space.encode(alone)).to_dict() == {**alone.to_dict(), "dtype": "float32"}


# ---- bad input, before any model loads ------------------------------------------------


def test_gpt2_is_refused(gpt2_family):
    with pytest.raises(
        ConfigError, match="gpt2.*pre-norm decoder with o_proj/down_proj and a final RMSNorm"
    ):
        read_source(str(gpt2_family["a"]))


def test_different_hidden_sizes_are_refused(llama_family, tmp_path):
    other = tmp_path / "wide"
    shutil.copytree(llama_family["b"], other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(config))
    sources = [read_source(str(llama_family["a"])), read_source(str(other))]
    with pytest.raises(ConfigError, match="differ in hidden_size"):
        DfsSpace(DfsConfig(), sources)


@pytest.mark.parametrize(
    ("dfs", "match"),
    [
        ({"min_layers": 9, "max_layers": 8}, "min_layers: 9 is more than max_layers"),
        ({"repeats": 1, "max_layers": 13}, "max_layers: 13 is more than the 12 slots"),
    ],
)
def test_path_length_bounds_the_models_cannot_meet(llama_family, dfs, match):
    sources = [read_source(str(llama_family[n])) for n in ("a", "b", "base")]
    with pytest.raises(ConfigError, match=match):
        DfsSpace(DfsConfig(**dfs), sources)


def _config(family, **dfs):
    return {
        "models": [str(family["a"]), str(family["b"])],
        "dfs": dfs,
        "tasks": ["zoo_addition_dev"],
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dfs": {"scale": {"low": 0.0}}}, "dfs.scale.low: Input should be greater than 0"),
        ({"dfs": {"scale": {"low": 2.0, "high": 1.0}}}, "high .* must be >= low"),
        ({"space": {"methods": ["ties"], "knobs": {"weight": None}}}, "exactly one of 'space'"),
    ],
)
def test_bad_dfs_config_is_one_line(llama_family, change, match):
    raw = {**_config(llama_family), **change}
    with pytest.raises(ConfigError, match=match) as err:
        parse_search_config(raw)
    assert "\n" not in str(err.value)


def test_vllm_backend_is_refused(llama_family):
    config = parse_search_config({**_config(llama_family), "backend": "vllm"})
    with pytest.raises(ConfigError, match="DFS scoring needs backend: hf"):
        build_dfs_setup(config)


# ---- the live path -------------------------------------------------------------------


def test_path_model_shares_weights_and_owns_its_layers(llama_family):
    space, refs = _space(llama_family)
    models = _live(refs)
    before = {r: [id(layer) for layer in m.model.layers] for r, m in models.items()}
    path = PathModel(models, refs[0])
    a = refs[0]
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": a,
                            "layer_range": [1, 2],
                            "parameters": {
                                "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]
                            },
                        }
                    ]
                },
                {"sources": [{"model": refs[1], "layer_range": [3, 4]}]},
            ],
        }
    )
    built = path.build(recipe)
    layers = path.shell.model.layers
    assert built.num_layers == 4 and path.shell.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert layers[1] is not layers[2]  # layer 1 of A, used twice: two modules ...
    assert (
        layers[2].mlp.down_proj.weight is models[a].model.layers[1].mlp.down_proj.weight
    )  # ... one set of weights
    assert (
        isinstance(layers[2].self_attn.o_proj, ScaledOutput)
        and layers[2].self_attn.o_proj.scale == 0.5
    )
    assert (
        layers[3].self_attn.q_proj.weight is models[refs[1]].model.layers[3].self_attn.q_proj.weight
    )
    assert (
        path.shell.lm_head.weight is models[refs[1]].lm_head.weight
    )  # head from the last slice (mergekit's rule)
    # the sources are untouched, hooks on a path layer included
    layers[1].register_forward_pre_hook(lambda *_: None)
    assert not models[a].model.layers[1]._forward_pre_hooks and not layers[2]._forward_pre_hooks
    assert {r: [id(layer) for layer in m.model.layers] for r, m in models.items()} == before
    assert models[a].config.num_hidden_layers == 4
    assert all(layer.self_attn.layer_idx == i for i, layer in enumerate(models[a].model.layers))
    assert all(type(layer.self_attn.o_proj) is torch.nn.Linear for layer in models[a].model.layers)


def _input_ids():
    return torch.randint(4, 40, (3, 10), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_in_memory_path_equals_merged_model_and_the_scaled_hidden_states(llama_family, tmp_path):
    """The exported recipe (folded scales) = the in-memory path = the paper's DFS (input multiplies), to RMSNorm's epsilon."""
    space, refs = _space(llama_family, min_layers=4, max_layers=8)
    models = _live(refs)
    path = PathModel(models, refs[0])
    ids = _input_ids()
    for i, x in enumerate(_random_points(space, 3, seed=7)):
        recipe = space.decode(x)
        path.build(recipe)
        ours = _logits(path.shell, ids)
        merge_to_disk(recipe, tmp_path / f"m{i}", progress=False)
        merged = _logits(_load(tmp_path / f"m{i}"), ids)
        torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)

        # the definition: multiply the hidden state entering each block by w_k, weights unscaled
        weights = iter(w for _, w in space.path(x))
        plain, ws = [], []
        for model, layer, factor in _path_of(recipe):
            source = {"model": model, "layer_range": [layer, layer + 1]}
            if factor == 0.0:  # the no-op layers that give model A's embeddings and head
                source["parameters"] = {
                    "scale": [
                        {"filter": "o_proj", "value": 0.0},
                        {"filter": "down_proj", "value": 0.0},
                        {"value": 1.0},
                    ]
                }
            plain.append({"sources": [source]})
            ws.append(1.0 if factor == 0.0 else next(weights))
        path.build(Recipe.from_dict({"merge_method": "passthrough", "slices": plain}))
        hooks = [
            layer.register_forward_pre_hook(_scale_input(w), with_kwargs=True)
            for layer, w in zip(path.shell.model.layers, ws, strict=True)
        ]
        try:
            scaled = _logits(path.shell, ids)
        finally:
            for h in hooks:
                h.remove()
        unscaled = _logits(path.shell, ids)
        assert (
            unscaled - merged
        ).abs().max().item() > 1e-2 * merged.abs().max().item()  # the scales matter
        assert (scaled - merged).abs().max().item() <= 1e-2 * merged.abs().max().item()


def _scale_input(w):
    def hook(_module, args, kwargs):
        if args:
            return (args[0] * w, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * w}

    return hook


def test_generation_uses_a_kv_cache_per_path_layer(llama_family, tmp_path):
    space, refs = _space(llama_family, min_layers=6, max_layers=8)
    path = PathModel(_live(refs), refs[0])
    recipe = space.decode(_random_points(space, 1, seed=11)[0])
    path.build(recipe)
    merge_to_disk(recipe, tmp_path / "m", progress=False)
    ids = _input_ids()[:1]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(
            path.shell.generate(ids, **kwargs), _load(tmp_path / "m").generate(ids, **kwargs)
        )


@pytest.mark.mergekit
def test_mergekit_builds_the_model_that_was_scored(llama_family, tmp_path):
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    from mergekit.options import MergeOptions

    space, refs = _space(llama_family, min_layers=5, max_layers=9)
    path = PathModel(_live(refs), refs[0])
    ids = _input_ids()
    for i, x in enumerate(_random_points(space, 2, seed=5)):
        recipe = space.decode(x)
        path.build(recipe)
        ours = _logits(path.shell, ids)
        config = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
        mergekit_merge.run_merge(
            config, str(tmp_path / f"mk{i}"), MergeOptions(quiet=True, write_model_card=False)
        )
        theirs = _logits(_load(tmp_path / f"mk{i}"), ids)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- PS+DFS: model A is a recipe -----------------------------------------------------------


def _ps_recipe(family, tmp_path) -> Path:
    data = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(family["b"]), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "ps_best.yaml"
    path.write_text(Recipe.from_dict(data).to_yaml())
    return path


def test_ps_dfs_recipe_model_merges_and_exports_for_mergekit(llama_family, tmp_path):
    from evomerge.export import to_mergekit_documents
    from evomerge.path_worker import PathEvaluator

    ps = _ps_recipe(llama_family, tmp_path)
    config = parse_search_config(
        {
            "models": [str(ps), str(llama_family["a"]), str(llama_family["b"])],
            "dfs": {"repeats": 1, "min_layers": 4, "max_layers": 8},
            "tasks": [{"name": "zoo_addition_dev"}],
            "limit": 4,
        }
    )
    setup = build_dfs_setup(config)
    assert setup.worker.evaluator == "path" and setup.worker.path_reference == str(ps)
    recipe = setup.space.decode(_random_points(setup.space, 1, seed=2)[0])
    assert recipe.slices[0].sources[0].model == str(ps)

    evaluator = PathEvaluator(setup.worker)
    evaluator.path.build(recipe)
    ids = _input_ids()
    ours = _logits(evaluator.path.shell, ids)
    merge_to_disk(
        recipe, tmp_path / "merged", progress=False
    )  # the PS merge is made in memory first
    torch.testing.assert_close(ours, _logits(_load(tmp_path / "merged"), ids), atol=1e-5, rtol=1e-5)

    documents = to_mergekit_documents(recipe)
    assert [d.get("name") for d in documents] == ["evomerge-model-0", None]
    assert documents[0]["merge_method"] == "ties"
    assert {s["sources"][0]["model"] for s in documents[1]["slices"]} <= {
        "evomerge-model-0",
        str(llama_family["a"]),
        str(llama_family["b"]),
    }
    mergekit_multi = pytest.importorskip("mergekit.scripts.multimerge")
    from click.testing import CliRunner  # mergekit's commands are plain click

    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump_all(documents))
    args = [
        str(multi),
        "--intermediate-dir",
        str(tmp_path / "parts"),
        "--out-path",
        str(tmp_path / "theirs"),
    ]
    result = CliRunner().invoke(mergekit_multi.main, args)
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(ours, _logits(_load(tmp_path / "theirs"), ids), atol=1e-5, rtol=1e-5)


def test_unknown_warm_start_model_is_refused(llama_family):
    space, refs = _space(llama_family)
    other = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "/elsewhere", "layer_range": [0, 1]}]}],
        }
    )
    with pytest.raises(EvomergeError, match="not one of the dfs models"):
        space.encode(other)


# ---- the search, end to end ------------------------------------------------------------------


def test_dfs_search_exports_the_model_it_scored(quick_zoo, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.export import trial_recipe
    from evomerge.report import make_report
    from evomerge.run import build_setup, search
    from evomerge.search_config import load_search_config
    from evomerge.workers import evaluator_class

    a, *others = (str(quick_zoo.specialists[s]) for s in quick_zoo.skills)
    config = {
        "models": [a, *others],
        "dfs": {"repeats": 2, "min_layers": 2, "max_layers": 8},
        "tasks": [f"zoo_{s}_dev" for s in quick_zoo.skills],
        "test_tasks": ["zoo_shift_test"],
        "limit": 8,
        "optimizer": {"kind": "cma", "popsize": 4, "sigma0": 0.3, "seed": 0},
        "warm_start": [
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}],
            }
        ],
        "budget": {"max_evals": 4},
        "workers": 0,
    }
    path = tmp_path / "dfs.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = search(path, run_dir=tmp_path / "run", progress=False)
    assert summary.trials == 4 and summary.failed == 0
    first = json.loads((tmp_path / "run" / "trials.jsonl").read_text().splitlines()[0])
    assert first["recipe"]["slices"] == [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}
    ]  # the warm start

    runner = CliRunner()
    out_yaml, merged = tmp_path / "best.yaml", tmp_path / "merged"
    assert (
        runner.invoke(app, ["export", str(summary.run_dir), "--out", str(out_yaml)]).exit_code == 0
    )
    recipe, record = trial_recipe(summary.run_dir)
    assert Recipe.load(out_yaml) == recipe and recipe.merge_method == "passthrough"
    result = runner.invoke(app, ["merge", str(out_yaml), "--out", str(merged), "-q"])
    assert result.exit_code == 0, result.output
    setup = build_setup(load_search_config(summary.run_dir / "config.yaml")[0])
    evaluator = evaluator_class(setup.worker)(setup.worker)
    assert evaluator.score_model_dir(str(merged)).fitness == pytest.approx(record.fitness, abs=1e-6)

    # the report of a DFS run: the best path and the sources, each also scored on the search's
    # `limit` items, where the best path scores its logged fitness again
    report = make_report(summary.run_dir)
    rows = {row["name"]: row for row in report["rows"]}
    evolved = rows[f"evolved (trial #{record.id})"]
    search_dev = [evolved["search_dev"][f"zoo_{s}_dev"] for s in quick_zoo.skills]
    assert sum(search_dev) / len(search_dev) == pytest.approx(record.fitness, abs=1e-6)
    assert set(rows) >= {
        f"evolved (trial #{record.id})",
        *(Path(m).name for m in config["models"]),
    }
    assert (summary.run_dir / "report.md").is_file()


def test_cli_refuses_a_gpt2_dfs_before_loading(gpt2_family, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    path = tmp_path / "dfs.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": [str(gpt2_family["a"]), str(gpt2_family["b"])],
                "dfs": {},
                "tasks": ["zoo_addition_dev"],
            }
        )
    )
    result = CliRunner().invoke(app, ["search", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "pre-norm decoder" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["dfs.yaml", "ps_dfs.yaml"])
def test_shipped_dfs_spaces_are_valid(name):
    from evomerge.dfs import PathSource

    path = Path(__file__).parents[1] / "search_spaces" / name
    config = parse_search_config(yaml.safe_load(path.read_text()), origin=str(path))
    assert config.dfs is not None and config.backend == "hf"
    sources = [PathSource(m, 4, {"hidden_size": 128, "vocab_size": 64}) for m in config.models]
    space = DfsSpace(config.dfs, sources, dtype=config.dtype)
    (warm,) = config.warm_start
    x = space.encode(Recipe.from_dict(warm))
    assert space.decode(x).to_dict() == {**Recipe.from_dict(warm).to_dict(), "dtype": config.dtype}
    for baseline_name, baseline in config.baselines.items():
        Recipe.from_dict(baseline, origin=baseline_name)
