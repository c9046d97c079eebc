"""
lejepa.py: the LeJEPA objective (arXiv 2511.08544) in plain PyTorch, as DALE-CT trains with it:
an invariance term that pulls every view of a slab towards the mean of its two global views, and
SIGReg, which pushes each view's batch of embeddings towards an isotropic Gaussian by comparing
the empirical characteristic function of 1,024 random 1-D projections with exp(-t^2/2).
RECIPE.md section 5 is the specification; this file is the readable definition that the Triton
kernel in kernels/sigreg.py is tested against; sigreg(..., fused=kernels.sigreg.sigreg_fused) hands the
work to that kernel (this file never imports it: the kernel builds on the pieces below).

Three things this file gets right that are easy to get wrong:
- precision: the projection and the cos/sin means run in float32 even under bf16 autocast,
  because c - phi is about 1/sqrt(N), below bf16's resolution;
- memory: directions are processed in chunks, forward and backward, so nothing of size
  (N, M, knots) ever exists (N=16384, K=1024, M=1024 runs on a CPU in seconds);
- several GPUs: value and gradient equal those of one process that sees the global batch,
  whatever the world size (the backward below says how).
"""
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# Largest intermediate of the PyTorch path, in elements (2**22 float32 = 16 MB): the chunk of
# directions is chosen so that a (V, N, chunk, knots) tensor stays under it.
CHUNK_ELEMENTS = 2 ** 22


# -----------------------------------------------------------------------------
# The pieces of the statistic, shared with kernels/sigreg.py

def sigreg_directions(K, M, step, device="cpu"):
    """M random unit directions in R^K, the same for a given step on every rank and device.
    Drawn on a CPU generator seeded by the step (a CUDA generator would draw other numbers, and
    the global RNG differs between ranks), then moved. A new set every step matters more than a large M (RECIPE.md 5)."""
    g = torch.Generator(device="cpu").manual_seed(int(step))
    A = torch.randn(K, M, generator=g, dtype=torch.float32)  # (K, M)
    A = A / A.norm(dim=0, keepdim=True).clamp_min(1e-12)  # unit columns; the clamp guards a zero draw
    return A.to(device)


def knot_table(knots=17, t_max=3.0, device="cpu", dtype=torch.float32):
    """Knots t_k = linspace(0, t_max, knots), phi_k = exp(-t_k^2 / 2) (the standard normal's
    characteristic function) and quadrature weights W_k = w_k * phi_k, with trapezoid w_k: 2 dt
    inside, dt at both ends. The statistic is even in t, so this half grid equals the
    (2 knots - 1)-knot trapezoid rule on [-t_max, t_max]."""
    if knots < 2:
        raise ValueError(f"lejepa.py: SIGReg needs at least 2 knots, got knots={knots}")
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)  # (T,)
    dt = t_max / (knots - 1)
    w = torch.full_like(t, 2 * dt)
    w[0] = w[-1] = dt
    phi = torch.exp(-0.5 * t ** 2)
    return t.to(device, dtype), phi.to(device, dtype), (w * phi).to(device, dtype)


def all_reduce_sums(sums, n_local):
    """Add the per-rank cos/sin sums (any layout) and row counts over all ranks, in one all-reduce.
    Returns (global sums, N_global as a 0-dim tensor, world size). No autograd here: the gradient
    is written by hand in the backward passes, which is where the world size enters."""
    n = sums.new_tensor(float(n_local))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, n, 1
    flat = torch.cat([sums.reshape(-1), n.reshape(1)])  # (numel + 1,)
    dist.all_reduce(flat)
    return flat[:-1].view_as(sums), flat[-1], dist.get_world_size()


def sigreg_from_sums(sums, n, phi, W):
    """SIGReg from the global sums. sums: (V, 2, M, T) cos and sin sums over the global batch;
    n: N_global; phi, W: (T,). Per view: mean_m N * sum_k W_k [(c_mk - phi_k)^2 + s_mk^2], where
    c, s are the means; then the mean over views."""
    c, s = sums[:, 0] / n, sums[:, 1] / n  # (V, M, T) empirical characteristic function
    err = (c - phi).square() + s.square()  # (V, M, T)
    return (n * (err * W).sum(-1).mean(-1)).mean()


