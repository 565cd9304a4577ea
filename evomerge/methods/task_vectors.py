"""The task-vector family: one generalized kernel; task_arithmetic, TIES, DARE, DELLA and
breadcrumbs are data (which sparsifier, whether to elect signs, default normalize/rescale).

Per tensor: delta_i = x_i - base; sparsify delta_i; u_i = w_i * delta_i; with sign consensus keep
only the u_i whose sign agrees with sign(sum_i u_i); sum; optionally divide by the summed weights
of what was kept; out = base + lambda * merged. Math runs in the base's dtype (as in mergekit).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from evomerge.methods.sparsify import Sparsifier, default_piece_elems, piece_spans, prepare


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
    piece_elems: int | None = None,
) -> torch.Tensor:
    """Merge `models` into `base` by the task-vector `variant`.

    `weight`, `density`, `gamma`, `epsilon` are per model (aligned with `models`); density defaults
    to 1 (no sparsification). `normalize`/`rescale` default to the variant's. Stochastic
    sparsifiers draw from `generator`, model by model in order.

    The tensors are processed in pieces of about `piece_elems` entries (default: cache-sized on
    the CPU, whole on GPUs), so memory holds no (models, ...) stack; the result does not depend
    on the piece size. As in mergekit, task vectors, sparsification and the weighted task vectors
    u_i are computed and rounded in the base's dtype; the sign election and sums run in float32
    (float64 for float64 tensors); the division, lambda and the base are applied in the dtype.
    """
    if not models:
        return base
    n = len(models)
    normalize = variant.default_normalize if normalize is None else normalize
    rescale = variant.default_rescale if rescale is None else rescale
    densities = [1.0] * n if density is None else list(density)
    gammas = [0.0] * n if gamma is None else list(gamma)
    epsilons = [0.0] * n if epsilon is None else list(epsilon)
    dtype = base.dtype
    # Weights in the tensors' dtype, as mergekit does (so bf16 merges round them the same way).
    weights = torch.tensor(list(weight), dtype=dtype).tolist()

    flat_base = base.contiguous().reshape(-1)
    flat_models = [x.contiguous().reshape(-1) for x in models]
    spans = piece_spans(base.shape, piece_elems or default_piece_elems(base.device))

    def deltas(i: int) -> Iterator[torch.Tensor]:
        return (flat_models[i][s:e] - flat_base[s:e] for s, e in spans)

    sparsifiers = [
        prepare(
            variant.sparsifier,
            functools.partial(deltas, i),
            base.shape,
            dtype=torch.promote_types(models[i].dtype, dtype),
            device=base.device,
            density=densities[i],
            rescale=rescale,
            gamma=gammas[i],
            epsilon=epsilons[i],
            generator=generator,
        )
        if variant.sparsifier is not None
        else None
        for i in range(n)
    ]
    combine = _ElectedSum(weights, normalize) if variant.consensus else _Sum(weights, normalize)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty_like(flat_base)
    for s, e in spans:
        b = flat_base[s:e]
        weighted = []  # u_i = w_i * sparsified delta_i, rounded to the dtype as in mergekit
        for x, sparsify_piece, w in zip(flat_models, sparsifiers, weights, strict=True):
            delta = x[s:e] - b
            if sparsify_piece is not None:
                delta = sparsify_piece(delta)
            weighted.append((delta.to(dtype) * w).to(work))
        merged, divisor = combine(weighted)
        if dtype != work:  # round each step as mergekit does in half precision
            merged = merged.to(dtype)
            divisor = divisor.to(dtype) if isinstance(divisor, torch.Tensor) else divisor
        if normalize:
            merged /= divisor
        if lambda_ != 1:
            merged *= lambda_
        out[s:e] = merged.add_(b)
    return out.reshape(base.shape)


class _Sum:
    """sum_i u_i, and the divisor for normalizing: sum_i w_i (a sum below 1e-8 counts as 1)."""

    def __init__(self, weights: Sequence[float], normalize: bool):
        total = sum(weights)
        self.divisor = total if normalize and abs(total) >= 1e-8 else 1.0

    def __call__(self, weighted: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        merged = weighted[0]
        for u in weighted[1:]:
            merged += u
        return merged, self.divisor


class _ElectedSum:
    """TIES: the sum of the u_i whose sign is the elected one, sign(sum_i u_i) (+ for 0), divided
    and the divisor for normalizing: the sum of their weights (no agreeing entry: 1).

    Written with sign arithmetic instead of boolean masks, which are slow on the CPU:
    with e = +-1 the elected sign, relu(e * u_i) is |u_i| where u_i agrees and 0 elsewhere
    (zeros never agree), and sign() of it is the agreement indicator.
    """

    def __init__(self, weights: Sequence[float], normalize: bool):
        self.weights, self.normalize = list(weights), normalize
        # With positive weights a divisor is 0 exactly where nothing agrees (and the sum is 0):
        # clamping to the smallest weight then changes nothing else.
        self.min_divisor = min(self.weights) if all(w > 0 for w in self.weights) else None

    def __call__(self, weighted: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
        total = weighted[0].clone()
        for u in weighted[1:]:
            total += u
        elected = torch.copysign(torch.ones_like(total), total)  # total = +0.0 elects +
        magnitude = torch.zeros_like(total)
        divisor = torch.zeros_like(total) if self.normalize else None
        for u, w in zip(weighted, self.weights, strict=True):
            agreeing = u.mul_(elected).relu_()
            magnitude += agreeing
            if divisor is not None:
                divisor.add_(agreeing.sign_(), alpha=w)
        merged = magnitude.mul_(elected)
        if divisor is None:
            return merged, 1.0
        if self.min_divisor is not None:
            divisor.clamp_min_(self.min_divisor)
        else:
            divisor = torch.where(divisor == 0, 1.0, divisor)
        return merged, divisor
