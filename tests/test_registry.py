"""The merge-method registry: names, parameter declarations, validation messages, `merge`."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.methods.registry import METHODS, MethodSpec, get_method

ALL = [
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
    "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
    "passthrough", "sce", "slerp", "task_arithmetic", "ties",
]  # fmt: skip
TASK_VECTOR = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]

# Parameter names per method, as mergekit's YAML spells them.
PARAMS = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    "nuslerp": {"weight", "nuslerp_flatten", "nuslerp_row_wise"},
    "multislerp": {"weight", "normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "sce": {"select_topk", "int8_mask"},
    "model_stock": {"filter_wise"},
    "nearswap": {"t"},
    "arcee_fusion": set(),
    "passthrough": {"scale"},
    **{
        m: {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"} for m in TASK_VECTOR
    },
}
PARAMS["breadcrumbs"] |= {"gamma"}
PARAMS["breadcrumbs_ties"] |= {"gamma"}
PARAMS["della"] |= {"epsilon"}
PARAMS["della_linear"] |= {"epsilon"}


def test_all_methods_registered_in_order():
    assert list(METHODS) == ALL
    with pytest.raises(TypeError):
        METHODS["mine"] = METHODS["linear"]  # type: ignore[index]


def test_unknown_method_lists_valid_names():
    with pytest.raises(
        RecipeError, match="unknown merge_method 'foo'; valid: arcee_fusion, breadcrumbs, "
    ) as e:
        get_method("foo")
    assert all(name in str(e.value) for name in ALL)


@pytest.mark.parametrize("name", ALL)
def test_declared_params(name):
    method = get_method(name)
    assert {p.name for p in method.params} == PARAMS[name]
    assert len(method.params) == len(PARAMS[name])  # no duplicates
    assert set(method.model_params()) | set(method.global_params()) == set(method.params)
    assert not set(method.model_params()) & set(method.global_params())


def test_scopes_and_defaults():
    ties = get_method("ties")
    assert ties.param("weight").scope == "model" and ties.param("weight").required
    assert ties.param("density").default == 1.0 and ties.param("density").scope == "model"
    assert ties.param("lambda").scope == "global" and ties.param("lambda").default == 1.0
    normalize = {m: get_method(m).param("normalize").default for m in TASK_VECTOR}
    rescale = {m: get_method(m).param("rescale").default for m in TASK_VECTOR}
    assert {m for m, v in normalize.items() if v} == {"ties", "della"}
    assert {m for m, v in rescale.items() if v} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("linear").param("normalize").default is True
    assert get_method("slerp").param("t").required
    assert get_method("passthrough").param("scale").default is None


def test_contracts():
    assert {m for m in ALL if get_method(m).uses_base_as_model} == {
        "slerp",
        "nearswap",
        "arcee_fusion",
    }
    assert {m for m in ALL if get_method(m).stochastic} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }
    assert {m for m in ALL if get_method(m).base == "unused"} == {
        "linear",
        "karcher",
        "passthrough",
    }
    assert {m for m in ALL if get_method(m).base == "optional"} == {"nuslerp", "multislerp"}
    for m in ("linear", "slerp", "nuslerp", "model_stock", "arcee_fusion"):
        assert get_method(m).embed_shape == "common", m
    for m in TASK_VECTOR:
        assert get_method(m).embed_shape == "base", m
    assert (get_method("nuslerp").min_models, get_method("nuslerp").max_models) == (2, 2)
    assert get_method("model_stock").min_models == 2
    for m in ("slerp", "nearswap", "arcee_fusion", "passthrough"):
        assert (get_method(m).min_models, get_method(m).max_models) == (1, 1), m


@pytest.mark.parametrize("name", ALL)
def test_bounds_are_sane(name):
    for p in get_method(name).params:
        assert p.search_low is not None and p.search_high is not None, p.name
        assert p.search_low < p.search_high, p.name
        if p.kind == "bool":
            assert (p.search_low, p.search_high) == (0, 1) and isinstance(p.default, bool)
            continue
        if p.low is not None and p.high is not None:
            assert p.low < p.high, p.name
        # The search box and the default are valid values.
        for value in (p.search_low, p.search_high, p.default):
            if value is not None:
                assert p.problem(value) is None, (p.name, value)
        if p.log:
            assert p.search_low > 0, p.name


def test_della_search_box_satisfies_its_constraint():
    della = get_method("della")
    d, e = della.param("density"), della.param("epsilon")
    assert d.search_low - max(e.search_high, e.default) > 0
    assert d.search_high + max(e.search_high, e.default) < 1


@pytest.mark.parametrize(
    ("method", "param", "value", "message"),
    [
        (
            "ties",
            "density",
            1.5,
            r"density=1.5 for model 'a', tensor x is outside \[0, 1\] \(ties\)",
        ),
        ("ties", "density", -0.1, r"density=-0.1 .* outside \[0, 1\]"),
        ("breadcrumbs", "gamma", 1.0, r"gamma=1 .* outside \[0, 1\)"),
        ("slerp", "t", -0.1, r"t=-0.1 .* outside \[0, 1\]"),
        ("della", "epsilon", -0.01, r"epsilon=-0.01 .* outside \[0, inf\)"),
        ("multislerp", "eps", 0.0, r"eps=0 .* outside \(0, inf\)"),
        ("karcher", "max_iter", 2.5, r"max_iter=2.5 .* must be an integer"),
        ("ties", "weight", math.nan, r"weight=nan .* must be finite"),
        ("ties", "weight", None, r"weight=None .* is required"),
        ("ties", "lambda", "big", r"lambda='big' .* must be a number"),
        ("ties", "normalize", 3, r"normalize=3 .* must be true or false"),
    ],
)
def test_validate_names_the_value(method, param, value, message):
    with pytest.raises(RecipeError, match=message):
        get_method(method).validate(param, value, "model 'a', tensor x")


def test_validate_accepts_edges_and_unknown_names_are_errors():
    ties = get_method("ties")
    for value in (0.0, 1.0, 0.5):
        ties.validate("density", value, "x")
    ties.validate("weight", -2.0, "x")  # weights may be negative
    get_method("passthrough").validate("scale", None, "x")  # unset scale means "unchanged"
    with pytest.raises(
        RecipeError,
        match="merge_method 'ties' has no parameter 'gamma'; valid: density, int8_mask, lambda",
    ):
        ties.validate("gamma", 0.1, "x")
    with pytest.raises(RecipeError, match="'arcee_fusion' has no parameter 't'; valid: none"):
        get_method("arcee_fusion").param("t")


# ---- merge: the uniform adapter ----------------------------------------------------------


def _inputs(
    method: MethodSpec, dtype: torch.dtype
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    n = max(method.min_models, 2 if method.max_models is None else method.min_models)
    models = [base + 0.1 * torch.randn(6, 8, generator=g) for _ in range(n)]
    if method.base == "unused":
        return None, [x.to(dtype) for x in models]
    return base.to(dtype), [x.to(dtype) for x in models]


def _params(method: MethodSpec, n: int) -> tuple[dict, dict]:
    values = {
        "weight": 0.6,
        "density": 0.5,
        "t": 0.3 if method.name == "slerp" else 0.05,
        "epsilon": 0.1,
    }
    model = {p.name: [values.get(p.name, p.default)] * n for p in method.model_params()}
    shared = {p.name: values.get(p.name, p.default) for p in method.global_params()}
    return model, shared


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_runs_every_method_and_keeps_dtype(name, dtype):
    method = get_method(name)
    base, models = _inputs(method, dtype)
    mp, gp = _params(method, len(models))
    g = torch.Generator().manual_seed(1) if method.stochastic else None
    out = method.merge(base, models, mp, gp, g)
    assert out.shape == models[0].shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    again = method.merge(
        base, models, mp, gp, torch.Generator().manual_seed(1) if method.stochastic else None
    )
    assert torch.equal(out, again)


def test_merge_fills_defaults_and_checks_inputs():
    ties = get_method("ties")
    base, x = torch.zeros(4), torch.tensor([1.0, -4, 2, -3])
    torch.testing.assert_close(ties.merge(base, [x], {"weight": [1.0]}, {}), x)  # density 1
    with pytest.raises(RecipeError, match="needs 'weight' for every model"):
        ties.merge(base, [x], {}, {})
    with pytest.raises(RecipeError, match="'ties' needs a base tensor"):
        ties.merge(None, [x], {"weight": [1.0]}, {})
    with pytest.raises(RecipeError, match="'slerp' needs parameter 't'"):
        get_method("slerp").merge(base, [x], {}, {})
    with pytest.raises(
        RecipeError, match=r"'nuslerp' takes exactly 2 model\(s\) besides the base, got 1"
    ):
        get_method("nuslerp").merge(None, [x], {"weight": [1.0]}, {})
    with pytest.raises(RecipeError, match="'model_stock' takes at least 2"):
        get_method("model_stock").merge(base, [x], {}, {})


def test_merge_checks_della_constraint_naming_both_values():
    della = get_method("della")
    args = (torch.zeros(4), [torch.ones(4)])
    with pytest.raises(RecipeError, match=r"model #1: .*density=0.95, epsilon=0.1"):
        della.merge(
            *args, {"weight": [1.0], "density": [0.95], "epsilon": [0.1]}, {}, torch.Generator()
        )
    with pytest.raises(RecipeError, match=r"model #2: .*density=0.1, epsilon=0.15"):
        della.merge(
            torch.zeros(4), [torch.ones(4)] * 2, {"weight": [1.0, 1.0], "density": [0.5, 0.1]}, {}
        )
    # Density 1 (the default) never prunes, so the default epsilon is fine there.
    out = della.merge(*args, {"weight": [1.0]}, {})
    torch.testing.assert_close(out, torch.ones(4))


def test_merge_linear_zero_weight_sum_is_a_recipe_error():
    linear = get_method("linear")
    xs = [torch.ones(3), torch.zeros(3)]
    with pytest.raises(RecipeError, match=r"weights \[0.5, -0.5\] sum to 0"):
        linear.merge(None, xs, {"weight": [0.5, -0.5]}, {"normalize": True})
    out = linear.merge(None, xs, {"weight": [0.5, -0.5]}, {"normalize": False})
    torch.testing.assert_close(out, torch.full((3,), 0.5))


def test_merge_passes_base_as_slerp_endpoint():
    slerp = get_method("slerp")
    base, other = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(slerp.merge(base, [other], {}, {"t": 0.0}), base)
    torch.testing.assert_close(slerp.merge(base, [other], {}, {"t": 1.0}), other)


def test_merge_ignores_base_for_methods_that_do_not_use_it():
    x = torch.tensor([1.0, 2.0])
    out = get_method("passthrough").merge(torch.zeros(2), [x], {"scale": [2.0]}, {})
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(get_method("passthrough").merge(None, [x], {}, {}), x)
