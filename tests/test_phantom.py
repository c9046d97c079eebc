"""phantom.py writes the CT-RATE layout, header quirks included, and its labels match its drawings."""

import csv
import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ctrate
import phantom
from common import parse_config
from conftest import PHANTOMS

TINY = PHANTOMS["tiny"]  # what datasets.phantom("tiny") was written with (one worker)


@pytest.fixture
def ds(datasets):
    """The tiny phantom (read-only: a test that changes it copies it first) and its phantom.json."""
    out = datasets.phantom("tiny")
    return out, json.loads((out / "phantom.json").read_text())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def volumes(out):
    """{VolumeName: (split, metadata row, labels)} from the CSVs."""
    vols = {}
    for split, meta, lab in (("train", "train", "train"), ("valid", "validation", "valid")):
        label_csv = out / "multi_abnormality_labels" / f"{lab}_predicted_labels.csv"
        labels = {r["VolumeName"]: r for r in read_csv(label_csv)}
        for row in read_csv(out / "metadata" / f"{meta}_metadata.csv"):
            vols[row["VolumeName"]] = (split, row, [int(labels[row["VolumeName"]][k]) for k in phantom.LABELS])
    return vols


def image_path(out, name):
    split, p, s, _ = name.removesuffix(".nii.gz").split("_")
    return out / f"{split}_fixed" / f"{split}_{p}" / f"{split}_{p}_{s}" / name


def load_hu(out, name, row):
    """HU the way a careful reader gets them: the header's scaling if it has one, else the CSV's."""
    img = nib.load(image_path(out, name))
    if img.dataobj.inter != 0 or img.dataobj.slope != 1:
        return img, np.asarray(img.dataobj, dtype=np.float32)
    stored = np.asarray(img.dataobj.get_unscaled()).astype(np.float32)
    return img, stored * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])


def all_files(root):
    return sorted(p.relative_to(root) for p in Path(root).rglob("*") if p.is_file())


def test_settings():
    cfg = parse_config(phantom.PhantomConfig, ["--size=48", "--rex_frac=0.3", "--out=x"], "phantom.py")
    assert (cfg.size, cfg.rex_frac, cfg.out, cfg.seed) == (48, 0.3, "x", 0)
    with pytest.raises(ValueError, match="size"):   # write_phantom checks its settings as the command line does
        phantom.write_phantom("/nonexistent/phantom", size=8)


@pytest.mark.parametrize("bad", ["--sise=48", "--size", "size=48", "--size=big", "--size=8", "--slices=3",
                                 "--train_patients=0", "--valid_patients=0", "--rex_frac=1.5", "--rex_frac=-0.1",
                                 "--workers=0", "--out="])
def test_bad_flags_are_refused_in_one_line(bad, tmp_path):
    out = tmp_path / "ph"
    with pytest.raises(SystemExit) as e:
        phantom.main([f"--out={out}", bad])
    message = str(e.value.code)
    assert "\n" not in message and bad.lstrip("-").split("=")[0] in message, message
    assert not out.exists()


