"""
train.py: depth-aware LeJEPA pretraining of a ViT on chest-CT slabs (DALE-CT, arXiv 2606.07775).

A sample is a slab: the slices of one volume within +-6 mm of a centre slice. Two global views
come from the centre slice and eight local views from slab slices drawn independently, so the
invariance term ties neighbouring slices to the centre one (DESIGN.md 3). The loss is LeJEPA
(invariance + SIGReg, DESIGN.md 5) plus, for variants 1S/2S, dense auxiliary heads that predict
the anatomy / abnormality fractions of each crop and each 16x16 patch (DESIGN.md 4).

    python phantom.py && python prepare.py --size=64 --mask_size=64    # demo data -> data/prepared
    python train.py --config=phantom                                  # CPU demo: a few minutes
    python train.py --config=phantom --max_steps=50 --variant=1s      # presets + overrides
    torchrun --nproc_per_node=8 train.py --config=dale_ct_2s          # the paper's run
    python train.py --config=dale_ct_2s --micro_batch=32              # 1 GPU, 16 accumulation steps
    python train.py --config=phantom --resume=auto                    # continue from out_dir/ckpt.pt
    python train.py --config=phantom --bench_data=20                  # data vs model throughput

Data path: the CPU decides everything random about a micro-batch (which volume, which slices,
crop boxes, flips, gamma, blur) and copies the raw int16 slices and uint8/uint16 masks out of
the memmaps; the device then crops, resizes, augments and derives the soft targets for the whole
micro-batch at once (a few batched grid_sample calls, no per-sample loops).
"""
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from dataclasses import replace as dataclass_replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import lejepa
import prepare
from lejepa import lejepa_loss
from model import PATCH, VIT_SIZES, DenseHeads, Projector, build_vit, vit_flops_per_image

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


# -----------------------------------------------------------------------------
# Configuration: defaults are DALE-CT-2S at full scale; presets live in config/*.json.

@dataclass
class Config:
    # data and output
    data: str = "data/prepared"       # folder written by prepare.py (DESIGN.md 1)
    split: str = "train"              # pretraining sees CT-RATE train only (DESIGN.md 2)
    out_dir: str = "out/dale_ct_2s"   # ckpt.pt, log.jsonl and config.json go here
    # model (DESIGN.md 4)
    variant: str = "2s"               # "0": LeJEPA only; "1s": + anatomy heads; "2s": + abnormality heads
    vit: str = "large"                # backbone size (model.VIT_SIZES); DALE-CT uses ViT-L
    layerscale_init: float = 1e-5     # LayerScale's starting gain (DESIGN.md 4); CaiT's rule is 0.1 up to 18 blocks
    proj_hidden: int = 2048           # projector width (DESIGN.md 4)
    proj_dim: int = 124               # K, the projector output SIGReg acts on (DESIGN.md 5)
    # views (DESIGN.md 3)
    slab_mm: float = 12.0             # slab thickness: local slices lie within +-slab_mm/2 of the centre
    n_local: int = 8                  # local views per slab (plus 2 global views)
    global_size: int = 256            # global view side in px (also the ViT's stored pos_embed grid)
    local_size: int = 144             # local view side in px
    global_scale_min: float = 0.6     # global crop side as a fraction of the slice side
    global_scale_max: float = 1.0
    local_scale_min: float = 0.3      # local crop side as a fraction of the slice side
    local_scale_max: float = 0.6
    p_mask_centred: float = 0.8       # local crop centred on an abnormality (else anatomy) mask pixel
    p_abnormal_volume: float = 0.2    # 2S: draw from the abnormality-bearing volumes this often
    p_flip: float = 0.5               # horizontal flip, every view
    p_gamma: float = 0.8              # gamma on [0,1]-scaled intensities, every view
    gamma_min: float = 0.9
    gamma_max: float = 1.1
    p_blur_global1: float = 0.5       # 3x3 Gaussian blur on global view 1
    p_blur_global2: float = 0.1       # ... and on global view 2
    blur_sigma_min: float = 0.1       # blur sigma range in px (DINO's range)
    blur_sigma_max: float = 2.0
    target_samples: int = 8           # mask samples per patch side when computing soft targets
    # loss (DESIGN.md 4-5)
    lam: float = 0.02                 # lambda: L = (1 - lam) * inv + lam * SIGReg. Collapse costs
                                      # lam * 0.402 * N (N = SIGReg's batch), so small batches need a
                                      # larger lam: the phantom preset (32 slabs) uses 0.08
    num_slices: int = 1024            # M, SIGReg's random directions, redrawn every step
    fused_sigreg: bool = True         # on CUDA: the Triton SIGReg kernel (kernels/sigreg.py), same numbers
    aux_weight: float = 0.1           # aux = aux_weight * (0.5 * L_cls + 0.5 * L_patch)
    abn_pos_weight: float = 800.0     # BCE positive weight of every abnormality category
    anat_pos_weight_max: float = 1000.0  # anatomy positive weight = 1/frequency clipped to [1, this]
    pos_weight_slices: int = 1024     # training slices sampled once to measure anatomy frequencies
    # optimisation (DESIGN.md 6)
    batch_size: int = 512             # GLOBAL batch in slabs: micro_batch x ranks x accumulation
    micro_batch: int = 64             # slabs per rank per forward/backward
    max_steps: int = 50000            # optimiser steps; the cosine ends here
    warmup_steps: int = 5000          # linear warmup 0 -> lr
    lr: float = 3e-4                  # peak learning rate
    min_lr: float = 3e-5              # end of the cosine
    weight_decay: float = 0.04        # on weight matrices only (see make_optimizer)
    beta1: float = 0.9                # AdamW betas: PyTorch defaults (DESIGN.md names none)
    beta2: float = 0.999
    eps: float = 1e-6                 # AdamW eps (DESIGN.md 6)
    grad_clip: float = 3.0            # global gradient-norm clip; 0 = off
    # system
    device: str = "auto"              # auto (cuda if present), cpu, cuda
    data_workers: int = 2             # threads gathering micro-batches ahead; one gathers ~600 slabs/s
                                      # of 512 px slices from the page cache (a CPU core's memcpy)
    dtype: str = "bfloat16"           # autocast dtype on CUDA (bfloat16 or float32); CPU runs float32
    compile: bool = False             # torch.compile the model (then DDP-wrap it)
    seed: int = 0                     # model init and every data draw derive from it
    log_every: int = 10               # steps between log lines
    ckpt_every: int = 1000            # steps between checkpoints (and one at the end)
    stop_at: int = 0                  # stop (with a checkpoint) at this step; 0 = max_steps.
                                      # The schedule still follows max_steps: for time-limited jobs.
    resume: str = ""                  # "" = fresh start; "auto" = out_dir/ckpt.pt if it exists; or a path
    bench_data: int = 0               # > 0: time this many micro-batches of data and of model, then exit
    picture: str = ""                 # a .png path: draw one training sample (slab, 2 global + 8 local views), then exit


