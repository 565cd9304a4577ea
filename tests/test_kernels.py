"""Merge kernels against small hand-computed examples and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import RecipeError
from evomerge.methods import interpolation as interp
from evomerge.methods import sparsify as sp
from evomerge.methods import specialized as spec
from evomerge.methods.task_vectors import VARIANTS, merge_task_vectors, sign_consensus_mask

R = math.sqrt(0.5)


def T(*values: float | list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor | list, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- linear ------------------------------------------------------------------------------


def test_linear_weighted_average_and_unnormalized_sum():
    a, b = T(1, 2, 3, 4), T(3, 2, 1, 0)
    close(interp.linear([a, b], weight=[1, 3]), [2.5, 2.0, 1.5, 1.0])
    close(interp.linear([a, b], weight=[1, 3], normalize=False), [10, 8, 6, 4])
    close(interp.linear([a, b], weight=[1, 0]), a)


def test_linear_zero_weight_sum_is_a_recipe_error():
    with pytest.raises(RecipeError, match="sum to 0"):
        interp.linear([T(1, 2), T(3, 4)], weight=[0.5, -0.5])
    close(interp.linear([T(1, 2), T(3, 4)], weight=[0.5, -0.5], normalize=False), [-1, -1])


def test_linear_keeps_dtype():
    out = interp.linear([T(1, 2).bfloat16(), T(3, 4).bfloat16()], weight=[1, 1])
    assert out.dtype == torch.bfloat16
    close(out, [2, 3])


# ---- slerp / nuslerp -----------------------------------------------------------------------


def test_slerp_endpoints_and_quarter_circle():
    v0, v1 = T(2, 0), T(0, 4)
    close(interp.slerp(v0, v1, t=0.0), v0)
    close(interp.slerp(v0, v1, t=1.0), v1)
    # theta = pi/2: sin(theta/2)/sin(theta) = sqrt(1/2) on the unnormalized tensors.
    close(interp.slerp(v0, v1, t=0.5), [2 * R, 4 * R])


def test_slerp_near_parallel_is_lerp():
    v0, v1 = T(1, 0), T(2, 0.02)  # cos > 0.9995
    close(interp.slerp(v0, v1, t=0.5), [1.5, 0.01], atol=1e-7)  # true slerp would be ~2e-5 off


def test_slerp_flattens_matrices_and_keeps_dtype():
    v0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    v1 = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    out = interp.slerp(v0, v1, t=0.5)
    assert out.dtype == torch.bfloat16
    close(out.float(), [[R, 0], [0, R]], atol=4e-3)


def test_nuslerp_t_from_weights():
    assert interp.nuslerp_t([1, 3]) == 0.75
    assert interp.nuslerp_t([2, 0]) == 0.0
    assert interp.nuslerp_t([1, -1]) == 0.5  # weights summing to ~0


def test_nuslerp_without_and_with_base():
    close(interp.nuslerp(None, [T(1, 0), T(0, 1)], weight=[1, 1]), [R, R])
    close(interp.nuslerp(None, [T(1, 0), T(0, 1)], weight=[1, 0]), [1, 0])
    # With a base, the task vectors [1, 0] and [0, 1] are slerped and added back.
    close(interp.nuslerp(T(1, 1), [T(2, 1), T(1, 2)], weight=[1, 1]), [1 + R, 1 + R])


def test_nuslerp_vector_by_vector_last_dim_and_row_wise():
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Along the last dim: row 0 is parallel (lerp), row 1 a quarter circle.
    out = interp.nuslerp(None, [x0, x1], weight=[1, 1], nuslerp_flatten=False)
    close(out, [[1, 0], [R, R]])
    # Row-wise (dim 0): column 0 is [1,1] vs [1,0] (45 degrees); column 1 is [0,0] vs [0,1].
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    out = interp.nuslerp(
        None, [x0, x1], weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    close(out, [[2 * c, 0], [c, R]])


# ---- multislerp / karcher ------------------------------------------------------------------


def test_multislerp_orthogonal_pair_is_the_spherical_midpoint_scaled_by_mean_norm():
    close(interp.multislerp(None, [T(2, 0), T(0, 2)], weight=[1, 1]), [2 * R, 2 * R])
    close(interp.multislerp(T(1, 1), [T(3, 1), T(1, 3)], weight=[1, 1]), [1 + 2 * R, 1 + 2 * R])


def test_multislerp_identical_inputs_and_single_model():
    x = T(0.3, -1.2, 2.0)
    close(interp.multislerp(None, [x, x, x], weight=[0.2, 0.3, 0.5]), x, atol=1e-5)
    assert interp.multislerp(None, [x], weight=[1]) is x


def test_multislerp_antipodal():
    # Two antipodal inputs with equal weights: lerp; three that cancel: an error.
    close(interp.multislerp(None, [T(1, 0), T(-1, 0)], weight=[1, 1]), [0, 0])
    with pytest.raises(RecipeError, match="mean direction is zero"):
        interp.multislerp(None, [T(1, 0), T(-1, 0), T(0, 0)], weight=[1, 1, 1])


def test_karcher_identical_orthogonal_and_scaled():
    x = T(0.5, -2.0, 1.0, 3.0)
    close(interp.karcher([x, x, x]), x, atol=1e-6)
    close(interp.karcher([T(1, 0), T(0, 1)]), [R, R], atol=1e-5)
    # Direction: the bisector; norm: the mean of the norms, (3 + 1) / 2.
    close(interp.karcher([T(3, 0), T(0, 1)]), [2 * R, 2 * R], atol=1e-5)


def test_karcher_zero_vectors_count_in_the_norm_only():
    close(interp.karcher([T(2, 0), T(0, 0)]), [1, 0])
    close(interp.karcher([T(0, 0), T(0, 0)]), [0, 0])


# ---- sparsifiers --------------------------------------------------------------------------


def test_magnitude_keeps_largest_and_handles_density_zero():
    d = T(1, -4, 2, -3)
    close(sp.magnitude(d, 0.5), [0, -4, 0, -3])
    close(sp.magnitude(d, 1.0), d)
    close(sp.magnitude(d, 0.0), [0, 0, 0, 0])  # k = 0: all zero, no crash
    close(sp.magnitude(d, 0.1), [0, -4, 0, 0])  # a positive density keeps at least one entry


def test_magnitude_rescale_preserves_l1():
    d = T(1, -4, 2, -3)
    out = sp.magnitude(d, 0.5, rescale=True)
    close(out, [0, -4 * 10 / 7, 0, -3 * 10 / 7], atol=1e-5)


def test_breadcrumbs_drops_both_ends():
    d = torch.arange(1.0, 11.0)  # |d| = 1..10
    # density 0.5, gamma 0.1: n_top = 1 (10), n_bottom = 4 (1..4), keep 5..9.
    close(sp.magnitude_outliers(d, 0.5, 0.1), [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])
    # gamma too large for the density: drop fewer of the top, keep the 5 smallest.
    close(sp.magnitude_outliers(d, 0.5, 0.8), [1, 2, 3, 4, 5, 0, 0, 0, 0, 0])


def test_breadcrumbs_with_no_top_outliers_does_not_zero_everything():
    # gamma * numel < 1 -> n_top = 0. mergekit <= 0.1.4 sliced [n_bot:-0] and returned all zeros.
    d = torch.arange(1.0, 11.0)
    close(sp.magnitude_outliers(d, 0.5, 0.01), [0, 0, 0, 0, 0, 6, 7, 8, 9, 10])


def test_dare_is_seeded_and_keeps_about_density():
    d = torch.randn(20_000, generator=gen(0))
    a = sp.bernoulli(d, 0.3, generator=gen(7))
    assert torch.equal(a, sp.bernoulli(d, 0.3, generator=gen(7)))
    assert not torch.equal(a, sp.bernoulli(d, 0.3, generator=gen(8)))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.015
    assert torch.equal(a[a != 0], d[a != 0])  # kept entries unchanged without rescale
    r = sp.bernoulli(d, 0.3, rescale=True, generator=gen(7))
    assert r.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    assert torch.equal(r != 0, a != 0)


def test_dare_density_one_is_identity_and_float16_works():
    d = T(1, 2, 3)
    assert sp.bernoulli(d, 1.0, generator=gen(0)) is d
    h = sp.bernoulli(torch.ones(100, dtype=torch.float16), 0.5, generator=gen(0))
    assert h.dtype == torch.float16


def test_della_keep_probability_grows_with_rank():
    # One row of 20k entries with |d| increasing: p(rank r) = 0.3 + 0.4 r.
    d = torch.linspace(0.01, 1.0, 20_000)
    kept = (sp.della_magprune(d, 0.5, 0.2, generator=gen(1)) != 0).float()
    low, high = kept[:2000].mean().item(), kept[-2000:].mean().item()
    assert low == pytest.approx(0.32, abs=0.03)
    assert high == pytest.approx(0.68, abs=0.03)
    assert kept.mean().item() == pytest.approx(0.5, abs=0.02)


def test_della_ranks_within_rows_and_single_entry_rows():
    # Row 0 small, row 1 large magnitudes: per-row ranking keeps about half of each row.
    d = torch.cat(
        [torch.rand(1, 4000, generator=gen(2)) * 1e-3, torch.rand(1, 4000, generator=gen(3))]
    )
    kept = (sp.della_magprune(d, 0.5, 0.1, generator=gen(4)) != 0).float().mean(dim=1)
    close(kept, [0.5, 0.5], atol=0.03)
    col = sp.della_magprune(torch.ones(5000, 1), 0.4, 0.1, generator=gen(5))  # n = 1 per row
    assert not col.isnan().any()
    assert (col != 0).float().mean().item() == pytest.approx(0.4, abs=0.03)


def test_della_constraint():
    with pytest.raises(RecipeError, match=r"density=0.9, epsilon=0.2"):
        sp.della_magprune(T(1, 2, 3), 0.9, 0.2, generator=gen(0))
    with pytest.raises(RecipeError, match="density - epsilon"):
        sp.check_della(0.1, 0.1)
    sp.check_della(1.0, 0.15)  # density 1 never prunes, so epsilon is free
    sp.check_della(0.5, 0.0)


# ---- task-vector family --------------------------------------------------------------------

BASE = T(1, 1, 1, 1)
X1, X2 = T(2, 0, 1, 3), T(1, 1, 3, 1)  # deltas [1, -1, 0, 2] and [0, 0, 2, 0]


def test_task_arithmetic_by_hand():
    ta = VARIANTS["task_arithmetic"]
    close(merge_task_vectors(BASE, [X1, X2], ta, weight=[0.5, 1], lambda_=2), [2, 0, 5, 3])
    out = merge_task_vectors(BASE, [X1, X2], ta, weight=[0.5, 1], lambda_=2, normalize=True)
    close(out, [5 / 3, 1 / 3, 11 / 3, 7 / 3])
    close(merge_task_vectors(BASE, [X1], ta, weight=[0]), BASE)


def test_ties_sign_election_by_weighted_sum_not_count():
    base = T(0, 0)
    xs = [T(1, 2), T(1, 2), T(-5, -1)]
    # Position 0: two votes for + but the weighted sum is -3, so only -5 survives.
    out = merge_task_vectors(base, xs, VARIANTS["ties"], weight=[1, 1, 1], density=[1, 1, 1])
    close(out, [-5, 2])


def test_ties_by_hand_with_zero_deltas_never_agreeing():
    base = torch.zeros(4)
    x1, x2 = T(3, -6, 9, 0) / 3, T(-3, 1, 1, 2)
    # u1 = [3,-6,9,0], u2 = [-3,1,1,2]; sums [0,-5,10,2] elect [+,-,+,+].
    out = merge_task_vectors(base, [x1, x2], VARIANTS["ties"], weight=[3, 1], density=[1, 1])
    close(out, [1, -2, 2.5, 2])
    mask = sign_consensus_mask(torch.stack([3 * x1, x2]))
    assert mask.tolist() == [[True, True, True, False], [False, False, True, True]]


def test_ties_density_one_without_conflicts_is_task_arithmetic():
    base = torch.randn(50, generator=gen(0))
    xs = [base + torch.rand(50, generator=gen(i)) + 0.1 for i in (1, 2, 3)]  # all deltas positive
    w = [0.2, 0.5, 0.9]
    ties = merge_task_vectors(base, xs, VARIANTS["ties"], weight=w, density=[1, 1, 1], lambda_=1.3)
    ta = merge_task_vectors(
        base, xs, VARIANTS["task_arithmetic"], weight=w, lambda_=1.3, normalize=True
    )
    close(ties, ta, atol=1e-5)


def test_ties_magnitude_density():
    base = torch.zeros(4)
    out = merge_task_vectors(base, [T(1, -4, 2, -3)], VARIANTS["ties"], weight=[1], density=[0.5])
    close(out, [0, -4, 0, -3])
    zero = merge_task_vectors(base, [T(1, -4, 2, -3)], VARIANTS["ties"], weight=[1], density=[0.0])
    close(zero, [0, 0, 0, 0])


def test_dare_density_one_is_task_arithmetic_and_seeded_dare_reproducible():
    base = torch.randn(200, generator=gen(0))
    xs = [base + 0.1 * torch.randn(200, generator=gen(i)) for i in (1, 2)]
    ta = merge_task_vectors(base, xs, VARIANTS["task_arithmetic"], weight=[0.4, 0.7])
    dare = merge_task_vectors(
        base, xs, VARIANTS["dare_linear"], weight=[0.4, 0.7], density=[1, 1], generator=gen(3)
    )
    close(dare, ta, atol=1e-6)
    runs = [
        merge_task_vectors(
            base, xs, VARIANTS["dare_ties"], weight=[0.4, 0.7], density=[0.5, 0.5], generator=gen(9)
        )
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    assert not torch.allclose(runs[0], ta)


def test_dare_linear_rescale_preserves_each_models_l1():
    base = torch.zeros(5000)
    x = torch.randn(5000, generator=gen(1))
    out = merge_task_vectors(
        base, [x], VARIANTS["dare_linear"], weight=[1], density=[0.2], generator=gen(2)
    )
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-4)
    assert (out != 0).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_della_via_task_vectors_checks_epsilon():
    with pytest.raises(RecipeError, match="epsilon"):
        merge_task_vectors(
            T(0, 0), [T(1, 1)], VARIANTS["della"], weight=[1], density=[0.95], epsilon=[0.1]
        )


def test_breadcrumbs_variant_by_hand():
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0)
    out = merge_task_vectors(
        base, [x], VARIANTS["breadcrumbs"], weight=[2], density=[0.5], gamma=[0.1]
    )
    close(out, [0, 0, 0, 0, 10, 12, 14, 16, 18, 0])


def test_task_vectors_keep_base_dtype():
    base = torch.zeros(4, dtype=torch.bfloat16)
    out = merge_task_vectors(
        base, [T(1, 2, 3, 4).bfloat16()], VARIANTS["ties"], weight=[0.5], density=[0.5]
    )
    assert out.dtype == torch.bfloat16
    close(out.float(), [0, 0, 3, 4])  # normalize divides by the kept weight, 0.5


# ---- specialized ---------------------------------------------------------------------------


def test_model_stock_formula():
    # Offsets [1,0] and [1,1]: cos = 1/sqrt2, t = 2 cos / (1 + cos).
    c = R
    t = 2 * c / (1 + c)
    out = spec.model_stock(T(1, 1), [T(2, 1), T(2, 2)])
    close(out, [t * 2 + (1 - t), t * 1.5 + (1 - t)])
    close(spec.model_stock(T(0, 0), [T(1, 0), T(0, 1)]), [0, 0])  # orthogonal offsets: t = 0
    close(spec.model_stock(T(0, 0), [T(1, 0), T(-1, 0)]), [0, 0])  # 1 + (N-1) cos = 0: keep base


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    close(spec.model_stock(base, [x1, x2], filter_wise=True), [[0, 0], [1, 0]])
    # Whole tensor: cos = 1/2, t = 2/3.
    close(spec.model_stock(base, [x1, x2]), [[1 / 3, 1 / 3], [2 / 3, 0]])
    with pytest.raises(RecipeError, match="at least 2"):
        spec.model_stock(base, [x1])


def test_nearswap_by_hand():
    out = spec.nearswap(torch.zeros(4), T(0.1, 0.5, 2, -1), t=0.5)
    # w = clamp(0.5 / |diff|) = [1, 1, 0.25, 0.5]
    close(out, [0.1, 0.5, 0.5, -0.5])
    close(spec.nearswap(torch.zeros(2), T(1, 2), t=0), [0, 0])


def test_arcee_fusion_threshold_is_median_plus_1_5_iqr():
    base = torch.zeros(10)
    other = T(1, 2, 3, 4, 5, 6, 7, 8, 9, 100)
    # 1-D: one KL for the whole vector, so importance ranks like |delta|. Lower quantiles of 10
    # values: q1 = 3, median = 5, q3 = 7 -> threshold 5 + 1.5 * 4 = 11 (times the KL).
    close(spec.arcee_fusion(base, other), [0, 0, 0, 0, 0, 0, 0, 0, 0, 100])


def test_arcee_fusion_ignores_rows_whose_softmax_is_unchanged():
    base = torch.randn(4, 8, generator=gen(0))
    other = base + 0.01 * torch.randn(4, 8, generator=gen(1))
    other[0] = base[0] + 5.0  # shifted by a constant: same softmax, KL 0, importance 0
    other[1, 0] += 5.0  # a large real change
    out = spec.arcee_fusion(base, other)
    close(out[0], base[0])
    assert out[1, 0].item() == pytest.approx(other[1, 0].item())
    # When most importances are 0 the threshold is 0 and everything is fused (as in mergekit).
    only_one = torch.zeros(4, 8)
    only_one[0, 0] = 1.0
    close(spec.arcee_fusion(torch.zeros(4, 8), only_one), only_one)


def test_arcee_fusion_large_tensor_is_exact_and_deterministic():
    base = torch.randn(1100, 1000, generator=gen(0))
    other = base + 0.01 * torch.randn(1100, 1000, generator=gen(1))
    a = spec.arcee_fusion(base, other)
    assert torch.equal(a, spec.arcee_fusion(base, other))
    fused = (a != base).float().mean().item()
    assert 0 < fused < 0.2


def test_sce_by_hand():
    base = torch.zeros(4)
    x1, x2 = T(1, 2, -1, 0), T(3, -2, -1, 0)
    # weights mean(tau^2) = 1.5, 3.5 -> 0.3, 0.7; signs elected [+, +, -, +].
    close(spec.sce(base, [x1, x2]), [2.4, 2, -1, 0], atol=1e-5)
    # select_topk 0.5: variances [1, 4, 0, 0], 2 nonzero -> keep 1 position (index 1).
    close(spec.sce(base, [x1, x2], select_topk=0.5), [0, 2, 0, 0], atol=1e-5)


def test_sce_select_mask_and_weights():
    taus = torch.stack([T(1, 2, -1, 0), T(3, -2, -1, 0)])
    assert spec.sce_select_mask(taus, 0.5).tolist() == [0, 1, 0, 0]
    assert spec.sce_select_mask(taus, 0.0).tolist() == [0, 0, 0, 0]
    close(spec.sce_weights(taus), [0.3, 0.7])
    close(spec.sce_weights(torch.zeros(3, 4)), [1 / 3, 1 / 3, 1 / 3])


def test_passthrough_scale():
    x = T(1, 2)
    assert spec.passthrough(x) is x
    close(spec.passthrough(x, scale=0.5), [0.5, 1])