def test_deterministic_and_worker_independent(ds, tmp_path):
    out, _ = ds
    again = tmp_path / "again"
    phantom.write_phantom(str(again), **TINY, workers=2)
    files = all_files(out)
    assert files == all_files(again)
    for f in files:   # gzip is written without a timestamp: byte-identical
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "other"
    phantom.write_phantom(str(other), **{**TINY, "seed": 1}, workers=1)
    assert (out / "metadata/train_metadata.csv").read_bytes() != (other / "metadata/train_metadata.csv").read_bytes()
    a = np.asarray(nib.load(image_path(out, "train_1_a_1.nii.gz")).dataobj.get_unscaled())
    b = np.asarray(nib.load(image_path(other, "train_1_a_1.nii.gz")).dataobj.get_unscaled())
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_layout(ds):
    out, meta = ds
    assert meta["config"] == TINY
    summary = meta["summary"]
    vols = volumes(out)
    on_disk = {p.name for p in out.glob("*_fixed/*/*/*.nii.gz")}
    assert on_disk == set(vols)
    assert all(image_path(out, n).exists() for n in vols)
    n_train = sum(s == "train" for s, _, _ in vols.values())
    assert summary["volumes"] == {"train": n_train, "valid": len(vols) - n_train}
    header = next(csv.reader(open(out / "multi_abnormality_labels/valid_predicted_labels.csv")))
    assert header == ["VolumeName"] + phantom.LABELS and len(phantom.LABELS) == 18
    meta = next(csv.reader(open(out / "metadata/validation_metadata.csv")))
    assert meta == ["VolumeName", "Manufacturer", "SeriesDescription", "Rows", "Columns", "NumberofSlices",
                    "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"]
    # Some patients have several volumes: two reconstructions of one scan, and two scans.
    names = set(vols)
    assert {"train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz", "train_2_b_1.nii.gz"} <= names
    assert {"valid_1_a_2.nii.gz", "valid_2_b_1.nii.gz"} <= names
    # Reconstructions of one scan share their labels.
    assert vols["train_1_a_1.nii.gz"][2] == vols["train_1_a_2.nii.gz"][2]
    for name, (_, row, labels) in vols.items():
        assert set(labels) <= {0, 1}
        assert (row["RescaleSlope"], row["RescaleIntercept"]) == ("1", "-1024")
        assert row["XYSpacing"].startswith("[") and float(row["ZSpacing"]) > 0


def test_headers_spacing_and_hu(ds):
    out, _ = ds
    kinds = set()
    for name, (_, row, _) in volumes(out).items():
        img, hu = load_hu(out, name, row)
        xy = json.loads(row["XYSpacing"])
        assert img.get_data_dtype() == np.int16
        assert img.shape == (int(row["Rows"]), int(row["Columns"]), int(row["NumberofSlices"]))
        with gzip.open(image_path(out, name)) as f:
            slope, inter = struct.unpack("<ff", f.read(120)[112:120])
        if np.allclose(img.affine, np.eye(4)):   # raw: nothing in the header, the CSV has it all
            kinds.add("raw")
            assert np.isnan(slope) and np.isnan(inter)
            assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        else:                                    # fixed: scaling and spacing in the header
            kinds.add("fixed")
            assert (slope, inter) == (1.0, -1024.0) and img.dataobj.inter == -1024.0
            assert np.allclose(img.header.get_zooms(), (xy[0], xy[1], float(row["ZSpacing"])), atol=1e-3)
            assert img.affine[2, 2] > 0          # z index increases toward the head
        corners = np.concatenate([hu[:3, :3].ravel(), hu[-3:, -3:].ravel()])
        assert abs(np.median(corners) + 1000) < 30, name   # air outside the body
        assert hu.max() > 300                               # bone
    assert kinds == {"raw", "fixed"}


def test_anatomy_masks(ds):
    out, _ = ds
    vols = volumes(out)
    found, lung_hu = 0, []
    for name, (_, row, _) in vols.items():
        path = out / "ts_seg/ts_total" / image_path(out, name).relative_to(out)
        if not path.exists():
            continue
        found += 1
        img, hu = load_hu(out, name, row)
        seg = nib.load(path)
        lab = np.asarray(seg.dataobj)
        assert lab.dtype == np.uint8 and lab.shape == hu.shape and np.allclose(seg.affine, img.affine)
        assert set(np.unique(lab).tolist()) <= set(phantom.TS_IDS) and max(phantom.TS_IDS) <= 117
        lung = (lab >= 10) & (lab <= 14)
        assert {10, 11, 12, 14} <= set(np.unique(lab).tolist())
        assert np.median(hu[lung]) < -600, name             # the lobes sit on the dark lung
        assert np.median(hu[lab == 51]) > -50                # heart: soft tissue
        lung_hu.append(hu[lung])
        # The apex is superior: lungs are present in the top slice region, the liver only low.
        z_liver = np.nonzero((lab == 5).any((0, 1)))[0]
        z_lung = np.nonzero(lung.any((0, 1)))[0]
        assert z_liver.size == 0 or z_liver.mean() < z_lung.mean()
    assert found >= len(vols) * 0.8
    assert abs(np.median(np.concatenate(lung_hu)) + 850) < 40


