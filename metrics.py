"""
metrics.py: the probe's test metrics in numpy (RECIPE.md 7). Per class: AUROC, AUPRC (average precision), F1 and
balanced accuracy; their macros over the classes that have both labels; F1-optimal thresholds; one probe's report;
bootstrap 95% intervals. And depth R^2: how linearly a ridge reads slice depth out of the features. For
worldmodel.py (RECIPE.md 9): 3D Dice and Hit@k per volume, slice ordering (Spearman), effective rank, and
bootstraps over volumes of per-volume values and of slice-level macros.

Every metric runs along the last axis, batched over the leading ones, with optional per-sample weights: a bootstrap
resample is a vector of multiplicities, so the scores are sorted once and each resample costs a cumulative sum.
Ties count as scikit-learn counts them; tests/test_metrics.py holds every metric against scikit-learn.
"""
import warnings

import numpy as np

from common import LABELS

# -----------------------------------------------------------------------------
# Classification: per class along the last axis, then macros over the classes with both labels (RECIPE.md 7)

METRICS = ("auroc", "auprc", "f1", "bacc")


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
        area = (wp * (below + 0.5 * tied)).sum(-1) / (n_pos * n_neg)
        return np.where((n_pos > 0) & (n_neg > 0), area, np.nan)


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
    """Per class of (V, C) labels and scores, the t maximising F1 of `s >= t`; 0.5 for a class without positives."""
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


def _per_class(metric, y, s, thresholds, w=None):
    """y (..., C, V), s (..., C, V), thresholds (..., C) -> (..., C)."""
    if metric == "auroc":
        return auroc(y, s, w)
    if metric == "auprc":
        return average_precision(y, s, w)
    pred = s >= thresholds[..., None]
    return f1(y, pred, w) if metric == "f1" else balanced_accuracy(y, pred, w)


def macro(metric, y, s, thresholds=None, classes=None):
    """A metric of (V, C) labels and scores averaged over classes (default: those with both labels)."""
    classes = covered_classes(y) if classes is None else classes
    values = _per_class(metric, y.T, s.T, thresholds)
    return float(np.mean(values[classes])) if classes.any() else float("nan")


def finite_or_none(x):
    """x as a float, or None where it is missing or not finite: JSON has no NaN."""
    return None if x is None or not np.isfinite(x) else float(x)


def classification_report(y, s, thresholds, names=None):
    """Test metrics of one probe: y, s (V, C); thresholds (C,) tuned on validation."""
    names = names or (LABELS if y.shape[1] == len(LABELS) else [f"class {c}" for c in range(y.shape[1])])
    classes = covered_classes(y)
    per = {m: _per_class(m, y.T, s.T, thresholds) for m in METRICS}
    return {
        "macro": {m: float(per[m][classes].mean()) if classes.any() else None for m in METRICS},
        "classes_in_macro": [n for n, c in zip(names, classes) if c],
        "excluded": {names[c]: "no positives" if y[:, c].sum() == 0 else "no negatives"
                     for c in np.flatnonzero(~classes)},
        "per_class": {n: {**{m: finite_or_none(per[m][c]) for m in METRICS}, "prevalence": float(y[:, c].mean()),
                          "threshold": float(thresholds[c])} for c, n in enumerate(names)},
    }


def bootstrap_ci(y, scores, metric="auroc", thresholds=None, n_boot=1000, seed=0, level=0.95):
    """Interval of a macro metric when the test volumes are resampled with replacement."""
    out = bootstrap_samples(y, scores, metric, thresholds, n_boot, seed)
    return tuple(float(q) for q in np.nanquantile(out, [(1 - level) / 2, (1 + level) / 2]))


def bootstrap_samples(y, scores, metric="auroc", thresholds=None, n_boot=1000, seed=0):
    """The macro metric on each of n_boot resamples of the test volumes, (n_boot,). y (V, C); scores (V, C) or
    (R, V, C) for R probe seeds; thresholds (C,) or (R, C) for f1/bacc. The resamples depend only on (seed, V),
    so two models' samples differ as a paired bootstrap; every seed is scored on each resample and the seeds
    averaged (the interval of the reported mean), over the classes covered on the full test set."""
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


# -----------------------------------------------------------------------------
# Depth R^2 (RECIPE.md 7): not a score of the probe but a readout of the features themselves

def depth_r2(train_x, train_y, val_x, val_y, test_x, test_y, alphas=tuple(10.0 ** np.arange(-2, 7)), chunk=65536):
    """How linearly slice depth (0 = apex end, 1 = the other) reads out: ridge regression from features (S, D),
    fit on train, alpha by val R^2, test R^2 reported. One eigendecomposition of X^T X serves every alpha."""
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


# -----------------------------------------------------------------------------
# The world-model probes (RECIPE.md 9): masks scored per volume, slice order, the features' effective rank.
# A volume is the unit everywhere: bootstraps resample volumes, and a slice weighs what its volume weighs.

