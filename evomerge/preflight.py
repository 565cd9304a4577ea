"""The up-front check: everything that can be known before Ray starts and before any weight loads.

`evomerge search`, `merge` and `eval` call it first. It reads config.json files, safetensors
headers (tensor names, shapes, dtypes; no weights) and lm-eval's task index (YAML only), so it
takes seconds; every problem is an `EvomergeError` whose one line names the config field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError, ScoringError
from evomerge.io.layers import is_vocab_tensor, tensor_role
from evomerge.io.reader import ModelReader
from evomerge.methods.registry import MethodSpec, get_method
from evomerge.model_refs import resolve_model, resolve_recipe_refs
from evomerge.recipe import Recipe
from evomerge.search_config import SearchConfig, SpaceConfig
from evomerge.space import Knob, SearchSpace
from evomerge.task_index import (
    TaskIndex,
    TaskSpec,
    UnknownTaskError,
    build_task_index,
    resolve_specs,
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# config.json fields that must agree across the models of one search (None: the field is absent)
_SHAPE_FIELDS = ("hidden_size", "n_embd", "d_model")


@contextmanager
def field(name: str, error: type[EvomergeError] = ConfigError) -> Iterator[None]:
    """Re-raise any evomerge error inside as one that starts with the config field's name."""
    try:
        yield
    except EvomergeError as e:
        raise error(f"{name}: {e}") from None


# ---- search ------------------------------------------------------------------------------


def check_search(config: SearchConfig) -> SearchConfig:
    """Check a search config against its models, the method registry and the task index.

    Returns the config with its task specs resolved (each names a task or an aggregating group
    with a concrete metric; tags expanded), which is what the search and the report score.
    """
    _check_task_paths(config.task_paths)
    if config.dfs is not None:
        from evomerge.dfs import build_dfs_setup

        build_dfs_setup(
            config
        )  # reads configs and headers only: architectures, sizes, path bounds, baselines
        return resolve_tasks(config)
    assert config.space is not None
    _check_space_config(config.space)
    models = {
        f"models[{i}]": _model_dir(f"models[{i}]", ref) for i, ref in enumerate(config.models)
    }
    base = _model_dir("base_model", config.base_model) if config.base_model else None
    if config.tokenizer_source not in (None, "base"):
        _tokenizer_dir("tokenizer_source", config.tokenizer_source)
    readers = {**({"base_model": base} if base else {}), **models}
    reference_field = "base_model" if base else "models[0]"
    _check_compatible(readers, reference_field)

    reference = readers[reference_field]
    tokenizer = (
        resolve_model(config.tokenizer_source)
        if config.tokenizer_source not in (None, "base")
        else None
    )
    paths = [str(r.path.resolve()) for r in models.values()]
    base_path = str(base.path.resolve()) if base else None
    with field("space"):
        space = SearchSpace(
            config.space,
            models=paths,
            base_model=base_path,
            num_layers=reference.num_layers,
            tensor_names=reference.names,
            dtype=config.dtype,
            tokenizer_source=tokenizer,
        )
    _check_decodes(space)
    inputs = {p for p in [*paths, base_path] if p}
    layers = reference.num_layers
    for i, item in enumerate(config.warm_start):
        recipe = _check_recipe(f"warm_start[{i}]", item, inputs, layers)
        with field(f"warm_start[{i}]"):
            space.encode(recipe)
    for name, item in config.baselines.items():
        _check_recipe(f"baselines.{name}", item, inputs, layers)
    return resolve_tasks(config)


def _check_task_paths(task_paths: Sequence[str]) -> None:
    for i, folder in enumerate(task_paths):
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"task_paths[{i}]: folder not found: {folder}")


