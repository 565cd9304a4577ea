"""What a tensor name means, by naming pattern rather than a hand list per architecture.

Decoder layers sit in a numbered container: ``model.layers.N.`` (Llama, Mistral, Qwen2, Gemma,
Phi), ``transformer.h.N.`` (GPT-2, GPT-J, Falcon, BLOOM), ``gpt_neox.layers.N.``,
``model.decoder.layers.N.`` (OPT), ``transformer.blocks.N.`` (MPT), ``backbone.layers.N.`` (Mamba).
The first such container in a name is the decoder layer; later numbers (MoE ``experts.M``) are not.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, Literal

from evomerge.errors import CheckpointError

TensorRole = Literal["embed", "head", "layer", "pre", "post"]

_LAYER_CONTAINER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")

# The module that owns the parameter (the segment before ``.weight``), compared exactly so that
# BLOOM's ``word_embeddings_layernorm`` is not mistaken for the embedding itself.
_EMBED_MODULES = frozenset(
    {"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings"}
)
_HEAD_MODULES = frozenset({"lm_head", "embed_out", "output_layer"})
# InternLM2 names its head plainly ``output.weight``; only at the top level is that unambiguous.
_TOP_LEVEL_HEAD_MODULES = frozenset({"output"})
# Non-layer tensors that feed the first layer: position embeddings, embedding norms and
# projections (GPT-2 wpe, OPT embed_positions / project_in, BLOOM word_embeddings_layernorm).
_PRE_LAYER_HINT = re.compile(r"emb|position|^pos_|^wpe$|^project_in$")

_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Config lists with one entry per decoder layer (transformers 5.x writes ``layer_types`` for e.g.
# Qwen2 and Gemma2/3; the others belong to SmolLM3/Llama4, Jamba, hybrid MLP models).
_PER_LAYER_LIST_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for tensors outside the layers."""
    match = _LAYER_CONTAINER.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, new_index: int) -> str:
    """The same tensor name in decoder layer ``new_index``."""
    match = _LAYER_CONTAINER.search(name)
    if match is None:
        raise CheckpointError(f"tensor {name!r} is not inside a decoder layer")
    if new_index < 0:
        raise CheckpointError(f"layer index for tensor {name!r} must be >= 0, got {new_index}")
    start, end = match.span(1)
    return f"{name[:start]}{new_index}{name[end:]}"


def tensor_role(name: str) -> TensorRole:
    """Where a tensor sits in a causal LM: embedding, head, a layer, or before/after the layers."""
    if layer_index(name) is not None:
        return "layer"
    segments = name.split(".")
    module_path = segments[:-1] if len(segments) > 1 else segments
    module = module_path[-1]
    if module in _EMBED_MODULES:
        return "embed"
    if module in _HEAD_MODULES or (len(module_path) == 1 and module in _TOP_LEVEL_HEAD_MODULES):
        return "head"
    if any(_PRE_LAYER_HINT.search(segment) for segment in module_path):
        return "pre"
    return "post"


def is_vocab_tensor(name: str) -> bool:
    """True for tensors with one row per vocabulary entry: the input embedding and the LM head."""
    return tensor_role(name) in ("embed", "head")


def num_layers_from_config(config: dict[str, Any]) -> int:
    """The decoder layer count a Hugging Face config declares."""
    holder, key = _layer_count_location(config)
    return int(holder[key])


def set_num_layers(
    config: dict[str, Any], n: int, *, source_layers: Sequence[int] | None = None
) -> dict[str, Any]:
    """A copy of ``config`` declaring ``n`` decoder layers, per-layer lists kept consistent.

    ``source_layers[i]`` names the original layer that new layer ``i`` was built from (a
    passthrough/frankenmerge); per-layer lists such as ``layer_types`` then follow the sources.
    Without it, lists are truncated, or extended by their repeating pattern (Gemma's
    sliding/full alternation) or, when they do not repeat, by their last entry (Qwen2's full
    layers followed by sliding ones).
    """
    if n < 1:
        raise CheckpointError(f"a model needs at least one layer, got num_layers={n}")
    if source_layers is not None and len(source_layers) != n:
        raise CheckpointError(
            f"source_layers has {len(source_layers)} entries for a model of {n} layers"
        )
    new_config = copy.deepcopy(config)
    holder, count_key = _layer_count_location(new_config)
    old_n = int(holder[count_key])
    for key in _NUM_LAYERS_KEYS:
        if holder.get(key) == old_n:
            holder[key] = n
    for key in _PER_LAYER_LIST_KEYS:
        values = holder.get(key)
        if isinstance(values, list) and len(values) == old_n:
            holder[key] = _resize_per_layer_list(values, n, source_layers, key)
    return new_config


def _layer_count_location(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The dict and key holding the layer count: top level, or ``text_config`` (multimodal)."""
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            for key in _NUM_LAYERS_KEYS:
                if isinstance(holder.get(key), int):
                    return holder, key
    raise CheckpointError(f"config declares no layer count (none of {', '.join(_NUM_LAYERS_KEYS)})")


def _resize_per_layer_list(
    values: list[Any], n: int, source_layers: Sequence[int] | None, key: str
) -> list[Any]:
    if source_layers is not None:
        bad = [i for i in source_layers if not 0 <= i < len(values)]
        if bad:
            raise CheckpointError(
                f"source layer {bad[0]} is outside the {len(values)} entries of config {key}"
            )
        return [values[i] for i in source_layers]
    if n <= len(values):
        return values[:n]
    period = _smallest_period(values)
    if period < len(values):
        return [values[i % period] for i in range(n)]
    return values + [values[-1]] * (n - len(values))


def _smallest_period(values: list[Any]) -> int:
    for period in range(1, len(values) + 1):
        if all(values[i] == values[i - period] for i in range(period, len(values))):
            return period
    return len(values)
