"""`evomerge report RUN_DIR`: plots of the search and a held-out table of best merge vs sources vs defaults.

Multi-objective runs (one objective per dev task) also get their Pareto front: every member with
its dev objectives, the first `front_test` of them (by weighted mean) with their test scores too,
and `pareto.png`, the front with the source models and default merges on the same axes.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evomerge import pareto
from evomerge.atomic import atomic_write_text
from evomerge.model_refs import resolve_recipe_refs
from evomerge.preflight import resolve_tasks
from evomerge.recipe import Recipe
from evomerge.run import build_setup
from evomerge.run_dir import (
    BEST_FILE,
    CONFIG_FILE,
    REPORT_DATA_FILE,
    REPORT_FILE,
    SPACE_FILE,
    TrialRecord,
    read_trials,
)
from evomerge.search_config import SearchConfig, parse_search_config
from evomerge.task_index import TaskSpec
from evomerge.workers import Job, evaluator_class

FRONT_TEST = 8  # front members scored on the test tasks by default (one scoring each)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # evolved | source | baseline | front
    test: dict[str, float]  # test task -> its metric
    test_avg: float
    dev_avg: float
    dev: dict[str, float] = field(default_factory=dict)  # dev task -> its metric (full split)
    search_dev: dict[str, float] = field(
        default_factory=dict
    )  # ... on the search's dev samples (`limit`)


def fitness_plot(trials: list[TrialRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, best, failed = [], [], [], []
    running = float("-inf")
    for i, t in enumerate(trials, start=1):
        if t.fitness is None:
            failed.append(i)
            continue
        xs.append(i)
        ys.append(t.fitness)
        running = max(running, t.fitness)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.5, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    if failed:
        ax.scatter(
            failed, [min(ys, default=0)] * len(failed), marker="x", color="grey", label="failed"
        )
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness (dev)")
    ax.set_title("evomerge search")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def knob_heatmap(space: list[dict[str, Any]], x: list[float], path: Path) -> None:
    """Rows: knob (parameter, model, filter); columns: layer group; colour: the knob's position in its range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows: dict[str, dict[int, tuple[float, float]]] = {}
    for knob, u in zip(space, x, strict=True):
        label = ".".join(p for p in (knob["param"], _short(knob["model"]), knob["filter"]) if p)
        if knob.get("log"):  # e.g. the data-flow space's scales
            value = knob["low"] * (knob["high"] / knob["low"]) ** u
        else:
            value = knob["low"] + u * (knob["high"] - knob["low"])
        rows.setdefault(label, {})[knob["group"]] = (u, value)
    groups = max(k["group"] for k in space) + 1
    grid = np.full((len(rows), groups), np.nan)
    for r, cells in enumerate(rows.values()):
        for g, (u, _) in cells.items():
            grid[r, g] = u
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.9 * groups), 1.2 + 0.4 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for r, cells in enumerate(rows.values()):
        for g, (u, value) in cells.items():
            ax.text(
                g,
                r,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if u < 0.6 else "black",
            )
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(groups), [f"g{g}" for g in range(groups)])
    ax.set_xlabel("layer group")
    ax.set_title("best recipe's knobs\n(colour: position in the search range)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(model: str | None) -> str | None:
    return model.rstrip("/").rsplit("/", 1)[-1] if model else None


class ReportScorer:
    """Scores models for the report on the dev and the test tasks (full splits), with one evaluator.

    With a `limit`, the search scored its trials on the first `limit` items of each dev task; each
    model is then also scored on those (`Row.search_dev`, the live weights scored again by a
    second scorer of the search's own tasks), so that it sits on the same axes as the trials.
    """

    def __init__(self, config: SearchConfig, *, device: str | None = None):
        from evomerge.evaluate import Scorer

        self.config = config
        self.setup = build_setup(config, device=device)
        tasks = _unique(config.tasks + config.test_tasks)
        worker = replace(self.setup.worker, tasks=tuple(tasks), limit=None)
        self.evaluator = evaluator_class(worker)(worker)
        # task -> +1 if higher is better else -1, as the scorer resolved it (None: the task's own config)
        self.signs = {spec.name: sign for spec, _, sign in self.evaluator.scorer.terms}
        worker = self.setup.worker
        # (a vLLM worker has no live HF model to re-score: its rows keep the full-split dev scores)
        self.search_scorer = (
            None
            if config.limit is None or worker.backend != "hf"
            else Scorer(
                worker.tasks,
                include_paths=worker.include_paths,
                limit=worker.limit,
                batch_size=worker.batch_size,
                device=self.evaluator.device,
                backend="hf",  # on the evaluator's live HF model; a second vLLM engine would double the GPU memory
            )
        )

    def trial(self, record: TrialRecord, name: str, kind: str) -> Row:
        result = self.evaluator.evaluate(Job(record.id, record.recipe))
        if result.status != "ok":
            raise RuntimeError(
                f"trial {record.id} failed when the report re-scored it: {result.error}"
            )
        return self._row(name, kind, result.metrics)

    def sources(self) -> list[Row]:
        setup = self.setup
        paths = ([setup.base_model] if setup.base_model else []) + [
            m for m in setup.models if m != setup.base_model
        ]
        return [
            self._row(_short(p) or p, "source", self.evaluator.score_model_dir(p).metrics)
            for p in paths
        ]

    def baselines(self) -> list[Row]:
        rows = []
        for name, recipe in self.config.baselines.items():
            data = Recipe.from_dict(
                resolve_recipe_refs(recipe), origin=f"baselines.{name}"
            ).to_dict()
            result = self.evaluator.evaluate(Job(-1, data))
            if result.status != "ok":
                raise RuntimeError(f"baseline '{name}' failed: {result.error}")
            rows.append(self._row(name, "baseline", result.metrics))
        return rows

    def _row(self, name: str, kind: str, metrics: dict[str, dict[str, float]]) -> Row:
        config = self.config

        def avg(tasks: list[TaskSpec]) -> float:
            total = sum(t.weight for t in tasks)
            signed = sum(t.weight * self.signs[t.name] * metrics[t.name][t.metric] for t in tasks)
            return signed / total if total else float("nan")

        test = {t.name: metrics[t.name][t.metric] for t in config.test_tasks}
        dev = {t.name: metrics[t.name][t.metric] for t in config.tasks}
        search_dev = dev
        if self.search_scorer is not None:  # the weights just scored are still in the live model
            searched = self.search_scorer.score(
                self.evaluator.model, self.evaluator.tokenizer
            ).metrics
            search_dev = {t.name: searched[t.name][t.metric] for t in config.tasks}
        test_avg = avg(config.test_tasks) if config.test_tasks else float("nan")
        return Row(name, kind, test, test_avg, avg(config.tasks), dev, search_dev)


def evaluate_rows(
    config: SearchConfig, best: TrialRecord | None, *, device: str | None = None
) -> list[Row]:
    """Score the best merge, every source model and every baseline on the dev and test tasks."""
    scorer = ReportScorer(config, device=device)
    evolved = (
        [scorer.trial(best, f"evolved (trial #{best.id})", "evolved")] if best is not None else []
    )
    return evolved + scorer.sources() + scorer.baselines()


def _unique(tasks: list[TaskSpec]) -> list[TaskSpec]:
    seen: dict[str, TaskSpec] = {}
    for t in tasks:
        seen.setdefault(t.name, t)
    return list(seen.values())


def markdown_table(rows: list[Row], config: SearchConfig) -> str:
    tasks = [t.name for t in config.test_tasks]
    head = [
        "model",
        *[f"{n} ({m.metric})" for n, m in zip(tasks, config.test_tasks, strict=True)],
        "test avg",
        "dev avg",
        "dev-test gap",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r.name}**" if r.kind == "evolved" else r.name
        cells = [
            name,
            *[f"{r.test[t]:.3f}" for t in tasks],
            f"{r.test_avg:.3f}",
            f"{r.dev_avg:.3f}",
            f"{r.dev_avg - r.test_avg:+.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_report(
    run_dir: Path,
    *,
    device: str | None = None,
    console: Any = None,
    select: str | None = None,
    front_test: int = FRONT_TEST,
) -> dict[str, Any]:
    """Write fitness.png, knobs.png, (pareto.png,) report.md and report.json into `run_dir`; print the tables.

    `select`: the rule that picks the evolved row (default: the run's `optimizer.select`);
    `front_test`: how many Pareto-front members are scored on the test tasks.
    """
    import yaml

    run_dir = Path(run_dir)
    config = parse_search_config(
        yaml.safe_load((run_dir / CONFIG_FILE).read_text()), origin=str(run_dir / CONFIG_FILE)
    )
    config = resolve_tasks(config)  # concrete metric keys: the table reads them
    rule = select or config.optimizer.select
    trials = read_trials(run_dir)
    front = pareto.trial_front(trials)
    best = pareto.select(front, rule)
    if trials:
        fitness_plot(trials, run_dir / "fitness.png")
    space = (
        json.loads((run_dir / SPACE_FILE).read_text()) if (run_dir / SPACE_FILE).exists() else None
    )
    if best is not None and space and best.x:
        knob_heatmap(space, best.x, run_dir / "knobs.png")
    scorer = ReportScorer(config, device=device)
    evolved = (
        [scorer.trial(best, f"evolved (trial #{best.id})", "evolved")] if best is not None else []
    )
    marks = scorer.sources() + scorer.baselines()
    rows = evolved + marks
    table = markdown_table(rows, config)
    failed = sum(1 for t in trials if t.status != "ok")
    header = f"# evomerge report: {run_dir.name}\n\n{len(trials)} trials ({failed} failed)"
    if best is not None:
        header += (
            f"; best: trial #{best.id} with dev fitness {best.fitness:.4f}, picked by `{rule}` "
            f"({pareto.RULE_DESCRIPTIONS[rule]}; recipe: `{BEST_FILE}`)"
        )
    text = f"{header}\n\nHeld-out test tasks (full splits):\n\n{table}\n"
    data: dict[str, Any] = {
        "trials": len(trials),
        "failed": failed,
        "select": rule,
        "best_id": best.id if best else None,
        "rows": [r.__dict__ for r in rows],
    }
    members: list[dict[str, Any]] = []
    if _multi_objective(config) and front:
        members = _score_front(scorer, front, best, evolved[0], front_test)
        pareto_plot(trials, front, best, rule, config, scorer.signs, marks, run_dir / "pareto.png")
        text += (
            "\n"
            + front_markdown(members, config, scorer.signs, rule, len(trials), front_test)
            + "\n![Pareto front](pareto.png)\n"
        )
        data["front"] = members
    text += "\n![fitness](fitness.png)\n\n![knobs](knobs.png)\n"
    atomic_write_text(run_dir / REPORT_FILE, text)
    atomic_write_text(run_dir / REPORT_DATA_FILE, json.dumps(data, indent=1))
    _print_table(rows, config, console)
    if members:
        _print_front(members, config, rule, console)
    return data


def _multi_objective(config: SearchConfig) -> bool:
    return config.optimizer.per_task and len(config.tasks) > 1


def _score_front(
    scorer: ReportScorer,
    front: list[TrialRecord],
    best: TrialRecord | None,
    best_row: Row,
    front_test: int,
) -> list[dict[str, Any]]:
    """One entry per member, in id order; the picked one (its test scores are the evolved row's)
    and the `front_test` members with the highest weighted mean have test scores."""
    by_mean = sorted(front, key=lambda t: (t is not best, -t.fitness, t.id))
    tested = {t.id for t in by_mean[: max(front_test, 1)]}
    picks = pareto.picked_by(front)
    members = []
    for t in front:
        row = None
        if t.id in tested:
            row = best_row if t is best else scorer.trial(t, f"trial #{t.id}", "front")
        members.append(
            {
                "id": t.id,
                "fitness": t.fitness,
                "objectives": list(pareto.objectives(t) or ()),
                "dev": {
                    task.name: scorer.signs[task.name] * v
                    for task, v in zip(scorer.config.tasks, pareto.objectives(t) or (), strict=True)
                },
                "test": row.test if row else None,
                "test_avg": row.test_avg if row else None,
                "picked_by": picks.get(t.id, []),
            }
        )
    return members


def front_markdown(
    members: list[dict[str, Any]],
    config: SearchConfig,
    signs: dict[str, float],
    rule: str,
    n_trials: int,
    front_test: int,
) -> str:
    dev = [t.name for t in config.tasks]
    test = [t.name for t in config.test_tasks]
    tested = sum(1 for m in members if m["test"] is not None)
    split = f"first {config.limit} items of each dev split" if config.limit else "full dev splits"
    lines = [
        f"## Pareto front: {len(members)} of {n_trials} trials",
        "",
        f"The trials no other trial beats on every dev task ({config.optimizer.kind}, one objective per task; "
        f"dev scores from the search, {split}). `{rule}` picked the evolved row above. "
        + (
            f"Test scores: all {tested} members."
            if tested == len(members)
            else f"Test scores: {tested} members, the picked one and the highest weighted means (`--front-test {front_test}`); the other {len(members) - tested}: dev only."
        ),
        "",
    ]
    head = ["trial", *[_label(n, signs) for n in dev], "dev mean", *test, "test avg", "picked by"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in members:
        picked = ", ".join(m["picked_by"])
        cells = [
            f"**#{m['id']}**" if rule in m["picked_by"] else f"#{m['id']}",
            *[f"{m['dev'][n]:.3f}" for n in dev],
            f"{m['fitness']:.3f}",
        ]
        cells += (
            [f"{m['test'][n]:.3f}" for n in test] + [f"{m['test_avg']:.3f}"]
            if m["test"] is not None
            else ["–"] * (len(test) + 1)
        )
        lines.append("| " + " | ".join([*cells, picked]) + " |")
    return "\n".join(lines) + "\n"


def _label(task: str, signs: dict[str, float]) -> str:
    return task + (" (lower is better)" if signs.get(task, 1.0) < 0 else "")


def pareto_plot(
    trials: list[TrialRecord],
    front: list[TrialRecord],
    best: TrialRecord,
    rule: str,
    config: SearchConfig,
    signs: dict[str, float],
    marks: list[Row],
    path: Path,
) -> None:
    """Dev metric of each pair of objectives: every trial, the front, the picked member, and the
    source models and default merges (`marks`, on the search's dev samples) on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in config.tasks]

    def metric(t: TrialRecord) -> list[float]:
        return [signs[n] * v for n, v in zip(names, pareto.objectives(t) or (), strict=True)]

    scored = [metric(t) for t in trials if t.fitness is not None]
    members = sorted((metric(t) for t in front), key=lambda p: p[0])
    picked = metric(best)
    pairs = list(itertools.combinations(range(len(names)), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 4.0 * nrows + 0.6), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs, strict=False):
        ax.scatter(
            [p[i] for p in scored], [p[j] for p in scored], s=10, color="0.72", label="trial"
        )
        if len(names) == 2:
            ax.plot([p[i] for p in members], [p[j] for p in members], ls="--", lw=0.8, color="C0")
        ax.scatter(
            [p[i] for p in members],
            [p[j] for p in members],
            s=30,
            color="C0",
            edgecolors="k",
            linewidths=0.4,
            zorder=3,
            label="Pareto front",
        )
        ax.scatter(
            [picked[i]],
            [picked[j]],
            marker="*",
            s=220,
            color="C3",
            edgecolors="k",
            linewidths=0.5,
            zorder=4,
            label=f"picked ({rule})",
        )
        for row in marks:
            style = (
                {"marker": "^", "color": "C2"}
                if row.kind == "source"
                else {"marker": "s", "color": "C1"}
            )
            x, y = row.search_dev[names[i]], row.search_dev[names[j]]
            ax.scatter(
                [x],
                [y],
                s=40,
                edgecolors="k",
                linewidths=0.4,
                zorder=3,
                label="source model" if row.kind == "source" else "default merge",
                **style,
            )
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5)
        ax.set_xlabel(_label(names[i], signs).removeprefix("zoo_"))
        ax.set_ylabel(_label(names[j], signs).removeprefix("zoo_"))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(
        unique.values(),
        unique.keys(),
        loc="lower center",
        ncol=len(unique),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"Pareto front on the dev tasks: {len(front)} of {len(scored)} scored trials", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _print_table(rows: list[Row], config: SearchConfig, console: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="held-out test tasks")
    table.add_column("model")
    for t in config.test_tasks:
        table.add_column(t.name.removeprefix("zoo_"), justify="right")
    table.add_column("test avg", justify="right", style="bold")
    table.add_column("dev avg", justify="right")
    best_test = max((r.test_avg for r in rows), default=None)
    for r in rows:
        style = "bold green" if r.kind == "evolved" else None
        avg = f"{r.test_avg:.3f}" + (" *" if r.test_avg == best_test else "")
        table.add_row(
            r.name,
            *[f"{r.test[t.name]:.3f}" for t in config.test_tasks],
            avg,
            f"{r.dev_avg:.3f}",
            style=style,
        )
    console.print(table)


def _print_front(
    members: list[dict[str, Any]], config: SearchConfig, rule: str, console: Any
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"Pareto front on the dev tasks ({len(members)} trials; picked by {rule}: bold)"
    )
    table.add_column("trial")
    for t in config.tasks:
        table.add_column(t.name.removeprefix("zoo_"), justify="right")
    table.add_column("dev mean", justify="right")
    table.add_column("test avg", justify="right")
    table.add_column("picked by")
    for m in members:
        test = f"{m['test_avg']:.3f}" if m["test_avg"] is not None else "-"
        style = "bold green" if rule in m["picked_by"] else None
        table.add_row(
            f"#{m['id']}",
            *[f"{m['dev'][t.name]:.3f}" for t in config.tasks],
            f"{m['fitness']:.3f}",
            test,
            ", ".join(m["picked_by"]),
            style=style,
        )
    console.print(table)
