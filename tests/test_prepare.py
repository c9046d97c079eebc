"""prepare.py: phantom -> prepare -> reader round trip, bad inputs, resume, a plain folder of your own scans."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ctrate
import prepare
from common import SPLITS, parse_config
from conftest import ROOT, run_env
from prepare import LABELS, Config, open_split, PreparedError


def cfg_for(src, out, **kw):
    return Config(src=str(src), out=str(out), z_mm=kw.pop("z_mm", 4.0), size=kw.pop("size", 40),
                  mask_size=kw.pop("mask_size", 20), workers=kw.pop("workers", 1), **kw)


@pytest.fixture
def phantom_src(datasets):
    """The small phantom (read-only: a test that changes it copies it first)."""
    return datasets.phantom("small")


@pytest.fixture(scope="session")
def prepared(datasets, tmp_path_factory):
    """The small phantom prepared with cfg_for's settings, once (conftest's datasets.prepared("small")
    uses the default settings instead)."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare.prepare(cfg_for(datasets.phantom("small"), out), progress=False)
    return out


def all_rows(root):
    return [r for s in ("train", "val", "test") for r in open_split(root, s).rows]


def read_csv(path):
    with open(path, newline="") as f:
        return {ctrate.strip_ext(r["VolumeName"]): r for r in csv.DictReader(f)}


def image_path(src, name):
    split, p, scan, _ = name.split("_")
    return os.path.join(src, f"{split}_fixed", f"{split}_{p}", f"{split}_{p}_{scan}", name + ".nii.gz")


