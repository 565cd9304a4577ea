"""Recipe format: load/dump, structure checks, and per-tensor parameter resolution."""

import pytest

from evomerge.errors import RecipeError
from evomerge.recipe import Recipe, evaluate_setting, resolve_params

TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.0, 1.0]
      density:
        - filter: mlp
          value: 0.3
        - value: 0.7
  - model: b
    parameters:
      weight: 0.5
parameters:
  density: 0.9
  lambda: 1.5
  normalize: false
dtype: bfloat16
"""

LAYERS = {"base": 4, "a": 4, "b": 4}


def test_load_dump_roundtrip_is_lossless():
    recipe = Recipe.from_yaml(TIES)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    assert "weight: [0.0, 1.0]" in recipe.to_yaml()  # numeric lists in flow style, like mergekit


def test_models_form_adds_base_as_source():
    (s,) = Recipe.from_yaml(TIES).output_slices(LAYERS)
    assert s.models == ["a", "b", "base"]
    assert s.merge_inputs() == ("base", ["a", "b"])
    assert s.num_layers == 4


@pytest.mark.parametrize(
    ("setting", "t", "expected"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([0.0, 1.0, 0.0], 0.75, 0.5),
        ([1.0, 2.0, 4.0, 8.0], 1 / 3, 2.0),
        ([1.0, 2.0, 4.0, 8.0], 0.5, 3.0),  # s = 1.5 between 2 and 4
        (0.3, 0.9, 0.3),
    ],
)
def test_gradient_interpolation(setting, t, expected):
    assert evaluate_setting(setting, tensor="x", t=t) == pytest.approx(expected)


def test_non_numeric_gradient_picks_by_floor():
    assert evaluate_setting([True, False], tensor="x", t=0.99) is True
    assert evaluate_setting([True, False], tensor="x", t=1.0) is False


def test_filters_first_match_wins_and_none_falls_through():
    recipe = Recipe.from_yaml(TIES)
    density = recipe.models[0].parameters["density"]
    assert evaluate_setting(density, tensor="model.layers.0.mlp.up_proj.weight", t=0) == 0.3
    assert evaluate_setting(density, tensor="model.layers.0.self_attn.q_proj.weight", t=0) == 0.7
    only_mlp = (
        Recipe.from_dict(
            {
                "merge_method": "ties",
                "base_model": "base",
                "models": [
                    {
                        "model": "a",
                        "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.2}]},
                    }
                ],
            }
        )
        .models[0]
        .parameters["density"]
    )
    assert evaluate_setting(only_mlp, tensor="model.layers.0.self_attn.q_proj.weight", t=0) is None


def test_precedence_model_then_slice_then_global():
    recipe = Recipe.from_yaml(TIES)
    (s,) = recipe.output_slices(LAYERS)
    names = {m: "model.layers.2.mlp.up_proj.weight" for m in s.models}
    p = resolve_params(
        recipe, s, t=1 / 3, out_tensor=names["a"], in_tensors=names, models=["a", "b"]
    )
    assert p.model_params["weight"] == pytest.approx([1 / 3, 0.5])
    assert p.model_params["density"] == pytest.approx(
        [0.3, 0.9]
    )  # b falls back to the global density
    assert p.global_params["lambda"] == 1.5
    assert p.global_params["normalize"] is False


def test_slice_parameters_sit_between_model_and_global():
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "parameters": {"weight": 0.1, "lambda": 0.5},
            "slices": [
                {
                    "sources": [
                        {"model": "base", "layer_range": [0, 2]},
                        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                        {"model": "b", "layer_range": [0, 2]},
                    ],
                    "parameters": {"weight": 0.4, "lambda": 2.0},
                }
            ],
        }
    )
    (s,) = recipe.output_slices(LAYERS)
    names = {m: "model.layers.0.mlp.up_proj.weight" for m in s.models}
    p = resolve_params(recipe, s, t=0, out_tensor=names["a"], in_tensors=names, models=["a", "b"])
    assert p.model_params["weight"] == pytest.approx([0.9, 0.4])
    assert p.global_params["lambda"] == 2.0


def test_defaults_and_required():
    recipe = Recipe.from_dict(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]}
    )
    (s,) = recipe.output_slices(LAYERS)
    names = {m: "w" for m in s.models}
    with pytest.raises(RecipeError, match="missing required parameter 'weight'.*'a'"):
        resolve_params(recipe, s, t=0, out_tensor="w", in_tensors=names, models=["a"])


def test_slices_layer_t_and_stacking():
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 3]}]},
                {"sources": [{"model": "a", "layer_range": [1, 2]}]},
            ],
        }
    )
    first, second = recipe.output_slices(LAYERS)
    assert [first.layer_t(i) for i in range(3)] == [0.0, 0.5, 1.0]
    assert second.layer_t(0) == 1.0  # mergekit: a one-layer slice sits at t = 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"merge_method": "nope", "models": [{"model": "a"}]}, "unknown merge_method 'nope'"),
        (
            {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]},
            "needs a base_model",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
            },
            "exactly one of 'models' or 'slices'",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1, "density": 1.5}}],
            },
            "density",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b"}],
                "parameters": {"t": 2},
            },
            "t",
        ),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "dtype"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "bogus": 1},
            "bogus: unknown field",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}],
            },
            "layer_range",
        ),
    ],
)
def test_bad_recipes_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_della_epsilon_constraint_is_checked():
    data = {
        "merge_method": "della",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}],
    }
    recipe = Recipe.from_dict(data)  # each value is in range on its own
    with pytest.raises(RecipeError, match="epsilon"):
        import torch

        (s,) = recipe.output_slices(LAYERS)
        s.method.merge(
            torch.zeros(4),
            [torch.ones(4)],
            {"weight": [1.0], "density": [0.9], "epsilon": [0.2]},
            {"lambda": 1.0, "normalize": True, "rescale": True, "int8_mask": False},
            torch.Generator().manual_seed(0),
        )


def test_layer_range_past_model_and_model_counts():
    bad_range = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 9]}]}],
        }
    )
    with pytest.raises(RecipeError, match="past its 4 layers"):
        bad_range.output_slices(LAYERS)
    slerp3 = Recipe.from_dict(
        {
            "merge_method": "slerp",
            "base_model": "base",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": 0.5},
        }
    )
    with pytest.raises(RecipeError, match="slerp.*exactly 1"):
        slerp3.output_slices(LAYERS)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: malformed YAML"):
        Recipe.load(path)
    with pytest.raises(RecipeError, match="not found"):
        Recipe.load(tmp_path / "missing.yaml")


def test_tokenizer_source():
    base = {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 1}},
            {"model": "b", "parameters": {"weight": 1}},
        ],
    }
    assert Recipe.from_dict(base).tokenizer_model() == "a"
    assert Recipe.from_dict({**base, "tokenizer_source": "b"}).tokenizer_model() == "b"
    with pytest.raises(RecipeError, match="union"):
        Recipe.from_dict({**base, "tokenizer_source": "union"}).tokenizer_model()
    with pytest.raises(RecipeError, match="not both"):
        Recipe.from_dict({**base, "tokenizer_source": "a", "tokenizer": {"source": "a"}})


def test_per_slice_merge_method_extension():
    recipe = Recipe.from_dict(
        {
            "merge_method": "linear",
            "base_model": "base",
            "slices": [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1}},
                        {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 1}},
                    ]
                },
                {
                    "merge_method": "ties",
                    "sources": [
                        {"model": "base", "layer_range": [2, 4]},
                        {"model": "a", "layer_range": [2, 4], "parameters": {"weight": 1}},
                        {"model": "b", "layer_range": [2, 4], "parameters": {"weight": 1}},
                    ],
                },
            ],
        }
    )
    assert recipe.methods() == ["linear", "ties"]
    first, second = recipe.output_slices(LAYERS)
    assert first.merge_inputs() == (None, ["a", "b"])
    assert second.merge_inputs() == ("base", ["a", "b"])


def test_a_parameter_only_other_methods_read_is_ignored_with_a_warning_as_mergekit_does():
    # mergekit-evolve writes int8_mask and normalize into every recipe, whatever its method
    data = {
        "merge_method": "slerp",
        "base_model": "a",
        "parameters": {"t": 0.5, "normalize": True},
        "models": [{"model": "a"}, {"model": "b"}],
    }
    with pytest.warns(
        UserWarning, match="merge_method 'slerp' does not use parameter 'normalize'; ignored"
    ):
        Recipe.from_dict(data)
    with pytest.raises(RecipeError, match="has no parameter 'normalise'; valid: t"):
        Recipe.from_dict({**data, "parameters": {"t": 0.5, "normalise": True}})
