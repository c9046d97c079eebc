"""probe.py: MIL poolings, the grid in one pass, selection that never reads test, the feature cache, the
command line, and the whole evaluation end to end (its metrics: tests/test_metrics.py)."""
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
import probe
from common import LABELS
from conftest import ROOT, run_env
from model import build_vit
from probe import Bags, ProbeConfig

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: a second OpenMP thread only adds synchronisation (spin-waits on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# MIL probes on synthetic bags

def synthetic_bags(n_vol, D=16, C=3, seed=0, slices=(24, 48), signal=4.0):
    """Bags of Gaussian noise; a positive volume of class c has ONE slice, at a random position,
    shifted by `signal` along feature c. Max and attention pooling can find it; the average dilutes it."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(slices[0], slices[1] + 1, (n_vol,), generator=g)
    start = torch.cumsum(count, 0) - count
    feats = torch.randn(int(count.sum()), D, generator=g)
    labels = (torch.rand(n_vol, C, generator=g) < 0.4).float()
    for v, c in labels.nonzero().tolist():
        t = int(torch.randint(0, int(count[v]), (1,), generator=g))
        feats[start[v] + t, c] += signal
    return Bags(feats, start, count, labels)


def test_max_and_attention_find_the_one_slice_average_does_not():
    # one class: a single attention query can point at one direction (with several classes it must
    # share itself between them, which is what max pooling does not need)
    train, val = synthetic_bags(192, C=1, signal=5.0, seed=0), synthetic_bags(96, C=1, signal=5.0, seed=1)
    run = probe.train_probe_grid(train, val, steps=400, evals=1, seed=0, log=QUIET)
    y = val.labels.numpy()
    best = {p: max(probe.macro("auroc", y, run.val_scores[-1, i, l]) for l in range(len(run.lrs)))
            for i, p in enumerate(run.poolings)}
    assert best["max"] > 0.9 and best["attn"] > 0.9, best
    assert best["avg"] < min(best["max"], best["attn"]) - 0.05, best


def test_attention_per_class_finds_what_one_shared_query_cannot():
    # each class's signal in its own slice and direction: one query shared by 6 classes must spread itself
    # over their directions, one query per class points at its own (the release shares one: RECIPE.md 7)
    kw = dict(D=24, C=6, signal=5.0, slices=(32, 64))
    train, val = synthetic_bags(256, seed=10, **kw), synthetic_bags(128, seed=11, **kw)
    run = probe.train_probe_grid(train, val, ("attn", "attn_class"), (1.0, 0.3), steps=400, evals=1, seed=0, log=QUIET)
    y = val.labels.numpy()
    best = {p: max(probe.macro("auroc", y, run.val_scores[-1, i, l]) for l in range(2)) for i, p in enumerate(run.poolings)}
    assert best["attn_class"] > 0.9 and best["attn_class"] > best["attn"] + 0.2, best


def test_padding_is_masked():
    # the same bag, alone or padded next to a longer one, gets the same logits from every pooling
    bags = synthetic_bags(8, seed=5)
    grid = probe.ProbeGrid(torch.zeros(16), torch.ones(16), 3, probe.ALL_POOLINGS, 2)
    for p in (grid.W, grid.q, grid.qc):
        torch.nn.init.normal_(p)
    short = int(bags.count.argmin())
    alone = grid(*bags.gather(torch.tensor([short])))
    with_long = grid(*bags.gather(torch.tensor([short, int(bags.count.argmax())])))
    torch.testing.assert_close(alone[:, :, 0], with_long[:, :, 0])


def test_grid_in_one_pass_equals_each_probe_alone():
    train, val = synthetic_bags(64, seed=2), synthetic_bags(16, seed=3)
    kw = dict(steps=60, evals=3, seed=7, log=QUIET)
    grid = probe.train_probe_grid(train, val, probe.ALL_POOLINGS, (0.1, 0.03, 0.01, 0.003), **kw)
    for pooling, lr in (("attn", 0.01), ("max", 0.1), ("attn_class", 0.03)):
        one = probe.train_probe_grid(train, val, (pooling,), (lr,), **kw)
        p, l = grid.poolings.index(pooling), grid.lrs.index(lr)
        for e in range(3):
            for k in ("W", "b"):
                torch.testing.assert_close(one.states[e][k][0, 0], grid.states[e][k][p, l], atol=1e-5, rtol=1e-4)
            if pooling.startswith("attn"):
                q = "q" if pooling == "attn" else "qc"
                torch.testing.assert_close(one.states[e][q][0], grid.states[e][q][l], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(one.val_scores[:, 0, 0], grid.val_scores[:, p, l], atol=1e-5)
    # the probes really differ: they are not 16 copies of one
    assert not torch.allclose(grid.states[-1]["W"][0, 0], grid.states[-1]["W"][0, 3])


def test_benchmark_grid_equals_probes_alone(capsys):
    # the benchmark must time the same probes; its times are printed, not asserted (shared-CPU noise)
    probe_speed = importlib.import_module("benchmarks.probe_speed")
    r = probe_speed.grid_vs_single(D=192, n_vol=64, slices=48, steps=50, repeats=1)
    assert r["max_weight_diff"] < 1e-5
    assert r["grid_s"] > 0 and all(t > 0 for t in r["single_s"].values())
    with capsys.disabled():
        print(f"\n[probe grid] 18 probes in one pass {r['grid_s']:.3f} s; alone: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in r["single_s"].items())
              + f"; grid/single {r['grid_over_single']:.2f}x, {r['speedup_vs_sequential']:.1f}x faster than 18 runs")


def test_training_is_deterministic_per_seed():
    train, val = synthetic_bags(48, seed=4), synthetic_bags(16, seed=5)
    a, b, c = (probe.train_probe_grid(train, val, steps=30, evals=1, seed=s, log=QUIET) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.val_scores, b.val_scores)
    assert not np.array_equal(a.val_scores, c.val_scores)


def test_first_seed_selection_trains_the_chosen_probe_alone():
    # the release's protocol: seed 0's grid chooses (pooling, lr, step); a later seed trains only that probe,
    # on the same schedule, up to that step, and on seed 0 that single run is the grid's own member
    train, val, test = synthetic_bags(96, seed=6), synthetic_bags(48, seed=7), synthetic_bags(48, seed=8)
    cfg = ProbeConfig(steps=80, evals=4, lrs=(0.3, 0.03, 0.003))
    sel, scores, _ = probe.evaluate_seed(train, val, test, cfg, seed=0, log=QUIET)
    fixed = (sel.pooling, sel.lr, sel.step)
    again, scores0, _ = probe.evaluate_seed(train, val, test, cfg, seed=0, log=QUIET, fixed=fixed)
    np.testing.assert_allclose(scores0, scores, atol=1e-5)
    # thresholds are validation scores: equal up to the summation order of a batch of 1 against 18 probes
    np.testing.assert_allclose(again.thresholds, sel.thresholds, atol=1e-5)
    other, scores1, _ = probe.evaluate_seed(train, val, test, cfg, seed=1, log=QUIET, fixed=fixed)
    assert (other.pooling, other.lr, other.step) == fixed and other.val_table.size == 1
    assert not np.allclose(scores1, scores)                         # another seed: another probe


def test_normalisation_presets():
    # the default is training's own normalisation, bit for bit; DALE-CT-0-L's preset and a custom one differ
    hu = torch.randint(-1100, 1500, (3, 16, 16)).to(torch.int16)
    assert torch.equal(probe.normalize(hu, probe.norm_values("dale_ct")), prepare.normalize_hu(hu))
    own = probe.normalize(hu, probe.norm_values("dale_ct_0_l"))
    assert own.min() == pytest.approx((-940.8 + 25.03) / 246.87) and own.max() == pytest.approx((923.1 + 25.03) / 246.87)
    assert probe.norm_values("-1000,1000,0,1000") == (-1000.0, 1000.0, 0.0, 1000.0)
    for bad in ("ct", "1,2,3", "5,1,0,1", "-1,1,0,0"):
        with pytest.raises(SystemExit, match="--norm"):
            probe.parse_args(["--random_init", f"--norm={bad}"])


def test_selection_never_reads_test():
    train, val, test = synthetic_bags(96, seed=6), synthetic_bags(48, seed=7), synthetic_bags(48, seed=8)
    cfg = ProbeConfig(steps=80, evals=4)
    sel, scores, rep = probe.evaluate_seed(train, val, test, cfg, seed=0, log=QUIET)
    poisoned = Bags(test.feats, test.start, test.count, 1 - test.labels)  # every test label flipped
    sel2, scores2, rep2 = probe.evaluate_seed(train, val, poisoned, cfg, seed=0, log=QUIET)
    assert (sel.pooling, sel.lr, sel.step) == (sel2.pooling, sel2.lr, sel2.step)
    np.testing.assert_array_equal(sel.thresholds, sel2.thresholds)
    np.testing.assert_array_equal(scores, scores2)                   # same probe, same predictions
    assert rep["macro"]["auroc"] > 0.7
    assert rep2["macro"]["auroc"] == pytest.approx(1 - rep["macro"]["auroc"])  # only the reported metrics move
    # the selection is the argmax of its own validation table
    assert sel.val_macro_auprc == pytest.approx(sel.val_table.max())


# ---------------------------------------------------------------------------------------------
# Feature cache

def test_feature_cache_reuse_invalidation_and_recovery(tmp_path, monkeypatch):
    calls = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    vit = build_vit("tiny", img_size=32)
    slices = np.random.default_rng(0).integers(-1000, 500, (10, 48, 48)).astype(np.int16)
    ident = {"backbone": "aaa", "vit": "tiny", "img_size": 32, "norm": probe.NORMS["dale_ct"], "data": "d0"}
    get = lambda ident: probe.cached_features(tmp_path / "features", "train", slices, vit, ident, batch_size=4)

    first = np.array(get(ident))
    assert len(calls) == 1 and first.shape == (10, 192) and np.isfinite(first).all()
    folder = next((tmp_path / "features").iterdir())
    stamp = (folder / "train.f32").stat().st_mtime_ns
    np.testing.assert_array_equal(get(ident), first)                 # same checkpoint: reused
    assert len(calls) == 1 and (folder / "train.f32").stat().st_mtime_ns == stamp
    # the cached features are the model's
    np.testing.assert_allclose(first, probe.extract_features(vit, slices, 32), atol=2e-2, rtol=1e-2)
    calls.clear()

    get({**ident, "backbone": "bbb"})                                 # another checkpoint: its own folder
    assert len(calls) == 1 and len(list((tmp_path / "features").iterdir())) == 2
    assert (folder / "train.f32").stat().st_mtime_ns == stamp          # the first one untouched
    at_64 = np.array(get({**ident, "img_size": 64}))                  # another input size: its own folder
    get({**ident, "data": "d1"})                                      # another dataset: its own folder
    own = np.array(get({**ident, "norm": probe.NORMS["dale_ct_0_l"]}))  # another normalisation: its own folder
    assert len(calls) == 4 and len(list((tmp_path / "features").iterdir())) == 5
    assert not np.allclose(own, first)
    np.testing.assert_allclose(at_64, probe.extract_features(vit, slices, 64), atol=2e-2, rtol=1e-2)
    assert not np.allclose(at_64, first)                              # computed at its own size
    calls.clear()
    (folder / "train.f32").rename(folder / "train.f32.tmp999")       # an interrupted write: only a temporary
    np.testing.assert_array_equal(get(ident), first)
    assert len(calls) == 1
    with open(folder / "train.f32", "r+b") as f:                      # a truncated file
        f.truncate(100)
    np.testing.assert_array_equal(get(ident), first)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Command line and end to end

def test_cli_rejects_unknown_and_parses_lists():
    cfg = probe.parse_args(["--random_init", "--lrs=0.1,0.01", "--poolings=max", "--steps=5"])
    assert cfg.random_init and cfg.lrs == (0.1, 0.01) and cfg.poolings == ("max",) and cfg.steps == 5
    for bad in (["--random_init", "--stepz=5"], ["--random_init", "--poolings=sum"], []):
        with pytest.raises(SystemExit):
            probe.parse_args(bad)
    assert probe.parse_args(["--compare=a,b"]).compare == "a,b"      # --compare needs no backbone


@pytest.mark.parametrize("arg, flag", [
    ("--steps=0", "--steps"), ("--batch=0", "--batch"), ("--seeds=abc", "--seeds"), ("--seeds=0", "--seeds"),
    ("--lrs=-1", "--lrs"), ("--lrs=0.1,0", "--lrs"), ("--lrs=", "--lrs"), ("--poolings=sum", "--poolings"),
    ("--poolings=avg,sum", "--poolings"), ("--n_boot=0", "--n_boot"), ("--evals=0", "--evals"),
    ("--momentum=1", "--momentum"), ("--momentum=-0.1", "--momentum"), ("--feat_batch=0", "--feat_batch"),
    ("--img_size=40", "--img_size"), ("--vit=huge", "--vit"), ("--seed=-1", "--seed"),
    ("--depth_max_slices=0", "--depth_max_slices"), ("--random_init=maybe", "--random_init"),
])
def test_cli_bad_value_is_one_line_naming_the_flag(arg, flag):
    with pytest.raises(SystemExit) as e:
        probe.parse_args(["--random_init", arg])
    message = str(e.value)
    assert re.search(re.escape(flag) + "[=:]", message) and "\n" not in message, message
    assert message.startswith("probe.py:"), message


def test_cli_needs_exactly_one_backbone_and_points_bench_to_its_script():
    for args in ([], ["--ckpt=a.pt", "--random_init"]):
        with pytest.raises(SystemExit, match="exactly one of --ckpt"):
            probe.parse_args(args)
    with pytest.raises(SystemExit, match="benchmarks/probe_speed.py"):
        probe.parse_args(["--bench"])


def test_probe_does_not_import_train():
    # probe.py evaluates checkpoints without loading the training code
    code = "import sys, probe; sys.exit('train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=run_env(), cwd=ROOT).returncode == 0


@pytest.fixture(scope="module")
def prepared_phantom(datasets, tmp_path_factory):
    # a copy of the session's dataset: the probe writes its feature cache into the data folder
    out = tmp_path_factory.mktemp("probe_data") / "prepared"
    shutil.copytree(datasets.prepared("probe"), out)
    return out


def test_end_to_end_random_init(prepared_phantom, tmp_path):
    args = [f"--data={prepared_phantom}", f"--out={tmp_path}", "--random_init", "--img_size=32", "--steps=40",
            "--evals=2", "--seeds=2", "--n_boot=50", "--feat_batch=16"]
    res = probe.main(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["auroc"]["mean"] == res["summary"]["auroc"]["mean"]
    assert saved["backbone"]["kind"] == "random_init" and saved["config"]["steps"] == 40
    assert saved["data"]["manifest"]["format"] == "dale-ct-prepared" and len(saved["seeds"]) == 2
    assert set(saved["per_class"]) == set(LABELS)
    assert "Macros cover" in (tmp_path / "results.md").read_text()
    # the world-model probes ran on the same backbone, with probe.py's wm_* settings
    wm = saved["worldmodel"]
    assert wm["settings"]["wm_epochs"] == 3 and 1.0 <= wm["effective_rank"]["value"] <= 192
    assert "World-model probes" in (tmp_path / "results.md").read_text()
    n_folders = len(os.listdir(prepared_phantom / "features"))
    probe.main(args)                                                  # second run: features reused
    assert len(os.listdir(prepared_phantom / "features")) == n_folders


def test_missing_split_and_bad_checkpoint_are_one_line_errors(prepared_phantom, tmp_path):
    with pytest.raises(SystemExit, match="no manifest.json"):
        probe.main([f"--data={tmp_path}", "--random_init"])
    bad = tmp_path / "bad.pt"
    torch.save({"model": build_vit("tiny", img_size=32).state_dict() | {"extra.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit, match="cannot use .* as a backbone") as e:
        probe.main([f"--data={prepared_phantom}", f"--ckpt={bad}", "--img_size=32"])
    assert "\n" not in str(e.value)


def test_feature_cache_elsewhere_for_a_read_only_dataset(prepared_phantom, tmp_path, monkeypatch):
    """--cache=DIR keeps the data folder untouched (same results as the default cache); where the data
    folder cannot take the cache and no --cache is given, one line says what to do, before any work."""
    data = tmp_path / "data"
    shutil.copytree(prepared_phantom, data, ignore=shutil.ignore_patterns("features"))
    args = [f"--data={data}", "--random_init", "--img_size=32", "--steps=20", "--seeds=1", "--n_boot=50",
            "--evals=2", "--world_model=false"]
    elsewhere = probe.main(args + [f"--cache={tmp_path / 'cache'}", f"--out={tmp_path / 'a'}"])
    assert not (data / "features").exists() and list((tmp_path / "cache").iterdir())
    default = probe.main(args + [f"--out={tmp_path / 'b'}"])
    assert elsewhere["summary"] == default["summary"]
    shutil.rmtree(data / "features")
    real = probe.writable

    def read_only_data(folder):  # as on a read-only disk (root writes through permission bits)
        return folder != os.path.join(str(data), "features") and real(folder)
    monkeypatch.setattr(probe, "writable", read_only_data)
    with pytest.raises(SystemExit) as e:
        probe.main(args + [f"--out={tmp_path / 'c'}"])
    assert "--cache=DIR" in str(e.value.code) and "\n" not in str(e.value.code) and not (data / "features").exists()


def test_an_empty_or_missing_split_stops_before_any_work(prepared_phantom, tmp_path):
    """probe.py checks train, val and test before extracting a feature: an empty test split or a
    missing test/ folder is one line naming it, and no feature cache is written."""
    hollow = tmp_path / "hollow"
    shutil.copytree(prepared_phantom, hollow, ignore=shutil.ignore_patterns("features"))
    man = json.loads((hollow / "manifest.json").read_text())
    man["splits"]["test"].update(slices=0, volumes=0)
    (hollow / "manifest.json").write_text(json.dumps(man))
    (hollow / "test" / "volumes.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        probe.main([f"--data={hollow}", "--random_init", "--img_size=32", f"--out={tmp_path / 'o'}"])
    assert "split test has no volumes" in str(e.value.code) and not (hollow / "features").exists()
    shutil.rmtree(hollow / "test")
    with pytest.raises(SystemExit) as e:
        probe.main([f"--data={hollow}", "--random_init", "--img_size=32", f"--out={tmp_path / 'o'}"])
    assert "test" in str(e.value.code) and "\n" not in str(e.value.code)


def test_loads_a_train_checkpoint_at_its_own_size(tmp_path):
    # train.py saves {"model": backbone state dict (timm keys), "vit", "img_size", "config", ...};
    # the size comes from the weights, whatever --vit says
    torch.manual_seed(1)
    vit = build_vit("tiny", img_size=64)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": vit.state_dict(), "projector": {}, "step": 3, "vit": "tiny", "img_size": 64,
                "config": {"vit": "tiny", "global_size": 64}, "rng": {"torch": torch.get_rng_state()}}, path)
    loaded, ident = probe.load_model(ProbeConfig(ckpt=str(path), vit="large", img_size=32))
    assert loaded.embed_dim == 192 and ident["vit"] == "tiny"
    assert ident["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.eval()(x)[0], vit.eval()(x)[0])  # 32 px input through a 64 px grid


@pytest.mark.slow
def test_end_to_end_pretrain_probe_compare(tmp_path):
    """phantom -> prepare -> 80 steps of train.py (2S) -> probe, against a random-init backbone, then
    --compare: the briefly pretrained model must beat the random-init floor in macro AUROC.
    What makes that hold at test scale: every phantom volume carries finding masks (rex_frac 1), so the
    2S dense heads supervise the backbone on every slab, at a weight pinned to 1.0 (the phantom preset's
    is tuned for the demo's longer run). The plain LeJEPA variant (DALE-CT-0) does not separate from
    random init at this scale (README)."""
    phantom = pytest.importorskip("phantom")
    import prepare
    import train
    src, prep = tmp_path / "src", tmp_path / "prep"
    phantom.write_phantom(str(src), train_patients=60, valid_patients=30, size=64, slices=30, seed=1, workers=1,
                          rex_frac=1.0)
    prepare.prepare(prepare.Config(src=str(src), out=str(prep), z_mm=5, size=64, mask_size=64, workers=1),
                    progress=False)
    train.main(["--config=phantom", "--variant=2s", f"--data={prep}", f"--out_dir={tmp_path / 'run'}",
                "--max_steps=80", "--warmup_steps=10", "--log_every=40", "--device=cpu", "--batch_size=32",
                "--micro_batch=32", "--aux_weight=1.0", "--seed=0"])
    ls_init = json.loads((tmp_path / "run" / "config.json").read_text())["layerscale_init"]
    common = [f"--data={prep}", "--img_size=64", "--steps=300", "--evals=5", "--seeds=2", "--n_boot=200",
              "--world_model=false"]  # the world-model probes: test_end_to_end_random_init, tests/test_worldmodel.py
    floor = probe.main(common + ["--random_init", f"--layerscale_init={ls_init}", f"--out={tmp_path / 'random'}"])
    trained = probe.main(common + [f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}", f"--out={tmp_path / 'trained'}"])
    for res in (floor, trained):
        assert 0.3 < res["summary"]["auroc"]["mean"] < 1.0 and 0.5 < res["depth"]["test_r2"] <= 1.0
        lo, hi = res["summary"]["auroc"]["ci95"]
        assert lo <= res["summary"]["auroc"]["mean"] <= hi
    assert trained["summary"]["auroc"]["mean"] > floor["summary"]["auroc"]["mean"]   # the point of it all
    # the comparison table: one row per run, the paired difference on the second row
    rows = probe.main([f"--compare={tmp_path / 'random'},{tmp_path / 'trained'}", f"--out={tmp_path / 'cmp'}",
                       "--n_boot=200"])
    assert [r["model"] for r in rows] == ["random init", "run"] and rows[0]["delta_auroc"] is None
    diff, lo, hi = rows[1]["delta_auroc"]
    assert diff == pytest.approx(trained["summary"]["auroc"]["mean"] - floor["summary"]["auroc"]["mean"])
    assert lo <= hi and rows[1]["train_s"] > 0
    mil = (tmp_path / "cmp" / "comparison.md").read_text().split("\n\n")[0]
    assert mil.count("\n| ") == 2  # the MIL table: one line per model
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "trained" / "roc.png").exists() and (tmp_path / "cmp" / "comparison.png").exists()


def test_small_feature_variation_survives_cache_and_half_precision_bags():
    """A random-init ViT's CLS tokens vary across slices by a tiny fraction of their size: the bags must keep
    that variation (float32 cache; float16 bags only after centering on the train mean)."""
    rng = np.random.default_rng(0)
    feats = (5.0 + 1e-3 * rng.standard_normal((200, 8))).astype(np.float32)  # (S, D): offset >> variation

    class DS:
        start, count, labels = np.array([0, 100]), np.array([100, 100]), np.zeros((2, 18), np.float32)
    naive = probe.make_bags(feats, DS, "cpu", dtype=torch.float16)
    centred = probe.make_bags(feats, DS, "cpu", dtype=torch.float16, center=probe.feature_mean(feats))
    corr = lambda bags: min(np.corrcoef(bags.feats.float()[:, d].numpy(), feats[:, d])[0, 1] for d in range(8))
    assert corr(naive) < 0.6  # float16 at 5.0 has steps of ~4e-3: what is left is rounding, not the signal
    assert corr(centred) > 0.999
