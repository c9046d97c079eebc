"""export.py: your own scans (a plain folder) -> prepare -> export gives probe.py's features of the same volumes;
files numpy and pandas-style readers take as they are; an --out it did not write is never touched."""
import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import ctrate
import export
import prepare
import probe
from common import LABELS, SPLITS
from prepare import open_split

SETTINGS = dict(z_mm=4.0, size=40, mask_size=20)  # conftest's PREPARED["small"]: the CT-RATE copy to compare with
BACKBONE = ["--random_init", "--seed=3", "--img_size=32", "--vit=tiny"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def plain(datasets, tmp_path_factory):
    """The small phantom's image files alone, flat in one folder (no CSVs, no masks), prepared into test."""
    root = tmp_path_factory.mktemp("plain")
    (root / "scans").mkdir()
    scaled = {}
    for p in sorted(datasets.phantom("small").glob("*_fixed/**/*.nii.gz")):
        shutil.copy(p, root / "scans")
        scaled[ctrate.strip_ext(p.name)] = nib.load(p).dataobj.inter == -1024  # else: HU scaling in the CSV only
    prepare.prepare(prepare.Config(src=str(root / "scans"), out=str(root / "prepared"), split="test", workers=1,
                                   **SETTINGS), progress=False)
    return root, scaled


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_own_scans_export_equals_the_probe_features_of_the_ctrate_copy(datasets, plain, tmp_path):
    """The same volumes, prepared from a plain folder and from their CT-RATE layout: export's per-volume mean
    and max (and per-slice rows) equal what probe.py's feature path computes on the CT-RATE copy, matched by
    name. The plain folder keeps exactly the volumes whose header holds their HU scaling; the others fail the
    HU check, each reject naming its file."""
    root, scaled = plain
    with open(root / "prepared" / "rejects.csv", newline="") as f:
        rejects = {r["name"]: r["reason"] for r in csv.DictReader(f)}
    assert set(rejects) == {n for n, s in scaled.items() if not s} != set()
    assert all("HU check failed" in why and f"{n}.nii.gz" in why for n, why in rejects.items())
    out = tmp_path / "features"
    info = export.main([*BACKBONE, f"--data={root / 'prepared'}", f"--out={out}"])
    assert list(info["splits"]) == ["test"] and info["finished"] and not info["data"]["has_labels"]

    vit, identity = probe.load_model(probe.ProbeConfig(random_init=True, seed=3, img_size=32, vit="tiny"))
    assert info["backbone"]["sha256"] == identity["sha256"]
    ref = {}  # name: (slice features, mean, max) from probe.py's path on the CT-RATE-layout prepare
    for split in SPLITS:
        ds = open_split(datasets.prepared("small"), split)
        feats = probe.extract_features(vit, ds.slices, 32, 64, "cpu")  # (S, D)
        for i, name in enumerate(ds.names):
            x = feats[ds.volume(i)].astype(np.float64)
            ref[name] = (x, x.mean(0), x.max(0))
    rows = read_csv(out / "test_volumes.csv")
    mean, top = np.load(out / "test_volumes_mean.npy"), np.load(out / "test_volumes_max.npy")
    slices = np.load(out / "test_slices.npy", mmap_mode="r")
    assert [r["name"] for r in rows] == sorted((n for n, s in scaled.items() if s), key=ctrate.natural_key)
    assert list(rows[0]) == ["name", "patient", "first_slice", "count"]  # no label columns: there are none
    for i, r in enumerate(rows):
        x, want_mean, want_max = ref[r["name"]]
        first, count = int(r["first_slice"]), int(r["count"])
        assert count == len(x), r["name"]
        np.testing.assert_allclose(slices[first:first + count], x, rtol=1e-4, atol=1e-5, err_msg=r["name"])
        np.testing.assert_allclose(mean[i], want_mean, rtol=1e-4, atol=1e-5, err_msg=r["name"])
        np.testing.assert_allclose(top[i], want_max, rtol=1e-4, atol=1e-5, err_msg=r["name"])
    per_slice = read_csv(out / "test_slices.csv")
    assert len(per_slice) == len(slices) == sum(int(r["count"]) for r in rows)
    ds = open_split(root / "prepared", "test")
    assert [(s["volume"], int(s["slice"])) for s in per_slice] == \
        [(name, k) for name, c in zip(ds.names, ds.count) for k in range(c)]
    np.testing.assert_allclose([float(s["depth_pos"]) for s in per_slice], ds.depth_pos, rtol=1e-6)


def test_a_labelled_dataset_exports_every_split_with_its_labels(datasets, tmp_path):
    out = tmp_path / "features"
    info = export.main([*BACKBONE, f"--data={datasets.prepared('small')}", f"--out={out}", "--feat_batch=17"])
    assert list(info["splits"]) == list(SPLITS) and info["data"]["has_labels"]
    for split in SPLITS:
        ds = open_split(datasets.prepared("small"), split)
        rows = read_csv(out / f"{split}_volumes.csv")
        assert [r["name"] for r in rows] == ds.names and list(rows[0])[4:] == LABELS
        assert np.array_equal([[float(r[c]) for c in LABELS] for r in rows], ds.labels)
        assert np.load(out / f"{split}_volumes_mean.npy").shape == (len(ds), 192)  # ViT-tiny's width
    saved = json.loads((out / "export.json").read_text())
    assert saved["config"]["feat_batch"] == 17 and saved["normalisation"]["mean"] == prepare.HU_MEAN
    export.main([*BACKBONE, f"--data={datasets.prepared('small')}", f"--out={out}", "--splits=val"])  # its own
    assert sorted(p.name for p in out.iterdir()) == sorted(["export.json"] + [f"val_{f}" for f in export.SPLIT_FILES])


def test_export_never_touches_an_out_it_did_not_write(datasets, tmp_path):
    data = f"--data={datasets.prepared('small')}"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "test_slices.npy").write_text("my own file, named like an export's")
    with pytest.raises(SystemExit) as e:
        export.main([*BACKBONE, data, f"--out={mine}"])
    assert "did not write" in str(e.value.code) and "\n" not in str(e.value.code)
    out = tmp_path / "features"
    export.main([*BACKBONE, data, f"--out={out}", "--splits=test"])
    (out / "notes.txt").write_text("mine")  # an export's folder with something of the user's added
    with pytest.raises(SystemExit, match="did not write.*notes.txt"):
        export.main([*BACKBONE, data, f"--out={out}"])
    assert (mine / "test_slices.npy").read_text().startswith("my own") and (out / "notes.txt").read_text() == "mine"
    assert (out / "test_slices.npy").exists()


