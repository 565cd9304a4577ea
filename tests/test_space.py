"""Search spaces: knob layout, decode -> Recipe, encode(decode(x)) == x, warm starts."""

import random

import pytest

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search_config import SpaceConfig, parse_search_config
from evomerge.space import SearchSpace

NAMES = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *[
        f"model.layers.{i}.{part}"
        for i in range(4)
        for part in (
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        )
    ],
]


def space(**kwargs) -> SearchSpace:
    cfg = SpaceConfig.model_validate(kwargs)
    return SearchSpace(
        cfg, models=["/m/a", "/m/b", "/m/c"], base_model="/m/base", num_layers=4, tensor_names=NAMES
    )


def test_knob_count_per_group_model_and_filter():
    s = space(
        methods=["ties"],
        layer_granularity=2,
        knobs={"weight": None, "density": None, "lambda": None},
    )
    assert s.dim == 2 * (3 + 3 + 1)
    f = space(
        methods=["ties"], layer_granularity=1, knobs={"weight": None}, filters=["self_attn", "mlp"]
    )
    assert f.dim == 4 * 3 * 3  # groups x models x (self_attn, mlp, rest)
    choice = space(
        methods=["ties", "task_arithmetic"],
        layer_granularity=4,
        knobs={"weight": None, "density": None},
    )
    assert choice.dim == 1 + 3 + 3


def test_decode_builds_slices_with_bounds_from_the_registry():
    s = space(
        methods=["ties"],
        layer_granularity=2,
        knobs={"weight": {"low": 0.0, "high": 2.0}, "density": None},
    )
    x = [0.5] * s.dim
    recipe = s.decode(x)
    assert recipe.merge_method == "ties" and len(recipe.slices) == 2
    src = recipe.slices[1].sources
    assert [x.model for x in src] == ["/m/base", "/m/a", "/m/b", "/m/c"]
    assert src[0].layer_range == (2, 4)
    assert src[1].parameters["weight"] == 1.0
    density = next(k for k in s.knobs if k.param == "density")
    assert density.param == "density"
    assert src[1].parameters["density"] == pytest.approx(
        density.low + 0.5 * (density.high - density.low)
    )
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_method_choice_per_group_uses_per_slice_methods():
    s = space(
        methods=["linear", "ties"], layer_granularity=2, knobs={"weight": None, "density": None}
    )
    x = [0.5] * s.dim
    x[0] = 0.1  # group 0 -> linear
    x[s.dim // 2] = 0.9  # group 1 -> ties
    recipe = s.decode(x)
    assert [sl.merge_method for sl in recipe.slices] == ["linear", "ties"]
    assert [src.model for src in recipe.slices[0].sources] == [
        "/m/a",
        "/m/b",
        "/m/c",
    ]  # linear has no base
    assert "density" not in (recipe.slices[0].sources[0].parameters or {})
    assert (
        recipe.output_slices({m: 4 for m in recipe.referenced_models()})[1].merge_inputs()[0]
        == "/m/base"
    )


def test_filters_become_filter_lists_with_a_rest_entry():
    s = space(
        methods=["task_arithmetic"],
        layer_granularity=4,
        knobs={"weight": None},
        filters=["self_attn", "mlp"],
    )
    recipe = s.decode([0.0, 0.5, 1.0] * 3)
    setting = recipe.slices[0].sources[1].parameters["weight"]
    assert [c.filter for c in setting] == ["self_attn", "mlp", None]


def test_gradient_mode_gives_gradient_lists():
    s = space(
        methods=["task_arithmetic"], gradient_anchors=3, knobs={"weight": None, "lambda": None}
    )
    recipe = s.decode([0.0, 0.5, 1.0] * 4)
    assert recipe.models is not None
    weight = recipe.models[0].parameters["weight"]
    assert isinstance(weight, list) and len(weight) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(
            methods=["ties"],
            layer_granularity=1,
            knobs={"weight": None, "density": None, "lambda": None},
        ),
        dict(
            methods=["dare_ties"],
            layer_granularity=2,
            knobs={"weight": None, "density": None},
            filters=["self_attn", "mlp"],
        ),
        dict(methods=["task_arithmetic"], gradient_anchors=3, knobs={"weight": None}),
        dict(
            methods=["task_arithmetic"], gradient_anchors=4, knobs={"weight": None}, filters=["mlp"]
        ),
        dict(
            methods=["ties", "task_arithmetic", "linear"],
            layer_granularity=2,
            knobs={"weight": None, "density": None},
        ),
    ],
)
def test_encode_inverts_decode(kwargs):
    s = space(**kwargs)
    rng = random.Random(0)
    for _ in range(5):
        x = [rng.random() for _ in range(s.dim)]
        for i, k in enumerate(s.knobs):  # choices and unused knobs only round-trip to bin centres
            if k.kind == "choice":
                x[i] = k.encode(k.decode(x[i]))
        again = s.encode(s.decode(x))
        recipe = s.decode(x)
        for i, k in enumerate(s.knobs):
            if k.param == "merge_method" or _used(recipe, s, k):
                assert again[i] == pytest.approx(x[i], abs=1e-5), k.label