def test_hu_values_match_nibabel_and_csv(phantom_src, prepared):
    """Rebuild every prepared volume straight from nibabel + the CSV (in-plane resize, then linear
    interpolation in z between slice centres) and compare."""
    checked, compared = set(), 0
    for split in ("train", "test"):
        ds = open_split(prepared, split)
        meta = read_csv(os.path.join(phantom_src, "metadata",
                                     ("train" if split == "train" else "validation") + "_metadata.csv"))
        for i in range(len(ds)):
            row = ds.rows[i]
            img = nib.load(image_path(phantom_src, row["name"]))
            data = img.get_fdata(dtype=np.float32)  # nibabel applies any header scaling
            header_scaled = (img.dataobj.slope, img.dataobj.inter) != (1.0, 0.0)  # nibabel moves scl_* here
            if not header_scaled:  # CT-RATE originals: the CSV carries the scaling
                m = meta[row["name"]]
                data = data * float(m["RescaleSlope"]) + float(m["RescaleIntercept"])
            checked.add(header_scaled)
            assert row["hu_source"] == ("header" if header_scaled else "csv")
            vol = data.transpose(2, 1, 0)
            vol = vol[::-1] if row["flip_z"] else vol
            y0, x0, side = row["box"]
            pad = np.full((vol.shape[0], side, side), -1024.0, np.float32)
            ys, xs = slice(max(y0, 0), min(y0 + side, vol.shape[1])), slice(max(x0, 0), min(x0 + side, vol.shape[2]))
            pad[:, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = vol[:, ys, xs]
            x = F.interpolate(torch.from_numpy(pad)[:, None], size=(ds.manifest["size"],) * 2, mode="bilinear",
                              antialias=True, align_corners=False)[:, 0]
            depth, src_z, z_mm = vol.shape[0], row["src_spacing"][1], ds.manifest["z_mm"]
            n = max(1, round(depth * src_z / z_mm))
            assert ds.count[i] == n, row["name"]
            zpos = np.clip((np.arange(n) + 0.5) * z_mm / src_z - 0.5, 0, depth - 1)  # slice centres aligned
            i0 = np.floor(zpos).astype(np.int64)
            w = torch.from_numpy((zpos - i0).astype(np.float32))[:, None, None]
            below, above = x[torch.from_numpy(i0)], x[torch.from_numpy(np.minimum(i0 + 1, depth - 1))]
            ref = (below + w * (above - below)).round()
            got = torch.from_numpy(ds.slices[ds.volume(i)].astype(np.float32))
            assert got.shape == ref.shape
            assert (got - ref).abs().max() <= 1.0, row["name"]
            compared += 1
            # air outside the body (image corners) near -1000 HU
            assert abs(float(np.median(ds.slices[ds.volume(i)][:, :2, :2])) + 1000) < 60
    assert checked == {True, False}, "phantom should exercise both HU paths"
    assert compared == sum(len(open_split(prepared, s)) for s in ("train", "test"))


def test_labels_match_csv(phantom_src, prepared):
    for split, src_split in (("train", "train"), ("val", "train"), ("test", "valid")):
        ds = open_split(prepared, split)
        rows = read_csv(os.path.join(phantom_src, "multi_abnormality_labels", f"{src_split}_predicted_labels.csv"))
        assert len(ds) > 0
        for i, name in enumerate(ds.names):
            assert ds.labels[i].tolist() == [float(rows[name][c]) for c in LABELS]


def test_masks_line_up_with_slices(prepared):
    ds = open_split(prepared, "train")
    m = ds.manifest["mask_size"]
    hu = torch.from_numpy(ds.slices[:].astype(np.float32))[:, None]
    hu_small = F.interpolate(hu, size=(m, m), mode="area")[:, 0].numpy()  # (S, m, m)
    lung = np.isin(ds.anatomy, [10, 11, 12, 13, 14])
    heart = ds.anatomy == 51
    assert lung.sum() > 100 and heart.sum() > 20
    assert np.median(hu_small[lung]) < -600     # lungs are dark
    assert np.median(hu_small[heart]) > -150    # heart is soft tissue
    # abnormality bits only where a volume has abnormality masks
    for i in range(len(ds)):
        if not ds.has_abnormality[i]:
            assert ds.abnormal[ds.volume(i)].max() == 0
    assert ds.abnormal.max() > 0


def test_depth_and_table(prepared):
    ds = open_split(prepared, "train")
    for i in range(len(ds)):
        d = ds.depth_pos[ds.volume(i)]
        assert d[0] == 0 and (d[-1] == 1 or ds.count[i] == 1) and np.all(np.diff(d) > 0)
        assert np.allclose(np.diff(ds.depth_mm[ds.volume(i)]), ds.z_mm[i])
    assert ds.start[0] == 0 and np.all(ds.start[1:] == np.cumsum(ds.count)[:-1])
    assert ds.count.sum() == len(ds.slices)


def test_patient_split_has_no_leakage(prepared):
    seen = {}
    for split in ("train", "val", "test"):
        for p in open_split(prepared, split).patients:
            assert seen.setdefault(p, split) == split, f"{p} in {seen[p]} and {split}"
    assert {s for s in seen.values()} == {"train", "val", "test"}


def test_reader_refuses_folder_without_manifest(tmp_path, prepared):
    with pytest.raises(PreparedError, match="no manifest"):
        open_split(tmp_path, "train")
    half = tmp_path / "half"
    shutil.copytree(prepared, half)
    os.remove(half / "manifest.json")  # as if the run stopped before the end
    with pytest.raises(PreparedError, match="no manifest"):
        open_split(half, "train")
    with pytest.raises(PreparedError, match="no split"):
        open_split(prepared, "nope")


# -----------------------------------------------------------------------------
# Bad inputs: each is rejected with its reason, and the rest is prepared

def corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    names = sorted(read_csv(os.path.join(dst, "metadata", "train_metadata.csv")))
    return names


def rewrite_csv(path, fn):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols, rows = list(reader.fieldnames), list(reader)
    cols, rows = fn(cols, rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def save_like(path, data, like, scaled=None):
    img = nib.Nifti1Image(data, like.affine)
    if scaled:
        img.header.set_slope_inter(*scaled)
    nib.save(img, path)


def test_bad_inputs_are_rejected_with_reasons(phantom_src, tmp_path):
    src = tmp_path / "src"
    names = corrupt_copy(phantom_src, src)
    bad = {}
    # truncated .nii.gz
    p = image_path(src, names[0])
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[: len(blob) // 2])
    bad[names[0]] = "truncated or corrupt"
    # non-3D array
    like = nib.load(image_path(src, names[1]))
    save_like(image_path(src, names[1]), np.zeros(like.shape + (2,), np.int16), like)
    bad[names[1]] = "expected a 3-D"
    # NaN voxels
    like = nib.load(image_path(src, names[2]))
    data = np.asanyarray(like.dataobj.get_unscaled()).astype(np.float32)
    data[0, 0, 0] = np.nan
    save_like(image_path(src, names[2]), data, like)
    bad[names[2]] = "NaN or inf"
    # constant volume
    like = nib.load(image_path(src, names[3]))
    save_like(image_path(src, names[3]), np.full(like.shape, 7, np.int16), like)
    bad[names[3]] = "constant volume"
    # HU check: values already in HU but no header scaling -> the CSV intercept shifts air to -2024
    like = nib.load(image_path(src, names[4]))
    hu = like.get_fdata() - (0 if like.dataobj.inter == -1024 else 1024)
    save_like(image_path(src, names[4]), hu.astype(np.int16), like)  # no header scaling: the CSV's -1024 again
    bad[names[4]] = "HU check failed"
    # mask whose shape does not match its image
    anat = os.path.join(src, "ts_seg", "ts_total", os.path.relpath(image_path(src, names[5]), src))
    like = nib.load(image_path(src, names[5]))
    save_like(anat, np.zeros(tuple(s - 1 for s in like.shape), np.uint8), like)
    bad[names[5]] = "does not match its image"
    # missing metadata row, missing label row
    rewrite_csv(os.path.join(src, "metadata", "train_metadata.csv"),
                lambda c, r: (c, [x for x in r if ctrate.strip_ext(x["VolumeName"]) != names[6]]))
    bad[names[6]] = "0 rows for it in metadata"
    rewrite_csv(os.path.join(src, "multi_abnormality_labels", "train_predicted_labels.csv"),
                lambda c, r: (c, [x for x in r if ctrate.strip_ext(x["VolumeName"]) != names[7]]))
    bad[names[7]] = "0 rows for it in multi_abnormality_labels"
    # duplicate name: the same file in a second folder
    dup = os.path.join(src, "train_fixed", "extra", os.path.basename(image_path(src, names[8])))
    os.makedirs(os.path.dirname(dup))
    shutil.copy(image_path(src, names[8]), dup)
    bad[names[8]] = "duplicate volume name"
    # header spacing (a _fixed file) disagrees with the CSV
    fixed = next(n for n in names[9:] if nib.load(image_path(src, n)).dataobj.inter == -1024)
    rewrite_csv(os.path.join(src, "metadata", "train_metadata.csv"),
                lambda c, r: (c, [dict(x, ZSpacing="9.5") if ctrate.strip_ext(x["VolumeName"]) == fixed else x
                                  for x in r]))
    bad[fixed] = "spacing disagreement"

    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="split val would hold no volume"):  # val's one patient is all rejects
        prepare.prepare(cfg_for(src, out), progress=False)
    assert not (out / "manifest.json").exists()
    manifest = prepare.prepare(cfg_for(src, out, pretrain_only=True), progress=False)  # asked for: it finishes
    with open(out / "rejects.csv", newline="") as f:
        rejects = {r["name"]: r["reason"] for r in csv.DictReader(f)}
    for name, reason in bad.items():
        assert name in rejects, f"{name} should be rejected for {reason}"
        assert reason in rejects[name], rejects[name]
    assert set(rejects) == set(bad)
    kept = {r["name"] for r in all_rows(out)}
    assert not kept & set(bad)
    assert sum(s["volumes"] for s in manifest["splits"].values()) == len(kept) > 0

    # --strict: the first reject is fatal, and no dataset is written
    with pytest.raises(SystemExit, match="strict"):
        prepare.prepare(cfg_for(src, tmp_path / "strict", strict=True), progress=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_implausible_spacing_is_a_reject_naming_the_volume(phantom_src, tmp_path):
    """ZSpacing 500 made a 16-slice volume thousands of slices, 1e-4 one slice, XYSpacing 500 stored
    kilometres of field of view, 1e6 refused the whole run for lack of disk: each is now that volume's
    reject, and the rest of the run goes on."""
    src = tmp_path / "src"
    names = corrupt_copy(phantom_src, src)
    raw = [n for n in names if nib.load(image_path(src, n)).dataobj.inter != -1024]  # spacing from the CSV only
    changes = {raw[0]: dict(ZSpacing="500"), raw[1]: dict(ZSpacing="0.0001"), raw[2]: dict(XYSpacing="[500, 500]"),
               raw[3]: dict(ZSpacing="1000000")}
    rewrite_csv(os.path.join(src, "metadata", "train_metadata.csv"),
                lambda c, r: (c, [dict(x, **changes.get(ctrate.strip_ext(x["VolumeName"]), {})) for x in r]))
    out = tmp_path / "out"
    prepare.prepare(cfg_for(src, out), progress=False)
    with open(out / "rejects.csv", newline="") as f:
        rejects = {r["name"]: r["reason"] for r in csv.DictReader(f)}
    assert set(rejects) == set(changes)
    assert all("implausible spacing" in why and name in why for name, why in rejects.items()), rejects
    kept = {r["name"] for r in all_rows(out)}
    assert kept and kept.isdisjoint(changes)


def test_a_split_left_empty_is_an_error_unless_asked_for(phantom_src, tmp_path):
    """No CT-RATE valid volumes (so no test split): an error, not a finished dataset; --pretrain_only
    writes it. The staged volumes stay, so the corrected command does not start over."""
    src = tmp_path / "src"
    shutil.copytree(phantom_src, src)
    shutil.rmtree(src / "valid_fixed")
    rewrite_csv(os.path.join(src, "metadata", "validation_metadata.csv"), lambda c, r: (c, []))
    with pytest.raises(SystemExit) as e:
        prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    assert "split test would hold no volume" in str(e.value.code) and "--pretrain_only" in str(e.value.code)
    assert not (tmp_path / "out" / "manifest.json").exists() and (tmp_path / "out" / ".staging").exists()
    manifest = prepare.prepare(cfg_for(src, tmp_path / "out", pretrain_only=True), progress=False)
    assert manifest["splits"]["test"]["volumes"] == 0 and manifest["splits"]["train"]["volumes"] > 0


@pytest.mark.parametrize("damage", ["truncated array", "missing split folder"])
def test_reader_names_a_damaged_split(prepared, tmp_path, damage):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    if damage == "truncated array":
        path = out / "train" / "slices.i16"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        shutil.rmtree(out / "train")
    with pytest.raises(PreparedError, match="damaged split") as e:
        open_split(str(out), "train")
    assert "\n" not in str(e.value) and "train" in str(e.value)


def test_a_typo_in_src_does_not_block_the_corrected_command(phantom_src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no volumes found"):
        prepare.prepare(cfg_for(tmp_path / "nowhere", out), progress=False)
    prepare.prepare(cfg_for(phantom_src, out), progress=False)  # not "an interrupted run with other settings"
    assert (out / "manifest.json").exists()


def test_csv_with_a_byte_order_mark_is_read(phantom_src, prepared, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(phantom_src, src)
    for csv_path in (src / "metadata").glob("*.csv"):
        csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as a spreadsheet saves UTF-8
    prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    got, want = read_all(tmp_path / "out"), read_all(prepared)
    for split in want:
        assert all(np.array_equal(a, b) for a, b in zip(got[split][:4], want[split][:4])), split
        assert got[split][4] == want[split][4]


@pytest.mark.parametrize("content, needle", [("{not json", "not a ReXGroundingCT index"),
                                             ('[{"findings": {}}]', "entry 0 has no 'name'")])
def test_a_broken_rex_index_is_one_line(phantom_src, tmp_path, content, needle):
    src = tmp_path / "src"
    shutil.copytree(phantom_src, src)
    (src / "rexgroundingct" / "dataset.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    assert needle in str(e.value.code) and "dataset.json" in str(e.value.code) and "\n" not in str(e.value.code)


def test_disk_full_or_read_only_out_is_one_line(phantom_src, tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):  # root writes through permission bits: refuse as a read-only disk
        raise OSError(30, "Read-only file system", str(path))
    with monkeypatch.context() as m:
        m.setattr(os, "makedirs", read_only)
        with pytest.raises(SystemExit) as e:
            prepare.main([f"--src={phantom_src}", f"--out={tmp_path / 'ro'}", "--workers=1"])
    assert "Read-only file system" in str(e.value.code) and "\n" not in str(e.value.code)

    def full(stage, job, arrays):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / ".staging"))
    monkeypatch.setattr(prepare, "write_slot", full)
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--src={phantom_src}", f"--out={tmp_path / 'out'}", "--size=40", "--z_mm=4",
                      "--mask_size=20", "--workers=1"])
    assert "No space left on device" in str(e.value.code) and "same command again" in str(e.value.code)


def phantom_hu(src, name):
    """A phantom volume in HU, (X, Y, Z), and its metadata row."""
    img = nib.load(image_path(src, name))
    meta = read_csv(os.path.join(src, "metadata", "train_metadata.csv"))
    raw = np.asanyarray(img.dataobj.get_unscaled()).astype(np.float32)
    hu = raw * img.dataobj.slope + img.dataobj.inter if img.dataobj.inter == -1024 else raw - 1024
    return hu, meta[name]


@pytest.mark.parametrize("field", ["full", "tight"])
def test_hu_check_accepts_any_field_of_view_and_refuses_a_wrong_intercept(phantom_src, field):
    """The check reads the darkest voxels (air, trachea, lungs), not the border: a crop inside the body
    (no air around it) is accepted when scaled right; unscaled (the intercept missing) and doubly scaled
    (the intercept applied twice) are refused, on full and tight fields of view alike."""
    name = sorted(read_csv(os.path.join(phantom_src, "metadata", "train_metadata.csv")))[0]
    hu, meta = phantom_hu(phantom_src, name)
    if field == "tight":  # the middle half of each side: the body touches every edge, the lungs stay
        X, Y = hu.shape[:2]
        hu = hu[X // 4: 3 * X // 4, Y // 4: 3 * Y // 4]
        assert np.median(np.concatenate([hu[0].ravel(), hu[-1].ravel()])) > -500  # no air at the border
    cases = {  # (stored values, header (slope, intercept) or None, CSV intercept) -> accepted?
        "right, header": (hu + 1024, (1, -1024), "-1024", True),
        "right, csv": (hu + 1024, None, "-1024", True),
        "unscaled": (hu + 1024, None, "0", False),
        "doubly scaled": (hu, (1, -1024), "-1024", False),
        "doubly scaled, csv": (hu, None, "-1024", False),
    }
    for case, (stored, header, csv_inter, ok) in cases.items():
        img = nib.Nifti1Image(stored.astype(np.int16), np.diag([0.75, 0.75, 1.5, 1]))
        if header:
            img.header.set_slope_inter(*header)
        img = nib.Nifti1Image.from_bytes(img.to_bytes())
        raw = np.asanyarray(img.dataobj.get_unscaled())
        job = {"path": f"{case}.nii.gz", "meta": dict(meta, RescaleSlope="1", RescaleIntercept=csv_inter)}
        if ok:
            prepare.hu_scaling(img, raw, job, "auto")
        else:
            with pytest.raises(ctrate.Reject, match="HU check failed"):
                prepare.hu_scaling(img, raw, job, "auto")


def test_a_small_crop_keeps_its_body(phantom_src):
    """The 19 mm opening must not erase a crop narrower than a few windows (here 12 px at 0.75 mm, on the
    opening's 4 mm grid 3 cells for a 5-cell window): the box still covers it."""
    name = sorted(read_csv(os.path.join(phantom_src, "metadata", "train_metadata.csv")))[0]
    hu, _ = phantom_hu(phantom_src, name)
    X, Y = hu.shape[:2]
    crop = hu[3 * X // 8: 5 * X // 8, 3 * Y // 8: 5 * Y // 8].T  # (D, Y, X), a quarter of each side
    y0, x0, side = prepare.body_box(crop, 0.75, -500.0, "crop.nii.gz")  # at CT-RATE's 0.75 mm: 9 mm across
    assert side >= 0.75 * max(crop.shape[1:])


def test_two_runs_on_one_out_the_second_refuses(phantom_src, tmp_path):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a first prepare.py holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="another prepare.py is writing there"):
            prepare.prepare(cfg_for(phantom_src, out), progress=False)
    prepare.prepare(cfg_for(phantom_src, out), progress=False)  # once it is gone
    assert (out / "manifest.json").exists()


def test_unknown_label_column_is_fatal(phantom_src, tmp_path):
    src = tmp_path / "src"
    corrupt_copy(phantom_src, src)
    rewrite_csv(os.path.join(src, "multi_abnormality_labels", "valid_predicted_labels.csv"),
                lambda c, r: (c + ["Pneumothorax"], [dict(x, Pneumothorax=0) for x in r]))
    with pytest.raises(SystemExit, match="unknown label column.*Pneumothorax"):
        prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)


# -----------------------------------------------------------------------------
# Work is not lost: interrupt, resume, compare with an uninterrupted run

REAL_WORK = prepare.work  # captured before any test patches it


def interrupt_after(monkeypatch, k):
    """Make prepare.work raise KeyboardInterrupt (a Ctrl-C) once k volumes are done; returns their names."""
    done = []

    def flaky(args):
        if len(done) == k:
            raise KeyboardInterrupt
        done.append(args[0]["name"])
        return REAL_WORK(args)
    monkeypatch.setattr(prepare, "work", flaky)
    return done


def record_work(monkeypatch):
    """Let prepare.work run as usual, recording the names of the volumes it prepares."""
    done = []

    def recording(args):
        done.append(args[0]["name"])
        return REAL_WORK(args)
    monkeypatch.setattr(prepare, "work", recording)
    return done


def read_all(root):
    out = {}
    for split in ("train", "val", "test"):
        ds = open_split(root, split)
        out[split] = (ds.slices[:].copy(), ds.anatomy[:].copy(), ds.abnormal[:].copy(), ds.depth[:].copy(),
                      json.dumps(ds.rows))
    return out


def test_interrupted_then_resumed_equals_uninterrupted(phantom_src, prepared, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(PreparedError):
        open_split(out, "train")
    redone = record_work(monkeypatch)
    prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert not set(redone) & set(calls), "staged volumes must not be prepared again"
    a, b = read_all(out), read_all(prepared)
    for split in a:
        for x, y in zip(a[split], b[split]):
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
    # a re-run on a finished folder does nothing; other settings are refused
    prepare.prepare(cfg_for(phantom_src, out), progress=False)
    with pytest.raises(SystemExit, match="other settings"):
        prepare.prepare(cfg_for(phantom_src, out, size=32), progress=False)


def volumes_by_name(root):
    """{name: (split, table row without its start, slices, anatomy, abnormal, depth)} of a prepared folder."""
    out = {}
    for split in ("train", "val", "test"):
        ds = open_split(root, split)
        assert len(ds) == 0 or ds.start[0] == 0 and np.all(ds.start[1:] == np.cumsum(ds.count)[:-1])  # no gaps
        assert ds.count.sum() == len(ds.slices)
        for i, row in enumerate(ds.rows):
            v = ds.volume(i)
            out[row["name"]] = (split, {k: x for k, x in row.items() if k != "start"}, ds.slices[v].copy(),
                                ds.anatomy[v].copy(), ds.abnormal[v].copy(), ds.depth[v].copy())
    return out


def assert_same_volumes(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name


def test_rejects_on_the_way_leave_no_gap_and_resume(phantom_src, prepared, tmp_path, monkeypatch):
    """Volumes rejected after their rows were planned (only reading them tells) leave holes that
    assembly closes. Interrupted in the middle, then run again: the same dataset, and no finished
    volume prepared twice."""
    ref = volumes_by_name(prepared)
    names = {s: sorted((n for n, v in ref.items() if v[0] == s), key=ctrate.natural_key) for s in ("train", "test")}
    bad = {names["train"][1], names["test"][0]}
    real_volume = prepare.process_volume

    def reject_some(job, cfg):
        if job["name"] in bad:
            raise prepare.Reject(f"{job['path']}: injected")
        return real_volume(job, cfg)
    monkeypatch.setattr(prepare, "process_volume", reject_some)
    calls = interrupt_after(monkeypatch, 6)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert bad & set(calls), "the interrupted part should hold a reject"
    redone = record_work(monkeypatch)
    prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert not set(redone) & (set(calls) - bad), "finished volumes must not be prepared again"
    assert_same_volumes(volumes_by_name(out), {n: v for n, v in ref.items() if n not in bad})
    with open(out / "rejects.csv", newline="") as f:
        assert {r["name"] for r in csv.DictReader(f)} == bad


def test_crash_in_assembly_then_rerun(phantom_src, prepared, tmp_path, monkeypatch):
    """Assembly only reads the staging, so a crash in the middle of it (here: before the second split
    is in place) loses nothing, and the re-run gives the same dataset; where the file system has no
    hard links, the staged arrays are copied instead."""
    def no_links(src, dst):
        raise OSError("hard links not supported")
    real_replace = os.replace

    def crash_at_val(src, dst):
        if str(src).endswith("val.tmp"):
            raise OSError("crash")
        return real_replace(src, dst)
    monkeypatch.setattr(prepare.os, "link", no_links)
    monkeypatch.setattr(prepare.os, "replace", crash_at_val)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="crash"):
        prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert (out / "train").exists() and not (out / "manifest.json").exists()
    with pytest.raises(PreparedError):
        open_split(out, "train")
    monkeypatch.setattr(prepare.os, "replace", real_replace)
    redone = record_work(monkeypatch)
    prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert redone == []
    assert_same_volumes(volumes_by_name(out), volumes_by_name(prepared))


def test_changed_source_restarts_the_staging(phantom_src, tmp_path, monkeypatch, capsys):
    """An interrupted run, then a volume removed from the source: the planned rows no longer hold,
    so the staging starts over, and the result equals a fresh run on the changed source."""
    src = tmp_path / "src"
    corrupt_copy(phantom_src, src)
    calls = interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    monkeypatch.setattr(prepare, "work", REAL_WORK)
    os.remove(image_path(src, calls[0]))  # one that the interrupted run had finished
    capsys.readouterr()
    prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    assert "source folder changed" in capsys.readouterr().out
    prepare.prepare(cfg_for(src, tmp_path / "fresh"), progress=False)
    assert_same_volumes(volumes_by_name(tmp_path / "out"), volumes_by_name(tmp_path / "fresh"))


def test_workers_give_the_same_output(phantom_src, prepared, tmp_path):
    out = tmp_path / "out"
    prepare.prepare(cfg_for(phantom_src, out, workers=2), progress=False)
    a, b = read_all(out), read_all(prepared)
    for split in a:
        assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a[split], b[split]))


def test_disk_check_refuses_when_too_small(phantom_src, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 99, 1))
    with pytest.raises(SystemExit, match="not enough disk"):
        prepare.prepare(cfg_for(phantom_src, tmp_path / "out"), progress=False)