def parse_config(argv):
    """--config=NAME loads config/NAME.json over the defaults, then --key=value overrides apply.
    A bare --flag means true for a bool setting, and --resume alone means --resume=auto."""
    cfg = Config()
    bare = {f.name: "true" for f in fields(Config) if f.type is bool} | {"resume": "auto"}
    argv = [f"{a}={bare[a[2:]]}" if a[2:] in bare else a for a in argv]
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"argument {arg!r}: expected --key=value (e.g. --config=phantom --max_steps=100)")
    for arg in argv:  # the preset first, wherever it sits on the command line
        key, _, value = arg[2:].partition("=")
        if key == "config":
            path = os.path.join(CONFIG_DIR, f"{value}.json")
            if not os.path.isfile(path):
                names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
                raise SystemExit(f"unknown preset {value!r} (no {path}); available: {', '.join(names)}")
            with open(path) as f:
                for k, v in json.load(f).items():
                    if not k.startswith("_"):  # "_why": notes on where the preset's values come from
                        set_field(cfg, k, v, where=path)
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if key != "config":
            set_field(cfg, key, value, where="command line")
    cfg.variant = cfg.variant.lower()
    checks = [(cfg.variant in ("0", "1s", "2s"), f"variant={cfg.variant!r}: use 0, 1s or 2s"),
              (cfg.vit in VIT_SIZES, f"vit={cfg.vit!r}: use one of {', '.join(VIT_SIZES)}"),
              (cfg.global_size % PATCH == 0 and cfg.local_size % PATCH == 0,
               f"global_size={cfg.global_size}, local_size={cfg.local_size}: view sides must be multiples of {PATCH}"),
              (cfg.batch_size % cfg.micro_batch == 0, f"batch_size={cfg.batch_size} is not a multiple of micro_batch={cfg.micro_batch}")]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(msg)
    return cfg


def set_field(cfg, key, value, where):
    known = {f.name for f in fields(cfg)}
    if key not in known:
        raise SystemExit(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
    typ = type(getattr(cfg, key))
    try:
        if typ is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            value = value.lower() in ("1", "true", "yes")
        elif typ is int and isinstance(value, str):
            value = float(value)  # accepts 1e4; must still be a whole number
            if not value.is_integer():
                raise ValueError
        elif typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        setattr(cfg, key, typ(value))
    except (TypeError, ValueError):
        raise SystemExit(f"{where}: {key}={value!r} is not a valid {typ.__name__}") from None


# -----------------------------------------------------------------------------
# Sampling slabs (CPU). Every random choice of a sample is made here, from a generator seeded by
# (seed, step, slot), where slot is the sample's position in the step's GLOBAL batch. So:
# - a resumed run draws exactly what the uninterrupted run would have drawn (no replay, no state
#   to save beyond the step);
# - ranks own disjoint slots, so they never draw each other's samples;
# - the global batch of a step is the same set of samples for any number of ranks and any
#   gradient accumulation: 8 GPUs x 64 and 1 GPU x 64 x 8 micro-steps see the same slabs (only
#   SIGReg's batch differs: it is one micro-step across ranks, see Config.lam).
# numpy's SeedSequence hashes the key list, so neighbouring (step, slot) give unrelated streams.

def slots_for(step, rank, micro, cfg, world):
    """Global-batch positions of one rank's micro-batch: micro-steps outermost, then ranks."""
    first = (micro * world + rank) * cfg.micro_batch
    return range(first, first + cfg.micro_batch)


def slab_range(count, centre, z_mm, slab_mm):
    """First and last slice (within a volume of `count` slices) at most slab_mm/2 from `centre`."""
    half = int(math.floor(slab_mm / 2 / z_mm + 1e-6))  # 6 slices at 1 mm, 4 at 1.5 mm, 2 at 2.5 mm
    return max(0, centre - half), min(count - 1, centre + half)


def plan_slabs(ds, cfg, step, slots):
    """Which slices and which augmentations, for each slot. Returns numpy arrays (B = len(slots))."""
    B, L = len(slots), cfg.n_local
    abnormal_volumes = np.flatnonzero(ds.has_abnormality)
    p = dict(vol=np.zeros(B, np.int64), centre=np.zeros(B, np.int64), local=np.zeros((B, L), np.int64),
             g_scale=np.zeros((B, 2)), g_pos=np.zeros((B, 2, 2)), g_flip=np.zeros((B, 2)),
             g_gamma=np.ones((B, 2)), g_sigma=np.zeros((B, 2)),
             l_scale=np.zeros((B, L)), l_pos=np.zeros((B, L, 2)), l_flip=np.zeros((B, L)),
             l_gamma=np.ones((B, L)), l_centred=np.zeros((B, L)), l_pick=np.zeros((B, L)))
    p_blur = np.array([cfg.p_blur_global1, cfg.p_blur_global2])
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([cfg.seed, step, slot])
        # the volume: 2S over-samples the (few) volumes with abnormality masks
        use_abnormal = rng.random() < cfg.p_abnormal_volume and cfg.variant == "2s" and len(abnormal_volumes)
        v = int(rng.choice(abnormal_volumes)) if use_abnormal else int(rng.integers(len(ds)))
        c = int(rng.integers(ds.count[v]))
        lo, hi = slab_range(int(ds.count[v]), c, float(ds.z_mm[v]), cfg.slab_mm)
        p["vol"][i], p["centre"][i] = v, ds.start[v] + c
        p["local"][i] = ds.start[v] + rng.integers(lo, hi + 1, size=L)  # independent slab slices
        # global views (from the centre slice)
        p["g_scale"][i] = rng.uniform(cfg.global_scale_min, cfg.global_scale_max, 2)
        p["g_pos"][i] = rng.random((2, 2))  # where the box sits within its free range, (x, y)
        p["g_flip"][i] = rng.random(2) < cfg.p_flip
        p["g_gamma"][i] = np.where(rng.random(2) < cfg.p_gamma, rng.uniform(cfg.gamma_min, cfg.gamma_max, 2), 1.0)
        p["g_sigma"][i] = np.where(rng.random(2) < p_blur, rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max, 2), 0.0)
        # local views (each from its own slab slice)
        p["l_scale"][i] = rng.uniform(cfg.local_scale_min, cfg.local_scale_max, L)
        p["l_pos"][i] = rng.random((L, 2))
        p["l_flip"][i] = rng.random(L) < cfg.p_flip
        p["l_gamma"][i] = np.where(rng.random(L) < cfg.p_gamma, rng.uniform(cfg.gamma_min, cfg.gamma_max, L), 1.0)
        p["l_centred"][i] = rng.random(L) < cfg.p_mask_centred
        p["l_pick"][i] = rng.random(L)  # which mask pixel, as a fraction of the mask's pixel count
    return p


