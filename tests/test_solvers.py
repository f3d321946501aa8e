"""Layer-wise solvers on synthetic layers: error ordering, exactness of the coordinate step,
GPTQ against a textbook reference, outliers on/off the grid, fallbacks and bad options."""
import pytest
import torch

import abqc
from abqc.config import QuantSpec
from abqc.solvers import SOLVERS, solve
from abqc.solvers.grid import Grid
from abqc.solvers.gptq import gptq
from abqc.solvers.quantease import cd_sweep, normalised_gram
from abqc.solvers.synthetic import synthetic_layer


def objective(w, w_hat, sigma):
    e = (w - w_hat).double()
    return torch.einsum("ij,jk,ik->", e, sigma.double(), e).item()


@pytest.fixture(scope="module")
def layer():
    return synthetic_layer()


def test_error_order_rtn_gptq_quantease_gptq_quantease(layer):
    w, sigma = layer
    spec = QuantSpec(bits=3)
    err = {m: solve(m, w, sigma, spec).stats["rel_error"] for m in
           ("rtn", "gptq", "quantease", "gptq_quantease", "quantease_outlier")}
    assert err["rtn"] > err["gptq"] > err["quantease"] > err["gptq_quantease"], err
    assert err["quantease_outlier"] < err["quantease"], err
    assert err["rtn"] > 2 * err["gptq"], err  # not a marginal win


@pytest.mark.parametrize("group_size, act_order", [(0, False), (0, True), (64, False), (64, True)])
def test_every_method_returns_codes_on_its_grid(layer, group_size, act_order):
    w, sigma = layer
    spec = QuantSpec(bits=4, granularity="group" if group_size else "channel", group_size=group_size)
    rtn_err = solve("rtn", w, sigma, spec).stats["rel_error"]
    for method in SOLVERS:
        r = solve(method, w, sigma, spec, act_order=act_order, sweeps=6)
        assert r.codes.dtype == torch.uint8 and r.codes.shape == w.shape
        assert int(r.codes.max()) <= spec.qmax
        groups = (w.shape[1] + group_size - 1) // group_size if group_size else 1
        assert r.scale.shape == r.zero.shape == (w.shape[0], groups)
        assert r.stats["rel_error"] <= rtn_err * 1.0001, (method, r.stats, rtn_err)
        if r.outliers is None:  # the returned weight is exactly the dequantized codes
            grid = Grid(r.scale, r.zero, spec.qmax, group_size, w.shape[1])
            assert torch.equal(grid.project(r.weight(), slice(None)), r.weight())


def brute_force_column(target, w_hat, sigma, grid, j):
    """Per row, the grid level for column j minimising the full objective (others fixed)."""
    levels = torch.arange(grid.qmax + 1, dtype=torch.float32)
    best = torch.empty(w_hat.shape[0])
    for r in range(w_hat.shape[0]):
        cands = grid.s[r, j] * (levels - grid.z[r, j])
        errs = []
        for c in cands:
            row = w_hat[r].clone()
            row[j] = c
            e = (target[r] - row).double()
            errs.append((e @ sigma.double() @ e).item())
        best[r] = cands[int(torch.tensor(errs).argmin())]
    return best


def test_one_quantease_column_update_is_the_grid_brute_force(layer):
    w, sigma = layer
    w, sigma = w[:24, :40], sigma[:40, :40]
    spec = QuantSpec(bits=3)
    grid = Grid.fit(w, spec)
    g = torch.Generator().manual_seed(1)
    start = grid.project(w + 0.02 * torch.randn(w.shape, generator=g), slice(None))
    n, _ = normalised_gram(sigma)
    what_t = start.T.contiguous()
    cd_sweep(w.T.contiguous(), what_t, n, grid, round_=True, blocksize=16)
    after = what_t.T
    # column 0 is updated first, with every other column still at the start
    assert torch.allclose(after[:, 0], brute_force_column(w, start, sigma, grid, 0), atol=1e-6)
    # the last column is updated last, with every other column already at its final value
    assert torch.allclose(after[:, -1], brute_force_column(w, after, sigma, grid, 39), atol=1e-6)
    # and a rounded sweep never increases the objective
    assert objective(w, after, sigma) <= objective(w, start, sigma) + 1e-9


def reference_gptq(w, sigma, grid, percdamp=0.01):
    """Textbook OBQ-order GPTQ: explicit inverse, one column at a time, no blocking."""
    w = w.double().clone()
    h = sigma.double() + percdamp * torch.diagonal(sigma).mean().double() * torch.eye(w.shape[1])
    hinv = torch.linalg.inv(h)
    q_all = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q = grid.project(w[:, j].float(), j).double()
        q_all[:, j] = q
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        # remove j from the inverse Hessian (Schur complement)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q_all.float()


def test_gptq_matches_textbook_reference(layer):
    w, sigma = layer
    w, sigma = w[:32, :96], sigma[:96, :96]
    spec = QuantSpec(bits=3)
    ref = reference_gptq(w, sigma, Grid.fit(w, spec))
    for bs in (16, 128):  # lazy block updates do not change the result
        got, _ = gptq(w, sigma, spec, blocksize=bs)
        mismatch = (got != ref).float().mean().item()
        assert mismatch < 0.01, (bs, mismatch)  # only fp rounding ties may differ


