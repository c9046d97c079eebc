"""
prepare.py: a CT-RATE-shaped folder (or your own NIfTI scans) -> memory-mapped slices, masks, labels and an index.

The first stage of DALE-CT (arXiv 2606.07775): CT-RATE's volumes (or phantom.py's), read through
ctrate.py, in Hounsfield units and one orientation, cropped to the body, resampled to `z_mm` between
slices and `size` pixels a side, each split as a few raw arrays that training samples from at random:

    OUT/manifest.json              written last: a folder without it is not a dataset
    OUT/{split}/slices.i16         int16 HU                       (S, size, size)
    OUT/{split}/anatomy.u8         TotalSegmentator label          (S, mask_size, mask_size)
    OUT/{split}/abnormal.u16       14-bit ReXGroundingCT bitmask  (S, mask_size, mask_size)
    OUT/{split}/depth.f32          mm from the first slice, 0..1  (S, 2)
    OUT/{split}/volumes.json       one row per volume: where its slices are, labels, flags
    OUT/rejects.csv                every volume left out, why, and its file's size and mtime (section 3)

Splits: `train` and `val` (held-out train *patients*) come from CT-RATE `train`, `test` is CT-RATE `valid`;
a plain folder of NIfTI files goes whole into `--split`, without labels or masks (ctrate.py). A volume's slices
are contiguous, the first the most superior. The reader `open_split` comes first.

    python prepare.py --src=data/phantom --out=data/prepared
    python prepare.py --src=/data/CT-RATE/dataset --out=/data/dalect_512 --size=512 --workers=16
    python prepare.py --src=/data/my_scans --out=/data/my_scans_prepared --split=test    # *.nii.gz, no CSVs
A crash or Ctrl-C loses at most the volumes in flight: the same command continues, and the
manifest is written only when every volume is done (section 2).
"""
import csv
import fcntl
import json
import os
import shutil
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends in one line, not a traceback
    import numpy as np
    import torch
except KeyboardInterrupt:  # 130 = 128 + SIGINT, the status a shell gives a Ctrl-C
    print("prepare.py: interrupted while starting up", file=sys.stderr)
    sys.exit(130)
import torch.nn.functional as F

import ctrate
from common import (ABNORMALITY_CODES, LABELS, N_ANATOMY, NONEMPTY, NONNEG, POSITIVE, SPLITS, SettingError, at_least,
                    atomic_write_text, describe, in_processes, one_of, parse_config, remove_owned, setting, validate)
from ctrate import LAYOUTS, Reject, load_nifti, natural_key

# -----------------------------------------------------------------------------
# The format: a split is four arrays of S slices each, plus its table (RECIPE.md 2)

FORMAT_VERSION = 1
ARRAYS = {"slices": ("slices.i16", np.int16), "anatomy": ("anatomy.u8", np.uint8),
          "abnormal": ("abnormal.u16", np.uint16), "depth": ("depth.f32", np.float32)}
OWN_FILES = {fn for fn, _ in ARRAYS.values()} | {"volumes.json"}  # what a split folder may hold
# Intensity normalisation: clip, then z-score with CT-RATE foreground statistics (RECIPE.md 2).
HU_CLIP = (-997.0, 888.0)
HU_MEAN, HU_STD = -142.39, 360.97


def array_shapes(size, mask_size):
    """Per-slice shape of each array of a split."""
    return {"slices": (size, size), "anatomy": (mask_size, mask_size), "abnormal": (mask_size, mask_size),
            "depth": (2,)}


def slice_nbytes(cfg):
    """Bytes of one slice in each array."""
    shapes = array_shapes(cfg.size, cfg.mask_size)
    return {k: int(np.prod(shapes[k])) * np.dtype(dt).itemsize for k, (_, dt) in ARRAYS.items()}


def normalize_hu(x):
    """HU (any dtype tensor) -> float32 network input (RECIPE.md 2)."""
    return (x.float().clamp(*HU_CLIP) - HU_MEAN) / HU_STD


def read_json(path):
    with open(path) as f:
        return json.load(f)


class PreparedError(Exception):
    """A prepared folder that cannot be read; the message says why and what to do."""


