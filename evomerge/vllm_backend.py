"""The vLLM scoring backend: one engine per worker; each candidate's weights are copied into it.

Building a vLLM engine takes tens of seconds (CUDA graphs, KV-cache profiling), so a worker
builds one, from the reference model directory, and then only swaps weights: the model's own
`load_weights` (which knows vLLM's fused `qkv_proj` / `gate_up_proj` layout) runs inside the
engine through `LLM.apply_model`, and the prefix cache -- KV blocks computed with the previous
weights -- is dropped after every swap.

Needs a CUDA GPU and the `[vllm]` extra (`pip install 'evomerge[vllm]'`); `vllm` is imported
only when an engine is built. The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
unless the caller set it), so weights already on the GPU reach it without a copy through IPC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from evomerge.errors import ScoringError

# How vLLM's Llama-family models (Llama, Mistral, Qwen2/3, ...) store checkpoint tensors fused:
# (part of the HF name, part of the vLLM parameter name, shard id), as in their `load_weights`.
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)
# Checkpoint entries vLLM recomputes instead of loading.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# Prompt logprobs (how lm-eval scores loglikelihoods) and vLLM's prefix cache do not mix in
# every vLLM release; off by default. Turned on, the cache is reset after every weight swap.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"enable_prefix_caching": False}


def vllm_target(name: str, *, tie_word_embeddings: bool) -> tuple[str, str | int | None] | None:
    """The vLLM parameter (and shard of it) an HF checkpoint tensor is loaded into; None: skipped."""
    if name.endswith(SKIPPED_SUFFIXES):
        return None
    if tie_word_embeddings and name.startswith("lm_head."):
        return None  # vLLM ties lm_head to embed_tokens and ignores a stored copy
    for hf_part, vllm_part, shard in STACKED_PARAMS:
        if hf_part in name:
            return name.replace(hf_part, vllm_part), shard
    return name, None


def check_fused_coverage(names: Iterable[str], *, tie_word_embeddings: bool) -> None:
    """Every fused vLLM parameter must receive all its shards, or it would keep stale weights."""
    shards: dict[str, set[str | int]] = {}
    for name in names:
        target = vllm_target(name, tie_word_embeddings=tie_word_embeddings)
        if target is not None and target[1] is not None:
            shards.setdefault(target[0], set()).add(target[1])
    for param, got in sorted(shards.items()):
        needed = {shard for _, part, shard in STACKED_PARAMS if part in param}
        missing = needed - got
        if missing:
            shard_names = ", ".join(str(s) for s in sorted(missing, key=str))
            raise ScoringError(f"weights for vLLM parameter {param} lack shard(s) {shard_names}")


def load_weights_into(weights: Iterable[tuple[str, Any]], model: Any) -> list[str]:
    """Runs inside the engine: copy weights into vLLM's model; returns its parameters left untouched."""
    loaded = model.load_weights(iter(weights))
    if loaded is None:  # models whose load_weights does not report what it loaded
        return []
    return sorted({name for name, _ in model.named_parameters()} - set(loaded))


def reference_dir(model: Any) -> Path:
    """The model directory an engine is built from: a path, or where a live HF model was loaded from."""
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
    else:
        source = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
        if not source:
            raise ScoringError(
                "the vllm backend needs a model directory to build its engine from; the live model has no name_or_path"
            )
        path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ScoringError(f"the vllm backend needs a model directory with config.json: {path}")
    return path


class VLLMEngine:
    """lm-eval's `VLLM` wrapper around one engine, with in-place weight swaps."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_length: int | None = None,
        engine_args: Mapping[str, Any] | None = None,
        lm: Any = None,
    ) -> None:
        """`lm`: an already built lm-eval LM whose `.model` is a `vllm.LLM` (tests pass a stand-in)."""
        self.model_dir = Path(model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        self.args = {**DEFAULT_ENGINE_ARGS, **(engine_args or {})}
        self.lm = lm if lm is not None else self._build(max_length)
        self.loaded_from: Any = self.model_dir  # the engine starts with the reference weights

    def _build(self, max_length: int | None) -> Any:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as e:
            raise ScoringError(
                f"the vllm backend needs vLLM: pip install 'evomerge[vllm]' ({e})"
            ) from e
        args = dict(self.args)
        args.setdefault("gpu_memory_utilization", gpu_memory_fraction(self.model_dir))
        return VLLM(
            pretrained=str(self.model_dir), batch_size="auto", max_length=max_length, **args
        )

    def load(self, model: Any) -> None:
        """Put `model`'s weights (a live module, or a model directory) into the engine."""
        if isinstance(model, (str, Path)):
            path = Path(model).expanduser()
            if path.resolve() == Path(self.loaded_from).resolve():
                return  # already there: the engine was built from it, nothing changed since
            weights, names = _directory_weights(path)
        else:
            state = model.state_dict()
            weights, names = state.items(), list(state)
            path = None
        check_fused_coverage(names, tie_word_embeddings=self.tie_word_embeddings)
        self.loaded_from = "(in-memory weights)"
        untouched = [
            p
            for per_worker in self.lm.model.apply_model(partial(load_weights_into, list(weights)))
            for p in per_worker
        ]
        if untouched:
            raise ScoringError(
                f"the weights left vLLM parameter {untouched[0]} unset ({len(untouched)} in all)"
            )
        # KV blocks cached for the old weights would otherwise answer for the new ones.
        if self.lm.model.reset_prefix_cache() is False and self.args.get("enable_prefix_caching"):
            raise ScoringError("vLLM could not reset its prefix cache after loading new weights")
        if path is not None:
            self.loaded_from = path

    def close(self) -> None:
        self.lm = None


def gpu_memory_fraction(
    model_dir: Path, *, free: int | None = None, total: int | None = None
) -> float:
    """The share of the GPU vLLM may take: what is free now, less room for one merge in flight.

    vLLM's `gpu_memory_utilization` counts all of its memory (weights, activations, KV cache)
    as a fraction of the whole device and refuses to start if that much is not free. The worker
    already holds its source models; merging a candidate needs about two more copies of the
    weights (the merged tensors and the live model they are copied into).
    """
    if free is None or total is None:
        import torch

        free, total = torch.cuda.mem_get_info()
    model_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    usable = 0.9 * free - 2 * model_bytes
    if usable < 1.5 * model_bytes:
        raise ScoringError(
            f"not enough free GPU memory for a vLLM engine beside the worker's models "
            f"({free / 2**30:.1f} GiB free, weights {model_bytes / 2**30:.1f} GiB); set gpu_memory_utilization"
        )
    return usable / total


def _directory_weights(path: Path) -> tuple[Iterable[tuple[str, Any]], list[str]]:
    from evomerge.io.reader import ModelReader

    reader = ModelReader(path)
    return ((name, reader.get(name)) for name in reader.names), list(reader.names)
