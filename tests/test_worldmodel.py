"""worldmodel.py and its metrics: Dice, Hit@k, slice order, effective rank and the distance curve against direct
numpy; the dense probe on features that encode a known mask (and on noise); selection that never reads test;
the whole evaluation on a prepared phantom with a random ViT."""
import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import metrics
import plots
import prepare
import worldmodel as wm
from common import SPLITS, SettingError, validate
from model import build_vit

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Synthetic splits: rectangles on a g x g patch grid, masks at 2g; features that encode them, or not

class FakeSplit:
    """What worldmodel reads of a prepare.PreparedSplit, held in memory."""

    def __init__(self, abnormal, anatomy, count, name):
        self.abnormal, self.anatomy, self.count = abnormal, anatomy, np.asarray(count)
        self.start = np.cumsum(self.count) - self.count
        S, m = len(abnormal), abnormal.shape[-1]
        self.slices = np.zeros((S, m, m), np.int16)
        self.depth_mm = np.concatenate([np.arange(n) * 2.0 for n in self.count]).astype(np.float32)
        self.depth_pos = np.concatenate([np.linspace(0, 1, n) for n in self.count]).astype(np.float32)
        self.z_mm = np.full(len(self.count), 2.0, np.float32)
        self.names = [f"{name}_{v}" for v in range(len(self.count))]
        self.has_abnormality = np.array([abnormal[self.volume(v)].any() for v in range(len(self.count))])
        self.has_anatomy = np.array([anatomy[self.volume(v)].any() for v in range(len(self.count))])

    def __len__(self):
        return len(self.count)

    def volume(self, i):
        return slice(int(self.start[i]), int(self.start[i] + self.count[i]))


def synthetic(n_vol, n_slices, seed, g=8, n_findings=3, n_organs=3, D=24, signal=3.0):
    """A split whose finding bits 0..n_findings-1 and organ labels 1..n_organs are random rectangles, and its
    features (rows -> CLS (B, D), grid (B, D, g, g)): channel c carries finding c, 14 + k organ k, times signal."""
    rng = np.random.default_rng(seed)
    S = n_vol * n_slices
    bits, labels = np.zeros((S, g, g), np.uint16), np.zeros((S, g, g), np.uint8)
    for s in range(S):
        for c in range(n_findings + n_organs):
            if rng.random() < 0.6:
                h, w = rng.integers(1, 4, 2)
                y, x = rng.integers(0, g - h + 1), rng.integers(0, g - w + 1)
                if c < n_findings:
                    bits[s, y:y + h, x:x + w] |= 1 << c
                else:
                    labels[s, y:y + h, x:x + w] = c - n_findings + 1
    onehot = np.concatenate([(bits[:, None] >> np.arange(14)[None, :, None, None]) & 1,
                             labels[:, None] == np.arange(1, D - 13)[None, :, None, None]], 1).astype(np.float32)
    grid = (0.3 * rng.standard_normal((S, D, g, g)) + signal * onehot).astype(np.float32)  # (S, D, g, g)
    cls = (0.3 * rng.standard_normal((S, D)) + signal * onehot.max((2, 3))).astype(np.float32)  # (S, D)
    up = lambda a: a.repeat(2, 1).repeat(2, 2)  # noqa: E731 (nearest, to the mask size 2g)
    ds = FakeSplit(up(bits), up(labels), [n_slices] * n_vol, f"s{seed}")
    return ds, lambda rows: (torch.from_numpy(cls[rows]), torch.from_numpy(grid[rows]))


def noise_features(S, D=24, g=8, seed=0):
    x, c = np.random.default_rng(seed).standard_normal((2, S, D, g, g)).astype(np.float32)
    return lambda rows: (torch.from_numpy(c[rows, :, 0, 0]), torch.from_numpy(x[rows]))


FAST = dict(wm_lr=0.3, wm_epochs=6, wm_n_boot=50, wm_pictures=1)  # the synthetic tasks' probes converge in 6 epochs


# ---------------------------------------------------------------------------------------------
# Metrics against direct computations

def direct_dice(pred, true, vol):
    """(S, C, m, m) bool masks, vol (S,) -> (V, C) Dice per volume, NaN where the volume lacks the class."""
    out = np.full((vol.max() + 1, pred.shape[1]), np.nan)
    for v in range(vol.max() + 1):
        for c in range(pred.shape[1]):
            p, t = pred[vol == v, c], true[vol == v, c]
            if t.sum():
                out[v, c] = 2 * (p & t).sum() / (p.sum() + t.sum())
    return out


