"""SIGReg and the LeJEPA loss (lejepa.py) against the formula of RECIPE.md 5 written out here in
float64, its known values, float64 gradcheck, and two real processes for the DDP rule."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lejepa import lejepa_loss, sigreg, sigreg_directions, sigreg_torch  # noqa: E402


def formula_f64(z, A, knots=17, t_max=3.0):
    """RECIPE.md 5 spelled out, knot by knot, in float64: independent of lejepa.py's helpers."""
    z, A = z.double(), A.double()
    dt = t_max / (knots - 1)
    per_view = []
    for zv in z:  # (N, K)
        P = zv @ A  # (N, M)
        stat = 0.0
        for k in range(knots):
            t = k * dt
            w = dt if k in (0, knots - 1) else 2 * dt  # trapezoid on the half grid
            phi = math.exp(-t * t / 2)
            c, s = torch.cos(t * P).mean(0), torch.sin(t * P).mean(0)  # (M,)
            stat = stat + w * phi * ((c - phi) ** 2 + s ** 2)
        per_view.append(P.shape[0] * stat.mean())
    return torch.stack(per_view).mean()


def skewed(*shape, seed=0):
    """Random, clearly non-Gaussian data: a shifted mixture of a normal and an exponential."""
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(*shape, generator=g) + 0.5 * torch.empty(*shape).exponential_(generator=g) - 0.3


def test_matches_the_formula_in_float64():
    z = skewed(2, 50, 8)
    v = sigreg(z, step=3, num_slices=64, fused=False)
    ref = formula_f64(z, sigreg_directions(8, 64, 3))
    # float32 sums of O(1) terms are good to ~1e-7 relative; the value is smooth in them
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(ref.item(), rel=1e-5)
    # the hand-written float64 gradient equals autograd's on the independent formula
    z64 = z.double().requires_grad_()
    sigreg(z64, step=3, num_slices=64, fused=False).backward()
    z_ref = z.double().requires_grad_()
    formula_f64(z_ref, sigreg_directions(8, 64, 3)).backward()
    torch.testing.assert_close(z64.grad, z_ref.grad, rtol=1e-9, atol=1e-12)


def test_gaussian_and_collapsed_values():
    t = torch.linspace(0, 3, 17, dtype=torch.float64)
    w = torch.full_like(t, 3 / 16 * 2)
    w[0] = w[-1] = 3 / 16
    W, phi = w * torch.exp(-t ** 2 / 2), torch.exp(-t ** 2 / 2)
    gauss, collapse = (W * (1 - phi ** 2)).sum().item(), (W * (1 - phi) ** 2).sum().item()
    assert gauss == pytest.approx(1.0525, abs=5e-5) and collapse == pytest.approx(0.4020, abs=5e-5)  # RECIPE.md
    # z = 0: every c is exactly 1, so the value is exactly N * sum W (1 - phi)^2
    assert sigreg(torch.zeros(100, 16), step=0, fused=False).item() == pytest.approx(100 * collapse, rel=1e-5)
    # Gaussian z: E[N (c - phi)^2 + N s^2] = Var cos + Var sin = 1 - phi^2 for any N, so the
    # expectation is exactly 1.0525. One draw (N=1024, K=128) has a spread of 0.078 (100 draws
    # measured), the mean of 8 draws 0.028: 0.15 is about 5 sigma. A wrong weight, knot grid or
    # N factor moves the value by far more (e.g. 1 - phi instead of 1 - phi^2 gives 0.73).
    g = torch.Generator().manual_seed(0)
    vals = [sigreg(torch.randn(1024, 128, generator=g), step=s, fused=False).item() for s in range(8)]
    assert sum(vals) / len(vals) == pytest.approx(gauss, abs=0.15)
    # and a Gaussian of the wrong scale is far from it
    assert sigreg(2 * torch.randn(1024, 128, generator=g), step=9, fused=False).item() > 10


def test_gradcheck_float64():
    z = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    # chunk=3 does not divide M=8: the last chunk is short
    assert torch.autograd.gradcheck(lambda z: sigreg(z, step=3, num_slices=8, fused=False, chunk=3), (z,))


