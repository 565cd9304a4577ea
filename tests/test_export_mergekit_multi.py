"""`evomerge export --mergekit` of a per-layer method choice, built by mergekit-multi (README)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import load_state
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.merge import merge_to_disk
from evomerge.recipe import Recipe

pytestmark = [pytest.mark.mergekit, pytest.mark.slow]

METHODS = ["ties", "dare_ties", "task_arithmetic", "dare_ties"]  # one per layer


def test_mergekit_multi_needs_an_absolute_intermediate_dir_and_differs_only_in_dare_layers(
    quick_zoo, tmp_path, monkeypatch
):
    multimerge = pytest.importorskip("mergekit.scripts.multimerge")
    from click.testing import CliRunner as ClickRunner  # mergekit's commands are plain click

    layers = json.loads((quick_zoo.base / "config.json").read_text())["num_hidden_layers"]
    assert layers == len(METHODS)
    skills = list(quick_zoo.skills)
    recipe = {
        "merge_method": "ties",
        "base_model": str(quick_zoo.base),
        "slices": [
            {
                "merge_method": method,
                "sources": [{"model": str(quick_zoo.base), "layer_range": [i, i + 1]}]
                + [
                    {
                        "model": str(quick_zoo.specialists[s]),
                        "layer_range": [i, i + 1],
                        "parameters": {"weight": 0.3 + 0.1 * j, "density": 0.5 + 0.1 * j},
                    }
                    for j, s in enumerate(skills)
                ],
            }
            for i, method in enumerate(METHODS)
        ],
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"id": 0, "status": "ok", "fitness": 0.5, "recipe": recipe}
    (run_dir / "trials.jsonl").write_text(json.dumps(record) + "\n")
    exported = CliRunner().invoke(
        app, ["export", str(run_dir), "--mergekit", "--out", str(tmp_path / "mk.yaml")]
    )
    assert exported.exit_code == 0, exported.output

    monkeypatch.chdir(tmp_path)
    mk = ["mk.yaml", "--out-path", str(tmp_path / "theirs")]
    relative = ClickRunner().invoke(multimerge.main, [*mk, "--intermediate-dir", "mk-parts"])
    assert relative.exit_code != 0  # looked up on the hub as the model "mk-parts/evomerge-part-…"
    assert "api/models/mk-parts/evomerge-part-" in str(relative.exception)
    built = ClickRunner().invoke(
        multimerge.main, [*mk, "--intermediate-dir", str(tmp_path / "mk-parts")]
    )
    assert built.exit_code == 0, built.output

    merge_to_disk(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    ours, theirs = load_state(tmp_path / "ours"), load_state(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    stochastic = {f"layers.{i}." for i, m in enumerate(METHODS) if m == "dare_ties"}
    # The final norm and the head come from the part that holds the last slice (a dare_ties one).
    from_last_part = {"model.norm.weight", "lm_head.weight"}
    for name in ours:
        if name in from_last_part or any(s in name for s in stochastic):
            assert not torch.allclose(ours[name], theirs[name]), name  # different random masks
        else:
            assert torch.equal(ours[name], theirs[name]), name  # float32: bit for bit
