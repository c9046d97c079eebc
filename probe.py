"""
probe.py: how much of CT-RATE's 18 abnormalities a checkpoint's frozen features already know (RECIPE.md 7).

Every slice of a prepared dataset goes through the frozen ViT once (its CLS token is cached); a volume is a
bag of those vectors. A multiple-instance linear probe (pool the bag, then Linear(d, 18)) is trained on
`train` for every pooling and learning rate at once, selected on `val` (held-out train patients) and scored
once on `test` (CT-RATE valid): macro AUROC, AUPRC, F1 and balanced accuracy with bootstrap 95% intervals,
and how linearly slice depth reads out of the features (ridge R^2); metrics.py computes them.

    python probe.py --ckpt=out/phantom/ckpt.pt --img_size=64 --steps=600   # the phantom demo
    python probe.py --random_init --img_size=64 --steps=600                 # the floor pretraining must beat
    python probe.py --ckpt=out/dale_ct_2s/ckpt.pt --data=/data/dalect_512   # RECIPE.md 7 at full scale
    python probe.py --compare=out/probe_random,out/probe_2s --out=out       # one table over earlier runs
    python benchmarks/probe_speed.py                                        # slices/s, grid vs one probe

Writes OUT/results.json and OUT/results.md (config, checkpoint identity, data manifest, per-seed selection,
test metrics: mean and std over probe seeds, bootstrap 95% intervals, per-class table), OUT/test_scores.npz
(what --compare reads) and OUT/roc.png. Reference results: RECIPE.md 8.
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends in one line, not a traceback
    import numpy as np
    import torch
except KeyboardInterrupt:  # 130 = 128 + SIGINT, the status a shell gives a Ctrl-C
    print("probe.py: interrupted while starting up", file=sys.stderr)
    sys.exit(130)
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import backbones
import plots
import report
import swin3d
import views3d
import worldmodel
from common import (NONEMPTY, NONNEG, POSITIVE, SPLITS, Check, at_least, describe, device_name, load_torch, one_of,
                    parse_config, pick_device, setting, writable)
from metrics import average_precision, best_f1_thresholds, classification_report, covered_classes, depth_r2, macro
from model import PATCH, VIT_SIZES, build_vit
from prepare import HU_CLIP, HU_MEAN, HU_STD, PreparedError, open_split
from swin3d import SWIN_SIZES

# The release's grid (RECIPE.md 7): 3 poolings x 6 learning rates; "attn_class" (one query per class) is ours
POOLINGS = ("avg", "max", "attn")
ALL_POOLINGS = POOLINGS + ("attn_class",)
LRS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
SELECTIONS = ("first_seed", "per_seed")
# Intensity normalisation a backbone was trained with, in HU: clip to [lo, hi], then (x - mean) / std (RECIPE.md 9)
NORMS = {"dale_ct": (*HU_CLIP, HU_MEAN, HU_STD),            # CT-RATE's: DALE-CT-0, -1S, -2S, the baseline, ours
         "dale_ct_0_l": (-940.8, 923.1, -25.03, 246.87)}    # DALE-CT-0-L's own (its model card)


def norm_values(spec):
    """--norm: a NORMS name or "lo,hi,mean,std" -> (lo, hi, mean, std); ValueError if neither."""
    if spec in NORMS:
        return NORMS[spec]
    v = tuple(float(x) for x in spec.split(","))
    if len(v) != 4 or not v[0] < v[1] or not v[3] > 0:
        raise ValueError(spec)
    return v


def valid_norm(spec):
    try:
        return bool(norm_values(spec))
    except ValueError:
        return False

# -----------------------------------------------------------------------------
# Configuration

@dataclass
class ProbeConfig(worldmodel.WorldModelConfig):  # the world-model probes' wm_* settings come first
    world_model: bool = True      # also run worldmodel.py's probes (findings and organs, slice order, rank)
    # what to evaluate
    ckpt: str = ""                # train.py checkpoint (.pt) or released weights (.safetensors, timm keys)
    random_init: bool = False     # evaluate an untrained backbone instead: the floor pretraining must beat
    vit: str = setting("tiny", one_of(*VIT_SIZES))  # random_init's size; a checkpoint's comes from its weights
    input: str = setting("2d", one_of("2d", "3d"))  # random_init's kind: 2d = a ViT, 3d = a 3D Swin (swin3d.py)
    swin: str = setting("tiny", one_of(*SWIN_SIZES))  # random_init 3d: its size
    # 3D encoders: a volume is a bag of windows block_mm deep at window_voxels along that depth (views3d.py);
    # 0 = the pretraining's block_mm and global_size (a train.py checkpoint's config), as its views were cut
    block_mm: float = setting(0.0, NONNEG)
    window_voxels: int = setting(0, NONNEG)
    # random_init only: LayerScale's starting gain; give the pretraining run's, so the floor is its step 0
    layerscale_init: float = setting(1e-5, POSITIVE)
    data: str = setting("data/prepared", NONEMPTY)  # folder written by prepare.py (train, val, test)
    out: str = setting("out/probe", NONEMPTY)       # results.json and results.md go here
    device: str = setting("auto", NONEMPTY)         # auto = cuda when available, else cpu
    # features
    cache: str = ""  # the feature cache, keyed by (checkpoint, img_size, data); "" = DATA/features
    img_size: int = setting(256, at_least(PATCH))   # slices resized to this for the backbone (RECIPE.md 7)
    norm: str = setting("dale_ct", Check(valid_norm, f"one of {', '.join(NORMS)}, or lo,hi,mean,std in HU (lo < hi, std > 0)"))
    feat_batch: int = setting(64, at_least(1))      # slices per forward pass
    # MIL linear probe, the release's protocol (RECIPE.md 7); config/probe_demo.json is the demo's short one
    poolings: tuple = setting(POOLINGS, one_of(*ALL_POOLINGS))  # attn: one learned query; attn_class: one per class
    lrs: tuple = setting(LRS, POSITIVE)             # peak SGD learning rates, cosine-decayed to 0
    steps: int = setting(15000, at_least(1))        # SGD steps; the phantom demo needs far fewer
    batch: int = setting(16, at_least(1))           # volumes per step
    momentum: float = setting(0.95, Check(lambda v: 0 <= v < 1, "a number in [0, 1)"))  # no weight decay
    evals: int = setting(6, at_least(1))            # validation checkpoints, evenly spaced (every 2,500 of 15,000)
    # first_seed: (pooling, lr, step) chosen on the first seed's grid, then every seed trains that probe alone;
    # per_seed: every seed trains the grid and chooses its own
    selection: str = setting("first_seed", one_of(*SELECTIONS))
    seeds: int = setting(5, at_least(1))            # probe seeds (init, minibatch order): mean and std
    seed: int = setting(0, NONNEG)                  # first probe seed; a random_init backbone is drawn from it
    n_boot: int = setting(2000, at_least(1))        # bootstrap resamples of test volumes for the 95% intervals
    depth_max_slices: int = setting(200000, at_least(1))  # train slices fitting the depth ridge (a random subset)
    compare: str = ""             # comma-separated result folders of earlier runs: print one table, no probing

    def problems(self):
        """Settings that are wrong together, one line each."""
        checks = [
            (self.random_init and self.img_size % PATCH,
             f"--img_size={self.img_size}: must be a multiple of the patch size {PATCH}"),  # a checkpoint's: load_model
            (not self.poolings, "--poolings: give at least one of " + ", ".join(POOLINGS)),
            (not self.lrs, "--lrs: give at least one learning rate"),
            (not self.compare and bool(self.ckpt) == self.random_init,
             "give exactly one of --ckpt=PATH (a checkpoint to evaluate) or --random_init (or --compare=DIRS)"),
            (self.random_init and self.input == "3d" and not (self.block_mm and self.window_voxels),
             "--random_init --input=3d: give --block_mm and --window_voxels (the 3D arm's pretraining block)"),
        ]
        return [message for wrong, message in checks if wrong]


def parse_args(argv):
    """--key=value overrides of ProbeConfig (a bare --flag sets a bool); a bad value exits with one line."""
    if any(arg.partition("=")[0] == "--bench" for arg in argv):
        sys.exit("probe.py: --bench moved to its own script: python benchmarks/probe_speed.py")
    return parse_config(ProbeConfig, argv, "probe.py", presets=True)


# -----------------------------------------------------------------------------
# Features: the CLS token of every slice, computed once per (checkpoint, img_size, data) and cached

def load_model(cfg):
    """The frozen backbone and its identity (what the feature cache is keyed by)."""
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        if cfg.input == "3d":
            net = swin3d.build(cfg.swin)
            return net, {"kind": "random_init", "vit": f"swin3d-{cfg.swin}", "input": "3d", "seed": cfg.seed,
                         "block_mm": cfg.block_mm, "window_voxels": cfg.window_voxels,
                         "sha256": state_dict_sha256(net.state_dict())}
        vit = build_vit(cfg.vit, img_size=cfg.img_size, init_values=cfg.layerscale_init)
        return vit, {"kind": "random_init", "vit": cfg.vit, "seed": cfg.seed,
                     "layerscale_init": cfg.layerscale_init, "sha256": state_dict_sha256(vit.state_dict())}
    path = Path(cfg.ckpt)
    if not path.is_file():
        sys.exit(f"probe.py: checkpoint {path} not found; give --ckpt=PATH of a train.py checkpoint or weights")
    # Format, size, patch, registers and native grid come from the weights (released weights carry no config)
    try:
        vit, info = backbones.load(path)  # at its native grid: resampled once per forward, as in timm
    except (ValueError, ImportError, KeyError) as e:
        sys.exit(f"probe.py: cannot use {path} as a backbone: {str(e).splitlines()[0]}")
    if info.get("input") == "3d":  # a 3D Swin: windows as its pretraining cut blocks, unless told otherwise
        train_cfg = load_torch(path).get("config", {}) if path.suffix == ".pt" else {}
        info["block_mm"] = cfg.block_mm or train_cfg.get("block_mm")
        info["window_voxels"] = cfg.window_voxels or train_cfg.get("global_size")
        if not (info["block_mm"] and info["window_voxels"]):
            sys.exit(f"probe.py: {path} is a 3D Swin without a train.py config: give --block_mm and --window_voxels")
        with open(path, "rb") as f:
            info["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        return vit, {"kind": "checkpoint", "path": str(path), **info}
    n, p = cfg.img_size // vit.patch_size, vit.patch_size
    if cfg.img_size % p:  # the release probes every backbone at 256 px, patch 14 included (RECIPE.md 9)
        print(f"note: patch {p} at --img_size={cfg.img_size}: {n}x{n} patches cover {n * p} px; the last "
              f"{cfg.img_size - n * p} px rows and columns are not seen, as by timm's patch embedding")
    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return vit, {"kind": "checkpoint", "path": str(path), "sha256": sha256, **info}


@torch.no_grad()
def extract_features(vit, slices, img_size, batch_size=64, device="cpu", out=None, desc="features", norm=NORMS["dale_ct"]):
    """int16 HU slices (S, H, W) -> CLS tokens (S, D), written into `out` (e.g. a memmap) if given;
    norm = (lo, hi, mean, std), the backbone's own intensity normalisation."""
    device = torch.device(device)
    vit.eval().to(device)
    out = np.empty((len(slices), vit.embed_dim), np.float32) if out is None else out
    bar = tqdm(total=len(slices), desc=desc, unit="slice", unit_scale=True, leave=False, disable=None)
    for i in range(0, len(slices), batch_size):
        x = torch.from_numpy(np.array(slices[i:i + batch_size], np.int16)).to(device)  # a copy: memmaps are read-only
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls, _ = vit(model_input(x, vit, img_size, norm))       # (B, D)
        out[i:i + len(x)] = cls.float().cpu().numpy()
        bar.update(len(x))
    bar.close()
    return out


