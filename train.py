"""
train.py: depth-aware LeJEPA pretraining of a ViT on chest-CT slabs (DALE-CT, arXiv 2606.07775).

A sample is a slab: the slices of one volume within +-6 mm of a centre slice. Two global views come
from the centre slice and eight local views from slab slices drawn independently, so the invariance
term ties neighbouring slices to the centre one (RECIPE.md 3). The loss is LeJEPA (RECIPE.md 5) plus,
for 1S/2S, dense heads that predict the anatomy / abnormality fractions of each crop and patch (RECIPE.md 4).

    python train.py --config=phantom                                  # the CPU demo preset
    python train.py --config=phantom --max_steps=50 --variant=1s      # presets + overrides
    torchrun --nproc_per_node=8 train.py --config=dale_ct_2s          # the paper's run
    python train.py --config=dale_ct_2s --micro_batch=32              # 1 GPU, 16 accumulation steps
    python train.py --config=phantom --resume=auto                    # continue from out_dir/ckpt.pt
    python train.py --config=phantom --picture=sample.png             # draw one training sample
    python train.py --config=phantom --objective=dino                 # DINO instead of LeJEPA (dino.py)
    python train.py --config=phantom_3d --objective=dino              # CoralBay-style: a 3D Swin on cubes

The same loop trains the comparison's other arms (README: 2D slices against native 3D): --objective=dino
swaps the loss for DINO's (dino.py), --input=3d the slab views for cubes of contiguous slices (views3d.py)
and the ViT for a 3D Swin (swin3d.py).

The CPU draws everything random and copies raw slices and masks out of the memmaps; the device then
crops, resizes, augments and derives the soft targets for the whole micro-batch at once.
"""
import json
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends in one line, not a traceback
    import numpy as np
    import torch
except KeyboardInterrupt:  # 130 = 128 + SIGINT, the status a shell gives a Ctrl-C
    print("train.py: interrupted while starting up", file=sys.stderr)
    sys.exit(130)
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dino
import lejepa
import prepare
import swin3d
import views3d
from common import (ABNORMALITY_CODES, FRACTION, N_ANATOMY, NONNEG, POSITIVE, Check, StepLog, at_least,
                    atomic_torch_save, describe, one_of, parse_config, setting,
                    setup_distributed, world_size, load_torch, write_output_folder)
from kernels import fused_sigreg
from lejepa import lejepa_loss
from crops import boxes_to_theta, crop_boxes, crop_resize, intensity, mask_centres, soft_targets
from model import PATCH, VIT_SIZES, DaleCT, vit_flops_per_image
from swin3d import SWIN_SIZES

MULTIPLE_OF_PATCH = Check(lambda v: v > 0 and v % PATCH == 0, f"a positive multiple of the patch size {PATCH}")
SIDE = Check(lambda v: 0 < v <= 1, "a fraction of the slice side in (0, 1]")


# -----------------------------------------------------------------------------
# Configuration: defaults are DALE-CT-2S at full scale; presets in config/*.json list what differs.

