"""Score a model with lm-eval: every task metric, and one fitness (their weighted mean).

The search scores thousands of candidates that differ only in their weights, so a `Scorer`
does every weight-independent step once: it indexes the task YAMLs, loads the datasets, builds
lm-eval's request `Instance`s (prompts, few-shot contexts, choices) and wraps the live model in
`HFLM`. Each `score` call then clears the instances' responses, runs them through the model,
and turns the responses into metrics with the task's own `apply_filters`, `process_results`
and `aggregation` -- the steps `lm_eval.evaluator.evaluate` takes, minus the rebuilding. No
response is ever cached across calls (no `CachingLM`, no request cache), so new weights always
get new answers.

A model whose log-likelihoods are not finite (NaN or overflowing weights) is not scored: it still
yields an accuracy (argmax over NaNs), so `score` raises a `ScoringError` instead. Task sets that
ask for no log-likelihood (generation only) get one probe request, so such models fail there too.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import ScoringError
from evomerge.task_index import (  # TaskSpec and the metric naming are re-exported from here
    MAIN_METRIC,  # noqa: F401
    NO_FILTER,
    MetricKeys,
    TaskSpec,
    build_task_index,
    default_tasks_dir,  # noqa: F401
    metric_key,
    resolve_metric,
    resolve_specs,
)

if TYPE_CHECKING:
    import torch
    from lm_eval.api.group import Group
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from rich.console import Console

# simple_evaluate's default few-shot seed, so few-shot contexts match a plain lm-eval run.
FEWSHOT_SEED = 1234
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling")


@dataclass(frozen=True)
class Score:
    fitness: float  # weighted mean of the specs' metrics, lower-is-better ones negated
    metrics: dict[str, dict[str, float]]  # task -> every numeric metric lm-eval reported
    seconds: float
    objectives: tuple[
        float, ...
    ] = ()  # each spec's metric, negated if lower is better (spec order)


@dataclass
class _PreparedTask:
    """A task whose requests are built once; `groups[i]` are the instances of `docs[i]`."""

    name: str
    task: Task
    docs: list[Any]
    groups: list[list[Instance]]
    metric_keys: dict[str, tuple[str, str]]  # our metric key -> (lm-eval metric, filter name)


class Scorer:
    """Scores models on fixed tasks; build once per worker, call `score` per candidate."""

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str | Mapping[str, Any]],
        *,
        include_paths: Sequence[str | Path] = (),
        limit: int | float | None = None,
        samples: Mapping[str, Sequence[int]] | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        backend: Literal["hf", "vllm"] = "hf",
        max_length: int | None = None,
        include_defaults: bool | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """`include_defaults`: also index lm-eval's own tasks (None: only when a name is not local).

        `engine_args` go to `vllm.LLM` (e.g. `gpu_memory_utilization`); the vllm backend only.
        """
        specs = [TaskSpec.parse(t) for t in tasks]
        if not specs:
            raise ScoringError("no tasks to score on")
        if limit is not None and samples is not None:
            raise ScoringError("give either limit or samples, not both")
        if limit is not None and not limit > 0:
            raise ScoringError(f"limit must be positive, got {limit}")
        if backend not in ("hf", "vllm"):
            raise ScoringError(f"unknown scoring backend {backend!r} (known: hf, vllm)")
        self.backend = backend
        self.batch_size = batch_size
        self.device = device
        self.max_length = max_length
        self.engine_args = dict(engine_args or {})
        self._hf_lm: LM | None = None
        self._hf_lm_owner: tuple[Any, Any] | None = None  # the (model, tokenizer) it wraps
        self._vllm: Any = None

        with _quiet():
            self.index = build_task_index(
                list(dict.fromkeys(spec.name for spec in specs)), include_paths, include_defaults
            )
            self.task_manager = self.index.manager
            self.specs = resolve_specs(specs, self.index)
            loaded, self.groups = self._load(list(dict.fromkeys(spec.name for spec in self.specs)))
            if samples is not None:
                strays = sorted(set(samples) - set(loaded))
                if strays:
                    raise ScoringError(
                        f"samples name task {strays[0]!r}, which is not among the tasks scored"
                    )
            self.tasks = {
                name: self._prepare(name, task, limit, samples) for name, task in loaded.items()
            }
        self.terms = [self._term(spec) for spec in self.specs]
        self._probe = self._finiteness_probe()

    # -- set-up (once) -------------------------------------------------------------------

    def _load(self, names: Sequence[str]) -> tuple[dict[str, Task], dict[str, Group]]:
        """Build every task (a group's with the group's settings) and the groups that aggregate."""
        tasks: dict[str, Task] = {}
        groups: dict[str, Group] = {}
        for name in names:
            try:
                loaded = self.task_manager.load([name])
            except Exception as e:  # a missing data file, a bad YAML, a failing !function...
                raise ScoringError(f"task {name} cannot be loaded: {type(e).__name__}: {e}") from e
            tasks.update(loaded["tasks"])
            groups.update(
                {g: group for g, group in loaded.get("groups", {}).items() if group.has_aggregation}
            )
        return tasks, groups

    def _prepare(
        self,
        name: str,
        task: Task,
        limit: int | float | None,
        samples: Mapping[str, Sequence[int]] | None,
    ) -> _PreparedTask:
        from lm_eval.evaluator_utils import get_sample_size

        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)

        indices = list(samples[name]) if samples is not None and name in samples else None
        n_docs = len(task.eval_docs)
        if indices is not None:
            bad = [i for i in indices if not 0 <= int(i) < n_docs]
            if bad or not indices:
                raise ScoringError(
                    f"task {name}: sample index {bad[0] if bad else '(none)'} is outside 0..{n_docs - 1}"
                )
            indices = sorted({int(i) for i in indices})
        task_limit = get_sample_size(task, limit)
        task.build_all_requests(
            limit=task_limit, samples=indices, rank=0, world_size=1, cache_requests=False
        )
        docs = list(task.doc_iterator(rank=0, limit=task_limit, world_size=1, samples=indices))
        by_doc: dict[int, list[Instance]] = defaultdict(list)
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        groups = [sorted(by_doc[doc_id], key=lambda inst: inst.idx) for doc_id, _ in docs]

        filters = [f["name"] for f in task.config.filter_list or []] or [NO_FILTER]
        metric_keys = {metric_key(m, f): (m, f) for m in task.higher_is_better() for f in filters}
        return _PreparedTask(name, task, [doc for _, doc in docs], groups, metric_keys)

    def _finiteness_probe(self) -> Instance | None:
        """One log-likelihood request (the first document's prompt and target) for task sets with none."""
        from lm_eval.api.instance import Instance

        instances = [inst for p in self.tasks.values() for inst in p.task.instances]
        if any(inst.request_type in _LOGLIKELIHOOD_TYPES for inst in instances):
            return None
        prepared = next((p for p in self.tasks.values() if p.groups and p.groups[0]), None)
        if prepared is None:
            return None
        first = prepared.groups[0][0]
        context = str(first.arguments[0])
        target = prepared.task.doc_to_target(prepared.docs[0])
        if isinstance(target, list):
            target = target[0] if target else ""
        continuation = f"{prepared.task.config.target_delimiter or ''}{target}"
        if not continuation.strip():  # no usable target: the prompt's last character
            context, continuation = context[:-1], context[-1:]
        return Instance(
            request_type="loglikelihood",
            doc=prepared.docs[0],
            arguments=(context, continuation),
            idx=0,
            metadata=(prepared.name, first.doc_id, 1),
        )

    def _term(self, spec: TaskSpec) -> tuple[TaskSpec, str, float]:
        """(spec, the metric key it names, +1 if higher is better else -1); validates the metric."""
        if spec.name in self.groups:
            leaves = [self.tasks[t.task_name] for t in self.groups[spec.name].get_all_tasks()]
            key = resolve_metric(spec, self._group_keys(self.groups[spec.name]))
        else:
            leaves = [self.tasks[spec.name]]
            key = resolve_metric(spec, self.tasks[spec.name].metric_keys)
        higher = spec.higher_is_better
        for (
            prepared
        ) in leaves:  # a group's metric is better the way its tasks' is (as lm-eval says)
            if higher is None and key in prepared.metric_keys:
                higher = prepared.task.higher_is_better().get(prepared.metric_keys[key][0])
        if higher is None:
            raise ScoringError(
                f"task {spec.name}: metric {spec.metric} does not say whether higher is better; set higher_is_better"
            )
        return spec, key, 1.0 if higher else -1.0

    def _group_keys(self, group: Group) -> MetricKeys:
        """A group's aggregate metrics; filters found in its tasks where the YAML lists none."""
        keys: MetricKeys = {}
        leaves = [self.tasks[t.task_name] for t in group.get_all_tasks()]
        for agg in group.aggregate_metric_list or []:
            filters = agg.filter_list
            if filters is None:
                filters = sorted(
                    {f for p in leaves for m, f in p.metric_keys.values() if m == agg.metric}
                )
            keys.update({metric_key(agg.metric, f): (agg.metric, f) for f in filters})
        return keys

    def group_metrics(
        self, metrics: Mapping[str, Mapping[str, float]]
    ) -> dict[str, dict[str, float]]:
        """Each group's aggregate of its tasks' metrics, computed by lm-eval's own `Group.aggregate`
        (a mean over the tasks, weighted by their sample counts unless the group says otherwise)."""
        as_lm_eval: dict[str, dict[str, Any]] = {}
        for name, prepared in self.tasks.items():
            row: dict[str, Any] = {
                ",".join(key.split("/", 1)) if "/" in key else f"{key},{NO_FILTER}": value
                for key, value in metrics.get(name, {}).items()
            }
            row["sample_len"] = len(prepared.docs)
            as_lm_eval[name] = row
        out = {}
        for name, group in self.groups.items():
            aggregated = group.aggregate(as_lm_eval)  # type: ignore[arg-type]
            out[name] = {
                metric_key(*key.split(",", 1)): float(value)
                for key, value in aggregated.items()
                if "," in key and "_stderr," not in key and isinstance(value, int | float)
            }
        return out

    # -- scoring (per candidate) ---------------------------------------------------------

    def score(self, model: torch.nn.Module | str | Path | Any, tokenizer: Any = None) -> Score:
        """Score a model directory, or a live `PreTrainedModel` (with its tokenizer).

        With the vllm backend, `model` may also be a `VLLMEngine` whose weights the caller
        swapped in (a worker's); a directory or live model is loaded into the scorer's engine.

        A live model is scored on the device it is on, and one passed again is scored through
        the same lm-eval wrapper: the caller may change its weights in place between calls.
        A directory is loaded onto `device` (float32 on CPUs) for this one call.
        """
        start = time.perf_counter()
        with _quiet():
            lm = self._lm(model, tokenizer)
            metrics = self._run(lm)
            metrics.update(self.group_metrics(metrics))
        fitness = self.fitness(metrics)
        return Score(fitness, metrics, time.perf_counter() - start, self.objectives(metrics))

    def fitness(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """Weighted mean of the specs' metrics; lower-is-better metrics count negated."""
        values = self.objectives(metrics)
        total = sum(spec.weight * v for (spec, _, _), v in zip(self.terms, values, strict=True))
        return total / sum(spec.weight for spec in self.specs)

    def objectives(self, metrics: Mapping[str, Mapping[str, float]]) -> tuple[float, ...]:
        """Each spec's metric, negated when lower is better (for multi-objective search)."""
        values = []
        for spec, key, sign in self.terms:
            if key not in metrics.get(spec.name, {}):
                raise ScoringError(f"task {spec.name} produced no {key} metric")
            values.append(sign * metrics[spec.name][key])
        return tuple(values)

    def _lm(self, model: Any, tokenizer: Any) -> LM:
        if self.backend == "vllm":
            return self._vllm_lm(model)
        if isinstance(model, (str, Path)):
            loaded, loaded_tokenizer = load_model_dir(
                model, device=self.device, tokenizer=tokenizer
            )
            return self._hflm(loaded, loaded_tokenizer)
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise ScoringError(
                f"cannot score a {type(model).__name__}: pass a transformers PreTrainedModel or a model directory"
            )
        if tokenizer is None:
            raise ScoringError("scoring an in-memory model needs its tokenizer")
        owner = self._hf_lm_owner
        if (
            self._hf_lm is None
            or owner is None
            or owner[0] is not model
            or owner[1] is not tokenizer
        ):
            self._hf_lm, self._hf_lm_owner = None, None  # let the previous model go first
            self._hf_lm, self._hf_lm_owner = self._hflm(model, tokenizer), (model, tokenizer)
        if model.training:
            model.eval()
        return self._hf_lm

    def _hflm(self, model: Any, tokenizer: Any) -> LM:
        return _hflm_class()(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )

    def _vllm_lm(self, model: Any) -> LM:
        from evomerge.vllm_backend import VLLMEngine, reference_dir

        if isinstance(model, VLLMEngine):  # a worker's engine, its weights already swapped in
            return model.lm
        if self._vllm is None or self._vllm.closed:  # closed: another engine took its place
            self._vllm = VLLMEngine(
                reference_dir(model), max_length=self.max_length, engine_args=self.engine_args
            )
        self._vllm.load(model)
        return self._vllm.lm

    def _run(self, lm: LM) -> dict[str, dict[str, float]]:
        """Run every task's requests through `lm`, then let each task turn responses into metrics."""
        by_type: dict[str, list[Instance]] = defaultdict(list)
        for prepared in self.tasks.values():
            for instance in prepared.task.instances:
                instance.resps.clear()
                instance.filtered_resps.clear()
                by_type[instance.request_type].append(instance)
        for request_type, instances in by_type.items():
            cloned = [inst for inst in instances for _ in range(inst.repeats)]
            responses = getattr(lm, request_type)(cloned, disable_tqdm=True)
            if request_type in _LOGLIKELIHOOD_TYPES:
                _check_finite(cloned, responses)
            for response, inst in zip(responses, cloned, strict=True):
                inst.resps.append(response)
        if self._probe is not None:
            _check_finite([self._probe], lm.loglikelihood([self._probe], disable_tqdm=True))
        return {name: _task_metrics(prepared) for name, prepared in self.tasks.items()}

    def close(self) -> None:
        """Drop the model wrapper and any vLLM engine (the task objects stay usable)."""
        self._hf_lm, self._hf_lm_owner = None, None
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@functools.cache
def _hflm_class() -> type:
    """lm-eval's HFLM, tokenizing each distinct string once (the prompts are the same every call)."""
    from lm_eval.models.huggingface import HFLM

    class TokenMemoHFLM(HFLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._token_memo: dict[tuple[str, bool | None, int | None], tuple[int, ...]] = {}
            super().__init__(*args, **kwargs)

        def tok_encode(
            self,
            string: str,
            add_special_tokens: bool | None = None,
            left_truncate_len: int | None = None,
            **kwargs: Any,
        ) -> list[int]:
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            key = (string, add_special_tokens, left_truncate_len)
            if key not in self._token_memo:
                self._token_memo[key] = tuple(
                    super().tok_encode(string, add_special_tokens, left_truncate_len)
                )
            return list(self._token_memo[key])

    return TokenMemoHFLM


def _check_finite(instances: Sequence[Instance], responses: Sequence[Any]) -> None:
    """Log-likelihood responses (`(logprob, is_greedy)` or a bare logprob) must all be finite."""
    values = [float(r[0] if isinstance(r, (tuple, list)) else r) for r in responses]
    bad = [(inst, v) for inst, v in zip(instances, values, strict=True) if not math.isfinite(v)]
    if bad:
        inst, value = bad[0]
        raise ScoringError(
            f"task {inst.task_name}: {len(bad)} of {len(values)} log-likelihoods are not finite "
            f"(document {inst.doc_id}: {value}); the model's weights overflow or hold NaN"
        )


def _task_metrics(prepared: _PreparedTask) -> dict[str, float]:
    """lm-eval's per-task post-processing: filters, per-document results, aggregation."""
    from lm_eval.api.metrics import mean

    task = prepared.task
    task.apply_filters()
    raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for filter_name in task.instances[0].filtered_resps:
        for doc, group in zip(prepared.docs, prepared.groups, strict=True):
            results = task.process_results(
                doc, [inst.filtered_resps[filter_name] for inst in group]
            )
            for metric, value in results.items():
                raw[(metric, filter_name)].append(value)
    aggregations = task.aggregation()
    metrics = {}
    for (metric, filter_name), values in raw.items():
        value = aggregations.get(metric, mean)(values)
        with contextlib.suppress(TypeError, ValueError):
            metrics[metric_key(metric, filter_name)] = float(value)
    return metrics


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's and datasets' chatter (logs, progress bars) while scoring."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "transformers", "datasets")]
    levels = [logger.level for logger in loggers]
    bars_were_disabled = datasets.are_progress_bars_disabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        # lm-eval's request building draws tqdm bars it has no switch for.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def load_model_dir(
    path: str | Path, *, device: str = "cpu", tokenizer: Any = None
) -> tuple[Any, Any]:
    """A model directory as (model, tokenizer); a directory without a tokenizer is an error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ScoringError(f"not a model directory (no config.json): {path}")
    if tokenizer is None:
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ScoringError(f"model directory has no tokenizer: {path}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as e:
            raise ScoringError(f"cannot load the tokenizer in {path}: {e}") from e
    # Half precision is slow or unsupported on CPUs; there the weights are scored in float32.
    dtype = torch.float32 if torch.device(device).type == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise ScoringError(f"cannot load the model in {path}: {e}") from e
    return model.to(device).eval(), tokenizer


def score_model_dir(
    path: str | Path,
    tasks: Sequence[TaskSpec | str | Mapping[str, Any]],
    *,
    limit: int | float | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    include_paths: Sequence[str | Path] = (),
    backend: Literal["hf", "vllm"] = "hf",
    engine_args: Mapping[str, Any] | None = None,
) -> Score:
    """`evomerge eval`: score one model directory on the given tasks (`engine_args`: vllm only)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ScoringError(f"model directory not found: {path}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ScoringError(f"model directory has no tokenizer: {path}")
    with Scorer(
        tasks,
        include_paths=include_paths,
        limit=limit,
        device=device,
        batch_size=batch_size,
        backend=backend,
        engine_args=engine_args,
    ) as scorer:
        return scorer.score(path)


def print_scores(scores: Mapping[str, Score], console: Console | None = None) -> None:
    """A table: one row per model, one column per task metric, then the fitness."""
    from rich.console import Console
    from rich.table import Table

    columns = list(
        dict.fromkeys(
            (task, metric)
            for score in scores.values()
            for task, metrics in score.metrics.items()
            for metric in metrics
        )
    )
    table = Table(show_lines=False)
    table.add_column("model", overflow="fold")
    for task, metric in columns:
        table.add_column(f"{task}\n{metric}", justify="right")
    table.add_column("fitness", justify="right", style="bold")
    for name, score in scores.items():
        cells = [_cell(score.metrics.get(task, {}).get(metric)) for task, metric in columns]
        table.add_row(name, *cells, _cell(score.fitness))
    (console or Console()).print(table)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
