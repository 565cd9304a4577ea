"""The merge engine: plan a Recipe tensor by tensor, then execute it to disk or into a state dict.

Planning maps every output tensor to its input tensors, output slice and gradient position.
Execution fetches one tensor per input model, resolves the parameters for that tensor
(`recipe.resolve_params`), and calls the method's kernel. Inputs come from anything shaped
like `TensorSource`: a lazy `ModelReader` when streaming to disk, or a `LoadedModel` holding
every tensor on a device when the search merges thousands of candidates in memory.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from evomerge.errors import CheckpointError, RecipeError
from evomerge.io.layers import (
    is_vocab_tensor,
    layer_index,
    num_layers_from_config,
    set_num_layers,
    tensor_role,
    with_layer_index,
)
from evomerge.io.reader import ModelReader
from evomerge.io.writer import ShardedWriter, atomic_output_dir, copy_tokenizer_files, write_config
from evomerge.recipe import OutputSlice, Recipe, resolve_params

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TensorSource(Protocol):
    """What the engine needs of an input model."""

    @property
    def names(self) -> Sequence[str]: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def num_layers(self) -> int: ...
    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor: ...


class InMemoryModel:
    """Every tensor of a model held in a dict, read like a model on disk (a `TensorSource`)."""

    kind = "model"  # how a missing tensor's error names it

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        path: Any,
        config: dict[str, Any],
        num_layers: int,
    ):
        self.tensors = tensors
        self.path = path
        self._config = config
        self._num_layers = num_layers

    @property
    def names(self) -> Sequence[str]:
        return list(self.tensors)

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """The tensor as `dtype` on `device` (each default: the tensor's own)."""
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name} not found in {self.kind} {self.path}")
        t = self.tensors[name]
        return t.to(device=device or t.device, dtype=dtype or t.dtype, non_blocking=t.is_pinned())


class LoadedModel(InMemoryModel):
    """Every tensor of one model, loaded once onto a device (the search's input models)."""

    def __init__(
        self,
        reader: ModelReader,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
    ):
        """`pin_memory`: page-locked host memory (device "cpu"), for fast copies to a GPU per merge."""
        tensors = {name: reader.get(name, dtype=dtype, device=device) for name in reader.names}
        if pin_memory:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        super().__init__(
            tensors, path=reader.path, config=reader.config, num_layers=reader.num_layers
        )
        self.device = torch.device(device)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and which slice's settings apply."""

    out_name: str
    out_slice: OutputSlice
    t: float
    in_names: Mapping[str, str]  # model -> input tensor name


@dataclass(frozen=True)
class MergePlan:
    tasks: tuple[TensorTask, ...]
    source_layers: tuple[int, ...]  # for each output layer, the input layer it came from
    reference_model: str  # config and tokenizer come from here

    @property
    def num_layers(self) -> int:
        return len(self.source_layers)


def plan_merge(recipe: Recipe, sources: Mapping[str, TensorSource]) -> MergePlan:
    """Every output tensor of `recipe`, in output order. Fails before any tensor is read."""
    _check_sources(recipe, sources)
    slices = recipe.output_slices({name: src.num_layers for name, src in sources.items()})
    reference = recipe.tokenizer_model()
    if reference not in sources:
        raise RecipeError(f"tokenizer_source '{reference}' is not one of the recipe's models")

    first, last = slices[0], slices[-1]
    template = sources[first.sources[0].model]
    before, after = [], []
    for name in template.names:
        role = tensor_role(name)
        if role in ("embed", "pre"):
            before.append(TensorTask(name, first, 0.0, {m: name for m in first.models}))
        elif role in ("head", "post"):
            after.append(TensorTask(name, last, 0.0, {m: name for m in last.models}))

    layer_tasks = []
    source_layers: list[int] = []
    for s in slices:
        lead = s.sources[0]
        lead_names = _layer_names(sources[lead.model])
        for offset in range(s.num_layers):
            t = s.layer_t(offset)
            out_layer = len(source_layers)
            for name in lead_names.get(lead.layer_range[0] + offset, []):
                in_names = {
                    src.model: with_layer_index(name, src.layer_range[0] + offset)
                    for src in s.sources
                }
                layer_tasks.append(TensorTask(with_layer_index(name, out_layer), s, t, in_names))
            source_layers.append(lead.layer_range[0] + offset)
    return MergePlan(tuple(before + layer_tasks + after), tuple(source_layers), reference)


