"""
kernels/sigreg.py: SIGReg forward and backward fused in Triton.

The PyTorch definition in lejepa.py computes P = z A (N x M), then cos and sin of t_k P for 17
knots: at N=4096, M=1024 every such (N, M, 17) intermediate is 285 MB and a training step moves
about 6 GB (RECIPE.md 5). Here a program computes a tile of P in registers, turns it into the 16
per-knot cos/sin row sums with ONE sin and cos per element, and never writes P. The backward
recomputes the tile instead of storing it and multiplies straight into dz. What reaches memory:
z, A, 2*M*16 sums per view, dz.

Read in order: 1. the math, 2. the reference, 3. the forward kernel, 4. the backward kernel, 5. the
autograd.Function, 6. the check, 7. the benchmark (`python kernels/sigreg.py` checks; on a GPU, benchmarks).
"""
import os
import sys
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # repo root importable; without a GPU, the interpreter, which must be chosen before `import triton`
    sys.path.insert(0, str(ROOT))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import PEAK_BF16  # noqa: E402
from lejepa import (all_reduce_sums, knot_table, sigreg_directions, sigreg_from_sums,  # noqa: E402
                    sigreg_grad_coefs, sigreg_torch)

# True when TRITON_INTERPRET=1 was set before this file was imported: the kernels then run on CPU
# tensors through numpy. The interpreter's tl.dot mishandles bf16 operands, so it gets float32 ones.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile sizes by operand width: first guesses for an H100 from ptxas's sm_90 register report, to be
# tuned with the benchmark; float32 operands take twice the registers, hence the shorter K steps.
# Launches ask for fp fusion (a * b + c as one FMA) explicitly: the rotation below is built of FMAs.
TILES = {  # m: directions per tile, n: rows of z per tile, k: K step, d: dz columns per program
    16: dict(fwd_m=64, fwd_n=32, fwd_warps=4, bwd_m=64, bwd_n=64, bwd_warps=8, max_k=64, max_d=128),
    32: dict(fwd_m=64, fwd_n=32, fwd_warps=4, bwd_m=64, bwd_n=32, bwd_warps=8, max_k=16, max_d=128),
}


# -----------------------------------------------------------------------------
# 1. The math (RECIPE.md 5)
#
# For one view, with P = z A (N, M), knots t_k = k dt (k = 0..16, dt = 3/16), phi_k = exp(-t_k^2/2)
# and quadrature weights W_k (lejepa.knot_table):
#   c_mk = (1/N) sum_n cos(t_k P_nm),  s_mk = (1/N) sum_n sin(t_k P_nm)   (n over all ranks)
#   SIGReg = (N/M) sum_m sum_k W_k [ (c_mk - phi_k)^2 + s_mk^2 ]   (then the mean over views)
#   dSIGReg/dP_nm = sum_k a_mk cos(t_k P_nm) + b_mk sin(t_k P_nm),
#       a_mk = (2/M) W_k t_k s_mk,  b_mk = -(2/M) W_k t_k (c_mk - phi_k)
#   dz = dP A^T.
# (lejepa.sigreg_grad_coefs also folds in 1/V, the incoming gradient and DDP's world size.)
# Three facts shape the kernels:
# - the knots are equispaced, so with theta = dt P the angle-addition rule
#     cos((k+1) theta) = cos(k theta) cos(theta) - sin(k theta) sin(theta)
#     sin((k+1) theta) = sin(k theta) cos(theta) + cos(k theta) sin(theta)
#   gives every knot from one sin and one cos (4 multiply-adds a knot, not 2 trig calls); being a
#   rotation it holds float32 error better than the cheaper Chebyshev recurrence (RECIPE.md 5);
# - the t = 0 knot contributes W_0 [(cos 0 - 1)^2 + 0] = 0 to the value and t_0 = 0 to the
#   gradient, so the kernels run over the 16 knots k = 1..16 only;
# - the value needs only the 2 x M x 16 sums, and the gradient only those sums and P, which is
#   cheap to recompute (a K-long dot product per element), so nothing N x M is ever stored.
#
# 2. The reference is lejepa.sigreg_torch (imported above): same sums, same all-reduce, same
# closed-form backward, written with torch ops over chunks of directions.


def _next_pow2(x):
    return 1 << (max(1, int(x)) - 1).bit_length()


