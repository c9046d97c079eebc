"""
worldmodel.py: what a frozen backbone knows of the anatomy in a slice, beyond CT-RATE's 18 labels (RECIPE.md 9).

Every probe is linear on frozen features, trained on `train`, its free choices (Dice thresholds, the ridge's
alpha) made on `val`; `test` is scored once, with bootstrap 95% intervals over test volumes:
- findings (ReXGroundingCT's 14 categories, volumes with finding masks): a slice classifier on CLS and a dense
  probe on the patch grid (1x1 linear map, bilinear upsampling to the mask, per-pixel BCE), trained together;
  slice-level macro AUROC / AUPRC, per-class 3D Dice, Hit@5% / Hit@10%;
- organs (the TotalSegmentator structures seen in train, volumes with anatomy): the same pair of probes; slice
  presence macro AUROC, per-organ 3D Dice;
- where a slice sits: slice order within each test volume (Spearman of ridge-predicted and true depth), the
  effective rank of the CLS features (a collapsed backbone reads about 1), and mean CLS distance by slice gap.

Patch tokens are never cached (256 x 1024 per slice at full scale): each batch goes through the frozen backbone
again, so a dense probe costs `wm_epochs` forward passes per train slice, one per val and test slice.

    res = worldmodel.evaluate(vit, splits, cls_feats, prepare.normalize_hu, img_size=256, device="cuda")
    print("\\n".join(worldmodel.report_lines(res)))
    plots.plot_worldmodel(res, "out/worldmodel.png")
    plots.plot_distance_vs_gap({"2S": res["distance_vs_gap"], "random": other["distance_vs_gap"]}, "gap.png")
"""
import base64
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (ABNORMALITY_CODES, N_ANATOMY, NONNEG, POSITIVE, SPLITS, Check, at_least, one_of, setting,
                    validate)
from metrics import (DEPTH_ALPHAS, bootstrap_slice_macro, bootstrap_volume_means, class_means, depth_ridge,
                     dice_report, dice_scores, distance_by_gap, effective_rank, finite_or_none, interval, macro,
                     mean_or_none, ordering_scores)

TASKS = ("findings", "organs")
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # val's candidates for each class's Dice threshold
HITS = (0.05, 0.10)                                              # Hit@5% and Hit@10% (RECIPE.md 9)


@dataclass
class WorldModelConfig:
    wm_tasks: tuple = setting(TASKS, one_of(*TASKS))   # the dense probes to run; order, rank, distance always run
    wm_epochs: int = setting(3, at_least(1))           # passes over the train slices (RECIPE.md 9)
    wm_lr: float = setting(1e-3, POSITIVE)             # AdamW (RECIPE.md 9)
    wm_weight_decay: float = setting(1e-4, NONNEG)     # AdamW (RECIPE.md 9)
    wm_batch: int = setting(32, at_least(1))           # slices per step, each through the frozen backbone
    wm_threshold: float = setting(0.5, Check(lambda v: 0 < v < 1, "a number in (0, 1)"))  # fixed Dice cut
    wm_finding_slices: int = setting(0, NONNEG)        # per volume with finding masks, evenly spaced; 0 = all
    wm_organ_slices: int = setting(8, at_least(1))     # per volume with anatomy, evenly spaced (cost at scale)
    wm_depth_max_slices: int = setting(200000, at_least(1))  # random train slices fitting the order ridge
    wm_gap_max_mm: float = setting(96.0, POSITIVE)     # widest slice gap on the distance curve
    wm_pictures: int = setting(3, NONNEG)              # test volumes pictured per dense probe
    wm_n_boot: int = setting(1000, at_least(1))        # bootstrap resamples of test volumes
    wm_seed: int = setting(0, NONNEG)                  # probe init, slice order, ridge subset, resamples


# -----------------------------------------------------------------------------
# What a dense probe sees: slice rows grouped by volume, their masks, and the frozen features of those rows

@dataclass
class Task:
    rows: np.ndarray   # (N,) slice indices into the split's arrays, volume by volume
    group: np.ndarray  # (N,) position in `names` of each row's volume
    names: list        # the volumes used


def task_slices(ds, has, per_volume):
    """The slices of every volume flagged in `has` (V,): all of them (per_volume 0) or per_volume evenly spaced."""
    rows, group, names = [], [], []
    for v in np.flatnonzero(has):
        n = int(ds.count[v])
        pick = np.arange(n) if per_volume == 0 or per_volume >= n else \
            np.unique(np.linspace(0, n - 1, per_volume).round().astype(np.int64))
        rows.append(int(ds.start[v]) + pick)
        group.append(np.full(len(pick), len(names)))
        names.append(ds.names[v])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return Task(cat(rows), cat(group), names)