def execute(
    recipe: Recipe,
    plan: MergePlan,
    sources: Mapping[str, TensorSource],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_tensor: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every task of `plan`, one at a time."""
    in_dtype = DTYPES.get(recipe.dtype or "")
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    for task in plan.tasks:
        merged = merge_tensor(recipe, task, sources, dtype=in_dtype, device=device, seed=seed)
        if out_dtype is not None:
            merged = merged.to(out_dtype)
        if on_tensor:
            on_tensor(task.out_name)
        yield task.out_name, merged


def merge_tensor(
    recipe: Recipe,
    task: TensorTask,
    sources: Mapping[str, TensorSource],
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    seed: int,
) -> torch.Tensor:
    s = task.out_slice
    base_name, model_names = s.merge_inputs()
    params = resolve_params(
        recipe, s, t=task.t, out_tensor=task.out_name, in_tensors=task.in_names, models=model_names
    )
    names = ([base_name] if base_name else []) + model_names
    tensors = [_fetch(sources[m], task.in_names[m], m, dtype, device) for m in names]
    tensors = _match_shapes(task.out_name, names, tensors, base_name, s.method.embed_shape)
    base = tensors[0] if base_name else None
    models = tensors[1:] if base_name else tensors
    for p in s.method.model_params():
        for model, value in zip(model_names, params.model_params[p.name], strict=True):
            s.method.validate(p.name, value, f"model '{model}', tensor {task.in_names[model]}")
    generator = None
    if s.method.stochastic:
        generator = torch.Generator(device=torch.device(device)).manual_seed(
            _tensor_seed(seed, task.out_name)
        )
    try:
        return s.method.merge(base, models, params.model_params, params.global_params, generator)
    except RecipeError as e:
        raise RecipeError(f"{task.out_name}: {e}") from None


def merge_stream(
    recipe: Recipe,
    sources: Mapping[str, TensorSource],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[list[str], Iterator[tuple[str, torch.Tensor]]]:
    """The output tensor names now (the plan fails before any tensor is read), the tensors lazily.

    Each (name, merged tensor) is computed as it is consumed, so a consumer that copies it away
    (a vLLM engine's weight reload) holds one merged tensor at a time, not a whole model.
    """
    plan = plan_merge(recipe, sources)
    return [task.out_name for task in plan.tasks], execute(
        recipe, plan, sources, device=device, seed=seed
    )


def merge_to_state_dict(
    recipe: Recipe,
    sources: Mapping[str, TensorSource],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge entirely in memory (the search's hot path)."""
    plan = plan_merge(recipe, sources)
    return dict(execute(recipe, plan, sources, device=device, seed=seed))


def open_sources(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, TensorSource]:
    """Lazy readers for every model the recipe names (paths relative to the working directory).

    A model given as a recipe file (`.yaml`: e.g. model A of a PS+DFS recipe is a PS merge) is merged
    in memory first.
    """
    return {name: _open_source(name, allow_pickle) for name in recipe.referenced_models()}


def _open_source(name: str, allow_pickle: bool) -> TensorSource:
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        return ModelReader(path, allow_pickle=allow_pickle)
    inner = Recipe.load(path)
    sources = open_sources(inner, allow_pickle=allow_pickle)
    plan = plan_merge(inner, sources)
    return MaterializedModel(
        plan, dict(execute(inner, plan, sources)), sources[plan.reference_model]
    )


class MaterializedModel(InMemoryModel):
    """A recipe's merge held in memory (on the CPU, where `execute` puts it), readable like a model
    on disk (config and tokenizer from its reference)."""

    kind = "the merge of"

    def __init__(self, plan: MergePlan, tensors: dict[str, torch.Tensor], reference: TensorSource):
        super().__init__(
            tensors,
            path=getattr(reference, "path", None),
            config=output_config(plan, reference.config),
            num_layers=plan.num_layers,
        )


def merge_to_disk(
    recipe: Recipe,
    out: Path,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_pickle: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
    sources: Mapping[str, TensorSource] | None = None,
) -> MergePlan:
    """Stream the merge into a Hugging Face model directory, written atomically."""
    sources = sources if sources is not None else open_sources(recipe, allow_pickle=allow_pickle)
    plan = plan_merge(recipe, sources)
    reference = sources[plan.reference_model]
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes)
        with _progress(len(plan.tasks), enabled=progress) as advance:
            for name, tensor in execute(
                recipe, plan, sources, device=device, seed=seed, on_tensor=advance
            ):
                writer.add(name, tensor.cpu())
        writer.finish()
        write_config(
            tmp, output_config(plan, reference.config), dtype=recipe.out_dtype or recipe.dtype
        )
        ref_path = getattr(reference, "path", None)
        if ref_path is not None:
            copy_tokenizer_files(Path(ref_path), tmp)
        if recipe.chat_template and recipe.chat_template.strip().lower() not in ("auto",):
            _set_chat_template(tmp, recipe.chat_template)
        (tmp / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
    return plan


def output_config(plan: MergePlan, reference_config: Mapping[str, Any]) -> dict[str, Any]:
    """The reference model's config, with the output's layer count (per-layer lists follow their source layers)."""
    if plan.num_layers == num_layers_from_config(dict(reference_config)):
        return copy.deepcopy(dict(reference_config))
    return set_num_layers(
        copy.deepcopy(dict(reference_config)), plan.num_layers, source_layers=plan.source_layers
    )


def _set_chat_template(out: Path, template: str) -> None:
    import json

    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2))