def gather(ds, plan):
    """Copy the raw slices and masks a plan needs out of the memmaps, each slice once, in disk order."""
    index = np.concatenate([plan["centre"][:, None], plan["local"]], 1)  # (B, 1+L) slice numbers
    uniq, inverse = np.unique(index, return_inverse=True)  # sorted: sequential-ish reads
    batch = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in plan.items() if k[:2] in ("g_", "l_")}
    batch.update(
        slices=torch.from_numpy(np.ascontiguousarray(ds.slices[uniq])),  # (U, S, S) int16 HU
        anatomy=torch.from_numpy(np.ascontiguousarray(ds.anatomy[uniq])),  # (U, m, m) uint8
        # 14 bits fit in int16's positive range; torch has few uint16 ops
        abnormal=torch.from_numpy(np.ascontiguousarray(ds.abnormal[uniq]).view(np.int16)),  # (U, m, m)
        index=torch.from_numpy(inverse.reshape(index.shape)),  # (B, 1+L) rows of the three above
        has_anatomy=torch.from_numpy(ds.has_anatomy[plan["vol"]]),  # (B,)
        has_abnormality=torch.from_numpy(ds.has_abnormality[plan["vol"]]),  # (B,)
    )
    return batch


def loader(ds, cfg, start_step, rank, world, accum, pin=False):
    """Micro-batches in training order from start_step on; the next data_workers ones are gathered
    in threads while the device works on this one (memmap reads and numpy copies release the GIL)."""
    def load(step, micro):
        b = gather(ds, plan_slabs(ds, cfg, step, slots_for(step, rank, micro, cfg, world)))
        return {k: v.pin_memory() for k, v in b.items()} if pin else b  # pinned: async host-to-device copies

    keys = ((step, micro) for step in range(start_step, 1 << 62) for micro in range(accum))
    with ThreadPoolExecutor(cfg.data_workers) as pool:
        ahead = deque(pool.submit(load, *next(keys)) for _ in range(cfg.data_workers))
        for key in keys:  # results are taken in submission order: the training order never changes
            batch = ahead.popleft().result()
            ahead.append(pool.submit(load, *key))
            yield batch


# -----------------------------------------------------------------------------
# Views and soft targets (device, batched). Rows are view-major: row v*B + b is view v of sample b.

def crop_boxes(scale, pos, flip):
    """affine_grid thetas for square crops: side `scale` (fraction of the slice side), top-left free
    position `pos` in [0,1]^2 of the room left, horizontal flip folded in. (N,), (N,2), (N,) -> (N,2,3)"""
    centre = scale[:, None] / 2 + pos * (1 - scale[:, None])  # (N, 2) in [0, 1] image coordinates
    return boxes_to_theta(scale, centre, flip)


def boxes_to_theta(scale, centre, flip):
    theta = torch.zeros(len(scale), 2, 3, device=scale.device)
    theta[:, 0, 0] = scale * (1 - 2 * flip)  # output x in [-1,1] -> input x; negative = mirrored
    theta[:, 1, 1] = scale
    theta[:, :, 2] = 2 * centre - 1
    return theta  # (N, 2, 3)


