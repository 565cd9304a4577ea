"""lm-eval's task index, read without building a task: names, groups, tags, and what each reports.

Both the up-front check (`evomerge.preflight`) and the `Scorer` start here, so a task name means
the same thing in both: a task, a group (scored as its tasks plus the group's aggregate, as
lm-eval reports it), or a tag (shorthand for its tasks). Reading the index parses YAML only; no
dataset is loaded, so checking a whole config against it takes seconds.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import ScoringError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

NO_FILTER = "none"
MAIN_METRIC = ""  # TaskSpec.metric for "the task's main metric"
_SPEC_KEYS = frozenset({"name", "metric", "weight", "higher_is_better"})
MetricKeys = dict[str, tuple[str, str]]  # our metric key -> (lm-eval metric, filter name)


def default_tasks_dir() -> Path:
    """The repository's `tasks/` folder (the demo zoo's task YAMLs and data)."""
    import evomerge

    return Path(evomerge.__file__).resolve().parents[1] / "tasks"


def metric_key(metric: str, filter_name: str) -> str:
    """How a metric is named here: `acc` for the unfiltered responses, `exact_match/strict-match` else.

    lm-eval writes `exact_match,strict-match`; a slash keeps the name usable in comma-separated
    CLI lists.
    """
    return metric if filter_name == NO_FILTER else f"{metric}/{filter_name}"


class UnknownTaskError(ScoringError):
    """A name that is no task, group or tag of the index."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class TaskSpec:
    """One term of the fitness: a task (or group, or tag), which of its metrics, and how much it counts.

    One rule everywhere (search configs, `evomerge eval`): a bare name means the task's main
    metric -- `acc` when it reports one, else the first metric it lists.
    """

    name: str
    metric: str = MAIN_METRIC
    weight: float = 1.0
    higher_is_better: bool | None = None  # None: the task's metric config decides

    def __post_init__(self) -> None:
        if not self.name:
            raise ScoringError("task spec has an empty task name")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ScoringError(
                f"task {self.name}: weight must be a positive number, got {self.weight}"
            )

    @classmethod
    def parse(cls, item: str | Mapping[str, Any] | TaskSpec) -> TaskSpec:
        """`"task"`, `"task:metric"` or `{"name": ..., "metric": ..., "weight": ..., "higher_is_better": ...}`."""
        if isinstance(item, TaskSpec):
            return item
        if isinstance(item, str):
            name, _, metric = item.strip().partition(":")
            return cls(name.strip(), metric.strip() or MAIN_METRIC)
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - _SPEC_KEYS)
            if unknown:
                raise ScoringError(
                    f"task spec {dict(item)}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SPEC_KEYS))})"
                )
            if "name" not in item:
                raise ScoringError(f"task spec {dict(item)}: missing 'name'")
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ScoringError(
                    f"task {item['name']}: weight {item['weight']!r} is not a number"
                ) from None
            higher = item.get("higher_is_better")
            if higher is not None and not isinstance(higher, bool):
                raise ScoringError(f"task {item['name']}: higher_is_better must be true or false")
            return cls(str(item["name"]), str(item.get("metric") or MAIN_METRIC), weight, higher)
        raise ScoringError(f"task spec must be a name or a mapping, got {type(item).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The mapping `parse` reads back (defaults left out)."""
        out: dict[str, Any] = {"name": self.name}
        if self.metric != MAIN_METRIC:
            out["metric"] = self.metric
        if self.weight != 1.0:
            out["weight"] = self.weight
        if self.higher_is_better is not None:
            out["higher_is_better"] = self.higher_is_better
        return out


def resolve_metric(spec: TaskSpec, keys: MetricKeys) -> str:
    """The metric key a spec means: exact, with `,` for `/`, or a bare name when one filter has it."""
    if spec.metric == MAIN_METRIC:  # acc when the task has it, else the first metric it lists
        if not keys:
            raise ScoringError(f"task {spec.name} reports no metric")
        return "acc" if "acc" in keys else next(iter(keys))
    wanted = spec.metric.replace(",", "/")
    if wanted.endswith(f"/{NO_FILTER}"):
        wanted = wanted[: -len(NO_FILTER) - 1]
    if wanted in keys:
        return wanted
    matches = [key for key, (metric, _) in keys.items() if metric == wanted]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(sorted(keys)) or "none"
    if matches:
        raise ScoringError(
            f"task {spec.name}: metric {spec.metric} is ambiguous; name a filter ({known})"
        )
    raise ScoringError(
        f"task {spec.name} does not report metric {spec.metric} (it reports: {known})"
    )


@dataclass(frozen=True)
class TaskIndex:
    """One lm-eval `TaskManager` (built once) and the folders it searched."""

    manager: TaskManager
    searched: tuple[str, ...]

    def check_known(self, name: str) -> None:
        """An error naming the closest known names when `name` is no task, group or tag."""
        if name in self.manager.task_index:
            return
        close = difflib.get_close_matches(name, self.manager.all_tasks, n=5, cutoff=0.6)
        hint = (
            f"; close names: {', '.join(close)}"
            if close
            else f"; searched {', '.join(self.searched) or 'no local task folder'}"
        )
        raise UnknownTaskError(name, f"unknown task {name!r}{hint}")

    def kind(self, name: str) -> Literal["task", "group", "tag"]:
        from lm_eval.tasks._index import Kind

        entry = self.manager.task_index.get(name)
        if entry is None:
            return "task"  # a group's inline task
        return {Kind.GROUP: "group", Kind.TAG: "tag"}.get(entry.kind, "task")  # type: ignore[return-value]

    def config(self, name: str) -> dict[str, Any]:
        return dict(self.manager.task_index[name].cfg or {})

    def leaf_tasks(self, name: str) -> list[str]:
        """The tasks a name stands for, in lm-eval's order: itself, a tag's tasks, or a group's (recursively)."""
        kind = self.kind(name)
        if kind == "task":
            return [name]
        if kind == "tag":
            return sorted(self.manager.task_index[name].tags)
        leaves: list[str] = []
        members = self.config(name).get("task") or []
        for member in members if isinstance(members, list) else [members]:
            ref = member if isinstance(member, str) else member.get("task") or member.get("group")
            if isinstance(ref, str) and ref in self.manager.task_index:
                leaves.extend(self.leaf_tasks(ref))
            elif isinstance(ref, str):
                leaves.append(f"{name}::{ref}")  # an inline definition, named as lm-eval names it
        return list(dict.fromkeys(leaves))

    def aggregates(self, group: str) -> bool:
        """Whether lm-eval reports an aggregate for `group` (its YAML has an aggregate_metric_list)."""
        return self.kind(group) == "group" and bool(self.config(group).get("aggregate_metric_list"))

    def task_metrics(self, task: str) -> MetricKeys | None:
        """The metrics a task reports, read from its YAML; None when only building it would tell."""
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

        if task not in self.manager.task_index:
            return None
        cfg = self.config(task)
        if "class" in cfg:
            return None  # a Python task: its metrics live in code
        listed = cfg.get("metric_list")
        if listed:
            names = [m.get("metric") for m in listed if isinstance(m, Mapping)]
            if not all(isinstance(n, str) for n in names):
                return None  # a metric given as a function
        else:
            names = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))
        filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, Mapping)] or [
            NO_FILTER
        ]
        return {metric_key(m, f): (m, f) for m in names for f in filters}

    def group_metrics(self, group: str) -> MetricKeys | None:
        """The aggregate metrics lm-eval reports for a group (filters found in its tasks when not listed)."""
        keys: MetricKeys = {}
        leaves = [self.task_metrics(t) for t in self.leaf_tasks(group)]
        for agg in self.config(group).get("aggregate_metric_list") or []:
            metric = agg.get("metric")
            filters = agg.get("filter_list")
            if isinstance(filters, str):
                filters = [filters]
            if filters is None:
                if any(leaf is None for leaf in leaves):
                    return None
                filters = sorted(
                    {f for leaf in leaves for m, f in (leaf or {}).values() if m == metric}
                )
            keys.update({metric_key(metric, f): (metric, f) for f in filters})
        return keys