def test_finding_masks(ds):
    out, _ = ds
    vols = volumes(out)
    rex = json.loads((out / "rexgroundingct/dataset.json").read_text())
    assert set(rex) == {"train", "valid"}
    for split in ("train", "valid"):
        n = sum(s == split for s, _, _ in vols.values())
        assert len(rex[split]) == max(1, round(TINY["rex_frac"] * n))
    label_of = {}
    for k, c in ctrate.CATEGORY.items():
        label_of.setdefault(c, []).append(phantom.LABELS.index(k))
    assert len(label_of) == 14
    for entry in rex["train"] + rex["valid"]:
        name, labels = entry["name"], vols[entry["name"]][2]
        n_findings = len(entry["findings"])
        assert set(entry["categories"]) == set(entry["findings"]) == {str(i) for i in range(n_findings)}
        # one finding per positive label that has a category
        assert n_findings == sum(labels[phantom.LABELS.index(k)] for k in ctrate.CATEGORY)
        path = out / "rexgroundingct/segmentations" / name
        if n_findings == 0:
            assert not path.exists()
            continue
        img = nib.load(image_path(out, name))
        seg = nib.load(path)
        m = np.asarray(seg.dataobj)
        assert m.dtype == np.uint8 and np.allclose(seg.affine, img.affine)
        assert m.shape == ((n_findings,) if n_findings > 1 else ()) + img.shape
        m = m.reshape((n_findings,) + img.shape)
        for i in range(n_findings):
            assert set(np.unique(m[i]).tolist()) == {0, 1}
            assert any(labels[j] for j in label_of[entry["categories"][str(i)]])


def test_prevalence_of_default_set():
    plan = phantom.plan_volumes(phantom.PhantomConfig())   # the default, without drawing a voxel
    labels = np.array([v["labels"] for v in plan])
    assert 250 <= len(plan) <= 350
    prevalence = labels.mean(0)
    assert ((prevalence >= 0.03) & (prevalence <= 0.5)).all(), dict(zip(phantom.LABELS, prevalence))
    valid = labels[[v["split"] == "valid" for v in plan]]
    assert (valid.sum(0) >= 4).all() and ((1 - valid).sum(0) >= 4).all()   # per-class AUROC on the test split
    rex = [v for v in plan if v["rex"]]
    assert 0.2 <= len(rex) / len(plan) <= 0.3
    assert 0.02 <= np.mean([not v["anatomy"] for v in plan]) <= 0.08


def test_labels_match_drawing():
    """Each positive label changes the picture, inside its own mask; a negative one draws nothing."""
    plan = phantom.plan_volumes(phantom.PhantomConfig(train_patients=12, valid_patients=1, size=32, slices=12, seed=3))
    checked = set()
    for v in plan[:12]:
        hu, _, findings = phantom.render(v)
        positive = {k for k, on in zip(phantom.LABELS, v["labels"]) if on}
        assert set(findings) == positive
        for name in positive - {"Cardiomegaly"}:   # cardiomegaly is the heart's size, checked below
            off = dict(v, labels=[0 if k == name else on for k, on in zip(phantom.LABELS, v["labels"])])
            hu_off, _, _ = phantom.render(off)
            changed = hu != hu_off
            mask = findings[name][0]
            assert mask.any() and changed[mask].any(), (v["name"], name)
            checked.add(name)
    assert len(checked) >= 8
    ratio = {True: [], False: []}   # heart width / chest width
    for v in phantom.plan_volumes(phantom.PhantomConfig(train_patients=40, valid_patients=1, seed=3)):
        ratio[bool(v["labels"][phantom.LABELS.index("Cardiomegaly")])].append(v["chest"]["hax"] / v["chest"]["Ac"])
    assert ratio[True] and min(ratio[True]) > 0.5 > max(ratio[False])


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        phantom.write_phantom(str(tmp_path), **TINY, workers=1)
    assert (tmp_path / "notes.txt").exists()