def _used(recipe, s, knob):
    if s.gradient_mode:
        return True
    method = recipe.slices[knob.group].merge_method or recipe.merge_method
    return any(
        p.name == knob.param
        for p in __import__("evomerge.methods.registry", fromlist=["get_method"])
        .get_method(method)
        .params
    )


def test_encode_a_hand_written_default_merge():
    s = space(
        methods=["ties"],
        layer_granularity=2,
        knobs={"weight": {"low": 0, "high": 1}, "density": None},
    )
    default = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "models": [
                {"model": m, "parameters": {"weight": 1 / 3, "density": 0.5}}
                for m in ("/m/a", "/m/b", "/m/c")
            ],
        }
    )
    x = s.encode(default)
    decoded = s.decode(x)
    for sl in decoded.slices:
        for src in sl.sources[1:]:
            assert src.parameters["weight"] == pytest.approx(1 / 3, abs=1e-5)
            assert src.parameters["density"] == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(methods=["ties"], knobs={"t": None}), "no method in \\['ties'\\] has parameter 't'"),
        (
            dict(methods=["slerp"], knobs={"t": None}),
            r"space.methods: merge_method 'slerp' takes exactly 1 model\(s\) besides the base, got 3",
        ),
        (dict(methods=["nope"], knobs={"weight": None}), "unknown merge_method 'nope'"),
    ],
)
def test_bad_spaces_fail_early(kwargs, message):
    with pytest.raises(Exception, match=message):
        space(**kwargs)


def test_search_config_errors_name_the_field():
    base = {
        "models": ["a"],
        "space": {"methods": ["linear"], "knobs": {"weight": None}},
        "tasks": ["t1"],
    }
    assert parse_search_config(base).tasks[0].name == "t1"
    assert parse_search_config({**base, "tasks": ["t1:acc_norm"]}).tasks[0].metric == "acc_norm"
    with pytest.raises(
        ConfigError, match="optimizer.kind: unknown optimizer kind 'sgd'; valid: cma, optuna-tpe"
    ):
        parse_search_config({**base, "optimizer": {"kind": "sgd"}})
    with pytest.raises(ConfigError, match="typo: unknown field"):
        parse_search_config({**base, "typo": 1})
    with pytest.raises(ConfigError, match="not both"):
        parse_search_config(
            {
                **base,
                "space": {
                    "methods": ["linear"],
                    "knobs": {"weight": None},
                    "layer_granularity": 1,
                    "gradient_anchors": 2,
                },
            }
        )
    assert parse_search_config({**base, "backend": "vllm"}).backend == "vllm"
    with pytest.raises(ConfigError, match="backend"):
        parse_search_config({**base, "backend": "tensorrt"})


@pytest.mark.parametrize(
    "path",
    sorted(
        __import__("pathlib").Path(__file__).parents[1].joinpath("search_spaces").glob("*.yaml")
    ),
    ids=lambda p: p.name,
)
def test_shipped_search_spaces_are_valid(path):
    import yaml

    config = parse_search_config(yaml.safe_load(path.read_text()), origin=str(path))
    if config.space is None:
        pytest.skip("a data-flow space: tests/test_dfs.py::test_shipped_dfs_spaces_are_valid")
    s = SearchSpace(
        config.space,
        models=config.models,
        base_model=config.base_model,
        num_layers=4,
        tensor_names=NAMES,
    )
    assert s.dim > 0
    recipe = s.decode([0.5] * s.dim)
    for item in config.warm_start:
        assert len(s.encode(Recipe.from_dict(item))) == s.dim
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    for name, baseline in config.baselines.items():
        Recipe.from_dict(baseline, origin=name)
