"""metrics.py against scikit-learn: every metric with ties, weights as materialised resamples, F1 thresholds,
bootstrap intervals, classes without both labels; and the depth ridge on a known linear direction."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

import metrics
from common import LABELS


# ---------------------------------------------------------------------------------------------
# Classification metrics

def test_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    V, C = 300, 6
    y = rng.random((V, C)) < np.linspace(0.05, 0.6, C)
    s = np.round(rng.random((V, C)) + 0.3 * y, 1)                    # rounding makes many ties
    thr = rng.random(C)
    for c in range(C):
        assert metrics.auroc(y[:, c], s[:, c]) == pytest.approx(roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
        ap = average_precision_score(y[:, c], s[:, c])
        assert metrics.average_precision(y[:, c], s[:, c]) == pytest.approx(ap, abs=1e-12)
        pred = s[:, c] >= thr[c]
        assert metrics.f1(y[:, c], pred) == pytest.approx(f1_score(y[:, c], pred, zero_division=0), abs=1e-12)
        bacc = balanced_accuracy_score(y[:, c], pred)
        assert metrics.balanced_accuracy(y[:, c], pred) == pytest.approx(bacc, abs=1e-12)
    assert metrics.macro("auroc", y, s) == pytest.approx(roc_auc_score(y, s, average="macro"))
    assert metrics.macro("auprc", y, s) == pytest.approx(average_precision_score(y, s, average="macro"))
    assert metrics.macro("f1", y, s, thr) == pytest.approx(f1_score(y, s >= thr, average="macro", zero_division=0))
    bacc = np.mean([balanced_accuracy_score(y[:, c], s[:, c] >= thr[c]) for c in range(C)])
    assert metrics.macro("bacc", y, s, thr) == pytest.approx(bacc)
    # all scores tied: chance level, and AP = prevalence
    tied = np.zeros(V)
    assert metrics.auroc(y[:, 0], tied) == 0.5
    assert metrics.average_precision(y[:, 0], tied) == pytest.approx(average_precision_score(y[:, 0], tied))


def test_f1_thresholds_are_optimal_on_validation():
    rng = np.random.default_rng(1)
    y = rng.random((80, 4)) < 0.3
    s = np.round(rng.random((80, 4)) + 0.4 * y, 2)
    thr = metrics.best_f1_thresholds(y, s)
    for c in range(4):
        best = max(f1_score(y[:, c], s[:, c] >= t, zero_division=0) for t in np.unique(s[:, c]))
        assert f1_score(y[:, c], s[:, c] >= thr[c]) == pytest.approx(best)


def test_weighted_metrics_equal_materialised_resample():
    # the bootstrap scores a resample through multiplicities; that must equal scoring the copy
    rng = np.random.default_rng(2)
    y, s = rng.random(60) < 0.3, np.round(rng.random(60), 1)
    for _ in range(5):
        idx = rng.integers(0, 60, 60)
        w = np.bincount(idx, minlength=60)
        assert metrics.auroc(y, s, w) == pytest.approx(roc_auc_score(y[idx], s[idx]))
        assert metrics.average_precision(y, s, w) == pytest.approx(average_precision_score(y[idx], s[idx]))
        assert metrics.f1(y, s > 0.5, w) == pytest.approx(f1_score(y[idx], s[idx] > 0.5, zero_division=0))


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_data():
    rng = np.random.default_rng(3)

    def width(V):
        y = rng.random((V, 5)) < 0.3
        s = rng.random((3, V, 5)) + 0.5 * y                           # 3 seeds
        lo, hi = metrics.bootstrap_ci(y, s, "auroc", n_boot=300, seed=0)
        point = np.mean([metrics.macro("auroc", y, s[r]) for r in range(3)])
        assert lo < point < hi
        return hi - lo

    assert width(1000) < width(100)


def test_class_without_positives_is_reported_not_crashed():
    rng = np.random.default_rng(4)
    y = (rng.random((50, 18)) < 0.3).astype(np.float32)
    y[:, 3] = 0                                                       # no positives
    y[:, 5] = 1                                                       # no negatives
    s = rng.random((50, 18))
    rep = metrics.classification_report(y, s, np.full(18, 0.5))
    assert rep["excluded"] == {LABELS[3]: "no positives", LABELS[5]: "no negatives"}
    assert len(rep["classes_in_macro"]) == 16 and LABELS[3] not in rep["classes_in_macro"]
    assert rep["per_class"][LABELS[3]]["auroc"] is None
    keep = [c for c in range(18) if c not in (3, 5)]
    assert rep["macro"]["auroc"] == pytest.approx(roc_auc_score(y[:, keep], s[:, keep], average="macro"))
    lo, hi = metrics.bootstrap_ci(y, s, "auroc", n_boot=50)
    assert np.isfinite([lo, hi]).all()
    json.dumps(rep, allow_nan=False)                                  # no NaN sneaks into the JSON


# ---------------------------------------------------------------------------------------------
# Depth R^2

def test_depth_r2_reads_a_linear_direction():
    rng = np.random.default_rng(9)

    def split(n, informative):
        d = rng.random(n)
        x = rng.normal(size=(n, 32))
        if informative:
            x[:, 0] = 5 * d + 0.2 * x[:, 0]                           # depth lives along one direction
        return x, d

    good = metrics.depth_r2(*split(2000, True), *split(500, True), *split(500, True))
    bad = metrics.depth_r2(*split(2000, False), *split(500, False), *split(500, False))
    assert good["test_r2"] > 0.95 and bad["test_r2"] < 0.05          # ideal: 1 - 0.04 / (25 / 12) = 0.98
