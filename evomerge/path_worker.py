"""The DFS worker: scores passthrough recipes as live layer paths over the source models.

`PathEvaluator` has `CandidateEvaluator`'s interface (`evaluate`, `score_model_dir`, `ping`) and
holds one: its input models (on the device, loaded once) back both the live source models of the
paths (their parameters are those very tensors) and any recipe that is not a path (the report's
default merges), which goes to the ordinary merge-and-load evaluation. A model given as a recipe
(PS+DFS: model A is a parameter-space merge) is merged once, here, and lives in memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from evomerge.workers import (
    CandidateEvaluator,
    Job,
    TrialResult,
    WorkerSetup,
    run_trial,
    timed_score,
)


class PathEvaluator:
    def __init__(self, setup: WorkerSetup):
        from evomerge.merge import merge_to_state_dict, output_config, plan_merge
        from evomerge.path_model import PathModel, live_model
        from evomerge.recipe import Recipe

        if setup.backend != "hf":
            from evomerge.errors import ConfigError

            raise ConfigError(
                "backend: DFS scoring needs backend: hf (vLLM cannot rewire its layers per candidate)"
            )
        self.setup = setup
        self.merger = CandidateEvaluator(replace(setup, evaluator="merge", recipe_models=()))
        self.name = self.merger.name
        models = {
            ref: live_model(src.config, src.tensors) for ref, src in self.merger.sources.items()
        }
        for ref, data in setup.recipe_models:
            recipe = Recipe.from_dict(data, origin=ref)
            plan = plan_merge(recipe, self.merger.sources)
            tensors = merge_to_state_dict(
                recipe, self.merger.sources, device=self.merger.device, seed=setup.seed
            )
            models[ref] = live_model(
                output_config(plan, self.merger.sources[plan.reference_model].config), tensors
            )
        self.path = PathModel(models, setup.path_reference or setup.reference_model)
        # what the report reads of an evaluator: its scorer, and the model it scored last
        self.scorer = self.merger.scorer
        self.tokenizer = self.merger.tokenizer
        self.device = self.merger.device
        self.model: Any = self.merger.model

    def evaluate(self, job: Job) -> TrialResult:
        from evomerge.path_model import is_path_recipe
        from evomerge.recipe import Recipe

        try:
            recipe = Recipe.from_dict(job.recipe)
        except Exception:
            recipe = None  # the merger reports the recipe's error as the trial's
        if recipe is None or not is_path_recipe(recipe):
            self.model = self.merger.model
            return self.merger.evaluate(job)
        self.model = self.path.shell
        return run_trial(
            job,
            self.name,
            lambda: self.path.build(recipe),
            lambda: self.scorer.score(self.path.shell, self.tokenizer),
        )

    def score_model_dir(self, path: str) -> TrialResult:
        """Score a model: a loaded source as usual; a model given as a recipe, as the path through all its
        layers; any other directory (e.g. an exported path, whose layer count differs) loaded for this call."""
        if path in self.merger.sources:
            self.model = self.merger.model
            return self.merger.score_model_dir(path)
        if path in self.path.models:
            n = int(self.path.models[path].config.num_hidden_layers)
            recipe = {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": path, "layer_range": [0, n]}]}],
            }
            return self.evaluate(Job(-1, recipe))
        return timed_score(self.name, lambda: self.scorer.score(path))

    def ping(self) -> str:
        return self.name


def recipe_models(refs: list[str]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(reference, recipe mapping) for the models given as recipe files."""
    from evomerge.recipe import Recipe

    return tuple((ref, Recipe.load(Path(ref)).to_dict()) for ref in refs)
