"""mergekit-evolve's genome as a search space: the same knobs, start point and decoding.

mergekit's genotype has shape (layer groups, models, parameter sets, parameters): one parameter set
per filter plus one for the rest; parameters are weight (linear, task_arithmetic), weight and
density (ties, dare_ties) or one slerp gene. Knobs come in that order, so a knob vector is
mergekit's flattened genotype. The genome maps genes to a recipe: density `abs(x)` clamped to
[0, 1]; weight `abs(x)` unless negative weights are allowed; slerp takes the two models with the
largest gene of each group (base first) with `t = softmax(top-2)[1]`. `recipe_for_genotype` is that
mapping, line for line.

One difference: evomerge's optimizers search the unit cube, so each gene lives in a bounded range
(GENE_RANGES, or the config's knob bounds) before the genome's mapping; mergekit's CMA-ES is
unbounded. `BOUNDS_NOTE` says so in one line.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search_config import SpaceConfig
from evomerge.space import Knob, describe_knobs

METHOD_PARAMS = {  # mergekit/evo/genome.py METHOD_PARAM_MAPS
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
NORMALIZED = ("ties", "dare_ties", "linear")  # normalize: null means on for these
SLERP_RANGE = (-2.5, 2.5)  # width 5: t = softmax(top-2)[1] reaches down to 1/(1 + e^5) = 0.0067


def gene_range(param: str, *, allow_negative_weights: bool) -> tuple[float, float]:
    """Where a gene is searched: the genome's mapping is the identity there (or folds it, with negatives)."""
    if param == "t":
        return SLERP_RANGE
    return (-1.0, 1.0) if allow_negative_weights else (0.0, 1.0)


BOUNDS_NOTE = (
    "mergekit-evolve genome: genes are searched in bounded ranges (weight and density [0, 1], "
    "or [-1, 1] with allow_negative_weights; slerp [-2.5, 2.5]) and then mapped as mergekit does "
    "(abs, clamp, top-2 softmax); mergekit's CMA-ES is unbounded, so weights above 1 and slerp t "
    "below 0.0067 are out of reach here"
)


