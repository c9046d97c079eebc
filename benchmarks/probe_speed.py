"""
How fast probe.py runs, and that training its whole probe grid in one pass changes no probe.

    python benchmarks/probe_speed.py --vit=tiny --img_size=64 [--data=data/prepared --steps=200 --device=cuda]

Prints feature extraction slices/s (the prepared train split's slices when --data holds one, else random HU
slices), then the seconds for the release's grid (3 poolings x 6 lrs) in one pass against each pooling trained alone at
the grid's first lr, on the same random bags and steps, with the largest weight difference between a lone probe
and its place in the grid. Times are the best of --repeats: on a shared machine, the least disturbed run.
"""
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import probe  # noqa: E402
from common import NONNEG, at_least, device_name, one_of, parse_config, pick_device, setting  # noqa: E402
from model import PATCH, VIT_SIZES, build_vit  # noqa: E402
from prepare import PreparedError, open_split  # noqa: E402


@dataclass
class BenchConfig:
    vit: str = setting("tiny", one_of(*VIT_SIZES))  # backbone whose extraction speed is measured
    img_size: int = setting(256, at_least(PATCH))   # slices resized to this, as probe.py --img_size
    feat_batch: int = setting(64, at_least(1))      # slices per forward pass; 4 batches are timed
    data: str = "data/prepared"                     # prepared folder whose train slices are used, if any
    steps: int = setting(200, at_least(1))          # probe SGD steps per timed run
    repeats: int = setting(3, at_least(1))          # timed runs of each; the fastest counts
    device: str = "auto"
    seed: int = setting(0, NONNEG)

    def problems(self):
        wrong = self.img_size % PATCH
        return [f"--img_size={self.img_size}: must be a multiple of the patch size {PATCH}"] if wrong else []


def largest_difference(grid, p, alone):
    """Largest |difference| between the final weights of probe (pooling p, first lr) in a grid run and the
    same probe trained alone."""
    a, b = grid.states[-1], alone.states[-1]
    diffs = [a["W"][p, 0] - b["W"][0, 0], a["b"][p, 0] - b["b"][0, 0]]
    if grid.poolings[p] == "attn":
        diffs.append(a["q"][0] - b["q"][0])
    return max(float(d.abs().max()) for d in diffs)


def grid_vs_single(D=192, n_vol=64, slices=48, steps=100, C=18, device="cpu", seed=0, repeats=3):
    """Seconds for the 3 x 6 grid in one pass and for each pooling alone at the first lr (same random bags and
    steps, best of `repeats`), and how far each lone probe is from its place in the grid."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(slices // 2, slices + 1, (n_vol,), generator=g)
    start = torch.cumsum(count, 0) - count
    feats = torch.randn(int(count.sum()), D, generator=g)
    labels = (torch.rand(n_vol, C, generator=g) < 0.3).float()
    bags = probe.Bags(feats.to(device), start.to(device), count.to(device), labels.to(device))

    def timed(poolings, lrs):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            run = probe.train_probe_grid(bags, bags, poolings, lrs, steps, evals=1, seed=seed, log=lambda *a: None)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, run

    timed(("avg",), probe.LRS[:1])  # warm-up
    grid_s, grid = timed(probe.POOLINGS, probe.LRS)
    single = {p: timed((p,), probe.LRS[:1]) for p in probe.POOLINGS}
    single_s = {p: s for p, (s, _) in single.items()}
    max_diff = max(largest_difference(grid, i, run) for i, (_, run) in enumerate(single.values()))
    return {"grid_s": grid_s, "single_s": single_s,
            "grid_over_single": float(grid_s / np.mean(list(single_s.values()))),
            "speedup_vs_sequential": len(probe.LRS) * sum(single_s.values()) / grid_s,  # vs the 18 runs in turn
            "max_weight_diff": max_diff}


def main(argv):
    cfg = parse_config(BenchConfig, argv, "benchmarks/probe_speed.py")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vit = build_vit(cfg.vit, img_size=cfg.img_size)
    try:
        slices = open_split(cfg.data, "train").slices[:4 * cfg.feat_batch]
    except PreparedError:
        shape = (4 * cfg.feat_batch, cfg.img_size, cfg.img_size)
        slices = np.random.default_rng(0).integers(-1000, 1000, shape, dtype=np.int16)
    probe.extract_features(vit, slices[:cfg.feat_batch], cfg.img_size, cfg.feat_batch, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    probe.extract_features(vit, slices, cfg.img_size, cfg.feat_batch, device)
    rate = len(slices) / (time.perf_counter() - t)
    print(f"feature extraction: ViT-{cfg.vit} at {cfg.img_size} px on {device_name(device)}: {rate:.1f} slices/s")
    r = grid_vs_single(vit.embed_dim, steps=cfg.steps, device=device, seed=cfg.seed, repeats=cfg.repeats)
    P, L = len(probe.POOLINGS), len(probe.LRS)
    print(f"probe grid ({P} poolings x {L} lrs, {cfg.steps} steps): {r['grid_s']:.2f} s; one probe alone: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in r["single_s"].items())
          + f"; grid/single {r['grid_over_single']:.2f}x, {r['speedup_vs_sequential']:.1f}x faster than {P * L} runs; "
          f"largest weight difference grid vs alone {r['max_weight_diff']:.1e}")
    return {"slices_per_s": rate, **r}


if __name__ == "__main__":
    main(sys.argv[1:])