def build_task_index(
    names: Sequence[str],
    include_paths: Sequence[str | Path] = (),
    include_defaults: bool | None = None,
) -> TaskIndex:
    """Index the repo's tasks/ and the user's folders; lm-eval's own tasks only when a name needs them.

    Every name must be a task, group or tag of the index: an unknown one is an error naming
    the closest known names.
    """
    from lm_eval.tasks import TaskManager

    paths = [default_tasks_dir(), *(Path(p).expanduser() for p in include_paths)]
    for path in paths[1:]:
        if not path.is_dir():
            raise ScoringError(f"task include path is not a directory: {path}")
    local_paths = [str(p) for p in paths if p.is_dir()]
    manager = TaskManager(include_path=local_paths, include_defaults=bool(include_defaults))
    missing = [name for name in names if name not in manager.all_tasks]
    if include_defaults is None and missing:
        # Indexing lm-eval's ~14,000 YAMLs takes half a minute; a name that no YAML even
        # mentions is unknown without it.
        text, mentioned = _lm_eval_yaml_names()
        for name in missing:
            if name not in text:
                close = difflib.get_close_matches(
                    name, [*manager.all_tasks, *mentioned], n=5, cutoff=0.6
                )
                hint = (
                    f"; close names: {', '.join(close)}"
                    if close
                    else f"; searched {', '.join(local_paths)} and lm-eval's tasks"
                )
                raise UnknownTaskError(name, f"unknown task {name!r}{hint}")
        manager = TaskManager(include_path=local_paths, include_defaults=True)
    index = TaskIndex(manager, tuple(local_paths))
    for name in names:
        index.check_known(name)
    return index