def test_streamed_dice_and_hits_match_whole_volume_numpy():
    # a probe whose prediction is its input: 1x1 identity, no bias, so p = sigmoid(grid) is known in advance
    rng = np.random.default_rng(0)
    C, m, count = 3, 6, [5, 7, 3, 4]
    vol = np.repeat(np.arange(len(count)), count)
    true = rng.random((len(vol), C, m, m)) < 0.3
    true[vol == 1, 2] = False                                        # a volume without class 2
    true[:, 1] = False                                               # a class no volume has
    logits = rng.standard_normal((len(vol), C, m, m)).astype(np.float32)
    probe = wm.DenseProbe(C, C, m)
    with torch.no_grad():
        probe.dense_head.weight.copy_(torch.eye(C)[:, :, None, None])
        probe.dense_head.bias.zero_()
    task = wm.Task(np.arange(len(vol)), vol, ["a", "b", "c", "d"])
    features = lambda rows: (torch.zeros(len(rows), C), torch.from_numpy(logits[rows]))  # noqa: E731
    masks = lambda rows: torch.from_numpy(true[rows].astype(np.float32))  # noqa: E731
    thr = np.array([[0.5, 0.5, 0.5], [0.3, 0.6, 0.8]])
    sc = wm.score(probe, features, masks, task, thr, batch=4)        # batches straddle volume boundaries
    dice = metrics.dice_scores(sc.inter, sc.pred, sc.true)          # (V, C, K)
    for k in range(2):
        expected = direct_dice(1 / (1 + np.exp(-logits)) >= thr[k][None, :, None, None], true, vol)
        np.testing.assert_allclose(dice[..., k], expected, rtol=1e-6)
    assert np.isnan(dice[1, 2]).all() and np.isnan(dice[:, 1]).all() and np.isfinite(dice[:, 0]).all()
    np.testing.assert_array_equal(sc.labels, true.any((2, 3)))
    # Hit@k is "> k" over the volumes with the class; a Dice exactly at k is no hit
    d = np.array([[0.05, np.nan], [0.2, np.nan], [0.1, 0.5], [0.0, np.nan]])
    np.testing.assert_allclose(metrics.hit_rate(d, 0.05), [2 / 4, 1.0])
    np.testing.assert_allclose(metrics.hit_rate(d, 0.10), [1 / 4, 1.0])
    assert np.isnan(metrics.hit_rate(np.full((3, 1), np.nan), 0.05)).all()
    rep = metrics.dice_report(d, ["x", "y"], n_boot=20)
    assert rep["value"] == pytest.approx((np.mean([0.05, 0.2, 0.1, 0.0]) + 0.5) / 2)
    assert rep["per_class"]["y"]["volumes"] == 1 and rep["hit5"]["value"] == pytest.approx(0.75)


def test_ordering_matches_scipy_with_ties_short_and_constant_volumes():
    rng = np.random.default_rng(1)
    count = np.array([6, 2, 9, 5, 4])
    start = np.cumsum(count) - count
    true = rng.random(count.sum())
    pred = np.round(rng.random((3, count.sum())), 1)                  # ties; 3 rows as for 3 ridge alphas
    pred[:, start[3]:start[3] + 5] = 0.7                              # a constant prediction orders nothing
    got = metrics.ordering_scores(pred, true, start, count)          # (V, 3)
    for v, (s, n) in enumerate(zip(start, count)):
        for a in range(3):
            want = np.nan if n < 3 else 0.0 if v == 3 else spearmanr(pred[a, s:s + n], true[s:s + n])[0]
            np.testing.assert_allclose(got[v, a], want, atol=1e-12)
    assert got.shape == (5, 3) and np.isnan(got[1]).all()
    np.testing.assert_allclose(metrics.ordering_scores(pred[0], true, start, count), got[:, 0])


def test_effective_rank_against_eigenvalues_one_line_and_isotropy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) * np.linspace(0.1, 3, 12)
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    assert metrics.effective_rank(x, chunk=77) == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-9)
    line = rng.standard_normal((300, 1)) * rng.standard_normal((1, 16)) + 5.0  # every slice on one line
    assert metrics.effective_rank(line) == pytest.approx(1.0, rel=1e-9)
    a = rng.standard_normal((400, 16))
    q, _ = np.linalg.qr(a - a.mean(0))                                # centred, orthonormal: covariance = I / n
    assert metrics.effective_rank(q) == pytest.approx(16.0, rel=1e-9)


