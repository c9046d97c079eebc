"""Triton kernels. Each file tells one kernel's story: the math, the PyTorch reference it is checked
against, the forward and backward kernels, the autograd.Function, a check and a benchmark
(`python kernels/<name>.py`)."""
