"""The exact rank selection (`evomerge.methods.topk`) against a stable-sort and a `torch.topk`
reference, for several piece sizes and tensors full of equal magnitudes."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import sparsify as sp
from evomerge.methods.topk import rank_mask, select_by_rank

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (entries, piece size): sizes below and above the CPU's default piece (65,536 entries), cut into
# pieces of one entry, a few, a prime number of them, the default size, and the whole tensor.
LAYOUTS = [
    (1_000, 1),
    (1_000, 7),
    (1_000, 1_000),
    (70_001, 4_099),
    (70_001, 65_536),
    (70_001, 70_001),
]


def make_values(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    if kind == "randn":  # in bfloat16 about 2^7 magnitudes per power of two: many ties
        return (torch.randn(n, generator=g) * 0.01).to(dtype)
    if kind == "coarse":  # 17 values, zeros and negatives included: every cut-off is a tie
        return (torch.randint(-8, 9, (n,), generator=g) * 0.25).to(dtype)
    if kind == "all_equal":  # one magnitude, both signs
        return (signs * 0.5).to(dtype)
    if kind == "zeros":  # +0.0 and -0.0 have the same magnitude
        return (signs * 0.0).to(dtype)
    if kind == "sparse":  # mostly zeros, a few large values
        values = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.01)
        return values.to(dtype)
    raise ValueError(kind)


def reference_mask(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Ranks [start, stop) by ascending |value| with ties in reverse index order, i.e. positions
    [n - stop, n - start) of a stable sort by descending |value| (ties: earliest first)."""
    flat = values.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    magnitudes = flat.abs().to(torch.promote_types(flat.dtype, torch.float32))  # exact
    order = torch.sort(magnitudes, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    if stop > start:
        mask[order[n - stop : n - start]] = True
    return mask.reshape(values.shape)


def check_top_k(values: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """Exactly k kept; every kept magnitude >= every dropped one (so they are a top k, and the
    cut-off is `torch.topk`'s k-th value); ties at the cut-off kept earliest first."""
    flat, keep = values.reshape(-1).abs(), mask.reshape(-1)
    assert int(keep.sum()) == k
    if k == 0 or k == flat.numel():
        return
    cutoff = torch.where(keep, flat, torch.inf).min()
    assert cutoff >= torch.where(keep, -torch.inf, flat).max()
    assert cutoff == torch.topk(flat.float(), k).values[-1]
    tied = (flat == cutoff).nonzero().reshape(-1)
    kept_tied = keep[tied]
    if not kept_tied.all():  # kept ties come first, in index order
        assert kept_tied[: int(kept_tied.sum())].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "coarse", "all_equal", "zeros", "sparse"])
def test_top_k_matches_stable_sort_for_every_piece_size(dtype, kind):
    for n, piece in LAYOUTS:
        values = make_values(kind, n, dtype, seed=n)
        for k in (1, n // 3, n - 1):
            mask = rank_mask(values, n - k, n, piece_elems=piece)
            check_top_k(values, mask, k)
            assert torch.equal(mask, reference_mask(values, n - k, n)), (n, piece, k)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["randn", "coarse"])
def test_rank_band_matches_stable_sort(dtype, kind):
    """Breadcrumbs keeps a band of ranks: both cut-offs may fall in ties, or in the same one."""
    for n, piece in LAYOUTS[1::2]:
        values = make_values(kind, n, dtype, seed=n + 1)
        for start, stop in ((n // 10, n - n // 20), (n // 2, n // 2 + 3), (1, n - 1), (5, 5)):
            mask = rank_mask(values, start, stop, piece_elems=piece)
            assert int(mask.sum()) == stop - start
            assert torch.equal(mask, reference_mask(values, start, stop)), (n, piece, start, stop)


def test_select_by_rank_none_when_everything_is_kept():
    values = make_values("coarse", 100, torch.bfloat16)
    flat = values.reshape(-1)
    assert select_by_rank(lambda: iter([flat]), 100, 0, 100) is None
    assert select_by_rank(lambda: iter([flat]), 100, -3, 500) is None
    assert rank_mask(values, 0, 100, piece_elems=7).all()
    with pytest.raises(ValueError, match="piece_elems"):
        rank_mask(values, 0, 10, piece_elems=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("piece", [None, 1_000])
def test_magnitude_sparsifiers_follow_the_reference(dtype, piece):
    """Through the sparsifiers, 2-D tensors over 65,536 entries: pieces are whole rows."""
    g = torch.Generator().manual_seed(7)
    delta = (torch.randn(300, 280, generator=g) * 0.02).to(dtype)  # 84,000 entries
    n = delta.numel()
    for density in (0.1, 0.7):
        k = int(density * n)
        ours = sp.magnitude(delta, density, piece_elems=piece)
        assert torch.equal(ours, delta * reference_mask(delta, n - k, n))
        rescaled = sp.magnitude(delta, density, rescale=True, piece_elems=piece)
        assert torch.equal(rescaled != 0, ours != 0)
        for gamma in (0.0, 0.3):
            n_top = int(gamma * n)
            n_bottom = max(0, n - k - n_top)
            ours = sp.magnitude_outliers(delta, density, gamma, piece_elems=piece)
            expected = delta * reference_mask(delta, n_bottom, n_bottom + k)
            assert torch.equal(ours, expected), (density, gamma)
