"""
Frozen-backbone evaluation: how much of the 18 CT-RATE abnormalities a checkpoint's features
already know (RECIPE.md section 7). Every slice goes through the frozen ViT once; a volume becomes
a bag of CLS vectors; a multiple-instance linear probe (pool the bag, then Linear(d, 18)) is trained
on `train`, selected on `val` (held-out train patients) and scored once on `test` (CT-RATE valid).
Headline: macro AUROC (DALE-CT-2S, ViT-L: 0.833). Also: how linearly slice depth reads out (R^2).

    python probe.py --ckpt=out/phantom/ckpt.pt --img_size=64 --steps=600   # the phantom demo
    python probe.py --random_init --img_size=64 --steps=600                 # the floor pretraining must beat
    python probe.py --ckpt=out/dale_ct_2s/ckpt.pt --data=/data/dalect_512   # RECIPE.md 7 at full scale
    python probe.py --bench                                                 # slices/s, grid vs one probe

Outputs OUT/results.json and OUT/results.md: config, checkpoint identity, data manifest, per-seed
selection, test metrics (mean, std over probe seeds, bootstrap 95% intervals), per-class table.
On 2 CPU cores a small phantom (81 volumes, ViT-tiny at 64 px, 3 seeds x 600 steps) takes under
10 s once its features are cached (extraction: about 500 slices/s); a 150-step phantom
pretraining reached macro AUROC 0.58 and depth R^2 0.82 there, random init 0.53 and 0.69.
"""
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model import PATCH, build_vit, load_backbone, read_state_dict, size_name
from prepare import LABELS, PreparedError, normalize_hu, open_split

SPLITS = ("train", "val", "test")


@dataclass
class ProbeConfig:
    # what to evaluate
    ckpt: str = ""                 # train.py checkpoint (.pt) or released weights (.safetensors, timm keys)
    random_init: bool = False      # evaluate an untrained backbone instead: the floor pretraining must beat
    vit: str = "tiny"              # backbone size when the checkpoint does not record one
    layerscale_init: float = 1e-5  # random_init only: LayerScale's starting gain; give the value the
                                   # pretraining run started from, so the floor is that run's step 0
    data: str = "data/prepared"    # folder written by prepare.py (train, val, test)
    out: str = "out/probe"         # results.json and results.md go here
    device: str = "auto"           # auto = cuda when available, else cpu
    # features (cached under DATA/features/, keyed by checkpoint, img_size and data)
    img_size: int = 256            # slices resized to this for the backbone (RECIPE.md 7: 256 px)
    feat_batch: int = 64           # slices per forward pass
    # MIL linear probe (RECIPE.md 7): the whole grid trains at once, on the same minibatches
    poolings: tuple = ("avg", "max", "attn")  # bag poolings; attn = one learned query, softmax over slices
    lrs: tuple = (0.1, 0.03, 0.01, 0.003)      # peak SGD learning rates, cosine-decayed to 0
    steps: int = 20000             # SGD steps (16 volumes each); the phantom demo needs far fewer
    batch: int = 16                # volumes per step
    momentum: float = 0.95         # SGD momentum, no weight decay
    evals: int = 10                # validation checkpoints along training; selection also picks the step
    seeds: int = 3                 # probe seeds (init and minibatch order); the report gives mean and std
    seed: int = 0                  # first probe seed; a random_init backbone is drawn from it too
    n_boot: int = 1000             # bootstrap resamples of test volumes for the 95% intervals
    depth_max_slices: int = 200000 # train slices used to fit the depth ridge (random subset beyond)
    bench: bool = False            # only measure: extraction slices/s and grid vs single-probe time
    compare: str = ""              # comma-separated result folders of earlier runs: print one table, no probing


def parse_args(argv):
    """--key=value overrides of ProbeConfig; a bare --flag sets a bool; unknown keys are an error."""
    cfg, names = ProbeConfig(), [f.name for f in fields(ProbeConfig)]
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in names:
            sys.exit(f"probe.py: unknown argument {arg!r}; options are --" + ", --".join(names))
        old = getattr(cfg, key)
        if isinstance(old, bool):
            if eq and val.lower() not in ("true", "false", "1", "0"):
                sys.exit(f"probe.py: --{key} takes true or false, got {val!r}")
            new = not eq or val.lower() in ("true", "1")
        elif isinstance(old, tuple):
            new = tuple(type(old[0])(v) for v in val.split(",") if v)
        else:
            new = type(old)(val)
        setattr(cfg, key, new)
    bad = set(cfg.poolings) - {"avg", "max", "attn"}
    if bad or not cfg.poolings or not cfg.lrs:
        sys.exit(f"probe.py: --poolings takes avg,max,attn and --lrs a list of floats, got {cfg.poolings} {cfg.lrs}")
    if cfg.img_size % PATCH:
        sys.exit(f"probe.py: --img_size={cfg.img_size} must be a multiple of the patch size {PATCH}")
    if not cfg.bench and not cfg.compare and bool(cfg.ckpt) == cfg.random_init:
        sys.exit("probe.py: give exactly one of --ckpt=PATH (a checkpoint to evaluate) or --random_init")
    return cfg