# -----------------------------------------------------------------------------
# 3. The forward kernel
#
# Both kernels work on tiles of P^T = A^T z^T (directions along rows, samples along columns): Hopper's
# tensor-core result puts each warp on a band of rows, so the forward's sum over samples stays inside
# a warp (shuffles, no shared memory) and the backward's per-direction coefficients are few per thread.

@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b in float32. Without DOT_FP32, a and b go to the tensor cores as 16-bit; with it
    (float32 z, or the interpreter) they are upcast, and a GPU reads them as tf32 (10-bit mantissa)."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _project_t(z_ptr, a_ptr, rows, cols, N, K, M, s_zn, s_zk, s_ak, s_am,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile P^T[cols, rows] = A[:, cols]^T @ z[rows, :]^T in float32 (cols:
    directions, rows: samples). Whatever lies past N, M or K is loaded as 0, so padding is exactly 0."""
    pt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        at = tl.load(a_ptr + cols[:, None] * s_am + ks[None, :] * s_ak,
                     mask=(cols[:, None] < M) & (ks[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        zt = tl.load(z_ptr + ks[:, None] * s_zk + rows[None, :] * s_zn,
                     mask=(ks[:, None] < K) & (rows[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
        pt = _dot(at, zt, pt, DOT_FP32)
    return pt


@triton.jit
def _sigreg_fwd_kernel(z_ptr, a_ptr, part_ptr, N, K, M, s_zv, s_zn, s_zk, s_ak, s_am, dt,
                       T1: tl.constexpr, T1_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid (G, M / BLOCK_M, V). Program (g, j, v) takes the directions of block j and the row blocks
    g, g + G, g + 2G, ... of view v, and writes its cos and sin sums over those rows to part[g, v, 0 or
    1, direction, knot] (G, V, 2, M, T1). The host adds the G partials with torch.sum in a fixed order
    (no float atomics: bitwise reproducible); G, a few per SM, keeps the partials small."""
    g, pid_m, v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G, V = tl.num_programs(0), tl.num_programs(2)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    knot = tl.arange(0, T1_PAD)[None, :]  # (1, T1_PAD): column k holds knot t_{k+1}
    acc_c = tl.zeros((BLOCK_M, T1_PAD), dtype=tl.float32)  # sums over rows of cos(t P)
    acc_s = tl.zeros((BLOCK_M, T1_PAD), dtype=tl.float32)
    for row0 in range(g * BLOCK_N, N, G * BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        pt = _project_t(z_ptr + v * s_zv, a_ptr, rows, cols, N, K, M, s_zn, s_zk, s_ak, s_am,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)  # (BLOCK_M, BLOCK_N)
        # rows past N have P = 0, so cos = 1 and sin = 0 exactly at every knot: subtract their count
        n_pad = tl.maximum(row0 + BLOCK_N - N, 0).to(tl.float32)
        theta = pt * dt
        c1, s1 = tl.cos(theta), tl.sin(theta)
        ck, sk = c1, s1
        for k in tl.static_range(T1):  # ck = cos((k+1) theta), sk = sin((k+1) theta)
            # registers cannot be indexed, so column k of the accumulators is picked by a mask
            acc_c = tl.where(knot == k, acc_c + (tl.sum(ck, axis=1) - n_pad)[:, None], acc_c)
            acc_s = tl.where(knot == k, acc_s + tl.sum(sk, axis=1)[:, None], acc_s)
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
    out = part_ptr + ((g * V + v) * 2 * M + cols[:, None]) * T1 + knot  # (BLOCK_M, T1_PAD)
    mask = (cols[:, None] < M) & (knot < T1)
    tl.store(out, acc_c, mask=mask)
    tl.store(out + M * T1, acc_s, mask=mask)


def _splits(blocks, other_programs, device):
    """Programs to split `blocks` over, for about four per SM in all (2 in the interpreter: tests loop)."""
    if device.type != "cuda":
        return min(blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(4 * sms, other_programs)))


def _block(K, cap):
    return min(cap, max(16, _next_pow2(K)))  # tl.dot wants every dimension >= 16


