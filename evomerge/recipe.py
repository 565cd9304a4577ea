"""Merge recipes: mergekit's YAML format, validated, with per-tensor parameter resolution.

A `Recipe` loads and dumps mergekit merge YAML without loss. Everything that decides which value a
parameter takes for one tensor (precedence, gradients, filters) lives here and nowhere else.

evomerge extension: a slice may name its own `merge_method` (used for per-layer method choice);
`evomerge export --mergekit` rewrites such a recipe into mergekit's one-method-per-file form.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.errors import RecipeError
from evomerge.methods.registry import METHODS, MethodSpec, ParamSpec, get_method

log = logging.getLogger(__name__)

Scalar = bool | int | float | str
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


class Conditional(BaseModel):
    """One entry of a filter list: applies `value` to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


# A parameter setting: a scalar, a gradient (list of scalars), or a filter list.
Setting = Scalar | list[Scalar] | Conditional | list[Conditional]
Parameters = dict[str, Setting]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class SliceEntry(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None
    merge_method: str | None = None  # evomerge extension: per-slice method
    residual_weight: float | None = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class TokenizerEntry(_Strict):
    source: str | None = None
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Strict):
    """The in-memory form of a mergekit merge YAML."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerEntry | None = None
    chat_template: str | None = None
    name: str | None = None  # mergekit-multi document name

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = DTYPE_ALIASES.get(v, v)
        if v not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype '{v}'; valid: bfloat16, float16, float32")
        return v

    @model_validator(mode="after")
    def _structure(self) -> Recipe:
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    # ---- load / dump -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, text: str, *, origin: str = "<recipe>") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{origin}: malformed YAML: {_one_line(e)}") from None
        if not isinstance(data, dict):
            raise RecipeError(
                f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}"
            )
        return cls.from_dict(data, origin=origin)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "<recipe>") -> Recipe:
        try:
            recipe = cls.model_validate(dict(data))
        except ValidationError as e:
            raise RecipeError(f"{origin}: {_pydantic_message(e)}") from None
        recipe.validate_methods(origin=origin)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return cls.from_yaml(path.read_text(), origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False)

    # ---- structure ---------------------------------------------------------------------

    def methods(self) -> list[str]:
        """Every merge method the recipe uses (the top-level one first)."""
        names = [self.merge_method]
        for s in self.slices or []:
            if s.merge_method and s.merge_method not in names:
                names.append(s.merge_method)
        return names

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, in order of first mention."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def tokenizer_model(self) -> str:
        """The model whose tokenizer files the output gets."""
        source = self.tokenizer_source or (self.tokenizer.source if self.tokenizer else None)
        if source in (None, "base"):
            return self.base_model or self.referenced_models()[0]
        if source == "union":
            raise RecipeError(
                "tokenizer_source 'union' is not supported yet; use 'base' or a model"
            )
        return source

    def output_slices(self, layer_counts: Mapping[str, int]) -> list[OutputSlice]:
        """Normalize `models:` / `slices:` into output slices, checking layer ranges.

        `layer_counts` maps every referenced model to its number of decoder layers.
        """
        if self.models is not None:
            sources = [
                SliceSource(
                    model=m.model,
                    layer_range=(0, _count(layer_counts, m.model)),
                    parameters=m.parameters,
                )
                for m in self.models
            ]
            if self.base_model and all(m.model != self.base_model for m in self.models):
                n = _count(layer_counts, self.base_model)
                sources.append(SliceSource(model=self.base_model, layer_range=(0, n)))
            entries = [SliceEntry(sources=sources)]
        else:
            entries = list(self.slices or [])

        out = []
        for i, entry in enumerate(entries):
            lengths = set()
            for src in entry.sources:
                n = _count(layer_counts, src.model)
                start, end = src.layer_range
                if end > n:
                    raise RecipeError(
                        f"slices[{i}]: layer_range [{start}, {end}) of model '{src.model}' is past its {n} layers"
                    )
                lengths.add(end - start)
            if len(lengths) != 1:
                raise RecipeError(
                    f"slices[{i}]: all sources must span the same number of layers, got {sorted(lengths)}"
                )
            method = get_method(entry.merge_method or self.merge_method)
            base = entry.base_model or self.base_model
            out.append(
                OutputSlice(
                    index=i,
                    sources=tuple(entry.sources),
                    base_model=base,
                    method=method,
                    parameters=entry.parameters or {},
                    num_layers=lengths.pop(),
                )
            )
            _check_model_count(out[-1], where=f"slices[{i}]" if self.slices else "models")
        return out

    # ---- validation --------------------------------------------------------------------

    def validate_methods(self, *, origin: str = "<recipe>") -> None:
        """Fail early: unknown methods, missing base models, parameter values out of range."""
        for i, s in enumerate(self.slices or []):
            method = get_method(s.merge_method or self.merge_method)
            base = s.base_model or self.base_model
            if method.base == "required" and base is None:
                raise RecipeError(
                    f"{origin}: slices[{i}]: merge_method '{method.name}' needs a base_model"
                )
        method = get_method(self.merge_method)
        if self.models is not None and method.base == "required" and self.base_model is None:
            raise RecipeError(f"{origin}: merge_method '{method.name}' needs a base_model")
        for where, params, scope, method_names in self._parameter_blocks():
            methods = [get_method(name) for name in method_names]
            _check_names(methods, params, where=f"{origin}: {where}")
            for method in methods:
                _validate_block(method, params, scope=scope, where=f"{origin}: {where}")

    def _parameter_blocks(self) -> list[tuple[str, Parameters, str, list[str]]]:
        """(where, parameters, scope, the methods that read them) for every parameters block."""
        blocks: list[tuple[str, Parameters, str, list[str]]] = []
        if self.parameters:
            blocks.append(("parameters", self.parameters, "any", self.methods()))
        for i, m in enumerate(self.models or []):
            if m.parameters:
                blocks.append(
                    (
                        f"models[{i}] ('{m.model}').parameters",
                        m.parameters,
                        "model",
                        [self.merge_method],
                    )
                )
        for i, s in enumerate(self.slices or []):
            method = [s.merge_method or self.merge_method]
            if s.parameters:
                blocks.append((f"slices[{i}].parameters", s.parameters, "any", method))
            for j, src in enumerate(s.sources):
                if src.parameters:
                    blocks.append(
                        (
                            f"slices[{i}].sources[{j}] ('{src.model}').parameters",
                            src.parameters,
                            "model",
                            method,
                        )
                    )
        return blocks


@dataclass(frozen=True)
class OutputSlice:
    """One normalized output slice: its sources, base, method and own parameters."""

    index: int
    sources: tuple[SliceSource, ...]
    base_model: str | None
    method: MethodSpec
    parameters: Mapping[str, Setting]
    num_layers: int

    @property
    def models(self) -> list[str]:
        return [s.model for s in self.sources]

    def merge_inputs(self) -> tuple[str | None, list[str]]:
        """(base, other models) as the kernel sees them.

        Methods that ignore a base get every source as a model; others get the base separately.
        """
        if self.method.base == "unused":
            return None, self.models
        base = self.base_model if self.base_model in self.models else None
        return base, [m for m in self.models if m != base]

    def layer_t(self, offset: int) -> float:
        """Gradient position of the `offset`-th layer of this slice (mergekit: t=1 for 1 layer)."""
        return offset / (self.num_layers - 1) if self.num_layers > 1 else 1.0


@dataclass(frozen=True)
class ResolvedParams:
    global_params: dict[str, Any]
    model_params: dict[str, list[Any]]  # aligned with the kernel's `models` list


def resolve_params(
    recipe: Recipe,
    out_slice: OutputSlice,
    *,
    t: float,
    out_tensor: str,
    in_tensors: Mapping[str, str],
    models: Sequence[str],
) -> ResolvedParams:
    """Every parameter value for one output tensor.

    Precedence: per-source -> slice -> global; the first non-null value wins. Global parameters
    match filters against the output tensor name, per-model ones against that model's input name.
    """
    method = out_slice.method
    shared_scopes = (out_slice.parameters, recipe.parameters)
    global_params = {
        p.name: _resolve_one(p, shared_scopes, tensor=out_tensor, t=t, where=out_tensor)
        for p in method.global_params()
    }
    model_params: dict[str, list[Any]] = {p.name: [] for p in method.model_params()}
    for model in models:
        source_params = next((s.parameters for s in out_slice.sources if s.model == model), None)
        scopes = (source_params, out_slice.parameters, recipe.parameters)
        name = in_tensors.get(model, out_tensor)
        for p in method.model_params():
            where = f"model '{model}', tensor {name}"
            model_params[p.name].append(_resolve_one(p, scopes, tensor=name, t=t, where=where))
    return ResolvedParams(global_params, model_params)


def evaluate_setting(setting: Setting | None, *, tensor: str, t: float) -> Scalar | None:
    """One setting at gradient position `t` for tensor `tensor`; None when no filter matches."""
    if setting is None:
        return None
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if isinstance(setting[0], Conditional):
            for cond in setting:
                assert isinstance(cond, Conditional)
                if cond.filter in (None, "*") or cond.filter in tensor:
                    return evaluate_setting(cond.value, tensor=tensor, t=t)
            return None
        return _gradient(setting, t)  # type: ignore[arg-type]
    return setting


def _gradient(values: Sequence[Scalar], t: float) -> Scalar:
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    s = t * (len(values) - 1)
    i0 = int(math.floor(s))
    i1 = min(len(values) - 1, i0 + 1)
    frac = s - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _resolve_one(
    spec: ParamSpec,
    scopes: Sequence[Mapping[str, Setting] | None],
    *,
    tensor: str,
    t: float,
    where: str,
) -> Any:
    for scope in scopes:
        if scope and spec.name in scope:
            value = evaluate_setting(scope[spec.name], tensor=tensor, t=t)
            if value is not None:
                return _coerce(spec, value, where)
    if spec.required:
        raise RecipeError(f"missing required parameter '{spec.name}' for {where}")
    return spec.default


def _coerce(spec: ParamSpec, value: Scalar, where: str) -> Any:
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int | float):
            return bool(value)
        raise RecipeError(f"parameter '{spec.name}' for {where} must be a boolean, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RecipeError(
            f"parameter '{spec.name}' for {where} must be a number, got {value!r}"
        ) from None
    return int(round(number)) if spec.kind == "int" else number


def _validate_block(method: MethodSpec, params: Parameters, *, scope: str, where: str) -> None:
    """Range-check every endpoint of every setting (gradients interpolate within their endpoints)."""
    known = {p.name: p for p in method.params}
    for name, setting in params.items():
        spec = known.get(name)
        if spec is None:  # another method of the recipe reads it (`_check_names` saw to that)
            continue
        for value in _endpoints(setting):
            coerced = _coerce(spec, value, f"{where}.{name}")
            if spec.kind != "bool":
                method.validate(name, coerced, f"{where}.{name}")


_ALL_PARAMETER_NAMES = frozenset(p.name for m in METHODS.values() for p in m.params)


def _check_names(methods: Sequence[MethodSpec], params: Parameters, *, where: str) -> None:
    """A parameter no merge method has is a typo: an error listing the valid names.

    One that only other methods read (`int8_mask` on linear, `normalize` on slerp) is ignored with a
    warning, as mergekit ignores it: mergekit-evolve writes both into every recipe it produces.
    """
    valid = {p.name for m in methods for p in m.params}
    for name in params:
        if name not in valid and name in _ALL_PARAMETER_NAMES:
            names = " or ".join(f"'{m.name}'" for m in methods)
            warnings.warn(
                f"{where}: merge_method {names} does not use parameter '{name}'; ignored, as mergekit does",
                stacklevel=4,
            )
        elif name not in valid:
            names = " or ".join(f"'{m.name}'" for m in methods)
            raise RecipeError(
                f"{where}: merge_method {names} has no parameter '{name}'; valid: {', '.join(sorted(valid)) or 'none'}"
            )


def _endpoints(setting: Setting) -> list[Scalar]:
    if isinstance(setting, Conditional):
        return _endpoints(setting.value)
    if isinstance(setting, list):
        out: list[Scalar] = []
        for item in setting:
            out.extend(_endpoints(item))  # type: ignore[arg-type]
        return out
    return [setting]


def _check_model_count(s: OutputSlice, *, where: str) -> None:
    method = s.method
    base, models = s.merge_inputs()
    if method.base == "required" and base is None:
        raise RecipeError(
            f"{where}: merge_method '{method.name}' needs base_model '{s.base_model}' among its sources"
            if s.base_model
            else f"{where}: merge_method '{method.name}' needs a base_model"
        )
    problem = method.model_count_problem(len(models))
    if problem is not None:
        raise RecipeError(f"{where}: {problem}: {models}")


def _count(layer_counts: Mapping[str, int], model: str) -> int:
    if model not in layer_counts:
        raise RecipeError(f"model '{model}' has no known layer count")
    return layer_counts[model]


def _pydantic_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(
        str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union"))
    )
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "field required"
    return f"{loc}: {msg}" if loc else msg


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


class _RecipeDumper(yaml.SafeDumper):
    """Lists of numbers in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = all(isinstance(v, int | float) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)
