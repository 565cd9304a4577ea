"""The task-vector family: one generalized kernel; task_arithmetic, TIES, DARE, DELLA and
breadcrumbs are data (which sparsifier, whether to elect signs, default normalize/rescale).

Per tensor: delta_i = x_i - base; sparsify delta_i; u_i = w_i * delta_i; with sign consensus keep
only the u_i whose sign agrees with sign(sum_i u_i); sum; optionally divide by the summed weights
of what was kept; out = base + lambda * merged. Math runs in the base's dtype (as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.methods.sparsify import Sparsifier, sparsify


@dataclass(frozen=True)
class TaskVectorVariant:
    name: str
    consensus: bool  # TIES sign election by weighted sum
    sparsifier: Sparsifier | None
    default_normalize: bool
    default_rescale: bool
    reference: str


VARIANTS: dict[str, TaskVectorVariant] = {
    v.name: v
    for v in (
        TaskVectorVariant(
            "task_arithmetic", False, None, False, False, "https://arxiv.org/abs/2212.04089"
        ),
        TaskVectorVariant(
            "ties", True, Sparsifier.magnitude, True, False, "https://arxiv.org/abs/2306.01708"
        ),
        TaskVectorVariant(
            "dare_linear", False, Sparsifier.random, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        TaskVectorVariant(
            "dare_ties", True, Sparsifier.random, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        TaskVectorVariant(
            "breadcrumbs",
            False,
            Sparsifier.magnitude_outliers,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
        ),
        TaskVectorVariant(
            "breadcrumbs_ties",
            True,
            Sparsifier.magnitude_outliers,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
        ),
        TaskVectorVariant(
            "della", True, Sparsifier.della_magprune, True, True, "https://arxiv.org/abs/2406.11617"
        ),
        TaskVectorVariant(
            "della_linear",
            False,
            Sparsifier.della_magprune,
            False,
            True,
            "https://arxiv.org/abs/2406.11617",
        ),
    )
}


def sign_consensus_mask(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election over dim 0 of (models, ...): the elected sign is +1 where the weighted
    sum is >= 0, else -1; an entry agrees when its sign equals it (zeros never agree)."""
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)  # (...)
    return weighted.sign() == elected  # (models, ...) bool


def merge_task_vectors(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    variant: TaskVectorVariant,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    rescale: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge `models` into `base` by the task-vector `variant`.

    `weight`, `density`, `gamma`, `epsilon` are per model (aligned with `models`); density defaults
    to 1 (no sparsification). `normalize`/`rescale` default to the variant's. Stochastic
    sparsifiers draw from `generator`, model by model in order.
    """
    if not models:
        return base
    n = len(models)
    normalize = variant.default_normalize if normalize is None else normalize
    rescale = variant.default_rescale if rescale is None else rescale
    densities = [1.0] * n if density is None else list(density)
    gammas = [0.0] * n if gamma is None else list(gamma)
    epsilons = [0.0] * n if epsilon is None else list(epsilon)

    deltas = torch.empty((n, *base.shape), dtype=base.dtype, device=base.device)  # (models, ...)
    for i, x in enumerate(models):
        delta = x - base
        if variant.sparsifier is not None:
            delta = sparsify(
                delta,
                variant.sparsifier,
                density=densities[i],
                rescale=rescale,
                gamma=gammas[i],
                epsilon=epsilons[i],
                generator=generator,
            )
        deltas[i] = delta

    # Weights in the tensors' dtype, as mergekit does (so bf16 merges round them the same way).
    weights = torch.tensor(list(weight), dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(n, *([1] * base.dim()))  # (models, 1, ...)
    weighted = deltas * weights  # u_i

    if variant.consensus:
        agree = sign_consensus_mask(weighted).to(deltas.dtype)
        merged = (weighted * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if normalize:
        merged = merged / divisor
    if lambda_ != 1:
        merged = merged * lambda_
    return (base + merged).to(base.dtype)