def test_opening_equals_max_pool_reference():
    """The shifted-window erosion/dilation used for the body box equals max-pooling morphology."""
    rng = np.random.default_rng(1)
    for k in (1, 3, 7, 25):
        m = rng.random((3, 37, 53)) > 0.25
        t = torch.from_numpy(m).float()[:, None]
        eroded = -F.max_pool2d(-F.pad(t, (k // 2,) * 4), k, stride=1)  # zeros outside the image
        dilated = F.max_pool2d(t, k, stride=1, padding=k // 2)
        assert np.array_equal(prepare.erode(m, k), eroded[:, 0].numpy() > 0)
        assert np.array_equal(prepare.dilate(m, k), dilated[:, 0].numpy() > 0)


def test_unreadable_file_and_worker_errors_become_rejects(phantom_src, tmp_path, monkeypatch):
    """A file that is not NIfTI at all, and an unexpected error inside one volume, are rejects, not a crash."""
    src = tmp_path / "src"
    names = corrupt_copy(phantom_src, src)
    with open(image_path(src, names[0]), "wb") as f:
        f.write(b"<html>404 not found</html>")  # what a failed download often leaves behind
    real = prepare.process_volume

    def odd(job, cfg):
        if job["name"] == names[1]:
            raise IndexError("something no one planned for")
        return real(job, cfg)
    monkeypatch.setattr(prepare, "process_volume", odd)
    prepare.prepare(cfg_for(src, tmp_path / "out"), progress=False)
    with open(tmp_path / "out" / "rejects.csv", newline="") as f:
        rejects = {r["name"]: r["reason"] for r in csv.DictReader(f)}
    assert "truncated or corrupt" in rejects[names[0]]
    assert "unexpected IndexError" in rejects[names[1]] and set(rejects) == {names[0], names[1]}


# -----------------------------------------------------------------------------
# Settings: every bad value is refused in one line that names the flag, before anything is written

@pytest.mark.parametrize("bad", ["--size=abc", "--size=0", "--size=-64", "--size=15", "--z_mm=-1", "--z_mm=0",
                                 "--z_mm=nan", "--val_patients=-5", "--mask_size=0", "--strict=maybe",
                                 "--keep_staging=2", "--hu=guess", "--workers=0", "--seed=-1", "--out=", "--sise=64",
                                 "--layout=guess", "--split=holdout"])
def test_bad_flags_are_refused_in_one_line(bad, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--src={tmp_path / 'src'}", f"--out={out}", bad])
    message = str(e.value.code)
    assert "\n" not in message and bad.split("=")[0] in message, message
    assert not out.exists()


def test_settings_spellings(tmp_path):
    cfg = parse_config(Config, ["--keep-staging", "--strict", "--z_mm=2.5", "--size=64"], "prepare.py")
    assert (cfg.keep_staging, cfg.strict, cfg.z_mm, cfg.size) == (True, True, 2.5, 64)
    cfg = parse_config(Config, ["--keep-staging=false", "--strict=no"], "prepare.py")
    assert (cfg.keep_staging, cfg.strict) == (False, False)
    with pytest.raises(SystemExit, match="--out=.*overlap"):  # a cross-setting check: out must not be src
        prepare.main([f"--src={tmp_path}", f"--out={tmp_path}"])


def source_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_overlapping_src_is_refused_before_anything_is_written(phantom_src, tmp_path, where):
    """--out=SRC deleted SRC's train/valid/test-named folders; so did an --out above SRC. Refused, every
    source byte kept, nothing written; also through a relative spelling and a symlink."""
    par = tmp_path / "par"
    src = par / "test"  # a source folder named like a split: OUT/test would have been it
    shutil.copytree(phantom_src, src)
    before = source_files(par)
    link = tmp_path / "link"
    link.symlink_to(par)
    out = {"same": src, "parent": link, "inside": src / "prepared"}[where]
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--src={os.path.relpath(src)}", f"--out={out}", "--size=40", "--z_mm=4", "--workers=1"])
    assert "overlap" in str(e.value.code) and "\n" not in str(e.value.code)
    assert source_files(par) == before


def test_a_foreign_split_folder_is_never_deleted(phantom_src, tmp_path):
    """prepare replaces OUT/train, OUT/val, OUT/test; one that holds a file prepare did not write stops it."""
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)
    (out / "test" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write.*notes.txt"):
        prepare.prepare(cfg_for(phantom_src, out), progress=False)
    assert (out / "test" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad, flag", [(dict(hu="guess"), "--hu=guess"), (dict(z_mm=-1.0), "--z_mm=-1.0"),
                                       (dict(size=0), "--size=0")])
def test_a_config_built_in_code_gets_the_command_lines_checks(phantom_src, tmp_path, bad, flag):
    with pytest.raises(SystemExit) as e:
        prepare.prepare(cfg_for(phantom_src, tmp_path / "out", **bad), progress=False)
    assert flag in str(e.value.code) and not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Your own scans: a plain folder of NIfTI files, no CSVs (issue 21)

def read_rejects(out):
    with open(os.path.join(out, "rejects.csv"), newline="") as f:
        return {r["name"]: r["reason"] for r in csv.DictReader(f)}


def plain_copy(src, dst):
    """The image files of a CT-RATE-layout folder, flat in dst (no CSVs, no masks). Returns {name: whether its
    header holds its HU scaling}: the phantom's "raw" volumes have theirs in the CSV only."""
    dst.mkdir(parents=True)
    scaled = {}
    for p in sorted(src.glob("*_fixed/**/*.nii.gz")):
        shutil.copy(p, dst / p.name)
        scaled[ctrate.strip_ext(p.name)] = nib.load(p).dataobj.inter == -1024
    return scaled


def test_a_plain_folder_is_prepared_from_its_headers(phantom_src, prepared, tmp_path):
    """HU and spacing from the headers, checked as for CT-RATE: the raw volumes (scaling in the CSV only) fail
    the HU check by file, so do an unreadable file and two files of one name (a folder apart). Every other
    volume is, voxel for voxel, what the CT-RATE prepare made of it, all in --split, with no labels or masks;
    the other splits open empty. A CT-RATE name gives the patient, any other name is a patient of its own."""
    src, out = tmp_path / "scans", tmp_path / "out"
    scaled = plain_copy(phantom_src, src)
    fixed, raw = sorted(n for n in scaled if scaled[n]), sorted(n for n in scaled if not scaled[n])
    assert len(fixed) >= 3 and raw
    (src / "sub").mkdir()
    shutil.copy(src / f"{fixed[0]}.nii.gz", src / "sub")
    (src / "broken.nii.gz").write_bytes(b"<html>404 not found</html>")
    shutil.copy(src / f"{fixed[1]}.nii.gz", src / "my_scan.nii.gz")
    manifest = prepare.prepare(cfg_for(src, out, split="test"), progress=False)
    assert (manifest["layout"], manifest["split"], manifest["has_labels"]) == ("plain", "test", False)
    rejects = read_rejects(out)
    assert set(rejects) == set(raw) | {fixed[0], "broken"}
    assert all("HU check failed" in rejects[n] and str(src / f"{n}.nii.gz") in rejects[n] for n in raw), rejects
    assert "truncated or corrupt" in rejects["broken"] and str(src / "broken.nii.gz") in rejects["broken"]
    both = [str(src / f"{fixed[0]}.nii.gz"), str(src / "sub" / f"{fixed[0]}.nii.gz")]
    assert "duplicate" in rejects[fixed[0]] and all(p in rejects[fixed[0]] for p in both)

    train, val, test = (open_split(out, s) for s in SPLITS)
    assert len(train) == len(val) == 0 and len(train.slices) == 0 and train.labels is None
    assert not test.has_labels and test.labels is None and not (test.has_anatomy.any() or test.has_abnormality.any())
    assert test.anatomy.max() == 0 and test.abnormal.max() == 0
    labelled = open_split(prepared, "test")
    assert labelled.has_labels and labelled.labels.shape == (len(labelled), len(LABELS))
    ref, got = volumes_by_name(prepared), volumes_by_name(out)
    assert sorted(got) == sorted(fixed[1:] + ["my_scan"])
    for name, (split, row, slices, anatomy, abnormal, depth) in got.items():
        _, want, want_slices, _, _, want_depth = ref[fixed[1] if name == "my_scan" else name]
        assert split == "test" and np.array_equal(slices, want_slices) and np.array_equal(depth, want_depth), name
        assert row["labels"] is None and row["hu_source"] == "header" and not row["has_anatomy"]
        assert row["patient"] == ("my_scan" if name == "my_scan" else want["patient"])
        assert {k: row[k] for k in ("count", "box", "src_spacing", "flip_z", "z_direction")} == \
            {k: want[k] for k in ("count", "box", "src_spacing", "flip_z", "z_direction")}, name
    again = prepare.prepare(cfg_for(src, out, split="test"), progress=False)  # the same command: nothing to do
    assert again["created"] == manifest["created"]
    with pytest.raises(SystemExit, match="other settings"):
        prepare.prepare(cfg_for(src, out, split="val"), progress=False)


def test_the_layout_is_detected_or_said_to_be_unclear(phantom_src, tmp_path):
    """auto: CT-RATE's folders with a metadata CSV, or none of them; CT-RATE's folder names without a CSV could
    be either and say so. A flag only the other layout uses is one line, before anything is written."""
    src = tmp_path / "mixed"
    (src / "train").mkdir(parents=True)
    one = next(iter(sorted(phantom_src.glob("train_fixed/**/*.nii.gz"))))
    shutil.copy(one, src / "train")
    cases = [([f"--src={src}"], "cannot tell its layout"),
             ([f"--src={phantom_src}", "--split=test"], "--split=test is for a plain folder"),
             ([f"--src={src}", "--layout=plain", "--hu=csv"], "--hu=csv needs CT-RATE's files"),
             ([f"--src={src}", "--layout=plain", f"--rex={tmp_path}"], "--rex needs CT-RATE's files"),
             ([f"--src={src / 'train'}", "--layout=ctrate"], "no volumes found under train_fixed/"),
             ([f"--src={tmp_path / 'nowhere'}"], "no volumes found: no such folder")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            prepare.main(args + [f"--out={tmp_path / 'out'}", "--size=40", "--z_mm=4", "--workers=1"])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code), (args, e.value.code)
        assert not (tmp_path / "out" / ".staging").exists()
    manifest = prepare.prepare(cfg_for(src, tmp_path / "out", layout="plain"), progress=False)  # told: it is plain
    assert manifest["splits"]["train"]["volumes"] == 1 and manifest["split"] == "train"  # --split's default


# -----------------------------------------------------------------------------
# Faults (issue 20): a reject fixed after the run, Ctrl-C while the scripts import torch

def dataset_bytes(root):
    return {f"{s}/{fn}": (root / s / fn).read_bytes() for s in SPLITS for fn in sorted(prepare.OWN_FILES)}


@pytest.mark.parametrize("keep_staging", [False, True])
def test_a_reject_fixed_after_the_run_is_taken_up_by_the_same_command(phantom_src, prepared, tmp_path, monkeypatch,
                                                                      capsys, keep_staging):
    """A volume rejected in a finished run (a truncated download) used to stay out until `rm -r OUT`: now
    rejects.csv keeps each rejected file's size and mtime, and once the file changes the same command prepares
    again, giving what a fresh run on the intact source gives, byte for byte (with --keep_staging it reads only
    the changed volume). A file still broken is rejected again, one removed changes nothing."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(phantom_src, src)
    name = open_split(prepared, "train").names[1]
    path, cfg = image_path(src, name), cfg_for(src, out, keep_staging=keep_staging)
    intact = open(path, "rb").read()
    open(path, "wb").write(intact[: len(intact) // 2])
    prepare.prepare(cfg, progress=False)
    assert set(read_rejects(out)) == {name}
    open(path, "wb").write(intact[: len(intact) // 3])  # a fix that failed: rejected again
    capsys.readouterr()
    prepare.prepare(cfg, progress=False)
    assert "changed since rejected" in capsys.readouterr().out and set(read_rejects(out)) == {name}
    prepare.prepare(cfg, progress=False)
    assert "nothing to do" in capsys.readouterr().out
    os.remove(path)  # a source removed after preparing: the dataset stays as it is
    prepare.prepare(cfg, progress=False)
    assert "nothing to do" in capsys.readouterr().out and (out / "manifest.json").exists()
    open(path, "wb").write(intact)
    redone = record_work(monkeypatch)
    prepare.prepare(cfg, progress=False)
    assert "changed since rejected; preparing again" in capsys.readouterr().out
    n_all = sum(len(open_split(prepared, s)) for s in SPLITS)
    assert redone == [name] if keep_staging else (name in redone and len(redone) == n_all)
    assert read_rejects(out) == {} and dataset_bytes(out) == dataset_bytes(prepared)
    redone.clear()
    prepare.prepare(cfg, progress=False)
    assert "nothing to do" in capsys.readouterr().out and redone == []


SLOW_TORCH = "import os, time\nopen(os.environ['SHIM_READY'], 'w').close()\ntime.sleep(60)\n"


@pytest.mark.parametrize("script", ["prepare.py", "train.py", "probe.py", "export.py"])
def test_ctrl_c_while_importing_torch_is_one_line(tmp_path, script):
    """Ctrl-C in the seconds torch takes to import: one line and status 130 (128 + SIGINT), no traceback. A
    stand-in torch on the path says when the import has begun, then waits to be interrupted."""
    (tmp_path / "shim" / "torch").mkdir(parents=True)
    (tmp_path / "shim" / "torch" / "__init__.py").write_text(SLOW_TORCH)
    ready = tmp_path / "ready"
    env = run_env(PYTHONPATH=f"{tmp_path / 'shim'}{os.pathsep}{ROOT}", SHIM_READY=str(ready))
    p = subprocess.Popen([sys.executable, str(ROOT / script)], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not ready.exists() and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.02)
    assert ready.exists(), p.communicate()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "interrupted" in err, err
