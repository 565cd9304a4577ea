"""mergekit-evolve configs (`genome:` + `tasks:`), read as they are and turned into evomerge's native config.

The schema follows mergekit 0.1.5 (`mergekit/evo/config.py`, `genome.py`) and rejects what mergekit
rejects (unknown method, a base-less ties/dare_ties/task_arithmetic, smooth or filters with slerp, a
layer granularity that does not divide the layers), naming the field. The native config keeps the
genome's knobs and decoding (`space.genome`, evomerge/genome_space.py) and mergekit-evolve's command
line defaults (100 evaluations, sigma0 1/6 of a gene); `EvolveFlags` carries the flags a user ran
mergekit-evolve with, for `evomerge migrate`.

Fitness: mergekit sums weight x metric over tasks; evomerge averages, dividing by the sum of |weight|,
a positive constant, so every candidate ranks the same. A negative weight becomes |weight| with
`higher_is_better: false`, which is the same term.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.genome_space import METHOD_PARAMS, NEEDS_BASE, gene_range

MAX_FEVALS = 100  # mergekit-evolve --max-fevals default
SIGMA0 = 1 / 6  # mergekit-evolve --sigma0 default, in gene units
BENCHMARK_PREFIXES = (  # mergekit/evo/config.py NAUGHTY_PREFIXES
    "mmlu",
    "hendrycks",
    "agieval",
    "gsm8k",
    "hellaswag",
    "winogrande",
    "arc_",
    "ai2_arc",
    "truthfulqa",
    "bigbench",
    "piqa",
    "openbookqa",
    "leaderboard",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvolveGenome(_Strict):
    models: list[str]
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0  # 0 (or less): one group for all layers
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @model_validator(mode="after")
    def _mergekit_rules(self) -> EvolveGenome:
        if not self.models:
            raise ValueError("models: give at least one model")
        if self.merge_method not in METHOD_PARAMS:
            raise ValueError(
                f"merge_method: unknown method '{self.merge_method}'; valid: {', '.join(METHOD_PARAMS)}"
            )
        if self.merge_method in NEEDS_BASE and self.base_model is None:
            raise ValueError(f"base_model: required for merge_method {self.merge_method}")
        if self.merge_method == "slerp":
            if self.smooth:
                raise ValueError("smooth: not supported for slerp merge method")
            if self.filters:
                raise ValueError(
                    "filters: tensor name filtering is not supported for slerp merge method"
                )
            if len(self.models) < 2:
                raise ValueError("models: slerp picks two of them per layer group; give at least 2")
            if self.base_model is not None and self.base_model not in self.models:
                raise ValueError(
                    "base_model: slerp merges two models; mergekit would add this one as a third source and fail"
                )
        if (
            self.merge_method == "linear"
            and self.base_model is not None
            and self.base_model not in self.models
        ):
            raise ValueError(
                "base_model: mergekit adds it to a linear merge without a weight and fails; list it in models or drop it"
            )
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source: 'union' is not supported by evomerge; use 'base' or a model"
            )
        return self


class EvolveTask(_Strict):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _counts(self) -> EvolveTask:
        if self.weight == 0:
            raise ValueError("weight: 0 adds nothing to the fitness; remove the task")
        return self


class EvolveConfig(_Strict):
    genome: EvolveGenome
    tasks: list[EvolveTask]
    limit: int | None = None
    num_fewshot: int | None = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True

    @model_validator(mode="after")
    def _some_task(self) -> EvolveConfig:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        return self


@dataclass(frozen=True)
class EvolveFlags:
    """mergekit-evolve's command-line flags (defaults as in `mergekit-evolve`)."""

    max_fevals: int = MAX_FEVALS
    vllm: bool = False
    strategy: str = "pool"
    in_memory: bool = False
    storage_path: str | None = None
    num_gpus: int | None = None
    merge_cuda: bool = True
    trust_remote_code: bool = False
    allow_crimes: bool = False
    random_seed: int = 0
    batch_size: int | None = None
    sigma0: float = SIGMA0
    wandb: bool = False
    task_search_path: tuple[str, ...] = ()
    save_final_model: bool = True
    reshard: bool = True
    timeout: float | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    force_population_size: int | None = None
    allow_benchmark_tasks: bool = False


def is_evolve_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "genome" in raw


def parse_evolve_config(raw: Any, *, origin: str = "<evolve config>") -> EvolveConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a mergekit-evolve config must be a YAML mapping")
    try:
        config = EvolveConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "field required"
        elif ": " in msg and (not loc or loc[-1] in ("genome", *_task_locs(raw))):
            # a model-level rule names its own field: genome.base_model, tasks.0.weight, tasks
            sub, msg = msg.split(": ", 1)
            loc.append(sub)
        raise ConfigError(f"{origin}: {'.'.join(loc)}: {msg}") from None
    _check_layer_granularity(config.genome, origin)
    return config