def _forward_sums(z, A_dot, T1, dt, dot_fp32):
    """This rank's cos/sin sums over the rows of z (V, N, K), knots 1..T1: (V, 2, M, T1) float32."""
    V, N, K = z.shape
    M = A_dot.shape[1]
    tiles = TILES[32 if dot_fp32 else 16]
    n_blocks, m_blocks = triton.cdiv(N, tiles["fwd_n"]), triton.cdiv(M, tiles["fwd_m"])
    G = _splits(n_blocks, m_blocks * V, z.device)
    part = torch.empty(G, V, 2, M, T1, device=z.device, dtype=torch.float32)
    _sigreg_fwd_kernel[(G, m_blocks, V)](
        z, A_dot, part, N, K, M, *z.stride(), *A_dot.stride(), dt,
        T1=T1, T1_PAD=_next_pow2(T1), BLOCK_M=tiles["fwd_m"], BLOCK_N=tiles["fwd_n"],
        BLOCK_K=_block(K, tiles["max_k"]), DOT_FP32=dot_fp32, num_warps=tiles["fwd_warps"], enable_fp_fusion=True)
    return part.sum(0)  # (V, 2, M, T1), the second, deterministic reduction


# -----------------------------------------------------------------------------
# 4. The backward kernel

@triton.jit
def _sigreg_bwd_kernel(z_ptr, a_ptr, coef_ptr, dz_ptr, N, K, M, S, s_zv, s_zn, s_zk, s_ak, s_am,
                       s_ds, s_dv, s_dn, s_dk, dt, T1: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_FP32: tl.constexpr):
    """Grid (N / BLOCK_N, K / BLOCK_D, V * S). Program (i, j, v * S + s) owns the dz tile of view v,
    row block i, column block j, and the direction blocks s, s + S, ...: for each it recomputes the
    P^T tile, turns it into dP^T with the coefficients a, b (coef: (V, 2, T1, M)) and accumulates
    dz^T[column block j] += A[column block j, directions] @ dP^T in registers (attention's pattern:
    S = Q K^T, P = f(S), O += P V). It writes dz_part[s, v] (S, V, N, K) once and the host adds the
    S slabs in a fixed order: deterministic. S > 1 splits the directions so that a small batch still
    fills the GPU. dz's columns are tiled since a (K, BLOCK_N) float32 accumulator for large K would
    not fit in registers: K <= BLOCK_D (RECIPE.md 5's K = 124) recomputes nothing, a larger K
    recomputes P and the trigonometry per column block rather than write N x M dP for cuBLAS."""
    pid_n, pid_d, pid_vs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    v, s = pid_vs // S, pid_vs % S
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dz^T tile
    for m0 in range(s * BLOCK_M, M, S * BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        pt = _project_t(z_ptr + v * s_zv, a_ptr, rows, cols, N, K, M, s_zn, s_zk, s_ak, s_am,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)  # (BLOCK_M, BLOCK_N), recomputed
        theta = pt * dt
        c1, s1 = tl.cos(theta), tl.sin(theta)
        ck, sk = c1, s1
        dpt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        coef = coef_ptr + v * 2 * T1 * M + cols  # (BLOCK_M,) pointers to a[v, knot 0, cols]
        for k in tl.static_range(T1):
            a_k = tl.load(coef + k * M, mask=col_ok, other=0.0)  # padded directions get 0
            b_k = tl.load(coef + (T1 + k) * M, mask=col_ok, other=0.0)
            dpt += ck * a_k[:, None] + sk * b_k[:, None]
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        ad = tl.load(a_ptr + dcols[:, None] * s_ak + cols[None, :] * s_am,
                     mask=(dcols[:, None] < K) & col_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        acc = _dot(ad, dpt.to(ad.dtype), acc, DOT_FP32)
    tl.store(dz_ptr + s * s_ds + v * s_dv + rows[None, :] * s_dn + dcols[:, None] * s_dk,
             acc.to(dz_ptr.dtype.element_ty), mask=(rows[None, :] < N) & (dcols[:, None] < K))


def _backward_dz(z, A_dot, coef, dt, dot_fp32):
    """dz (V, N, K) in z's dtype from z, A and the coefficients (V, 2, T1, M) float32."""
    V, N, K = z.shape
    M = A_dot.shape[1]
    tiles = TILES[32 if dot_fp32 else 16]
    block_d = _block(K, tiles["max_d"])
    grid_nd = triton.cdiv(N, tiles["bwd_n"]) * triton.cdiv(K, block_d)
    S = _splits(triton.cdiv(M, tiles["bwd_m"]), grid_nd * V, z.device)
    # one slab: straight into z's dtype; several: float32 slabs, added below
    dz = torch.empty(S, V, N, K, device=z.device, dtype=z.dtype if S == 1 else torch.float32)
    _sigreg_bwd_kernel[(triton.cdiv(N, tiles["bwd_n"]), triton.cdiv(K, block_d), V * S)](
        z, A_dot, coef, dz, N, K, M, S, *z.stride(), *A_dot.stride(), *dz.stride(), dt,
        T1=coef.shape[2], BLOCK_M=tiles["bwd_m"], BLOCK_N=tiles["bwd_n"],
        BLOCK_K=_block(K, tiles["max_k"]), BLOCK_D=block_d, DOT_FP32=dot_fp32, num_warps=tiles["bwd_warps"],
        enable_fp_fusion=True)
    return dz[0] if S == 1 else dz.sum(0).to(z.dtype)  # (V, N, K)


# -----------------------------------------------------------------------------
# 5. The autograd.Function

class SIGRegFused(torch.autograd.Function):
    """Forward kernel -> all-reduce of the sums over ranks -> value; backward kernel from the global
    sums. The all-reduce, value and gradient coefficients are lejepa.py's, shared by both paths."""

    @staticmethod
    def forward(ctx, z, A, knots, t_max):
        V, N, K = z.shape
        dot_fp32 = INTERPRET or z.dtype == torch.float32
        # the dot's operands: both float32, or both z's 16-bit type as the tensor cores take them
        A_dot = A.float() if dot_fp32 else A.to(z.dtype)  # (K, M)
        with torch.autocast(z.device.type, enabled=False):  # the little host math stays float32
            t, phi, W = (x[1:] for x in knot_table(knots, t_max, z.device, torch.float32))  # skip t = 0
            dt = t_max / (knots - 1)
            sums = _forward_sums(z, A_dot, knots - 1, dt, dot_fp32)  # (V, 2, M, T1) this rank's rows
            sums, n, world = all_reduce_sums(sums, N)  # (V, 2, M, T1) over the global batch
            value = sigreg_from_sums(sums, n, phi, W)
        ctx.save_for_backward(z, A_dot, sums, n, t, phi, W)
        ctx.settings = (dt, world, dot_fp32)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, A_dot, sums, n, t, phi, W = ctx.saved_tensors
        dt, world, dot_fp32 = ctx.settings
        with torch.autocast(z.device.type, enabled=False):
            a, b = sigreg_grad_coefs(sums, n, t, phi, W, world, grad.float())  # (V, M, T1) each
            coef = torch.stack([a, b], 1).transpose(2, 3).contiguous()  # (V, 2, T1, M)
            dz = _backward_dz(z, A_dot, coef, dt, dot_fp32)  # (V, N, K)
        return dz, None, None, None


def sigreg_fused(z, A, knots=17, t_max=3.0):
    """SIGReg of z (N, K) or (V, N, K) along the unit columns of A (K, M) float32, averaged over views:
    a 0-dim float32 tensor with lejepa.sigreg_torch's value and gradient (all-reduced over ranks under
    torch.distributed). z may be float32, bfloat16 or float16; projection, sums and value are float32."""
    if not (z.is_cuda or INTERPRET):
        raise RuntimeError("kernels/sigreg.py: the fused kernel needs a CUDA tensor (on a CPU, for tests: set "
                           "TRITON_INTERPRET=1 before importing kernels.sigreg) or use lejepa.sigreg(..., fused=False)")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"kernels/sigreg.py: sigreg_fused takes float32, bfloat16 or float16 z, got {z.dtype}; "
                        "use lejepa.sigreg(..., fused=False) for float64")
    if z.dim() not in (2, 3) or A.dim() != 2 or A.shape[0] != z.shape[-1]:
        raise ValueError(f"kernels/sigreg.py: expected z (N, K) or (V, N, K) and A (K, M), got z "
                         f"{tuple(z.shape)} and A {tuple(A.shape)}")
    if z.numel() >= 2 ** 31:
        raise ValueError(f"kernels/sigreg.py: z has {z.numel()} elements, past int32 indexing; split the views")
    z3 = z.unsqueeze(0) if z.dim() == 2 else z  # (V, N, K)
    return SIGRegFused.apply(z3, A.to(z.device), knots, t_max)


# -----------------------------------------------------------------------------
# 6. The check

def check(device, shapes=((1, 37, 3, 33), (2, 300, 124, 256)), dtypes=(torch.float32, torch.bfloat16), log=print):
    """Fused vs lejepa.sigreg_torch on random non-Gaussian inputs: value, z-gradient, determinism.
    Returns the worst relative errors. tests/test_sigreg_kernel.py holds the same to tolerances."""
    worst = {}
    for (V, N, K, M) in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(N * K + M)
            z = (0.7 * torch.randn(V, N, K, generator=gen) + 0.3).to(device, dtype).requires_grad_()
            A = sigreg_directions(K, M, step=K, device=device)
            grads, values = [], []
            for fn in (sigreg_torch, sigreg_fused, sigreg_fused):
                v = fn(z, A)
                values.append(v.detach())
                grads.append(torch.autograd.grad(v, z)[0].float())
            e_val = ((values[1] - values[0]).abs() / values[0].abs()).item()
            e_grad = ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item()
            same = torch.equal(values[1], values[2]) and torch.equal(grads[1], grads[2])
            log(f"V={V} N={N:5d} K={K:4d} M={M:4d} {str(dtype):15s} value {values[0].item():9.4f} "
                  f"rel err {e_val:.1e}  grad rel err {e_grad:.1e}  bitwise repeatable {same}")
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), e_val, e_grad, 0.0 if same else float("inf"))
    return worst