@dataclass
class Config:
    # data and output
    data: str = "data/prepared"       # folder written by prepare.py (RECIPE.md 1)
    split: str = "train"              # pretraining sees CT-RATE train only (RECIPE.md 2)
    out_dir: str = "out/dale_ct_2s"   # ckpt.pt, log.jsonl and config.json go here
    # model (RECIPE.md 4)
    # "0": LeJEPA only; "1s": + anatomy heads; "2s": + abnormality heads
    variant: str = setting("2s", Check(lambda v: v.lower() in ("0", "1s", "2s"), "0, 1s or 2s"))
    vit: str = setting("large", one_of(*VIT_SIZES))  # backbone size (model.VIT_SIZES); DALE-CT uses ViT-L
    layerscale_init: float = setting(1e-5, POSITIVE)  # LayerScale's starting gain (RECIPE.md 4)
    proj_hidden: int = setting(2048, at_least(1))     # projector width (RECIPE.md 4)
    proj_dim: int = setting(124, at_least(1))         # K, the projector output SIGReg acts on (RECIPE.md 5)
    # objective and input (README: 2D slices against native 3D); the defaults are DALE-CT's
    objective: str = setting("lejepa", one_of("lejepa", "dino"))  # LeJEPA (lejepa.py) or DINO (dino.py)
    input: str = setting("2d", one_of("2d", "3d"))  # 2d: slab views for the ViT; 3d: cube views (views3d.py) for the 3D Swin
    swin: str = setting("base", one_of(*SWIN_SIZES))  # 3D: swin3d.SWIN_SIZES; base = SwinUNETR's / CoralBay's
    block_mm: float = setting(144.0, POSITIVE)       # 3D: the cube a sample covers (CoralBay: 96 voxels at 1.5 mm)
    # DINO (dino.py; Caron et al. 2021, arXiv 2104.14294, its defaults); its head's hidden width is proj_hidden
    dino_prototypes: int = setting(65536, at_least(2))  # K, the head's output
    dino_bottleneck: int = setting(256, at_least(1))    # the head's L2-normalised bottleneck
    dino_student_temp: float = setting(0.1, POSITIVE)
    dino_teacher_temp: float = setting(0.07, POSITIVE)        # after the warm-up
    dino_teacher_temp_start: float = setting(0.04, POSITIVE)  # warm-up from here ...
    dino_teacher_temp_steps: int = setting(15000, NONNEG)     # ... over 30 of DINO's 100 epochs = 30% of max_steps
    dino_center_momentum: float = setting(0.9, FRACTION)
    dino_ema: float = setting(0.996, FRACTION)                # teacher EMA momentum, cosine to 1 at max_steps
    dino_freeze_last_steps: int = setting(500, NONNEG)        # prototypes fixed for DINO's first epoch (1%)
    # views (RECIPE.md 3)
    slab_mm: float = setting(12.0, NONNEG)            # local slices within +-slab_mm/2 of the centre; 0 = pure 2D
    n_local: int = setting(8, at_least(1))            # local views per slab (plus 2 global views)
    global_size: int = setting(256, MULTIPLE_OF_PATCH)  # global view side in px (and the stored pos_embed grid); 3D: voxels
    local_size: int = setting(144, MULTIPLE_OF_PATCH)   # local view side in px; 3D: voxels
    global_scale_min: float = setting(0.6, SIDE)  # global crop side as a fraction of the slice side
    global_scale_max: float = setting(1.0, SIDE)
    local_scale_min: float = setting(0.3, SIDE)   # local crop side as a fraction of the slice side
    local_scale_max: float = setting(0.6, SIDE)
    p_mask_centred: float = setting(0.8, FRACTION)    # local crop centred on an abnormality (else anatomy) pixel
    p_abnormal_volume: float = setting(0.2, FRACTION)  # 2S: draw from the abnormality-bearing volumes this often
    p_flip: float = setting(0.5, FRACTION)            # horizontal flip, every view
    p_gamma: float = setting(0.8, FRACTION)           # gamma on [0,1]-scaled intensities, every view
    gamma_min: float = setting(0.9, POSITIVE)
    gamma_max: float = setting(1.1, POSITIVE)
    p_blur_global1: float = setting(0.5, FRACTION)    # 3x3 Gaussian blur on global view 1
    p_blur_global2: float = setting(0.1, FRACTION)    # ... and on global view 2
    blur_sigma_min: float = setting(0.1, NONNEG)      # blur sigma range in px (DINO's range)
    blur_sigma_max: float = setting(2.0, NONNEG)
    target_samples: int = setting(8, at_least(1))     # mask samples per patch side for the soft targets
    # loss (RECIPE.md 4-5)
    # L = (1 - lam) * inv + lam * SIGReg; collapse costs lam * 0.402 * N, so small batches need more
    lam: float = setting(0.02, FRACTION)
    num_slices: int = setting(1024, at_least(1))      # M, SIGReg's random directions, redrawn every step
    fused_sigreg: bool = True         # on CUDA: the Triton SIGReg kernel (kernels/sigreg.py), same numbers
    aux_weight: float = setting(0.1, NONNEG)          # aux = aux_weight * (0.5 * L_cls + 0.5 * L_patch)
    abn_pos_weight: float = setting(800.0, POSITIVE)  # BCE positive weight of every abnormality category
    anat_pos_weight_max: float = setting(1000.0, at_least(1))  # anatomy: 1/frequency clipped to [1, this]
    pos_weight_slices: int = setting(1024, at_least(1))  # training slices sampled to measure anatomy frequencies
    # optimisation (RECIPE.md 6)
    batch_size: int = setting(512, at_least(1))       # GLOBAL batch in slabs: micro_batch x ranks x accumulation
    micro_batch: int = setting(64, at_least(1))       # slabs per rank per forward/backward
    max_steps: int = setting(50000, at_least(1))      # optimiser steps; the cosine ends here
    warmup_steps: int = setting(5000, NONNEG)         # linear warmup 0 -> lr
    lr: float = setting(3e-4, POSITIVE)               # peak learning rate
    min_lr: float = setting(3e-5, NONNEG)             # end of the cosine
    weight_decay: float = setting(0.04, NONNEG)       # on weight matrices only (see make_optimizer)
    beta1: float = setting(0.9, Check(lambda v: 0 <= v < 1, "a number in [0, 1)"))  # PyTorch's AdamW betas
    beta2: float = setting(0.999, Check(lambda v: 0 <= v < 1, "a number in [0, 1)"))
    eps: float = setting(1e-6, POSITIVE)              # AdamW eps (RECIPE.md 6)
    grad_clip: float = setting(3.0, NONNEG)           # global gradient-norm clip; 0 = off
    # system
    device: str = "auto"              # auto (cuda if present), cpu, cuda, cuda:N
    data_workers: int = setting(2, at_least(1))       # threads gathering micro-batches ahead of the device
    dtype: str = setting("bfloat16", one_of("bfloat16", "float32"))  # autocast dtype on CUDA; CPU runs float32
    compile: bool = False             # torch.compile the model (then DDP-wrap it)
    seed: int = setting(0, NONNEG)    # model init and every data draw derive from it
    log_every: int = setting(10, at_least(1))         # steps between log lines
    ckpt_every: int = setting(1000, at_least(1))      # steps between checkpoints (and one at the end)
    # stop (with a checkpoint) at this step, 0 = max_steps; the schedule still follows max_steps
    stop_at: int = setting(0, NONNEG)
    resume: str = ""                  # "" = fresh start; "auto" (or a bare --resume) = out_dir/ckpt.pt if any; a path
    picture: str = ""                 # a .png path: draw one training sample (slab, 2 global + 8 local views), exit

    def problems(self):
        """Settings that are wrong together (each one alone passed its check)."""
        for low, high in (("global_scale_min", "global_scale_max"), ("local_scale_min", "local_scale_max"),
                          ("gamma_min", "gamma_max"), ("blur_sigma_min", "blur_sigma_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo > hi:
                yield f"--{low}={lo} is above --{high}={hi}"
        if self.batch_size % self.micro_batch:
            yield f"--batch_size={self.batch_size} is not a multiple of --micro_batch={self.micro_batch}"
        if self.input == "3d" and self.variant != "0":
            yield f"--variant={self.variant} needs slice masks under every patch: with --input=3d use --variant=0"
        if self.input == "3d" and self.picture:
            yield "--picture draws 2D samples only; drop it with --input=3d"


# What each input and objective leaves unused: a command line that sets one is told it has no effect
# (a preset may carry them for the other arms)
UNUSED = {("input", "3d"): ("vit", "layerscale_init", "slab_mm", "p_mask_centred", "p_abnormal_volume",
                            "p_blur_global1", "p_blur_global2", "blur_sigma_min", "blur_sigma_max", "target_samples",
                            "aux_weight", "abn_pos_weight", "anat_pos_weight_max", "pos_weight_slices"),
          ("input", "2d"): ("swin", "block_mm"),
          ("objective", "dino"): ("proj_dim", "lam", "num_slices", "fused_sigreg"),
          ("objective", "lejepa"): tuple(f.name for f in fields(Config) if f.name.startswith("dino_"))}


def unused_settings(cfg, argv):
    """The command line's settings that this run's input and objective do not use."""
    given = {a[2:].partition("=")[0].replace("-", "_") for a in argv}
    return [f"--{k}" for (key, value), names in UNUSED.items() if getattr(cfg, key) == value
            for k in names if k in given]


def parse_args(argv):
    """Defaults, then --config=NAME (config/NAME.json), then --key=value; a bare --resume means auto."""
    cfg = parse_config(Config, argv, "train.py", bare={"resume": "auto"}, presets=True)
    cfg.variant = cfg.variant.lower()
    return cfg


# -----------------------------------------------------------------------------
# Sampling slabs (CPU). Every random choice of a sample comes from a generator seeded by (seed, step,
# slot), slot = the sample's position in the step's GLOBAL batch: a resume replays nothing, ranks never
# draw each other's samples, and a step sees the same slabs on any number of GPUs (README: sampling).

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
    """Micro-batches in training order from start_step on, data_workers of them gathered ahead in threads
    (memmap reads and numpy copies release the GIL)."""
    def load(step, micro):
        slots = slots_for(step, rank, micro, cfg, world)
        if cfg.input == "3d":  # cubes of contiguous slices instead of slabs (views3d.py)
            b = views3d.gather_blocks(ds, views3d.plan_blocks(ds, cfg, step, slots), cfg.block_mm)
        else:
            b = gather(ds, plan_slabs(ds, cfg, step, slots))
        return {k: v.pin_memory() for k, v in b.items()} if pin else b  # pinned: async host-to-device copies

    keys = ((step, micro) for step in range(start_step, 1 << 62) for micro in range(accum))
    with ThreadPoolExecutor(cfg.data_workers) as pool:
        ahead = deque(pool.submit(load, *next(keys)) for _ in range(cfg.data_workers))
        for key in keys:  # results are taken in submission order: the training order never changes
            batch = ahead.popleft().result()
            ahead.append(pool.submit(load, *key))
            yield batch


# -----------------------------------------------------------------------------
# Views and soft targets (device, batched; the crop, resize and intensity operations are in crops.py).
# Rows are view-major: row v*B + b is view v of sample b.

def make_views(batch, cfg, device):
    """CPU micro-batch from gather() -> network inputs and soft targets on `device`.
    Returns xg (2B,1,G,G), xl (L*B,1,l,l), targets {"g": {...}, "l": {...}}, has_anatomy, has_abnormality."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    families = {"0": (), "1s": ("anat",), "2s": ("anat", "abn")}[cfg.variant]
    vm = lambda t: t.transpose(0, 1).reshape(-1, *t.shape[2:])  # (B, V, ...) -> (V*B, ...) view-major
    # global views: both from the centre slice
    src = b["index"][:, 0].repeat(2)  # (2B,)
    theta = crop_boxes(vm(b["g_scale"]), vm(b["g_pos"]), vm(b["g_flip"]))  # (2B, 2, 3)
    xg = intensity(crop_resize(b["slices"][src], theta, cfg.global_size, cfg.global_scale_max), vm(b["g_gamma"]), vm(b["g_sigma"]))
    tg = soft_targets(b["anatomy"][src], b["abnormal"][src], theta, cfg.global_size, cfg.target_samples, families)
    # local views: one slab slice each, the box centred on a mask pixel with p_mask_centred
    src = vm(b["index"][:, 1:])  # (L*B,)
    scale, flip = vm(b["l_scale"]), vm(b["l_flip"])
    centre = scale[:, None] / 2 + vm(b["l_pos"]) * (1 - scale[:, None])  # (L*B, 2) uniform placement
    on_mask, found = mask_centres(b["abnormal"][src], b["anatomy"][src], vm(b["l_pick"]))
    on_mask = on_mask.clamp(scale[:, None] / 2, 1 - scale[:, None] / 2)  # keep the box in the slice
    centre = torch.where(((vm(b["l_centred"]) > 0) & found)[:, None], on_mask, centre)
    theta = boxes_to_theta(scale, centre, flip)  # (L*B, 2, 3)
    xl = intensity(crop_resize(b["slices"][src], theta, cfg.local_size, cfg.local_scale_max), vm(b["l_gamma"]), None)
    tl = soft_targets(b["anatomy"][src], b["abnormal"][src], theta, cfg.local_size, cfg.target_samples, families)
    return dict(xg=xg, xl=xl, targets={"g": tg, "l": tl},
                has_anatomy=b["has_anatomy"], has_abnormality=b["has_abnormality"])


# -----------------------------------------------------------------------------
# Model and loss

def anatomy_pos_weight(ds, cfg):
    """Per-class BCE positive weight: 1 / pixel frequency over pos_weight_slices training slices, clipped."""
    vols = np.flatnonzero(ds.has_anatomy)
    if len(vols) == 0:
        return torch.ones(N_ANATOMY)
    rng = np.random.default_rng([cfg.seed, 1])
    v = rng.choice(vols, cfg.pos_weight_slices)
    idx = np.unique(ds.start[v] + (rng.random(len(v)) * ds.count[v]).astype(np.int64))
    counts = np.bincount(np.asarray(ds.anatomy[idx]).ravel(), minlength=N_ANATOMY)[:N_ANATOMY]
    freq = counts / max(counts.sum(), 1)
    return torch.tensor(np.clip(1.0 / np.maximum(freq, 1e-12), 1.0, cfg.anat_pos_weight_max), dtype=torch.float32)


def global_mean(per_sample, weight, total=None, accum=1):
    """Mean of per_sample over the weighted samples of ALL ranks (and, given the step's total weight, of
    all `accum` micro-batches): each rank's sum times world * accum / total, averaged over ranks by DDP
    and summed over micro-steps / accum, is sum_all / total."""
    world = world_size()
    if total is None:  # this micro-batch's count over all ranks
        total = weight.sum().float()
        if world > 1:
            dist.all_reduce(total)
    return (per_sample * weight).sum() * world * accum / total.clamp(min=1)


def step_mask_counts(micro_views, cfg):
    """Samples with anatomy / abnormality masks over all micro-batches of a step and all ranks."""
    counts = torch.stack([sum(v["has_anatomy"].sum() for v in micro_views),
                          sum(v["has_abnormality"].sum() for v in micro_views)]).float()  # (2,)
    if world_size() > 1:
        dist.all_reduce(counts)
    return {"anat": counts[0], "abn": counts[1]}


def aux_loss(aux_g, aux_l, views, pos_weight, cfg, counts=None, accum=1):
    """aux = w * (0.5 * L_cls + 0.5 * L_patch), each the mean of the families' BCE (RECIPE.md 4); a family
    counts only on samples with its masks; every view weighs the same (summed over views, divided by V)."""
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
    """SIGReg's cos/sin sums over every micro-batch of the step and every rank (no grad), so that each
    micro-step's SIGReg value and gradient are those of the whole global batch."""
    with torch.no_grad(), autocast:
        zs = [raw.embed(v["xg"], v["xl"]).float().view(2 + cfg.n_local, len(v["has_anatomy"]), -1)
              for v in micro_views]  # [(V, B, K)] per micro-batch
    return lejepa.global_sums(zs, step, cfg.num_slices)


def compute_loss(model, views, pos_weight, cfg, step, given=None, counts=None, accum=1, fused=None, teacher=None):
    """Forward one micro-batch; returns the total loss and a dict of detached parts for the log.
    given: SIGReg's statistics over the whole step (sigreg_statistics), or None = this micro-batch's;
    counts: the step's mask counts (step_mask_counts) for the aux means, or None = this micro-batch's;
    fused: the Triton SIGReg (fused_sigreg) in place of lejepa.py's PyTorch path, or None;
    teacher: DINO's (dino.Teacher), which makes the objective DINO's instead of LeJEPA's."""
    z, aux_g, aux_l = model(views["xg"], views["xl"])
    B = len(views["has_anatomy"])
    z = z.float().view(2 + cfg.n_local, B, -1)  # (V, B, K); SIGReg sums in float32 (RECIPE.md 5)
    if teacher is not None:  # DINO: every student view against the teacher's other global view(s)
        t = teacher(views["xg"]).view(2, B, -1)  # (2, B, K)
        temp = dino.teacher_temperature(step, cfg.dino_teacher_temp_steps, cfg.dino_teacher_temp_start,
                                        cfg.dino_teacher_temp)
        loss = dino.dino_loss(z, t, teacher.center, cfg.dino_student_temp, temp)
        parts = {"dino": loss, "entropy": dino.teacher_entropy(t.flatten(0, 1), teacher.center, temp)}
    else:
        loss, lj = lejepa_loss(z, n_global=2, lam=cfg.lam, step=step, num_slices=cfg.num_slices, given=given, fused=fused)
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
    """AdamW; weight decay only on weight matrices: not on 1-D gains and biases, nor on pos_embed and
    cls_token, which are learned inputs (timm and DINO exclude them too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.split(".")[-1] in ("pos_embed", "cls_token") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def get_lr(step, cfg):
    """Linear warmup 0 -> lr over warmup_steps, then cosine to min_lr at max_steps (RECIPE.md 6)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints

# What a resumed run may change: where things are, how often it logs and saves, how it runs, and
# max_steps (upward: the cosine then stretches from the resumed step on). Anything else would make the
# run a different training from the checkpoint's, so it is refused (README: resume).
RESUMABLE = ("data", "out_dir", "device", "data_workers", "compile", "fused_sigreg", "log_every", "ckpt_every",
             "stop_at", "resume", "picture", "max_steps")


def save_checkpoint(path, raw, optimizer, step, cfg, pos_weight, teacher=None):
    """Atomic (path.tmp, then renamed): a crash never leaves half a checkpoint. "model" is the backbone to
    evaluate (timm key names for the ViT, MONAI's for the 3D Swin): with DINO the teacher's, as DINO evaluates."""
    ckpt = {"model": (teacher.net if teacher else raw).backbone.state_dict(),
            "student": raw.backbone.state_dict() if teacher else None,
            "teacher": teacher.state_dict() if teacher else None,
            "projector": raw.projector.state_dict(),
            "heads": raw.heads.state_dict() if raw.heads is not None else None,
            "optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg),
            "vit": cfg.vit, "img_size": cfg.global_size, "pos_weight": pos_weight, "input": cfg.input, "swin": cfg.swin,
            "rng": {"torch": torch.get_rng_state(), "data": "derived from (seed, step, slot)"}}
    try:
        atomic_torch_save(ckpt, path)
    except OSError as e:  # the half-written path.tmp is gone; the previous checkpoint is intact
        raise SystemExit(f"{path}: cannot write the step-{step} checkpoint ({e.strerror}); free space in "
                         f"{os.path.dirname(path) or '.'} and resume with --resume=auto") from None


def resume_path(cfg):
    if not cfg.resume:
        return None
    path = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
    if not os.path.isfile(path):
        if cfg.resume == "auto":
            return None  # nothing to continue: a fresh start
        raise SystemExit(f"--resume={path}: no such checkpoint file")
    return path


def load_checkpoint(path, raw, optimizer, cfg, teacher=None):
    try:
        ckpt = load_torch(path)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    old, new = ckpt.get("config", {}), asdict(cfg)
    diff = [f"--{k}={new[k]} (the checkpoint's: {old[k]})" for k in new
            if k in old and k not in RESUMABLE and old[k] != new[k]]
    if diff:
        raise SystemExit(f"{path}: this run's settings differ from the checkpoint's: {', '.join(diff)}; resume with "
                         f"the checkpoint's settings (its config.json), or start a new --out_dir")
    if cfg.max_steps < ckpt.get("step", 0):
        raise SystemExit(f"{path}: the checkpoint is at step {ckpt['step']}, beyond --max_steps={cfg.max_steps}: "
                         f"give --max_steps={ckpt['step']} or more (the checkpoint's: {old.get('max_steps')})")
    try:
        raw.backbone.load_state_dict(ckpt["student"] if teacher else ckpt["model"])
        if teacher:
            teacher.load_state_dict(ckpt["teacher"])
        raw.projector.load_state_dict(ckpt["projector"])
        if raw.heads is not None:
            raw.heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"], ckpt["pos_weight"]


# -----------------------------------------------------------------------------
# Set-up and logging: what main() needs before its loop, and its log lines


def build(cfg, ds, device, ddp, world, accum, log):
    """The model (compiled, then DDP-wrapped), its optimiser, the step to start from, the BCE weights."""
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    raw = DaleCT(cfg).to(device)
    optimizer = make_optimizer(raw, cfg, fused=device.type == "cuda")
    teacher = dino.Teacher(raw, cfg.dino_prototypes) if cfg.objective == "dino" else None
    start, pos_anat = 0, None
    path = resume_path(cfg)
    if path:
        start, pos_anat = load_checkpoint(path, raw, optimizer, cfg, teacher)
        log(f"resumed {path} at step {start}")
    if pos_anat is None:
        pos_anat = anatomy_pos_weight(ds, cfg)
    n_abn = len(ABNORMALITY_CODES)
    pos_weight = {"anat": pos_anat.to(device), "abn": torch.full((n_abn,), cfg.abn_pos_weight, device=device)}
    model = torch.compile(raw) if cfg.compile else raw  # compile first, then wrap in DDP
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    if accum > 1:
        log(f"note: {accum} accumulation micro-steps: one extra no-grad forward each, so that SIGReg's statistics "
            f"cover the global batch of {cfg.batch_size} slabs as on {cfg.batch_size // cfg.micro_batch} GPUs")
    net = f"3D Swin-{cfg.swin}" if cfg.input == "3d" else f"ViT-{cfg.vit}"
    head = "DINO head + EMA teacher" if teacher else "projector"
    log(f"model: {net} + {head}{' + heads' if raw.heads is not None else ''}, {n_params / 1e6:.1f}M parameters; "
        f"{world} rank(s) x {cfg.micro_batch} {'blocks' if cfg.input == '3d' else 'slabs'} x {accum} accumulation "
        f"= {cfg.batch_size} per step")
    return raw, model, optimizer, teacher, start, pos_anat, pos_weight


def open_data(cfg, log):
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
    return ds


# -----------------------------------------------------------------------------
# The run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp, rank, world, device = setup_distributed(cfg.device)  # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    fused = fused_sigreg(device, log) if cfg.fused_sigreg and device.type == "cuda" else None
    if cfg.batch_size % (cfg.micro_batch * world):
        raise SystemExit(f"batch_size={cfg.batch_size} is not micro_batch={cfg.micro_batch} x {world} ranks x "
                         f"an integer accumulation; change micro_batch or batch_size")
    accum = cfg.batch_size // (cfg.micro_batch * world)
    log(describe(cfg))
    ds = open_data(cfg, log)

    unused = unused_settings(cfg, argv)
    if unused:
        log(f"note: --input={cfg.input} --objective={cfg.objective} does not use {', '.join(unused)}: no effect")
    raw, model, optimizer, teacher, start, pos_anat, pos_weight = build(cfg, ds, device, ddp, world, accum, log)
    if cfg.picture:
        import plots
        return plots.draw_sample(ds, cfg, cfg.picture, (plan_slabs, slab_range, gather, make_views), log)

    if master:  # room for two checkpoints (the next beside the last): float32 weights and Adam's two moments
        write_output_folder(cfg.out_dir, "--out_dir", {"config.json": json.dumps(asdict(cfg), indent=1)},
                            need=2 * 3 * 4 * sum(p.numel() for p in raw.parameters()))
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if device.type == "cuda" else nullcontext()
    stop = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    batches = loader(ds, cfg, start, rank, world, accum, pin=device.type == "cuda")
    bar = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    # training FLOPs of a sample: 3x the forward of its 2 global and n_local local views (projector, heads < 1%),
    # and with DINO the teacher's forward of the 2 global views
    flops = (lambda n: swin3d.flops(raw.backbone, n)) if cfg.input == "3d" else (lambda n: vit_flops_per_image(raw.backbone, n))
    slab_flops = (3 * (2 * flops(cfg.global_size) + cfg.n_local * flops(cfg.local_size))
                  + (2 * flops(cfg.global_size) if teacher else 0))
    meter = StepLog(cfg.batch_size, slab_flops, device, start, stop, world, bar.write if bar else log, logf,
                    shown=("inv", "sigreg", "dino", "entropy", "anat", "abn"))
    for step in range(start, stop):
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        views_of = views3d.make_views3d if cfg.input == "3d" else make_views
        micro_views = [views_of(next(batches), cfg, device) for _ in range(accum)]
        # With accumulation, SIGReg's statistics come first from a no-grad pass over all micro-batches,
        # so that its batch is the global one whatever the GPU count (RECIPE.md 5-6)
        given = sigreg_statistics(raw, micro_views, cfg, step, autocast) if accum > 1 and not teacher else None
        counts = step_mask_counts(micro_views, cfg) if accum > 1 else None  # aux means over the step too
        for micro, views in enumerate(micro_views):
            last = micro == accum - 1
            with (model.no_sync() if ddp and not last else nullcontext()):  # all-reduce on the last micro-step
                with autocast:
                    loss, parts = compute_loss(model, views, pos_weight, cfg, step, given, counts, accum, fused, teacher)
                (loss / accum).backward()
            meter.add(parts, accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if teacher and step < cfg.dino_freeze_last_steps:  # DINO: the prototypes wait while the rest settles
            raw.projector.prototypes.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher:  # DINO: the teacher follows the student, the centre follows the teacher
            teacher.step(raw, dino.teacher_momentum(step, cfg.max_steps, cfg.dino_ema), cfg.dino_center_momentum)
        if bar:
            bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            meter.log(done, lr, grad_norm)
        if master and (done % cfg.ckpt_every == 0 or done == stop):
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), raw, optimizer, done, cfg, pos_anat, teacher)
    batches.close()
    if bar:
        bar.close()
    if logf:
        logf.close()
        import plots
        plots.plot_losses(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "loss.png"), log)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return meter.record


if __name__ == "__main__":
    main()