def _task_locs(raw: dict) -> list[str]:
    tasks = raw.get("tasks")
    return [str(i) for i in range(len(tasks))] if isinstance(tasks, list) else []


def _check_layer_granularity(genome: EvolveGenome, origin: str) -> None:
    """mergekit reads the first model's config; so do we, when it is a local directory."""
    g = genome.layer_granularity
    if g <= 0:
        return
    from evomerge.model_refs import resolve_model

    config_file = Path(resolve_model(genome.models[0])) / "config.json"
    if not config_file.is_file():
        return  # not local: the search checks it once the model is read
    try:
        num_layers = json.loads(config_file.read_text())["num_hidden_layers"]
    except (ValueError, KeyError):
        return
    if num_layers % g:
        raise ConfigError(
            f"{origin}: genome.layer_granularity: {g} does not divide the {num_layers} layers of {genome.models[0]}"
        )


# ---- evolve config -> native config -----------------------------------------------------


def native_config(config: EvolveConfig, flags: EvolveFlags = EvolveFlags()) -> dict[str, Any]:
    """The native search config (a mapping `parse_search_config` accepts) for an evolve config + flags."""
    genome = config.genome
    params = METHOD_PARAMS[genome.merge_method]
    space: dict[str, Any] = {
        "methods": [genome.merge_method],
        "knobs": {p: None for p in params},
        "genome": {
            "smooth": genome.smooth,
            "allow_negative_weights": genome.allow_negative_weights,
            "normalize": genome.normalize,
            "random_init": config.random_init,
        },
    }
    if genome.layer_granularity > 0:
        space["layer_granularity"] = genome.layer_granularity
    if genome.filters:
        space["filters"] = list(genome.filters)
    native: dict[str, Any] = {"models": list(genome.models)}
    if genome.base_model is not None:
        native["base_model"] = genome.base_model
    if genome.tokenizer_source is not None:
        native["tokenizer_source"] = genome.tokenizer_source
    native["dtype"] = "bfloat16"  # mergekit-evolve merges and scores in bfloat16
    native["space"] = space
    native["tasks"] = [_native_task(t) for t in config.tasks]
    if flags.task_search_path:
        native["task_paths"] = list(flags.task_search_path)
    if config.limit is not None:
        native["limit"] = config.limit
    optimizer: dict[str, Any] = {
        "kind": "cma",
        "seed": flags.random_seed,
        "sigma0": _unit_sigma(flags.sigma0, genome),
    }
    if flags.force_population_size is not None:
        optimizer["popsize"] = flags.force_population_size
    native["optimizer"] = optimizer
    budget: dict[str, Any] = {"max_evals": flags.max_fevals}
    if flags.timeout is not None:
        budget["max_minutes"] = flags.timeout / 60
    native["budget"] = budget
    if flags.strategy == "serial":
        native["workers"] = 0
    elif flags.num_gpus is not None:
        native["workers"] = flags.num_gpus
    native["seed"] = flags.random_seed
    if flags.num_gpus:
        native["device"] = "cuda"
    if flags.vllm:
        native["backend"] = "vllm"
    if flags.batch_size is not None:
        native["batch_size"] = flags.batch_size
    return native


def _native_task(task: EvolveTask) -> dict[str, Any]:
    metric, _, filter_name = task.metric.partition(",")
    name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
    # explicit direction: mergekit adds weight x metric whatever the metric is
    return {
        "name": task.name,
        "metric": name,
        "weight": abs(task.weight),
        "higher_is_better": task.weight > 0,
    }


def _unit_sigma(sigma0: float, genome: EvolveGenome) -> float:
    """mergekit's sigma0 is in gene units; evomerge's CMA-ES works on the unit cube of the gene ranges."""
    param = METHOD_PARAMS[genome.merge_method][0]
    low, high = gene_range(param, allow_negative_weights=genome.allow_negative_weights)
    return min(sigma0 / (high - low), 1.0)


def startup_notes(config: EvolveConfig) -> list[str]:
    """What a mergekit-evolve user should know before the run starts (one line each)."""
    from evomerge.genome_space import BOUNDS_NOTE

    notes = [
        BOUNDS_NOTE,
        "fitness: mergekit's sum of weight x metric divided by the sum of |weight| (the same ranking)",
    ]
    ignored = []
    if config.num_fewshot is not None:
        ignored.append(f"num_fewshot: {config.num_fewshot} (set it in the task YAML)")
    if config.shuffle:
        ignored.append("shuffle: true")
    if config.apply_chat_template:
        ignored.append("apply_chat_template (prompts are scored without a chat template)")
    if ignored:
        notes.append("not applied by evomerge: " + "; ".join(ignored))
    benchmarks = [
        t.name
        for t in config.tasks
        if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")
    ]
    if benchmarks:
        notes.append(
            f"{', '.join(benchmarks)}: common benchmark test sets; mergekit-evolve refuses them by default"
        )
    return notes


