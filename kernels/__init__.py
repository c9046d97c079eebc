"""Triton kernels. Each file tells one kernel's story: the math, the PyTorch reference it is checked
against, the forward and backward kernels, the autograd.Function, a check and a benchmark
(`python kernels/<name>.py`)."""


def fused_sigreg(device, log, tol={"torch.float32": 5e-3, "torch.bfloat16": 2e-2}):
    """The Triton SIGReg (sigreg.py), once it matches lejepa's PyTorch SIGReg on this GPU (the kernel's own
    check at startup), else None: a kernel or Triton-version problem then costs speed, never a wrong loss.
    Imported here on first use, so that a machine without triton never loads it."""
    try:
        from kernels.sigreg import check, sigreg_fused
        worst = check(device, log=lambda *a: None)
    except Exception as e:  # triton missing, a compile error on this GPU, ...
        log(f"fused SIGReg unavailable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"using the PyTorch path")
        return None
    ok = all(worst.get(k, float("inf")) < v for k, v in tol.items())
    log(f"fused SIGReg check: worst relative error {', '.join(f'{k[6:]} {v:.1e}' for k, v in worst.items())} -> "
        + ("using the Triton kernel" if ok else "MISMATCH, using the PyTorch path (run python kernels/sigreg.py)"))
    return sigreg_fused if ok else None
