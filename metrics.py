"""
metrics.py: the probe's test metrics in numpy (RECIPE.md 7). Per class: AUROC, AUPRC (average precision), F1 and
balanced accuracy; their macros over the classes that have both labels; F1-optimal thresholds; one probe's report;
bootstrap 95% intervals. And depth R^2: how linearly a ridge reads slice depth out of the features.

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