class PreparedSplit:
    """One split of a prepared folder, memory-mapped: nothing is loaded until indexed."""

    def __init__(self, root, split):
        path = os.path.join(root, "manifest.json")
        if not os.path.exists(path):
            raise PreparedError(f"{root}: no manifest.json, so not a finished prepared dataset "
                                f"(run `python prepare.py --out={root}`, or let an interrupted run finish)")
        self.manifest = manifest = read_json(path)
        if manifest.get("format") != "dale-ct-prepared" or manifest.get("version") != FORMAT_VERSION:
            raise PreparedError(f"{path}: format {manifest.get('format')} v{manifest.get('version')}, this code "
                                f"reads dale-ct-prepared v{FORMAT_VERSION}; prepare the data again")
        if split not in manifest["splits"]:
            raise PreparedError(f"{root}: no split {split!r}; it has {list(manifest['splits'])}")
        d = os.path.join(root, split)
        S = manifest["splits"][split]["slices"]
        shapes = array_shapes(manifest["size"], manifest["mask_size"])
        try:
            rows = read_json(os.path.join(d, "volumes.json"))
            for k, (fn, dt) in ARRAYS.items():  # np.memmap cannot map zero bytes: an empty split has one row
                setattr(self, k, np.memmap(os.path.join(d, fn), dt, "r", shape=(max(S, 1), *shapes[k]))[:S])
        except (OSError, ValueError) as e:  # a missing folder or file, a truncated array
            raise PreparedError(f"{d}: damaged split ({getattr(e, 'filename', None) or e}): missing or truncated; "
                                f"prepare the data again into a new --out") from None
        self.split, self.rows = split, rows
        self.depth_mm, self.depth_pos = self.depth[:, 0], self.depth[:, 1]
        self.names = [r["name"] for r in rows]
        self.patients = [r["patient"] for r in rows]
        for k, dt in (("start", np.int64), ("count", np.int64), ("z_mm", np.float32), ("mm_per_px", np.float32),
                      ("has_anatomy", bool), ("has_abnormality", bool)):  # per-volume columns of the table
            setattr(self, k, np.array([r[k] for r in rows], dt))
        self.has_labels = manifest.get("has_labels", True)  # False: a plain folder's scans, whose labels are None
        self.labels = (np.array([r["labels"] for r in rows], np.float32).reshape(len(rows), len(LABELS))
                       if self.has_labels else None)  # (V, 18)

    def __len__(self):
        return len(self.rows)

    def volume(self, i):
        return slice(int(self.start[i]), int(self.start[i] + self.count[i]))


def open_split(root, split):
    return PreparedSplit(root, split)


# -----------------------------------------------------------------------------
# Configuration

HU_SOURCES = ("auto", "header", "csv")


@dataclass
class Config:
    src: str = setting("data/phantom", NONEMPTY)   # CT-RATE-shaped folder (the real one or phantom.py's) or your scans
    layout: str = setting("auto", one_of(*LAYOUTS))  # SRC is: ctrate, plain (NIfTI files, no labels), auto = detect
    split: str = setting("", one_of("", *SPLITS))   # plain layout: the split of every volume ("" = train)
    out: str = setting("data/prepared", NONEMPTY)  # where the prepared dataset goes
    z_mm: float = setting(1.0, POSITIVE)     # slice spacing after resampling; DALE-CT uses 1 mm (RECIPE.md 2)
    size: int = setting(256, at_least(16))   # stored in-plane pixels a side, at least one ViT patch (RECIPE.md 4)
    mask_size: int = setting(128, at_least(1))  # stored mask pixels a side; DALE-CT keeps 128 (RECIPE.md 2)
    rex: str = ""                            # ReXGroundingCT (dataset.json, segmentations/); "" = SRC/rexgroundingct
    val_patients: int = setting(1000, NONNEG)   # train patients held out as `val`, at most a fifth (RECIPE.md 2)
    seed: int = setting(0, NONNEG)           # seed of the patient split
    hu: str = setting("auto", one_of(*HU_SOURCES))  # HU scaling from: auto (the header if it has one, else the CSV)
    workers: int = setting(2, at_least(1))   # processes reading volumes
    strict: bool = False                     # any rejected volume is fatal
    keep_staging: bool = False               # keep OUT/.staging after success (debugging)
    pretrain_only: bool = False              # val and test may come out empty (a dataset for train.py only)

    def problems(self):
        src, out = os.path.realpath(self.src), os.path.realpath(self.out)
        if src == out or src.startswith(out + os.sep) or out.startswith(src + os.sep):  # OUT/train would be SRC's
            yield (f"--out={self.out} and --src={self.src} overlap (one holds the other); prepare writes and replaces "
                   f"OUT/train, OUT/val, OUT/test: pick an --out outside the source folder")


