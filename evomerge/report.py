"""`evomerge report RUN_DIR`: plots of the search and a held-out table of best merge vs sources vs defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.recipe import Recipe
from evomerge.run import (
    BEST_FILE,
    CONFIG_FILE,
    SPACE_FILE,
    atomic_write_text,
    build_setup,
    read_trials,
    resolve_recipe_refs,
)
from evomerge.search_config import SearchConfig, TaskEntry, parse_search_config
from evomerge.workers import Job, evaluator_class


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # evolved | source | baseline
    test: dict[str, float]  # test task -> its metric
    test_avg: float
    dev_avg: float


def fitness_plot(trials: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, best, failed = [], [], [], []
    running = float("-inf")
    for i, t in enumerate(trials, start=1):
        if t["fitness"] is None:
            failed.append(i)
            continue
        xs.append(i)
        ys.append(t["fitness"])
        running = max(running, t["fitness"])
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.5, label="trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    if failed:
        ax.scatter(failed, [min(ys, default=0)] * len(failed), marker="x", color="grey", label="failed")
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
            ax.text(g, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if u < 0.6 else "black")
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


def evaluate_rows(config: SearchConfig, best: dict[str, Any] | None, *, device: str | None = None) -> list[Row]:
    """Score the best merge, every source model and every baseline on the dev and test tasks."""
    setup = build_setup(config, device=device)
    tasks = _unique(config.tasks + config.test_tasks)
    worker = replace(setup.worker, tasks=tuple(t.model_dump() for t in tasks), limit=None)
    evaluator = evaluator_class(worker)(worker)
    rows = []
    if best is not None:
        result = evaluator.evaluate(Job(best["id"], best["recipe"]))
        rows.append(_row(f"evolved (trial #{best['id']})", "evolved", result.metrics, config))
    sources = ([setup.base_model] if setup.base_model else []) + [m for m in setup.models if m != setup.base_model]
    for path in sources:
        rows.append(_row(_short(path) or path, "source", evaluator.score_model_dir(path).metrics, config))
    for name, recipe in config.baselines.items():
        data = Recipe.from_dict(resolve_recipe_refs(recipe), origin=f"baselines.{name}").to_dict()
        result = evaluator.evaluate(Job(-1, data))
        if result.status != "ok":
            raise RuntimeError(f"baseline '{name}' failed: {result.error}")
        rows.append(_row(name, "baseline", result.metrics, config))
    return rows


def _unique(tasks: list[TaskEntry]) -> list[TaskEntry]:
    seen: dict[str, TaskEntry] = {}
    for t in tasks:
        seen.setdefault(t.name, t)
    return list(seen.values())


def _row(name: str, kind: str, metrics: dict[str, dict[str, float]], config: SearchConfig) -> Row:
    def avg(tasks: list[TaskEntry]) -> float:
        total = sum(t.weight for t in tasks)
        signed = sum(t.weight * (metrics[t.name][t.metric] if t.higher_is_better is not False else -metrics[t.name][t.metric]) for t in tasks)
        return signed / total if total else float("nan")

    test = {t.name: metrics[t.name][t.metric] for t in config.test_tasks}
    return Row(name, kind, test, avg(config.test_tasks) if config.test_tasks else float("nan"), avg(config.tasks))


def markdown_table(rows: list[Row], config: SearchConfig) -> str:
    tasks = [t.name for t in config.test_tasks]
    head = ["model", *[f"{n} ({m.metric})" for n, m in zip(tasks, config.test_tasks, strict=True)], "test avg", "dev avg", "dev-test gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r.name}**" if r.kind == "evolved" else r.name
        cells = [name, *[f"{r.test[t]:.3f}" for t in tasks], f"{r.test_avg:.3f}", f"{r.dev_avg:.3f}", f"{r.dev_avg - r.test_avg:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def make_report(run_dir: Path, *, device: str | None = None, console: Any = None) -> dict[str, Any]:
    """Write fitness.png, knobs.png, report.md and report.json into `run_dir`; print the table."""
    import yaml

    run_dir = Path(run_dir)
    config = parse_search_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()), origin=str(run_dir / CONFIG_FILE))
    trials = read_trials(run_dir)
    scored = [t for t in trials if t["fitness"] is not None]
    best = max(scored, key=lambda t: t["fitness"]) if scored else None
    if trials:
        fitness_plot(trials, run_dir / "fitness.png")
    space = json.loads((run_dir / SPACE_FILE).read_text()) if (run_dir / SPACE_FILE).exists() else None
    if best is not None and space and best.get("x"):
        knob_heatmap(space, best["x"], run_dir / "knobs.png")
    rows = evaluate_rows(config, best, device=device)
    table = markdown_table(rows, config)
    failed = sum(1 for t in trials if t["status"] != "ok")
    header = f"# evomerge report: {run_dir.name}\n\n{len(trials)} trials ({failed} failed)"
    if best is not None:
        header += f"; best: trial #{best['id']} with dev fitness {best['fitness']:.4f} (recipe: `{BEST_FILE}`)"
    text = f"{header}\n\nHeld-out test tasks (full splits):\n\n{table}\n![fitness](fitness.png)\n\n![knobs](knobs.png)\n"
    atomic_write_text(run_dir / "report.md", text)
    data = {"trials": len(trials), "failed": failed, "best_id": best["id"] if best else None, "rows": [r.__dict__ for r in rows]}
    atomic_write_text(run_dir / "report.json", json.dumps(data, indent=1))
    _print_table(rows, config, console)
    return data


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
        table.add_row(r.name, *[f"{r.test[t.name]:.3f}" for t in config.test_tasks], avg, f"{r.dev_avg:.3f}", style=style)
    console.print(table)