@pytest.mark.parametrize("args, needle", [
    (["--splits=holdout"], "--splits=holdout"), (["--img_size=15"], "--img_size=15"),
    (["--img_size=40"], "multiple of the patch size"), (["--feat_batch=0"], "--feat_batch=0"),
    (["--norm=bright"], "--norm=bright"), (["--sise=3"], "--sise"), (["--ckpt=x.pt"], "exactly one of"),
    ([], "exactly one of"), (["--random_init=false", "--ckpt=missing.pt"], "--ckpt=missing.pt: no such file")])
def test_bad_flags_are_one_line(args, needle, tmp_path):
    base = ["--random_init"] if args else []  # with --ckpt: both given; without args: neither
    with pytest.raises(SystemExit) as e:
        export.main(base + args + [f"--out={tmp_path / 'out'}"])
    assert needle in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert not (tmp_path / "out").exists()


def test_an_empty_split_asked_for_is_one_line(plain, tmp_path):
    root, _ = plain  # a plain folder: only test has volumes
    with pytest.raises(SystemExit) as e:
        export.main([*BACKBONE, f"--data={root / 'prepared'}", f"--out={tmp_path / 'out'}", "--splits=train,test"])
    assert "no volumes in train" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_probe_refuses_an_unlabelled_dataset_and_points_to_export(plain, tmp_path):
    root, _ = plain
    with pytest.raises(SystemExit) as e:
        probe.main(["--random_init", f"--data={root / 'prepared'}", f"--out={tmp_path / 'p'}"])
    assert "holds no labels" in str(e.value.code) and "export.py" in str(e.value.code)
    assert "\n" not in str(e.value.code) and not (tmp_path / "p").exists()
