"""Export a scored recipe: as evomerge runs it, and in a form mergekit runs unchanged.

`export_front` writes every Pareto-front member of a run, one `trial-NNNN.yaml` each.

mergekit has one `merge_method` per file. A recipe whose slices use different methods becomes a
`mergekit-multi` file: one named merge per method (holding just that method's slices, in order),
then a passthrough that stacks the layer ranges back in the original order. Kernels work tensor by
tensor, so the weights are the same: the first part starts with the recipe's first slice (its
embeddings) and the part holding the last slice ends with it (final norm and head).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evomerge import pareto
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from evomerge.run_dir import CONFIG_FILE, TrialRecord, read_trials
from evomerge.search_config import parse_search_config


def trial_recipe(
    run_dir: Path, trial: int | None = None, *, select: str | None = None
) -> tuple[Recipe, TrialRecord]:
    """The recipe of trial `trial` (default: the best by `select`, else the run's
    `optimizer.select` rule), exactly as it was scored."""
    trials = read_trials(run_dir)
    if not trials:
        raise EvomergeError(f"{run_dir}: no finished trials")
    if trial is None:
        record = pareto.select(pareto.trial_front(trials), select or run_select_rule(run_dir))
        if record is None:
            raise EvomergeError(f"{run_dir}: every trial failed; nothing to export")
    else:
        matches = [t for t in trials if t.id == trial]
        if not matches:
            raise EvomergeError(
                f"{run_dir}: no trial {trial} (trials: {trials[0].id}..{trials[-1].id})"
            )
        record = matches[0]
    if record.recipe is None:
        raise EvomergeError(f"{run_dir}: trial {record.id} has no recipe")
    return record.to_recipe(), record


def run_select_rule(run_dir: Path) -> str:
    """The run's `optimizer.select` (the default rule for a run directory without a config)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return pareto.DEFAULT_RULE
    return parse_search_config(yaml.safe_load(path.read_text()), origin=str(path)).optimizer.select


def trial_file_name(trial_id: int) -> str:
    return f"trial-{trial_id:04d}.yaml"


def export_header(record: TrialRecord) -> str:
    line = f"# evomerge trial #{record.id}, dev fitness {record.fitness}"
    if len(record.objectives) > 1:
        line += ", dev objectives " + " / ".join(f"{v:.4f}" for v in record.objectives)
    return line + "\n"


def export_front(run_dir: Path, out_dir: Path, *, mergekit: bool = False) -> list[Path]:
    """Write every Pareto-front member's recipe to `out_dir/trial-NNNN.yaml`; returns the files.

    Written into a temporary directory beside `out_dir` and renamed into place; an earlier front
    export there (nothing but trial-*.yaml files) is replaced, anything else is refused.
    """
    front = pareto.trial_front(read_trials(run_dir))
    if not front:
        raise EvomergeError(f"{run_dir}: no successful trial; no Pareto front to export")
    out_dir = Path(out_dir)
    if out_dir.exists():
        strays = (
            [p.name for p in out_dir.iterdir() if not _FRONT_FILE.fullmatch(p.name)]
            if out_dir.is_dir()
            else [out_dir.name]
        )
        if strays:
            raise EvomergeError(
                f"--out {out_dir}: exists and holds {strays[0]}, which is not a front export; choose another directory"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for record in front:
            recipe = record.to_recipe()
            text = dump_documents(to_mergekit_documents(recipe)) if mergekit else recipe.to_yaml()
            (tmp / trial_file_name(record.id)).write_text(export_header(record) + text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / trial_file_name(t.id) for t in front]


_FRONT_FILE = re.compile(r"trial-\d{4,}\.yaml")


def needs_multi(recipe: Recipe) -> bool:
    return len(recipe.methods()) > 1


def to_mergekit_documents(recipe: Recipe, *, prefix: str = "evomerge-part") -> list[dict[str, Any]]:
    """One document if mergekit can run the recipe as is; else mergekit-multi documents.

    A model given as a recipe file (PS+DFS: model A is a PS merge) becomes a named merge of its own first.
    """
    inner = _recipe_models_as_documents(recipe)
    if inner:
        renamed = recipe.to_dict()
        _rename_models(renamed, {ref: docs[-1]["name"] for ref, docs in inner.items()})
        return [
            *(d for docs in inner.values() for d in docs),
            *to_mergekit_documents(Recipe.from_dict(renamed), prefix=prefix),
        ]
    if not needs_multi(recipe):
        data = recipe.to_dict()
        for s in data.get("slices", []):
            s.pop("merge_method", None)
        data["merge_method"] = recipe.methods()[0]
        return [data]
    assert recipe.slices is not None
    top = recipe.to_dict()
    common = {
        k: v for k, v in top.items() if k not in ("slices", "merge_method", "name", "out_dtype")
    }
    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, s in enumerate(top["slices"]):
        method = s.pop("merge_method", None) or recipe.merge_method
        by_method.setdefault(method, []).append((i, s))

    documents = []
    placement: dict[
        int, tuple[str, int, int]
    ] = {}  # slice index -> (part, start, end) in that part
    for method, entries in by_method.items():
        name = f"{prefix}-{method}"
        offset = 0
        for i, s in entries:
            n = _slice_layers(s)
            placement[i] = (name, offset, offset + n)
            offset += n
        documents.append(
            {"name": name, **common, "merge_method": method, "slices": [s for _, s in entries]}
        )

    assembly: dict[str, Any] = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": part, "layer_range": [start, end]}]}
            for part, start, end in (placement[i] for i in range(len(top["slices"])))
        ],
    }
    for key in ("out_dtype", "chat_template"):
        if key in top:
            assembly[key] = top[key]
    if "dtype" in top:
        assembly["dtype"] = top.get("out_dtype", top["dtype"])
    return [*documents, assembly]


def _recipe_models_as_documents(recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for i, ref in enumerate(
        m for m in recipe.referenced_models() if Path(m).suffix in (".yaml", ".yml")
    ):
        name = f"evomerge-model-{i}"
        docs = to_mergekit_documents(Recipe.load(ref), prefix=f"{name}-part")
        docs[-1]["name"] = name
        out[ref] = docs
    return out


def _rename_models(data: Any, names: dict[str, str]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            if k in ("model", "base_model") and isinstance(v, str) and v in names:
                data[k] = names[v]
            else:
                _rename_models(v, names)
    elif isinstance(data, list):
        for v in data:
            _rename_models(v, names)


def _slice_layers(s: dict[str, Any]) -> int:
    start, end = s["sources"][0]["layer_range"]
    return end - start


def dump_documents(documents: list[dict[str, Any]]) -> str:
    from evomerge.recipe import _RecipeDumper

    return yaml.dump_all(documents, Dumper=_RecipeDumper, sort_keys=False)