def _check_sources(recipe: Recipe, sources: Mapping[str, TensorSource]) -> None:
    missing = [m for m in recipe.referenced_models() if m not in sources]
    if missing:
        raise RecipeError(f"no input model loaded for {missing}")


def _layer_names(src: TensorSource) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for name in src.names:
        idx = layer_index(name)
        if idx is not None:
            by_layer.setdefault(idx, []).append(name)
    return by_layer


def _fetch(
    src: TensorSource, name: str, model: str, dtype: torch.dtype | None, device: str | torch.device
) -> torch.Tensor:
    if src.has(name):
        return src.get(name, dtype=dtype, device=device)
    role = tensor_role(name)
    if role == "head" and src.config.get("tie_word_embeddings", False):
        embed = next((n for n in src.names if tensor_role(n) == "embed"), None)
        if embed is not None:
            return src.get(embed, dtype=dtype, device=device)
    raise CheckpointError(f"tensor {name} not found in model '{model}'")


def _match_shapes(
    out_name: str, names: list[str], tensors: list[torch.Tensor], base: str | None, mode: str
) -> list[torch.Tensor]:
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) == 1:
        return tensors
    if not is_vocab_tensor(out_name) or len({s[1:] for s in shapes}) != 1:
        detail = ", ".join(f"'{n}' {list(s)}" for n, s in zip(names, shapes, strict=True))
        raise RecipeError(f"tensor {out_name}: shapes differ between models: {detail}")
    rows = shapes[0][0] if (mode == "base" and base is not None) else min(s[0] for s in shapes)
    short = [n for n, s in zip(names, shapes, strict=True) if s[0] < rows]
    if short:
        raise RecipeError(
            f"tensor {out_name}: models {short} have fewer vocabulary rows than the base ({rows})"
        )
    return [t[:rows] for t in tensors]


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed independent of execution order, so disk and in-memory merges agree."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _progress:
    def __init__(self, total: int, *, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda _name: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("merging"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._bar.start()
        task = self._bar.add_task("merge", total=self.total)
        return lambda _name: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