class GenomeSpace:
    """Same interface as `SearchSpace` (dim, knobs, decode, encode, describe) plus `start_point`."""

    def __init__(
        self,
        config: SpaceConfig,
        *,
        models: Sequence[str],
        base_model: str | None,
        num_layers: int,
        tensor_names: Sequence[str] = (),
        dtype: str | None = None,
        tokenizer_source: str | None = None,
    ):
        if config.genome is None:
            raise ConfigError("space.genome: missing (GenomeSpace decodes mergekit-evolve genomes)")
        self.config = config
        self.mapping = config.genome
        self.models = list(models)
        self.base_model = base_model
        self.num_layers = num_layers
        self.tokenizer_source = tokenizer_source
        self.method = self._check(config)
        self.params = METHOD_PARAMS[self.method]
        self.filters: list[str | None] = [*config.filters, None]
        granularity = config.layer_granularity or num_layers
        self.layer_step = granularity
        self.n_groups = num_layers // granularity
        self.knobs = self._build_knobs()

    def _check(self, config: SpaceConfig) -> str:
        if len(config.methods) != 1 or config.methods[0] not in METHOD_PARAMS:
            raise ConfigError(
                f"space.methods: a genome space has one of {', '.join(METHOD_PARAMS)}, got {config.methods}"
            )
        method = config.methods[0]
        if set(config.knobs) != set(METHOD_PARAMS[method]):
            raise ConfigError(
                f"space.knobs: the {method} genome has knobs {list(METHOD_PARAMS[method])}, got {list(config.knobs)}"
            )
        if config.gradient_anchors is not None:
            raise ConfigError(
                "space.gradient_anchors: a genome space interpolates with space.genome.smooth instead"
            )
        if config.fixed:
            raise ConfigError(
                "space.fixed: a genome space sets normalize (space.genome.normalize) and int8_mask itself"
            )
        if method in NEEDS_BASE and self.base_model is None:
            raise ConfigError(f"base_model: required for merge_method {method}")
        if method == "slerp":
            if config.genome and config.genome.smooth:
                raise ConfigError("space.genome.smooth: not supported for slerp")
            if config.filters:
                raise ConfigError("space.filters: tensor name filtering is not supported for slerp")
            if len(self.models) < 2:
                raise ConfigError(
                    "models: slerp picks two of them per layer group; give at least 2"
                )
            if self.base_model is not None and self.base_model not in self.models:
                raise ConfigError(
                    "base_model: slerp merges two models; a base_model outside models would be a third source"
                )
        if (
            method == "linear"
            and self.base_model is not None
            and self.base_model not in self.models
        ):
            raise ConfigError(
                "base_model: a linear genome gives it no weight (mergekit fails); list it in models or drop it"
            )
        g = config.layer_granularity
        if g is not None and self.num_layers % g:
            raise ConfigError(
                f"space.layer_granularity: {g} does not divide the models' {self.num_layers} layers"
            )
        return method

    def _build_knobs(self) -> list[Knob]:
        knobs = []
        for group in range(self.n_groups):
            for model in self.models:
                for f in self.filters:
                    for param in self.params:
                        low, high = self._bounds(param)
                        knobs.append(Knob(param, group, model, f, low, high))
        return knobs

    def _bounds(self, param: str) -> tuple[float, float]:
        low, high = gene_range(param, allow_negative_weights=self.mapping.allow_negative_weights)
        override = self.config.knobs.get(param)
        if override is not None:
            low = override.low if override.low is not None else low
            high = override.high if override.high is not None else high
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(
                f"space.knobs.{param}: needs finite bounds low < high, got [{low}, {high}]"
            )
        return float(low), float(high)

    @property
    def dim(self) -> int:
        return len(self.knobs)

    # ---- points <-> genotypes ----------------------------------------------------------

    def genotype(self, x: Sequence[float]) -> list[float]:
        """The flattened genotype (mergekit's order) a unit-cube point stands for."""
        if len(x) != self.dim:
            raise ConfigError(f"point has {len(x)} coordinates, the space has {self.dim}")
        return [
            k.low + min(max(float(u), 0.0), 1.0) * (k.high - k.low)
            for k, u in zip(self.knobs, x, strict=True)
        ]

    def point(self, genotype: Sequence[float]) -> list[float]:
        """The unit-cube point of a genotype (genes outside their range are clipped to it)."""
        if len(genotype) != self.dim:
            raise ConfigError(f"genotype has {len(genotype)} genes, the space has {self.dim}")
        return [
            min(max((g - k.low) / (k.high - k.low), 0.0), 1.0)
            for k, g in zip(self.knobs, genotype, strict=True)
        ]

    def initial_genotype(self, seed: int = 0) -> list[float]:
        """mergekit's start: weight 1/n and density 1; with random_init, uniform [0, 1) genes."""
        if self.mapping.random_init:
            rng = random.Random(seed)
            return [rng.random() for _ in self.knobs]
        n = len(self.models)
        return [1.0 / n if k.param in ("weight", "t") else 1.0 for k in self.knobs]

    def start_point(self, seed: int = 0) -> list[float]:
        return self.point(self.initial_genotype(seed))

    # ---- decode ------------------------------------------------------------------------

    def decode(self, x: Sequence[float]) -> Recipe:
        return self.recipe_for_genotype(self.genotype(x))

    def recipe_for_genotype(self, genotype: Sequence[float]) -> Recipe:
        """mergekit's `ModelGenome.genotype_merge_config`, as an evomerge Recipe."""
        if len(genotype) != self.dim:
            raise ConfigError(f"genotype has {len(genotype)} genes, the space has {self.dim}")
        genes = {
            (k.group, k.model, k.filter, k.param): float(g)
            for k, g in zip(self.knobs, genotype, strict=True)
        }
        data: dict[str, Any] = {"merge_method": self.method}
        if self.method == "slerp":
            data["slices"] = self._slerp_slices(genes)
        else:
            values = {key: self._phenotype(key[3], g) for key, g in genes.items()}
            if self.mapping.smooth:
                data["models"] = self._smooth_models(values)
            else:
                data["slices"] = self._discrete_slices(values)
        normalize = self.mapping.normalize
        if normalize is None:
            normalize = self.method in NORMALIZED
        data["parameters"] = {"normalize": normalize, "int8_mask": True}
        data["dtype"] = "bfloat16"
        if self.base_model is not None:
            data["base_model"] = self.base_model
        if self.tokenizer_source is not None:
            data["tokenizer_source"] = self.tokenizer_source
        return Recipe.from_dict(data, origin="genome")

    def _phenotype(self, param: str, gene: float) -> float:
        if param == "density":
            return min(max(abs(gene), 0.0), 1.0)
        if param in ("weight", "t") and not self.mapping.allow_negative_weights:
            return abs(gene)
        return gene

    def _base_outside(self) -> bool:
        return self.base_model is not None and self.base_model not in self.models

    def _layer_range(self, group: int) -> list[int]:
        return [group * self.layer_step, (group + 1) * self.layer_step]

    def _setting(self, per_filter: dict[str | None, Any]) -> Any:
        if len(self.filters) == 1:
            return per_filter[None]
        return [{"filter": f, "value": per_filter[f]} for f in self.filters]

    def _discrete_slices(self, values: dict) -> list[dict[str, Any]]:
        slices = []
        for group in range(self.n_groups):
            sources = [
                {
                    "model": model,
                    "layer_range": self._layer_range(group),
                    "parameters": {
                        p: self._setting({f: values[(group, model, f, p)] for f in self.filters})
                        for p in self.params
                    },
                }
                for model in self.models
            ]
            if self._base_outside():
                sources.append({"model": self.base_model, "layer_range": self._layer_range(group)})
            slices.append({"sources": sources})
        return slices

    def _smooth_models(self, values: dict) -> list[dict[str, Any]]:
        def gradient(model: str, f: str | None, p: str) -> Any:
            series = [values[(g, model, f, p)] for g in range(self.n_groups)]
            return series[0] if len(series) == 1 else series

        models: list[dict[str, Any]] = [
            {
                "model": model,
                "parameters": {
                    p: self._setting({f: gradient(model, f, p) for f in self.filters})
                    for p in self.params
                },
            }
            for model in self.models
        ]
        if self._base_outside():
            models.append({"model": self.base_model})
        return models

    def _slerp_slices(self, genes: dict) -> list[dict[str, Any]]:
        slices = []
        for group in range(self.n_groups):
            g = [genes[(group, model, None, "t")] for model in self.models]
            first, second = sorted(range(len(g)), key=lambda i: (-g[i], i))[
                :2
            ]  # torch.topk's order
            t = 1.0 / (1.0 + math.exp(g[first] - g[second]))  # softmax([g1, g2])[1]
            sources: list[dict[str, Any]] = [
                {"model": self.models[i], "layer_range": self._layer_range(group)}
                for i in (first, second)
            ]
            if self.tokenizer_source:
                sources[0]["parameters"] = {"weight": 1 - t}
                sources[1]["parameters"] = {"weight": t}
            slices.append(
                {"sources": sources, "parameters": {"t": t}, "base_model": self.models[first]}
            )
        return slices

    # ---- encode / describe -------------------------------------------------------------

    def encode(self, recipe: Recipe) -> list[float]:
        """Warm starts are not decoded recipes here: a genome space starts from its own genotype."""
        raise ConfigError(
            "warm_start: not supported with space.genome (the genome's start point is evaluated first)"
        )

    def describe(self) -> list[dict[str, Any]]:
        return describe_knobs(self.knobs)