def test_outlier_variant_is_on_grid_except_at_outliers(layer):
    w, sigma = layer
    spec = QuantSpec(bits=3)
    for structure in ("unstructured", "structured"):
        r = solve("quantease_outlier", w, sigma, spec, outlier_fraction=0.02,
                  outlier_structure=structure, sweeps=9)
        h = r.outliers.to_dense()
        assert r.outliers.is_sparse
        grid = Grid(r.scale, r.zero, spec.qmax, 0, w.shape[1])
        full = r.weight()
        off_grid = grid.project(full, slice(None)) != full
        assert not (off_grid & (h == 0)).any()  # off the grid only where H has an entry
        assert off_grid.any()
        if structure == "unstructured":
            assert (h != 0).sum() <= round(0.02 * w.numel())
        else:
            cols = (h != 0).any(dim=0)
            assert cols.sum() <= round(0.02 * w.shape[1])
            assert ((h != 0) == cols[None, :].expand_as(h)).float().mean() > 0.99  # whole columns
        # and the codes alone are on the grid, so the packed weight stays integer
        q = r.weight() - h
        assert torch.allclose(grid.project(q, slice(None)), q, atol=1e-6)


def test_gptq_falls_back_to_quantease_when_cholesky_fails(layer):
    w, sigma = layer
    bad = sigma.clone()
    bad[5, 5] = -1e6  # indefinite: no damping within the retries can fix it
    r = solve("gptq", w, bad, QuantSpec(bits=4), damp_retries=1, sweeps=3)
    assert any("fell back to QuantEase" in n for n in r.stats["notes"])
    assert r.codes.shape == w.shape


def test_dead_columns_are_plain_rounded(layer):
    w, sigma = layer
    sigma = sigma.clone()
    sigma[7, :] = 0
    sigma[:, 7] = 0
    spec = QuantSpec(bits=4)
    rtn_col = Grid.fit(w, spec).project(w[:, 7], 7)
    for m in ("gptq", "quantease", "gptq_quantease"):
        r = solve(m, w, sigma, spec, sweeps=3)
        assert torch.allclose(r.weight()[:, 7], rtn_col), m


def test_bad_method_and_options_are_refused(layer):
    w, sigma = layer
    spec = QuantSpec(bits=4)
    with pytest.raises(abqc.ConfigError, match="method='obq'"):
        solve("obq", w, sigma, spec)
    with pytest.raises(abqc.ConfigError, match=r"unknown solver option\(s\) \['sweep'\]"):
        solve("quantease", w, sigma, spec, sweep=3)
    with pytest.raises(abqc.ConfigError, match="outlier_fraction=2"):
        solve("quantease_outlier", w, sigma, spec, outlier_fraction=2)
    with pytest.raises(abqc.ConfigError, match="Σ"):
        solve("gptq", w, sigma[:5, :5], spec)


def test_quantease_damping_moves_the_solution_towards_rounding(layer):
    """qe_damp is a ridge: 0 is the reference solver; larger values pull Ŵ towards RTN codes
    and cost objective on the calibration Σ itself (the price paid for transfer)."""
    w, sigma = layer
    spec = QuantSpec(bits=3)
    rtn = solve("rtn", w, sigma, spec)
    plain = solve("quantease", w, sigma, spec, sweeps=8)
    assert torch.equal(solve("quantease", w, sigma, spec, sweeps=8, qe_damp=0.0).codes, plain.codes)
    diffs, errs = [], []
    for damp in (0.0, 0.3, 10.0):
        r = solve("quantease", w, sigma, spec, sweeps=8, qe_damp=damp)
        diffs.append(int((r.codes != rtn.codes).sum()))
        errs.append(r.stats["rel_error"])
    assert diffs[0] > diffs[1] > diffs[2], diffs
    assert errs[0] < errs[1] < errs[2] <= rtn.stats["rel_error"] * 1.0001, errs
    with pytest.raises(abqc.ConfigError, match="qe_damp=-1"):
        solve("quantease", w, sigma, spec, qe_damp=-1)


_TRITON_SWEEP = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from abqc.config import QuantSpec
from abqc.solvers.grid import Grid
from abqc.solvers.quantease import quantease
from abqc.solvers.synthetic import synthetic_layer
w, sigma = synthetic_layer(n=9, k=200, seed=3)
grid = Grid.fit(w, QuantSpec(bits=3, granularity="group", group_size=64))
torch.save(quantease(w, sigma, grid, sweeps=6, relax=True), sys.argv[1])
"""


def test_triton_block_sweep_matches_the_torch_sweep(tmp_path):
    """The CUDA path's fused block kernel, run by Triton's interpreter on the CPU, gives the
    torch sweep's weights exactly: a partial last block (200 = 128 + 72 columns), groups,
    and the relaxed schedule's unrounded sweep included."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    out = tmp_path / "w_hat.pt"
    subprocess.run([sys.executable, "-c", _TRITON_SWEEP, str(out)], check=True, timeout=300)
    from abqc.solvers.quantease import quantease

    w, sigma = synthetic_layer(n=9, k=200, seed=3)
    grid = Grid.fit(w, QuantSpec(bits=3, granularity="group", group_size=64))
    ref = quantease(w, sigma, grid, sweeps=6, relax=True)
    fused = torch.load(out)
    assert torch.equal(fused, ref)
    assert not torch.equal(ref, grid.project(w, slice(None)))  # the sweeps moved off plain rounding