def sigreg_grad_coefs(sums, n, t, phi, W, world, grad):
    """dSIGReg/dP_vnm = sum_k a_vmk cos(t_k P_vnm) + b_vmk sin(t_k P_vnm); returns a, b (V, M, T).

    Differentiating the formula above (c_mk = mean_n cos(t_k P_nm), so dc/dP = -t sin / N):
        dL/dP_nm = (2/M) sum_k W_k t_k [ s_mk cos(t_k P_nm) - (c_mk - phi_k) sin(t_k P_nm) ]
    (RECIPE.md 5), times 1/V for the mean over views and `grad` for the chain rule.

    Under DDP each rank back-propagates through its own rows only, and DDP then AVERAGES the
    parameter gradients over ranks. The single-process gradient is the SUM over all rows, so each
    rank must produce `world` times the per-row gradient for the average to come out right. (The
    invariance term needs no such factor: its local mean already carries 1/N_local = world/N_global.)
    tests/test_lejepa.py pins this with two real processes."""
    V, _, M, T = sums.shape
    c, s = sums[:, 0] / n, sums[:, 1] / n  # (V, M, T)
    scale = grad * (2.0 * world / (V * M))
    return scale * W * t * s, -scale * W * t * (c - phi)


# -----------------------------------------------------------------------------
# SIGReg, the PyTorch path

class SIGRegTorch(torch.autograd.Function):
    """SIGReg with a hand-written backward.

    Why not plain autograd: autograd would keep the (N, chunk, knots) cos and sin of every chunk
    for the backward, i.e. all of (N, M, knots) again, which is what chunking set out to avoid.
    The closed-form gradient needs only the 2*M*knots global sums: the backward recomputes each
    chunk's projection (one small matmul) and turns it into dz chunk by chunk, so the backward's
    memory is as bounded as the forward's. It also makes the DDP factor explicit (see
    sigreg_grad_coefs) instead of hiding it in a differentiable collective. This is the same
    structure as the fused kernel, so the two can be held equal term by term."""

    @staticmethod
    def forward(ctx, z, A, knots, t_max, chunk, given=None):
        # given: (global sums, N_global, share) computed beforehand over a batch larger than z (the
        # micro-batches of a gradient-accumulation step, see global_sums); None = z's own, all-reduced
        with torch.autocast(z.device.type, enabled=False):  # autocast would run z @ A in bf16
            if given is None:
                sums, n, share = all_reduce_sums(local_sums(z, A, knots, t_max, chunk), z.shape[1])
            else:
                sums, n, share = given
            t, phi, W = knot_table(knots, t_max, z.device, sums.dtype)
            value = sigreg_from_sums(sums, n, phi, W)
        ctx.save_for_backward(z, A, sums, n)
        ctx.settings = (knots, t_max, chunk, share)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, A, sums, n = ctx.saved_tensors
        knots, t_max, chunk, world = ctx.settings
        M = A.shape[1]
        with torch.autocast(z.device.type, enabled=False):
            cdtype = sums.dtype
            t, phi, W = knot_table(knots, t_max, z.device, cdtype)
            a, b = sigreg_grad_coefs(sums, n, t, phi, W, world, grad.to(cdtype))  # (V, M, T) each
            zc, Ac = z.to(cdtype), A.to(cdtype)
            dz = torch.zeros_like(zc)  # (V, N, K)
            for m0 in range(0, M, chunk):
                Am = Ac[:, m0:m0 + chunk]  # (K, mc)
                tP = (zc @ Am).unsqueeze(-1) * t  # (V, N, mc, T), recomputed rather than stored
                dP = ((torch.cos(tP) * a[:, None, m0:m0 + chunk]).sum(-1)
                      + (torch.sin(tP) * b[:, None, m0:m0 + chunk]).sum(-1))  # (V, N, mc)
                dz += dP @ Am.T  # (V, N, K)
        return dz.to(z.dtype), None, None, None, None, None


def local_sums(z, A, knots=17, t_max=3.0, chunk=None):
    """This process's cos and sin sums of z (V, N, K) along A (K, M): (V, 2, M, knots), no autograd.
    float64 in, float64 out (for gradcheck); anything else computes in float32 (RECIPE.md 5)."""
    V, N, K = z.shape
    M = A.shape[1]
    chunk = chunk or default_chunk(V, N, M, knots)
    cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        t = knot_table(knots, t_max, z.device, cdtype)[0]
        zc, Ac = z.to(cdtype), A.to(cdtype)
        sums = torch.empty(V, 2, M, knots, dtype=cdtype, device=z.device)
        for m0 in range(0, M, chunk):
            tP = (zc @ Ac[:, m0:m0 + chunk]).unsqueeze(-1) * t  # (V, N, mc, T)
            sums[:, 0, m0:m0 + chunk] = torch.cos(tP).sum(1)  # (V, mc, T)
            sums[:, 1, m0:m0 + chunk] = torch.sin(tP).sum(1)
    return sums


