"""Sparsifiers for task vectors: which entries of a delta survive, and the optional L1 rescale.

The functions `magnitude`, `magnitude_outliers`, `bernoulli` and `della_magprune` take one delta
tensor and return a tensor of the same shape and dtype in which the dropped entries are zero.
`density >= 1` is the identity; `density <= 0` drops everything.

They are built on `prepare`, which the task-vector kernel uses to sparsify a delta piece by piece
without holding it whole: it reads the delta's pieces once or twice (a magnitude histogram, a
rescale norm, the random draws) and returns a function to call on the same pieces, in order.

Magnitude selection is exact and O(n): a histogram of the magnitudes' bit patterns finds the
threshold (no sort). Equal magnitudes are ordered by position, the earlier entry counting as the
larger (a stable sort by descending |delta|): TIES keeps the first of several entries tied at
its threshold. mergekit argsorts, which on the CPU is not stable, so there the choice among tied
entries is arbitrary; ties are common in bfloat16 and rare in float32.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from evomerge.errors import RecipeError

_RESCALE_EPS = 1e-7

Pieces = Callable[[], Iterator[torch.Tensor]]
"""Yields a delta's consecutive flat pieces, in order, anew on each call."""

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


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the `max(1, int(density * numel))` entries of largest magnitude (TIES).

    Any positive density keeps at least one entry (as mergekit 0.1.5 does); density 0 gives an
    all-zero delta (mergekit <= 0.1.4 asserted on k = 0). Among entries tied at the threshold
    magnitude, the earliest are kept.
    """
    return _whole(delta, Sparsifier.magnitude, density=density, rescale=rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest |delta|, then enough of the smallest
    to leave `int(density * numel)` entries.

    When `gamma` leaves too few entries, fewer of the largest are dropped (the density wins). Unlike
    mergekit <= 0.1.4, n_top = 0 (gamma * numel < 1) keeps the top entries instead of zeroing all.
    Equal magnitudes are ordered by position, the earlier entry counting as the larger.
    """
    return _whole(
        delta, Sparsifier.magnitude_outliers, density=density, gamma=gamma, rescale=rescale
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
    return _whole(delta, Sparsifier.random, density=density, rescale=rescale, generator=generator)


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
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        generator=generator,
    )


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
    return _whole(
        delta,
        method,
        density=density,
        rescale=rescale,
        gamma=gamma,
        epsilon=epsilon,
        generator=generator,
    )


def _whole(delta: torch.Tensor, method: Sparsifier, **kwargs) -> torch.Tensor:
    flat = delta.contiguous().reshape(-1)
    spans = piece_spans(delta.shape, default_piece_elems(delta.device))
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
    return below.to(_INT_OF_SIZE[piece.element_size()])


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
            after += _masked(piece, bits).abs().sum(dtype=torch.float64).item()
    scale = _l1_scale(before, after, work) if rescale else None
    remaining = iter(masks)

    def apply(piece: torch.Tensor) -> torch.Tensor:
        kept = _masked(piece, next(remaining))
        if scale is None:
            return kept
        return (kept.to(work) * scale).to(piece.dtype)

    return apply


def _masked(piece: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return (piece.view(bits.dtype) & bits).view(piece.dtype)


def _l1_scale(before: float, after: float, work: torch.dtype) -> torch.Tensor | None:
    """mergekit's `before / after` in the work dtype (None: skipped, a norm below 1e-7)."""
    before_t, after_t = torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)
    if before_t < _RESCALE_EPS or after_t < _RESCALE_EPS:
        return None
    return before_t / after_t


# ---- exact selection by magnitude rank ------------------------------------------------------

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT_BITS = 15  # the histogram's resolution: the top 15 magnitude bits (32768 bins)


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """Integers ordered as |delta| is: the IEEE bits with the sign bit cleared (NaN above inf)."""
    ints = delta.view(_INT_OF_SIZE[delta.element_size()])
    return ints & (torch.iinfo(ints.dtype).max)


@dataclass(frozen=True)
class _TieWindow:
    """The entries whose magnitude key is `key`: there are `count`; in index order, those with
    ordinal in [first, stop) are kept."""

    key: int
    count: int
    first: int
    stop: int


@dataclass(frozen=True)
class _RankSelection:
    """Keep keys strictly between `low` and `high` (None: unbounded) and the tie windows' entries."""

    low: int | None
    high: int | None
    windows: tuple[_TieWindow, ...]


