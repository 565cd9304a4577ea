"""Exact selection by magnitude rank, read piece by piece: TIES' top-k and breadcrumbs' band.

The order: entries sorted by descending |value|, equal magnitudes by ascending index (a stable
sort), so among entries tied at the cut-off the earliest are kept. `torch.topk` and mergekit's
`argsort` make no promise about ties (on the CPU the choice among them is arbitrary); ties are
common in bfloat16 and float16 (about 2^7 and 2^10 values per power of two) and rare in float32.

How, in O(n) and without holding the tensor whole (the caller hands out its consecutive flat
pieces, anew on each call of `pieces`, e.g. cache-sized slices of a task vector):

1. Magnitude keys: the IEEE bits with the sign bit cleared, read as integers, sort as |value|
   does (`magnitude_keys`).
2. Radix selection (`select_by_rank`): one pass builds a histogram of the keys' top 15 bits; the
   bins that hold the cut-off ranks are found from its cumulative sum. 16-bit keys are done;
   for 32- and 64-bit keys a second pass gathers the keys in those bins (a small fraction) and
   sorts them. The result is the key at each cut-off, how many entries have a smaller key, and
   how many share it.
3. Masking (`RankMasker`): entries with keys strictly between the cut-off keys are kept by bit
   arithmetic; the entries tied at a cut-off key are kept by ordinal within a `TieWindow`, and
   the masker counts the ties met in earlier pieces, so the pieces must be masked in order.
   The result does not depend on how the tensor is cut into pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Pieces = Callable[[], Iterator[torch.Tensor]]
"""Yields a tensor's consecutive flat pieces, in order, anew on each call."""

INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT_BITS = 15  # the histogram's resolution: the top 15 magnitude bits (32768 bins)


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """Integers ordered as |delta| is: the IEEE bits with the sign bit cleared (NaN above inf)."""
    ints = delta.view(INT_OF_SIZE[delta.element_size()])
    return ints & (torch.iinfo(ints.dtype).max)


def masked(piece: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`piece` where `bits` (integers as wide as its entries) are all ones, zero where they are 0."""
    return (piece.view(bits.dtype) & bits).view(piece.dtype)


@dataclass(frozen=True)
class TieWindow:
    """The entries whose magnitude key is `key`: there are `count`; in index order, those with
    ordinal in [first, stop) are kept."""

    key: int
    count: int
    first: int
    stop: int


@dataclass(frozen=True)
class RankSelection:
    """Keep keys strictly between `low` and `high` (None: unbounded) and the tie windows' entries."""

    low: int | None
    high: int | None
    windows: tuple[TieWindow, ...]


def select_by_rank(pieces: Pieces, n: int, start: int, stop: int) -> RankSelection | None:
    """The entries at positions [start, stop) when the n entries are sorted by ascending |delta|,
    equal magnitudes in reverse index order (the earlier entry counts as the larger); None when
    that is every entry. The top k are positions [n - k, n)."""
    start, stop = max(0, start), min(n, stop)
    if start == 0 and stop >= n:
        return None
    if stop <= start:
        return RankSelection(0, 0, ())  # nothing: no key is strictly between 0 and 0
    positions = ([start] if start > 0 else []) + ([stop - 1] if stop < n else [])
    found = _keys_at(pieces, positions)
    windows = []
    for key, below, count in dict.fromkeys(found):  # one window when both ends share a key
        # Tie ordinal t (index order) has ascending position below + count - 1 - t.
        first = max(0, below + count - stop)
        last = min(count, below + count - start)
        windows.append(TieWindow(key, count, first, max(first, last)))
    low = found[0][0] if start > 0 else None
    high = found[-1][0] if stop < n else None
    return RankSelection(low, high, tuple(windows))


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


class RankMasker:
    """Applies a `RankSelection` to a tensor's pieces in order, counting the ties already met."""

    def __init__(self, selection: RankSelection):
        self.selection = selection
        self.seen = [0] * len(selection.windows)

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        """The piece with the unselected entries zeroed."""
        return masked(piece, self.keep_bits(piece))

    def keep_bits(self, piece: torch.Tensor) -> torch.Tensor:
        """All-ones integers (as wide as the piece's entries) where an entry is kept, else zeros
        (bit masks: no comparisons, no branches)."""
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
        return bits

    def _ties_taken(
        self, i: int, w: TieWindow, keys: torch.Tensor, partial: list[torch.Tensor]
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


def rank_mask(values: torch.Tensor, start: int, stop: int, *, piece_elems: int) -> torch.Tensor:
    """Boolean mask (shape of `values`) of the entries at ascending rank [start, stop), as
    `select_by_rank` orders them, computed on flat pieces of `piece_elems` entries."""
    if piece_elems < 1:
        raise ValueError(f"piece_elems must be positive, got {piece_elems}")
    flat = values.contiguous().reshape(-1)
    n = flat.numel()
    spans = [(s, min(s + piece_elems, n)) for s in range(0, n, piece_elems)]
    selection = select_by_rank(lambda: (flat[s:e] for s, e in spans), n, start, stop)
    if selection is None:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    masker = RankMasker(selection)
    bits = torch.cat([masker.keep_bits(flat[s:e]) for s, e in spans])
    return (bits != 0).reshape(values.shape)
