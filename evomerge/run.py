"""The search loop: it writes the run directory (its layout and trial records: evomerge.run_dir).

Resume (`--resume RUN_DIR`) reads all of it back: finished trials are never re-run, candidates
that were in flight when the run stopped are evaluated again (the optimizer state holds every
candidate from the moment it is asked, before any worker sees it), and the budget counts every
finished trial, so a resumed run asks the same points and ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.atomic import atomic_write_text
from evomerge.errors import ConfigError, SearchFailedError
from evomerge.export import dump_documents, to_mergekit_documents
from evomerge.genome_space import GenomeSpace
from evomerge.io.reader import ModelReader
from evomerge.model_refs import resolve_model, resolve_recipe_refs
from evomerge.optimize.base import Candidate, Optimizer
from evomerge.optimize.registry import load_optimizer, make_optimizer, state_path
from evomerge.pareto import DEFAULT_RULE, select, trial_front, updated_front
from evomerge.preflight import check_search
from evomerge.recipe import Recipe
from evomerge.run_dir import (
    BEST_FILE,
    CONFIG_FILE,
    MERGEKIT_BEST_FILE,
    SPACE_FILE,
    TRIALS_FILE,
    Pool,
    PoolFactory,
    TrialLog,
    TrialRecord,
)
from evomerge.search_config import SearchConfig, load_search_config, parse_search_config
from evomerge.space import SearchSpace
from evomerge.workers import Job, TrialResult, WorkerSetup, make_pool


@dataclass
class RunSummary:
    run_dir: Path
    trials: int
    failed: int
    best_id: int | None
    best_fitness: float | None
    seconds: float
    interrupted: bool
    select: str = DEFAULT_RULE  # the rule that picked best_id (evomerge.pareto)
    front_ids: tuple[
        int, ...
    ] = ()  # multi-objective runs: the Pareto front on the per-task objectives


# ---- building the parts ----------------------------------------------------------------


@dataclass(frozen=True)
class SearchSetup:
    config: SearchConfig
    models: list[str]
    base_model: str | None
    space: SearchSpace | GenomeSpace
    worker: WorkerSetup


def build_setup(config: SearchConfig, *, device: str | None = None) -> SearchSetup:
    """Resolve models, read the reference model's layout, build the space. Fails before any heavy work."""
    if config.dfs is not None:
        from evomerge.dfs import build_dfs_setup

        return build_dfs_setup(config, device=device)
    assert config.space is not None
    models = [resolve_model(m) for m in config.models]
    base = resolve_model(config.base_model) if config.base_model else None
    tokenizer = (
        resolve_model(config.tokenizer_source)
        if config.tokenizer_source and config.tokenizer_source != "base"
        else None
    )
    reference = ModelReader(Path(base or models[0]))
    space_class = GenomeSpace if config.space.genome is not None else SearchSpace
    space = space_class(
        config.space,
        models=models,
        base_model=base,
        num_layers=reference.num_layers,
        tensor_names=reference.names,
        dtype=config.dtype,
        # the genome writes tokenizer_source as given ("base" too), as mergekit's genome does
        tokenizer_source=tokenizer
        if space_class is SearchSpace
        else tokenizer or config.tokenizer_source,
    )
    all_models = tuple(dict.fromkeys([*([base] if base else []), *models]))
    worker = WorkerSetup(
        models=all_models,
        reference_model=tokenizer or base or models[0],
        **scoring_settings(config, device),
        source_device=config.source_device,
        engine_args=dict(config.engine_args),
    )
    return SearchSetup(config, models, base, space, worker)


def scoring_settings(config: SearchConfig, device: str | None) -> dict[str, Any]:
    """The `WorkerSetup` fields every kind of search takes from its config as they are."""
    return {
        "tasks": tuple(config.tasks),
        "include_paths": tuple(str(Path(p).expanduser().resolve()) for p in config.task_paths),
        "dtype": config.dtype,
        "limit": config.limit,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "device": device or config.device,
        "backend": config.backend,
    }