def _check_space_config(space: SpaceConfig) -> None:
    """Knob names and bounds, and `fixed` names and values, against the method registry."""
    methods = [get_method(m) for m in space.methods]
    for name, override in space.knobs.items():
        owners = _owners(methods, name, f"space.knobs.{name}")
        for method in owners:
            spec = method.param(name)
            low, high, log, kind = SearchSpace._bounds(spec, override)  # names the knob itself
            for end, value in (
                ("low", override.low if override else None),
                ("high", override.high if override else None),
            ):
                if value is not None and spec.kind != "bool" and spec.problem(value) is not None:
                    raise ConfigError(
                        f"space.knobs.{name}.{end}={value:g} is outside {name}'s range {spec.interval()} ({method.name})"
                    )
            if log and low <= 0:
                raise ConfigError(
                    f"space.knobs.{name}: a log range needs low > 0, got [{low:g}, {high:g}]"
                )
            knob = Knob(name, 0, None, None, low, high, log, kind)
            for u in (0.0, 1.0):
                value = knob.decode(u)
                if spec.kind != "bool" and spec.problem(value) is not None:
                    raise ConfigError(
                        f"space.knobs.{name}: the range [{low:g}, {high:g}] decodes to {name}={value:g}, "
                        f"outside {name}'s range {spec.interval()} ({method.name})"
                    )
    for name, value in space.fixed.items():
        for method in _owners(methods, name, f"space.fixed.{name}"):
            problem = method.param(name).problem(value)
            if problem is not None:
                raise ConfigError(f"space.fixed.{name}={value!r} {problem} ({method.name})")


def _owners(methods: Sequence[MethodSpec], name: str, where: str) -> list[MethodSpec]:
    owners = [m for m in methods if any(p.name == name for p in m.params)]
    if not owners:
        valid = ", ".join(sorted({p.name for m in methods for p in m.params})) or "none"
        names = ", ".join(m.name for m in methods)
        raise ConfigError(f"{where}: unknown parameter '{name}' for {names}; valid: {valid}")
    return owners


def _model_dir(where: str, ref: str) -> ModelReader:
    """A model directory with a config.json and readable weights (headers only)."""
    with field(where):
        path = Path(resolve_model(ref))
    if not path.exists():
        raise ConfigError(f"{where}: {ref} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{where}: {ref} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: {ref} has no config.json (not a Hugging Face model directory)")
    with field(where):
        reader = ModelReader(path)
        reader.num_layers  # noqa: B018 -- a config without a layer count fails here
    return reader


def _tokenizer_dir(where: str, ref: str) -> Path:
    with field(where):
        path = Path(resolve_model(ref))
    if not path.is_dir():
        raise ConfigError(f"{where}: {ref} does not exist")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(f"{where}: {ref} has no tokenizer files")
    return path


def _check_compatible(readers: dict[str, ModelReader], reference_field: str) -> None:
    """Every model matches the reference: layer count, hidden size, tensor names, shapes, dtypes."""
    ref = readers[reference_field]
    ref_name = "the base" if reference_field == "base_model" else reference_field
    for where, reader in readers.items():
        if reader is ref:
            continue
        label = f"{where} ({reader.path})"
        if reader.num_layers != ref.num_layers:
            raise ConfigError(
                f"{label}: config.json has {reader.num_layers} layers, {ref_name} {ref.num_layers}"
            )
        for key in _SHAPE_FIELDS:
            if reader.config.get(key) != ref.config.get(key):
                raise ConfigError(
                    f"{label}: config.json {key}={reader.config.get(key)}, {ref_name}'s is {ref.config.get(key)}"
                )
        tied = bool(reader.config.get("tie_word_embeddings", False))
        for name in ref.names:
            if not reader.has(name):
                if tensor_role(name) == "head" and tied:
                    continue
                raise ConfigError(f"{label}: tensor {name} is missing ({ref_name} has it)")
            shape, ref_shape = tuple(reader.shape(name)), tuple(ref.shape(name))
            vocab_rows = is_vocab_tensor(name) and shape[1:] == ref_shape[1:]
            if shape != ref_shape and not vocab_rows:
                raise ConfigError(
                    f"{label}: tensor {name} has shape {list(shape)}, {ref_name}'s is {list(ref_shape)}"
                )
            dtype, ref_dtype = reader.dtype(name), ref.dtype(name)
            if dtype.is_floating_point != ref_dtype.is_floating_point:
                raise ConfigError(f"{label}: tensor {name} is {dtype}, {ref_name}'s is {ref_dtype}")


def _check_decodes(space: SearchSpace) -> None:
    """The space's corners and centre decode into valid recipes (names, ranges, fixed values)."""
    for u in (0.0, 0.5, 1.0):
        with field(f"space (every knob at {u:g} of its range)"):
            space.decode([u] * space.dim)


