"""The data-flow space (DFS): the path hidden states take through the layers of several models.

Akiba et al., "Evolutionary Optimization of Model Merging Recipes" (arXiv 2403.13187), section 3.2.
All layers of the models (model A's first, then the others') are laid out in order and that
sequence is repeated `repeats` times: T slots. A point holds

- an indicator per slot (the slot is on the path when its coordinate is >= 0.5), and
- a positive input scale per transition between layers (`scale.per: transition`, the paper's W[i, j],
  with "the embeddings" as one more origin) or per layer (`scale.per: layer`), on a log scale.

A point decodes into a mergekit `passthrough` Recipe (`/work/shared/DFS.md` has the derivation):
in a pre-norm transformer with a final RMSNorm, multiplying the hidden state entering the k-th
block by w_k gives the same logits as dividing that block's two output projections (`o_proj`,
`down_proj`) by s_k = w_1 * ... * w_k. So each path step is a one-layer slice (adjacent steps of one
model with equal factors are merged) with a `scale` filtered on `o_proj` / `down_proj` = 1 / s_k.
Embeddings, final norm and LM head come from model A: mergekit takes them from the first and last
slice, so a path that starts or ends in another model gets one no-op layer of A there (both
projections scaled by 0: the block adds nothing to the residual stream).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe, evaluate_setting
from evomerge.search_config import DfsConfig
from evomerge.space import Knob, describe_knobs

# Pre-norm decoders whose blocks end in `o_proj` / `down_proj` and whose stack ends in an RMSNorm:
# the architectures the folding rule is known to hold for.
FOLDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")
THRESHOLD = 0.5
ON, OFF = 0.75, 0.25  # what encode writes for a slot on / off the path
EMBED = -1  # the origin of the first transition


@dataclass(frozen=True)
class PathSource:
    """One model of the layout: its reference in recipes (a model directory, or a recipe file) and shape."""

    ref: str
    num_layers: int
    config: Mapping[str, Any]
    recipe: Recipe | None = (
        None  # when the model is a merge recipe (PS+DFS), materialized by each worker
    )

    @property
    def label(self) -> str:
        return self.ref.rstrip("/").rsplit("/", 1)[-1]


def is_recipe_ref(ref: str) -> bool:
    return Path(ref).suffix in (".yaml", ".yml")


def read_source(ref: str) -> PathSource:
    """The layout facts of one model (only its config and tensor names are read)."""
    from evomerge.io.reader import ModelReader
    from evomerge.merge import output_config, plan_merge

    if is_recipe_ref(ref):
        recipe = Recipe.load(ref)
        readers = {m: ModelReader(Path(m)) for m in recipe.referenced_models()}
        plan = plan_merge(recipe, readers)
        config = output_config(plan, readers[plan.reference_model].config)
        names = [t.out_name for t in plan.tasks]
        source = PathSource(ref, plan.num_layers, config, recipe)
    else:
        reader = ModelReader(Path(ref))
        names = list(reader.names)
        source = PathSource(ref, reader.num_layers, reader.config)
    check_foldable(source, names)
    return source


def check_foldable(source: PathSource, names: Sequence[str]) -> None:
    """Refuse architectures where scaling the output projections is not the same as scaling the input."""
    model_type = source.config.get("model_type")
    if model_type not in FOLDABLE_MODEL_TYPES:
        raise ConfigError(
            f"dfs: model '{source.ref}' is a '{model_type}'; the data-flow space needs a pre-norm decoder with "
            f"o_proj/down_proj and a final RMSNorm ({', '.join(FOLDABLE_MODEL_TYPES)})"
        )
    for proj in OUTPUT_PROJECTIONS:
        if not any(f".{proj}." in n for n in names):
            raise ConfigError(
                f"dfs: model '{source.ref}' has no {proj} tensors; the path scales cannot be exported"
            )


def check_compatible(sources: Sequence[PathSource]) -> None:
    """Every model of one path must agree on the hidden size and the vocabulary."""
    first = sources[0]
    for key in ("hidden_size", "vocab_size"):
        for s in sources[1:]:
            if s.config.get(key) != first.config.get(key):
                raise ConfigError(
                    f"dfs: models '{first.ref}' and '{s.ref}' differ in {key} "
                    f"({first.config.get(key)} vs {s.config.get(key)}); one path needs them equal"
                )


@dataclass(frozen=True)
class Slot:
    model: int  # index into the sources
    layer: int  # layer within that model
    index: int  # the layer's position in the layout of all models (one repeat)


class DfsSpace:
    """decode(x) -> a passthrough Recipe; encode(recipe) -> x; the same interface as `SearchSpace`."""

    def __init__(
        self, config: DfsConfig, sources: Sequence[PathSource], *, dtype: str | None = None
    ):
        if not sources:
            raise ConfigError("dfs: needs at least one model")
        check_compatible(sources)
        self.config = config
        self.sources = list(sources)
        self.dtype = dtype
        layout = [(m, layer) for m, s in enumerate(self.sources) for layer in range(s.num_layers)]
        self.layers = [Slot(m, layer, i) for i, (m, layer) in enumerate(layout)]
        self.slots = [slot for _ in range(config.repeats) for slot in self.layers]
        self.max_layers = config.max_layers if config.max_layers is not None else len(self.layers)
        if config.min_layers > self.max_layers:
            raise ConfigError(
                f"dfs.min_layers: {config.min_layers} is more than max_layers ({self.max_layers})"
            )
        if self.max_layers > len(self.slots):
            raise ConfigError(
                f"dfs.max_layers: {self.max_layers} is more than the {len(self.slots)} slots "
                f"({len(self.layers)} layers x {config.repeats} repeats)"
            )
        self.knobs = self._build_knobs()
        self._scale_index = {
            (k.group, _origin(k.filter)): i for i, k in enumerate(self.knobs) if k.param == "scale"
        }

    # ---- layout ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return len(self.knobs)

    def _build_knobs(self) -> list[Knob]:
        knobs = [
            Knob("on", i, self.sources[s.model].ref, None, 0.0, 1.0)
            for i, s in enumerate(self.slots)
        ]
        bounds = self.config.scale
        origins = [EMBED, *range(len(self.layers))] if bounds.per == "transition" else [None]
        for layer in self.layers:
            for origin in origins:
                name = (
                    None
                    if origin is None
                    else ("from:embed" if origin == EMBED else f"from:{origin}")
                )
                knobs.append(
                    Knob(
                        "scale",
                        layer.index,
                        self.sources[layer.model].ref,
                        name,
                        bounds.low,
                        bounds.high,
                        log=True,
                    )
                )
        return knobs

    def _scale_knob(self, origin: int, layer: int) -> int:
        key = (layer, origin if self.config.scale.per == "transition" else None)
        return self._scale_index[key]

    # ---- decode ------------------------------------------------------------------------

    def path(self, x: Sequence[float]) -> list[tuple[Slot, float]]:
        """The path a point selects: (layer, input scale w_k) per step, its length within the bounds."""
        if len(x) != self.dim:
            raise ConfigError(f"point has {len(x)} coordinates, the space has {self.dim}")
        u = [min(max(float(v), 0.0), 1.0) for v in x]
        indicators = u[: len(self.slots)]
        on = {i for i, v in enumerate(indicators) if v >= THRESHOLD}
        by_closeness = sorted(range(len(self.slots)), key=lambda i: (-indicators[i], i))
        for i in by_closeness:  # too short: switch on the slots nearest the threshold
            if len(on) >= self.config.min_layers:
                break
            on.add(i)
        for i in reversed(by_closeness):  # too long: switch off the weakest
            if len(on) <= self.max_layers:
                break
            on.discard(i)
        steps, origin = [], EMBED
        for i in sorted(on):
            slot = self.slots[i]
            k = self._scale_knob(origin, slot.index)
            steps.append((slot, self.knobs[k].decode(u[k])))
            origin = slot.index
        return steps

    def decode(self, x: Sequence[float]) -> Recipe:
        factors, s = [], 1.0
        steps = self.path(x)
        for slot, w in steps:
            s *= w
            factors.append((slot.model, slot.layer, _round(1.0 / s)))
        if factors[0][0] != 0:
            factors.insert(0, (0, 0, 0.0))  # no-op layer: the embeddings come from model A
        if factors[-1][0] != 0:
            factors.append((0, 0, 0.0))  # no-op layer: final norm and LM head from model A
        return Recipe.from_dict(self._recipe(factors), origin="dfs space")

    def _recipe(self, steps: list[tuple[int, int, float]]) -> dict[str, Any]:
        slices: list[dict[str, Any]] = []
        last: tuple[int, int, float] | None = None
        for model, layer, factor in steps:
            if last is not None and last[0] == model and last[1] + 1 == layer and last[2] == factor:
                slices[-1]["sources"][0]["layer_range"][1] = layer + 1
            else:
                source: dict[str, Any] = {
                    "model": self.sources[model].ref,
                    "layer_range": [layer, layer + 1],
                }
                if factor != 1.0:
                    source["parameters"] = {"scale": scale_setting(factor)}
                slices.append({"sources": [source]})
            last = (model, layer, factor)
        data: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        if self.dtype:
            data["dtype"] = self.dtype
        return data

    # ---- encode ------------------------------------------------------------------------

    def encode(self, recipe: Recipe) -> list[float]:
        """The point that decodes to `recipe` (a passthrough over these models; scales clipped to the bounds)."""
        steps = self._steps_of(recipe)
        refs = {s.ref: m for m, s in enumerate(self.sources)}
        refs.update(
            {str(Path(s.ref).expanduser().resolve()): m for m, s in enumerate(self.sources)}
        )
        x = [OFF] * len(self.slots)
        for k in range(len(self.slots), self.dim):
            x.append(self.knobs[k].encode(1.0))
        cursor, origin, s_prev = 0, EMBED, 1.0
        seen: set[int] = set()
        for model_ref, layer, factor in steps:
            model_ref = (
                model_ref if model_ref in refs else str(Path(model_ref).expanduser().resolve())
            )
            if model_ref not in refs:
                raise ConfigError(
                    f"dfs warm start: model '{model_ref}' is not one of the dfs models"
                )
            model = refs[model_ref]
            while cursor < len(self.slots) and (
                self.slots[cursor].model,
                self.slots[cursor].layer,
            ) != (model, layer):
                cursor += 1
            if cursor == len(self.slots):
                raise ConfigError(
                    f"dfs warm start: the path does not fit into {self.config.repeats} repeats of the layout"
                )
            x[cursor] = ON
            s = 1.0 / factor
            k = self._scale_knob(origin, self.slots[cursor].index)
            if k not in seen:
                x[k] = self.knobs[k].encode(s / s_prev)
                seen.add(k)
            origin, s_prev, cursor = self.slots[cursor].index, s, cursor + 1
        return x

    def _steps_of(self, recipe: Recipe) -> list[tuple[str, int, float]]:
        if recipe.merge_method != "passthrough" or recipe.slices is None:
            raise ConfigError("dfs warm start: give a passthrough recipe with slices")
        steps = []
        for s in recipe.slices:
            src = s.sources[0]
            for layer in range(*src.layer_range):
                setting = (src.parameters or {}).get("scale")
                factor = evaluate_setting(
                    setting, tensor=f"model.layers.{layer}.self_attn.o_proj.weight", t=0.0
                )
                steps.append((src.model, layer, float(factor) if factor is not None else 1.0))
        a = self.sources[0].ref
        while steps and steps[0][2] == 0.0 and _same(steps[0][0], a):
            steps.pop(0)
        while steps and steps[-1][2] == 0.0 and _same(steps[-1][0], a):
            steps.pop()
        if any(f <= 0 for _, _, f in steps):
            raise ConfigError("dfs warm start: scale factors must be positive")
        return steps

    def describe(self) -> list[dict[str, Any]]:
        return describe_knobs(self.knobs)


def scale_setting(factor: float) -> list[dict[str, Any]]:
    """mergekit's per-input `scale`, filtered: the output projections get `factor`, every other tensor 1."""
    return [*({"filter": p, "value": factor} for p in OUTPUT_PROJECTIONS), {"value": 1.0}]


