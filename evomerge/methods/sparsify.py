"""Sparsifiers for task vectors: which entries of a delta survive, and the optional L1 rescale.

Each function takes one delta tensor and returns a tensor of the same shape and dtype in which the
dropped entries are zero. `density >= 1` is the identity; `density <= 0` drops everything.
"""

from __future__ import annotations

import enum

import torch

from evomerge.errors import RecipeError

_RESCALE_EPS = 1e-7


class Sparsifier(str, enum.Enum):
    magnitude = "magnitude"  # TIES: keep the largest |delta|
    random = "random"  # DARE: keep each entry with probability `density`
    magnitude_outliers = (
        "magnitude_outliers"  # breadcrumbs: drop the smallest and the largest |delta|
    )
    della_magprune = (
        "della_magprune"  # DELLA: keep probability grows with |delta|'s rank in its row
    )


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale `kept` so that its L1 norm equals `delta`'s (mergekit's rescale).

    Equal in expectation to the papers' per-entry 1/p. Skipped when either norm is below 1e-7.
    """
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def _apply(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, in float32 on the CPU (sorting half precision there is slow or missing)."""
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def _sampling_dtype(delta: torch.Tensor) -> torch.dtype:
    """torch.bernoulli has no float16 kernel on the CPU; mergekit samples in float32 there."""
    if delta.device.type == "cpu" and delta.dtype == torch.float16:
        return torch.float32
    return delta.dtype


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the `max(1, int(density * numel))` entries of largest magnitude (TIES).

    Any positive density keeps at least one entry (as mergekit 0.1.5 does); density 0 gives an
    all-zero delta (mergekit <= 0.1.4 asserted on k = 0).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    # argsort (not topk) so that ties among equal magnitudes resolve as in mergekit.
    mask[torch.argsort(_magnitudes(delta), descending=True)[:k]] = 1
    return _apply(delta, mask.reshape(delta.shape), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest |delta|, then enough of the smallest
    to leave `int(density * numel)` entries.

    When `gamma` leaves too few entries, fewer of the largest are dropped (the density wins). Unlike
    mergekit <= 0.1.4, n_top = 0 (gamma * numel < 1) keeps the top entries instead of zeroing all.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    ascending = torch.argsort(_magnitudes(delta))
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[ascending[n_bottom : n_bottom + n_keep]] = 1
    return _apply(delta, mask.reshape(delta.shape), rescale)


def bernoulli(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return delta
    work = delta.to(_sampling_dtype(delta))
    probs = torch.full_like(work, max(density, 0.0))
    mask = torch.bernoulli(probs, generator=generator)
    return _apply(work, mask, rescale).to(delta.dtype)


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities span [density - epsilon, density + epsilon]; both must be in (0, 1)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise RecipeError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: per row (dim 1; a 1-D tensor is one row), rank |delta| ascending and keep
    the entry of rank r (of n) with probability `density - epsilon + 2 * epsilon * r / (n - 1)`.

    A row of one entry is kept with probability `density` (mergekit divides 0 by 0 there).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    work = delta.to(_sampling_dtype(delta))
    rows = work.unsqueeze(0) if work.dim() < 2 else work  # (rows, n, ...)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(work.dtype)  # 0 .. n-1
    relative_rank = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + 2 * epsilon * relative_rank
    mask = torch.bernoulli(probs, generator=generator).reshape(work.shape)
    return _apply(work, mask, rescale).to(delta.dtype)


def sparsify(
    delta: torch.Tensor,
    method: Sparsifier,
    *,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if method is Sparsifier.magnitude:
        return magnitude(delta, density, rescale=rescale)
    if method is Sparsifier.random:
        return bernoulli(delta, density, rescale=rescale, generator=generator)
    if method is Sparsifier.magnitude_outliers:
        return magnitude_outliers(delta, density, gamma, rescale=rescale)
    if method is Sparsifier.della_magprune:
        return della_magprune(delta, density, epsilon, rescale=rescale, generator=generator)
    raise ValueError(f"unknown sparsifier {method!r}")