def mask_reader(ds, organs=None, device="cpu"):
    """rows -> (B, C, m, m) float masks on the device (built there from the stored bytes): the 14 finding bits
    (bit c = ReXGroundingCT category c, RECIPE.md 2), or with `organs` one channel per TotalSegmentator label."""
    if organs is None:
        bits = torch.arange(len(ABNORMALITY_CODES), device=device)[None, :, None, None]
        return lambda rows: ((torch.from_numpy(np.asarray(ds.abnormal[rows], np.int32)).to(device)[:, None]
                              >> bits) & 1).float()
    ids = torch.as_tensor(organs, device=device)[None, :, None, None]  # the uint8 labels travel, not the one-hot
    return lambda rows: (torch.from_numpy(np.asarray(ds.anatomy[rows])).to(device)[:, None] == ids).float()


def present_labels(anatomy, rows, chunk=4096):
    """TotalSegmentator labels (background excluded) that occur in anatomy[rows]."""
    seen = np.zeros(N_ANATOMY, bool)
    for i in range(0, len(rows), chunk):
        seen |= np.bincount(np.asarray(anatomy[rows[i:i + chunk]]).ravel(), minlength=N_ANATOMY) > 0
    return np.flatnonzero(seen[1:]) + 1


def backbone_features(vit, ds, normalize, img_size, device):
    """rows -> (CLS (B, D), patch grid (B, D, g, g)) of the frozen ViT, fed as probe.extract_features feeds it."""
    patch, device = getattr(vit, "patch_size", 16), torch.device(device)
    g = img_size // patch  # whole patches only, as probe.model_input cuts them (patch 14 at 256 px: 18)

    @torch.no_grad()
    def features(rows):
        x = normalize(torch.from_numpy(np.asarray(ds.slices[rows], np.int16)).to(device))[:, None]  # (B, 1, H, W)
        if x.shape[-1] != img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., :g * patch, :g * patch].expand(-1, vit.in_chans, -1, -1)  # (B, C_in, H, W)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls, tokens = vit(x)                                          # (B, D), (B, T, D)
        return cls.float(), tokens.float().transpose(1, 2).reshape(len(x), -1, g, g)  # (B, D), (B, D, g, g)
    return features


# -----------------------------------------------------------------------------
# The probe pair, its training, and one scoring pass (RECIPE.md 9)

class DenseProbe(nn.Module):
    """Linear(D, C) on CLS and a 1x1 linear map D -> C on the patch grid, bilinearly upsampled to the mask."""

    def __init__(self, dim, n_classes, mask_size):
        super().__init__()
        self.slice_head, self.dense_head = nn.Linear(dim, n_classes), nn.Conv2d(dim, n_classes, 1)
        self.mask_size = mask_size

    def forward(self, cls, grid):  # cls (B, D), grid (B, D, g, g)
        dense = F.interpolate(self.dense_head(grid), size=(self.mask_size,) * 2, mode="bilinear", align_corners=False)
        return self.slice_head(cls), dense  # (B, C), (B, C, m, m)