def normalize(hu, norm):
    """HU tensor -> network input: prepare.normalize_hu with a backbone's own (lo, hi, mean, std)."""
    lo, hi, mean, std = norm
    return (hu.float().clamp(lo, hi) - mean) / std


def model_input(hu, vit, img_size, norm):
    """int16 HU slices (B, H, W) -> the backbone's input (B, C, n*p, n*p): normalised as the backbone was
    trained, resized to img_size (bilinear, antialiased), cut to whole patches (what a strided patch
    convolution sees anyway), and the one channel repeated for an RGB stem (the slice on every channel)."""
    x = normalize(hu, norm)[:, None]                                    # (B, 1, H, W)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    n = img_size // vit.patch_size * vit.patch_size
    return x[..., :n, :n].expand(-1, vit.in_chans, -1, -1)             # (B, C, n, n)


def state_dict_sha256(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_identity(root):
    """What features depend on in the data folder; slices.i16's size and mtime change when prepare.py reruns."""
    root = Path(root)
    h = hashlib.sha256((root / "manifest.json").read_bytes())
    for split in SPLITS:
        h.update((root / split / "volumes.json").read_bytes())
        st = (root / split / "slices.i16").stat()
        h.update(f"{split}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_features(cache, split, slices, vit, identity, batch_size=64, device="cpu", windows=None):
    """CLS features (S, D) of a split at identity["img_size"], cached in CACHE/KEY/SPLIT.f32, KEY a hash of
    the identity (checkpoint, img_size, normalisation, data). Written, then renamed: complete or absent.
    windows: a views3d.WindowSplit: the 3D encoder's embedding of every window (W, D) instead."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / key / f"{split}.f32"
    shape = (len(slices) if windows is None else int(windows.count.sum()), vit.embed_dim)
    if path.is_file() and path.stat().st_size == 4 * shape[0] * shape[1]:
        return np.memmap(path, np.float32, "r", shape=shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: two runs never share one
    # float32: a random-init ViT's CLS tokens vary across slices by less than float16's resolution
    arr = np.memmap(tmp, np.float32, "w+", shape=shape)
    t = time.time()
    if windows is None:
        extract_features(vit, slices, identity["img_size"], batch_size, device, out=arr, desc=f"features {split}",
                         norm=identity["norm"])
    else:
        with tqdm(total=len(windows), desc=f"features {split}", unit="volume", leave=False, disable=None) as bar:
            views3d.window_features(vit, windows, identity["img_size"], torch.device(device), arr, bar)
    seconds = time.time() - t
    print(f"features {split}: {shape[0]} {'slices' if windows is None else 'windows'} in {seconds:.1f} s "
          f"({shape[0] / seconds:.0f}/s)")
    arr.flush()
    del arr
    os.replace(tmp, path)
    return np.memmap(path, np.float32, "r", shape=shape)


# -----------------------------------------------------------------------------
# Bags: a volume is the set of its slices' features

@dataclass
class Bags:
    """A split as bags: volume i owns feats[start[i] : start[i] + count[i]]."""
    feats: torch.Tensor   # (S, D)
    start: torch.Tensor   # (V,) int64
    count: torch.Tensor   # (V,) int64
    labels: torch.Tensor  # (V, C) float32

    def __len__(self):
        return len(self.start)

    def gather(self, vols):
        """Volumes -> padded bags (B, T, D) and mask (B, T), T = the most slices in this batch."""
        count = self.count[vols]                                    # (B,)
        pos = torch.arange(int(count.max()), device=count.device)
        mask = pos[None] < count[:, None]                           # (B, T)
        idx = self.start[vols][:, None] + torch.where(mask, pos[None], 0)  # padding reads slice 0, masked below
        return self.feats[idx], mask


def feature_mean(feats, chunk=65536):
    """Per-dimension mean of a (S, D) memmap, accumulated in float64, chunk by chunk."""
    return sum(np.asarray(feats[i:i + chunk], np.float64).sum(0) for i in range(0, len(feats), chunk)) / len(feats)


def make_bags(feats, ds, device, dtype=None, center=None):
    """Features of a split (S, D) and its reader -> Bags on the device (float16 on CUDA to fit full CT-RATE).
    center (D,): subtracted before the cast (use the train split's mean for every split), so that float16
    keeps the variation between slices rather than the common offset."""
    dtype = dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    t = lambda a, dt: torch.as_tensor(np.array(a), dtype=dt, device=device)  # noqa: E731 (memmaps are read-only)
    c = torch.zeros(feats.shape[1]) if center is None else torch.as_tensor(center, dtype=torch.float32)
    x = torch.empty(feats.shape, dtype=dtype, device=device)  # (S, D)
    for i in range(0, len(feats), 65536):  # in chunks: no second host copy of a CT-RATE-sized memmap
        x[i:i + 65536] = (torch.from_numpy(np.array(feats[i:i + 65536], np.float32)) - c).to(device, dtype)
    return Bags(x, t(ds.start, torch.int64), t(ds.count, torch.int64), t(ds.labels, torch.float32))


# -----------------------------------------------------------------------------
# The probe grid: every (pooling, lr) trains at once, on the same minibatches. Probes share no parameter, so
# the gradient of the summed loss is each probe's own, and a per-lr SGD step keeps each the run it would be alone.

def feature_stats(feats, chunk=65536):
    """Per-dimension mean and std of (S, D) features, accumulated in float64."""
    s1 = s2 = 0
    for i in range(0, len(feats), chunk):
        x = feats[i:i + chunk].double()
        s1, s2 = s1 + x.sum(0), s2 + (x * x).sum(0)
    mean = s1 / len(feats)
    return mean.float(), (s2 / len(feats) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6).float()


class ProbeGrid(nn.Module):
    """P poolings x L learning rates of `pool the bag, then Linear(D, C)`, as stacked weights."""

    def __init__(self, mean, std, n_classes, poolings, n_lrs):
        super().__init__()
        D, P, L = mean.numel(), len(poolings), n_lrs
        self.poolings = tuple(poolings)
        # train-split standardisation: one lr grid fits every backbone's CLS scale, and val/test inform nothing
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.W = nn.Parameter(torch.zeros(P, L, D, n_classes, device=mean.device))
        self.b = nn.Parameter(torch.zeros(P, L, n_classes, device=mean.device))
        # one attention query per lr; zero makes attention start as average pooling, so no pooling starts ahead
        self.q = nn.Parameter(torch.zeros(L, D, device=mean.device))
        if "attn_class" in self.poolings:  # one query per lr and class: each class may attend to its own slices
            self.qc = nn.Parameter(torch.zeros(L, n_classes, D, device=mean.device))

    def forward(self, x, mask):
        """Bags (B, T, D), mask (B, T) -> logits (P, L, B, C)."""
        L, B, P = self.q.shape[0], x.shape[0], len(self.poolings)
        x = ((x.float() - self.mean) / self.std).masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        logits = [None] * P
        shared = [i for i, name in enumerate(self.poolings) if name != "attn_class"]  # one bag vector for all classes
        if shared:
            pooled = []
            for name in (self.poolings[i] for i in shared):
                if name == "avg":
                    z = (x.sum(1) / mask.sum(1, keepdim=True)).expand(L, B, -1)            # (L, B, D)
                elif name == "max":
                    z = x.masked_fill(~mask[..., None], -torch.inf).amax(1).expand(L, B, -1)  # (L, B, D)
                else:
                    a = torch.einsum("btd,ld->lbt", x, self.q).masked_fill(~mask, -torch.inf).softmax(-1)  # (L, B, T)
                    z = torch.einsum("lbt,btd->lbd", a, x)                                 # (L, B, D)
                pooled.append(z)
            z = torch.stack(pooled)                                                         # (P', L, B, D)
            W, b = (self.W, self.b) if len(shared) == P else (self.W[shared], self.b[shared])
            for i, lg in zip(shared, (torch.einsum("plbd,pldc->plbc", z, W) + b[:, :, None]).unbind(0)):
                logits[i] = lg                                                              # (L, B, C)
        if "attn_class" in self.poolings:
            i = self.poolings.index("attn_class")
            a = torch.einsum("btd,lcd->lbct", x, self.qc).masked_fill(~mask[:, None], -torch.inf).softmax(-1)
            z = torch.einsum("lbct,btd->lbcd", a, x)                                        # (L, B, C, D)
            logits[i] = torch.einsum("lbcd,ldc->lbc", z, self.W[i]) + self.b[i][:, None]    # (L, B, C)
        return torch.stack(logits)                                                          # (P, L, B, C)


@torch.no_grad()
def predict_scores(grid, bags, batch=64):
    """Probabilities of every probe of the grid on every volume: (P, L, V, C) float32."""
    vols = torch.arange(len(bags), device=bags.start.device)
    out = [torch.sigmoid(grid(*bags.gather(vols[i:i + batch]))) for i in range(0, len(bags), batch)]
    return torch.cat(out, 2).float().cpu().numpy()


@dataclass
class GridRun:
    poolings: tuple
    lrs: tuple
    eval_steps: list        # steps at which val scores and weights were kept
    states: list            # grid state_dict at each eval step (on CPU)
    val_scores: np.ndarray  # (E, P, L, V, C) val probabilities
    train_loss: np.ndarray  # (E, P, L) mean training loss since the previous eval step


def train_probe_grid(train, val, poolings=POOLINGS, lrs=LRS, steps=15000, batch=16, momentum=0.95, evals=6, seed=0,
                     log=print, until=None):
    """Train every (pooling, lr) probe on the same minibatches; keep val scores at `evals` steps (or, with
    until, stop at that step of the `steps`-long schedule and keep it alone). Every probe starts from the same
    head (drawn from `seed`) and sees the same volume order, so a grid of one reproduces that probe exactly.
    Nothing here sees the test split."""
    dev = train.feats.device
    mean, std = feature_stats(train.feats)
    D, C, P, L = train.feats.shape[1], train.labels.shape[1], len(poolings), len(lrs)
    grid = ProbeGrid(mean, std, C, poolings, L)
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(D)                                           # nn.Linear's default init
    with torch.no_grad():
        grid.W.copy_(((torch.rand(D, C, generator=g) * 2 - 1) * bound).to(dev))
        grid.b.copy_(((torch.rand(C, generator=g) * 2 - 1) * bound).to(dev))
    # SGD by hand, as torch.optim.SGD takes one lr per tensor: buf = m * buf + grad; p -= lr * buf
    lr = torch.tensor(lrs, dtype=torch.float32, device=dev)
    lr_shape = {"W": (1, L, 1, 1), "b": (1, L, 1), "q": (L, 1), "qc": (L, 1, 1)}
    params = dict(grid.named_parameters())
    bufs = {k: torch.zeros_like(p) for k, p in params.items()}
    batch = min(batch, len(train))
    eval_steps = [until] if until else sorted({max(1, round(steps * (k + 1) / evals)) for k in range(evals)})
    perm, ptr = torch.randperm(len(train), generator=g), 0
    states, val_scores, losses, loss_sum, t0 = [], [], [], 0, time.time()
    for step in range(1, eval_steps[-1] + 1):
        if ptr + batch > len(perm):                                    # a new epoch, a new order
            perm, ptr = torch.randperm(len(train), generator=g), 0
        vols = perm[ptr:ptr + batch].to(dev)
        ptr += batch
        x, mask = train.gather(vols)                                   # (B, T, D), (B, T)
        logits = grid(x, mask)                                         # (P, L, B, C)
        y = train.labels[vols].expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((2, 3))  # (P, L)
        grid.zero_grad(set_to_none=True)
        loss.sum().backward()
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        with torch.no_grad():
            for k, param in params.items():
                if param.grad is not None:                             # q has none without attn pooling
                    bufs[k].mul_(momentum).add_(param.grad)
                    param.sub_((lr * cosine).view(lr_shape[k]) * bufs[k])
        loss_sum = loss_sum + loss.detach()
        if step in eval_steps:
            states.append({k: v.detach().cpu().clone() for k, v in grid.state_dict().items()})
            val_scores.append(predict_scores(grid, val))
            n = step - (eval_steps[len(losses) - 1] if losses else 0)
            losses.append((loss_sum / n).cpu().numpy())
            loss_sum = 0
            y_val = val.labels.cpu().numpy()
            ap = np.array([[macro("auprc", y_val, val_scores[-1][p, l]) for l in range(L)] for p in range(P)])
            p, l = np.unravel_index(np.nanargmax(ap), ap.shape) if np.isfinite(ap).any() else (0, 0)
            log(f"step {step:6d}/{steps} | train loss {losses[-1].min():.4f}..{losses[-1].max():.4f} | "
                f"val macro AUPRC best {ap[p, l]:.4f} ({poolings[p]}, lr {lrs[l]}) | "
                f"{step / (time.time() - t0):.0f} steps/s")
    return GridRun(tuple(poolings), tuple(lrs), eval_steps, states, np.stack(val_scores), np.stack(losses))


# -----------------------------------------------------------------------------
# Selection on val; test is scored once, by the selected probe

@dataclass
class Selection:
    pooling: str
    lr: float
    step: int
    index: tuple            # (e, p, l) into GridRun
    val_macro_auprc: float
    thresholds: np.ndarray  # (C,) F1-optimal on validation
    val_table: np.ndarray   # (E, P, L) val macro AUPRC of every candidate


def select(run, val_labels):
    """Best (pooling, lr, step) by validation macro AUPRC; ties go to the earliest step, then list order."""
    y = np.asarray(val_labels)
    classes = covered_classes(y)
    if not classes.any():
        raise ValueError("the val split has no class with both positive and negative volumes: nothing to select on")
    ap = average_precision(y.T, np.swapaxes(run.val_scores, -1, -2))  # (E, P, L, C)
    table = ap[..., classes].mean(-1)                                 # (E, P, L)
    e, p, l = np.unravel_index(np.argmax(table), table.shape)
    return Selection(run.poolings[p], run.lrs[l], run.eval_steps[e], (int(e), int(p), int(l)),
                     float(table[e, p, l]), best_f1_thresholds(y, run.val_scores[e, p, l]), table)


def evaluate_seed(train, val, test, cfg, seed, log=print, fixed=None):
    """One probe seed end to end: train the grid (or, given fixed = (pooling, lr, step), that probe alone up to
    that step), select on val, then score test once with the chosen probe."""
    poolings, lrs, until = (cfg.poolings, cfg.lrs, None) if fixed is None else ((fixed[0],), (fixed[1],), fixed[2])
    run = train_probe_grid(train, val, poolings, lrs, cfg.steps, cfg.batch, cfg.momentum, cfg.evals, seed, log, until)
    sel = select(run, val.labels.cpu().numpy())
    e, p, l = sel.index
    state = run.states[e]
    chosen = ProbeGrid(state["mean"], state["std"], state["b"].shape[-1], (run.poolings[p],), 1)  # a 1 x 1 grid
    chosen.load_state_dict({k: v[p:p + 1, l:l + 1] if k in ("W", "b") else v[l:l + 1] if k in ("q", "qc") else v
                            for k, v in state.items() if k != "qc" or run.poolings[p] == "attn_class"})
    scores = predict_scores(chosen.to(test.feats.device), test)[0, 0]  # (V, C): test's only use
    return sel, scores, classification_report(test.labels.cpu().numpy(), scores, sel.thresholds)


# -----------------------------------------------------------------------------
# The method, top to bottom

def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    print(describe(cfg))
    if cfg.compare:
        return report.compare(cfg.compare.split(","), cfg)
    t0, device = time.time(), pick_device(cfg.device)
    try:
        ds = {s: open_split(cfg.data, s) for s in SPLITS}
    except PreparedError as e:
        sys.exit(f"probe.py: {e}")
    if not ds["train"].has_labels:  # prepared from a plain folder of NIfTI files
        sys.exit(f"probe.py: {cfg.data} holds no labels (a plain NIfTI folder): the probe trains on CT-RATE's "
                 f"18 labels; for features of your scans run python export.py --data={cfg.data}")
    empty = [s for s in SPLITS if len(ds[s]) == 0]
    if empty:  # before any feature or probe is computed
        sys.exit(f"probe.py: {cfg.data}: split {', '.join(empty)} has no volumes; the probe needs train, val and test")
    vit, backbone = load_model(cfg)
    identity = {"backbone": backbone["sha256"], "vit": backbone["vit"], "img_size": cfg.img_size,
                "norm": norm_values(cfg.norm), "data": data_identity(cfg.data)}
    is_3d, windows = backbone.get("input") == "3d", {s: None for s in SPLITS}
    if is_3d:  # bags of windows (views3d.py), in CoralBay's intensity scaling: --img_size and --norm do not apply
        print(f"3D encoder: a volume is a bag of windows {backbone['block_mm']:g} mm deep at "
              f"{backbone['window_voxels']} voxels; --img_size and --norm do not apply")
        identity.update(img_size=backbone["window_voxels"], norm="coralbay [-1000, 1000] -> [0, 1]",
                        block_mm=backbone["block_mm"])
        windows = {s: views3d.WindowSplit(ds[s], backbone["block_mm"]) for s in SPLITS}
    cache = cfg.cache or os.path.join(cfg.data, "features")
    if not writable(cache):  # a read-only dataset, say
        sys.exit(f"probe.py: cannot write the feature cache to {cache}; pass --cache=DIR, a writable folder")
    feats = {s: cached_features(cache, s, ds[s].slices, vit, identity, cfg.feat_batch, device, windows[s])
             for s in SPLITS}
    ds_slices, ds = ds, (windows if is_3d else ds)  # from here on an instance is a slice or a window
    print(f"features: {', '.join(f'{s} {feats[s].shape}' for s in SPLITS)} in {cache}/")
    center = feature_mean(feats["train"])  # train statistics only
    train, val, test = (make_bags(feats[s], ds[s], device, center=center) for s in SPLITS)

    seeds, runs, fixed = [], [], None
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        what = f"{len(cfg.poolings)} poolings x {len(cfg.lrs)} lrs" if fixed is None else "{}, lr {}, step {}".format(*fixed)
        print(f"probe seed {seed}: {what}, {cfg.steps}-step schedule")
        sel, s, rep = evaluate_seed(train, val, test, cfg, seed, fixed=fixed)
        if cfg.selection == "first_seed":  # the release: the first seed's choice for every seed
            fixed = (sel.pooling, sel.lr, sel.step)
        seeds.append({"seed": seed, "pooling": sel.pooling, "lr": sel.lr, "step": sel.step,
                      "val_macro_auprc": sel.val_macro_auprc, "test_macro": rep["macro"]})
        runs.append((s, sel.thresholds, rep))
    scores, thresholds, reports = zip(*runs)
    scores, thresholds, y = np.stack(scores), np.stack(thresholds), test.labels.cpu().numpy()
    summary, per_class = report.summarise(reports, scores, thresholds, y, cfg)

    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(rng.choice(len(feats["train"]), min(cfg.depth_max_slices, len(feats["train"])), replace=False))
    depth = depth_r2(feats["train"][keep], ds["train"].depth_pos[keep], feats["val"], ds["val"].depth_pos,
                     feats["test"], ds["test"].depth_pos)

    wm = None
    if cfg.world_model and is_3d:  # windows have no patch grid over a slice: depth, order and rank only
        print("world-model probes: slice order (of windows), effective rank; findings and organs: n/a in 3D")
        wm = {"settings": asdict(worldmodel.WorldModelConfig(**{k: getattr(cfg, k) for k in
                                                                worldmodel.WorldModelConfig.__dataclass_fields__})),
              **{k: {"skipped": "a 3D encoder has no per-slice patch tokens"} for k in worldmodel.TASKS},
              **worldmodel.slice_position(feats, ds, cfg), "time_s": 0.0}
    elif cfg.world_model:  # frozen backbone again: the dense probes need patch tokens, never cached
        print("world-model probes: " + ", ".join(cfg.wm_tasks) + ", slice order, effective rank")
        norm = norm_values(cfg.norm)
        wm = worldmodel.evaluate(vit, ds, feats, lambda hu: normalize(hu, norm), cfg.img_size, device, cfg)

    res = {"config": asdict(cfg), "backbone": backbone, "feature_identity": identity, "worldmodel": wm,
           "normalisation": dict(zip(("clip_lo", "clip_hi", "mean", "std"), norm_values(cfg.norm))),
           "data": {"root": str(cfg.data), "manifest": ds["train"].manifest,
                    "volumes": {s: len(ds[s]) for s in SPLITS},
                    "slices": {s: len(ds_slices[s].slices) for s in SPLITS},
                    **({"windows": {s: int(ds[s].count.sum()) for s in SPLITS}} if is_3d else {})},
           "device": device_name(device), "summary": summary, "classes_in_macro": reports[0]["classes_in_macro"],
           "excluded": reports[0]["excluded"], "per_class": per_class, "seeds": seeds, "depth": depth,
           "time_s": time.time() - t0}
    print(report.write_results(res, cfg.out))
    np.savez(Path(cfg.out) / "test_scores.npz", scores=scores, thresholds=thresholds, labels=y,
             names=np.array(ds["test"].names))  # what --compare needs for paired intervals
    plots.plot_roc(y, scores.mean(0), Path(cfg.out) / "roc.png", f"{backbone['kind']} ViT-{backbone['vit']}: "
                   f"test ROC per class, macro AUROC {summary['auroc']['mean']:.3f}")
    if wm:
        plots.plot_worldmodel(wm, Path(cfg.out) / "worldmodel.png")
    print(f"wrote {cfg.out}/results.json and results.md")
    return res


if __name__ == "__main__":
    main()