# -----------------------------------------------------------------------------
# 1. One volume: NIfTI -> HU, orientation, body crop, resampling, masks

BODY_HU = -500.0      # body = HU above this (RECIPE.md 7)
BODY_OPEN_MM = 19.0   # opening window: RECIPE.md 7's 25 px at CT-RATE's typical 0.75 mm
# A chest CT always holds air (trachea, lungs, and outside the body in a full field of view): once in HU,
# its darkest 1% of voxels lies here. A wrong intercept moves them by 1,024 (README: the HU check).
AIR_RANGE = (-1150.0, -700.0)


def hu_scaling(img, raw, job, how):
    """(slope, intercept, source) that turn the stored values into HU. The header decides
    (RECIPE.md 2), the air check verifies. Works on the raw array: the volume is converted to
    float only inside the body box, later."""
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    # no CSV row (a plain folder): the header is all there is, so auto reads it, scaled or not
    source = how if how != "auto" else ("header" if (slope, inter) != (1.0, 0.0) or job["meta"] is None else "csv")
    if source == "csv":
        slope, inter = ctrate.csv_rescale(job["meta"], job["path"])
    if not slope > 0:
        raise Reject(f"{job['path']}: rescale slope {slope:g} from the {source}; expected a positive number")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # integers cannot be NaN
        raise Reject(f"{job['path']}: NaN or inf voxels; the file is damaged: download it again")
    coarse = raw[::4, ::4, ::4]  # 1/64 of the voxels: enough to tell almost any volume from a constant one
    if coarse.min() == coarse.max() and raw.min() == raw.max():
        raise Reject(f"{job['path']}: constant volume (every voxel {raw.flat[0]:g}); not an image")
    # Verify on the darkest voxels, whatever the field of view. A constant fill outside the scanner's
    # circular field of view (e.g. -3024) is left out: noisy air is never one value repeated that often.
    sample = raw[::4, ::4, ::2].ravel()  # (X, Y, Z): 1/32 of the voxels
    lo = sample.min()
    if (sample == lo).mean() > 0.005:
        sample = sample[sample != lo]
    air = float(np.percentile(sample, 1)) * slope + inter if sample.size else float("nan")
    if not AIR_RANGE[0] <= air <= AIR_RANGE[1]:
        raise Reject(f"{job['path']}: HU check failed: its darkest 1% at {air:.0f} HU after scaling from the {source} "
                     f"(slope {slope:g}, intercept {inter:g}); a chest CT's air and lungs lie in "
                     f"{AIR_RANGE[0]:.0f}..{AIR_RANGE[1]:.0f}: the intercept is wrong or applied twice")
    return slope, inter, source