def dice_scores(inter, pred, true):
    """3D Dice of each (volume, class) from voxel counts (V, C): 2|P and T| / (|P| + |T|); NaN where the volume
    has no voxel of the class, so a class counts only over the volumes that have it (RECIPE.md 9)."""
    inter, pred, true = (np.asarray(a, np.float64) for a in (inter, pred, true))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(true > 0, 2 * inter / (pred + true), np.nan)


def hit_rate(dice, k):
    """Per class (last axis) of (V, C) Dice: the share of the volumes with the class whose Dice > k; NaN without any."""
    finite = np.isfinite(dice)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite.any(0), (np.nan_to_num(dice, nan=-1.0) > k).sum(0) / finite.sum(0), np.nan)


def class_means(values):
    """(V, C) with NaN where undefined -> per-class means over the defined volumes (C,), NaN for an empty class."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite.any(0), np.where(finite, values, 0).sum(0) / finite.sum(0), np.nan)


def spearman(a, b):
    """Spearman's rank correlation along the last axis, ties given their average rank; 0 where either side is
    constant (a collapsed readout orders nothing), NaN below 2 elements."""
    def ranks(x):
        order, first, last = _tie_groups(np.asarray(x, np.float64), descending=False)
        r = np.empty(order.shape)
        np.put_along_axis(r, order, (first + last) / 2.0, -1)       # average rank of each tie group
        return r - r.mean(-1, keepdims=True)
    ra, rb = ranks(a), ranks(b)
    if ra.shape[-1] < 2:
        return np.full(ra.shape[:-1], np.nan)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    return np.divide((ra * rb).sum(-1), den, out=np.zeros(den.shape), where=den > 0)


def ordering_scores(pred, true, start, count, min_slices=3):
    """Per volume: Spearman of predicted depth (..., S) and true depth (S,) over the volume's slices, (V, ...);
    NaN under min_slices slices. The leading axes of pred (e.g. one row per ridge alpha) are kept."""
    pred, true, undefined = np.asarray(pred), np.asarray(true), np.full(np.shape(pred)[:-1], np.nan)
    out = [spearman(pred[..., s:s + n], true[s:s + n]) if n >= min_slices else undefined
           for s, n in zip(np.asarray(start), np.asarray(count))]
    return np.array(out, np.float64).reshape(len(out), *undefined.shape)


def effective_rank(feats, chunk=65536):
    """Participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues of (S, D) features: 1 when every
    slice lies on one line (a collapsed backbone), D when isotropic. trace(C)^2 / |C|_F^2: no eigensolver."""
    n, s1, s2 = 0, 0.0, 0.0
    for i in range(0, len(feats), chunk):
        x = np.asarray(feats[i:i + chunk], np.float64)
        n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + x.T @ x
    mu = s1 / n
    cov = s2 / n - np.outer(mu, mu)                                      # (D, D)
    tr, fro2 = np.trace(cov), (cov ** 2).sum()
    return float(tr * tr / fro2) if fro2 > 0 else float("nan")


DEPTH_ALPHAS = tuple(10.0 ** np.arange(-2, 7))  # depth_r2's grid


def depth_ridge(train_x, train_y, rows=None, alphas=DEPTH_ALPHAS, chunk=65536):
    """depth_r2's ridge (standardised features -> depth, one fit per alpha) from chunked sums, so a memmap's
    rows (a subset `rows`) are never held in memory at once. Returns predict(x (S, D)) -> (S, A)."""
    rows = np.arange(len(train_y)) if rows is None else np.sort(np.asarray(rows))
    n, s1, s2, sxy, sy = 0, 0.0, 0.0, 0.0, 0.0
    for i in range(0, len(rows), chunk):
        x, y = np.asarray(train_x[rows[i:i + chunk]], np.float64), np.asarray(train_y[rows[i:i + chunk]], np.float64)
        n, s1, s2, sxy, sy = n + len(x), s1 + x.sum(0), s2 + x.T @ x, sxy + x.T @ y, sy + y.sum()
    mu, ym = s1 / n, sy / n
    sd = np.sqrt(np.clip(np.diag(s2) / n - mu * mu, 0, None)) + 1e-6    # depth_r2's standardisation
    xtx = (s2 - n * np.outer(mu, mu)) / np.outer(sd, sd)                 # Xs^T Xs, (D, D)
    xty = (sxy - n * mu * ym) / sd                                       # Xs^T (y - ym), (D,)
    evals_, V = np.linalg.eigh(xtx)
    W = V @ ((V.T @ xty)[:, None] / (evals_[:, None] + np.asarray(alphas)[None]))  # (D, A)
    return lambda x: np.concatenate([((np.asarray(x[i:i + chunk], np.float64) - mu) / sd) @ W + ym
                                     for i in range(0, max(len(x), 1), chunk)])[:len(x)]


def bootstrap_volume_means(values, n_boot=1000, seed=0):
    """values (V, C), NaN where undefined (a class absent from a volume): on each resample of the V volumes, the
    mean over classes of the per-class mean over defined volumes, (n_boot,). Classes empty in a resample drop out."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    finite = np.isfinite(values)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(values), len(values)), minlength=len(values))
                       for _ in range(n_boot)]).astype(np.float64)      # (n_boot, V)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per = (counts @ np.where(finite, values, 0)) / (counts @ finite)  # (n_boot, C)
        return np.nanmean(per[:, finite.any(0)], -1)


