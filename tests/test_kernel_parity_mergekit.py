"""evomerge's kernels against mergekit's own functions, called directly on random float32 tensors.

Deterministic kernels must agree to rel. error 1e-5; stochastic ones (DARE, DELLA) in distribution.
The registry's declarations must match mergekit's method specs.
"""

from __future__ import annotations

import pytest
import torch

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods import karcher as mk_karcher  # noqa: E402
from mergekit.merge_methods import nuslerp as mk_nuslerp  # noqa: E402
from mergekit.merge_methods import sce as mk_sce  # noqa: E402
from mergekit.merge_methods import slerp as mk_slerp  # noqa: E402
from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import get_mask  # noqa: E402

from evomerge.methods import interpolation as interp  # noqa: E402
from evomerge.methods import sparsify as sp  # noqa: E402
from evomerge.methods import specialized as spec  # noqa: E402
from evomerge.methods.registry import METHODS, get_method  # noqa: E402
from evomerge.methods.task_vectors import sign_consensus_mask  # noqa: E402

pytestmark = pytest.mark.mergekit

SHAPE = (24, 40)
L1 = mk_sparsify.RescaleNorm.l1


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return (
        (ours.double() - theirs.double()).norm() / theirs.double().norm().clamp(min=1e-12)
    ).item()


@pytest.fixture(scope="module")
def family() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(SHAPE, generator=g)
    return {
        "base": base,
        **{k: base + 0.05 * torch.randn(SHAPE, generator=g) for k in ("a", "b", "c")},
    }


# ---- the registry declares what mergekit declares ---------------------------------------------

SCOPES = {"shared": "global", "non_base": "model", "input": "model"}
BASES = {"required": "required", "optional": "optional", "ignored": "unused"}


@pytest.mark.parametrize("name", list(METHODS))
def test_declarations_match_mergekit(name):
    ours = get_method(name)
    theirs = mergekit_methods.get(name).spec
    assert {
        p.name: (SCOPES[p.scope.value], p.required, None if p.required else p.default)
        for p in theirs.parameters
    } == {p.name: (p.scope, p.required, None if p.required else p.default) for p in ours.params}
    assert BASES[theirs.contract.base.value] == ours.base
    extra = 1 if ours.base == "required" else 0  # mergekit counts the base among min/max_inputs
    c = theirs.contract
    # evomerge wants at least one model besides the base (mergekit allows merging nothing into it).
    min_models = max(1, c.min_non_base if c.min_non_base is not None else c.min_inputs - extra)
    max_models = (
        c.max_non_base
        if c.max_non_base is not None
        else (None if c.max_inputs is None else c.max_inputs - extra)
    )
    assert (ours.min_models, ours.max_models) == (min_models, max_models)


# ---- whole methods through mergekit's public in-memory API ----------------------------------