def square_window(m, k, op):
    """op (np.logical_and: erosion, np.logical_or: dilation) over the k x k square centred on each
    pixel of each slice of bool m (D, h, w), False outside: one axis at a time, in-place ops on
    shifted views."""
    for axis in (1, 2):
        n = m.shape[axis]
        padded = np.pad(m, [(k // 2, k // 2) if a == axis else (0, 0) for a in range(m.ndim)])
        m = padded[(slice(None),) * axis + (slice(0, n),)].copy()  # the input of the next axis
        for i in range(1, k):
            op(m, padded[(slice(None),) * axis + (slice(i, i + n),)], out=m)
    return m


erode = partial(square_window, op=np.logical_and)
dilate = partial(square_window, op=np.logical_or)


def body_box(vol, px_mm, body_threshold, path):
    """One square box (y0, x0, side) around the body over all slices (RECIPE.md 7); the body is
    vol > body_threshold (BODY_HU in the units of vol). A per-slice opening removes the table and
    cables, on a ~4 mm grid; dilation commutes with a union, so only the erosion runs on every slice."""
    stride = max(1, int(4.0 / px_mm))
    m = vol[:, ::stride, ::stride] > body_threshold  # (D, h, w)
    k = max(1, round(BODY_OPEN_MM / (px_mm * stride))) | 1  # odd window ...
    k = min(k, max(1, min(m.shape[1:]) // 4) | 1)  # ... that a small crop of the body survives
    opened = dilate(erode(m, k).any(0, keepdims=True), k)[0]  # union of per-slice openings  (h, w)
    ys, xs = np.nonzero(opened)
    if len(ys) == 0:
        raise Reject(f"{path}: no body found: no region above -500 HU survives the opening; is this a CT volume?")
    y0, y1 = ys.min() * stride, (ys.max() + 1) * stride
    x0, x1 = xs.min() * stride, (xs.max() + 1) * stride
    side = max(y1 - y0, x1 - x0)
    return int(y0 + y1 - side) // 2, int(x0 + x1 - side) // 2, int(side)


def crop_hu(vol, y0, x0, side, slope, inter):
    """float32 HU of vol[:, y0:y0+side, x0:x0+side], air (-1024) where the box leaves the image."""
    D, H, W = vol.shape
    out = np.empty((D, side, side), dtype=np.float32)
    sy, sx = max(0, -y0), max(0, -x0)
    ey, ex = min(side, H - y0), min(side, W - x0)
    if (sy, sx, ey, ex) != (0, 0, side, side):
        out.fill(-1024.0)
    inside = out[:, sy:ey, sx:ex]
    np.multiply(vol[:, y0 + sy:y0 + ey, x0 + sx:x0 + ex], np.float32(slope), out=inside)  # int -> float32 once
    inside += np.float32(inter)
    return out  # (D, side, side)


def slice_count(depth, z_src, z_mm):
    """Slices after resampling `depth` slices `z_src` mm apart to `z_mm`. The header alone gives it,
    so every volume's place in the output is known before any voxel is read (section 2)."""
    return max(1, round(depth * z_src / z_mm))


def z_positions(depth, z_src, z_mm):
    """Fractional source indices of the resampled slices (centres aligned)."""
    n = slice_count(depth, z_src, z_mm)
    return np.clip((np.arange(n) + 0.5) * z_mm / z_src - 0.5, 0, depth - 1)


def resample_volume(vol, zpos, size):
    """(D, s, s) HU -> (n, size, size) int16: antialiased bilinear in-plane, linear in z."""
    x = torch.from_numpy(vol)[:, None]
    if vol.shape[1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x[:, 0]  # (D, size, size)
    i0 = np.floor(zpos).astype(np.int64)
    i1 = np.minimum(i0 + 1, vol.shape[0] - 1)
    out = x.index_select(0, torch.from_numpy(i0))  # the slice below each position, a copy  (n, size, size)
    if (zpos > i0).any():  # interpolate; not needed when z_src == z_mm (every position is a source slice)
        w_z = torch.from_numpy((zpos - i0).astype(np.float32))[:, None, None]
        out.lerp_(x.index_select(0, torch.from_numpy(i1)), w_z)  # in place
    return out.round_().clamp_(-32768, 32767).to(torch.int16).numpy()


def resample_mask(arr, flip_z, box, zpos, size):
    """Label map(s) in NIfTI order (..., X, Y, Z) -> (..., n, size, size) on the grid of the slices:
    the same orientation, box and z positions, by nearest neighbour (labels must not blend).
    One np.take per axis on the reversed view (Z, Y, X, ...), which is C-contiguous for NIfTI's
    Fortran layout: the y gather copies whole rows and shrinks the data before the element-wise
    x gather; z goes last, as it often grows the data (upsampling). Nothing of the source's size
    is copied."""
    X, Y, Z = arr.shape[-3:]
    y0, x0, side = box
    zi = np.round(zpos).astype(np.int64)
    zi = Z - 1 - zi if flip_z else zi  # (n,)
    grid = ((np.arange(size) + 0.5) * side / size).astype(np.int64)
    yi, xi = y0 + grid, x0 + grid  # (size,) each; may leave the image where the box was padded
    zyx = arr.T  # (Z, Y, X, ...)
    out = zyx.take(np.clip(yi, 0, Y - 1), 1).take(np.clip(xi, 0, X - 1), 2).take(zi, 0)  # (n, size, size, ...)
    outside = ((yi < 0) | (yi >= Y))[:, None] | ((xi < 0) | (xi >= X))[None, :]  # (size, size)
    out[:, outside] = 0
    return np.moveaxis(out, (0, 1, 2), (-3, -2, -1))  # (..., n, size, size)


def process_volume(job, cfg):
    """One CT-RATE volume -> dict of arrays and its table row. Raises Reject."""
    img, raw = load_nifti(job["path"], "image")
    if raw.ndim != 3:
        raise Reject(f"{job['path']}: array is {raw.ndim}-D {raw.shape}, expected a 3-D (X, Y, Z) volume")
    slope, inter, hu_source = hu_scaling(img, raw, job, cfg.hu)
    px_mm, z_src, flip_z, z_dir = ctrate.geometry(img, job)
    labels = ctrate.label_values(job["labels"], job["path"])
    vol = raw.T[::-1] if flip_z else raw.T  # NIfTI (X, Y, Z) -> (D, Y, X) stored values, slice 0 most superior
    box = body_box(vol, px_mm, (BODY_HU - inter) / slope, job["path"])
    y0, x0, side = box
    zpos = z_positions(vol.shape[0], z_src, cfg.z_mm)
    slices = resample_volume(crop_hu(vol, y0, x0, side, slope, inter), zpos, cfg.size)  # (n, size, size)
    n, m = len(zpos), cfg.mask_size
    anatomy = np.zeros((n, m, m), np.uint8)
    if job["anat"]:
        a = ctrate.read_anatomy(job["anat"], raw.shape)
        anatomy = resample_mask(a, flip_z, box, zpos, m).astype(np.uint8, copy=False)
    abnormal = np.zeros((n, m, m), np.uint16)  # bit c: a ReXGroundingCT finding of category c
    entry = job["rex"]
    if entry and entry.get("categories"):
        r = ctrate.read_findings(job["rex_path"], entry, raw.shape)
        small = resample_mask(r, flip_z, box, zpos, m) > 0  # (F, n, m, m)
        for f, code in entry["categories"].items():
            bit = np.uint16(1 << ABNORMALITY_CODES.index(code))
            np.bitwise_or(abnormal, bit, out=abnormal, where=small[int(f)])  # in place, no temporaries
    depth_mm = np.arange(n, dtype=np.float32) * cfg.z_mm
    depth = np.stack([depth_mm, depth_mm / max(depth_mm[-1], 1e-6)], 1).astype(np.float32)  # (n, 2)
    row = dict(name=job["name"], patient=job["patient"], split=job["split"], count=n, z_mm=cfg.z_mm,
               mm_per_px=side * px_mm / cfg.size, labels=labels, has_anatomy=job["anat"] is not None,
               has_abnormality=entry is not None, hu_source=hu_source, src_spacing=[px_mm, z_src],
               src_shape=list(raw.shape), flip_z=bool(flip_z), z_direction=z_dir, box=[int(y0), int(x0), int(side)])
    return dict(slices=slices, anatomy=anatomy, abnormal=abnormal, depth=depth, row=row)


# -----------------------------------------------------------------------------
# 2. The resumable writer: each volume goes straight into its rows of its split's arrays
#
# A volume's slice count follows from its header alone (slice_count), so before any voxel is read
# every volume gets its rows, a "slot", in staged arrays OUT/.staging/{split}.slices.i16 etc., in
# name order. A worker fills its slot, then atomically drops OUT/.staging/done/NAME.json, its table
# row: a marker means a whole slot, so a re-run redoes only the volumes without one. A volume
# rejected on the way leaves its slot empty, a hole that assembly closes.

def discover(cfg, kind):
    """The source folder's volumes as jobs, each with its split, and the rejects found without opening a file."""
    if kind == "plain":
        return ctrate.scan_plain(cfg.src, cfg.split or "train")
    jobs, rejects = ctrate.scan(cfg.src, cfg.rex or ctrate.rex_folder(cfg.src))
    ctrate.assign_splits(jobs, cfg.val_patients, cfg.seed)
    return jobs, rejects


def human(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def planned_count(job, cfg):
    """Output slices from header and CSV alone, as process_volume counts them; 0 where ctrate.geometry() refuses."""
    import nibabel as nib
    try:
        img = nib.load(job["path"])  # the header only; voxels are read when indexed
        return slice_count(img.shape[2], ctrate.geometry(img, job)[1], cfg.z_mm)
    except Exception:
        return 0


def plan_slots(jobs, cfg):
    """Give each job its slot (job["start"], job["count"]: rows of its split's arrays), volumes in
    name order. Returns the layout {split: [[name, start, count], ...]}."""
    layout = {split: [] for split in SPLITS}
    for job in sorted(jobs, key=lambda j: natural_key(j["name"])):
        slots = layout[job["split"]]
        job["start"] = slots[-1][1] + slots[-1][2] if slots else 0
        job["count"] = planned_count(job, cfg)
        slots.append([job["name"], job["start"], job["count"]])
    return layout


def staged_array(stage, split, k):
    return os.path.join(stage, f"{split}.{ARRAYS[k][0]}")


def done_path(stage, name):
    return os.path.join(stage, "done", name + ".json")


def open_staging(stage, layout):
    """Make OUT/.staging hold `layout`. A resumed run with the same layout keeps its finished
    volumes; another layout (the source folder changed since) makes it start over."""
    layout_path = os.path.join(stage, "layout.json")
    if os.path.exists(layout_path):
        if read_json(layout_path) == layout:
            return
        print(f"{stage}: the source folder changed since the interrupted run; starting over")
    shutil.rmtree(os.path.join(stage, "done"), ignore_errors=True)  # markers first: none may outlive its slot
    for path in [staged_array(stage, split, k) for split in SPLITS for k in ARRAYS]:
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.join(stage, "done"))
    atomic_write_text(layout_path, json.dumps(layout))


def create_staged_arrays(stage, layout, cfg):
    """Each split's arrays at their full planned size, unless a resumed run made them already."""
    nbytes = slice_nbytes(cfg)
    for split, slots in layout.items():
        total = sum(count for _, _, count in slots)
        for k in ARRAYS:
            path = staged_array(stage, split, k)
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    # np.memmap cannot map zero bytes: an empty split still gets one row (the manifest says 0)
                    f.truncate(max(total, 1) * nbytes[k])  # sparse: disk is used as slots are written


def write_slot(stage, job, arrays):
    """One volume's arrays -> its rows of the staged split arrays."""
    for k, (_, dt) in ARRAYS.items():
        a = np.ascontiguousarray(arrays[k], dt)  # (count, ...)
        with open(staged_array(stage, job["split"], k), "r+b") as f:
            f.seek(job["start"] * (a.nbytes // len(a)))
            f.write(a.data)


def work(args):
    """Worker: prepare one volume into its slot. Returns (name, path, None) or (name, path, reason)."""
    job, cfg, stage = args
    torch.set_num_threads(1)
    try:
        out = process_volume(job, cfg)
        if out["row"]["count"] != job["count"]:  # both come from ctrate.geometry() and slice_count(): a bug if not
            raise Reject(f"{job['path']}: {out['row']['count']} slices, but {job['count']} planned from its header")
    except Reject as e:
        return job["name"], job["path"], str(e)
    except MemoryError:
        return job["name"], job["path"], "out of memory while preparing it; use fewer --workers"
    except Exception as e:  # one odd file must not stop a 50,000-volume run: reject it, say what happened
        return job["name"], job["path"], f"unexpected {type(e).__name__} while preparing it: {e}"
    write_slot(stage, job, out)
    atomic_write_text(done_path(stage, job["name"]), json.dumps(out["row"]))  # last: a marker means a whole slot
    return job["name"], job["path"], None


# -----------------------------------------------------------------------------
# 3. Assembly: staged arrays -> OUT/{split}/, manifest last

def assemble(cfg, stage, layout, rows, params):
    """The staged arrays become the splits; `rows` holds the finished volumes' table rows by name.
    A split whose slots are all filled is linked into place; one with holes (volumes rejected after
    their slot was planned) is copied slot by slot, closing them. The staging is only read, so an
    interruption here loses nothing: the next run assembles again."""
    counts, nbytes = {}, slice_nbytes(cfg)
    shapes = array_shapes(cfg.size, cfg.mask_size)
    for split, slots in layout.items():  # in SPLITS order (plan_slots)
        placed, total = [], 0  # (name, staged start, final start, count) of each finished volume, in order
        for name, start, count in slots:
            if name in rows:
                placed.append((name, start, total, count))
                total += count
        tmp_dir = os.path.join(cfg.out, split + ".tmp")
        remove_owned(tmp_dir, OWN_FILES)
        os.makedirs(tmp_dir)
        holes = len(placed) < len(slots)
        need, free = total * sum(nbytes.values()), shutil.disk_usage(cfg.out).free
        if holes and need > 0.95 * free:
            raise SystemExit(f"{cfg.out}: not enough disk to close the gaps of rejected volumes in {split}: "
                             f"need {human(need)}, {human(free)} free. Free space and run the same command "
                             f"again: finished volumes are kept")
        for k, (fn, dt) in ARRAYS.items():
            src, dst = staged_array(stage, split, k), os.path.join(tmp_dir, fn)
            if not holes:
                try:  # no copy and no disk; the staged file is never written again, so linking it is safe
                    os.link(src, dst)
                except OSError:  # a file system without hard links
                    shutil.copyfile(src, dst)
                continue
            staged = np.memmap(src, dt, "r", shape=(os.path.getsize(src) // nbytes[k], *shapes[k]))
            final = np.memmap(dst, dt, "w+", shape=(max(total, 1), *shapes[k]))
            for _, start, at, count in placed:  # the final rows are the staged ones, gaps closed
                final[at:at + count] = staged[start:start + count]
            final.flush()
            del staged, final
        table = [dict(rows[name], start=at) for name, _, at, _ in placed]
        with open(os.path.join(tmp_dir, "volumes.json"), "w") as f:
            json.dump(table, f)
        final_dir = os.path.join(cfg.out, split)
        remove_owned(final_dir, OWN_FILES)
        os.replace(tmp_dir, final_dir)
        counts[split] = dict(volumes=len(table), slices=total, patients=len({r["patient"] for r in table}))
    manifest = dict(format="dale-ct-prepared", **params, labels=LABELS,
                    abnormality_codes=ABNORMALITY_CODES, n_anatomy=N_ANATOMY, splits=counts,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_text(os.path.join(cfg.out, "manifest.json"), json.dumps(manifest, indent=1))  # last: now a dataset
    return manifest


def check_settings(cfg, params):
    """Refuse to mix settings: OUT must be empty, hold the same finished dataset (returned), or an
    interrupted run with the same settings (None: go on)."""
    manifest_path = os.path.join(cfg.out, "manifest.json")
    if os.path.exists(manifest_path):
        old = read_json(manifest_path)
        if all(old.get(k) == v for k, v in params.items()) and old.get("layout") == params.get("layout"):
            if not (changed := changed_rejects(cfg.out)):
                print(f"{cfg.out}: already prepared with these settings ({manifest_path}); nothing to do")
                return old
            print(f"{cfg.out}: {changed[0]}{f' and {len(changed) - 1} more' if changed[1:] else ''} changed since "
                  f"rejected; preparing again (the old dataset stays readable until the new one is assembled)")
            return None
        raise SystemExit(f"{cfg.out} holds a dataset prepared with other settings; choose another --out "
                         f"or delete that folder")


def file_stamp(path):
    """[bytes, mtime_ns] of a file as rejects.csv stores them; ["", ""] for a missing one."""
    st = os.stat(path) if os.path.exists(path) else None
    return [str(st.st_size), str(st.st_mtime_ns)] if st else ["", ""]


def changed_rejects(out):
    """Source files of OUT/rejects.csv's volumes changed since (restored, fixed): a finished dataset is made
    again for them. One removed is not (a source deleted after preparing must not shrink the dataset), nor is
    any of a rejects.csv without stamps (older code)."""
    path = os.path.join(out, "rejects.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r["path"] for r in csv.DictReader(f) if r.get("bytes") is not None and os.path.exists(r["path"])
                and file_stamp(r["path"]) != [r["bytes"], r["mtime_ns"]]]


def claim_staging(stage, params):
    """OUT/.staging for these settings: an interrupted run's with the same settings goes on; one with
    other settings that finished no volume (a typo in --src, say) is replaced; any other is refused."""
    params_path, done = os.path.join(stage, "params.json"), os.path.join(stage, "done")
    if os.path.exists(params_path) and read_json(params_path) != params:
        if os.path.isdir(done) and os.listdir(done):
            raise SystemExit(f"{stage} holds an interrupted run with other settings; rerun with those "
                             f"settings to finish it, or delete {stage}")
        shutil.rmtree(stage)  # ours, and holds no finished volume
    os.makedirs(stage, exist_ok=True)
    if not os.path.exists(params_path):
        atomic_write_text(params_path, json.dumps(params))


def prepare(cfg, progress=True):
    """The whole stage, one run at a time on an --out (a second run refuses). Returns the manifest (dict)."""
    try:  # a Config made in code has not passed the command line's checks
        validate(cfg, "prepare.py")
    except SettingError as e:
        raise SystemExit(str(e)) from None
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, ".lock"), "w") as lock:  # released when the run ends, however it ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{cfg.out}: another prepare.py is writing there; wait for it, or pick another --out")
        return prepare_locked(cfg, progress)


def prepare_locked(cfg, progress):
    """prepare() once it holds OUT/.lock."""
    from tqdm import tqdm
    kind = ctrate.source_layout(cfg)  # "ctrate" or "plain"
    params = dict(src=os.path.abspath(cfg.src), z_mm=cfg.z_mm, size=cfg.size, mask_size=cfg.mask_size,
                  hu=cfg.hu, rex=os.path.abspath(cfg.rex) if cfg.rex else "", val_patients=cfg.val_patients,
                  seed=cfg.seed, version=FORMAT_VERSION)
    if kind == "plain":  # in the manifest too: probe.py refuses a dataset without labels
        params.update(layout="plain", split=cfg.split or "train", has_labels=False)
    if finished := check_settings(cfg, params):
        return finished
    stage = os.path.join(cfg.out, ".staging")
    jobs, rejects = discover(cfg, kind)  # before anything is staged: a wrong --src leaves nothing in the way
    claim_staging(stage, params)
    layout = plan_slots(jobs, cfg)
    open_staging(stage, layout)
    done = {j["name"] for j in jobs if os.path.exists(done_path(stage, j["name"]))}
    todo = [j for j in jobs if j["name"] not in done]
    # Disk: volumes are written in place and linked into the splits, so the output is all it takes.
    per_slice = sum(slice_nbytes(cfg).values())
    need_final = sum(j["count"] for j in jobs) * per_slice
    need_now = sum(j["count"] for j in todo) * per_slice  # the finished volumes are on disk already
    free = shutil.disk_usage(cfg.out).free
    print(f"{len(jobs)} volumes ({len(done)} already done, {len(rejects)} rejected up front); "
          f"estimated output {human(need_final)}, {human(need_now)} of it still to write; free {human(free)}")
    if need_now > 0.95 * free:
        raise SystemExit(f"{cfg.out}: not enough disk: need about {human(need_now)}, "
                         f"{human(free)} free. Free space, pick another --out, or lower --size")
    if rejects and cfg.strict:
        name, path, reason = rejects[0]
        raise SystemExit(f"rejected {name}: {reason} (--strict)")

    create_staged_arrays(stage, layout, cfg)
    args = [(j, cfg, stage) for j in todo]
    bar = tqdm(total=len(todo), unit="vol", disable=not progress, desc="prepare")
    results = in_processes(work, args, cfg.workers)
    try:
        for name, path, reason in results:
            bar.update()
            if reason:
                rejects.append((name, path, reason))
                if progress:
                    tqdm.write(f"rejected {name}: {reason}")
                if cfg.strict:
                    raise SystemExit(f"rejected {name}: {reason} (--strict)")
    finally:
        bar.close()
        results.close()  # an interrupt or --strict stops the workers now
    rows = {j["name"]: read_json(done_path(stage, j["name"])) for j in jobs
            if os.path.exists(done_path(stage, j["name"]))}
    if os.path.exists(os.path.join(cfg.out, "manifest.json")):  # made again: not a dataset once rejects.csv changes
        os.remove(os.path.join(cfg.out, "manifest.json"))
    with open(os.path.join(cfg.out, "rejects.csv"), "w", newline="") as f:  # a source's stamp tells a re-run it changed
        csv.writer(f).writerows([["name", "path", "reason", "bytes", "mtime_ns"]]
                                + [[*r, *file_stamp(r[1])] for r in sorted(rejects)])
    needed = [params.get("split", "train")] if cfg.pretrain_only or kind == "plain" else SPLITS
    empty = [s for s in needed if not any(name in rows for name, _, _ in layout[s])]
    if empty:  # finished volumes stay staged: the same command continues once the cause is fixed
        raise SystemExit(f"{cfg.out}: split {', '.join(empty)} would hold no volume ({len(rejects)} rejected, see "
                         f"rejects.csv); add volumes or fix the rejects (--pretrain_only: only train needs volumes)")
    manifest = assemble(cfg, stage, layout, rows, params)
    if not cfg.keep_staging:
        shutil.rmtree(stage)
    s = manifest["splits"]
    print("prepared " + ", ".join(f"{k} {v['volumes']} volumes / {v['slices']} slices" for k, v in s.items())
          + f"; rejected {len(rejects)}" + (f" (see {os.path.join(cfg.out, 'rejects.csv')})" if rejects else ""))
    return manifest


def main(argv):
    cfg = parse_config(Config, argv, "prepare.py")
    print(describe(cfg))
    t0 = time.time()
    try:
        prepare(cfg, progress=sys.stderr.isatty())
    except OSError as e:  # a read-only --out, a disk that filled up: finished volumes stay staged
        raise SystemExit(f"{e.filename or cfg.out}: {e.strerror or e}; fix it (free space, a writable --out) and "
                         f"run the same command again to continue") from None
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("interrupted: finished volumes are staged; run the same command again to continue")
    except BrokenProcessPool:
        sys.exit("a worker process died (out of memory?): finished volumes are staged; run the same command "
                 "again with fewer --workers")