def load_evolve_as_native(raw: dict[str, Any], *, origin: str) -> dict[str, Any]:
    """`evomerge search evolve.yaml`: the native mapping, with the start-up notes printed to stderr."""
    import sys

    config = parse_evolve_config(raw, origin=origin)
    for note in startup_notes(config):
        print(f"note: {note}", file=sys.stderr)
    return native_config(config)


def migrate_text(
    config: EvolveConfig, flags: EvolveFlags, *, source: str, target: str = "search.yaml"
) -> str:
    """The native config as YAML, opened by comments: how to run it and what each flag became."""
    native = native_config(config, flags)
    lines = [
        f"# evomerge search config, migrated from the mergekit-evolve config {source} (evomerge migrate)",
        f"# run: evomerge search {target}{f' --out {flags.storage_path}' if flags.storage_path else ''}"
        f"{' --gpus-per-worker 1' if flags.num_gpus else ''}",
        *(f"# {line}" for line in flag_comments(flags)),
        *(f"# note: {note}" for note in startup_notes(config)),
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(native, sort_keys=False)


def flag_comments(flags: EvolveFlags) -> list[str]:
    """One line per mergekit-evolve flag: its evomerge counterpart, or that it has none."""
    d = EvolveFlags()
    out = [f"--max-fevals {flags.max_fevals} -> budget.max_evals"]
    if flags.vllm:
        out.append("--vllm -> backend: vllm")
    if flags.num_gpus is not None:
        out.append(
            f"--num-gpus {flags.num_gpus} -> workers: {flags.num_gpus}, device: cuda; pass --gpus-per-worker 1"
        )
    if flags.storage_path is not None:
        out.append(
            f"--storage-path {flags.storage_path} -> the run directory (--out); best_config.yaml is written there"
        )
    if flags.strategy != d.strategy:
        out.append(
            "--strategy serial -> workers: 0 (in-process)"
            if flags.strategy == "serial"
            else f"--strategy {flags.strategy}: no counterpart; evomerge's worker pool keeps every worker busy"
        )
    if flags.sigma0 != d.sigma0:
        out.append(f"--sigma0 {flags.sigma0:g} -> optimizer.sigma0 (divided by the gene range)")
    if flags.random_seed != d.random_seed:
        out.append(f"--random-seed {flags.random_seed} -> seed and optimizer.seed")
    if flags.batch_size is not None:
        out.append(f"--batch-size {flags.batch_size} -> batch_size")
    if flags.force_population_size is not None:
        out.append(f"--force-population-size {flags.force_population_size} -> optimizer.popsize")
    if flags.timeout is not None:
        out.append(f"--timeout {flags.timeout:g} -> budget.max_minutes")
    if flags.task_search_path:
        out.append("--task-search-path -> task_paths")
    no_counterpart = {
        "--in-memory": (flags.in_memory, "evomerge always merges and scores in memory"),
        "--no-merge-cuda": (not flags.merge_cuda, "merges run on the worker's device (device:)"),
        "--trust-remote-code": (flags.trust_remote_code, "models load without remote code"),
        "--allow-crimes": (flags.allow_crimes, "evomerge checks architectures itself"),
        "--wandb": (
            flags.wandb,
            "the run directory holds trials.jsonl; evomerge report plots them",
        ),
        "--no-save-final-model": (
            not flags.save_final_model,
            "pass --no-save-best to evomerge search",
        ),
        "--no-reshard": (not flags.reshard, "models are read memory-mapped, never resharded"),
        "--load-in-8bit": (flags.load_in_8bit, "no quantized scoring"),
        "--load-in-4bit": (flags.load_in_4bit, "no quantized scoring"),
        "--i-understand-the-depths-of-the-evils-i-am-unleashing": (
            flags.allow_benchmark_tasks,
            "evomerge does not block benchmark tasks",
        ),
    }
    out += [
        f"{flag}: no counterpart; {why}" for flag, (given, why) in no_counterpart.items() if given
    ]
    return out


def load_evolve_file(path: Path) -> EvolveConfig:
    if not path.is_file():
        raise ConfigError(f"mergekit-evolve config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    if not is_evolve_config(raw):
        raise ConfigError(f"{path}: genome: missing; not a mergekit-evolve config")
    return parse_evolve_config(raw, origin=str(path))
