"""Sparsifiers for task vectors: which entries of a delta survive, and the optional L1 rescale.

The functions `magnitude`, `magnitude_outliers`, `bernoulli` and `della_magprune` take one delta
tensor and return a tensor of the same shape and dtype in which the dropped entries are zero.
`density >= 1` is the identity; `density <= 0` drops everything.

They are built on `prepare`, which the task-vector kernel uses to sparsify a delta piece by piece
without holding it whole: it reads the delta's pieces once or twice (a magnitude histogram, a
rescale norm, the random draws) and returns a function to call on the same pieces, in order.

Magnitude selection is exact and O(n) (`evomerge.methods.topk`): a histogram of the magnitudes'
bit patterns finds the threshold (no sort). Equal magnitudes are ordered by position, the earlier entry counting as the
larger (a stable sort by descending |delta|): TIES keeps the first of several entries tied at
its threshold. mergekit argsorts, which on the CPU is not stable, so there the choice among tied
entries is arbitrary; ties are common in bfloat16 and rare in float32.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable

import torch

from evomerge.errors import RecipeError
from evomerge.methods.topk import INT_OF_SIZE, Pieces, RankMasker, masked, select_by_rank

_RESCALE_EPS = 1e-7

PieceSparsifier = Callable[[torch.Tensor], torch.Tensor]
"""Called once with each piece of the delta, in order; returns the piece sparsified."""


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


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities span [density - epsilon, density + epsilon]; both must be in (0, 1)."""
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise RecipeError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )


# ---- whole-tensor sparsifiers ---------------------------------------------------------------


def magnitude(
    delta: torch.Tensor, density: float, *, rescale: bool = False, piece_elems: int | None = None
) -> torch.Tensor:
    """Keep the `max(1, int(density * numel))` entries of largest magnitude (TIES).

    Any positive density keeps at least one entry (as mergekit 0.1.5 does); density 0 gives an
    all-zero delta (mergekit <= 0.1.4 asserted on k = 0). Among entries tied at the threshold
    magnitude, the earliest are kept. `piece_elems`: see `piece_spans` (default: cache-sized on
    the CPU); the result does not depend on it.
    """
    return _whole(delta, Sparsifier.magnitude, piece_elems, density=density, rescale=rescale)


