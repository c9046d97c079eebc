"""ctrate.py: what the writer puts down, the reader finds; NIfTI reading matches nibabel."""
import gzip
import os
import shutil

import nibabel as nib
import numpy as np

import ctrate
from common import LABELS


def test_writer_and_reader_agree(tmp_path):
    """Volumes written by ctrate (image, anatomy, findings, CSVs, dataset.json) are found by ctrate.scan
    with their rows and masks; an original under {split}/ still finds its map under {split}_fixed/."""
    root = str(tmp_path)
    image, anatomy = np.zeros((4, 4, 3), np.int16), np.zeros((4, 4, 3), np.uint8)
    mask = np.zeros((4, 4, 3), bool)
    mask[1, 1, 1] = True
    names = {"train": ["train_1_a_1", "train_1_a_2", "train_2_a_1"], "valid": ["valid_3_b_1"]}
    findings = {"Lung nodule": (mask, "a nodule"), "Lymphadenopathy": (mask, "no category: no mask")}
    rex = {"train": [ctrate.write_volume(root, "train_1_a_1", image, (1.0, 2.0), False, anatomy, findings)],
           "valid": []}
    ctrate.write_volume(root, "train_1_a_2", image, (1.0, 2.0), True, anatomy=anatomy)
    ctrate.write_volume(root, "train_2_a_1", image, (1.0, 2.0), True)
    ctrate.write_volume(root, "valid_3_b_1", image, (1.0, 2.0), False, anatomy=anatomy)
    shutil.move(os.path.join(root, "valid_fixed"), os.path.join(root, "valid"))  # an original copy
    for split, vols in names.items():
        ctrate.write_tables(root, split, [[n + ".nii.gz", "X", "S", 4, 4, 3, "[1.0, 1.0]", 2.0, 1, -1024]
                                          for n in vols], [[n + ".nii.gz"] + [0] * len(LABELS) for n in vols])
    ctrate.write_rex(root, rex)
    volumes, rejects = ctrate.scan(root, ctrate.rex_folder(root))
    assert rejects == []
    by_name = {v["name"]: v for v in volumes}
    assert sorted(by_name) == sorted(names["train"] + names["valid"])
    assert by_name["valid_3_b_1"]["path"].startswith(os.path.join(root, "valid", ""))
    assert by_name["valid_3_b_1"]["anat"] == ctrate.anatomy_path(root, "valid", ctrate.volume_path("valid_3_b_1"))
    assert [by_name[n]["anat"] is not None for n in names["train"]] == [True, True, False]
    first = by_name["train_1_a_1"]
    assert first["patient"] == "train_1" and first["meta"]["ZSpacing"] == "2.0"
    assert first["rex"] == {"name": "train_1_a_1.nii.gz", "findings": {"0": "a nodule"}, "categories": {"0": "2a"}}
    img, _ = ctrate.load_nifti(first["path"], "image")
    assert (img.dataobj.inter, img.header.get_zooms()) == (-1024.0, (1.0, 1.0, 2.0)) and img.affine[2, 2] > 0
    assert by_name["train_1_a_2"]["rex"] is None and by_name["train_1_a_2"]["rex_path"] is None
    assert np.array_equal(ctrate.read_findings(first["rex_path"], first["rex"], image.shape)[0], mask)
    assert ctrate.label_values(first["labels"], first["path"]) == [0] * len(LABELS)


def test_load_nifti_matches_nibabel(tmp_path):
    """ctrate gunzips in one call and views the voxels in place; it must read what nib.load reads:
    little and big endian, .nii and .nii.gz, NIfTI-2, a gzip file of several members, 4-D."""
    a = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) * 37 - 300
    cases = {"le.nii.gz": nib.Nifti1Image(a, np.eye(4)), "be.nii.gz": nib.Nifti1Image(a.astype(">i2"), np.eye(4)),
             "plain.nii": nib.Nifti1Image(a, np.eye(4)), "two.nii.gz": nib.Nifti2Image(a, np.diag([2, 2, 3, 1])),
             "four_d.nii.gz": nib.Nifti1Image(np.stack([a, -a]).astype(np.uint8), np.eye(4))}
    for name, img in cases.items():
        nib.save(img, tmp_path / name)
    blob = cases["le.nii.gz"].to_bytes()
    with open(tmp_path / "members.nii.gz", "wb") as f:  # two gzip members, as bgzip or `cat a.gz b.gz` write
        f.write(gzip.compress(blob[:500]) + gzip.compress(blob[500:]))
    for name in list(cases) + ["members.nii.gz"]:
        ref = nib.load(tmp_path / name)
        img, raw = ctrate.load_nifti(str(tmp_path / name), "image")
        assert raw.dtype == ref.get_data_dtype() and np.array_equal(raw, np.asanyarray(ref.dataobj.get_unscaled()))
        assert np.array_equal(img.affine, ref.affine), name