# ----------------------------------------------------------------------------------------------
# Metrics, in numpy, batched over any leading axes (..., N), with optional per-sample weights:
# a bootstrap resample is a vector of multiplicities, so we sort the scores once and each resample
# costs a cumulative sum instead of a sort. Ties are handled as scikit-learn does (tests compare).

def _tie_groups(s, descending):
    """Sort along the last axis; for each sorted position, the first and last position of its tie group."""
    key = -s if descending else s
    order = np.argsort(key, axis=-1, kind="stable")
    ks = np.take_along_axis(key, order, -1)
    n = ks.shape[-1]
    pos = np.arange(n)
    new = np.ones(ks.shape, bool)
    new[..., 1:] = ks[..., 1:] != ks[..., :-1]                      # a tie group starts here
    end = np.ones(ks.shape, bool)
    end[..., :-1] = new[..., 1:]                                    # a tie group ends here
    first = np.maximum.accumulate(np.where(new, pos, 0), -1)
    last = (n - 1 - np.maximum.accumulate(np.where(end[..., ::-1], pos, 0), -1))[..., ::-1]
    return order, first, last


def _sorted(order, *arrays):
    shape = np.broadcast_shapes(order.shape, *(a.shape for a in arrays))
    idx = np.broadcast_to(order, shape)
    return [np.take_along_axis(np.broadcast_to(a, shape), idx, -1).astype(np.float64) for a in arrays]


def auroc(y, s, w=None):
    """Area under the ROC curve along the last axis; ties count 1/2. NaN without both classes."""
    w = np.ones(s.shape[-1]) if w is None else w
    order, first, last = _tie_groups(s, descending=False)
    ys, ws = _sorted(order, y, w)
    wp, wn = ys * ws, (1 - ys) * ws                                 # positive and negative weight
    cn = np.cumsum(wn, -1)
    shape = cn.shape
    below = np.take_along_axis(cn - wn, np.broadcast_to(first, shape), -1)   # negatives strictly lower
    tied = np.take_along_axis(cn, np.broadcast_to(last, shape), -1) - below  # negatives in the tie group
    n_pos, n_neg = wp.sum(-1), wn.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (wp * (below + 0.5 * tied)).sum(-1) / (n_pos * n_neg), np.nan)


def average_precision(y, s, w=None):
    """Area under precision-recall as sum_n (R_n - R_{n-1}) P_n over distinct thresholds. NaN without positives."""
    w = np.ones(s.shape[-1]) if w is None else w
    order, _, last = _tie_groups(s, descending=True)
    ys, ws = _sorted(order, y, w)
    wp = ys * ws
    tp, k = np.cumsum(wp, -1), np.cumsum(ws, -1)
    precision = np.divide(tp, k, out=np.zeros_like(tp), where=k > 0)
    at_end = np.take_along_axis(precision, np.broadcast_to(last, tp.shape), -1)  # a tie group is one threshold
    n_pos = wp.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (wp * at_end).sum(-1) / n_pos, np.nan)


def _confusion(y, pred, w):
    w = np.ones(y.shape[-1]) if w is None else w
    y, pred = y.astype(bool), pred.astype(bool)
    return [(w * (y & pred)).sum(-1), (w * (~y & pred)).sum(-1), (w * (y & ~pred)).sum(-1), (w * (~y & ~pred)).sum(-1)]


def f1(y, pred, w=None):
    """F1 of binary predictions along the last axis (0 when there is nothing to find and nothing found)."""
    tp, fp, fn, _ = _confusion(y, pred, w)
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=np.float64), where=den > 0)