def _same(ref: str, other: str) -> bool:
    return ref == other or str(Path(ref).expanduser().resolve()) == other


def _origin(name: str | None) -> int | None:
    if name is None:
        return None
    tail = name.removeprefix("from:")
    return EMBED if tail == "embed" else int(tail)


def _round(value: float) -> float:
    """Six significant digits: the recipe (what is logged, scored and exported) holds exactly this."""
    return float(f"{value:.6g}") if value and math.isfinite(value) else value


def build_dfs_setup(config: Any, *, device: str | None = None) -> Any:
    """The `SearchSetup` of a config with a `dfs:` section: the space and a path worker. Reads configs only."""
    from evomerge.model_refs import resolve_model, resolve_recipe_refs
    from evomerge.path_worker import recipe_models
    from evomerge.run import SearchSetup, scoring_settings
    from evomerge.workers import WorkerSetup

    assert config.dfs is not None
    if config.base_model is not None or config.tokenizer_source is not None:
        raise ConfigError(
            "base_model / tokenizer_source: not used by dfs (model A, models[0], gives embeddings, head and tokenizer)"
        )
    if config.backend != "hf":
        raise ConfigError(
            "backend: DFS scoring needs backend: hf (vLLM cannot rewire its layers per candidate)"
        )
    refs = [resolve_model(m) for m in config.models]
    if len(set(refs)) != len(refs):
        raise ConfigError(
            "models: a dfs model is listed twice (use dfs.repeats to visit layers again)"
        )
    sources = [read_source(ref) for ref in refs]
    space = DfsSpace(config.dfs, sources, dtype=config.dtype)
    model_dirs = dict.fromkeys(
        m for s in sources for m in (s.recipe.referenced_models() if s.recipe else [s.ref])
    )
    for name, data in config.baselines.items():  # the report scores them with the same workers
        baseline = Recipe.from_dict(resolve_recipe_refs(data), origin=f"baselines.{name}")
        model_dirs.update(dict.fromkeys(resolve_model(m) for m in baseline.referenced_models()))
    a = sources[0]
    worker = WorkerSetup(
        models=tuple(model_dirs),
        reference_model=a.recipe.tokenizer_model() if a.recipe else a.ref,
        **scoring_settings(config, device),
        evaluator="path",
        recipe_models=recipe_models([s.ref for s in sources if s.recipe is not None]),
        path_reference=a.ref,
    )
    return SearchSetup(config, refs, None, space, worker)
