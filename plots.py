"""
plots.py: the pictures. matplotlib is optional: without it every function says how to get it,
returns None, and the run carries on.

    draw_sample      one training sample: the slab with its masks, the views, the patch targets
    plot_losses      a run's loss curves, from its log.jsonl
    plot_roc         the test ROC curve of every class
    plot_comparison  macro AUROC of compared models with their intervals
    plot_worldmodel  test slices with their true and probed finding / organ masks (worldmodel.py)
    plot_distance_vs_gap  mean feature distance by slice gap, one curve per compared model
"""
import base64
import json
import os
from dataclasses import replace

import numpy as np
import torch

from model import PATCH
from common import LABELS
from metrics import auroc


def pyplot(log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log("pictures need matplotlib: pip install matplotlib (skipped)")
        return None


def picture_sample(ds, cfg, sampling, tries=256):
    """(plan, slab slice indices, views) of the sample train.py --picture draws: the first training draw
    (step s, slot 0) whose slab shows a finding, else step 0's; its views with the 2S targets.
    sampling: train.py's (plan_slabs, slab_range, gather, make_views), passed in so this file needs no train."""
    plan_slabs, slab_range, gather, make_views = sampling
    first = None
    for step in range(tries):
        plan = plan_slabs(ds, cfg, step, [0])
        v = int(plan["vol"][0])
        lo, hi = slab_range(int(ds.count[v]), int(plan["centre"][0] - ds.start[v]), float(ds.z_mm[v]), cfg.slab_mm)
        slab = range(int(ds.start[v]) + lo, int(ds.start[v]) + hi + 1)
        first = first or (plan, slab)
        if ds.has_abnormality[v] and ds.abnormal[slab.start:slab.stop].any():
            first = (plan, slab)
            break
    views = make_views(gather(ds, first[0]), replace(cfg, variant="2s"), torch.device("cpu"))
    return (*first, views)


def draw_sample(ds, cfg, path, sampling, log=print):
    """One training sample as the model sees it: the slab's slices (centre framed) with the anatomy
    mask (colours) and the finding masks (red outlines), then the 2 global and n_local local views
    with the patch targets of the dense heads (colour: the majority anatomy class of each 16 px
    patch; red boxes: patches with an abnormality). sampling: as picture_sample takes it."""
    plt = pyplot(log)
    if plt is None:
        return None
    plan, slab, views = picture_sample(ds, cfg, sampling)
    v = int(plan["vol"][0])
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


def plot_roc(y, scores, png, title, log=print):
    """Test ROC curve of every class (scores: mean over probe seeds), macro AUROC in the title."""
    from sklearn.metrics import roc_curve
    plt = pyplot(log)
    if plt is None:
        return None
    fig, axes = plt.subplots(3, 6, figsize=(15, 7.8), sharex=True, sharey=True)
    for c, (ax, name) in enumerate(zip(axes.flat, LABELS)):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        if 0 < y[:, c].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, c], scores[:, c])
            ax.plot(fpr, tpr, lw=1.2)
            name += f"\nAUROC {auroc(y[:, c], scores[:, c]):.2f}"  # the number probe.py reports
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


def unpack(d):
    """An array packed by worldmodel.pack (dtype, shape, base64 of its bytes)."""
    return np.frombuffer(base64.b64decode(d["b64"]), d["dtype"]).reshape(d["shape"])


def plot_worldmodel(res, png, log=print):
    """One row per pictured test slice (worldmodel's results): the slice, the true label map, the dense probe's
    at the fixed threshold, its top class probability; all at mask resolution."""
    shown = [(kind, p) for kind in ("findings", "organs") for p in res.get(kind, {}).get("pictures", [])]
    plt = pyplot(log) if shown else None
    if plt is None:
        return None
    fig, axes = plt.subplots(len(shown), 4, figsize=(8, 2.1 * len(shown)), squeeze=False)
    for row, (kind, p) in zip(axes, shown):
        n = len(res[kind]["classes"])
        row[0].imshow(unpack(p["hu"]), cmap="gray", vmin=-1000, vmax=400)
        row[0].set_title(f"{p['volume']}, {p['depth_mm']:.0f} mm", fontsize=7)
        for ax, key in zip(row[1:3], ("true", "pred")):
            ax.imshow(unpack(p["hu"]), cmap="gray", vmin=-1000, vmax=400)
            ax.imshow(np.ma.masked_equal(unpack(p[key]), 0), cmap="tab20", vmin=1, vmax=max(n, 2), alpha=0.6,
                      interpolation="nearest")
            ax.set_title(f"{kind}: {'truth' if key == 'true' else 'probe, ' + str(res[kind]['dice']['threshold'])}",
                         fontsize=7)
        row[3].imshow(unpack(p["prob"]) / 255, cmap="magma", vmin=0, vmax=1)
        row[3].set_title("top class probability", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    log(f"wrote {png}")
    return png


def plot_distance_vs_gap(curves, png, log=print):
    """curves: model label -> worldmodel's distance_vs_gap; each model's mean distance by slice gap, its
    between-volume level dashed in the same colour."""
    plt = pyplot(log)
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, c in curves.items():
        gap = np.array(c["gap_mm"], float)
        dist = np.array([np.nan if d is None else d for d in c["distance"]], float)
        line, = ax.plot(gap, dist, marker=".", label=label)
        if c.get("between_volumes") is not None:
            ax.axhline(c["between_volumes"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("slice gap (mm)", fontsize=8)
    ax.set_ylabel(next(iter(curves.values()))["metric"], fontsize=7)
    ax.set_title("within a volume (dashed: slices of different volumes)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    log(f"wrote {png}")
    return png
