"""Workers: load the input models once, then merge each candidate in memory and score it.

`CandidateEvaluator` is a plain class. `SerialPool` runs it in-process (`--workers 0`, debugging);
`RayPool` wraps it in Ray actors, the only place Ray appears. Both pools have one interface:
`submit(job)`, `poll(timeout) -> results`, `free_slots`, `close()`.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evomerge.errors import EvomergeError

STARTUP_TIMEOUT_S = 300  # building a worker loads every input model: minutes for large ones


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to build itself; small and picklable."""

    models: tuple[str, ...]  # every model path a candidate may read (base included)
    reference_model: str  # architecture, config and tokenizer of the live model
    tasks: tuple[Any, ...]  # TaskSpec or names
    dtype: str = "float32"
    limit: int | None = None
    batch_size: int = 64
    seed: int = 0
    device: str | None = None  # None: cuda when visible, else cpu
    threads: int | None = None
    include_paths: tuple[str, ...] = ()
    backend: Literal["hf", "vllm"] = "hf"
    # "path": a data-flow-space worker (evomerge/path_worker.py) scoring passthrough recipes as live layer paths
    evaluator: Literal["merge", "path"] = "merge"
    recipe_models: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # path worker: models given as recipes
    path_reference: str | None = None  # path worker: the model whose shell hosts the paths (model A)


@dataclass(frozen=True)
class Job:
    candidate_id: int
    recipe: Mapping[str, Any]  # the recipe as a plain mapping (what gets logged and exported)
    attempt: int = 0


@dataclass(frozen=True)
class TrialResult:
    candidate_id: int
    status: Literal["ok", "failed"]
    fitness: float | None
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    error: str | None = None
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    worker: str = ""
    objectives: tuple[float, ...] = ()  # per fitness task (see Scorer.objectives)


class CandidateEvaluator:
    """Holds the input models on its device and a live model whose weights each candidate replaces."""

    def __init__(self, setup: WorkerSetup):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.evaluate import Scorer, TaskSpec
        from evomerge.io.reader import ModelReader
        from evomerge.merge import DTYPES, LoadedModel

        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.device = setup.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[setup.dtype]
        self.sources = {m: LoadedModel(ModelReader(m), dtype=dtype, device=self.device) for m in setup.models}
        self.model = AutoModelForCausalLM.from_pretrained(setup.reference_model, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(setup.reference_model)
        self.scorer = Scorer(
            [TaskSpec.parse(t) for t in setup.tasks],
            include_paths=setup.include_paths,
            limit=setup.limit,
            batch_size=setup.batch_size,
            device=self.device,
            backend=setup.backend,
        )
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, job: Job) -> TrialResult:
        from evomerge.merge import merge_to_state_dict
        from evomerge.recipe import Recipe

        t0 = time.perf_counter()
        merge_seconds = 0.0
        try:
            recipe = Recipe.from_dict(job.recipe)
            state = merge_to_state_dict(recipe, self.sources, device=self.device, seed=self.setup.seed)
            self.load_weights(state)
            merge_seconds = time.perf_counter() - t0
            score = self.scorer.score(self.model, self.tokenizer)
        except Exception as e:  # a failed candidate must not stop the search
            return TrialResult(
                job.candidate_id, "failed", None, error=_one_line(e), merge_seconds=merge_seconds,
                score_seconds=time.perf_counter() - t0 - merge_seconds, worker=self.name,
            )
        if not math.isfinite(score.fitness):
            return TrialResult(job.candidate_id, "failed", None, score.metrics, "fitness is not finite", merge_seconds, score.seconds, self.name)
        return TrialResult(
            job.candidate_id, "ok", score.fitness, score.metrics, None, merge_seconds, score.seconds, self.name, score.objectives
        )

    def load_weights(self, state: Mapping[str, Any]) -> None:
        """Copy merged tensors into the live model in place (tied weights come along)."""
        import torch

        live = self.model.state_dict()
        unexpected = [k for k in state if k not in live]
        if unexpected:
            raise EvomergeError(f"merged tensor {unexpected[0]} has no place in {self.setup.reference_model}")
        with torch.no_grad():
            for name, tensor in state.items():
                target = live[name]
                if target.shape != tensor.shape:
                    raise EvomergeError(f"merged tensor {name} has shape {list(tensor.shape)}, the model expects {list(target.shape)}")
                target.copy_(tensor)

    def score_model_dir(self, path: str) -> TrialResult:
        """Score weights read from a model directory (the report's source models)."""
        from evomerge.io.reader import ModelReader
        from evomerge.merge import DTYPES

        t0 = time.perf_counter()
        reader = ModelReader(Path(path))
        dtype = DTYPES[self.setup.dtype]
        self.load_weights({n: reader.get(n, dtype=dtype, device=self.device) for n in reader.names})
        score = self.scorer.score(self.model, self.tokenizer)
        return TrialResult(-1, "ok", score.fitness, score.metrics, None, time.perf_counter() - t0 - score.seconds, score.seconds, self.name)

    def ping(self) -> str:
        return self.name


class SerialPool:
    """One in-process evaluator; `poll` runs the queued job."""

    def __init__(self, setup: WorkerSetup, *, evaluator_cls: type[CandidateEvaluator] = CandidateEvaluator):
        self.evaluator = evaluator_cls(setup)
        self._queue: deque[Job] = deque()

    @property
    def size(self) -> int:
        return 1

    @property
    def free_slots(self) -> int:
        return 0 if self._queue else 1

    @property
    def in_flight(self) -> list[Job]:
        return list(self._queue)

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def poll(self, timeout: float | None = None) -> list[TrialResult]:
        return [self.evaluator.evaluate(self._queue.popleft())] if self._queue else []

    def close(self) -> None:
        self._queue.clear()


