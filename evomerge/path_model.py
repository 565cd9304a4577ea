"""A passthrough recipe as a live model, without copying weights (the DFS worker's hot path).

`PathModel` keeps one shell `PreTrainedModel` (a shallow copy of model A's, with its own config)
and, per recipe, grafts the source models' own modules into it: a new decoder layer list whose
entries are shallow copies of the sources' layers (their own module objects, with their own
`layer_idx` for the KV cache, sharing every parameter), embeddings from the first slice's model,
final norm and LM head from the last slice's (mergekit's rule). A `scale` parameter is applied to
the module's output where the module is linear in its parameters (`nn.Linear`, `nn.Embedding`:
multiplying the output equals multiplying the weights), else to a copy of that module's
parameters. So a DFS candidate costs no weight copy at all.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evomerge.errors import RecipeError
from evomerge.io.layers import tensor_role, with_layer_index
from evomerge.recipe import OutputSlice, Recipe, resolve_params

_LAYER_CONTAINER = re.compile(r"^(.*?)(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")
_PER_LAYER_LIST_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type")


class ScaledOutput(nn.Module):
    """`module(x) * scale`: for a module linear in its parameters, the same as scaling them."""

    def __init__(self, module: nn.Module, scale: float):
        super().__init__()
        self.inner = module
        self.scale = scale

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs) * self.scale

    def __getattr__(self, name: str) -> Any:  # .weight / .bias of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def is_path_recipe(recipe: Recipe) -> bool:
    """A recipe `PathModel` can run: passthrough only (per slice too), one source per slice."""
    if recipe.methods() != ["passthrough"]:
        return False
    return recipe.slices is not None or len(recipe.models or []) == 1


@dataclass(frozen=True)
class BuiltPath:
    num_layers: int
    source_layers: tuple[tuple[str, int], ...]  # (model, layer) per output layer


class PathModel:
    """Turns passthrough recipes over `models` (reference -> live HF model) into one live model."""

    def __init__(self, models: Mapping[str, nn.Module], reference: str):
        self.models = dict(models)
        self.reference = reference
        ref = self.models[reference]
        self.container = _layer_container(ref)
        self.shell = _shallow(ref)
        self.shell.config = copy.deepcopy(ref.config)
        self._owned: set[int] = {id(self.shell)}
        self._point_configs_at_shell()
        self._configs = {name: m.config for name, m in self.models.items()}

    def _point_configs_at_shell(self) -> None:
        # the decoder stack reads num_hidden_layers / layer_types from its own config
        inner = self._own(self.container.rsplit(".", 1)[0]) if "." in self.container else self.shell
        if hasattr(inner, "config"):
            inner.config = self.shell.config

    def build(self, recipe: Recipe) -> BuiltPath:
        """Rewire the shell to compute `recipe`'s model; returns what it built."""
        if not is_path_recipe(recipe):
            raise RecipeError(
                "in-memory path scoring runs passthrough recipes with one source per slice"
            )
        missing = [m for m in recipe.referenced_models() if m not in self.models]
        if missing:
            raise RecipeError(f"no live model loaded for {missing[0]}")
        counts = {name: int(m.config.num_hidden_layers) for name, m in self.models.items()}
        slices = recipe.output_slices(counts)
        layers, sources = [], []
        for s in slices:
            src = s.sources[0]
            for offset in range(s.num_layers):
                k = len(layers)
                layers.append(
                    self._layer(
                        recipe, s, src.model, src.layer_range[0] + offset, k, s.layer_t(offset)
                    )
                )
                sources.append((src.model, src.layer_range[0] + offset))
        self._graft_outer(recipe, slices[0], slices[-1])
        self._set(self.container, nn.ModuleList(layers))
        self._set_layer_count(sources)
        return BuiltPath(len(layers), tuple(sources))

    # ---- pieces ------------------------------------------------------------------------

    def _layer(
        self, recipe: Recipe, s: OutputSlice, model: str, layer: int, k: int, t: float
    ) -> nn.Module:
        source = _get(self.models[model], f"{self.container}.{layer}")
        new = _shallow(source)
        owned = {"": new}

        def own(path: str) -> nn.Module:
            if path not in owned:
                parent, _, leaf = path.rpartition(".")
                copy_ = _shallow(getattr(own(parent), leaf))
                own(parent)._modules[leaf] = copy_
                owned[path] = copy_
            return owned[path]

        for path, module in source.named_modules():
            if hasattr(module, "layer_idx"):
                own(path).layer_idx = k
            params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            scales = {
                pname: _scale(
                    recipe,
                    s,
                    model,
                    f"{self.container}.{layer}.{path}.{pname}".replace("..", "."),
                    k,
                    t,
                )
                for pname in params
            }
            if all(v is None or v == 1 for v in scales.values()):
                continue
            parent, _, leaf = path.rpartition(".")
            own(parent)._modules[leaf] = _scaled(module, scales)
        return new

    def _graft_outer(self, recipe: Recipe, first: OutputSlice, last: OutputSlice) -> None:
        """Embeddings (and anything before the layers) from the first slice's model; the rest from the last's."""
        ref = self.models[self.reference]
        for path, _module in ref.named_modules():
            if path.startswith(self.container + ".") or path == self.container:
                continue
            own_params = list(_module.named_parameters(recurse=False))
            if not own_params:
                continue
            role = tensor_role(f"{path}.{own_params[0][0]}")
            out_slice = first if role in ("embed", "pre") else last
            model = out_slice.sources[0].model
            module = _get(self.models[model], path)
            scales = {
                p: _scale(recipe, out_slice, model, f"{path}.{p}", None, 0.0)
                for p, _ in module.named_parameters(recurse=False)
            }
            if not all(v is None or v == 1 for v in scales.values()):
                module = _scaled(module, scales)
            self._set(path, module)

    def _set_layer_count(self, sources: list[tuple[str, int]]) -> None:
        config = self.shell.config
        config.num_hidden_layers = len(sources)
        ref_config = self._configs[self.reference]
        for key in _PER_LAYER_LIST_KEYS:
            values = getattr(ref_config, key, None)
            if isinstance(values, list):
                setattr(config, key, [values[layer] for _, layer in sources])

    def _own(self, path: str) -> nn.Module:
        """The shell's own copy of the module at `path` (made once), so grafting never touches a source."""
        module = self.shell
        for part in path.split(".") if path else []:
            child = module._modules[part]
            if id(child) not in self._owned:
                child = _shallow(child)
                module._modules[part] = child
                self._owned.add(id(child))
            module = child
        return module

    def _set(self, path: str, module: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        self._own(parent)._modules[leaf] = module


def _scale(
    recipe: Recipe, s: OutputSlice, model: str, in_name: str, k: int | None, t: float
) -> float | None:
    out_name = with_layer_index(in_name, k) if k is not None else in_name
    params = resolve_params(
        recipe, s, t=t, out_tensor=out_name, in_tensors={model: in_name}, models=[model]
    )
    value = params.model_params["scale"][0]
    return None if value is None else float(value)


def _scaled(module: nn.Module, scales: Mapping[str, float | None]) -> nn.Module:
    values = {1.0 if v is None else v for v in scales.values()}
    if len(values) == 1 and isinstance(module, nn.Linear | nn.Embedding):
        return ScaledOutput(module, values.pop())
    new = _shallow(module)
    for name, p in module.named_parameters(recurse=False):
        factor = scales[name]
        if factor is not None and factor != 1:
            new._parameters[name] = nn.Parameter(p.detach() * factor, requires_grad=False)
    return new


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with its own child, parameter, buffer and hook tables, sharing every tensor."""
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):  # _modules, _parameters, _buffers, _forward_pre_hooks, ...
            new.__dict__[key] = copy.copy(value)
    return new


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _layer_container(model: nn.Module) -> str:
    for name, _ in model.named_parameters():
        match = _LAYER_CONTAINER.match(name)
        if match:
            prefix = match.group(1)
            return f"{prefix}.{match.group(2)}" if prefix else match.group(2)
    raise RecipeError(f"{type(model).__name__} has no numbered decoder layers")


def live_model(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A transformers model whose parameters are `tensors` themselves (no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = next(iter(tensors.values())).dtype
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.load_state_dict(dict(tensors), strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    device = next(iter(tensors.values())).device
    return model.to(device).eval()
