"""
export.py: a frozen backbone's features of a prepared dataset, as files numpy and pandas read without this code.

Every slice goes through the ViT once, by the very function probe.py uses (probe.extract_features), and its CLS
token streams to disk; a volume's features are the mean and the max over its slices. For any backbone probe.py
reads (a train.py checkpoint, released weights, or an untrained one) and any prepared dataset, your own scans
included (prepare.py's plain layout). Per split, in the split's order (row i of a .npy = row i of its .csv):

    OUT/{split}_slices.npy         float32 (S, D)  each slice's CLS token
    OUT/{split}_slices.csv         a row a slice: volume, slice (its index in the volume), depth_mm, depth_pos
    OUT/{split}_volumes_mean.npy   float32 (V, D)  mean over each volume's slices
    OUT/{split}_volumes_max.npy    float32 (V, D)  max over them
    OUT/{split}_volumes.csv        a row a volume: name, patient, first_slice, count, and its 18 labels if any
    OUT/export.json                config, backbone and data identity, img_size, normalisation, counts

    python export.py --ckpt=out/phantom/ckpt.pt --img_size=64 --data=data/prepared --out=out/features
    python export.py --random_init --seed=0 --img_size=64 --splits=test     # the untrained floor

    X = np.load("out/features/test_volumes_mean.npy"); meta = pd.read_csv("out/features/test_volumes.csv")
"""
import csv
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

try:  # torch takes seconds to import (probe.py's first): a Ctrl-C meanwhile ends in one line, not a traceback
    import numpy as np

    import probe
except KeyboardInterrupt:  # 130 = 128 + SIGINT, the status a shell gives a Ctrl-C
    print("export.py: interrupted while starting up", file=sys.stderr)
    sys.exit(130)
from common import (LABELS, NONEMPTY, NONNEG, POSITIVE, SPLITS, Check, at_least, atomic_write_text, describe,
                    device_name, one_of, parse_config, pick_device, remove_owned, setting, write_output_folder)
from model import PATCH, VIT_SIZES
from prepare import PreparedError, open_split

# What export.py writes into OUT, and so what it may replace there (with the .tmp of a write in progress)
SPLIT_FILES = ("slices.npy", "slices.csv", "volumes_mean.npy", "volumes_max.npy", "volumes.csv")
OWN_FILES = {name + tmp for tmp in ("", ".tmp")
             for name in ["export.json"] + [f"{s}_{f}" for s in SPLITS for f in SPLIT_FILES]}

# -----------------------------------------------------------------------------
# Configuration: the backbone settings are probe.py's, with the same names, and go to probe.load_model


@dataclass
class ExportConfig:
    # the backbone, as probe.py takes it
    ckpt: str = ""                # train.py checkpoint (.pt) or released weights (.safetensors, timm keys)
    random_init: bool = False     # an untrained backbone instead, drawn from --seed
    vit: str = setting("tiny", one_of(*VIT_SIZES))  # backbone size when the checkpoint does not record one
    layerscale_init: float = setting(1e-5, POSITIVE)  # random_init only: LayerScale's starting gain
    seed: int = setting(0, NONNEG)                  # random_init only: the seed of its weights
    img_size: int = setting(256, at_least(PATCH))   # slices resized to this for the backbone (RECIPE.md 7)
    # the backbone's intensity normalisation of HU: a probe.NORMS name, or lo,hi,mean,std (clip, then z-score)
    norm: str = setting("dale_ct", Check(probe.valid_norm, f"one of {', '.join(probe.NORMS)}, or lo,hi,mean,std"))
    # data and output
    data: str = setting("data/prepared", NONEMPTY)  # folder written by prepare.py
    splits: tuple = setting((), one_of(*SPLITS))    # comma-separated; empty = every split that has volumes
    out: str = setting("out/features", NONEMPTY)    # the files above go here
    feat_batch: int = setting(64, at_least(1))      # slices per forward pass
    device: str = setting("auto", NONEMPTY)         # auto = cuda when available, else cpu

    def problems(self):
        if self.img_size % PATCH:
            yield f"--img_size={self.img_size}: must be a multiple of the patch size {PATCH}"
        if bool(self.ckpt) == self.random_init:
            yield "give exactly one of --ckpt=PATH (a checkpoint) or --random_init (an untrained backbone)"
        elif self.ckpt and not os.path.isfile(self.ckpt):
            yield f"--ckpt={self.ckpt}: no such file; give a train.py checkpoint or released weights"


def probe_config(cfg):
    """The probe.ProbeConfig that load_model reads: our values for the settings both scripts have."""
    ours = {f.name for f in fields(ExportConfig)}
    return probe.ProbeConfig(**{f.name: getattr(cfg, f.name) for f in fields(probe.ProbeConfig) if f.name in ours})


# -----------------------------------------------------------------------------
# Writing: every file goes to NAME.tmp, then is renamed, so a file in OUT is complete or absent


@contextmanager
def replacing(path, mode="w"):
    """A file opened as PATH.tmp, renamed to PATH when the block ends without an error."""
    with open(path + ".tmp", mode, newline=None if "b" in mode else "") as f:  # csv wants newline=""
        yield f
    os.replace(path + ".tmp", path)