def mask_centres(abnormal, anatomy, pick):
    """A random foreground pixel's centre per row, abnormality mask first, else anatomy.
    (N, m, m) x2, (N,) in [0,1) -> centre (N, 2) in [0,1] (x, y), found (N,) bool. The k-th
    foreground pixel with k = floor(pick * count) is found by a cumsum + searchsorted."""
    m = anatomy.shape[-1]
    fg_abn, fg_anat = abnormal != 0, anatomy != 0  # (N, m, m)
    fg = torch.where(fg_abn.flatten(1).any(1)[:, None], fg_abn.flatten(1), fg_anat.flatten(1))  # (N, m*m)
    csum = fg.cumsum(1, dtype=torch.int32)  # (N, m*m)
    count = csum[:, -1]  # (N,)
    k = torch.minimum((pick * count).long(), (count - 1).clamp(min=0)).int() + 1  # (N,) 1-based
    pos = torch.searchsorted(csum, k[:, None].contiguous()).squeeze(1).clamp(max=m * m - 1)  # (N,)
    centre = torch.stack([(pos % m).float() + 0.5, (pos // m).float() + 0.5], 1) / m  # (N, 2)
    return centre, count > 0


def resample_image(hu, theta, size, max_scale):
    """Crop + resize HU slices: (N, S, S) -> (N, 1, size, size). Bilinear sampling at `ss` points per
    output pixel side, then averaged: a cheap antialias when a crop can be larger than the view
    (a full 512 px slice into a 256 px global view: ss = 2)."""
    ss = max(1, math.ceil(max_scale * hu.shape[-1] / size - 1e-6))
    grid = F.affine_grid(theta, (len(hu), 1, size * ss, size * ss), align_corners=False)
    x = F.grid_sample(hu.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(x, ss) if ss > 1 else x  # (N, 1, size, size)


def soft_targets(anatomy, abnormal, theta, size, r, families):
    """Class fractions per crop (CLS) and per 16x16 patch, from the SAME crop boxes as the images.
    Each patch is covered by an r x r grid of nearest-neighbour mask samples; fractions are sample
    counts / r^2 (exact when samples fall on mask pixel centres, an r^2-point quadrature otherwise).
    The CLS target is the mean over patches: every patch is the same area of the crop."""
    N, g = len(theta), size // PATCH  # g x g patches
    n = g * r  # sample points per side
    grid = F.affine_grid(theta, (N, 1, n, n), align_corners=False)
    out = {}
    if "anat" in families:
        lab = F.grid_sample(anatomy.unsqueeze(1).float(), grid, mode="nearest", align_corners=False)
        lab = lab.view(N, n, n).long()  # (N, n, n) label per sample point
        patch = (torch.arange(n, device=lab.device) // r)  # (n,) patch row/column of each sample
        cell = (patch[:, None] * g + patch[None, :]) * prepare.N_ANATOMY  # (n, n)
        counts = torch.zeros(N, g * g * prepare.N_ANATOMY, device=lab.device)
        counts.scatter_add_(1, (cell + lab).view(N, -1), torch.ones(N, n * n, device=lab.device))
        out["anat_patch"] = counts.view(N, g * g, prepare.N_ANATOMY) / (r * r)  # (N, T, 118)
        out["anat_cls"] = out["anat_patch"].mean(1)  # (N, 118)
    if "abn" in families:
        bits = F.grid_sample(abnormal.unsqueeze(1).float(), grid, mode="nearest", align_corners=False).int()
        codes = torch.arange(len(prepare.ABNORMALITY_CODES), device=bits.device).view(1, -1, 1, 1)
        bits = ((bits >> codes) & 1).float()  # (N, 14, n, n)
        out["abn_patch"] = F.avg_pool2d(bits, r).flatten(2).transpose(1, 2)  # (N, T, 14)
        out["abn_cls"] = out["abn_patch"].mean(1)  # (N, 14)
    return out


def intensity(hu, gamma, sigma):
    """Gamma on [0,1]-scaled intensities, z-score normalisation, then a per-row 3x3 Gaussian blur.
    Gamma acts on u = (clip(HU) - lo) / (hi - lo) with (lo, hi) = prepare.HU_CLIP, u -> u^gamma,
    mapped back to HU. (N,1,H,W), (N,), (N,) -> (N,1,H,W); sigma 0 = no blur."""
    lo, hi = prepare.HU_CLIP
    u = ((hu - lo) / (hi - lo)).clamp(0, 1) ** gamma.view(-1, 1, 1, 1)
    x = prepare.normalize_hu(lo + u * (hi - lo))  # (N, 1, H, W)
    if sigma is None:
        return x
    w = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (N, 3)
    w = w / w.sum(1, keepdim=True)
    kernel = (w[:, :, None] * w[:, None, :]).unsqueeze(1)  # (N, 1, 3, 3); sigma 0 -> the identity
    N, _, H, W = x.shape
    x = F.conv2d(F.pad(x.view(1, N, H, W), (1, 1, 1, 1), mode="replicate"), kernel, groups=N)
    return x.view(N, 1, H, W)


def make_views(batch, cfg, device):
    """CPU micro-batch from gather() -> network inputs and soft targets on `device`.
    Returns xg (2B,1,G,G), xl (L*B,1,l,l), targets {"g": {...}, "l": {...}}, has_anatomy, has_abnormality."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    families = {"0": (), "1s": ("anat",), "2s": ("anat", "abn")}[cfg.variant]
    vm = lambda t: t.transpose(0, 1).reshape(-1, *t.shape[2:])  # (B, V, ...) -> (V*B, ...) view-major
    # global views: both from the centre slice
    src = b["index"][:, 0].repeat(2)  # (2B,)
    theta = crop_boxes(vm(b["g_scale"]), vm(b["g_pos"]), vm(b["g_flip"]))  # (2B, 2, 3)
    xg = intensity(resample_image(b["slices"][src], theta, cfg.global_size, cfg.global_scale_max), vm(b["g_gamma"]), vm(b["g_sigma"]))
    tg = soft_targets(b["anatomy"][src], b["abnormal"][src], theta, cfg.global_size, cfg.target_samples, families)
    # local views: one slab slice each, the box centred on a mask pixel with p_mask_centred
    src = vm(b["index"][:, 1:])  # (L*B,)
    scale, flip = vm(b["l_scale"]), vm(b["l_flip"])
    centre = scale[:, None] / 2 + vm(b["l_pos"]) * (1 - scale[:, None])  # (L*B, 2) uniform placement
    on_mask, found = mask_centres(b["abnormal"][src], b["anatomy"][src], vm(b["l_pick"]))
    on_mask = on_mask.clamp(scale[:, None] / 2, 1 - scale[:, None] / 2)  # keep the box in the slice
    centre = torch.where(((vm(b["l_centred"]) > 0) & found)[:, None], on_mask, centre)
    theta = boxes_to_theta(scale, centre, flip)  # (L*B, 2, 3)
    xl = intensity(resample_image(b["slices"][src], theta, cfg.local_size, cfg.local_scale_max), vm(b["l_gamma"]), None)
    tl = soft_targets(b["anatomy"][src], b["abnormal"][src], theta, cfg.local_size, cfg.target_samples, families)
    return dict(xg=xg, xl=xl, targets={"g": tg, "l": tl},
                has_anatomy=b["has_anatomy"], has_abnormality=b["has_abnormality"])


# -----------------------------------------------------------------------------
# Model and loss

class DaleCT(nn.Module):
    """Backbone + projector (+ dense heads): one module, so DDP sees one forward per micro-step."""

    def __init__(self, cfg):
        super().__init__()
        self.vit = build_vit(cfg.vit, img_size=cfg.global_size, init_values=cfg.layerscale_init)
        self.projector = Projector(self.vit.embed_dim, hidden=cfg.proj_hidden, out=cfg.proj_dim)
        self.heads = DenseHeads(self.vit.embed_dim, prepare.N_ANATOMY, len(prepare.ABNORMALITY_CODES)) if cfg.variant != "0" else None
        if cfg.variant == "1s":  # no abnormality head at all: a head outside the loss would
            del self.heads.abnormal  # leave DDP waiting for its gradients (and be saved untrained)

    def embed(self, xg, xl):
        """Projector outputs only (V*B, K): what SIGReg's statistics need."""
        return self.projector(torch.cat([self.vit(xg)[0], self.vit(xl)[0]]))

    def forward(self, xg, xl):  # (2B, 1, G, G), (L*B, 1, l, l)
        cls_g, patch_g = self.vit(xg)  # (2B, D), (2B, Tg, D)
        cls_l, patch_l = self.vit(xl)  # (L*B, D), (L*B, Tl, D)
        z = self.projector(torch.cat([cls_g, cls_l]))  # (V*B, K)
        if self.heads is None:
            return z, None, None
        return z, self.dense(cls_g, patch_g), self.dense(cls_l, patch_l)

    def dense(self, cls, patches):
        if hasattr(self.heads, "abnormal"):
            return self.heads(cls, patches)  # anat_cls, anat_patch, abn_cls, abn_patch
        return dict(anat_cls=self.heads.anatomy(cls), anat_patch=self.heads.anatomy(patches))  # 1S


def anatomy_pos_weight(ds, cfg):
    """Per-class BCE positive weight = 1 / pixel frequency, clipped to [1, anat_pos_weight_max],
    measured once on pos_weight_slices training slices of volumes that have anatomy masks."""
    vols = np.flatnonzero(ds.has_anatomy)
    if len(vols) == 0:
        return torch.ones(prepare.N_ANATOMY)
    rng = np.random.default_rng([cfg.seed, 1])
    v = rng.choice(vols, cfg.pos_weight_slices)
    idx = np.unique(ds.start[v] + (rng.random(len(v)) * ds.count[v]).astype(np.int64))
    counts = np.bincount(np.asarray(ds.anatomy[idx]).ravel(), minlength=prepare.N_ANATOMY)[:prepare.N_ANATOMY]
    freq = counts / max(counts.sum(), 1)
    return torch.tensor(np.clip(1.0 / np.maximum(freq, 1e-12), 1.0, cfg.anat_pos_weight_max), dtype=torch.float32)


def global_mean(per_sample, weight, total=None, accum=1):
    """Mean of per_sample over the weighted samples of ALL ranks (and, given the step's total weight,
    of all `accum` micro-batches), scaled so that DDP's gradient averaging and the 1/accum of each
    micro-step give the gradient of that global mean: each rank's sum times world * accum / total,
    averaged over ranks and summed over micro-steps / accum, is sum_all / total."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if total is None:  # this micro-batch's count over all ranks
        total = weight.sum().float()
        if world > 1:
            dist.all_reduce(total)
    return (per_sample * weight).sum() * world * accum / total.clamp(min=1)


def step_mask_counts(micro_views, cfg):
    """Samples with anatomy / abnormality masks over all micro-batches of a step and all ranks."""
    counts = torch.stack([sum(v["has_anatomy"].sum() for v in micro_views),
                          sum(v["has_abnormality"].sum() for v in micro_views)]).float()  # (2,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return {"anat": counts[0], "abn": counts[1]}


def aux_loss(aux_g, aux_l, views, pos_weight, cfg, counts=None, accum=1):
    """DESIGN.md 4: aux = w * (0.5 * L_cls + 0.5 * L_patch), each the mean of the two families, BCE
    with logits and pos_weight; a family counts only on samples that have its masks. Every view
    weighs the same: per sample, the BCE is summed over views and divided by V."""
    V, B = 2 + cfg.n_local, len(views["has_anatomy"])
    families = [("anat", views["has_anatomy"])] + ([("abn", views["has_abnormality"])] if cfg.variant == "2s" else [])
    parts = {}
    for fam, has in families:
        for level in ("cls", "patch"):
            per_sample = 0
            for out, tgt in ((aux_g, views["targets"]["g"]), (aux_l, views["targets"]["l"])):
                key = f"{fam}_{level}"
                bce = F.binary_cross_entropy_with_logits(out[key].float(), tgt[key], pos_weight=pos_weight[fam], reduction="none")
                per_row = bce.flatten(1).mean(1)  # (v*B,) mean over (tokens and) classes
                per_sample = per_sample + per_row.view(-1, B).sum(0) / V  # (B,)
            parts[f"{fam}_{level}"] = global_mean(per_sample, has.float(), counts and counts[fam], accum)
    n = len(families)
    l_cls = sum(parts[f"{f}_cls"] for f, _ in families) / n
    l_patch = sum(parts[f"{f}_patch"] for f, _ in families) / n
    return cfg.aux_weight * (0.5 * l_cls + 0.5 * l_patch), parts


def sigreg_statistics(raw, micro_views, cfg, step, autocast):
    """SIGReg's cos/sin sums over every micro-batch of the step and every rank (no grad): with them,
    each micro-step's SIGReg value and gradient are those of the whole global batch."""
    with torch.no_grad(), autocast:
        zs = [raw.embed(v["xg"], v["xl"]).float().view(2 + cfg.n_local, len(v["has_anatomy"]), -1)
              for v in micro_views]  # [(V, B, K)] per micro-batch
    return lejepa.global_sums(zs, step, cfg.num_slices)


def compute_loss(model, views, pos_weight, cfg, step, given=None, counts=None, accum=1):
    """Forward one micro-batch; returns the total loss and a dict of detached parts for the log.
    given: SIGReg's statistics over the whole step (sigreg_statistics), or None = this micro-batch's;
    counts: the step's mask counts (step_mask_counts) for the aux means, or None = this micro-batch's."""
    z, aux_g, aux_l = model(views["xg"], views["xl"])
    B = len(views["has_anatomy"])
    z = z.float().view(2 + cfg.n_local, B, -1)  # (V, B, K); SIGReg sums in float32 (DESIGN.md 5)
    loss, lj = lejepa_loss(z, n_global=2, lam=cfg.lam, step=step, num_slices=cfg.num_slices, given=given)
    parts = {"inv": lj["inv"], "sigreg": lj["sigreg"]}
    if aux_g is not None:
        aux, ap = aux_loss(aux_g, aux_l, views, pos_weight, cfg, counts, accum)
        loss = loss + aux
        parts.update(aux=aux, anat=0.5 * (ap["anat_cls"] + ap["anat_patch"]))
        if "abn_cls" in ap:
            parts["abn"] = 0.5 * (ap["abn_cls"] + ap["abn_patch"])
    parts["loss"] = loss
    return loss, {k: torch.as_tensor(v, device=loss.device).detach().float() for k, v in parts.items()}


def make_optimizer(model, cfg, fused=False):
    """AdamW; weight decay only on weight matrices. Biases, LayerNorm and LayerScale gains (1-D) are
    scale/offset parameters that decay would bias toward 0 without regularising anything; pos_embed
    and cls_token are learned inputs rather than weights (decay would pull positions to zero, and
    timm and DINO exclude them too), even though pos_embed is a 3-D tensor."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.split(".")[-1] in ("pos_embed", "cls_token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def get_lr(step, cfg):
    """Linear warmup 0 -> lr over warmup_steps, then cosine to min_lr at max_steps (DESIGN.md 6)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints, throughput

MODEL_KEYS = ("vit", "variant", "global_size", "proj_hidden", "proj_dim")  # must match to resume


def save_checkpoint(path, raw, optimizer, step, cfg, pos_weight):
    """Atomic: written to path.tmp, then renamed, so a crash never leaves half a checkpoint."""
    ckpt = {"model": raw.vit.state_dict(),  # timm key names: model.load_backbone / timm read it
            "projector": raw.projector.state_dict(),
            "heads": raw.heads.state_dict() if raw.heads is not None else None,
            "optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg),
            "vit": cfg.vit, "img_size": cfg.global_size, "pos_weight": pos_weight,
            "rng": {"torch": torch.get_rng_state(), "data": "derived from (seed, step, slot)"}}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def resume_path(cfg):
    if not cfg.resume:
        return None
    path = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
    if not os.path.isfile(path):
        if cfg.resume == "auto":
            return None  # nothing to continue: a fresh start
        raise SystemExit(f"--resume={path}: no such checkpoint file")
    return path


def load_checkpoint(path, raw, optimizer, cfg):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise SystemExit(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    old = ckpt.get("config", {})
    diff = [f"{k}={old.get(k)!r} (this run: {getattr(cfg, k)!r})" for k in MODEL_KEYS if old.get(k) != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"{path}: checkpoint is from another model: {', '.join(diff)}; "
                         f"pass the same settings or resume another checkpoint")
    try:
        raw.vit.load_state_dict(ckpt["model"])
        raw.projector.load_state_dict(ckpt["projector"])
        if raw.heads is not None:
            raw.heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"], ckpt["pos_weight"]


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # dense TFLOP/s


def flops_per_slab(raw, cfg):
    """Training FLOPs of one slab: 3x the forward (backward ~ 2x) of 2 global + n_local local views.
    The projector and heads add well under 1% for ViT-L and are left out."""
    return 3 * (2 * vit_flops_per_image(raw.vit, cfg.global_size) + cfg.n_local * vit_flops_per_image(raw.vit, cfg.local_size))


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench(ds, cfg, model, pos_weight, device, n):
    """Slabs/s of the data path (CPU plan + gather, then device views) and of the model
    (forward + backward on one micro-batch, repeated), each measured alone."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    cpu = [gather(ds, plan_slabs(ds, cfg, s, slots_for(s, 0, 0, cfg, 1))) for s in range(n)]
    t_gather = time.time() - t0
    views = make_views(cpu[0], cfg, device)  # warm-up
    sync()
    t1 = time.time()
    for b in cpu:
        views = make_views(b, cfg, device)
    sync()
    t2 = time.time()
    ctx = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if device.type == "cuda" else nullcontext()
    for i in range(n + 1):
        if i == 1:  # the first step warms up (allocator, kernels, compile)
            sync()
            t3 = time.time()
        with ctx:
            loss, _ = compute_loss(model, views, pos_weight, cfg, i)
        loss.backward()
    sync()
    t4 = time.time()
    slabs = n * cfg.micro_batch
    return {"gather_slabs_per_s": slabs / t_gather, "views_slabs_per_s": slabs / (t2 - t1),
            "data_slabs_per_s": slabs / (t_gather + t2 - t1), "model_slabs_per_s": slabs / (t4 - t3)}



# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# Pictures (matplotlib is optional: without it we say how to get it and carry on)

def pyplot(log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log("pictures need matplotlib: pip install matplotlib (skipped)")
        return None


def picture_sample(ds, cfg, tries=256):
    """(plan, slab slice indices) of the sample to draw: the first training draw (step s, slot 0)
    whose slab shows a finding, so that the picture has abnormality masks to show; step 0's draw if
    none of the first `tries` does."""
    first = None
    for step in range(tries):
        plan = plan_slabs(ds, cfg, step, [0])
        v = int(plan["vol"][0])
        lo, hi = slab_range(int(ds.count[v]), int(plan["centre"][0] - ds.start[v]), float(ds.z_mm[v]), cfg.slab_mm)
        slab = range(int(ds.start[v]) + lo, int(ds.start[v]) + hi + 1)
        first = first or (plan, slab)
        if ds.has_abnormality[v] and ds.abnormal[slab.start:slab.stop].any():
            return plan, slab
    return first


def draw_sample(ds, cfg, path, log=print):
    """One training sample as the model sees it: the slab's slices (centre framed) with the anatomy
    mask (colours) and the finding masks (red outlines), then the 2 global and n_local local views
    with the patch targets of the dense heads (colour: the majority anatomy class of each 16 px
    patch; red boxes: patches with an abnormality)."""
    plt = pyplot(log)
    if plt is None:
        return None
    plan, slab = picture_sample(ds, cfg)
    v = int(plan["vol"][0])
    views = make_views(gather(ds, plan), dataclass_replace(cfg, variant="2s"), torch.device("cpu"))
    ncol = max(len(slab), 2 + cfg.n_local // 2)
    fig, axes = plt.subplots(3, ncol, figsize=(2 * ncol, 6.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, i in enumerate(slab):
        ax = axes[0, j]
        ax.imshow(ds.slices[i], cmap="gray", vmin=-1000, vmax=400)
        m = ds.anatomy[i].astype(float)
        ax.imshow(np.ma.masked_equal(m, 0), cmap="tab20", alpha=0.35, extent=(-0.5, ds.slices.shape[-1] - 0.5) * 2,
                  interpolation="nearest")
        finding = ds.abnormal[i] > 0  # (mask_size, mask_size), any of the 14 categories
        if finding.any():  # outlined in slice pixels: mask pixel centres scaled to the slice grid
            xy = (np.arange(finding.shape[-1]) + 0.5) * ds.slices.shape[-1] / finding.shape[-1] - 0.5
            ax.contour(xy, xy, finding.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{ds.depth_mm[i] - ds.depth_mm[plan['centre'][0]]:+.0f} mm" + (" (centre)" if i == plan["centre"][0] else ""),
                     fontsize=8)
    shown = [("g", k, views["xg"][k, 0]) for k in range(2)] + [("l", k, views["xl"][k, 0]) for k in range(cfg.n_local)]
    for n, (kind, k, img) in enumerate(shown):
        ax = axes.flat[ncol + n]  # rows 2 and 3 (ncol >= 2 + n_local / 2 leaves room for all views)
        size = img.shape[-1]
        ax.imshow(img.numpy(), cmap="gray")
        t = views["targets"][kind]
        g = size // PATCH
        anat = t["anat_patch"][k].view(g, g, -1)[..., 1:]  # (g, g, 117) without background
        label = torch.where(anat.amax(-1) > 0.25, anat.argmax(-1) + 1, 0).float().numpy()
        ax.imshow(np.ma.masked_equal(label, 0), cmap="tab20", alpha=0.3, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                  interpolation="nearest")
        for (r, c) in (t["abn_patch"][k].view(g, g, -1).amax(-1) > 0).nonzero().tolist():
            ax.add_patch(plt.Rectangle((c * PATCH - 0.5, r * PATCH - 0.5), PATCH, PATCH, fill=False, color="red", lw=1))
        ax.set_title(f"{'global' if kind == 'g' else 'local'} {k + 1}", fontsize=8)
    fig.suptitle(f"{ds.names[v]}: a {cfg.slab_mm:g} mm slab, its views and their patch targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return path


def plot_losses(log_path, png, log=print):
    """Loss curves of a run from its log.jsonl: total, invariance, SIGReg and the aux terms."""
    plt = pyplot(log)
    if plt is None or not os.path.exists(log_path):
        return None
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    keys = [k for k in ("loss", "inv", "sigreg", "anat", "abn") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    log(f"wrote {png}")
    return png


def fused_sigreg_ok(device, log, tol={"torch.float32": 5e-3, "torch.bfloat16": 2e-2}):
    """Use the Triton SIGReg only once it matches lejepa's PyTorch SIGReg on this GPU: a check of
    about a second at startup (kernels/sigreg.py's own), so a kernel or Triton-version problem
    costs speed, never a wrong loss. Tolerances: kernels/sigreg.py's GPU check."""
    try:
        from kernels.sigreg import check
        worst = check(device, log=lambda *a: None)
    except Exception as e:  # triton missing, a compile error on this GPU, ...
        log(f"fused SIGReg unavailable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"using the PyTorch path")
        return False
    ok = all(worst.get(k, float("inf")) < v for k, v in tol.items())
    log(f"fused SIGReg check: worst relative error {', '.join(f'{k[6:]} {v:.1e}' for k, v in worst.items())} -> "
        + ("using the Triton kernel" if ok else "MISMATCH, using the PyTorch path (run python kernels/sigreg.py)"))
    return ok


def resolve_device(name, local_rank=None):
    """The torch.device this process trains on. A CUDA device always carries an index, because
    torch.cuda.set_device refuses a bare "cuda" (a single-GPU run once failed there): the local rank
    under torchrun, else the current GPU."""
    device = torch.device(name)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    # distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        device = resolve_device(cfg.device, local)
    else:
        rank, world, device = 0, 1, resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    lejepa.USE_FUSED = cfg.fused_sigreg and device.type == "cuda" and fused_sigreg_ok(device, log)
    if cfg.batch_size % (cfg.micro_batch * world):
        raise SystemExit(f"batch_size={cfg.batch_size} is not micro_batch={cfg.micro_batch} x {world} ranks x "
                         f"an integer accumulation; change micro_batch or batch_size")
    accum = cfg.batch_size // (cfg.micro_batch * world)
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))

    try:
        ds = prepare.open_split(cfg.data, cfg.split)
    except prepare.PreparedError as e:
        raise SystemExit(str(e)) from None
    if len(ds) == 0:
        raise SystemExit(f"{cfg.data}: split {cfg.split!r} has no volumes; prepare more data or pick another --split")
    if cfg.variant == "2s" and not ds.has_abnormality.any():
        log(f"note: {cfg.data}/{cfg.split} has no abnormality masks: the 2S abnormality term stays 0")
    log(f"data: {len(ds)} volumes, {len(ds.slices)} slices of {ds.slices.shape[1]} px; "
        f"{int(ds.has_abnormality.sum())} with abnormality masks, {int(ds.has_anatomy.sum())} with anatomy")

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    raw = DaleCT(cfg).to(device)
    optimizer = make_optimizer(raw, cfg, fused=device.type == "cuda")
    start, pos_anat = 0, None
    path = resume_path(cfg)
    if path:
        start, pos_anat = load_checkpoint(path, raw, optimizer, cfg)
        log(f"resumed {path} at step {start}")
    if pos_anat is None:
        pos_anat = anatomy_pos_weight(ds, cfg)
    pos_weight = {"anat": pos_anat.to(device), "abn": torch.full((len(prepare.ABNORMALITY_CODES),), cfg.abn_pos_weight, device=device)}
    model = torch.compile(raw) if cfg.compile else raw  # compile first, then wrap (STYLE.md 4)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    if accum > 1:
        log(f"note: {accum} accumulation micro-steps: one extra no-grad forward each, so that SIGReg's statistics "
            f"cover the global batch of {cfg.batch_size} slabs as on {cfg.batch_size // cfg.micro_batch} GPUs")
    log(f"model: ViT-{cfg.vit} + projector{' + heads' if raw.heads is not None else ''}, {n_params / 1e6:.1f}M parameters; "
        f"{world} rank(s) x {cfg.micro_batch} slabs x {accum} accumulation = {cfg.batch_size} slabs/step")

    if cfg.picture:
        return draw_sample(ds, cfg, cfg.picture, log)
    if cfg.bench_data:
        r = bench(ds, cfg, model, pos_weight, device, cfg.bench_data)
        log("bench: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
        return r

    os.makedirs(cfg.out_dir, exist_ok=True)
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if device.type == "cuda" else nullcontext()
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    batches = loader(ds, cfg, start, rank, world, accum, pin=device.type == "cuda")
    peak, slab_flops = peak_flops(device), flops_per_slab(raw, cfg)
    bar = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)
    write = bar.write if bar else log
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    t_start = t_last = time.time()
    step_last, record = start, None
    sums = {}
    for step in range(start, stop):
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro_views = [make_views(next(batches), cfg, device) for _ in range(accum)]
        # With accumulation, SIGReg's statistics come first from a no-grad pass over all micro-batches,
        # so that its batch is the global one whatever the GPU count (DESIGN.md 5-6)
        given = sigreg_statistics(raw, micro_views, cfg, step, autocast) if accum > 1 else None
        counts = step_mask_counts(micro_views, cfg) if accum > 1 else None  # aux means over the step too
        for micro, views in enumerate(micro_views):
            last = micro == accum - 1
            # gradients are all-reduced only on the last micro-step
            with (model.no_sync() if ddp and not last else nullcontext()):
                with autocast:
                    loss, parts = compute_loss(model, views, pos_weight, cfg, step, given, counts, accum)
                (loss / accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bar:
            bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            keys = sorted(sums)
            vals = torch.stack([sums[k] for k in keys]) / (done - step_last)  # mean over the logged steps
            if ddp:
                dist.all_reduce(vals)
                vals /= world
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t_last
            sps = cfg.batch_size * (done - step_last) / dt
            record = {"step": done, **{k: round(float(v), 5) for k, v in zip(keys, vals)}, "lr": lr,
                      "grad_norm": round(float(grad_norm), 4), "slabs_per_s": round(sps, 2),
                      "eta_s": round((stop - done) * dt / (done - step_last)),
                      "elapsed_s": round(time.time() - t_start, 1)}  # this run (a resume starts again at 0)
            if peak:
                record["mfu"] = round(slab_flops * sps / (peak * world), 4)
                record["mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            parts_txt = " ".join(f"{k} {record[k]:.4f}" for k in ("inv", "sigreg", "anat", "abn") if k in record)
            write(f"step {done}/{stop} | loss {record['loss']:.4f} ({parts_txt}) | lr {lr:.2e} | {sps:.1f} slabs/s | "
                  f"eta {record['eta_s'] // 60}m{record['eta_s'] % 60:02d}s"
                  + (f" | mfu {100 * record['mfu']:.1f}% | mem {record['mem_gb']:.1f} GB" if peak else ""))
            if logf:
                logf.write(json.dumps(record) + "\n")
                logf.flush()
            t_last, step_last, sums = time.time(), done, {}
        if master and (done % cfg.ckpt_every == 0 or done == stop):
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), raw, optimizer, done, cfg, pos_anat)
    batches.close()
    if bar:
        bar.close()
    if logf:
        logf.close()
        plot_losses(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "loss.png"), log)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