def magnitude_outliers(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    *,
    rescale: bool = False,
    piece_elems: int | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest |delta|, then enough of the smallest
    to leave `int(density * numel)` entries.

    When `gamma` leaves too few entries, fewer of the largest are dropped (the density wins). Unlike
    mergekit <= 0.1.4, n_top = 0 (gamma * numel < 1) keeps the top entries instead of zeroing all.
    Equal magnitudes are ordered by position, the earlier entry counting as the larger.
    """
    return _whole(
        delta,
        Sparsifier.magnitude_outliers,
        piece_elems,
        density=density,
        gamma=gamma,
        rescale=rescale,
    )


def bernoulli(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`.

    On the CPU the mask is, draw for draw, `torch.bernoulli(full_like(delta, density))` (mergekit's).
    """
    return _whole(
        delta, Sparsifier.random, None, density=density, rescale=rescale, generator=generator
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
    return _whole(
        delta,
        Sparsifier.della_magprune,
        None,
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        generator=generator,
    )


def _whole(
    delta: torch.Tensor, method: Sparsifier, piece_elems: int | None, **kwargs
) -> torch.Tensor:
    flat = delta.contiguous().reshape(-1)
    spans = piece_spans(delta.shape, piece_elems or default_piece_elems(delta.device))
    sparsify_piece = prepare(
        method,
        lambda: (flat[s:e] for s, e in spans),
        delta.shape,
        dtype=delta.dtype,
        device=delta.device,
        **kwargs,
    )
    if sparsify_piece is None:
        return delta
    pieces = [sparsify_piece(flat[s:e]) for s, e in spans]
    return (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).reshape(delta.shape)


# ---- piecewise sparsification ---------------------------------------------------------------


def default_piece_elems(device: torch.device) -> int:
    """Piece size: small enough that a piece's temporaries stay in the CPU's cache, one piece on GPUs."""
    return 1 << 16 if device.type == "cpu" else sys.maxsize


def piece_spans(shape: torch.Size | tuple[int, ...], piece_elems: int) -> list[tuple[int, int]]:
    """[start, stop) spans of the flattened tensor, each a whole number of dim-0 slices (DELLA ranks
    within rows along dim 1); a 1-D tensor is one piece."""
    n = 1
    for size in shape:
        n *= size
    if n == 0:
        return [(0, 0)]
    if len(shape) < 2:
        return [(0, n)]
    slice_elems = n // shape[0]
    step = max(1, piece_elems // slice_elems) * slice_elems
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def prepare(
    method: Sparsifier,
    pieces: Pieces,
    shape: torch.Size | tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> PieceSparsifier | None:
    """Read the delta's `pieces` (of `dtype` on `device`; the whole tensor has `shape`) as the
    method needs and return the function that sparsifies them; None when it keeps everything.

    Stochastic methods draw all their random numbers here, piece by piece in order, so the draws
    are those of one call on the whole tensor.
    """
    if density >= 1:
        return None
    n = 1
    for size in shape:
        n *= size
    if method is Sparsifier.magnitude:
        if density <= 0 or n == 0:
            return torch.zeros_like
        k = max(1, int(density * n))
        return _by_rank(pieces, n, n - k, n, rescale)
    if method is Sparsifier.magnitude_outliers:
        n_keep = max(0, int(density * n))
        n_top = int(gamma * n)
        n_bottom = max(0, n - n_keep - n_top)
        return _by_rank(pieces, n, n_bottom, n_bottom + n_keep, rescale)
    work = _sampling_dtype(dtype, device)
    if method is Sparsifier.random:
        p = torch.tensor(max(density, 0.0), dtype=work).item()  # rounded as mergekit's probs

        def dare_bits(piece: torch.Tensor) -> torch.Tensor:
            return _keep_bits(_draw(piece.numel(), piece.device, generator), p, piece)

        return _by_draws(pieces, dare_bits, work, rescale)
    if method is Sparsifier.della_magprune:
        if density <= 0:
            return torch.zeros_like
        check_della(density, epsilon)
        # Rows along dim 1 of each piece (whole dim-0 slices); a 1-D tensor is one row.
        slab_shape = (-1, *shape[1:]) if len(shape) >= 2 else (1, -1)

        def della_bits(piece: torch.Tensor) -> torch.Tensor:
            probs = _della_probs(piece.to(work).reshape(slab_shape), density, epsilon)
            draws = _draw(piece.numel(), piece.device, generator)
            return _keep_bits(draws, probs.reshape(-1), piece)

        return _by_draws(pieces, della_bits, work, rescale)
    raise ValueError(f"unknown sparsifier {method!r}")


def _sampling_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """torch.bernoulli has no float16 kernel on the CPU; mergekit samples in float32 there."""
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _draw(count: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) float32s. On the CPU, `draws < p` consumes the generator exactly as
    `torch.bernoulli(p)` does (one 24-bit uniform per entry, in order): the masks are mergekit's."""
    return torch.rand(count, generator=generator, device=device)


def _keep_bits(
    draws: torch.Tensor, probs: torch.Tensor | float, piece: torch.Tensor
) -> torch.Tensor:
    """All-ones bits where draws < probs, else zeros, as integers as wide as `piece`'s entries.

    The sign of draws - probs is exactly draws < probs (a difference is 0 only when they are
    equal), and reading it as bits avoids the slow boolean path.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.float()  # torch.bernoulli compares in float32 too
    below = (draws - probs).view(torch.int32) >> 31
    return below.to(INT_OF_SIZE[piece.element_size()])


def _della_probs(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities from each entry's rank of |value| along dim 1 (ascending, 0-based)."""
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    positions = torch.arange(n, device=rows.device).reshape(1, n, *([1] * (rows.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))  # 0 .. n-1
    ranks = ranks.to(rows.dtype)
    relative_rank = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + 2 * epsilon * relative_rank


def _by_draws(
    pieces: Pieces,
    keep_bits: Callable[[torch.Tensor], torch.Tensor],
    work: torch.dtype,
    rescale: bool,
) -> PieceSparsifier:
    """Masks drawn now (all of them, in order), applied piece by piece later."""
    masks: list[torch.Tensor] = []
    before = after = 0.0
    for piece in pieces():
        bits = keep_bits(piece)
        masks.append(bits)
        if rescale:
            before += piece.abs().sum(dtype=torch.float64).item()
            after += masked(piece, bits).abs().sum(dtype=torch.float64).item()
    scale = _l1_scale(before, after, work) if rescale else None
    remaining = iter(masks)

    def apply(piece: torch.Tensor) -> torch.Tensor:
        kept = masked(piece, next(remaining))
        if scale is None:
            return kept
        return (kept.to(work) * scale).to(piece.dtype)

    return apply


def _l1_scale(before: float, after: float, work: torch.dtype) -> torch.Tensor | None:
    """mergekit's `before / after` in the work dtype (None: skipped, a norm below 1e-7)."""
    before_t, after_t = torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)
    if before_t < _RESCALE_EPS or after_t < _RESCALE_EPS:
        return None
    return before_t / after_t


# ---- selection by magnitude rank ----------------------------------------------------------


def _by_rank(
    pieces: Pieces, n: int, start: int, stop: int, rescale: bool
) -> PieceSparsifier | None:
    selection = select_by_rank(pieces, n, start, stop)
    if selection is None:
        return None
    scale = None
    if rescale:
        masker = RankMasker(selection)
        before = after = 0.0
        work: torch.dtype | None = None
        for piece in pieces():
            work = piece.dtype
            before += piece.abs().sum(dtype=torch.float64).item()
            after += masker(piece).abs().sum(dtype=torch.float64).item()
        scale = _l1_scale(before, after, work) if work is not None else None
    masker = RankMasker(selection)
    if scale is None:
        return masker
    return lambda piece: masker(piece) * scale