def claim_out(out):
    """OUT for this export: missing, empty, or an earlier export's (its export.json and files, nothing else),
    which is cleared. Any other content stops the run before any work: nothing here deletes a file it did not
    write (common.remove_owned)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    if names and "export.json" not in names:
        sys.exit(f"export.py: --out={out} holds files export.py did not write ({', '.join(sorted(names)[:3])}); "
                 f"pick a new or empty folder")
    remove_owned(out, OWN_FILES)


def pool_volumes(feats, ds):
    """(S, D) slice features, read back volume by volume -> mean and max over each volume's slices, (V, D) each."""
    V, D = len(ds), feats.shape[1]
    mean, top = np.empty((V, D), np.float32), np.empty((V, D), np.float32)
    for i in range(V):
        x = feats[ds.volume(i)]                          # (count, D)
        mean[i], top[i] = x.mean(0, dtype=np.float64), x.max(0)  # float64 sum: a long volume loses nothing
    return mean, top


def export_split(ds, vit, cfg, device, norm):
    """One split's five files. The (S, D) slice features stream from the ViT into the .npy on disk
    (np.lib.format.open_memmap writes the header, then rows as they come): never whole in memory."""
    path = lambda name: os.path.join(cfg.out, f"{ds.split}_{name}")  # noqa: E731
    S, D = len(ds.slices), vit.embed_dim
    feats = np.lib.format.open_memmap(path("slices.npy.tmp"), "w+", np.float32, (S, D))
    t = time.time()
    probe.extract_features(vit, ds.slices, cfg.img_size, cfg.feat_batch, device, out=feats,
                           desc=f"export {ds.split}", norm=norm)
    seconds = time.time() - t
    print(f"{ds.split}: {S} slices of {len(ds)} volumes in {seconds:.1f} s ({S / max(seconds, 1e-9):.0f} slices/s)")
    feats.flush()
    mean, top = pool_volumes(feats, ds)
    del feats
    os.replace(path("slices.npy.tmp"), path("slices.npy"))
    for name, arr in (("volumes_mean.npy", mean), ("volumes_max.npy", top)):
        with replacing(path(name), "wb") as f:
            np.save(f, arr)
    with replacing(path("slices.csv")) as f:
        w = csv.writer(f)
        w.writerow(["volume", "slice", "depth_mm", "depth_pos"])
        for i, name in enumerate(ds.names):
            v = ds.volume(i)
            w.writerows([name, k, f"{mm:.7g}", f"{pos:.7g}"]
                        for k, (mm, pos) in enumerate(zip(ds.depth_mm[v].tolist(), ds.depth_pos[v].tolist())))
    with replacing(path("volumes.csv")) as f:
        w = csv.writer(f)
        w.writerow(["name", "patient", "first_slice", "count"] + (LABELS if ds.has_labels else []))
        for i, name in enumerate(ds.names):
            labels = [int(x) for x in ds.labels[i]] if ds.has_labels else []
            w.writerow([name, ds.patients[i], int(ds.start[i]), int(ds.count[i])] + labels)
    return {"volumes": len(ds), "slices": S, "dim": D, "seconds": round(seconds, 1)}


# -----------------------------------------------------------------------------
# The script, top to bottom

def main(argv=None):
    cfg = parse_config(ExportConfig, sys.argv[1:] if argv is None else argv, "export.py")
    print(describe(cfg))
    t0 = time.time()
    try:
        ds = {s: open_split(cfg.data, s) for s in SPLITS}
    except PreparedError as e:
        sys.exit(f"export.py: {e}")
    splits = list(cfg.splits) or [s for s in SPLITS if len(ds[s])]
    if empty := [s for s in splits if not len(ds[s])]:
        sys.exit(f"export.py: --splits: {cfg.data} has no volumes in {', '.join(empty)}; leave --splits empty "
                 f"for every split that has some")
    claim_out(cfg.out)  # before the backbone is read: a wrong --out costs nothing
    vit, backbone = probe.load_model(probe_config(cfg))
    device, norm = pick_device(cfg.device), probe.norm_values(cfg.norm)
    info = {"config": asdict(cfg), "backbone": backbone, "img_size": cfg.img_size, "feature": "CLS token",
            "normalisation": dict(zip(("clip_lo", "clip_hi", "mean", "std"), norm)),
            "data": {"root": os.path.abspath(cfg.data), "identity": probe.data_identity(cfg.data),
                     "manifest": ds["train"].manifest, "has_labels": ds["train"].has_labels},
            "device": device_name(device), "finished": False}
    need = sum(4 * vit.embed_dim * (len(ds[s].slices) + 2 * len(ds[s])) for s in splits)  # the .npy files
    write_output_folder(cfg.out, "--out", {"export.json": json.dumps(info, indent=1)}, need)  # ours from now on
    counts = {s: export_split(ds[s], vit, cfg, device, norm) for s in splits}
    info.update(finished=True, splits=counts, time_s=round(time.time() - t0, 1))
    atomic_write_text(os.path.join(cfg.out, "export.json"), json.dumps(info, indent=1))
    done = ", ".join(f"{s} ({c['volumes']} volumes, {c['slices']} slices)" for s, c in counts.items())
    print(f"wrote {done} to {cfg.out}/ in {time.time() - t0:.1f} s")
    return info


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("export.py: interrupted; run the same command again (it starts over)")