def test_chunked_equals_direct():
    A = sigreg_directions(16, 100, step=1)
    grads, vals = [], []
    for chunk in (7, 100):
        z = skewed(300, 16, seed=2).requires_grad_()
        v = sigreg_torch(z, A, chunk=chunk)
        v.backward()
        vals.append(v.detach())
        grads.append(z.grad)
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_views_are_averaged():
    z = skewed(3, 40, 6, seed=3).requires_grad_()
    v = sigreg(z, step=4, num_slices=32, fused=False)
    v.backward()
    zs = z.detach().clone().requires_grad_()
    each = torch.stack([sigreg(zs[i], step=4, num_slices=32, fused=False) for i in range(3)])
    each.mean().backward()
    torch.testing.assert_close(v, each.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(z.grad, zs.grad, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(each[0], each[1])  # the views really differ


def test_directions():
    A = sigreg_directions(124, 1024, step=11)
    assert A.shape == (124, 1024) and A.dtype == torch.float32 and A.device.type == "cpu"
    assert torch.equal(A, sigreg_directions(124, 1024, step=11))
    assert not torch.allclose(A, sigreg_directions(124, 1024, step=12))
    torch.testing.assert_close(A.norm(dim=0), torch.ones(1024), rtol=0, atol=1e-6)


def test_bf16_autocast_computes_in_float32():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)  # (64, 8) bf16 under autocast
        v = sigreg(z, step=2, num_slices=64, fused=False)
    assert z.dtype == torch.bfloat16 and v.dtype == torch.float32
    # the same bf16 values outside autocast, upcast by hand: identical to the bit
    assert torch.equal(v, sigreg(z.detach().float(), step=2, num_slices=64, fused=False))
    v.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_lejepa_loss_by_hand():
    V, B, K, lam, step = 4, 3, 5, 0.25, 7
    z = skewed(V, B, K, seed=4).requires_grad_()
    loss, parts = lejepa_loss(z, n_global=2, lam=lam, step=step, num_slices=16, fused=False)
    inv = 0.0
    for v in range(V):
        for b in range(B):
            for k in range(K):
                mu = (z[0, b, k].item() + z[1, b, k].item()) / 2
                inv += (mu - z[v, b, k].item()) ** 2
    inv /= V * B * K
    sig = sigreg(z.detach(), step=step, num_slices=16, fused=False).item()
    assert parts["inv"].item() == pytest.approx(inv, rel=1e-5)
    assert parts["sigreg"].item() == pytest.approx(sig, rel=1e-6)
    assert loss.item() == pytest.approx((1 - lam) * inv + lam * sig, rel=1e-5)
    assert not parts["inv"].requires_grad and not parts["sigreg"].requires_grad

    # no stop-gradient: the global views also get the gradient that flows through their mean
    z.grad = None
    lejepa_loss(z, n_global=2, lam=0.0, step=step, num_slices=16, fused=False)[0].backward()
    zd = z.detach()
    mu = zd[:2].mean(0)  # (B, K)
    expect = 2 / (V * B * K) * (zd - mu)  # (V, B, K) the direct term
    expect[:2] += 2 / (V * B * K) * (mu - zd).sum(0) / 2  # through mu, global views only
    torch.testing.assert_close(z.grad, expect, rtol=1e-5, atol=1e-7)

    with pytest.raises(ValueError, match="lejepa.py"):
        lejepa_loss(z[:1], n_global=2)


def test_memory_stays_bounded_at_n16384_k1024():
    """N=16384, K=1024, M=1024 forward and backward. A single (N, M, 17) float32 tensor would be
    1.1 GB; the chunked path must stay far below that. Measured as the growth of the peak resident
    memory of a fresh process (z and its gradient are 64 MB each)."""
    code = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from lejepa import sigreg
        torch.manual_seed(0)
        z = torch.randn(16384, 1024, requires_grad=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v = sigreg(z, step=0, fused=False)
        v.backward()
        grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(v.item(), grow * (1 if sys.platform == "darwin" else 1024) / 2 ** 20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, grow_mb = map(float, out.stdout.split())
    assert value == pytest.approx(1.0525, abs=0.3)  # Gaussian z: a sane value, not just no crash
    assert grow_mb < 500, f"peak memory grew by {grow_mb:.0f} MB"


# -----------------------------------------------------------------------------
# Two processes: the value and the DDP-averaged gradient equal one process on the whole batch

def _ddp_worker(rank, world, init_file, out_dir, x, W0):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B = x.shape[1] // world
        xs = x[:, rank * B:(rank + 1) * B]  # (V, B, Kin) this rank's share of every view
        result = {}
        for name, lam in (("sigreg", 1.0), ("lejepa", 0.3)):
            W = W0.clone().requires_grad_()  # the shared parameter, replicated as DDP does
            z = xs @ W  # (V, B, K)
            z.retain_grad()
            loss, parts = lejepa_loss(z, n_global=2, lam=lam, step=5, num_slices=32, fused=False)
            loss.backward()
            gW = W.grad.clone()
            dist.all_reduce(gW)
            gW /= world  # what DDP does to every parameter gradient
            result[name] = dict(sigreg=parts["sigreg"], gW=gW, gz=z.grad, rows=(rank * B, (rank + 1) * B))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    V, N, Kin, K, world = 3, 24, 6, 5, 2
    x, W0 = skewed(V, N, Kin, seed=5), torch.randn(Kin, K) / Kin ** 0.5
    torch.multiprocessing.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path), x, W0),
                                nprocs=world, join=True)
    for name, lam in (("sigreg", 1.0), ("lejepa", 0.3)):
        W = W0.clone().requires_grad_()
        z = x @ W
        z.retain_grad()
        loss, parts = lejepa_loss(z, n_global=2, lam=lam, step=5, num_slices=32, fused=False)
        loss.backward()
        for rank in range(world):
            r = torch.load(tmp_path / f"rank{rank}.pt")[name]
            torch.testing.assert_close(r["sigreg"], parts["sigreg"], rtol=1e-5, atol=0)
            torch.testing.assert_close(r["gW"], W.grad, rtol=1e-4, atol=1e-7)
            lo, hi = r["rows"]
            # each rank's own rows carry world x the global gradient, which DDP's mean divides back
            torch.testing.assert_close(r["gz"] / world, z.grad[:, lo:hi], rtol=1e-4, atol=1e-8)
