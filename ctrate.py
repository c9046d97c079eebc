"""
ctrate.py: the CT-RATE layout: file names and folders, the CSVs, the ReXGroundingCT dataset.json,
NIfTI reading and writing. phantom.py writes this layout and prepare.py reads it, both through the
functions here, so that where a file lives is written down once (RECIPE.md 2):

    {split}_fixed/{split}_{p}/{split}_{p}_{s}/{split}_{p}_{s}_{r}.nii.gz   volumes; originals under {split}/
    metadata/{train,validation}_metadata.csv                               spacing and rescale, a row a volume
    multi_abnormality_labels/{train,valid}_predicted_labels.csv            the 18 binary labels
    ts_seg/ts_total/{split}_fixed/{p folder}/{s folder}/{name}.nii.gz      TotalSegmentator "total" label map
    rexgroundingct/dataset.json, rexgroundingct/segmentations/{name}.nii.gz   ReXGroundingCT finding masks

split is CT-RATE's `train` or `valid`; p, s and r number the patient, the scan (a, b, ...) and the
reconstruction. Volumes are NIfTI arrays in (X, Y, Z) order. A "plain" folder, your own scans, is only
NIfTI files (anywhere below it): names from the files, HU and spacing from the headers, no labels or masks.
"""
import csv
import gzip
import json
import os
import re
import zlib

import numpy as np

from common import ABNORMALITY_CODES, LABELS, N_ANATOMY

SPLITS = ("train", "valid")
NAME_RE = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")
META_COLUMNS = ["VolumeName", "Manufacturer", "SeriesDescription", "Rows", "Columns", "NumberofSlices",
                "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"]
META_NEEDED = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"]
# ReXGroundingCT's category of each CT-RATE label it grounds; three labels have none (RECIPE.md 2).
CATEGORY = {
    "Arterial wall calcification": "1a", "Coronary artery wall calcification": "1a",
    "Cardiomegaly": "1b", "Pericardial effusion": "1c", "Hiatal hernia": "1d",
    "Emphysema": "1e", "Atelectasis": "1f", "Lung nodule": "2a", "Lung opacity": "2b",
    "Pulmonary fibrotic sequela": "2c", "Pleural effusion": "2d",
    "Peribronchial thickening": "2e", "Consolidation": "2f", "Bronchiectasis": "2g",
    "Interlobular septal thickening": "2h",
}
# The top-level folders of a layout: a writer that replaces one removes them all.
FOLDERS = ["train_fixed", "valid_fixed", "metadata", "multi_abnormality_labels", "ts_seg", "rexgroundingct"]


class Reject(Exception):
    """A volume that cannot be used; the message says what is wrong and what to do."""


# -----------------------------------------------------------------------------
# Names and paths: one function per pattern, for the writer and the reader alike

def strip_ext(name):
    return re.sub(r"\.nii(\.gz)?$", "", os.path.basename(name.strip()))


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def volume_path(name):
    """Where volume `name` sits inside its split's image folder."""
    split, p, scan, _ = NAME_RE.match(name).groups()
    return os.path.join(f"{split}_{p}", f"{split}_{p}_{scan}", name + ".nii.gz")


def image_folders(root, split):
    """The image folders a split may have, the `_fixed` copies first (RECIPE.md 2)."""
    return [os.path.join(root, f"{split}_fixed"), os.path.join(root, split)]


def anatomy_path(root, split, rel):
    """The TotalSegmentator map of the image at `rel` inside an image folder: under {split}_fixed/
    whichever copy of the images is read (RECIPE.md 2)."""
    return os.path.join(root, "ts_seg", "ts_total", f"{split}_fixed", rel)


def rex_folder(root):
    return os.path.join(root, "rexgroundingct")


def rex_mask_path(rex_dir, name):
    return os.path.join(rex_dir, "segmentations", name + ".nii.gz")


def meta_csv(split):
    """Relative path of a split's metadata CSV; CT-RATE spells `valid` out here (RECIPE.md 2)."""
    return f"metadata/{'validation' if split == 'valid' else split}_metadata.csv"


def labels_csv(split):
    return f"multi_abnormality_labels/{split}_predicted_labels.csv"


# -----------------------------------------------------------------------------
# Reading: the CSVs, dataset.json, and which volumes a folder holds