def test_chunked_depth_ridge_is_depth_r2s_ridge():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 400, 10)) * 3 + 1
    y = x @ rng.standard_normal(10) * 0.1 + 0.2 * rng.standard_normal((3, 400))
    ref = metrics.depth_r2(x[0], y[0], x[1], y[1], x[2], y[2])
    predict = metrics.depth_ridge(x[0], y[0], chunk=33)
    a = metrics.DEPTH_ALPHAS.index(ref["alpha"])
    r2 = lambda p, t: 1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()  # noqa: E731
    assert r2(predict(x[2])[:, a], y[2]) == pytest.approx(ref["test_r2"], rel=1e-9)
    rows = rng.choice(400, 150, replace=False)                        # a subset fits as those rows alone
    np.testing.assert_allclose(metrics.depth_ridge(x[0], y[0], rows, chunk=40)(x[2]),
                               metrics.depth_ridge(x[0][np.sort(rows)], y[0][np.sort(rows)])(x[2]), rtol=1e-9)


def test_distance_by_gap_and_volume_bootstraps_match_direct_loops():
    rng = np.random.default_rng(4)
    count = np.array([5, 7, 4])
    start = np.cumsum(count) - count
    z = np.concatenate([np.arange(n) * 1.5 for n in count])
    x, c = rng.standard_normal((count.sum(), 6)), rng.standard_normal(6)
    curve = metrics.distance_by_gap(x, z, start, count, c, step=1.5, max_gap_mm=4.5)
    sums, n = np.zeros(4), np.zeros(4)
    for s, k in zip(start, count):
        for i in range(s, s + k):
            for j in range(i + 1, s + k):
                b = round(abs(z[i] - z[j]) / 1.5)
                if b <= 3:
                    u, v = x[i] - c, x[j] - c
                    sums[b] += 1 - u @ v / np.linalg.norm(u) / np.linalg.norm(v)
                    n[b] += 1
    assert curve["gap_mm"] == [1.5, 3.0, 4.5] and curve["pairs"] == n[1:].tolist()
    np.testing.assert_allclose(curve["distance"], sums[1:] / n[1:], rtol=1e-9)
    assert 0 < curve["between_volumes"] < 2
    # a resample of volumes, materialised: nan-means per class, then the mean over classes
    vals = np.where(rng.random((6, 3)) < 0.3, np.nan, rng.random((6, 3)))
    boot = metrics.bootstrap_volume_means(vals, n_boot=5, seed=7)
    draw = np.random.default_rng(7)
    for b in range(5):
        per = np.nanmean(vals[draw.integers(0, 6, 6)], 0)
        assert boot[b] == pytest.approx(np.nanmean(per))
    # slice-level AUROC when volumes are resampled: each slice weighs its volume's multiplicity
    y, s, group = rng.random((40, 2)) < 0.4, rng.random((40, 2)), np.repeat(np.arange(8), 5)
    boot = metrics.bootstrap_slice_macro(y, s, group, "auroc", n_boot=4, seed=9)
    draw = np.random.default_rng(9)
    for b in range(4):
        idx = np.concatenate([np.flatnonzero(group == v) for v in draw.integers(0, 8, 8)])
        assert boot[b] == pytest.approx(np.mean([roc_auc_score(y[idx, k], s[idx, k]) for k in range(2)]))


# ---------------------------------------------------------------------------------------------
# The dense probe on synthetic features

def test_dense_probe_recovers_a_linearly_encoded_mask_and_not_noise():
    cfg = wm.WorldModelConfig(**FAST)
    splits, feats = zip(*(synthetic(8, 24, seed) for seed in (0, 1, 2)))
    splits, feats = dict(zip(SPLITS, splits)), dict(zip(SPLITS, feats))
    for kind in ("findings", "organs"):
        r = wm.dense_task(kind, splits, feats, 24, cfg, log=QUIET)
        assert r["dice"]["value"] > 0.9 and r["dice_val_thresholds"]["value"] > 0.9, (kind, r["dice"])
        assert r["slice"]["auroc"]["value"] > 0.95
    noise = {s: noise_features(len(splits[s].abnormal), seed=k) for k, s in enumerate(SPLITS)}
    r = wm.dense_task("findings", splits, noise, 24, cfg, log=QUIET)
    # predicting every pixel of a volume positive: Dice 2p / (1 + p), p the class's share of the volume's pixels
    t = splits["test"]
    bits = (t.abnormal[:, None] >> np.arange(3)[None, :, None, None]) & 1  # (S, 3, m, m)
    p = np.stack([bits[t.volume(v)].mean((0, 2, 3)) for v in range(len(t))])  # (V, 3)
    baseline = np.mean(2 * p / (1 + p))
    assert r["dice_val_thresholds"]["value"] < baseline + 0.05, (r["dice_val_thresholds"]["value"], baseline)
    assert r["dice"]["value"] < baseline and abs(r["slice"]["auroc"]["value"] - 0.5) < 0.1