def train_dense(features, masks, rows, dim, n_classes, mask_size, cfg, device="cpu", log=print, name="probe"):
    """Both heads together on the train `rows`: wm_epochs passes in a seeded order, AdamW, BCE on the slice
    labels (does the slice hold the class) plus per-pixel BCE on the masks. features(rows) -> (CLS, grid)."""
    with torch.random.fork_rng(devices=[]):                               # seeded init, global RNG untouched
        torch.manual_seed(cfg.wm_seed)
        probe = DenseProbe(dim, n_classes, mask_size).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.wm_lr, weight_decay=cfg.wm_weight_decay)
    rng, B = np.random.default_rng(cfg.wm_seed), cfg.wm_batch
    steps, step, seen, losses, t0 = cfg.wm_epochs * math.ceil(len(rows) / B), 0, 0, [], time.time()
    for epoch in range(cfg.wm_epochs):
        order, total = rng.permutation(len(rows)), torch.zeros((), device=device)
        for i in range(0, len(rows), B):
            batch = np.sort(rows[order[i:i + B]])                         # in file order: memmap reads
            cls, grid = features(batch)                                   # (B, D), (B, D, g, g)
            target = masks(batch).to(device)                              # (B, C, m, m)
            s, d = probe(cls, grid)
            loss = (F.binary_cross_entropy_with_logits(s, target.amax((2, 3)))
                    + F.binary_cross_entropy_with_logits(d, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, step, seen = total + loss.detach() * len(batch), step + 1, seen + len(batch)
            if step % max(1, steps // 10) == 0 or step == steps:
                rate = seen / (time.time() - t0)
                log(f"worldmodel {name} step {step}/{steps} | epoch {epoch + 1} | loss {loss.item():.4f} | "
                    f"{rate:.0f} slices/s | ETA {(steps - step) * B / rate:.0f} s")
        losses.append(float(total) / len(rows))
    seconds = time.time() - t0
    return probe, {"epoch_loss": losses, "slices": len(rows), "seconds": seconds, "slices_per_s": seen / seconds}


@dataclass
class Scored:
    scores: np.ndarray  # (N, C) slice-level probabilities
    labels: np.ndarray  # (N, C) does the slice hold the class
    inter: np.ndarray   # (V, C, K) |predicted and true| voxels per threshold row
    pred: np.ndarray    # (V, C, K) |predicted| voxels
    true: np.ndarray    # (V, C, 1) |true| voxels


@torch.no_grad()
def score(probe, features, masks, task, thresholds, batch=32, device="cpu"):
    """One pass over a task's slices; thresholds (K, C), one cut per class in each row. Dice comes from voxel
    counts summed per volume, so no volume's masks are ever held whole."""
    thr = torch.as_tensor(np.asarray(thresholds), dtype=torch.float32, device=device)  # (K, C)
    V, (K, C) = len(task.names), thr.shape
    inter, pred = torch.zeros(V, C, K, device=device), torch.zeros(V, C, K, device=device)
    true, scores, labels = torch.zeros(V, C, 1, device=device), [], []
    for i in range(0, len(task.rows), batch):
        rows, group = task.rows[i:i + batch], torch.as_tensor(task.group[i:i + batch], device=device)
        target = masks(rows).to(device)                                   # (B, C, m, m)
        s, d = probe(*features(rows))
        p = torch.sigmoid(d)                                              # (B, C, m, m)
        for k in range(K):
            above = p >= thr[k][None, :, None, None]                      # (B, C, m, m)
            inter[:, :, k].index_add_(0, group, (above * target).sum((2, 3)))
            pred[:, :, k].index_add_(0, group, above.sum((2, 3)).float())
        true[:, :, 0].index_add_(0, group, target.sum((2, 3)))
        scores.append(torch.sigmoid(s).cpu())
        labels.append(target.amax((2, 3)).cpu())
    cat = lambda parts: torch.cat(parts).numpy() if parts else np.zeros((0, C), np.float32)  # noqa: E731
    return Scored(cat(scores), cat(labels), inter.cpu().numpy(), pred.cpu().numpy(), true.cpu().numpy())


def tune_thresholds(val, candidates, fallback):
    """Per class, the candidate (K,) with the best mean val Dice, the lowest on ties; `fallback` (C,) for a
    class no val volume has."""
    mean = class_means(dice_scores(val.inter, val.pred, val.true))        # (C, K)
    ok = np.isfinite(mean).any(-1)
    return np.where(ok, np.asarray(candidates)[np.nan_to_num(mean, nan=-1.0).argmax(-1)], fallback)


def dense_task(kind, splits, features, dim, cfg, device="cpu", log=print):
    """One dense probe end to end: slices, classes, training on train, thresholds on val, test scored once."""
    flag, per_volume = {"findings": ("has_abnormality", cfg.wm_finding_slices),
                        "organs": ("has_anatomy", cfg.wm_organ_slices)}[kind]
    tasks = {s: task_slices(splits[s], getattr(splits[s], flag), per_volume) for s in SPLITS}
    out = {"volumes": {s: len(tasks[s].names) for s in SPLITS}, "slices": {s: len(tasks[s].rows) for s in SPLITS}}
    missing = [s for s in ("train", "test") if not tasks[s].names]
    if missing:
        return {**out, "skipped": f"no {' or '.join(missing)} volume with {kind} masks"}
    if kind == "findings":
        classes, masks = list(ABNORMALITY_CODES), {s: mask_reader(splits[s], None, device) for s in SPLITS}
    else:  # the structures seen in train are the ones a probe can learn
        organs = present_labels(splits["train"].anatomy, tasks["train"].rows)
        classes, masks = [str(o) for o in organs], {s: mask_reader(splits[s], organs, device) for s in SPLITS}
        if not classes:
            return {**out, "skipped": "no organ label in the train slices"}
    C, m, B = len(classes), splits["train"].anatomy.shape[-1], cfg.wm_batch
    probe, out["train"] = train_dense(features["train"], masks["train"], tasks["train"].rows, dim, C, m, cfg,
                                      device, log, kind)
    probe.eval()
    fixed = tuned = np.full(C, cfg.wm_threshold)
    if tasks["val"].names:  # else the fixed cut stands for the tuned one
        candidates = np.array(sorted(set(THRESHOLDS) | {cfg.wm_threshold}))
        val = score(probe, features["val"], masks["val"], tasks["val"], np.tile(candidates[:, None], C), B, device)
        tuned = tune_thresholds(val, candidates, fixed)
    test = score(probe, features["test"], masks["test"], tasks["test"], np.stack([fixed, tuned]), B, device)
    dice = dice_scores(test.inter, test.pred, test.true)                   # (V, C, 2): test's only use
    group, n_boot, seed = tasks["test"].group, cfg.wm_n_boot, cfg.wm_seed
    out["classes"] = classes
    out["slice"] = {k: {"value": finite_or_none(macro(k, test.labels, test.scores)),
                        "ci95": interval(bootstrap_slice_macro(test.labels, test.scores, group, k, n_boot, seed))}
                    for k in ("auroc", "auprc")}
    out["dice"] = {"threshold": cfg.wm_threshold, **dice_report(dice[..., 0], classes, HITS, n_boot, seed)}
    out["dice_val_thresholds"] = {"thresholds": dict(zip(classes, map(float, tuned))),
                                  "chosen_on_val": bool(tasks["val"].names),
                                  **dice_report(dice[..., 1], classes, HITS, n_boot, seed)}
    label_of = splits["test"].abnormal if kind == "findings" else splits["test"].anatomy
    out["pictures"] = pictures(probe, features["test"], masks["test"], tasks["test"], splits["test"], label_of,
                               fixed, cfg.wm_pictures)
    return out


# -----------------------------------------------------------------------------
# Pictures: a few test slices with their true and predicted masks, packed small for results.json

def pack(a):
    """An array as JSON: dtype, shape, base64 of its bytes (plots.unpack reads it back)."""
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


@torch.no_grad()
def pictures(probe, features, masks, task, ds, label_of, thresholds, n):
    """The first n test volumes: the slice with the most labelled pixels, at mask resolution, with the true
    label map, the predicted one (at `thresholds`, 1 + class index, 0 none) and the top class probability.
    For display only: nothing here feeds a number."""
    out, thr = [], torch.as_tensor(thresholds, dtype=torch.float32)[:, None, None]  # (C, 1, 1)
    for k in range(min(n, len(task.names))):
        rows = task.rows[task.group == k]
        r = int(rows[np.argmax([(np.asarray(label_of[i]) != 0).sum() for i in rows])])
        true = masks(np.array([r]))[0].cpu()                              # (C, m, m)
        p = torch.sigmoid(probe(*features(np.array([r])))[1][0]).cpu()    # (C, m, m)
        above, m = p >= thr, true.shape[-1]
        hu = F.interpolate(torch.from_numpy(np.asarray(ds.slices[r], np.float32))[None, None], size=(m, m),
                           mode="bilinear", antialias=True, align_corners=False)[0, 0]  # (m, m)
        out.append({"volume": task.names[k], "depth_mm": float(ds.depth_mm[r]),
                    "hu": pack(hu.round().short().numpy()),
                    "true": pack(torch.where(true.any(0), true.argmax(0) + 1, 0).byte().numpy()),
                    "pred": pack(torch.where(above.any(0), (p * above).argmax(0) + 1, 0).byte().numpy()),
                    "prob": pack((p.amax(0) * 255).round().byte().numpy())})
    return out


# -----------------------------------------------------------------------------
# Where a slice sits, from the cached CLS features alone; gaps binned to the finest slice spacing

def slice_position(cls_feats, splits, cfg):
    """Slice order (ridge on train, alpha by val mean Spearman, test once), effective rank, distance by gap."""
    train, val, test = (splits[s] for s in SPLITS)
    rng = np.random.default_rng(cfg.wm_seed)
    keep = rng.choice(len(train.depth_pos), min(cfg.wm_depth_max_slices, len(train.depth_pos)), replace=False)
    predict = depth_ridge(cls_feats["train"], train.depth_pos, keep)
    val_order = class_means(ordering_scores(predict(cls_feats["val"]).T, val.depth_pos, val.start, val.count))  # (A,)
    order = {"value": None, "ci95": [None, None], "alpha": None, "val": None, "volumes": 0}
    if np.isfinite(val_order).any():  # else no val volume has 3 slices: nothing to choose alpha on
        a = int(np.nanargmax(val_order))
        per_volume = ordering_scores(predict(cls_feats["test"])[:, a], test.depth_pos, test.start, test.count)
        order.update(alpha=float(DEPTH_ALPHAS[a]), val=float(val_order[a]), value=mean_or_none(per_volume),
                     ci95=interval(bootstrap_volume_means(per_volume[:, None], cfg.wm_n_boot, cfg.wm_seed)),
                     volumes=int(np.isfinite(per_volume).sum()))
    f = cls_feats["train"]
    center = sum(np.asarray(f[i:i + 65536], np.float64).sum(0) for i in range(0, len(f), 65536)) / len(f)  # (D,)
    return {"order": order,
            "effective_rank": {"value": finite_or_none(effective_rank(cls_feats["test"])),
                               "dim": int(cls_feats["test"].shape[1])},
            "distance_vs_gap": distance_by_gap(cls_feats["test"], test.depth_mm, test.start, test.count, center,
                                               float(np.min(test.z_mm)), cfg.wm_gap_max_mm, cfg.wm_seed)}


# -----------------------------------------------------------------------------
# The entry point and its report

def evaluate(vit, splits, cls_feats, normalize, img_size, device="cpu", settings=None, log=print):
    """All world-model probes of a frozen ViT. splits: {train, val, test} -> prepare.PreparedSplit; cls_feats:
    the same splits' cached CLS features (S, D); normalize: int16 HU tensor -> network input. JSON-ready dict."""
    cfg = settings or WorldModelConfig()
    validate(cfg, "worldmodel settings")
    t0, device = time.time(), torch.device(device)
    vit.eval().to(device)
    features = {s: backbone_features(vit, splits[s], normalize, img_size, device) for s in SPLITS}
    res = {"settings": asdict(cfg)}
    for kind in TASKS:
        res[kind] = dense_task(kind, splits, features, vit.embed_dim, cfg, device, log) if kind in cfg.wm_tasks \
            else {"skipped": "not asked for (wm_tasks)"}
    res.update(slice_position(cls_feats, splits, cfg))
    res["time_s"] = time.time() - t0
    return res


def report_lines(res):
    """results.md's world-model section, markdown lines."""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    row = lambda name, m, n="": (f"| {name} | {fmt(m['value'])} | "  # noqa: E731
                                 f"{fmt(m['ci95'][0])}-{fmt(m['ci95'][1])} | {n} |")
    lines = ["## World-model probes (RECIPE.md 9)", "", "| probe (test) | value | 95% CI | volumes |",
             "|---|---|---|---|"]
    for kind in TASKS:
        r = res[kind]
        if "skipped" in r:
            lines.append(f"| {kind} | skipped: {r['skipped']} | | |")
            continue
        n, d, t = r["volumes"]["test"], r["dice"], r["dice"]["threshold"]
        lines += [row(f"{kind}: slice macro {m.upper()}", r["slice"][m], n) for m in ("auroc", "auprc")]
        lines += [row(f"{kind}: mean 3D Dice, threshold {t:g}", d, n),
                  row(f"{kind}: mean 3D Dice, per-class thresholds from val", r["dice_val_thresholds"], n)]
        lines += [row(f"{kind}: Hit@{k}%, threshold {t:g}", d[f"hit{k}"], n) for k in (5, 10)]
    o, e, g = res["order"], res["effective_rank"], res["distance_vs_gap"]
    lines += [row(f"slice order, Spearman (ridge alpha {o['alpha']})", o, o["volumes"]),
              f"| effective rank of CLS (of {e['dim']}) | {fmt(e['value'])} | | |"]
    if "skipped" not in res["findings"]:
        d = res["findings"]["dice"]
        lines += ["", f"Findings per class (threshold {d['threshold']:g}; over the test volumes with the finding):",
                  "", "| category | volumes | Dice | Hit@5% | Hit@10% |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {p['volumes']} | {fmt(p['dice'])} | {fmt(p['hit5'])} | {fmt(p['hit10'])} |"
                  for c, p in d["per_class"].items()]
    shown = ", ".join(f"{mm:g} mm {fmt(x)}" for mm, x in list(zip(g["gap_mm"], g["distance"]))[:6])
    return lines + ["", f"Mean {g['metric']} by slice gap: {shown}; between volumes {fmt(g['between_volumes'])}."]
