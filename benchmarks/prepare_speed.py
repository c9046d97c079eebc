"""
How close prepare.py runs to the floor set by decompressing the NIfTI files.

    python benchmarks/prepare_speed.py [--volumes=200 --size=128 --slices=96 --out_size=256]

Writes a phantom dataset, then in one run, for 1 and 2 worker processes: times a bare
nibabel load of every file prepare.py reads (images, anatomy and abnormality masks), and
times prepare.py on the same files. Prints volumes/s and the ratio prepare / bare load
(goal: at most 1.5). prepare.py decompresses each file in one zlib call, which is faster than
nibabel's streamed read, so the script also times that alone ("gunzip"): the true floor, and
the ratio to it ("vs gunzip").
"""
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import ctrate  # noqa: E402
import prepare  # noqa: E402
from common import at_least, parse_config, setting  # noqa: E402
from phantom import write_phantom  # noqa: E402


@dataclass
class Bench:
    volumes: int = setting(200, at_least(1))   # about this many phantom volumes (~1.3 per patient)
    size: int = setting(128, at_least(16))     # the phantom's in-plane pixels
    slices: int = setting(96, at_least(4))     # the phantom's typical slice count
    out_size: int = setting(256, at_least(16))  # prepare.py --size


def load(path):
    import nibabel as nib
    return np.asanyarray(nib.load(path).dataobj.get_unscaled()).size


def gunzip(path):
    with open(path, "rb") as f:
        return len(ctrate.gunzip(f.read()))


def timed(fn, files, workers):
    t0 = time.perf_counter()
    if workers == 1:
        list(map(fn, files))
    else:
        with get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(fn, files, chunksize=4))
    return time.perf_counter() - t0


def files_read(src):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs if f.endswith(".nii.gz"))


def main(argv):
    opts = parse_config(Bench, argv, "prepare_speed.py")
    tmp = tempfile.mkdtemp(prefix="prepare_speed_")
    try:
        src = os.path.join(tmp, "src")
        n_pat = max(2, int(opts.volumes / 1.3))
        write_phantom(src, train_patients=n_pat * 4 // 5, valid_patients=n_pat - n_pat * 4 // 5,
                      size=opts.size, slices=opts.slices, seed=0, workers=2)
        files = files_read(src)
        n_vol = sum(1 for f in files if "ts_seg" not in f and "rexgroundingct" not in f)
        print(f"{n_vol} volumes, {len(files)} NIfTI files, {sum(map(os.path.getsize, files)) / 2**20:.1f} MiB "
              f"compressed; in-plane {opts.size} px, ~{opts.slices} slices; output size {opts.out_size}")
        print(f"{'workers':>7} {'bare load s':>12} {'gunzip s':>9} {'prepare s':>10} {'vol/s':>7} {'ratio':>6} "
              f"{'vs gunzip':>9}")
        for workers in (1, 2):
            t_load = timed(load, files, workers)
            t_gunzip = timed(gunzip, files, workers)
            out = os.path.join(tmp, f"out{workers}")
            cfg = prepare.Config(src=src, out=out, z_mm=1.0, size=opts.out_size, workers=workers)
            t0 = time.perf_counter()
            prepare.prepare(cfg, progress=False)
            t_prep = time.perf_counter() - t0
            print(f"{workers:>7} {t_load:>12.2f} {t_gunzip:>9.2f} {t_prep:>10.2f} {n_vol / t_prep:>7.1f} "
                  f"{t_prep / t_load:>6.2f} {t_prep / t_gunzip:>9.2f}", flush=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1:])