def compile_for_gpu(K=124, arch=90):
    """Lower both kernels, for bf16 and float32 z with a GPU run's tiles, to machine code for compute
    capability `arch` (90: H100) with triton's bundled ptxas, no GPU: it catches what the interpreter
    forgives. Needs a process without TRITON_INTERPRET. Returns {name: shared memory bytes}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if INTERPRET:
        raise RuntimeError("kernels/sigreg.py: compile_for_gpu needs the kernels defined without TRITON_INTERPRET")
    out = {}
    for zt, fp32 in (("bf16", False), ("fp32", True)):
        tiles = TILES[32 if fp32 else 16]
        ptrs = dict(z_ptr="*" + zt, a_ptr="*fp32" if fp32 else "*" + zt, part_ptr="*fp32", coef_ptr="*fp32",
                    dz_ptr="*" + zt)
        jobs = {"forward": (_sigreg_fwd_kernel, "fwd_", dict(T1_PAD=16)),
                "backward": (_sigreg_bwd_kernel, "bwd_", dict(BLOCK_D=_block(K, tiles["max_d"])))}
        for name, (fn, pre, extra) in jobs.items():
            consts = dict(T1=16, BLOCK_M=tiles[pre + "m"], BLOCK_N=tiles[pre + "n"], BLOCK_K=_block(K, tiles["max_k"]),
                          DOT_FP32=fp32, **extra)
            sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a == "dt" else "i32") for a in fn.arg_names}
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": tiles[pre + "warps"], "enable_fp_fusion": True})
            assert len(k.asm["cubin"]) > 0
            out[f"{name} {zt} K={K} sm_{arch}"] = k.metadata.shared
    return out


# -----------------------------------------------------------------------------
# 7. The benchmark

def sigreg_autograd(z, A, knots=17, t_max=3.0):
    """The formula as first written, autograd doing the gradient (one process, (N, M, knots) tensors)."""
    t, phi, W = knot_table(knots, t_max, z.device)
    tP = (z.float() @ A).unsqueeze(-1) * t  # (N, M, T)
    c, s = torch.cos(tP).mean(0), torch.sin(tP).mean(0)  # (M, T)
    return z.shape[0] * (((c - phi) ** 2 + s ** 2) * W).sum(-1).mean()


# Peak rates for the cost bound: NVIDIA H100/H200 datasheets; 128 fp32, 16 sin/cos per SM and clock (CUDA C++
# Programming Guide, compute capability 9.0). Tensor FLOP/s from common.PEAK_BF16 where it has the card.
PEAKS = {  # name fragment: (bf16 tensor FLOP/s, fp32 instr/s, sin+cos/s, HBM bytes/s), at the boost clock
    "H100 PCIe": (PEAK_BF16["H100 PCIe"], 114 * 128 * 1.755e9, 114 * 16 * 1.755e9, 2.0e12),
    "H100": (PEAK_BF16["H100"], 132 * 128 * 1.98e9, 132 * 16 * 1.98e9, 3.35e12),
    "H200": (PEAK_BF16["H200"], 132 * 128 * 1.98e9, 132 * 16 * 1.98e9, 4.8e12),
}


def cost_bound(N, K, M, knots, elem_bytes, peaks):
    """Lower bound on fused forward+backward time, and the resource that sets it. Per element of P and
    pass: 1 sin + 1 cos, 6 float32 instructions per knot (4 rotation, 2 row-sum adds or dP FMAs).
    Matmuls: P, P again and dP A^T. Bytes: z read twice, dz written, A negligible."""
    T1, E = knots - 1, N * M
    times = {"tensor": 3 * 2 * N * K * M / peaks[0], "fp32": 2 * 6 * T1 * E / peaks[1],
             "sfu": 4 * E / peaks[2], "memory": 3 * N * K * elem_bytes / peaks[3]}
    binding = max(times, key=times.get)
    return times[binding], binding


def benchmark(Ns=(512, 4096, 16384, 65536), Ks=(124, 1024), M=1024, knots=17):
    """Forward+backward ms on bf16 z: fused, lejepa.sigreg_torch, the naive formula eager and compiled."""
    from triton.testing import do_bench
    name = torch.cuda.get_device_name()
    peaks = next((p for frag, p in PEAKS.items() if frag in name), None)
    methods = {"fused": sigreg_fused, "torch": sigreg_torch, "autograd": sigreg_autograd,
               "compiled": torch.compile(sigreg_autograd, dynamic=False)}
    print(f"\nforward+backward ms, M={M}, {knots} knots, z bf16, on {name}" + ("" if peaks else ", not in PEAKS"))
    print(f"{'N':>6} {'K':>5} " + " ".join(f"{m:>10}" for m in methods) + "  bound ms  resource  fused/bound")
    for K in Ks:
        A = sigreg_directions(K, M, step=0, device="cuda")
        for N in Ns:
            z = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            times = []
            for fn in methods.values():
                try:
                    times.append(do_bench(lambda fn=fn: fn(z, A, knots).backward(), warmup=5, rep=50, grad_to_none=[z]))
                except Exception as e:  # out of memory, or a compiler failure: report it, go on
                    times.append(type(e).__name__[:10])
                    torch.cuda.empty_cache()
            line = f"{N:6d} {K:5d} " + " ".join(f"{t:10.3f}" if isinstance(t, float) else f"{t:>10}" for t in times)
            if peaks is not None and isinstance(times[0], float):
                bound, what = cost_bound(N, K, M, knots, 2, peaks)
                line += f"  {bound * 1e3:8.3f}  {what:>8}  {bound * 1e3 / times[0]:11.1%}"
            print(line)


if __name__ == "__main__":
    # tolerances on the relative errors: a GPU multiplies in tf32 or bf16, the interpreter in float32
    if torch.cuda.is_available():
        worst = check("cuda", shapes=((1, 37, 3, 33), (2, 300, 124, 256), (10, 640, 124, 1024), (1, 2048, 1024, 1024)))
        tol = {"torch.float32": 5e-3, "torch.bfloat16": 2e-2}
    else:
        print("No CUDA GPU: checking the kernels through Triton's interpreter on tiny shapes, no benchmark.")
        TILES[32] = dict(fwd_m=16, fwd_n=16, fwd_warps=1, bwd_m=16, bwd_n=16, bwd_warps=1, max_k=16, max_d=16)
        worst = check("cpu", shapes=((1, 37, 3, 33), (2, 20, 40, 17)))
        tol = {"torch.float32": 1e-5, "torch.bfloat16": 1e-2}
    failed = {k: v for k, v in worst.items() if v > tol[k]}
    print("check:", "FAILED " + str(failed) if failed else "ok", "(worst relative errors", worst, ")")
    if failed:
        sys.exit(1)
    if torch.cuda.is_available():
        benchmark()
    else:  # the compiler, in a process of its own without the interpreter
        import subprocess
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = "import kernels.sigreg as k\nprint('compiled; shared memory bytes:', k.compile_for_gpu())"
        sys.exit(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode)
