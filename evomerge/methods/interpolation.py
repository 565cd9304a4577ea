"""Interpolation kernels: linear, slerp, nuslerp, multislerp, karcher.

Dtypes follow mergekit: linear, slerp and karcher compute in float32 (float64 stays float64) and
return the input dtype; nuslerp and multislerp compute in the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.errors import RecipeError


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear(
    models: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (a zero sum is an error)."""
    first = models[0]
    dtype = _work_dtype(first)
    weights = torch.tensor(list(weight), dtype=dtype, device=first.device)
    total = weights.sum()
    if normalize and abs(total.item()) < 1e-8:
        raise RecipeError(f"linear: weights {list(weight)} sum to 0, so they cannot be normalized")
    out = torch.zeros_like(first, dtype=dtype)
    for x, w in zip(models, weights, strict=True):
        out.addcmul_(x.to(dtype), w)  # fused, as mergekit, so results match bit for bit
    if normalize:
        out.div_(total)
    return out.to(first.dtype)


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors: t=0 gives v0, t=1 gives v1.

    The angle comes from the unit vectors; the interpolation is of the unnormalized tensors.
    Nearly (anti)parallel tensors (|cos| > dot_threshold) are interpolated linearly.
    """
    dtype = _work_dtype(v0)
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return v0.clone()
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b
    return out.reshape(v0.shape).to(v0.dtype)


def nuslerp_t(weight: Sequence[float]) -> float:
    """nuslerp's interpolation factor from the two model weights: w2 / (w1 + w2)."""
    w1, w2 = weight
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def slerp_vectors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dim: int = -1,
    flatten: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Slerp of the vectors along `dim` (or of the whole flattened tensors), in the input dtype.

    Exactly (anti)parallel vectors (1 - cos^2 <= eps^2, i.e. |sin| <= eps) are lerped.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(parallel, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """Slerp between two models at t = w2 / (w1 + w2); with a base, slerp their task vectors.

    Unflattened, each vector along the last dim is slerped separately (`nuslerp_row_wise`: along
    dim 0 instead).
    """
    x0, x1 = models
    t = nuslerp_t(weight)
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return slerp_vectors(t, x0, x1, dim=dim, flatten=nuslerp_flatten)
    return base + slerp_vectors(t, x0 - base, x1 - base, dim=dim, flatten=nuslerp_flatten)


def multislerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (of task vectors when there is a base).

    Unit vectors -> their weighted mean direction -> log-map into its tangent space -> weighted sum
    -> exp-map back -> scale by the weighted mean norm.
    """
    if len(models) == 1:
        return models[0]
    points = torch.stack(list(models), dim=0)  # (models, ...)
    if base is not None:
        points = points - base
    flat = points.reshape(points.shape[0], -1)  # (models, numel)
    weights = torch.tensor(list(weight), dtype=points.dtype, device=points.device)
    if normalize_weights:
        if abs(weights.sum().item()) < 1e-8:
            raise RecipeError(
                f"multislerp: weights {list(weight)} sum to 0, so they cannot be normalized"
            )
        weights = weights / weights.sum()

    norms = torch.norm(flat, dim=-1, keepdim=True)  # (models, 1)
    units = flat / (norms + eps)
    mean = (units * weights[:, None]).sum(dim=0)  # (numel,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise RecipeError(
                "multislerp: the weighted mean direction is zero (antipodal inputs whose weights "
                "cancel); change the weights"
            )
        out = points[0] * weights[0] + points[1] * weights[1]
        return out if base is None else out + base
    mean = mean / mean_norm

    # Log map at `mean`, weighted sum in the tangent space, exp map back. (At the weighted mean
    # direction that sum is ~0 by construction, so this returns ~`mean`; kept as mergekit has it.)
    tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    tangent = (tangents * weights[:, None]).sum(dim=0)
    tangent_norm = torch.norm(tangent) + eps
    direction = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)

    out = (direction * (norms.squeeze(-1) * weights).sum()).reshape(points.shape[1:])
    return out if base is None else out + base


def karcher(
    models: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Karcher (Riemannian) mean of the unit vectors with equal weights 1/N, scaled by the mean norm.

    Vectors with norm <= tol take no part in the direction but still count in the norm.
    """
    n = len(models)
    if n == 1:
        return models[0]
    first = models[0]
    dtype = _work_dtype(first)
    alphas = [1.0 / n] * n
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in models]
    units = [
        x if norm.item() == 0 else (x / norm).to(x.dtype)
        for x, norm in zip(models, norms, strict=True)
    ]

    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(first)
    valid_units = [units[i] for i in valid]
    valid_alphas = [alphas[i] for i in valid]
    valid_alphas = [a / sum(valid_alphas) for a in valid_alphas]

    mean = sum(
        (a * u for a, u in zip(valid_alphas, valid_units, strict=True)), torch.zeros_like(first)
    )
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(first.dtype)

    for _ in range(max_iter):
        # Riemannian gradient: the weighted sum of log maps of the points at `mean`.
        tangent = torch.zeros_like(mean)
        for a, u in zip(valid_alphas, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(first.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(first.dtype)

    scale = sum(a * norm for a, norm in zip(alphas, norms, strict=True))
    return (scale * mean).to(first.dtype)