def test_selection_never_reads_test():
    cfg = wm.WorldModelConfig(**FAST)
    clean = dict(zip(SPLITS, (synthetic(6, 16, seed) for seed in (0, 1, 2))))
    bad_ds = copy.copy(clean["test"][0])                               # poisoned test: inverted, shuffled masks
    perm = np.random.default_rng(0).permutation(len(bad_ds.abnormal))
    bad_ds.abnormal, bad_ds.anatomy = (~bad_ds.abnormal[perm]) & 0b111, bad_ds.anatomy[perm[::-1]]
    bad_ds.depth_pos = bad_ds.depth_pos[perm]
    poisoned = {**clean, "test": (bad_ds, noise_features(len(perm), seed=5))}
    runs = []
    for data in (clean, poisoned):
        splits, feats = {s: d for s, (d, _) in data.items()}, {s: f for s, (_, f) in data.items()}
        dense = {k: wm.dense_task(k, splits, feats, 24, cfg, log=QUIET) for k in wm.TASKS}
        cls = {s: feats[s](np.arange(len(splits[s].abnormal)))[0].numpy() for s in SPLITS}
        runs.append((dense, wm.slice_position(cls, splits, cfg)))
    (dense_a, pos_a), (dense_b, pos_b) = runs
    for k in wm.TASKS:
        assert dense_a[k]["dice_val_thresholds"]["thresholds"] == dense_b[k]["dice_val_thresholds"]["thresholds"]
        assert dense_a[k]["train"]["epoch_loss"] == dense_b[k]["train"]["epoch_loss"]
        assert dense_a[k]["dice"]["value"] > dense_b[k]["dice"]["value"] + 0.3   # the poison did reach test
    assert len(set(dense_a["organs"]["dice_val_thresholds"]["thresholds"].values())) > 1  # a real choice was made
    assert (pos_a["order"]["alpha"], pos_a["order"]["val"]) == (pos_b["order"]["alpha"], pos_b["order"]["val"])
    assert pos_a["order"]["value"] != pos_b["order"]["value"]


def test_settings_are_checked_with_one_line():
    with pytest.raises(SettingError, match="wm_epochs"):
        validate(wm.WorldModelConfig(wm_epochs=0), "worldmodel settings")
    with pytest.raises(SettingError, match="wm_tasks"):
        validate(wm.WorldModelConfig(wm_tasks=("organs", "lungs")), "worldmodel settings")


# ---------------------------------------------------------------------------------------------
# End to end on a prepared phantom with a random tiny ViT

def test_evaluate_on_a_phantom_end_to_end(datasets, tmp_path):
    root = datasets.prepared("probe")
    splits = {s: prepare.open_split(root, s) for s in SPLITS}
    torch.manual_seed(0)
    vit = build_vit("tiny", img_size=32)
    cls = {s: wm.backbone_features(vit, splits[s], prepare.normalize_hu, 32, "cpu")(np.arange(len(splits[s].slices)))
           [0].numpy() for s in SPLITS}
    cfg = wm.WorldModelConfig(wm_n_boot=50, wm_epochs=2)
    res = wm.evaluate(vit, splits, cls, prepare.normalize_hu, 32, settings=cfg, log=QUIET)
    json.dumps(res, allow_nan=False)                                   # results.json-ready, no NaN
    for kind in wm.TASKS:
        r = res[kind]
        assert "skipped" not in r and r["volumes"]["test"] > 0
        assert np.isfinite([r["slice"]["auroc"]["value"], r["dice"]["value"], r["dice"]["hit5"]["value"]]).all()
        assert all(np.isfinite(r["train"]["epoch_loss"])) and r["train"]["slices_per_s"] > 0
    assert res["findings"]["dice_val_thresholds"]["chosen_on_val"] == bool(splits["val"].has_abnormality.any())
    assert -1 <= res["order"]["value"] <= 1 and 1 <= res["effective_rank"]["value"] <= 192
    assert any(d is not None for d in res["distance_vs_gap"]["distance"])
    assert "World-model probes" in "\n".join(wm.report_lines(res))
    if importlib.util.find_spec("matplotlib"):  # optional: CI installs none
        assert plots.plot_worldmodel(res, tmp_path / "wm.png", QUIET) and (tmp_path / "wm.png").stat().st_size > 0
        assert plots.plot_distance_vs_gap({"a": res["distance_vs_gap"]}, tmp_path / "gap.png", QUIET)
    # a split without finding masks: reported, not a crash
    bare = copy.copy(splits["test"])
    bare.has_abnormality = np.zeros(len(bare), bool)
    res = wm.evaluate(vit, {**splits, "test": bare}, cls, prepare.normalize_hu, 32,
                      settings=wm.WorldModelConfig(wm_n_boot=20, wm_epochs=1, wm_tasks=("findings",)), log=QUIET)
    assert res["findings"]["skipped"] == "no test volume with findings masks"
    assert "skipped" in "\n".join(wm.report_lines(res))