def read_csv_rows(path, required):
    """{VolumeName without extension: [rows]} of a CSV and its columns, after checking them."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: missing. A CT-RATE folder has metadata/ and multi_abnormality_labels/ CSVs; "
                         f"check --src.")
    with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not a column
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise SystemExit(f"{path}: missing column(s) {missing}; it has {cols}. Is this a CT-RATE CSV?")
        rows = {}
        for row in reader:
            rows.setdefault(strip_ext(row["VolumeName"]), []).append(row)
    return rows, cols


def read_labels(path):
    rows, cols = read_csv_rows(path, ["VolumeName"] + LABELS)
    unknown = [c for c in cols if c not in LABELS and c != "VolumeName"]
    if unknown:  # a renamed or extra class would silently shift meaning: refuse the file
        raise SystemExit(f"{path}: unknown label column(s) {unknown}. Expected VolumeName and the 18 CT-RATE "
                         f"columns {LABELS}; fix the header or drop the extra columns.")
    return rows


def label_values(row, path):
    """The 18 labels of a labels-CSV row as ints; None for a volume without one (a plain folder's)."""
    if row is None:
        return None
    labels = []
    for c in LABELS:
        v = row[c].strip()
        if v not in ("0", "1", "0.0", "1.0"):
            raise Reject(f"{path}: label {c!r} is {v!r}, expected 0 or 1; fix its row in the labels CSV")
        labels.append(int(float(v)))
    return labels


def parse_numbers(text):
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text))]


def csv_spacing(row):
    """(in-plane, z) mm of a metadata row, or None where its text is unusable; XYSpacing is text such
    as "[0.75, 0.75]" (RECIPE.md 2). None for a volume without a row (a plain folder's)."""
    if row is None:
        return None
    xy, z = parse_numbers(row["XYSpacing"]), parse_numbers(row["ZSpacing"])
    return (xy[0], z[0]) if len(xy) >= 1 and len(z) == 1 and min(xy + z) > 0 else None


def csv_rescale(row, path):
    """(slope, intercept) of a metadata row."""
    try:
        return float(row["RescaleSlope"]), float(row["RescaleIntercept"])
    except ValueError:
        raise Reject(f"{path}: RescaleSlope/RescaleIntercept in the metadata CSV are not numbers")


