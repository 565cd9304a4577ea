"""Specialized kernels: model_stock, nearswap, arcee_fusion, sce, passthrough.

All compute in the input dtype (as mergekit does) and return the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from evomerge.errors import RecipeError
from evomerge.methods.task_vectors import sign_consensus_mask


def model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the task vectors;
    out = t * mean(models) + (1 - t) * base. `filter_wise`: one t per row instead of per tensor.

    Where 1 + (N - 1) cos is ~0 there is no finite estimate and the base is kept (t = 0).
    """
    n = len(models)
    if n < 2:
        raise RecipeError(f"model_stock needs at least 2 models besides the base, got {n}")
    shape = base.shape
    if filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base  # (rows, ...)
        xs = [x.unsqueeze(0) if x.dim() == 1 else x for x in models]
    else:
        b = base.reshape(-1)
        xs = [x.reshape(-1) for x in models]

    offsets = [x - b for x in xs]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cosines.append(
                ((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1)
            )
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (1,) or (rows, 1)

    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator)).to(cos.dtype)
    average = sum(xs) / n
    return (t * average + (1 - t) * b).reshape(shape).to(base.dtype)


def nearswap(base: torch.Tensor, other: torch.Tensor, *, t: float) -> torch.Tensor:
    """Move each parameter towards `other` by w = clamp(t / |base - other|, 0, 1): fully where they
    already nearly agree (|diff| <= t), barely where they differ a lot."""
    distance = (base - other).abs().clamp(min=1e-6)
    w = (t / distance).clamp(0, 1)
    return (w * other + (1 - w) * base).to(base.dtype)


def _lower_quantiles(values: torch.Tensor, fractions: Sequence[float]) -> list[torch.Tensor]:
    """Exact lower quantiles: sorted(values)[floor(q * (n - 1))], by selection (no full sort).

    mergekit sorts (sampling 1e6 entries of bigger tensors); this is exact at every size.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    return [torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in fractions]


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion: take `other`'s value only where its change is important.

    importance = |other - base| * KL(softmax(other) || softmax(base)) (softmax and KL along the
    last dim, one KL per row, broadcast); fused where importance >= median + 1.5 * IQR.
    """
    if base.numel() == 0:
        return base.clone()
    delta = other - base
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1)
    importance = delta.abs() * kl
    q1, median, q3 = _lower_quantiles(importance, (0.25, 0.5, 0.75))
    fuse = importance >= median + 1.5 * (q3 - q1)
    return (base + delta * fuse.to(delta.dtype)).to(base.dtype)


def sce_select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE's Select step: 1 at the `int(count_nonzero(var) * select_topk)` positions whose variance
    across the task vectors (dim 0) is highest, 0 elsewhere."""
    variance = torch.var(task_vectors, dim=0, unbiased=False)  # (...)
    if select_topk >= 1:
        return torch.ones_like(variance)
    mask = torch.zeros_like(variance)
    # A float32 tensor product, as in mergekit, so that k rounds the same (e.g. 100 * 0.29 -> 29).
    k = int(torch.count_nonzero(variance) * select_topk) if select_topk > 0 else 0
    if k > 0:
        mask.view(-1)[torch.topk(variance.reshape(-1), k).indices] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """SCE's Calculate step: per model mean(tau^2), normalized to sum 1 (uniform when all ~0)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)  # (models,)
    total = energy.sum().item()
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1 / energy.shape[0])
    return energy / total


def sce(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, select_topk: float = 1.0
) -> torch.Tensor:
    """SCE (FuseChat): Select high-variance positions, Calculate per-model weights, Erase entries
    against the elected sign; out = base + sum(tau_i w_i m_i) / clamp(sum(w_i m_i), 1e-6)."""
    if not models:
        return base
    tau = torch.stack([x - base for x in models], dim=0)  # (models, ...)
    if select_topk < 1:
        tau = tau * sce_select_mask(tau, select_topk)
    agree = sign_consensus_mask(tau).to(tau.dtype)
    weights = sce_weights(tau).reshape(-1, *([1] * base.dim()))  # (models, 1, ...)
    kept_weights = weights * agree
    merged = (tau * kept_weights).sum(dim=0) / kept_weights.sum(dim=0).clamp(min=1e-6)
    return (base + merged).to(base.dtype)


def passthrough(tensor: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The tensor itself, optionally multiplied by `scale`."""
    return tensor if scale is None else tensor * scale
