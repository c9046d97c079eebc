"""The fused Triton SIGReg (kernels/sigreg.py) equals the PyTorch path (lejepa.py), run on the CPU
through Triton's interpreter with tiles shrunk to 16 so that tiny inputs cross every block edge;
and the kernels compile for an H100 (sm_90) even though no GPU is here."""
import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def triton_interpreter():
    """TRITON_INTERPRET=1 inside, the previous value restored after. Triton reads it when kernels
    are defined (at import) and again when the interpreter runs them (it imports more of itself
    lazily), so it is set around the import of kernels/sigreg.py and around every test here, and
    nowhere else: the other test files never see it."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


with triton_interpreter():
    try:
        import triton  # noqa: F401
        import kernels.sigreg as ks
        if not ks.INTERPRET:  # imported earlier without the interpreter: define the kernels again
            ks = importlib.reload(ks)
    except ImportError as e:
        pytest.skip(f"triton is not importable ({e}); the fused SIGReg kernel cannot be tested",
                    allow_module_level=True)

from lejepa import lejepa_loss, sigreg, sigreg_directions, sigreg_torch  # noqa: E402

SMALL_TILES = dict(fwd_m=16, fwd_n=16, fwd_warps=1, bwd_m=16, bwd_n=16, bwd_warps=1, max_k=16, max_d=16)


@pytest.fixture(autouse=True)
def interpreted_small_tiles(monkeypatch):
    monkeypatch.setitem(ks.TILES, 32, SMALL_TILES)  # the interpreter always multiplies in float32
    with triton_interpreter():
        yield


def both_paths(z, A):
    """(value, z-gradient) of the PyTorch path and of the fused kernel on the same z and A."""
    out = []
    for fn in (sigreg_torch, ks.sigreg_fused):
        zz = z.detach().clone().requires_grad_()
        v = fn(zz, A)
        v.backward()
        out.append((v.detach(), zz.grad))
    return out


def skewed(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.randn(*shape, generator=g) + 0.5 * torch.empty(*shape).exponential_(generator=g) - 0.3


# (V, N, K, M): N=37 is no multiple of the 16-row tiles (3 row blocks, the forward's 2 programs
# each loop over rows), K=3 is below the 16-wide K step, M=33 leaves a 1-wide direction block
# (and the backward splits the directions over 2 programs), K=40 needs 3 K steps and 3 dz column
# blocks, V=3 views, M=9 fits one block (the backward writes dz directly)
SHAPES = [(1, 37, 3, 33), (3, 20, 40, 17), (2, 50, 16, 64), (2, 19, 5, 9)]


@pytest.mark.parametrize("V,N,K,M", SHAPES)
def test_float32_matches_torch_path(V, N, K, M):
    z = skewed(V, N, K, seed=N + K)
    (v_ref, g_ref), (v, g) = both_paths(z, sigreg_directions(K, M, step=N))
    # Same float32 sums, different summation order, and the recurrence instead of cos(t P) (about
    # 1e-6 relative at the last knot): 1e-5 on the value, and 1e-5 of the largest entry on the
    # gradient, leave 10x margin; a masking or indexing slip moves either by 1e-2 or more.
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


@pytest.mark.parametrize("M", [33, 9])
def test_bfloat16_matches_torch_path(M):
    V, N, K = 2, 37, 3
    z = skewed(V, N, K, seed=1).bfloat16()
    (v_ref, g_ref), (v, g) = both_paths(z, sigreg_directions(K, M, step=1))
    # Both paths upcast the same bf16 values and compute in float32, so the value agrees as
    # tightly as in float32. Both round the float32 gradient to bf16 at the end: where the two
    # float32 gradients straddle a rounding boundary they differ by one bf16 step, at most 2^-7
    # relative (8-bit significand).
    assert g.dtype == torch.bfloat16 and v.dtype == torch.float32
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2 ** -7, atol=1e-3 * g_ref.abs().max().item())


def test_deterministic_bitwise():
    z = skewed(2, 37, 16, seed=2).requires_grad_()
    A = sigreg_directions(16, 33, step=2)
    runs = []
    for _ in range(2):
        z.grad = None
        v = ks.sigreg_fused(z, A)
        v.backward()
        runs.append((v.detach(), z.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_dispatch_shapes_and_autocast():
    z = skewed(30, 12, seed=3)
    # lejepa.sigreg(fused=kernel) reaches the kernel; a 2-D z is one view
    v_fused = sigreg(z, step=4, num_slices=20, fused=ks.sigreg_fused)
    v_torch = sigreg(z, step=4, num_slices=20, fused=False)
    torch.testing.assert_close(v_fused, v_torch, rtol=1e-5, atol=0)
    torch.testing.assert_close(ks.sigreg_fused(z[None], sigreg_directions(12, 20, 4)), v_fused, rtol=0, atol=0)
    # under bf16 autocast the kernel gets bf16 z and still sums in float32
    lin = torch.nn.Linear(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = lin(z)  # (30, 8) bf16
        loss, parts = lejepa_loss(zb.view(3, 10, 8), lam=0.5, step=4, num_slices=20, fused=ks.sigreg_fused)
    loss.backward()
    assert parts["sigreg"].dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    ref = sigreg(zb.detach().view(3, 10, 8).float(), step=4, num_slices=20, fused=False)
    torch.testing.assert_close(parts["sigreg"], ref, rtol=1e-5, atol=0)
    with pytest.raises(TypeError, match="kernels/sigreg.py"):
        ks.sigreg_fused(z.double(), sigreg_directions(12, 20, 4))


# -----------------------------------------------------------------------------
# Two processes: the fused path's all-reduce and gradient follow the same DDP rule

def _ddp_worker(rank, world, init_file, out_dir, x, W0):
    os.environ["TRITON_INTERPRET"] = "1"  # a fresh process of its own
    ks.TILES[32] = SMALL_TILES
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B = x.shape[1] // world
        W = W0.clone().requires_grad_()
        v = sigreg(x[:, rank * B:(rank + 1) * B] @ W, step=6, num_slices=20, fused=ks.sigreg_fused)
        v.backward()
        gW = W.grad.clone()
        dist.all_reduce(gW)
        gW /= world  # DDP's averaging
        torch.save(dict(value=v.detach(), gW=gW), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    V, N, Kin, K, world = 2, 24, 6, 5, 2
    x, W0 = skewed(V, N, Kin, seed=7), torch.randn(Kin, K) / Kin ** 0.5
    torch.multiprocessing.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path), x, W0),
                                nprocs=world, join=True)
    W = W0.clone().requires_grad_()
    v = sigreg(x @ W, step=6, num_slices=20, fused=False)  # one process, the whole batch
    v.backward()
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r["value"], v.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(r["gW"], W.grad, rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# The real compiler: no GPU is needed to lower the kernels to an H100's machine code

def test_kernels_compile_for_sm90():
    """The interpreter runs the kernels as numpy and forgives what the compiler would not (types,
    shapes a tensor-core dot refuses): lower both kernels for sm_90 with the tile sizes a GPU run
    uses, for bf16 and float32 z, in a fresh process without TRITON_INTERPRET."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import kernels.sigreg as ks
        built = ks.compile_for_gpu(K=124, arch=90)
        assert len(built) == 4, built  # forward and backward, bf16 and float32
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("this triton install has no ptxas to compile CUDA code with")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