def read_rex(rex_dir):
    """ReXGroundingCT index {name: entry}. dataset.json is a list of entries or a dict of lists (per split)."""
    path = os.path.join(rex_dir, "dataset.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        entries = [e for v in data.values() for e in v] if isinstance(data, dict) else list(data)
    except (ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a ReXGroundingCT index ({e}); restore it, or point --rex at the right one")
    index = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise SystemExit(f"{path}: entry {i} has no 'name' (the CT-RATE VolumeName); fix or remove that entry")
        name = strip_ext(e["name"])
        if name in index:
            raise SystemExit(f"{path}: volume {name} appears twice; keep one entry per scan.")
        for code in e.get("categories", {}).values():
            if code not in ABNORMALITY_CODES:
                raise SystemExit(f"{path}: {name} has unknown category {code!r}; known: {ABNORMALITY_CODES}")
        index[name] = e
    return index


def find_images(folder):
    """{name: [paths]} of the NIfTI files anywhere under folder."""
    found = {}
    for root, _, files in os.walk(folder):
        for fn in files:
            if fn.endswith((".nii.gz", ".nii")):
                found.setdefault(strip_ext(fn), []).append(os.path.join(root, fn))
    return found


def scan(src, rex_dir):
    """Every usable volume of a CT-RATE folder as a dict (name, patient, src_split, path, its meta and
    labels CSV rows, anat: its anatomy map or None, rex and rex_path: its dataset.json entry and mask
    or None), and the others as (name, path, reason), found without opening a volume."""
    rex = read_rex(rex_dir)
    volumes, rejects = [], []
    for split in SPLITS:
        folder = next((d for d in image_folders(src, split) if os.path.isdir(d)), None)
        if folder is None:
            continue
        meta = read_csv_rows(os.path.join(src, meta_csv(split)), META_NEEDED)[0]
        labels = read_labels(os.path.join(src, labels_csv(split)))
        found = find_images(folder)
        for name in sorted(found, key=natural_key):
            paths = found[name]
            m = NAME_RE.match(name)
            n_meta, n_labels = len(meta.get(name, [])), len(labels.get(name, []))
            reason = None
            if len(paths) > 1:
                reason = f"duplicate volume name: found at {paths}; keep one copy"
            elif not m or m.group(1) != split:
                reason = f"name {name!r} is not {split}_<patient>_<scan>_<recon>; rename it as CT-RATE does"
            elif n_meta != 1:
                reason = f"{n_meta} rows for it in {meta_csv(split)} (need exactly one); add or deduplicate its row"
            elif n_labels != 1:
                reason = f"{n_labels} rows for it in {labels_csv(split)} (need exactly one); add or deduplicate its row"
            if reason:
                rejects.append((name, paths[0], reason))
                continue
            anat = anatomy_path(src, split, os.path.relpath(paths[0], folder))
            entry = rex.get(name)
            volumes.append(dict(name=name, patient=f"{split}_{m.group(2)}", src_split=split, path=paths[0],
                                meta=meta[name][0], labels=labels[name][0],
                                anat=anat if os.path.exists(anat) else None, rex=entry,
                                rex_path=rex_mask_path(rex_dir, name) if entry else None))
    if not volumes and not rejects:
        raise SystemExit(f"{src}: no volumes found under train_fixed/, valid_fixed/, train/ or valid/. "
                         f"Point --src at a CT-RATE folder, or run `python phantom.py` first.")
    return volumes, rejects


def assign_splits(jobs, val_patients, seed):
    """Our splits, by patient (RECIPE.md 2): CT-RATE valid -> test; a seeded random set of CT-RATE train
    patients, at most a fifth, -> val; the rest -> train."""
    train_patients = sorted({j["patient"] for j in jobs if j["src_split"] == "train"}, key=natural_key)
    n_val = min(val_patients, len(train_patients) // 5)
    val = set(np.random.default_rng(seed).permutation(train_patients)[:n_val].tolist())
    for j in jobs:
        j["split"] = "test" if j["src_split"] == "valid" else ("val" if j["patient"] in val else "train")


# -----------------------------------------------------------------------------
# A plain folder: your own scans, NIfTI files and nothing else (no CSVs, labels or masks)

LAYOUTS = ("auto", "ctrate", "plain")
MARKS = ["train_fixed", "valid_fixed", "train", "valid", "metadata", "multi_abnormality_labels"]


def source_layout(cfg):
    """prepare.py's --layout, or for auto: "ctrate" where --src has CT-RATE's folders and a metadata CSV, "plain"
    where it has none of those folders, one line where it cannot tell. Refuses the other layout's flags."""
    marks = [d for d in MARKS if os.path.isdir(os.path.join(cfg.src, d))]
    if cfg.layout == "auto" and marks and not any(os.path.isfile(os.path.join(cfg.src, meta_csv(s))) for s in SPLITS):
        raise SystemExit(f"{cfg.src}: cannot tell its layout: it has CT-RATE's {marks[0]}/ but no metadata CSV; "
                         f"pass --layout=plain (its NIfTI files, no labels), or restore metadata/")
    kind = cfg.layout if cfg.layout != "auto" else ("ctrate" if marks else "plain")
    if kind == "ctrate" and cfg.split:
        raise SystemExit(f"--split={cfg.split} is for a plain folder; {cfg.src} has CT-RATE's layout, whose splits "
                         f"come from CT-RATE's train/valid and --val_patients: drop --split, or pass --layout=plain")
    if kind == "plain" and (cfg.hu == "csv" or cfg.rex):
        raise SystemExit(f"{'--hu=csv' if cfg.hu == 'csv' else '--rex'} needs CT-RATE's files, and {cfg.src} is a "
                         f"plain folder (HU and spacing from the headers): drop it, or pass --layout=ctrate")
    return kind


def scan_plain(src, split):
    """Every NIfTI file anywhere under src as a volume of `split` named by its file, with no CSV row, labels or
    masks: its header alone gives HU and spacing. A CT-RATE name gives its patient, any other name is a patient
    of its own. Two files of one name are a reject naming both."""
    found = find_images(src)
    if not found:
        raise SystemExit(f"{src}: no volumes found: " + ("no .nii or .nii.gz file in it or below, nor CT-RATE's "
                         "folders" if os.path.isdir(src) else "no such folder") + ". Point --src at a folder of "
                         "volumes (or CT-RATE's), or run `python phantom.py` first.")
    volumes, rejects = [], []
    for name in sorted(found, key=natural_key):
        paths = sorted(found[name])
        if len(paths) > 1:
            rejects.append((name, paths[0], f"duplicate volume name: {' and '.join(paths)} are both {name}; "
                                            f"rename or remove one"))
            continue
        m = NAME_RE.match(name)
        volumes.append(dict(name=name, patient=f"{m.group(1)}_{m.group(2)}" if m else name, src_split=None,
                            split=split, path=paths[0], meta=None, labels=None, anat=None, rex=None, rex_path=None))
    return volumes, rejects


# -----------------------------------------------------------------------------
# Geometry: the header's, or the CSV row's where the header has none (RECIPE.md 2)

SPACING_TOL = 0.02  # header and CSV spacing may differ by 2% before we call it a disagreement
# Plausible CT geometry, wide enough for downsampled copies (the phantom's 64 px); README: bad inputs
SPACING_MM, FOV_MM, LENGTH_MM = (0.05, 30.0), (50.0, 1000.0), 2500.0


def geometry(img, job):
    """In-plane and z spacing in mm, whether array index z runs toward the head, and where that came from."""
    aff = img.affine
    header_known = not np.allclose(aff[:3, :3], np.eye(3))  # CT-RATE originals: identity = no spacing
    listed = csv_spacing(job["meta"])
    if header_known:
        xy, z = float(img.header.get_zooms()[0]), float(img.header.get_zooms()[2])
        if listed and (abs(xy - listed[0]) > SPACING_TOL * xy or abs(z - listed[1]) > SPACING_TOL * z):
            raise Reject(f"{job['path']}: spacing disagreement: header says {xy:g} x {z:g} mm, metadata CSV says "
                         f"{listed[0]:g} x {listed[1]:g} mm; fix whichever is wrong")
    elif listed:
        xy, z = listed
    elif job["meta"] is None:  # a plain folder: the header is all there is
        raise Reject(f"{job['path']}: no spacing: identity affine and no metadata CSV; write the spacing into "
                     f"its header")
    else:
        raise Reject(f"{job['path']}: no spacing: identity affine and XYSpacing/ZSpacing "
                     f"{job['meta']['XYSpacing']!r}/{job['meta']['ZSpacing']!r} unusable; fill the CSV")
    fov, length = xy * img.shape[0], z * img.shape[2]
    if not (SPACING_MM[0] <= min(xy, z) and max(xy, z) <= SPACING_MM[1] and FOV_MM[0] <= fov <= FOV_MM[1]
            and length <= LENGTH_MM):
        raise Reject(f"{job['path']}: implausible spacing {xy:g} x {z:g} mm ({fov:g} mm across, {length:g} mm long); "
                     f"CT spacing lies in {SPACING_MM[0]:g}-{SPACING_MM[1]:g} mm: fix XYSpacing/ZSpacing or the header")
    # The slice axis is array axis 2 (CT-RATE). Its world z component > 0 means index up = superior
    # (RAS); we flip such volumes so that slice 0 is always the most superior one. An identity affine
    # carries no direction: we then assume the same (index up = superior) and say so in the table.
    return xy, z, aff[2, 2] > 0, "affine" if header_known else "assumed"


# -----------------------------------------------------------------------------
# NIfTI

def gunzip(blob):
    """The whole .gz in one call, where nibabel streams it through the gzip module in 8 KiB pieces.
    zlib checks the gzip CRC and length; a file of several gzip members (bgzip), of which zlib
    reads only the first, goes the slow way."""
    z = zlib.decompressobj(wbits=31)  # 31 = 16 + 15: deflate inside a gzip header and trailer
    data = z.decompress(blob)
    if not z.eof:
        raise EOFError("compressed stream ends early")
    return gzip.decompress(blob) if z.unused_data.strip(b"\0") else data


def load_nifti(path, what):
    """(image, stored voxels) of a NIfTI file. nibabel parses the header (offset, dtype and byte
    order, shape, scaling); the voxels are a read-only view of the decompressed bytes, not a copy."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError
    try:
        with open(path, "rb") as f:
            data = f.read()
        data = gunzip(data) if path.endswith(".gz") else data
        klass = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(data[:540]) else nib.Nifti1Image
        img = klass.from_bytes(data)
        proxy = img.dataobj
        raw = np.frombuffer(data, proxy.dtype, int(np.prod(proxy.shape)), proxy.offset)
        raw = raw.reshape(proxy.shape, order=proxy.order)  # NIfTI order (X, Y, Z, ...), Fortran layout
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError, HeaderDataError, WrapStructError) as e:
        raise Reject(f"cannot read {what} {path} ({type(e).__name__}: {e}); the file is truncated or corrupt: "
                     f"download it again")
    return img, raw


def read_anatomy(path, shape):
    """A TotalSegmentator "total" map, checked against its image's shape and the 118 labels."""
    _, a = load_nifti(path, "anatomy mask")
    if a.shape != shape:
        raise Reject(f"{path}: anatomy mask shape {a.shape} does not match its image {shape}; "
                     f"regenerate the TotalSegmentator mask for this volume")
    if a.min() < 0 or a.max() >= N_ANATOMY:
        raise Reject(f"{path}: label values {a.min()}..{a.max()} outside TotalSegmentator total's 0..117")
    return a


def read_findings(path, entry, shape):
    """A ReXGroundingCT mask as (F, X, Y, Z), checked against its image's shape and its dataset.json entry."""
    if not os.path.exists(path):
        raise Reject(f"{path}: dataset.json lists findings for {strip_ext(entry['name'])} but the mask file is "
                     f"missing; restore it or drop the entry")
    _, r = load_nifti(path, "abnormality mask")
    r = r[None] if r.ndim == 3 else r  # a single finding may come as (X, Y, Z) (RECIPE.md 2)
    if r.ndim != 4 or r.shape[1:] != shape:
        raise Reject(f"{path}: abnormality mask shape {r.shape} does not match its image {shape} "
                     f"(expected (findings, X, Y, Z))")
    for f in entry["categories"]:
        if int(f) >= r.shape[0]:
            raise Reject(f"{path}: finding {f} listed in dataset.json but the mask has {r.shape[0]} channel(s)")
    return r


def save_nifti(path, array, affine, inter=None):
    """NIfTI-1, gzipped with a zero timestamp so that the same data gives the
    same bytes. inter=None leaves scl_slope/scl_inter unset (NaN: no scaling)."""
    import nibabel as nib
    img = nib.Nifti1Image(array, affine)
    if inter is not None:
        img.header.set_slope_inter(1.0, inter)
    data = bytearray(img.to_bytes())
    if inter is None:   # nibabel writes (1, 0) for unscaled ints; CT-RATE's originals leave them unset
        data[112:120] = np.array([np.nan, np.nan], "<f4").tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(bytes(data), compresslevel=1, mtime=0))


# -----------------------------------------------------------------------------
# Writing a folder in the layout

def write_volume(root, name, image, spacing, original, anatomy=None, findings=None):
    """One volume's files: the image (X, Y, Z) with an original's header (identity affine, no scaling)
    or a `_fixed` one (spacing (xy, z) mm in the affine, z index toward the head, scl_inter -1024) as in
    RECIPE.md 2; the anatomy map unless None; unless findings ({label: (mask, text)}) is None, the masks
    of the labels that have a ReXGroundingCT category. Returns the dataset.json entry (or None)."""
    xy, dz = spacing
    if original:
        affine, inter = np.eye(4), None
    else:
        affine = np.diag([-xy, -xy, dz, 1.0])
        affine[:3, 3] = (xy * (image.shape[0] - 1) / 2, xy * (image.shape[1] - 1) / 2, 0.0)
        inter = -1024.0
    split, rel = NAME_RE.match(name).group(1), volume_path(name)
    save_nifti(os.path.join(image_folders(root, split)[0], rel), image, affine, inter)
    if anatomy is not None:
        save_nifti(anatomy_path(root, split, rel), anatomy, affine)
    if findings is None:
        return None
    labels = [k for k in LABELS if k in findings and k in CATEGORY]
    if labels:  # one finding is stored as (X, Y, Z), several as (F, X, Y, Z) (RECIPE.md 2)
        masks = np.stack([findings[k][0] for k in labels]).astype(np.uint8)
        save_nifti(rex_mask_path(rex_folder(root), name), masks[0] if len(labels) == 1 else masks, affine)
    return {"name": name + ".nii.gz", "findings": {str(i): findings[k][1] for i, k in enumerate(labels)},
            "categories": {str(i): CATEGORY[k] for i, k in enumerate(labels)}}


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_tables(root, split, meta_rows, label_rows):
    """A split's metadata CSV (META_COLUMNS) and labels CSV (VolumeName, then LABELS)."""
    write_csv(os.path.join(root, meta_csv(split)), META_COLUMNS, meta_rows)
    write_csv(os.path.join(root, labels_csv(split)), ["VolumeName"] + LABELS, label_rows)


def write_rex(root, entries):
    """rexgroundingct/dataset.json: {split: [entry, ...]}."""
    os.makedirs(rex_folder(root), exist_ok=True)
    with open(os.path.join(rex_folder(root), "dataset.json"), "w") as f:
        json.dump(entries, f, indent=1)