def bootstrap_slice_macro(y, s, group, metric="auroc", n_boot=1000, seed=0):
    """Slice-level macro AUROC / AUPRC of (N, C) labels and scores on each resample of the volumes (`group`
    (N,) = volume index of each slice), a slice weighted by its volume's multiplicity, (n_boot,); macros over
    the classes with both labels on the full set, as macro() takes them."""
    group = np.asarray(group)
    V, classes = int(group.max()) + 1, covered_classes(y)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, V, V), minlength=V) for _ in range(n_boot)])  # (n_boot, V)
    chunk = max(1, 4_000_000 // (y.shape[0] * y.shape[1]))
    out = []
    for i in range(0, n_boot, chunk):
        w = counts[i:i + chunk][:, group][:, None, :]                    # (b, 1, N)
        per = _per_class(metric, y.T, s.T, None, w)                      # (b, C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out.append(np.nanmean(per[..., classes], -1))
    return np.concatenate(out)


def interval(samples, level=0.95):
    """[lo, hi] of bootstrap samples, None where undefined (JSON has no NaN)."""
    samples = np.asarray(samples, np.float64)
    if not np.isfinite(samples).any():
        return [None, None]
    return [finite_or_none(q) for q in np.nanquantile(samples, [(1 - level) / 2, (1 + level) / 2])]


def mean_or_none(x):
    """nan-mean as a float, None where nothing is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return finite_or_none(np.nanmean(x)) if np.size(x) else None


def dice_report(dice, names, hits=(0.05, 0.10), n_boot=1000, seed=0):
    """Test 3D Dice (V, C), NaN where a volume lacks the class -> mean Dice and Hit@k (means over classes of the
    per-class values) with bootstrap 95% intervals over volumes, and the per-class table (RECIPE.md 9)."""
    per, rates = class_means(dice), {f"hit{round(100 * k)}": hit_rate(dice, k) for k in hits}
    out = {"value": mean_or_none(per), "ci95": interval(bootstrap_volume_means(dice, n_boot, seed))}
    for (key, rate), k in zip(rates.items(), hits):
        hit = np.where(np.isfinite(dice), np.nan_to_num(dice) > k, np.nan)  # (V, C), NaN where undefined
        out[key] = {"value": mean_or_none(rate), "ci95": interval(bootstrap_volume_means(hit, n_boot, seed))}
    out["per_class"] = {n: {"dice": finite_or_none(per[c]), "volumes": int(np.isfinite(dice[:, c]).sum()),
                            **{key: finite_or_none(rate[c]) for key, rate in rates.items()}}
                        for c, n in enumerate(names)}
    return out


def distance_by_gap(feats, depth_mm, start, count, center, step, max_gap_mm, seed=0, n_between=4096):
    """Mean cosine distance 1 - cos(a - c, b - c) of two slices' features by their gap in mm (binned to `step`),
    over the slice pairs within each volume; c (D,) a train mean, so a shared offset does not hide the variation.
    between_volumes: the same for random slices of different volumes, the level of unrelated slices."""
    K = int(max_gap_mm // step)
    total, pairs = np.zeros(K + 1), np.zeros(K + 1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    for s, n in zip(np.asarray(start), np.asarray(count)):
        x = unit(np.asarray(feats[s:s + n], np.float64) - center)        # (n, D)
        z = np.asarray(depth_mm[s:s + n], np.float64)                     # (n,)
        i, j = np.triu_indices(n, 1)
        b = np.rint(np.abs(z[i] - z[j]) / step).astype(np.int64)          # (n(n-1)/2,) gap bins
        keep = b <= K
        total += np.bincount(b[keep], weights=1 - (x @ x.T)[i[keep], j[keep]], minlength=K + 1)
        pairs += np.bincount(b[keep], minlength=K + 1)
    vol = np.repeat(np.arange(len(start)), count)
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vol), n_between), rng.integers(0, len(vol), n_between)
    a, b = a[vol[a] != vol[b]], b[vol[a] != vol[b]]
    x, y = (unit(np.asarray(feats[r], np.float64) - center) for r in (a, b))  # (P, D) each
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / pairs
    return {"metric": "cosine distance of train-mean-centred features", "gap_mm": [k * step for k in range(1, K + 1)],
            "distance": [finite_or_none(d) for d in mean[1:]], "pairs": pairs[1:].astype(int).tolist(),
            "between_volumes": finite_or_none(np.mean(1 - (x * y).sum(-1))) if len(a) else None}