def resolve_specs(specs: Sequence[TaskSpec], index: TaskIndex) -> list[TaskSpec]:
    """Specs as they are scored: each names a task or an aggregating group, with a concrete metric key.

    A tag, and a group lm-eval reports no aggregate for, stand for their tasks listed one by one
    (same metric and weight each). A metric the index cannot know without building the task
    (a Python task) is left for the `Scorer` to resolve. A task reached through two different
    names (alone and in a group, or in two groups) is an error, as in lm-eval.
    """
    resolved: list[TaskSpec] = []
    origin: dict[str, str] = {}  # leaf task -> the name that brought it in
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        for leaf in index.leaf_tasks(spec.name):
            if origin.setdefault(leaf, spec.name) != spec.name:
                raise ScoringError(
                    f"task {leaf} is listed twice (through {origin[leaf]} and {spec.name})"
                )
        kind = index.kind(spec.name)
        if kind == "task" or index.aggregates(spec.name):
            parts = [spec]
        else:
            parts = [
                TaskSpec(t, spec.metric, spec.weight, spec.higher_is_better)
                for t in index.leaf_tasks(spec.name)
            ]
        for part in parts:
            keys = (
                index.group_metrics(part.name)
                if index.kind(part.name) == "group"
                else index.task_metrics(part.name)
            )
            if keys is not None:
                part = TaskSpec(
                    part.name, resolve_metric(part, keys), part.weight, part.higher_is_better
                )
            if (part.name, part.metric) in seen:
                raise ScoringError(
                    f"task {part.name}: metric {part.metric or 'main'} is listed twice"
                )
            seen.add((part.name, part.metric))
            resolved.append(part)
    return resolved


@functools.cache
def _lm_eval_yaml_names() -> tuple[str, list[str]]:
    """All of lm-eval's task YAMLs as one text, and the task/group/tag names they declare on one line."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    texts = [p.read_text(errors="ignore") for p in sorted(root.rglob("*.yaml"))]
    declared = re.compile(r"^\s*(?:task|group|tag)\s*:\s*[\"']?([A-Za-z0-9_.:-]+)", re.MULTILINE)
    names = sorted({name for text in texts for name in declared.findall(text)})
    return "\n".join(texts), names
