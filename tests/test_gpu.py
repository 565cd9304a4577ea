"""The CUDA paths: merging on the GPU equals merging on the CPU, and a GPU worker scores like a CPU one.

Run on a machine with a CUDA GPU (`python -m pytest tests/test_gpu.py`); elsewhere every test skips.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.io.reader import ModelReader
from evomerge.merge import merge_to_state_dict
from evomerge.recipe import Recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DETERMINISTIC = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.4},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.05},
    "slerp": None,
    "model_stock": None,
}


def _recipe(method: str, family: dict, extra: dict | None) -> Recipe:
    if method == "slerp":
        return Recipe.from_dict(
            {
                "merge_method": "slerp",
                "base_model": str(family["base"]),
                "parameters": {"t": 0.3},
                "models": [{"model": str(family["base"])}, {"model": str(family["a"])}],
            }
        )
    if method == "model_stock":
        return Recipe.from_dict(
            {
                "merge_method": "model_stock",
                "base_model": str(family["base"]),
                "models": [{"model": str(family["a"])}, {"model": str(family["b"])}],
            }
        )
    data = {
        "merge_method": method,
        "models": [
            {"model": str(family["a"]), "parameters": {"weight": 0.7, **extra}},
            {"model": str(family["b"]), "parameters": {"weight": 0.4, **extra}},
        ],
    }
    if method != "linear":
        data["base_model"] = str(family["base"])
    return Recipe.from_dict(data)


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_cuda_merge_equals_cpu_merge(llama_family, method):
    recipe = _recipe(method, llama_family, DETERMINISTIC[method])
    sources = {str(p): ModelReader(p) for p in llama_family.values()}
    cpu = merge_to_state_dict(recipe, sources, device="cpu")
    gpu = merge_to_state_dict(recipe, sources, device="cuda")
    assert cpu.keys() == gpu.keys()
    for name, tensor in cpu.items():
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_dare_on_cuda_is_seeded(llama_family):
    recipe = _recipe("dare_ties", llama_family, {"density": 0.5})
    sources = {str(p): ModelReader(p) for p in llama_family.values()}
    first = merge_to_state_dict(recipe, sources, device="cuda", seed=3)
    again = merge_to_state_dict(recipe, sources, device="cuda", seed=3)
    other = merge_to_state_dict(recipe, sources, device="cuda", seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_gpu_worker_scores_like_cpu_worker(quick_zoo):
    from evomerge.workers import CandidateEvaluator, Job, WorkerSetup

    models = (str(quick_zoo.base), *(str(p) for p in quick_zoo.specialists.values()))
    recipe = {
        "merge_method": "ties",
        "base_model": str(quick_zoo.base),
        "models": [
            {"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}}
            for p in quick_zoo.specialists.values()
        ],
    }
    results = {}
    for device in ("cpu", "cuda"):
        setup = WorkerSetup(
            models=models,
            reference_model=str(quick_zoo.base),
            tasks=("zoo_addition_dev", "zoo_reversal_dev"),
            limit=40,
            device=device,
        )
        worker = CandidateEvaluator(setup)
        results[device] = worker.evaluate(Job(0, recipe))
        assert results[device].status == "ok", results[device].error
    assert results["cuda"].fitness == pytest.approx(results["cpu"].fitness, abs=1 / 40)
