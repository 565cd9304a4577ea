"""The vllm backend's worker: the input models and one vLLM engine, nothing else.

Each candidate is merged tensor by tensor straight into the engine (`merge_stream` feeding
vLLM's `reload_weights`), so besides the sources the worker holds one copy of the weights, the
engine's, and one tensor in flight -- not the merged state dict and an HF model as well.

Memory per worker, for input models of W bytes each (N of them), L the largest tensor:

- `source_device` unset (sources on the worker's device): device N*W + W (engine) + KV cache
  + about (N+2)*L while a tensor merges.
- `source_device: cpu`: host N*W (pinned when the device is a GPU); device W + KV cache +
  about (N+2)*L: each input tensor is copied to the device for its merge only.

On a GPU the engine takes the memory free once the sources are loaded, less the (N+2)*L kept for
merging, unless `engine_args` set `gpu_memory_utilization`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from evomerge.workers import Job, TrialResult, WorkerSetup, run_trial, timed_score


class VLLMCandidateEvaluator:
    """Same interface as `workers.CandidateEvaluator`: `evaluate(job)`, `score_model_dir(path)`, `ping()`."""

    def __init__(self, setup: WorkerSetup):
        import torch

        from evomerge.evaluate import Scorer, TaskSpec
        from evomerge.io.reader import ModelReader
        from evomerge.merge import DTYPES, LoadedModel
        from evomerge.vllm_backend import VLLMEngine

        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.device = setup.device or ("cuda" if torch.cuda.is_available() else "cpu")
        source_device = setup.source_device or self.device
        pin = torch.device(source_device).type == "cpu" and torch.device(self.device).type == "cuda"
        dtype = DTYPES[setup.dtype]
        self.sources = {
            m: LoadedModel(ModelReader(m), dtype=dtype, device=source_device, pin_memory=pin)
            for m in setup.models
        }
        self.scorer = Scorer(
            [TaskSpec.parse(t) for t in setup.tasks],
            include_paths=setup.include_paths,
            limit=setup.limit,
            batch_size=setup.batch_size,
            device=self.device,
            backend="vllm",
        )
        self.engine = VLLMEngine(
            setup.reference_model,
            engine_args={"dtype": setup.dtype, "seed": setup.seed, **setup.engine_args},
            reserve_bytes=merge_reserve_bytes(self.sources.values(), dtype),
        )
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, job: Job) -> TrialResult:
        from evomerge.merge import merge_stream
        from evomerge.recipe import Recipe

        def materialize() -> None:
            recipe = Recipe.from_dict(job.recipe)
            names, tensors = merge_stream(
                recipe, self.sources, device=self.device, seed=self.setup.seed
            )
            self.engine.load_weights(tensors, names)

        return run_trial(job, self.name, materialize, lambda: self.scorer.score(self.engine))

    def score_model_dir(self, path: str) -> TrialResult:
        """Score weights read from a model directory (the report's source models)."""

        def load_and_score() -> Any:
            self.engine.load(path)
            return self.scorer.score(self.engine)

        return timed_score(self.name, load_and_score)

    def ping(self) -> str:
        return self.name


def merge_reserve_bytes(sources: Any, dtype: Any) -> int:
    """Device memory one tensor's merge needs: every input's copy, the result and a temporary."""
    sources = list(sources)
    largest = max((t.numel() for s in sources for t in s.tensors.values()), default=0)
    return (len(sources) + 2) * largest * dtype.itemsize