def select_by_rank(pieces: Pieces, n: int, start: int, stop: int) -> _RankSelection | None:
    """The entries at positions [start, stop) when the n entries are sorted by ascending |delta|,
    equal magnitudes in reverse index order (the earlier entry counts as the larger); None when
    that is every entry."""
    start, stop = max(0, start), min(n, stop)
    if start == 0 and stop >= n:
        return None
    if stop <= start:
        return _RankSelection(0, 0, ())  # nothing: no key is strictly between 0 and 0
    positions = ([start] if start > 0 else []) + ([stop - 1] if stop < n else [])
    found = _keys_at(pieces, positions)
    windows = []
    for key, below, count in dict.fromkeys(found):  # one window when both ends share a key
        # Tie ordinal t (index order) has ascending position below + count - 1 - t.
        first = max(0, below + count - stop)
        last = min(count, below + count - start)
        windows.append(_TieWindow(key, count, first, max(first, last)))
    low = found[0][0] if start > 0 else None
    high = found[-1][0] if stop < n else None
    return _RankSelection(low, high, tuple(windows))


def _keys_at(pieces: Pieces, positions: list[int]) -> list[tuple[int, int, int]]:
    """(key, entries with a smaller key, entries with this key) for the key at each ascending position.

    Radix selection: a histogram of the keys' top 15 bits; for 32- and 64-bit keys, the entries in
    the bins that hold a position are then gathered and sorted (a small fraction of the tensor).
    """
    hist: torch.Tensor | None = None
    shift = 0
    for piece in pieces():
        keys = magnitude_keys(piece)
        shift = keys.element_size() * 8 - 1 - _DIGIT_BITS
        counts = torch.bincount(keys >> shift if shift else keys, minlength=1 << _DIGIT_BITS)
        hist = counts if hist is None else hist.add_(counts)
    assert hist is not None
    hist = hist.cpu()
    cumulative = hist.cumsum(0)
    bins = [int(torch.searchsorted(cumulative, p, right=True)) for p in positions]
    below_bin = {b: int(cumulative[b] - hist[b]) for b in bins}
    if shift == 0:
        return [(b, below_bin[b], int(hist[b])) for b in bins]

    wanted = sorted(set(bins))
    gathered: dict[int, list[torch.Tensor]] = {b: [] for b in wanted}
    for piece in pieces():
        keys = magnitude_keys(piece)
        digits = keys >> shift
        for b in wanted:
            gathered[b].append(keys[digits == b])
    found = []
    for p, b in zip(positions, bins, strict=True):
        in_bin = torch.sort(torch.cat(gathered[b]).cpu()).values
        key = in_bin[p - below_bin[b]]
        lo = int(torch.searchsorted(in_bin, key, right=False))
        hi = int(torch.searchsorted(in_bin, key, right=True))
        found.append((int(key), below_bin[b] + lo, hi - lo))
    return found


class _RankMasker:
    """Applies a `_RankSelection` to a tensor's pieces in order, counting the ties already met."""

    def __init__(self, selection: _RankSelection):
        self.selection = selection
        self.seen = [0] * len(selection.windows)

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        """The piece with the unselected entries zeroed (bit masks: no comparisons, no branches)."""
        keys = magnitude_keys(piece)
        sign_shift = keys.element_size() * 8 - 1
        low, high = self.selection.low, self.selection.high
        partial: list[torch.Tensor] = []
        for i, w in enumerate(self.selection.windows):
            taken = self._ties_taken(i, w, keys, partial)
            if taken == "all":  # widen the open interval to include the tied key
                low = w.key - 1 if low == w.key else low
                high = w.key + 1 if high == w.key else high
        bits = torch.full_like(keys, -1) if low is None else (low - keys) >> sign_shift  # key > low
        if high is not None and high <= torch.iinfo(keys.dtype).max:
            bits &= (keys - high) >> sign_shift  # key < high
        for positions in partial:
            bits.index_fill_(0, positions, -1)
        return _masked(piece, bits)

    def _ties_taken(
        self, i: int, w: _TieWindow, keys: torch.Tensor, partial: list[torch.Tensor]
    ) -> str:
        """'all' or 'none' of this piece's entries tied at `w.key` are kept, or 'some' (their
        positions appended to `partial`)."""
        seen = self.seen[i]
        if w.stop <= w.first or seen >= w.stop:
            return "none"
        if seen >= w.first and w.stop == w.count:
            return "all"
        tied = keys == w.key
        count = int(torch.count_nonzero(tied))
        self.seen[i] = seen + count
        first, stop = max(w.first - seen, 0), min(w.stop - seen, count)
        if stop <= first:
            return "none"
        if first == 0 and stop == count:
            return "all"
        partial.append(tied.nonzero().reshape(-1)[first:stop])
        return "some"


def _by_rank(
    pieces: Pieces, n: int, start: int, stop: int, rescale: bool
) -> PieceSparsifier | None:
    selection = select_by_rank(pieces, n, start, stop)
    if selection is None:
        return None
    scale = None
    if rescale:
        masker = _RankMasker(selection)
        before = after = 0.0
        work: torch.dtype | None = None
        for piece in pieces():
            work = piece.dtype
            before += piece.abs().sum(dtype=torch.float64).item()
            after += masker(piece).abs().sum(dtype=torch.float64).item()
        scale = _l1_scale(before, after, work) if work is not None else None
    masker = _RankMasker(selection)
    if scale is None:
        return masker
    return lambda piece: masker(piece) * scale
