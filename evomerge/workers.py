"""Workers: load the input models once, then merge each candidate in memory and score it.

`CandidateEvaluator` is a plain class. `SerialPool` runs it in-process (`--workers 0`, debugging);
`RayPool` wraps it in Ray actors, the only place Ray appears. Both pools have the interface the
search loop uses (`evomerge.run_dir.Pool`): `submit(job)`, `poll(timeout) -> results`,
`free_slots`, `in_flight`, `close()`.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import CheckpointError, EvomergeError, ScoringError

if TYPE_CHECKING:
    from evomerge.evaluate import Score

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
    # Where the vllm worker keeps its input models: None, the worker's device; "cpu", (pinned) host
    # memory, each tensor moved to the device only for its merge. See evomerge.vllm_worker.
    source_device: str | None = None
    engine_args: Mapping[str, Any] = field(default_factory=dict)  # vllm.LLM keyword arguments
    # "path": a data-flow-space worker (evomerge/path_worker.py) scoring passthrough recipes as live layer paths
    evaluator: Literal["merge", "path"] = "merge"
    recipe_models: tuple[
        tuple[str, Mapping[str, Any]], ...
    ] = ()  # path worker: models given as recipes
    path_reference: str | None = (
        None  # path worker: the model whose shell hosts the paths (model A)
    )


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


def timed_score(worker: str, load_and_score: Callable[[], Any]) -> TrialResult:
    """A model scored outside the search (the report's rows): the time not spent scoring counts as loading."""
    t0 = time.perf_counter()
    score = load_and_score()
    return TrialResult(
        -1,
        "ok",
        score.fitness,
        score.metrics,
        None,
        time.perf_counter() - t0 - score.seconds,
        score.seconds,
        worker,
    )


def run_trial(
    job: Job, worker: str, materialize: Callable[[], None], score: Callable[[], Any]
) -> TrialResult:
    """One candidate in any worker: put its weights in place, score them, time both steps.

    A candidate that raises, or whose fitness is not finite, is a failed trial: it must not stop
    the search.
    """
    t0 = time.perf_counter()
    merge_seconds = 0.0
    try:
        materialize()
        merge_seconds = time.perf_counter() - t0
        result = score()
    except Exception as e:
        return TrialResult(
            job.candidate_id,
            "failed",
            None,
            error=_one_line(e),
            merge_seconds=merge_seconds,
            score_seconds=time.perf_counter() - t0 - merge_seconds,
            worker=worker,
        )
    if not math.isfinite(result.fitness):
        return TrialResult(
            job.candidate_id,
            "failed",
            None,
            result.metrics,
            "fitness is not finite",
            merge_seconds,
            result.seconds,
            worker,
        )
    return TrialResult(
        job.candidate_id,
        "ok",
        result.fitness,
        result.metrics,
        None,
        merge_seconds,
        result.seconds,
        worker,
        result.objectives,
    )


class CandidateEvaluator:
    """Holds the input models on its device and a live model whose weights each candidate replaces.

    A score never reads weights another candidate left behind: every load replaces every tensor
    the reference checkpoint holds (all names and shapes are checked before the first copy), and
    a load that fails half-way puts the reference weights back before anything else happens.
    """

    def __init__(self, setup: WorkerSetup):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from evomerge.evaluate import Scorer, TaskSpec
        from evomerge.io.reader import ModelReader
        from evomerge.merge import DTYPES, LoadedModel

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model is not the search's output
        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup = setup
        self.device = setup.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[setup.dtype]
        self.sources = {
            m: LoadedModel(ModelReader(m), dtype=dtype, device=self.device) for m in setup.models
        }
        self.model = (
            AutoModelForCausalLM.from_pretrained(setup.reference_model, dtype=dtype)
            .to(self.device)
            .eval()
        )
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
        self._reference = ModelReader(setup.reference_model)
        live = self.model.state_dict()
        # tied tensors (lm_head = embed_tokens) share storage: loading either name sets both
        by_storage: dict[int, list[str]] = {}
        for name, tensor in live.items():
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
        self._ties = {name: tuple(names) for names in by_storage.values() for name in names}
        self._required = [n for n in self._reference.names if n in live]  # what a load must cover
        self._dirty = False  # the live model holds a half-copied state

    def evaluate(self, job: Job) -> TrialResult:
        from evomerge.merge import merge_to_state_dict
        from evomerge.recipe import Recipe

        def materialize() -> None:
            recipe = Recipe.from_dict(job.recipe)
            self.load_weights(
                merge_to_state_dict(recipe, self.sources, device=self.device, seed=self.setup.seed)
            )

        return run_trial(job, self.name, materialize, self._score_live)

    def load_weights(self, state: Mapping[str, Any], *, source: str = "the merge") -> None:
        """Copy every tensor of the live model from `state`, in place (tied weights come along).

        Checked before the first copy: each name has a place in the model, each shape fits, and
        no tensor of the model is left out (it would keep the last candidate's values).
        """
        live = self.model.state_dict()
        self._check_names(state, source)
        for name, tensor in state.items():
            if live[name].shape != tensor.shape:
                raise CheckpointError(
                    f"tensor {name} of {source} has shape {list(tensor.shape)}, the model expects {list(live[name].shape)}"
                )
        try:
            self._copy(live, state)
        except BaseException:
            self._restore_reference()
            raise

    def _check_names(self, names: Iterable[str], source: str) -> None:
        live = self.model.state_dict()
        names = set(names)
        unexpected = sorted(n for n in names if n not in live)
        if unexpected:
            raise CheckpointError(
                f"tensor {unexpected[0]} of {source} has no place in {self.setup.reference_model}"
            )
        covered = {alias for n in names for alias in self._ties[n]}
        missing = [n for n in self._required if n not in covered]
        if missing:
            raise CheckpointError(
                f"{source} has no tensor {missing[0]}, which the model being scored needs"
            )

    def _copy(self, live: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        import torch

        self._dirty = True
        with torch.no_grad():
            for name, tensor in state.items():
                live[name].copy_(tensor)
        self._dirty = False

    def _restore_reference(self) -> None:
        """Put the reference checkpoint's weights back (after a copy that failed half-way)."""
        from evomerge.merge import DTYPES

        dtype = DTYPES[self.setup.dtype]
        reference = {
            n: self._reference.get(n, dtype=dtype, device=self.device) for n in self._required
        }
        self._copy(self.model.state_dict(), reference)

    def _score_live(self) -> Score:
        if self._dirty:  # only if restoring the reference failed too
            raise ScoringError("the live model holds a half-loaded candidate; it is not scored")
        return self.scorer.score(self.model, self.tokenizer)

    def score_model_dir(self, path: str) -> TrialResult:
        """Score weights read from a model directory (the report's source models).

        The directory must hold every tensor of the live model; it is refused before any is read.
        """
        from evomerge.io.reader import ModelReader
        from evomerge.merge import DTYPES

        def load_and_score() -> Score:
            reader = ModelReader(Path(path))
            source = f"model directory {path}"
            self._check_names(reader.names, source)
            dtype = DTYPES[self.setup.dtype]
            self.load_weights(
                {n: reader.get(n, dtype=dtype, device=self.device) for n in reader.names},
                source=source,
            )
            return self._score_live()

        return timed_score(self.name, load_and_score)

    def ping(self) -> str:
        return self.name


class SerialPool:
    """One in-process evaluator; `poll` runs the queued job."""

    def __init__(
        self, setup: WorkerSetup, *, evaluator_cls: type[CandidateEvaluator] = CandidateEvaluator
    ):
        self.evaluator = evaluator_cls(setup)
        self._queue: deque[Job] = deque()

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
        from evomerge.ray_runtime import connect

        self._connection = connect(
            address, num_cpus=max(n_workers * cpus_per_worker, 1)
        )  # what it started, close() stops
        self._ray = self._connection.ray
        self._actors: list[Any] = []
        self._idle: list[int] = []
        self._running: dict[Any, tuple[int, Job]] = {}  # object ref -> (actor slot, job)
        try:
            self._start_workers(setup, n_workers, address, num_gpus, cpus_per_worker, evaluator_cls)
        except BaseException:  # a bad setup or Ctrl-C: stop what was started
            self.close()
            raise

    def _start_workers(
        self,
        setup: WorkerSetup,
        n_workers: int,
        address: str | None,
        num_gpus: float,
        cpus_per_worker: int,
        evaluator_cls: type[CandidateEvaluator],
    ) -> None:
        ray = self._ray
        if not self._connection.owns_ray and not address:
            _check_local_resources(ray, n_workers * cpus_per_worker, n_workers * num_gpus)
        self._remote_cls = ray.remote(evaluator_cls).options(
            num_cpus=cpus_per_worker, num_gpus=num_gpus
        )
        self.setup = setup if setup.threads else _with_threads(setup, cpus_per_worker)
        self._actors = [self._remote_cls.remote(self.setup) for _ in range(n_workers)]
        self._idle = list(range(n_workers))
        try:  # fail fast if workers cannot start
            ray.get([a.ping.remote() for a in self._actors], timeout=STARTUP_TIMEOUT_S)
        except ray.exceptions.RayActorError as e:  # the evaluator's constructor raised
            raise _startup_error(e) from None
        except ray.exceptions.GetTimeoutError:
            raise EvomergeError(
                f"{n_workers} Ray worker(s) ({cpus_per_worker} CPU, {num_gpus:g} GPU each) did not start within "
                f"{STARTUP_TIMEOUT_S} s; cluster resources: {ray.cluster_resources()}"
            ) from None

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
                    results.append(
                        TrialResult(
                            job.candidate_id,
                            "failed",
                            None,
                            error=f"worker died twice: {_one_line(e)}",
                        )
                    )
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
        try:
            if self._ray.is_initialized():
                for actor in self._actors:
                    self._ray.kill(actor)
        finally:
            self._actors, self._running, self._idle = [], {}, []
            self._connection.close()


def make_pool(
    setup: WorkerSetup,
    workers: int,
    *,
    address: str | None = None,
    num_gpus: float = 0.0,
    evaluator_cls: type[CandidateEvaluator] | None = None,
) -> SerialPool | RayPool:
    """`workers == 0`: in-process; otherwise that many Ray actors."""
    evaluator_cls = evaluator_class(setup, evaluator_cls)
    if workers == 0:
        return SerialPool(setup, evaluator_cls=evaluator_cls)
    return RayPool(setup, workers, address=address, num_gpus=num_gpus, evaluator_cls=evaluator_cls)


def evaluator_class(setup: WorkerSetup, chosen: type | None = None) -> type:
    """The worker a setup asks for, unless a caller chose one: merge-and-load (HF), the vllm
    backend's own (sources and engine, no HF model), or the data-flow space's layer paths."""
    if chosen is not None:
        return chosen
    if setup.evaluator == "path":
        from evomerge.path_worker import PathEvaluator

        return PathEvaluator
    if setup.backend == "vllm":
        from evomerge.vllm_worker import VLLMCandidateEvaluator

        return VLLMCandidateEvaluator
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


__all__: Sequence[str] = [
    "CandidateEvaluator",
    "Job",
    "RayPool",
    "SerialPool",
    "TrialResult",
    "WorkerSetup",
    "evaluator_class",
    "make_pool",
]