def demo_config_path() -> Path:
    """`search_spaces/demo.yaml` beside the package: what `evomerge search` runs when given no config."""
    import evomerge

    path = Path(evomerge.__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
    if not path.is_file():
        raise ConfigError(
            f"give a search config (or --resume RUN_DIR); the demo config is not at {path}"
        )
    return path


def new_run_dir(config_path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config_path.stem}-{stamp}"


# ---- the loop --------------------------------------------------------------------------


def search(
    config_path: Path | None,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    max_evals: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    num_gpus: float = 0.0,
    device: str | None = None,
    progress: bool = True,
    pool_factory: PoolFactory | None = None,
) -> RunSummary:
    """Run (or resume) a search; returns when the budget is spent or on Ctrl-C."""
    if resume:
        if run_dir is None or not (run_dir / CONFIG_FILE).exists():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
        raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        config = parse_search_config(raw, origin=str(run_dir / CONFIG_FILE))
    else:
        if config_path is None:
            config_path = demo_config_path()
        config, raw = load_search_config(config_path)
        run_dir = run_dir or new_run_dir(config_path)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} is not empty; use --resume to continue it")
    raw, config = _with_overrides(raw, max_evals=max_evals, workers=workers, device=device)
    config = check_search(config)  # everything checkable, before a run directory or a worker exists

    setup = build_setup(config, device=device)
    if ray_address and pool_factory is None:
        from evomerge.ray_runtime import check_cluster

        check_cluster(ray_address)
    _quiet_libraries()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume or (max_evals, workers, device) != (None, None, None):
        atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(raw, sort_keys=False))
    if not resume:
        atomic_write_text(run_dir / SPACE_FILE, json.dumps(setup.space.describe(), indent=1))
    optimizer = _optimizer(config, setup.space, run_dir, resume=resume)
    log = TrialLog(run_dir / TRIALS_FILE)
    done = {r.id: r for r in log.read()}
    retry = _reconcile(optimizer, done, config.optimizer.per_task)
    if not resume:
        if isinstance(
            setup.space, GenomeSpace
        ):  # mergekit-evolve's start: evaluated first, the CMA-ES mean
            optimizer.enqueue(setup.space.start_point(config.seed))
        for item in config.warm_start:
            optimizer.enqueue(
                setup.space.encode(Recipe.from_dict(resolve_recipe_refs(item), origin="warm_start"))
            )

    n_workers = config.workers
    factory: PoolFactory = pool_factory or (
        lambda s, n: make_pool(s, n, address=ray_address, num_gpus=num_gpus)
    )
    loop = _Loop(config, setup.space, optimizer, log, run_dir, done)
    pool: Pool | None = None
    try:
        pool = factory(setup.worker, n_workers)
        interrupted = loop.run(pool, retry, progress=progress)
    except KeyboardInterrupt:  # while the workers start: the run directory is complete, it resumes
        interrupted = True
    finally:
        if pool is not None:
            pool.close()
    if loop.best is None and not interrupted:
        raise SearchFailedError(loop.failure_message())
    return loop.summary(interrupted)


def _with_overrides(
    raw: dict[str, Any], *, max_evals: int | None, workers: int | None, device: str | None
) -> tuple[dict[str, Any], SearchConfig]:
    """The config file with the command line's overrides written in: what the run directory records."""
    raw = dict(raw)
    if max_evals is not None:
        raw["budget"] = {**(raw.get("budget") or {}), "max_evals": max_evals}
    if workers is not None:
        raw["workers"] = workers
    if device is not None:
        raw["device"] = device
    return raw, parse_search_config(raw, origin="the command line")


def _quiet_libraries() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def _optimizer(
    config: SearchConfig, space: SearchSpace | GenomeSpace, run_dir: Path, *, resume: bool
) -> Optimizer:
    opt = config.optimizer
    options = dict(opt.options)
    if opt.kind == "cma":
        options.setdefault("sigma0", opt.sigma0)
        if opt.popsize:
            options.setdefault("popsize", opt.popsize)
    n_objectives = len(config.tasks) if opt.per_task else 1
    if resume and state_path(opt.kind, run_dir).exists():
        return load_optimizer(
            opt.kind,
            space.dim,
            seed=opt.seed,
            run_dir=run_dir,
            n_objectives=n_objectives,
            **options,
        )
    return make_optimizer(
        opt.kind, space.dim, seed=opt.seed, run_dir=run_dir, n_objectives=n_objectives, **options
    )


def told_values(record: TrialRecord, per_task: bool) -> list[float] | None:
    """What the optimizer is told of a finished trial: its fitness, or its per-task objectives."""
    if record.fitness is None:
        return None
    return list(record.objectives) if per_task else [record.fitness]


def _reconcile(
    optimizer: Optimizer, done: Mapping[int, TrialRecord], per_task: bool
) -> list[Candidate]:
    """After a crash: tell the optimizer trials that were logged but not told; re-run the rest."""
    retry = []
    for cand in optimizer.unfinished():
        record = done.get(cand.id)
        if record is None:
            retry.append(cand)
        else:
            optimizer.tell(cand.id, told_values(record, per_task))
    return retry


