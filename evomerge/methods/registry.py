"""The merge-method registry: each method's parameters (scope, default, valid range, search
bounds), input contract, and a uniform `merge` that calls its kernel.

Recipe validation, the merge engine and search spaces all read these declarations; parameter
names are mergekit's YAML names ("lambda", not the kernels' `lambda_`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evomerge.errors import RecipeError
from evomerge.methods import interpolation, specialized
from evomerge.methods.sparsify import Sparsifier, check_della
from evomerge.methods.task_vectors import VARIANTS, TaskVectorVariant, merge_task_vectors

Scalar = float | int | bool | None
ModelParams = Mapping[str, Sequence[Any]]
GlobalParams = Mapping[str, Any]
# (base, models, model_params, global_params, generator) -> merged tensor. `base` is a tensor when
# the method's base is "required" (MethodSpec.merge checks), None when "unused", either if "optional".
Runner = Callable[
    [Any, Sequence[torch.Tensor], ModelParams, GlobalParams, torch.Generator | None], torch.Tensor
]
Constraint = Callable[[ModelParams, GlobalParams], None]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # mergekit's YAML name
    scope: Literal["model", "global"]  # per-model (source) parameter or global
    kind: Literal["float", "int", "bool"]
    default: Scalar  # used when the recipe doesn't give it
    required: bool = False
    low: float | None = None  # valid range (None: unbounded)
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    search_low: float | None = None  # sensible search bounds (search spaces read these)
    search_high: float | None = None
    log: bool = False
    doc: str = ""

    def interval(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "[" if self.low is not None and self.low_inclusive else "("
        right = "]" if self.high is not None and self.high_inclusive else ")"
        return f"{left}{low}, {high}{right}"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid for this parameter, or None when it is."""
        if value is None:
            return "is required" if self.required else None  # None otherwise means "the default"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if not math.isfinite(value):
            return "must be finite"
        if self.kind == "int" and value != int(value):
            return "must be an integer"
        too_low = self.low is not None and (
            value < self.low or (value == self.low and not self.low_inclusive)
        )
        too_high = self.high is not None and (
            value > self.high or (value == self.high and not self.high_inclusive)
        )
        return f"is outside {self.interval()}" if too_low or too_high else None


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    name: str
    run: Runner = field(repr=False, compare=False)
    params: tuple[ParamSpec, ...] = ()
    base: Literal["required", "optional", "unused"] = "required"
    min_models: int = 1  # count of non-base input models
    max_models: int | None = None
    stochastic: bool = False
    # Vocabulary-size mismatch: cut every model to the base's rows, or to the rows all share.
    embed_shape: Literal["base", "common"] = "base"
    # slerp/nearswap/arcee_fusion: the base is one endpoint (t=0) and there is exactly 1 model.
    uses_base_as_model: bool = False
    constraint: Constraint | None = field(default=None, repr=False, compare=False)
    reference: str = ""
    doc: str = ""

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(sorted(p.name for p in self.params)) or "none"
        raise RecipeError(f"merge_method '{self.name}' has no parameter '{name}'; valid: {valid}")

    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    def validate(self, value_name: str, value: Any, where: str) -> None:
        """RecipeError naming the value and `where` it came from when it is out of range."""
        problem = self.param(value_name).problem(value)
        if problem is not None:
            shown = f"{value:g}" if isinstance(value, float) else repr(value)
            raise RecipeError(f"{value_name}={shown} for {where} {problem} ({self.name})")

    def model_count_problem(self, n: int) -> str | None:
        """Why the method cannot merge `n` models (besides the base, if it takes one), or None."""
        if n >= self.min_models and (self.max_models is None or n <= self.max_models):
            return None
        if self.max_models == self.min_models:
            expected = f"exactly {self.min_models}"
        elif self.max_models is None:
            expected = f"at least {self.min_models}"
        else:
            expected = f"{self.min_models} to {self.max_models}"
        besides = " besides the base" if self.base != "unused" else ""
        return f"merge_method '{self.name}' takes {expected} model(s){besides}, got {n}"

    def check_params(self, model_params: ModelParams, global_params: GlobalParams) -> None:
        """Constraints between parameters (e.g. della's density +/- epsilon in (0, 1))."""
        if self.constraint is not None:
            self.constraint(model_params, global_params)

    def merge(
        self,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        model_params: ModelParams,
        global_params: GlobalParams,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge one tensor. `model_params` are aligned with `models`; missing entries get defaults."""
        if self.base == "required" and base is None:
            raise RecipeError(f"merge_method '{self.name}' needs a base tensor")
        n = len(models)
        problem = self.model_count_problem(n)
        if problem is not None:
            raise RecipeError(problem)
        mp = self._filled_model_params(model_params, n)
        gp = self._filled_global_params(global_params)
        self.check_params(mp, gp)
        reference = base if base is not None else models[0]
        return self.run(base if self.base != "unused" else None, models, mp, gp, generator).to(
            reference.dtype
        )

    def _filled_model_params(self, given: ModelParams, n: int) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for p in self.model_params():
            values = list(given[p.name]) if given.get(p.name) is not None else [None] * n
            if len(values) != n:
                raise ValueError(f"{self.name}: {len(values)} values of '{p.name}' for {n} models")
            if p.required and any(v is None for v in values):
                raise RecipeError(f"merge_method '{self.name}' needs '{p.name}' for every model")
            out[p.name] = [p.default if v is None else v for v in values]
        return out

    def _filled_global_params(self, given: GlobalParams) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.global_params():
            value = given.get(p.name)
            if value is None and p.required:
                raise RecipeError(f"merge_method '{self.name}' needs parameter '{p.name}'")
            out[p.name] = p.default if value is None else value
        return out


# ---- parameter declarations -------------------------------------------------------------


def _weight(doc: str = "this model's weight") -> ParamSpec:
    return ParamSpec(
        "weight", "model", "float", None, required=True, search_low=0.0, search_high=1.0, doc=doc
    )


def _flag(name: str, default: bool, doc: str) -> ParamSpec:
    return ParamSpec(name, "global", "bool", default, search_low=0, search_high=1, doc=doc)


DENSITY = ParamSpec(
    "density", "model", "float", 1.0, low=0.0, high=1.0, search_low=0.1, search_high=1.0,
    doc="fraction of the task vector kept; 0 keeps nothing (the kernels handle it), 1 keeps all",
)  # fmt: skip
# DELLA's search box stays inside its constraint with the default epsilon (0.15):
# 0.2 - 0.15 > 0 and 0.8 + 0.15 < 1.
DELLA_DENSITY = ParamSpec(
    "density", "model", "float", 1.0, low=0.0, high=1.0, search_low=0.2, search_high=0.8,
    doc="target fraction kept; keep probabilities span density +/- epsilon",
)  # fmt: skip
GAMMA = ParamSpec(
    "gamma", "model", "float", 0.01, low=0.0, high=1.0, high_inclusive=False, search_low=0.0, search_high=0.1,
    doc="fraction of the largest-magnitude entries dropped (breadcrumbs' beta)",
)  # fmt: skip
EPSILON = ParamSpec(
    "epsilon", "model", "float", 0.15, low=0.0, search_low=0.0, search_high=0.15,
    doc="half-width of DELLA's keep-probability range; needs 0 < density - epsilon and density + epsilon < 1",
)  # fmt: skip
LAMBDA = ParamSpec(
    "lambda", "global", "float", 1.0, search_low=0.5, search_high=1.5,
    doc="scale of the merged task vector added to the base",
)  # fmt: skip
INT8_MASK = _flag("int8_mask", False, "store masks as int8 (memory only; no numeric effect)")
SLERP_T = ParamSpec(
    "t", "global", "float", None, required=True, low=0.0, high=1.0, search_low=0.0, search_high=1.0,
    doc="interpolation factor: 0 gives the base model, 1 the other",
)  # fmt: skip
NEARSWAP_T = ParamSpec(
    "t", "global", "float", None, required=True, low=0.0, search_low=1e-5, search_high=1e-2, log=True,
    doc="distance scale: parameters closer than t are taken from the other model entirely",
)  # fmt: skip


# ---- task-vector methods: one runner per variant --------------------------------------------


def _task_vector_runner(variant: TaskVectorVariant) -> Runner:
    def run(
        base: torch.Tensor,
        models: Sequence[torch.Tensor],
        mp: ModelParams,
        gp: GlobalParams,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return merge_task_vectors(
            base,
            models,
            variant,
            weight=mp["weight"],
            density=mp.get("density"),
            gamma=mp.get("gamma"),
            epsilon=mp.get("epsilon"),
            lambda_=gp["lambda"],
            normalize=gp["normalize"],
            rescale=gp["rescale"],
            generator=generator,
        )

    return run


# ---- cross-parameter constraints ---------------------------------------------------------


def _della_constraint(mp: ModelParams, gp: GlobalParams) -> None:
    for i, (density, epsilon) in enumerate(zip(mp["density"], mp["epsilon"], strict=True)):
        try:
            check_della(density, epsilon)
        except RecipeError as e:
            raise RecipeError(f"model #{i + 1}: {e}") from None


def _nonzero_weight_sum(flag: str) -> Constraint:
    def check(mp: ModelParams, gp: GlobalParams) -> None:
        if gp[flag] and abs(sum(mp["weight"])) < 1e-8:
            raise RecipeError(
                f"weights {list(mp['weight'])} sum to 0, so {flag}=true cannot divide by them"
            )

    return check


# ---- the methods ---------------------------------------------------------------------------


def _task_vector_method(variant: TaskVectorVariant) -> MethodSpec:
    params = [
        _weight(),
        DELLA_DENSITY if variant.sparsifier is Sparsifier.della_magprune else DENSITY,
        LAMBDA,
        _flag(
            "normalize",
            variant.default_normalize,
            "divide by the summed weights (of the kept signs)",
        ),
        _flag(
            "rescale", variant.default_rescale, "rescale kept entries to the task vector's L1 norm"
        ),
        INT8_MASK,
    ]
    if variant.sparsifier is Sparsifier.magnitude_outliers:
        params.append(GAMMA)
    if variant.sparsifier is Sparsifier.della_magprune:
        params.append(EPSILON)
    return MethodSpec(
        name=variant.name,
        params=tuple(params),
        stochastic=variant.sparsifier in (Sparsifier.random, Sparsifier.della_magprune),
        run=_task_vector_runner(variant),
        constraint=_della_constraint if variant.sparsifier is Sparsifier.della_magprune else None,
        reference=variant.reference,
    )


_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="linear",
        params=(_weight(), _flag("normalize", True, "divide by the sum of the weights")),
        base="unused",
        embed_shape="common",
        run=lambda base, models, mp, gp, gen: interpolation.linear(
            models, weight=mp["weight"], normalize=gp["normalize"]
        ),
        constraint=_nonzero_weight_sum("normalize"),
        reference="https://arxiv.org/abs/2203.05482",
        doc="weighted average",
    ),
    MethodSpec(
        name="slerp",
        params=(SLERP_T,),
        max_models=1,
        embed_shape="common",
        uses_base_as_model=True,
        run=lambda base, models, mp, gp, gen: interpolation.slerp(base, models[0], t=gp["t"]),
        reference="https://en.wikipedia.org/wiki/Slerp",
        doc="spherical interpolation from the base (t=0) to the other model (t=1)",
    ),
    MethodSpec(
        name="nuslerp",
        params=(
            _weight("relative weight; t = w2 / (w1 + w2)"),
            _flag("nuslerp_flatten", True, "slerp the flattened tensors (false: vector by vector)"),
            _flag("nuslerp_row_wise", False, "unflattened: slerp along dim 0, not the last dim"),
        ),
        base="optional",
        min_models=2,
        max_models=2,
        embed_shape="common",
        run=lambda base, models, mp, gp, gen: interpolation.nuslerp(
            base,
            models,
            weight=mp["weight"],
            nuslerp_flatten=gp["nuslerp_flatten"],
            nuslerp_row_wise=gp["nuslerp_row_wise"],
        ),
        doc="slerp of two models, or of their task vectors when a base is given",
    ),
    MethodSpec(
        name="multislerp",
        params=(
            _weight(),
            _flag("normalize_weights", True, "normalize the weights to sum 1"),
            ParamSpec(
                "eps",
                "global",
                "float",
                1e-8,
                low=0.0,
                low_inclusive=False,
                search_low=1e-10,
                search_high=1e-6,
                log=True,
                doc="numerical-stability constant",
            ),  # fmt: skip
        ),
        base="optional",
        embed_shape="common",
        run=lambda base, models, mp, gp, gen: interpolation.multislerp(
            base,
            models,
            weight=mp["weight"],
            normalize_weights=gp["normalize_weights"],
            eps=gp["eps"],
        ),
        constraint=_nonzero_weight_sum("normalize_weights"),
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        doc="barycentric interpolation on the hypersphere",
    ),
    MethodSpec(
        name="karcher",
        params=(
            ParamSpec(
                "max_iter",
                "global",
                "int",
                10,
                low=1,
                search_low=1,
                search_high=50,
                doc="maximum iterations",
            ),  # fmt: skip
            ParamSpec(
                "tol",
                "global",
                "float",
                1e-5,
                low=0.0,
                low_inclusive=False,
                search_low=1e-8,
                search_high=1e-3,
                log=True,
                doc="convergence tolerance",
            ),  # fmt: skip
        ),
        base="unused",
        embed_shape="common",
        run=lambda base, models, mp, gp, gen: interpolation.karcher(
            models, max_iter=int(gp["max_iter"]), tol=gp["tol"]
        ),
        reference="https://en.wikipedia.org/wiki/Karcher_mean",
        doc="Riemannian mean of the directions (equal weights), scaled by the mean norm",
    ),
    *(_task_vector_method(v) for v in VARIANTS.values()),
    MethodSpec(
        name="sce",
        params=(
            ParamSpec(
                "select_topk",
                "global",
                "float",
                1.0,
                low=0.0,
                high=1.0,
                search_low=0.1,
                search_high=1.0,
                doc="fraction of highest-variance positions kept",
            ),  # fmt: skip
            INT8_MASK,
        ),
        run=lambda base, models, mp, gp, gen: specialized.sce(
            base, models, select_topk=gp["select_topk"]
        ),
        reference="https://arxiv.org/abs/2408.07990",
        doc="select (variance), calculate (weights), erase (signs)",
    ),
    MethodSpec(
        name="model_stock",
        params=(_flag("filter_wise", False, "one interpolation factor per row, not per tensor"),),
        min_models=2,
        embed_shape="common",
        run=lambda base, models, mp, gp, gen: specialized.model_stock(
            base, models, filter_wise=gp["filter_wise"]
        ),
        reference="https://arxiv.org/abs/2403.19522",
        doc="interpolate from the base towards the models' mean by their geometry",
    ),
    MethodSpec(
        name="nearswap",
        params=(NEARSWAP_T,),
        max_models=1,
        uses_base_as_model=True,
        run=lambda base, models, mp, gp, gen: specialized.nearswap(base, models[0], t=gp["t"]),
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        doc="take the other model's values where they are already close to the base's",
    ),
    MethodSpec(
        name="arcee_fusion",
        max_models=1,
        embed_shape="common",
        uses_base_as_model=True,
        run=lambda base, models, mp, gp, gen: specialized.arcee_fusion(base, models[0]),
        reference="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
        doc="fuse only the important changes (|delta| x KL above median + 1.5 IQR)",
    ),
    MethodSpec(
        name="passthrough",
        params=(
            ParamSpec(
                "scale",
                "model",
                "float",
                None,
                search_low=0.5,
                search_high=1.5,
                doc="multiply the tensor by this (unset: unchanged)",
            ),  # fmt: skip
        ),
        base="unused",
        max_models=1,
        run=lambda base, models, mp, gp, gen: specialized.passthrough(
            models[0], scale=mp["scale"][0]
        ),
        doc="one source, unchanged or scaled",
    ),
)

METHODS: Mapping[str, MethodSpec] = types.MappingProxyType(
    {s.name: s for s in sorted(_SPECS, key=lambda s: s.name)}
)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method '{name}'; valid: {', '.join(METHODS)}") from None