class RayPool:
    """A pool of Ray actors kept busy by the driver; a dead actor is replaced and its job retried once."""

    def __init__(
        self,
        setup: WorkerSetup,
        n_workers: int,
        *,
        address: str | None = None,
        num_gpus: float = 0.0,
        cpus_per_worker: int = 1,
        evaluator_cls: type[CandidateEvaluator] = CandidateEvaluator,
    ):
        import ray

        self._ray = ray
        self._owns_ray = not ray.is_initialized()  # a Ray this pool started, it also shuts down
        if self._owns_ray:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(n_workers * cpus_per_worker, 1), include_dashboard=False, log_to_driver=False)
        elif not address:
            _check_local_resources(ray, n_workers * cpus_per_worker, n_workers * num_gpus)
        self._remote_cls = ray.remote(evaluator_cls).options(num_cpus=cpus_per_worker, num_gpus=num_gpus)
        self.setup = setup if setup.threads else _with_threads(setup, cpus_per_worker)
        self._actors = [self._remote_cls.remote(self.setup) for _ in range(n_workers)]
        self._idle = list(range(n_workers))
        self._running: dict[Any, tuple[int, Job]] = {}  # object ref -> (actor slot, job)
        try:  # fail fast if workers cannot start
            ray.get([a.ping.remote() for a in self._actors], timeout=STARTUP_TIMEOUT_S)
        except ray.exceptions.RayActorError as e:  # the evaluator's constructor raised
            self.close()
            raise _startup_error(e) from None
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise EvomergeError(
                f"{n_workers} Ray worker(s) ({cpus_per_worker} CPU, {num_gpus:g} GPU each) did not start within "
                f"{STARTUP_TIMEOUT_S} s; cluster resources: {ray.cluster_resources()}"
            ) from None

    @property
    def size(self) -> int:
        return len(self._actors)

    @property
    def free_slots(self) -> int:
        return len(self._idle)

    @property
    def in_flight(self) -> list[Job]:
        return [job for _, job in self._running.values()]

    def submit(self, job: Job) -> None:
        if not self._idle:
            raise RuntimeError("no free worker")
        slot = self._idle.pop()
        ref = self._actors[slot].evaluate.remote(job)
        self._running[ref] = (slot, job)

    def poll(self, timeout: float | None = None) -> list[TrialResult]:
        if not self._running:
            return []
        ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            slot, job = self._running.pop(ref)
            try:
                results.append(self._ray.get(ref))
                self._idle.append(slot)
            except self._ray.exceptions.RayActorError as e:
                self._replace(slot)
                if job.attempt == 0:
                    self.submit(Job(job.candidate_id, job.recipe, attempt=1))
                else:
                    results.append(TrialResult(job.candidate_id, "failed", None, error=f"worker died twice: {_one_line(e)}"))
            except self._ray.exceptions.RayTaskError as e:
                self._idle.append(slot)
                results.append(TrialResult(job.candidate_id, "failed", None, error=_one_line(e)))
        return results

    def _replace(self, slot: int) -> None:
        self._actors[slot] = self._remote_cls.remote(self.setup)
        self._idle.append(slot)

    def worker_names(self) -> list[str]:
        """host:pid of every actor (used to find a worker's process)."""
        return self._ray.get([a.ping.remote() for a in self._actors])

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._running, self._idle = [], {}, []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def make_pool(
    setup: WorkerSetup,
    workers: int,
    *,
    address: str | None = None,
    num_gpus: float = 0.0,
    evaluator_cls: type[CandidateEvaluator] | None = None,
) -> SerialPool | RayPool:
    """`workers == 0`: in-process; otherwise that many Ray actors."""
    evaluator_cls = evaluator_cls or evaluator_class(setup)
    if workers == 0:
        return SerialPool(setup, evaluator_cls=evaluator_cls)
    return RayPool(setup, workers, address=address, num_gpus=num_gpus, evaluator_cls=evaluator_cls)


def evaluator_class(setup: WorkerSetup) -> Any:
    """The evaluator a setup asks for: merge-and-load, or the data-flow space's layer paths."""
    if setup.evaluator == "path":
        from evomerge.path_worker import PathEvaluator

        return PathEvaluator
    return CandidateEvaluator


def _check_local_resources(ray: Any, cpus: float, gpus: float) -> None:
    """A Ray started earlier in this process may be too small for this pool: say so instead of waiting forever."""
    total = ray.cluster_resources()
    for name, needed in (("CPU", cpus), ("GPU", gpus)):
        if needed > total.get(name, 0):
            raise EvomergeError(
                f"the workers need {needed:g} {name}s but the running Ray has {total.get(name, 0):g}; "
                f"use fewer workers or start Ray with more (ray.init(num_cpus=...))"
            )


def _startup_error(e: BaseException) -> EvomergeError:
    """The worker's own error (a bad task, a missing model...) if it was one of ours, else one line."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, EvomergeError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = [line.strip() for line in str(e).splitlines() if "Error:" in line]
    return EvomergeError(f"a Ray worker could not start: {lines[-1] if lines else _one_line(e)}")


def _with_threads(setup: WorkerSetup, threads: int) -> WorkerSetup:
    from dataclasses import replace

    return replace(setup, threads=threads)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:500]


__all__: Sequence[str] = ["CandidateEvaluator", "Job", "RayPool", "SerialPool", "TrialResult", "WorkerSetup", "make_pool"]