DETERMINISTIC = [
    ("linear", None, "abc", {"weight": [0.2, 0.5, 0.9]}, {}),
    ("linear", None, "ab", {"weight": [0.2, -0.5]}, {"normalize": False}),
    ("slerp", "base", "a", {}, {"t": 0.3}),
    ("nuslerp", None, "ab", {"weight": [0.3, 0.8]}, {}),
    ("nuslerp", "base", "ab", {"weight": [0.3, 0.8]}, {"nuslerp_flatten": False}),
    (
        "nuslerp",
        "base",
        "ab",
        {"weight": [0.3, 0.8]},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    ("multislerp", None, "abc", {"weight": [0.3, 0.8, 0.2]}, {}),
    ("multislerp", "base", "abc", {"weight": [0.3, 0.8, 0.2]}, {"normalize_weights": False}),
    ("karcher", None, "abc", {}, {}),
    ("karcher", None, "ab", {}, {"max_iter": 3, "tol": 1e-3}),
    ("task_arithmetic", "base", "ab", {"weight": [0.5, 0.8]}, {"lambda": 0.9}),
    ("ties", "base", "abc", {"weight": [1.0, 0.6, -0.3], "density": [0.5, 0.7, 0.29]}, {}),
    (
        "ties",
        "base",
        "ab",
        {"weight": [1.0, 0.6], "density": [0.5, 0.7]},
        {"normalize": False, "lambda": 1.2, "rescale": True},
    ),
    (
        "breadcrumbs",
        "base",
        "ab",
        {"weight": [0.6, 0.4], "density": [0.8, 0.9], "gamma": [0.05, 0.0001]},
        {},
    ),
    (
        "breadcrumbs_ties",
        "base",
        "ab",
        {"weight": [0.6, 0.4], "density": [0.8, 0.3], "gamma": [0.05, 0.9]},
        {"rescale": True},
    ),
    ("sce", "base", "abc", {}, {}),
    ("sce", "base", "abc", {}, {"select_topk": 0.29}),
    ("model_stock", "base", "abc", {}, {}),
    ("model_stock", "base", "ab", {}, {"filter_wise": True}),
    ("nearswap", "base", "a", {}, {"t": 0.05}),
    ("arcee_fusion", "base", "a", {}, {}),
    ("passthrough", None, "a", {"scale": [0.5]}, {}),
    ("passthrough", None, "a", {}, {}),
]


@pytest.mark.parametrize(("name", "base", "models", "model_params", "global_params"), DETERMINISTIC)
def test_deterministic_methods_match_mergekit(
    family, name, base, models, model_params, global_params
):
    base_t = family[base] if base else None
    xs = [family[m] for m in models]
    ours = get_method(name).merge(base_t, xs, model_params, global_params)
    inputs = ([base_t] if base_t is not None else []) + xs
    theirs = merge_tensors(
        inputs,
        name,
        parameters={**model_params, **global_params},
        base_index=0 if base_t is not None else None,
    )
    assert rel_err(ours, theirs) <= 1e-5


# ---- kernel functions called directly -----------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_slerp_kernel(family, t):
    v0, v1 = family["a"], family["b"]
    theirs = mk_slerp.slerp(torch.tensor([t]), v0[None], v1[None])[0]  # mergekit batches on dim 0
    assert rel_err(interp.slerp(v0, v1, t=t), theirs) <= 1e-5
    parallel = 2 * v0 + 1e-4 * v1  # the lerp branch
    theirs = mk_slerp.slerp(torch.tensor([t]), v0[None], parallel[None])[0]
    assert rel_err(interp.slerp(v0, parallel, t=t), theirs) <= 1e-5


@pytest.mark.parametrize(("dim", "flatten"), [(-1, True), (-1, False), (0, False)])
def test_nuslerp_kernel(family, dim, flatten):
    v0, v1 = family["a"] - family["base"], family["b"] - family["base"]
    ours = interp.slerp_vectors(0.35, v0, v1, dim=dim, flatten=flatten)
    assert rel_err(ours, mk_nuslerp.nuslerp(0.35, v0, v1, dim=dim, flatten=flatten)) <= 1e-5


def test_karcher_kernel(family):
    xs = [family[k] for k in "abc"]
    theirs = mk_karcher.karcher_merge_tensors(xs, [1 / 3] * 3, max_iter=10, tol=1e-5)
    assert rel_err(interp.karcher(xs, max_iter=10, tol=1e-5), theirs) <= 1e-5


def test_sign_consensus_and_sce_helpers(family):
    taus = (
        torch.stack([family[k] - family["base"] for k in "abc"])
        * torch.tensor([1.0, -0.5, 0.8])[:, None, None]
    )
    assert torch.equal(sign_consensus_mask(taus), get_mask(taus, method="sum"))
    for k in (0.0, 0.29, 0.5, 1.0):
        assert torch.equal(spec.sce_select_mask(taus, k), mk_sce.sce_mask(taus, k, taus.dtype))
    assert rel_err(spec.sce_weights(taus), mk_sce.sce_weight(taus)) <= 1e-6


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_sparsifiers(family, density, rescale):
    d = family["a"] - family["base"]
    norm = L1 if rescale else None
    ours = sp.magnitude(d, density, rescale=rescale)
    assert rel_err(ours, mk_sparsify.magnitude(d, density, rescale_norm=norm)) <= 1e-6
    for gamma in (0.0, 0.001, 0.05, 0.5):
        ours = sp.magnitude_outliers(d, density, gamma, rescale=rescale)
        theirs = mk_sparsify.magnitude_outliers(d, density, rescale_norm=norm, gamma=gamma)
        assert rel_err(ours, theirs) <= 1e-6


def test_l1_rescale_matches(family):
    d = family["a"] - family["base"]
    mask = (torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    theirs = mk_sparsify.rescaled_masked_tensor(d, mask, L1)
    assert rel_err(sp.rescale_l1(d, d * mask), theirs) <= 1e-6


# ---- stochastic kernels: same distribution ----------------------------------------------------


def _theirs_seeded(seed: int, fn, *args, **kwargs):
    """mergekit's stochastic kernels draw from torch's global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def test_dare_matches_in_distribution():
    d = torch.randn(40_000, generator=torch.Generator().manual_seed(3))
    for density in (0.1, 0.5, 0.9):
        ours = sp.bernoulli(d, density, rescale=True, generator=torch.Generator().manual_seed(1))
        theirs = _theirs_seeded(2, mk_sparsify.bernoulli, d, density, rescale_norm=L1)
        kept_ours, kept_theirs = (
            (ours != 0).float().mean().item(),
            (theirs != 0).float().mean().item(),
        )
        assert abs(kept_ours - kept_theirs) < 0.015
        # Both rescale to the delta's L1 norm, so each kept entry is scaled by about 1/density.
        assert ours.abs().sum().item() == pytest.approx(theirs.abs().sum().item(), rel=1e-4)
        ratio = (ours[ours != 0] / d[ours != 0]).mean().item()
        assert ratio == pytest.approx(1 / density, rel=0.05)


def test_della_matches_in_distribution():
    d = torch.randn(8, 5000, generator=torch.Generator().manual_seed(4))
    ours = sp.della_magprune(d, 0.5, 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    theirs = _theirs_seeded(3, mk_sparsify.della_magprune, d, 0.5, 0.3, rescale_norm=L1)
    # Keep rate by magnitude decile within each row: p rises linearly from 0.2 to 0.8.
    order = d.abs().argsort(dim=1)
    for decile in range(10):
        cols = order[:, decile * 500 : (decile + 1) * 500]
        rate_ours = (ours.gather(1, cols) != 0).float().mean().item()
        rate_theirs = (theirs.gather(1, cols) != 0).float().mean().item()
        assert abs(rate_ours - rate_theirs) < 0.04
        assert rate_ours == pytest.approx(0.2 + 0.6 * (decile + 0.5) / 10, abs=0.04)
    assert ours.abs().sum().item() == pytest.approx(theirs.abs().sum().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_stochastic_methods_match_seed_for_seed_on_cpu(family, name):
    # mergekit draws from the global CPU generator; seeded alike, the same Bernoulli stream
    # gives the very same masks, so the whole method must agree, not only in distribution.
    base, xs = family["base"], [family["a"], family["b"]]
    params = {"weight": [0.7, 0.4], "density": [0.6, 0.5]}
    if name.startswith("della"):
        params["epsilon"] = [0.1, 0.2]
    outs = []
    for seed in range(3):
        ours = get_method(name).merge(base, xs, params, {}, torch.Generator().manual_seed(seed))
        theirs = _theirs_seeded(
            seed, merge_tensors, [base, *xs], name, parameters=params, base_index=0
        )
        assert rel_err(ours, theirs) <= 1e-5
        outs.append(ours)
    assert not torch.equal(outs[0], outs[1])  # the seed matters


# ---- TIES in bfloat16: the only differences are ties at the cut-off ---------------------------


def _stable_magnitude(tensor, density, rescale_norm=None):
    """mergekit 0.1.5's `magnitude` with one change: a stable argsort (ties kept earliest first)."""
    if density >= 1:
        return tensor
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    order = torch.argsort(tensor.abs().reshape(-1).float(), descending=True, stable=True)
    mask[order[:k]] = 1
    return mk_sparsify.rescaled_masked_tensor(tensor, mask.reshape_as(tensor), rescale_norm)


def test_bf16_ties_differs_from_mergekit_only_at_cutoff_ties(monkeypatch):
    # bfloat16 holds 2^7 magnitudes per power of two, so many entries of a task vector share the
    # cut-off magnitude; which of them TIES keeps is arbitrary in mergekit (an unstable argsort on
    # the CPU) and earliest-first in evomerge. 196,608 entries: the selection runs in 3 pieces.
    g = torch.Generator().manual_seed(0)
    shape = (384, 512)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base + torch.randn(shape, generator=g) * 0.002).to(torch.bfloat16) for _ in range(3)]
    params = {"weight": [1.0, 0.6, 0.4], "density": [0.3, 0.5, 0.7]}
    n = base.numel()
    at_cutoff = torch.zeros(shape, dtype=torch.bool)  # entries tied at some model's cut-off
    for x, density in zip(xs, params["density"], strict=True):
        delta = x - base
        k = int(density * n)
        magnitudes = delta.abs().float()
        ties = magnitudes == torch.topk(magnitudes.reshape(-1), k).values[-1]
        kept_ours = sp.magnitude(delta, density) != 0
        kept_theirs = mk_sparsify.magnitude(delta, density) != 0
        assert kept_ours.sum() == kept_theirs.sum()
        assert not (kept_ours != kept_theirs)[~ties].any()  # masks differ only among the ties
        at_cutoff |= ties

    ours = get_method("ties").merge(base, xs, params, {})
    theirs = merge_tensors([base, *xs], "ties", parameters=params, base_index=0)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    differ = ours != theirs
    assert torch.equal(ours[~at_cutoff], theirs[~at_cutoff])  # bit for bit off the ties
    print(f"bf16 TIES vs mergekit: {int(differ.sum())} of {n} entries differ, all at cut-off ties")

    # With mergekit's argsort made stable, mergekit keeps the same ties: no difference at all.
    monkeypatch.setattr(mk_sparsify, "magnitude", _stable_magnitude)
    theirs_stable = merge_tensors([base, *xs], "ties", parameters=params, base_index=0)
    assert torch.equal(ours, theirs_stable)