def _check_recipe(where: str, item: Any, inputs: set[str], num_layers: int) -> Recipe:
    """A warm start or baseline: a valid recipe that reads only the search's input models."""
    with field(where):
        data = resolve_recipe_refs(item)
    recipe = Recipe.from_dict(data, origin=where)
    for model in recipe.referenced_models():
        if str(Path(model).expanduser().resolve()) not in inputs:
            raise ConfigError(
                f"{where}: model {model} is not one of the search's models or base_model"
            )
    with field(where):
        recipe.output_slices({m: num_layers for m in recipe.referenced_models()})
    return recipe


# ---- tasks -------------------------------------------------------------------------------


def check_tasks(
    fields: dict[str, Sequence[TaskSpec]], include_paths: Sequence[str | Path] = ()
) -> dict[str, list[TaskSpec]]:
    """Every task and metric against one lm-eval task index; each field's specs, resolved."""
    names = list(dict.fromkeys(spec.name for specs in fields.values() for spec in specs))
    try:
        index = _quiet_index(lambda: build_task_index(names, include_paths))
    except UnknownTaskError as e:
        where = next(
            f"{w}[{i}]"
            for w, specs in fields.items()
            for i, spec in enumerate(specs)
            if spec.name == e.name
        )
        raise ConfigError(f"{where}: {e}") from None
    out = {}
    for where, specs in fields.items():
        with field(where):
            out[where] = resolve_specs(specs, index)
    return out


def _quiet_index(build: Callable[[], TaskIndex]) -> TaskIndex:
    from evomerge.evaluate import _quiet

    with _quiet():
        return build()


def resolve_tasks(config: SearchConfig) -> SearchConfig:
    """The config with its task specs resolved as `check_search` returns them (tasks only)."""
    resolved = check_tasks(
        {"tasks": config.tasks, "test_tasks": config.test_tasks}, config.task_paths
    )
    return config.model_copy(update=resolved)


# ---- merge and eval ----------------------------------------------------------------------


def check_merge(recipe: Recipe, *, allow_pickle: bool = False) -> None:
    """Every model of a recipe is a readable model directory whose tensors fit the plan."""
    from evomerge.merge import plan_merge

    readers = {}
    for model in recipe.referenced_models():
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model {model} does not exist")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model {model} has no config.json (not a Hugging Face model directory)"
            )
        readers[model] = ModelReader(path, allow_pickle=allow_pickle)
    source = recipe.tokenizer_source or (recipe.tokenizer.source if recipe.tokenizer else None)
    if source not in (None, "base", "union") and source not in readers:
        _tokenizer_dir("tokenizer_source", source)
    plan = plan_merge(recipe, readers)
    for task in plan.tasks:
        base, models = task.out_slice.merge_inputs()
        names = [*([base] if base else []), *models]
        shapes = {}
        for m in names:
            name = task.in_names[m]
            if readers[m].has(name):
                shapes[m] = tuple(readers[m].shape(name))
            elif not (
                tensor_role(name) == "head" and readers[m].config.get("tie_word_embeddings", False)
            ):
                raise ConfigError(f"tensor {name} not found in model '{m}'")
        if len({s[1:] if is_vocab_tensor(task.out_name) else s for s in shapes.values()}) > 1:
            detail = ", ".join(f"'{m}' {list(s)}" for m, s in shapes.items())
            raise ConfigError(f"tensor {task.out_name}: shapes differ between models: {detail}")


def check_eval(
    model: Path, specs: Sequence[TaskSpec], include_paths: Sequence[str | Path] = ()
) -> list[TaskSpec]:
    """A model directory with a config, a tokenizer and readable weights, and known tasks."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ScoringError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ScoringError(f"{path} has no config.json (not a Hugging Face model directory)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ScoringError(f"model directory has no tokenizer: {path}")
    ModelReader(path)
    for folder in include_paths:
        if not Path(folder).expanduser().is_dir():
            raise ScoringError(f"--include-path: folder not found: {folder}")
    return check_tasks({"--tasks": list(specs)}, include_paths)["--tasks"]