class _Loop:
    def __init__(
        self,
        config: SearchConfig,
        space: SearchSpace | GenomeSpace,
        optimizer: Optimizer,
        log: TrialLog,
        run_dir: Path,
        done: dict[int, TrialRecord],
    ):
        self.config, self.space, self.optimizer, self.log, self.run_dir = (
            config,
            space,
            optimizer,
            log,
            run_dir,
        )
        self.done = done
        self.front = trial_front(done.values())
        self.best = select(self.front, config.optimizer.select)
        self.points: dict[int, tuple[float, ...]] = {}
        self.recipes: dict[int, dict[str, Any]] = {}
        self.session_start = len(done)
        self.started = time.monotonic()

    @property
    def budget_left(self) -> int:
        max_evals = self.config.budget.max_evals
        return (max_evals - len(self.done)) if max_evals is not None else 1 << 30

    def out_of_time(self) -> bool:
        minutes = self.config.budget.max_minutes
        return minutes is not None and (time.monotonic() - self.started) / 60 >= minutes

    def run(self, pool: Pool, retry: list[Candidate], *, progress: bool) -> bool:
        queue = list(retry)
        submitted_at: dict[int, float] = {}
        with _Display(self, enabled=progress) as display:
            try:
                while True:
                    in_flight = len(pool.in_flight)
                    room = min(pool.free_slots, self.budget_left - in_flight)
                    if room > 0 and not self.out_of_time():
                        fresh = room - len(queue)
                        if fresh > 0:
                            queue.extend(self.optimizer.ask(fresh))
                        while queue and pool.free_slots:
                            cand = queue.pop(0)
                            recipe = self.space.decode(cand.x).to_dict()
                            self.points[cand.id] = cand.x
                            self.recipes[cand.id] = recipe
                            submitted_at[cand.id] = time.monotonic()
                            pool.submit(Job(cand.id, recipe))
                    if not pool.in_flight:
                        break
                    for result in pool.poll(timeout=1.0):
                        wall = time.monotonic() - submitted_at.pop(
                            result.candidate_id, time.monotonic()
                        )
                        self.finish(result, wall)
                        display.update()
            except KeyboardInterrupt:
                return True
        return False

    def finish(self, result: TrialResult, wall: float) -> None:
        record = TrialRecord.from_result(
            result,
            x=self.points.pop(result.candidate_id, None),
            recipe=self.recipes.pop(result.candidate_id, None),
            wall_seconds=wall,
        )
        self.log.append(record)  # logged first: a crash before the tell is reconciled on resume
        self.done[result.candidate_id] = record
        self.optimizer.tell(
            result.candidate_id, told_values(record, self.config.optimizer.per_task)
        )
        self.front = updated_front(self.front, record)
        best = select(self.front, self.config.optimizer.select)
        if best is not self.best and best is not None:
            self.best = best
            recipe = best.to_recipe()
            atomic_write_text(self.run_dir / BEST_FILE, recipe.to_yaml())
            atomic_write_text(
                self.run_dir / MERGEKIT_BEST_FILE, dump_documents(to_mergekit_documents(recipe))
            )

    def failure_message(self) -> str:
        """One line for a search in which no candidate scored."""
        first = min(
            (r for r in self.done.values() if r.status != "ok"),
            key=lambda r: r.id,
            default=None,
        )
        cause = f"; first error (trial #{first.id}): {first.error}" if first else ""
        return (
            f"no candidate scored in {len(self.done)} trials (run directory {self.run_dir}){cause}"
        )

    def summary(self, interrupted: bool) -> RunSummary:
        if (
            interrupted
        ):  # Ctrl-C may land between logging a trial and recording it here: the log is the truth
            self.done.update({r.id: r for r in self.log.read()})
            self.front = trial_front(self.done.values())
            self.best = select(self.front, self.config.optimizer.select)
        failed = sum(1 for r in self.done.values() if r.status != "ok")
        return RunSummary(
            self.run_dir,
            len(self.done),
            failed,
            self.best.id if self.best else None,
            self.best.fitness if self.best else None,
            time.monotonic() - self.started,
            interrupted,
            self.config.optimizer.select,
            tuple(t.id for t in self.front) if self.config.optimizer.per_task else (),
        )


class _Display:
    """A live line: trials done, best so far, evaluations per minute."""

    def __init__(self, loop: _Loop, *, enabled: bool):
        self.loop, self.enabled = loop, enabled

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]search"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self.progress.start()
            total = self.loop.config.budget.max_evals
            self.task = self.progress.add_task(
                "search", total=total, completed=len(self.loop.done), status=""
            )
        return self

    def update(self) -> None:
        if not self.enabled:
            return
        loop = self.loop
        minutes = max((time.monotonic() - loop.started) / 60, 1e-9)
        best = f"{loop.best.fitness:.4f} (#{loop.best.id})" if loop.best else "-"
        rate = (len(loop.done) - loop.session_start) / minutes
        self.progress.update(
            self.task, completed=len(loop.done), status=f"best {best}  {rate:.1f} evals/min"
        )

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


__all__ = ["RunSummary", "build_setup", "resolve_model", "search"]