def balanced_accuracy(y, pred, w=None):
    """Mean of sensitivity and specificity along the last axis. NaN without both classes."""
    tp, fp, fn, tn = _confusion(y, pred, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((tp + fn > 0) & (tn + fp > 0), 0.5 * (tp / (tp + fn) + tn / (tn + fp)), np.nan)


def best_f1_thresholds(y, s):
    """Per class of (V, C) labels/scores, the threshold t maximising F1 of `s >= t`; 0.5 for a class without positives."""
    order, _, last = _tie_groups(s.T, descending=True)             # (C, V)
    ys, ss = _sorted(order, y.T, s.T)
    tp = np.cumsum(ys, -1)
    n_pos = ys.sum(-1, keepdims=True)
    f1_here = 2 * tp / (np.arange(1, ys.shape[-1] + 1) + n_pos)   # 2TP / (predicted + actual positives)
    f1_here[last != np.arange(ys.shape[-1])] = -1                 # only whole tie groups can be cut
    thr = np.take_along_axis(ss, f1_here.argmax(-1)[:, None], -1)[:, 0]
    return np.where(n_pos[:, 0] > 0, thr, 0.5)


def covered_classes(y):
    """(V, C) labels -> (C,) bool: the classes with both positives and negatives, i.e. the ones a macro can average."""
    pos = y.sum(0)
    return (pos > 0) & (pos < len(y))


def _macro(values, y, classes):
    classes = covered_classes(y) if classes is None else classes
    return float(np.mean(values[classes])) if classes.any() else float("nan")


def macro_auroc(y, s, classes=None):
    return _macro(auroc(y.T, s.T), y, classes)


def macro_auprc(y, s, classes=None):
    return _macro(average_precision(y.T, s.T), y, classes)


def macro_f1(y, s, thresholds, classes=None):
    return _macro(f1(y.T, s.T >= thresholds[:, None]), y, classes)


def macro_balanced_accuracy(y, s, thresholds, classes=None):
    return _macro(balanced_accuracy(y.T, s.T >= thresholds[:, None]), y, classes)


METRICS = ("auroc", "auprc", "f1", "bacc")


def _per_class(metric, y, s, thresholds, w=None):
    """y (..., C, V), s (..., C, V), thresholds (..., C) -> (..., C)."""
    if metric == "auroc":
        return auroc(y, s, w)
    if metric == "auprc":
        return average_precision(y, s, w)
    pred = s >= thresholds[..., None]
    return f1(y, pred, w) if metric == "f1" else balanced_accuracy(y, pred, w)


def classification_report(y, s, thresholds, names=None):
    """Test metrics of one probe: y, s (V, C); thresholds (C,) tuned on validation."""
    names = names or (LABELS if y.shape[1] == len(LABELS) else [f"class {c}" for c in range(y.shape[1])])
    classes = covered_classes(y)
    per = {m: _per_class(m, y.T, s.T, thresholds) for m in METRICS}
    why = lambda c: "no positives" if y[:, c].sum() == 0 else "no negatives"
    return {
        "macro": {m: float(per[m][classes].mean()) if classes.any() else None for m in METRICS},
        "classes_in_macro": [n for n, c in zip(names, classes) if c],
        "excluded": {names[c]: why(c) for c in np.flatnonzero(~classes)},
        "per_class": {n: {**{m: _num(per[m][c]) for m in METRICS}, "prevalence": float(y[:, c].mean()),
                          "threshold": float(thresholds[c])} for c, n in enumerate(names)},
    }


def bootstrap_ci(y, scores, metric="auroc", thresholds=None, n_boot=1000, seed=0, level=0.95):
    """Interval of a macro metric when the test volumes are resampled with replacement."""
    out = bootstrap_samples(y, scores, metric, thresholds, n_boot, seed)
    return tuple(float(q) for q in np.nanquantile(out, [(1 - level) / 2, (1 + level) / 2]))


def bootstrap_samples(y, scores, metric="auroc", thresholds=None, n_boot=1000, seed=0):
    """The macro metric on each of n_boot resamples of the test volumes, (n_boot,).
    The resamples depend only on (seed, V): two models scored on the same test volumes get the
    same resamples, so the difference of their samples is a paired bootstrap of the difference.

    y (V, C); scores (V, C) or (R, V, C) for R probe seeds, thresholds (C,) or (R, C) for f1/bacc.
    On each resample every seed is scored on the same volumes and the seeds' metrics are averaged,
    so the interval is that of the reported mean. The macro covers the classes covered on the full
    test set (a resample that draws no positive of a rare class averages the others).
    """
    scores = scores[None] if scores.ndim == 2 else scores
    R, V, C = scores.shape
    thr = np.zeros((R, C)) if thresholds is None else np.broadcast_to(thresholds, (R, C))
    classes = covered_classes(y)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, V, V), minlength=V) for _ in range(n_boot)])  # (n_boot, V)
    chunk = max(1, 4_000_000 // (R * C * V))                      # bound the (chunk, R, C, V) temporaries
    out = []
    for i in range(0, n_boot, chunk):
        w = counts[i:i + chunk, None, None, :]                     # (b, 1, 1, V)
        per = _per_class(metric, y.T, scores.transpose(0, 2, 1), thr, w)  # (b, R, C)
        with warnings.catch_warnings():                             # all-NaN rows: a class-less resample
            warnings.simplefilter("ignore", RuntimeWarning)
            out.append(np.nanmean(per[..., classes], -1).mean(-1))  # (b,)
    return np.concatenate(out)


def _num(x):
    return None if x is None or not np.isfinite(x) else float(x)   # JSON has no NaN


# ----------------------------------------------------------------------------------------------
# Features: the CLS token of every slice, computed once per (checkpoint, img_size, data) and cached.

@torch.no_grad()
def extract_features(vit, slices, img_size, batch_size=64, device="cpu", out=None, desc="features"):
    """int16 HU slices (S, H, W) -> CLS tokens (S, D), written into `out` (e.g. a memmap) if given."""
    device = torch.device(device)
    vit.eval().to(device)
    out = np.empty((len(slices), vit.embed_dim), np.float32) if out is None else out
    bar = tqdm(total=len(slices), desc=desc, unit="slice", unit_scale=True, leave=False, disable=None)
    for i in range(0, len(slices), batch_size):
        x = torch.from_numpy(np.array(slices[i:i + batch_size], np.int16)).to(device)  # a copy: the memmap is read-only
        x = normalize_hu(x.float())[:, None]                        # (B, 1, H, W), as in training
        if x.shape[-1] != img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls, _ = vit(x)                                         # (B, D)
        out[i:i + len(x)] = cls.float().cpu().numpy()
        bar.update(len(x))
    bar.close()
    return out


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_identity(root):
    """What the features depend on in the data folder. Re-running prepare.py rewrites slices.i16,
    so its size and mtime make old features unreachable even if the manifest reads the same."""
    root = Path(root)
    h = hashlib.sha256((root / "manifest.json").read_bytes())
    for split in SPLITS:
        h.update((root / split / "volumes.json").read_bytes())
        st = (root / split / "slices.i16").stat()
        h.update(f"{split}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_features(root, split, slices, vit, identity, img_size, batch_size=64, device="cpu"):
    """CLS features of one split, from DATA/features/KEY/ if a complete matching copy is there.

    KEY hashes the identity (checkpoint, img_size, data), so another checkpoint lands in another
    folder and never touches this one. The feature file is written under a temporary name and
    renamed; SPLIT.json is written last: a folder without it (an interrupted run) is recomputed.
    """
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root) / "features" / key
    path, meta_path = folder / f"{split}.f32", folder / f"{split}.json"
    shape = (len(slices), vit.embed_dim)
    meta = {"identity": identity, "split": split, "shape": list(shape), "dtype": "float32"}
    try:
        if json.loads(meta_path.read_text()) == meta and path.stat().st_size == 4 * shape[0] * shape[1]:
            return np.memmap(path, np.float32, "r", shape=shape)
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    tmp = folder / f"{split}.f32.tmp{os.getpid()}"
    # float32: a random-init ViT's CLS tokens differ across slices by ~2e-4 of their size (LayerScale
    # 1e-5), below float16's resolution; float16 here turned the random-init floor into rounding noise
    arr = np.memmap(tmp, np.float32, "w+", shape=shape)
    t = time.time()
    extract_features(vit, slices, img_size, batch_size, device, out=arr, desc=f"features {split}")
    print(f"features {split}: {shape[0]} slices in {time.time() - t:.1f} s ({shape[0] / (time.time() - t):.0f} slices/s)")
    arr.flush()
    del arr
    os.replace(tmp, path)
    tmp_meta = folder / f"{split}.json.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    return np.memmap(path, np.float32, "r", shape=shape)


# ----------------------------------------------------------------------------------------------
# MIL linear probes. All (pooling, lr) pairs train together: the bag is gathered and standardised
# once per step, avg/max pooling is computed once and shared by every lr, and the 12 linear heads
# are one batched einsum. Probes share no parameter, so the gradient of the summed loss is each
# probe's own gradient, and a per-lr SGD step keeps them exactly the runs they would be alone.

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
    t = lambda a, dt: torch.as_tensor(np.array(a), dtype=dt, device=device)  # np.array: memmaps are read-only
    c = torch.zeros(feats.shape[1]) if center is None else torch.as_tensor(center, dtype=torch.float32)
    x = torch.empty(feats.shape, dtype=dtype, device=device)  # (S, D)
    for i in range(0, len(feats), 65536):  # in chunks: no second host copy of a CT-RATE-sized memmap
        x[i:i + 65536] = (torch.from_numpy(np.array(feats[i:i + 65536], np.float32)) - c).to(device, dtype)
    return Bags(x, t(ds.start, torch.int64), t(ds.count, torch.int64), t(ds.labels, torch.float32))


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
        # Standardising with train-split statistics makes the lr grid mean the same thing for every
        # backbone (a random and a trained ViT emit CLS tokens of very different scales, and an SGD
        # step is in feature units); train statistics only, so val and test inform nothing.
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.W = nn.Parameter(torch.zeros(P, L, D, n_classes, device=mean.device))
        self.b = nn.Parameter(torch.zeros(P, L, n_classes, device=mean.device))
        # one attention query per lr; zero makes attention start as average pooling, so no pooling starts ahead
        self.q = nn.Parameter(torch.zeros(L, D, device=mean.device))

    def forward(self, x, mask):
        """Bags (B, T, D), mask (B, T) -> logits (P, L, B, C)."""
        L, B = self.q.shape[0], x.shape[0]
        x = ((x.float() - self.mean) / self.std).masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        pooled = []
        for name in self.poolings:
            if name == "avg":
                z = (x.sum(1) / mask.sum(1, keepdim=True)).expand(L, B, -1)            # (L, B, D)
            elif name == "max":
                z = x.masked_fill(~mask[..., None], -torch.inf).amax(1).expand(L, B, -1)  # (L, B, D)
            else:
                a = torch.einsum("btd,ld->lbt", x, self.q).masked_fill(~mask, -torch.inf).softmax(-1)  # (L, B, T)
                z = torch.einsum("lbt,btd->lbd", a, x)                                 # (L, B, D)
            pooled.append(z)
        z = torch.stack(pooled)                                                         # (P, L, B, D)
        return torch.einsum("plbd,pldc->plbc", z, self.W) + self.b[:, :, None]         # (P, L, B, C)

    def pick(self, p, l):
        """The single probe (pooling p, lr l) as a 1x1 grid."""
        one = ProbeGrid(self.mean, self.std, self.b.shape[-1], (self.poolings[p],), 1)
        one.load_state_dict({"mean": self.mean, "std": self.std, "W": self.W[p:p + 1, l:l + 1],
                             "b": self.b[p:p + 1, l:l + 1], "q": self.q[l:l + 1]})
        return one


@torch.no_grad()
def predict_scores(grid, bags, batch=64):
    """Probabilities of every probe of the grid on every volume: (P, L, V, C) float32."""
    out = [torch.sigmoid(grid(*bags.gather(torch.arange(i, min(i + batch, len(bags)), device=bags.start.device))))
           for i in range(0, len(bags), batch)]
    return torch.cat(out, 2).float().cpu().numpy()


@dataclass
class GridRun:
    poolings: tuple
    lrs: tuple
    eval_steps: list       # steps at which val scores and weights were kept
    states: list           # grid state_dict at each eval step (on CPU)
    val_scores: np.ndarray  # (E, P, L, V, C) val probabilities
    train_loss: np.ndarray  # (E, P, L) mean training loss since the previous eval step


def train_probe_grid(train, val, poolings=("avg", "max", "attn"), lrs=(0.1, 0.03, 0.01, 0.003), steps=20000,
                     batch=16, momentum=0.95, evals=10, seed=0, log=print):
    """Train every (pooling, lr) probe on the same minibatches; keep val scores at `evals` steps.

    Every probe starts from the same head (drawn from `seed`) and sees the same volume order, so a
    grid of one reproduces that probe exactly. Nothing here sees the test split.
    """
    dev = train.feats.device
    mean, std = feature_stats(train.feats)
    D, C, P, L = train.feats.shape[1], train.labels.shape[1], len(poolings), len(lrs)
    grid = ProbeGrid(mean, std, C, poolings, L)
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(D)                                           # nn.Linear's default init
    with torch.no_grad():
        grid.W.copy_(((torch.rand(D, C, generator=g) * 2 - 1) * bound).to(dev))
        grid.b.copy_(((torch.rand(C, generator=g) * 2 - 1) * bound).to(dev))
    # torch.optim.SGD takes one lr per tensor and ours varies along the grid's L axis, so we write
    # its two lines ourselves (buf = m * buf + grad; p -= lr * buf; PyTorch's convention).
    lr = torch.tensor(lrs, dtype=torch.float32, device=dev)
    lr_shape = {"W": (1, L, 1, 1), "b": (1, L, 1), "q": (L, 1)}
    params = dict(grid.named_parameters())
    bufs = {k: torch.zeros_like(p) for k, p in params.items()}
    batch = min(batch, len(train))
    eval_steps = sorted({max(1, round(steps * (k + 1) / evals)) for k in range(evals)})
    perm, ptr = torch.randperm(len(train), generator=g), 0
    states, val_scores, losses, loss_sum, t0 = [], [], [], 0, time.time()
    for step in range(1, steps + 1):
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
            ap = np.array([[macro_auprc(val.labels.cpu().numpy(), val_scores[-1][p, l]) for l in range(L)]
                           for p in range(P)])
            p, l = np.unravel_index(np.nanargmax(ap), ap.shape) if np.isfinite(ap).any() else (0, 0)
            log(f"step {step:6d}/{steps} | train loss {losses[-1].min():.4f}..{losses[-1].max():.4f} | "
                f"val macro AUPRC best {ap[p, l]:.4f} ({poolings[p]}, lr {lrs[l]}) | "
                f"{step / (time.time() - t0):.0f} steps/s")
    return GridRun(tuple(poolings), tuple(lrs), eval_steps, states, np.stack(val_scores), np.stack(losses))


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
    thresholds = best_f1_thresholds(y, run.val_scores[e, p, l])
    return Selection(run.poolings[p], run.lrs[l], run.eval_steps[e], (int(e), int(p), int(l)),
                     float(table[e, p, l]), thresholds, table)


def selected_probe(run, sel, device="cpu"):
    e, p, l = sel.index
    grid = ProbeGrid(run.states[e]["mean"], run.states[e]["std"], run.states[e]["b"].shape[-1], run.poolings, len(run.lrs))
    grid.load_state_dict(run.states[e])
    return grid.pick(p, l).to(device)


def evaluate_seed(train, val, test, cfg, seed, log=print):
    """One probe seed end to end: train the grid, select on val, then score test once with the chosen probe."""
    run = train_probe_grid(train, val, cfg.poolings, cfg.lrs, cfg.steps, cfg.batch, cfg.momentum, cfg.evals, seed, log)
    sel = select(run, val.labels.cpu().numpy())
    scores = predict_scores(selected_probe(run, sel, test.feats.device), test)[0, 0]  # (V, C): test's only use
    return sel, scores, classification_report(test.labels.cpu().numpy(), scores, sel.thresholds)


# ----------------------------------------------------------------------------------------------
# Depth: how linearly the slice's position along the body (0 = apex end, 1 = the other) reads out.

def depth_r2(train_x, train_y, val_x, val_y, test_x, test_y, alphas=tuple(10.0 ** np.arange(-2, 7)), chunk=65536):
    """Ridge regression from features (S, D) to depth (S,): fit on train, alpha by val R^2, report test R^2.
    Closed form through one eigendecomposition of X^T X, so every alpha costs a matrix-vector product."""
    X = np.asarray(train_x, np.float64)
    mu, sd = X.mean(0), X.std(0) + 1e-6                                  # train statistics, as for the probe
    X = (X - mu) / sd
    y = np.asarray(train_y, np.float64)
    ym = y.mean()
    evals_, V = np.linalg.eigh(X.T @ X)                                  # (D,), (D, D)
    Vty = V.T @ (X.T @ (y - ym))                                         # (D,)
    W = V @ (Vty[:, None] / (evals_[:, None] + np.asarray(alphas)[None]))  # (D, A): one column per alpha

    def r2(x, t):
        t = np.asarray(t, np.float64)
        pred = np.concatenate([((np.asarray(x[i:i + chunk], np.float64) - mu) / sd) @ W + ym
                               for i in range(0, len(t), chunk)])         # (S, A)
        return 1 - ((pred - t[:, None]) ** 2).sum(0) / ((t - t.mean()) ** 2).sum()

    val_r2 = r2(val_x, val_y)
    a = int(np.argmax(val_r2))
    return {"test_r2": float(r2(test_x, test_y)[a]), "val_r2": float(val_r2[a]), "alpha": float(alphas[a]),
            "train_slices": len(X)}


# ----------------------------------------------------------------------------------------------
# Backbone, benchmark, report, main.

def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(cfg):
    """The frozen ViT and its identity (what the feature cache is keyed by)."""
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        vit = build_vit(cfg.vit, img_size=cfg.img_size, init_values=cfg.layerscale_init)
        return vit, {"kind": "random_init", "vit": cfg.vit, "seed": cfg.seed, "layerscale_init": cfg.layerscale_init,
                     "sha256": state_dict_sha256(vit.state_dict())}
    path = Path(cfg.ckpt)
    if not path.is_file():
        sys.exit(f"probe.py: checkpoint {path} not found; pass --ckpt=PATH to a train.py checkpoint or released weights")
    # The size and the stored position grid come from the weights themselves (released weights carry
    # no config); --vit is only the fallback for a file that is not recognisably a ViT.
    size, img_size = cfg.vit, cfg.img_size
    try:
        sd = read_state_dict(path)
        stem, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        size = (size_name(stem.shape[0], depth) if stem is not None else None) or size
        if pos is not None and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1:
            img_size = math.isqrt(pos.shape[1] - 1) * PATCH                # build at its native grid: no double resampling
        del sd
        vit = build_vit(size, img_size=img_size)
        load_backbone(vit, path)
    except (ValueError, ImportError, KeyError) as e:
        sys.exit(f"probe.py: cannot use {path} as a backbone: {str(e).splitlines()[0]}")
    return vit, {"kind": "checkpoint", "path": str(path), "vit": size, "sha256": file_sha256(path)}


def bench_grid_vs_single(D=192, n_vol=64, slices=48, steps=100, C=18, device="cpu", seed=0, repeats=3):
    """Seconds for the 3x4 grid in one pass vs each pooling trained alone at one lr, same data and steps
    (best of `repeats`: on a shared machine the minimum is the least disturbed measurement)."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(slices // 2, slices + 1, (n_vol,), generator=g)
    start = torch.cumsum(count, 0) - count
    bags = Bags(torch.randn(int(count.sum()), D, generator=g).to(device), start.to(device), count.to(device),
                (torch.rand(n_vol, C, generator=g) < 0.3).float().to(device))
    quiet = lambda *a: None

    def timed(poolings, lrs):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            train_probe_grid(bags, bags, poolings, lrs, steps, evals=1, seed=seed, log=quiet)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    timed(("avg",), (0.1,))                                             # warm-up
    grid = timed(("avg", "max", "attn"), (0.1, 0.03, 0.01, 0.003))
    single = {p: timed((p,), (0.1,)) for p in ("avg", "max", "attn")}
    sequential = 4 * sum(single.values())                               # the 12 runs one after another
    return {"grid_s": grid, "single_s": single, "grid_over_single": float(grid / np.mean(list(single.values()))),
            "speedup_vs_sequential": sequential / grid}


def benchmark(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vit = build_vit(cfg.vit, img_size=cfg.img_size)
    try:
        slices = open_split(cfg.data, "train").slices[:4 * cfg.feat_batch]
    except PreparedError:
        slices = np.random.default_rng(0).integers(-1000, 1000, (4 * cfg.feat_batch, cfg.img_size, cfg.img_size), dtype=np.int16)
    extract_features(vit, slices[:cfg.feat_batch], cfg.img_size, cfg.feat_batch, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    extract_features(vit, slices, cfg.img_size, cfg.feat_batch, device)
    rate = len(slices) / (time.perf_counter() - t)
    print(f"feature extraction: ViT-{cfg.vit} at {cfg.img_size} px on {device}: {rate:.1f} slices/s")
    r = bench_grid_vs_single(vit.embed_dim, steps=min(cfg.steps, 200), device=device)
    print(f"probe grid (3 poolings x 4 lrs, {min(cfg.steps, 200)} steps): {r['grid_s']:.2f} s; one probe alone: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in r["single_s"].items())
          + f"; grid/single {r['grid_over_single']:.2f}x, {r['speedup_vs_sequential']:.1f}x faster than 12 runs")
    return {"slices_per_s": rate, **r}


def summarise(reports, scores, thresholds, y, cfg):
    """Mean and std over probe seeds plus bootstrap 95% intervals of each macro metric."""
    out = {}
    for m in METRICS:
        vals = np.array([r["macro"][m] for r in reports], dtype=np.float64)
        lo, hi = bootstrap_ci(y, scores, m, thresholds, cfg.n_boot, cfg.seed)
        out[m] = {"mean": _num(vals.mean()), "std": _num(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                  "ci95": [_num(lo), _num(hi)], "per_seed": [_num(v) for v in vals]}
    return out


def write_results(res, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    s, names = res["summary"], {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "bacc": "balanced accuracy"}
    lines = [f"# Frozen MIL linear probe: {res['backbone']['kind']} ViT-{res['backbone']['vit']}", "",
             f"{res['data']['root']}: test {res['data']['volumes']['test']} volumes; {res['config']['seeds']} probe seeds; "
             f"{res['device']}; {res['time_s']:.0f} s", "", "| macro (test) | mean | std | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {names[m]} | {fmt(s[m]['mean'])} | {fmt(s[m]['std'])} | {fmt(s[m]['ci95'][0])}-{fmt(s[m]['ci95'][1])} |"
              for m in METRICS]
    lines += ["", f"Macros cover {len(res['classes_in_macro'])} of {len(LABELS)} classes"
              + ("; excluded: " + ", ".join(f"{k} ({v})" for k, v in res["excluded"].items()) if res["excluded"] else ".")]
    lines += ["", "| class | AUROC | AUPRC | F1 | prevalence |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {fmt(c['auroc'])} | {fmt(c['auprc'])} | {fmt(c['f1'])} | {c['prevalence']:.3f} |"
              for n, c in res["per_class"].items()]
    lines += ["", "Selected on val (pooling, lr, step): " + "; ".join(
        f"seed {r['seed']}: {r['pooling']}, {r['lr']}, {r['step']} (val AUPRC {r['val_macro_auprc']:.3f})" for r in res["seeds"]),
        "", f"Depth ridge R^2 (test slices): {fmt(res['depth']['test_r2'])} (alpha {res['depth']['alpha']:g})"]
    md = "\n".join(lines) + "\n"
    for name, text in (("results.json", json.dumps(res, indent=1)), ("results.md", md)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return md


def plot_roc(y, scores, png, title, log=print):
    """Test ROC curve of every class (scores: mean over probe seeds), macro AUROC in the title."""
    from sklearn.metrics import roc_curve
    from train import pyplot  # matplotlib is optional
    plt = pyplot(log)
    if plt is None:
        return None
    fig, axes = plt.subplots(3, 6, figsize=(15, 7.8), sharex=True, sharey=True)
    for c, (ax, name) in enumerate(zip(axes.flat, LABELS)):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        if 0 < y[:, c].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, c], scores[:, c])
            ax.plot(fpr, tpr, lw=1.2)
            name += f"\nAUROC {auroc(y[:, c], scores[:, c]):.2f}"
        else:
            name += "\n(one class only)"
        ax.set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_comparison(rows, png, log=print):
    """Macro AUROC of each compared model with its bootstrap 95% interval."""
    from train import pyplot
    plt = pyplot(log)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.2))
    for i, r in enumerate(rows):
        m = r["summary"]["auroc"]
        ax.errorbar(i, m["mean"], yerr=[[m["mean"] - m["ci95"][0]], [m["ci95"][1] - m["mean"]]], fmt="o", capsize=4)
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    ax.set_ylabel("macro AUROC (test, 95% CI)", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def training_time(backbone):
    """Seconds of the train.py run that wrote a checkpoint (its log.jsonl), or None."""
    log = Path(backbone.get("path", "")).parent / "log.jsonl"
    if backbone.get("kind") != "checkpoint" or not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return rows[-1].get("elapsed_s") if rows else None


def compare(dirs, cfg):
    """One table over earlier probe runs on the same test set, each row with its bootstrap 95% interval
    and, against the row above it, the paired bootstrap interval of the AUROC difference."""
    runs = []
    for d in dirs:
        try:
            res = json.loads((Path(d) / "results.json").read_text())
            sc = np.load(Path(d) / "test_scores.npz")
        except FileNotFoundError as e:
            sys.exit(f"probe.py --compare: {d} has no results ({e.filename}); run probe.py --out={d} first")
        runs.append((d, res, sc))
    names = [tuple(r[2]["names"]) for r in runs]
    if len(set(names)) != 1:
        sys.exit("probe.py --compare: the runs were scored on different test volumes; compare runs on one dataset")
    y = runs[0][2]["labels"]
    samples = [bootstrap_samples(y, r[2]["scores"], "auroc", None, cfg.n_boot, cfg.seed) for r in runs]
    fmt = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    ci = lambda m: f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    lines = ["| model | macro AUROC ± seed std [95% CI] | Δ AUROC vs row above [paired 95% CI] | macro AUPRC [95% CI] | "
             "macro F1 [95% CI] | depth R² | pretraining |", "|---|---|---|---|---|---|---|"]
    rows = []
    for i, (d, res, sc) in enumerate(runs):
        s, b = res["summary"], res["backbone"]
        label = "random init" if b["kind"] == "random_init" else Path(b["path"]).parent.name
        diff = None
        if i:
            delta = samples[i] - samples[i - 1]
            diff = [float(s["auroc"]["mean"] - runs[i - 1][1]["summary"]["auroc"]["mean"]),
                    *(float(q) for q in np.nanquantile(delta, [0.025, 0.975]))]
        t = training_time(b)
        rows.append({"run": d, "model": label, "summary": s, "depth_r2": res["depth"]["test_r2"],
                     "delta_auroc": diff, "train_s": t})
        lines.append(f"| {label} | {fmt(s['auroc'])} | "
                     + (f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "") + " | "
                     + f"{ci(s['auprc'])} | {ci(s['f1'])} | {res['depth']['test_r2']:.3f} | "
                     + (f"{t / 60:.1f} min" if t is not None else "") + " |")
    res0 = runs[0][1]
    lines += ["", f"Test: {len(y)} volumes, {res0['config']['seeds']} probe seeds, {cfg.n_boot} bootstrap resamples; "
              f"probed on {res0['device']}."]
    md = "\n".join(lines) + "\n"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(md)
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    plot_comparison(rows, out / "comparison.png")
    print(md)
    return rows


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    if cfg.bench:
        return benchmark(cfg)
    if cfg.compare:
        return compare(cfg.compare.split(","), cfg)
    t0, device = time.time(), pick_device(cfg.device)
    try:
        ds = {s: open_split(cfg.data, s) for s in SPLITS}
    except PreparedError as e:
        sys.exit(f"probe.py: {e}")
    vit, backbone = load_model(cfg)
    identity = {"backbone": backbone["sha256"], "vit": backbone["vit"], "img_size": cfg.img_size,
                "data": data_identity(cfg.data)}
    feats = {s: cached_features(cfg.data, s, ds[s].slices, vit, identity, cfg.img_size, cfg.feat_batch, device)
             for s in SPLITS}
    print(f"features: {', '.join(f'{s} {feats[s].shape}' for s in SPLITS)} in {cfg.data}/features/")
    center = feature_mean(feats["train"])  # train statistics only
    train, val, test = (make_bags(feats[s], ds[s], device, center=center) for s in SPLITS)

    seeds, scores, reports, thresholds = [], [], [], []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        print(f"probe seed {seed}: {len(cfg.poolings)} poolings x {len(cfg.lrs)} lrs, {cfg.steps} steps")
        sel, s, rep = evaluate_seed(train, val, test, cfg, seed)
        seeds.append({"seed": seed, "pooling": sel.pooling, "lr": sel.lr, "step": sel.step,
                      "val_macro_auprc": sel.val_macro_auprc, "test_macro": rep["macro"]})
        scores.append(s), reports.append(rep), thresholds.append(sel.thresholds)
    y = test.labels.cpu().numpy()
    summary = summarise(reports, np.stack(scores), np.stack(thresholds), y, cfg)
    per_class = {n: {m: _num(np.mean([r["per_class"][n][m] if r["per_class"][n][m] is not None else np.nan
                                      for r in reports])) for m in METRICS}
                 | {"prevalence": reports[0]["per_class"][n]["prevalence"]} for n in LABELS}

    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(rng.choice(len(feats["train"]), min(cfg.depth_max_slices, len(feats["train"])), replace=False))
    depth = depth_r2(feats["train"][keep], ds["train"].depth_pos[keep], feats["val"], ds["val"].depth_pos,
                     feats["test"], ds["test"].depth_pos)

    res = {"config": asdict(cfg), "backbone": backbone, "feature_identity": identity,
           "data": {"root": str(cfg.data), "manifest": ds["train"].manifest,
                    "volumes": {s: len(ds[s]) for s in SPLITS}, "slices": {s: len(ds[s].slices) for s in SPLITS}},
           "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "summary": summary, "classes_in_macro": reports[0]["classes_in_macro"], "excluded": reports[0]["excluded"],
           "per_class": per_class, "seeds": seeds, "depth": depth, "time_s": time.time() - t0}
    print(write_results(res, cfg.out))
    np.savez(Path(cfg.out) / "test_scores.npz", scores=np.stack(scores), thresholds=np.stack(thresholds),
             labels=y, names=np.array(ds["test"].names))  # what --compare needs for paired intervals
    plot_roc(y, np.stack(scores).mean(0), Path(cfg.out) / "roc.png",
             f"{res['backbone']['kind']} ViT-{res['backbone']['vit']}: test ROC per class, "
             f"macro AUROC {summary['auroc']['mean']:.3f}")
    print(f"wrote {cfg.out}/results.json and results.md")
    return res


if __name__ == "__main__":
    main()