def global_sums(zs, step, num_slices=1024, knots=17, t_max=3.0):
    """SIGReg's statistics over several micro-batches zs = [(V, n_i, K), ...] and all ranks: what
    `given` takes, so that with gradient accumulation SIGReg still sees the whole global batch.
    The share (world x micro-batches) scales each row's gradient so that the accumulated, DDP-averaged
    gradient equals one process's on the global batch (see sigreg_grad_coefs)."""
    A = sigreg_directions(zs[0].shape[-1], num_slices, step, zs[0].device)
    sums = sum(local_sums(z, A, knots, t_max) for z in zs)  # (V, 2, M, T)
    sums, n, world = all_reduce_sums(sums, sum(z.shape[1] for z in zs))
    return sums, n, world * len(zs)


def default_chunk(V, N, M, knots):
    """Directions per chunk so that one (V, N, chunk, knots) intermediate holds CHUNK_ELEMENTS."""
    return max(1, min(M, CHUNK_ELEMENTS // max(1, V * N * knots)))


def sigreg_torch(z, A, knots=17, t_max=3.0, chunk=None, given=None):
    """SIGReg of z (N, K) or (V, N, K) along the columns of A (K, M), averaged over views."""
    z3 = z.unsqueeze(0) if z.dim() == 2 else z  # (V, N, K)
    chunk = chunk or default_chunk(*z3.shape[:2], A.shape[1], knots)
    return SIGRegTorch.apply(z3, A, knots, t_max, int(chunk), given)


# -----------------------------------------------------------------------------
# The public API

def sigreg(z, step, num_slices=1024, knots=17, t_max=3.0, fused=None, chunk=None, given=None):
    """SIGReg (RECIPE.md 5) of z (N, K), or of each view of z (V, N, K) averaged over views, along
    num_slices directions drawn for this step. Returns a 0-dim float32 tensor (float64 for float64 z).
    fused: a fused implementation of sigreg_torch's statistic (kernels.sigreg.sigreg_fused: CUDA, or a CPU
    under TRITON_INTERPRET=1 for tests), or None/False for the PyTorch path; train.py passes the kernel
    once its check passes on this GPU.
    chunk: directions per chunk on the PyTorch path (None = bounded by CHUNK_ELEMENTS).
    Under torch.distributed the batch is the global one (all ranks' rows) and each rank's gradient
    is scaled so that DDP's gradient averaging yields the single-process gradient. Call it on
    every rank with the same step. With gradient accumulation, pass given=global_sums(...) of all
    the step's micro-batches so that SIGReg's batch is still the global one (train.py does)."""
    if z.dim() not in (2, 3):
        raise ValueError(f"lejepa.py: sigreg expects z of shape (N, K) or (V, N, K), got {tuple(z.shape)}")
    A = sigreg_directions(z.shape[-1], num_slices, step, z.device)  # (K, M)
    if fused and given is None:  # the kernel computes its own sums
        return fused(z, A, knots=knots, t_max=t_max)
    return sigreg_torch(z, A, knots, t_max, chunk, given)


def lejepa_loss(z, n_global=2, lam=0.02, step=0, **sigreg_kw):
    """LeJEPA loss of projector outputs z (V, B, K), the first n_global views being the global ones.
    inv = mean over views, samples and dims of (mu - z_v)^2 with mu the mean of the global views
    (no stop-gradient: LeJEPA needs none); loss = (1 - lam) * inv + lam * SIGReg (mean over views).
    Returns (loss, {"inv", "sigreg"}) with the parts as detached 0-dim tensors (no GPU sync;
    call float() when logging)."""
    if z.dim() != 3 or not 1 <= n_global <= z.shape[0]:
        raise ValueError(f"lejepa.py: lejepa_loss expects z (V, B, K) with V >= n_global={n_global}, "
                         f"got {tuple(z.shape)}")
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # a bf16 mean of squares is coarse
    mu = zf[:n_global].mean(0)  # (B, K)
    inv = (mu - zf).square().mean()
    sig = sigreg(z, step, **sigreg_kw)
    loss = (1 - lam) * inv + lam * sig
    return loss, {"inv": inv.detach(), "sigreg": sig.detach()}
