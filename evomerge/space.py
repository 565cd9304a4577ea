"""A search space: which knobs exist, and how a point of the unit cube decodes into a Recipe.

Knobs come per layer group (or per gradient anchor) x per model x per filter, for the merge
parameters the config names; bounds come from the method registry unless the config overrides them.
A choice among several merge methods is one more coordinate per group, split into equal bins.
The space never merges anything: `decode(x) -> Recipe`, and `encode(recipe) -> x` for warm starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.io.layers import layer_index
from evomerge.methods.registry import MethodSpec, ParamSpec, get_method
from evomerge.recipe import Recipe, resolve_params
from evomerge.search_config import KnobBounds, SpaceConfig

REST = "*"  # the filter entry for tensors matching none of the configured filters


@dataclass(frozen=True)
class Knob:
    """One coordinate of the search vector."""

    param: str  # merge parameter name, or "merge_method" for a method choice
    group: int  # layer group (or gradient anchor) index
    model: str | None  # None for global parameters and method choices
    filter: str | None  # None when the space has no filters
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    kind: str = "float"  # float | int | bool | choice
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = [self.param, f"g{self.group}"]
        if self.model is not None:
            parts.append(self.model.rstrip("/").rsplit("/", 1)[-1])
        if self.filter is not None:
            parts.append(self.filter)
        return ".".join(parts)

    def decode(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        if self.kind == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.kind == "bool":
            return u >= 0.5
        if (
            self.log
        ):  # 6 significant digits: a log range may span 1e-10..1e-6, which 6 decimals round to 0
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            return int(round(value)) if self.kind == "int" else float(f"{value:.6g}")
        value = self.low + u * (self.high - self.low)
        return int(round(value)) if self.kind == "int" else round(value, 6)

    def encode(self, value: Any) -> float:
        if self.kind == "choice":
            return (self.choices.index(value) + 0.5) / len(self.choices)
        if self.kind == "bool":
            return 0.75 if value else 0.25
        v = min(max(float(value), self.low), self.high)
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)


def describe_knobs(knobs: Sequence[Any]) -> list[dict[str, Any]]:
    """The knobs in vector order, as `space.json` records them (what the report's plots read)."""
    return [
        {
            "label": k.label,
            "param": k.param,
            "group": k.group,
            "model": k.model,
            "filter": k.filter,
            "low": k.low,
            "high": k.high,
            "log": getattr(k, "log", False),
        }
        for k in knobs
    ]


class SearchSpace:
    def __init__(
        self,
        config: SpaceConfig,
        *,
        models: Sequence[str],
        base_model: str | None,
        num_layers: int,
        tensor_names: Sequence[str],
        dtype: str | None = None,
        tokenizer_source: str | None = None,
    ):
        self.config = config
        self.models = list(models)
        self.base_model = base_model
        self.num_layers = num_layers
        self.dtype = dtype
        self.tokenizer_source = tokenizer_source
        self.methods = [get_method(m) for m in config.methods]
        self.filters: list[str | None] = [*config.filters, REST] if config.filters else [None]
        self.groups = self._layer_groups()
        self._check_methods()
        self.knobs = self._build_knobs()
        self._representatives = _representative_tensors(tensor_names, self.filters)

    # ---- layout ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return len(self.knobs)

    @property
    def gradient_mode(self) -> bool:
        return self.config.gradient_anchors is not None

    def _layer_groups(self) -> list[tuple[int, int]]:
        if self.config.gradient_anchors is not None:
            return [(0, self.num_layers)] * self.config.gradient_anchors
        g = self.config.layer_granularity or self.num_layers
        return [(start, min(start + g, self.num_layers)) for start in range(0, self.num_layers, g)]

    def _check_methods(self) -> None:
        for method in self.methods:
            if method.base == "required" and self.base_model is None:
                raise ConfigError(f"space.methods: '{method.name}' needs base_model")
            problem = method.model_count_problem(len(self._merge_models(method)))
            if problem is not None:
                raise ConfigError(f"space.methods: {problem}")
        for name in self.config.knobs:
            if not any(_has_param(m, name) for m in self.methods):
                valid = sorted({p.name for m in self.methods for p in m.params})
                raise ConfigError(
                    f"space.knobs: no method in {self.config.methods} has parameter '{name}'; valid: {valid}"
                )

    def _merge_models(self, method: MethodSpec) -> list[str]:
        """The models that get knobs: every model but the base, whatever the method."""
        return [m for m in self.models if m != self.base_model]

    def _build_knobs(self) -> list[Knob]:
        knobs: list[Knob] = []
        names = list(self.config.knobs)
        for group in range(len(self.groups)):
            if len(self.methods) > 1:
                choices = tuple(m.name for m in self.methods)
                knobs.append(
                    Knob("merge_method", group, None, None, kind="choice", choices=choices)
                )
            for name in names:
                spec = self._param_spec(name)
                bounds = self._bounds(spec, self.config.knobs[name])
                owners: list[str | None] = (
                    list(self._merge_models(self.methods[0])) if spec.scope == "model" else [None]
                )
                for model in owners:
                    for f in self.filters:
                        knobs.append(Knob(name, group, model, f, *bounds))
        return knobs

    def _param_spec(self, name: str) -> ParamSpec:
        return next(m.param(name) for m in self.methods if _has_param(m, name))

    @staticmethod
    def _bounds(spec: ParamSpec, override: KnobBounds | None) -> tuple[float, float, bool, str]:
        low = spec.search_low if spec.search_low is not None else spec.low
        high = spec.search_high if spec.search_high is not None else spec.high
        log = spec.log
        if override is not None:
            low = override.low if override.low is not None else low
            high = override.high if override.high is not None else high
            log = override.log if override.log is not None else log
        if low is None or high is None or low > high:
            raise ConfigError(
                f"space.knobs.{spec.name}: needs finite bounds low <= high, got [{low}, {high}]"
            )
        kind = spec.kind if spec.kind in ("int", "bool") else "float"
        return float(low), float(high), bool(log), kind

    # ---- decode / encode ---------------------------------------------------------------

    def decode(self, x: Sequence[float]) -> Recipe:
        if len(x) != self.dim:
            raise ConfigError(f"point has {len(x)} coordinates, the space has {self.dim}")
        values: dict[tuple[str, int, str | None, str | None], Any] = {
            (k.param, k.group, k.model, k.filter): k.decode(u)
            for k, u in zip(self.knobs, x, strict=True)
        }
        return self._gradient_recipe(values) if self.gradient_mode else self._slice_recipe(values)

    def _method_of(self, values: dict, group: int) -> MethodSpec:
        if len(self.methods) == 1:
            return self.methods[0]
        return get_method(values[("merge_method", group, None, None)])

    def _setting(self, values: dict, param: str, group: int, model: str | None) -> Any:
        if self.filters == [None]:
            return values[(param, group, model, None)]
        return [
            {"value": values[(param, group, model, f)], **({"filter": f} if f != REST else {})}
            for f in self.filters
        ]

    def _slice_recipe(self, values: dict) -> Recipe:
        slices = []
        for group, (start, end) in enumerate(self.groups):
            method = self._method_of(values, group)
            sources = []
            if method.base != "unused" and self.base_model is not None:
                sources.append({"model": self.base_model, "layer_range": [start, end]})
            for model in self._merge_models(method):
                params = {
                    name: self._setting(values, name, group, model)
                    for name in self.config.knobs
                    if _has_param(method, name) and method.param(name).scope == "model"
                }
                sources.append(
                    {
                        "model": model,
                        "layer_range": [start, end],
                        **({"parameters": params} if params else {}),
                    }
                )
            shared = {
                name: self._setting(values, name, group, None)
                for name in self.config.knobs
                if _has_param(method, name) and method.param(name).scope == "global"
            }
            entry: dict[str, Any] = {"sources": sources}
            if shared:
                entry["parameters"] = shared
            if len(self.methods) > 1:
                entry["merge_method"] = method.name
            slices.append(entry)
        data: dict[str, Any] = {
            "merge_method": slices[0].get("merge_method", self.methods[0].name),
            "slices": slices,
        }
        return Recipe.from_dict(self._top_level(data), origin="search space")

    def _gradient_recipe(self, values: dict) -> Recipe:
        method = self.methods[0]
        anchors = range(len(self.groups))

        def gradient(param: str, model: str | None) -> Any:
            if self.filters == [None]:
                return [values[(param, a, model, None)] for a in anchors]
            return [
                {
                    "value": [values[(param, a, model, f)] for a in anchors],
                    **({"filter": f} if f != REST else {}),
                }
                for f in self.filters
            ]

        models = []
        for model in self._merge_models(method):
            params = {
                n: gradient(n, model) for n in self.config.knobs if method.param(n).scope == "model"
            }
            models.append({"model": model, **({"parameters": params} if params else {})})
        shared = {
            n: gradient(n, None) for n in self.config.knobs if method.param(n).scope == "global"
        }
        data: dict[str, Any] = {"merge_method": method.name, "models": models}
        return Recipe.from_dict(self._top_level(data, shared), origin="search space")

    def _top_level(
        self, data: dict[str, Any], shared: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if self.base_model is not None:
            data["base_model"] = self.base_model
        parameters = {**self.config.fixed, **(shared or {})}
        if parameters:
            data["parameters"] = parameters
        if self.dtype:
            data["dtype"] = self.dtype
        if self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        return data

    def encode(self, recipe: Recipe) -> list[float]:
        """The point whose decoding comes closest to `recipe` (values clipped to the bounds)."""
        layer_counts = {m: self.num_layers for m in recipe.referenced_models()}
        out_slices = recipe.output_slices(layer_counts)
        x = []
        for knob in self.knobs:
            layer = self._anchor_layer(knob.group)
            s, offset = _slice_at(out_slices, layer)
            t = s.layer_t(offset)
            if self.gradient_mode and len(out_slices) == 1 and len(self.groups) > 1:
                t = knob.group / (len(self.groups) - 1)  # exactly at the anchor
            if knob.param == "merge_method":
                x.append(
                    knob.encode(s.method.name if s.method.name in knob.choices else knob.choices[0])
                )
                continue
            if not _has_param(s.method, knob.param):
                x.append(0.5)
                continue
            tensor = self._representatives.get(
                (layer, knob.filter), f"model.layers.{layer}.{knob.filter}"
            )
            base, models = s.merge_inputs()
            in_names = {m: tensor for m in s.models}
            params = resolve_params(
                recipe, s, t=t, out_tensor=tensor, in_tensors=in_names, models=models
            )
            if knob.model is None:
                value = params.global_params[knob.param]
            elif knob.model in models:
                value = params.model_params[knob.param][models.index(knob.model)]
            else:
                value = 0.0
            x.append(knob.encode(value) if value is not None else 0.5)
        return x

    def _anchor_layer(self, group: int) -> int:
        if self.gradient_mode:
            k = len(self.groups)
            return round(group * (self.num_layers - 1) / (k - 1)) if k > 1 else self.num_layers - 1
        return self.groups[group][0]

    def describe(self) -> list[dict[str, Any]]:
        return describe_knobs(self.knobs)


def _has_param(method: MethodSpec, name: str) -> bool:
    return any(p.name == name for p in method.params)


def _slice_at(out_slices: list, layer: int) -> tuple[Any, int]:
    start = 0
    for s in out_slices:
        if layer < start + s.num_layers:
            return s, layer - start
        start += s.num_layers
    raise ConfigError(f"layer {layer} is outside the recipe's {start} layers")


def _representative_tensors(
    names: Sequence[str], filters: list[str | None]
) -> dict[tuple[int, str | None], str]:
    """For (layer, filter): a real tensor name in that layer the filter applies to (for encode)."""
    reps: dict[tuple[int, str | None], str] = {}
    concrete = [f for f in filters if f not in (None, REST)]
    for name in sorted(names):
        idx = layer_index(name)
        if idx is None:
            continue
        for f in filters:
            key = (idx, f)
            if key in reps:
                continue
            if (
                f is None
                or (f == REST and not any(c in name for c in concrete))
                or (f not in (None, REST) and f in name)
            ):
                reps[key] = name
    return reps
