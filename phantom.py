"""
phantom.py: a small synthetic chest-CT dataset in exactly the CT-RATE layout (ctrate.py).

Everything in this project runs on it with no download: the CPU demo pretrains a tiny ViT on it,
and the frozen MIL probe has to find its 18 abnormalities. It is also the test data. It is not
CT-RATE: it is a drawing, made of ellipses, tubes and blobs, that has the same files, the same
header quirks and the same kind of problem (a finding lives in a few slices of a volume and the
label is per volume).

    python phantom.py                                  # data/phantom, the demo set
    python phantom.py --out=/tmp/ph --train_patients=20 --valid_patients=8 --size=48

What one volume holds (all sizes in mm, drawn per patient, so no two agree):
- a body ellipse (subcutaneous fat -100 HU, muscle 40 HU) in air (-1000 HU);
- a thoracic cavity with two lungs (-850 HU, denser posteriorly) that grow from the apex down to
  the diaphragm domes, with lobes and fissures, a few vessels and bronchi; liver, stomach and
  spleen under the domes;
- heart (40 HU) low and left, aorta (ascending, arch, descending beside the spine), superior vena
  cava, trachea splitting into the main bronchi, esophagus; vertebrae T1..T12 with discs and
  spinal cord; ribs that run obliquely around the wall, costal cartilage, sternum;
- scanner noise (10-20 HU) and a soft or sharp reconstruction kernel.
Each of the 18 CT-RATE abnormalities is drawn as a visible, local pattern (see the painters below)
in a range of slices, and a volume's label is 1 exactly when its pattern was drawn: there is no
label noise.

Files: the CT-RATE layout of ctrate.py with int16 volumes, and phantom.json (the config and counts).
Array axes: X increases toward the patient's left, Y toward the back, Z toward the head (Z index 0
= the most inferior slice). Stored value = HU + 1024. Half of the volumes are "raw" (an original's
header: the CSV's spacing and intercept are the only truth), half "fixed" (see ctrate.write_volume).
The CSV always lists RescaleSlope 1, RescaleIntercept -1024: applied to a fixed file, 1024 HU too low.

The same seed gives byte-identical files, whatever the number of workers: every random number
comes from a generator seeded by (seed, name of the patient/scan/volume).
"""
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from tqdm import tqdm

import ctrate
from common import (FRACTION, LABELS, NONEMPTY, SettingError, apply, at_least, describe, in_processes, parse_config,
                    setting)


@dataclass
class PhantomConfig:
    out: str = setting("data/phantom", NONEMPTY)  # folder to write (a previous phantom there is replaced)
    train_patients: int = setting(160, at_least(1))  # patients in the "train" split (~1.3 volumes each)
    valid_patients: int = setting(50, at_least(1))   # patients in the "valid" split (the test set downstream)
    size: int = setting(64, at_least(16))  # in-plane pixels; the field of view is 340-380 mm, so 64 px = ~5.6 mm
    slices: int = setting(34, at_least(4))  # typical slice count: z spacings are (0.8, 1.0, 1.2) x 170 mm / slices
    seed: int = 0                           # same seed, same bytes (any integer: it is hashed, see rng_for)
    rex_frac: float = setting(0.25, FRACTION)  # fraction of volumes with ReXGroundingCT-style finding masks
    workers: int = setting(2, at_least(1))  # processes; 1 = in this process (the output does not depend on it)


# TotalSegmentator "total" label values that the phantom draws (0 = background).
TS = dict(spleen=1, liver=5, stomach=6, lung_upper_left=10, lung_lower_left=11,
          lung_upper_right=12, lung_middle_right=13, lung_lower_right=14, esophagus=15,
          trachea=16, vertebra_L2=30, vertebra_L1=31, vertebra_T12=32, vertebra_T1=43,
          vertebra_C7=44, heart=51, aorta=52, superior_vena_cava=62, spinal_cord=79,
          autochthon_left=86, autochthon_right=87, rib_left_1=92, rib_right_1=104,
          sternum=116, costal_cartilages=117)
TS_IDS = sorted({0, 1, 5, 6, *range(10, 17), *range(30, 45), 51, 52, 62, 79, 86, 87,
                 *range(92, 118)})
LOBE_NAMES = {10: "left upper lobe", 11: "left lower lobe", 12: "right upper lobe",
              13: "right middle lobe", 14: "right lower lobe"}

# Prevalences span roughly CT-RATE's range, the rarest raised to 12% so the 50-patient test split has positives.
PREVALENCE = {
    "Medical material": 0.13, "Arterial wall calcification": 0.28, "Cardiomegaly": 0.13,
    "Pericardial effusion": 0.12, "Coronary artery wall calcification": 0.25,
    "Hiatal hernia": 0.13, "Lymphadenopathy": 0.24, "Emphysema": 0.2, "Atelectasis": 0.24,
    "Lung nodule": 0.36, "Lung opacity": 0.32, "Pulmonary fibrotic sequela": 0.25,
    "Pleural effusion": 0.13, "Mosaic attenuation pattern": 0.12,
    "Peribronchial thickening": 0.12, "Consolidation": 0.16, "Bronchiectasis": 0.12,
    "Interlobular septal thickening": 0.12,
}
LATENTS = ["age", "smoking", "heart", "infection"]   # the first three are per patient, the last per scan
WEIGHTS = {  # label -> {latent: weight}
    "Arterial wall calcification": {"age": 1.0}, "Coronary artery wall calcification": {"age": 1.0},
    "Medical material": {"age": 0.4, "heart": 0.4}, "Cardiomegaly": {"heart": 0.9, "age": 0.3},
    "Pericardial effusion": {"heart": 0.7}, "Pleural effusion": {"heart": 0.6, "infection": 0.4},
    "Hiatal hernia": {"age": 0.5}, "Emphysema": {"smoking": 0.9, "age": 0.3},
    "Lung nodule": {"smoking": 0.4}, "Pulmonary fibrotic sequela": {"age": 0.4, "smoking": 0.3},
    "Interlobular septal thickening": {"heart": 0.6}, "Lymphadenopathy": {"infection": 0.4},
    "Consolidation": {"infection": 0.9}, "Lung opacity": {"infection": 0.6},
    "Atelectasis": {"infection": 0.5, "heart": 0.3}, "Peribronchial thickening": {"smoking": 0.5},
    "Bronchiectasis": {"smoking": 0.3, "infection": 0.3}, "Mosaic attenuation pattern": {"smoking": 0.3},
}
# A patient's later scan keeps chronic findings more often than these acute ones (draw_labels' rho).
ACUTE = {"Pericardial effusion", "Pleural effusion", "Consolidation", "Lung opacity",
         "Atelectasis", "Lymphadenopathy"}

MANUFACTURERS = {  # name -> (sharp kernel, soft kernel) as they appear in series descriptions
    "SIEMENS": ("B70f", "B30f"), "GE MEDICAL SYSTEMS": ("LUNG", "STANDARD"),
    "Philips": ("YC", "B"), "TOSHIBA": ("FC52", "FC13"),
}


def rng_for(*keys) -> np.random.Generator:
    """A generator keyed only by `keys`, not by call order or process: the output does not depend on workers."""
    digest = hashlib.sha256("|".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


# ----------------------------------------------------------------------------
# Planning: which volumes exist, their labels, geometry and flags; no voxel, so tests plan the default set

def draw_labels(rng, latent, previous_eps):
    """One scan's 18 labels, noise terms and liabilities: label = [a + w.latent + eps > 0], latents and eps
    standard normal, a set for a prevalence of exactly PREVALENCE; latents common to labels (WEIGHTS) make
    plausible pairs co-occur. previous_eps: the earlier scan's noise terms (or None), for persistence."""
    labels, eps, liability = {}, {}, {}
    for name in LABELS:
        w = WEIGHTS.get(name, {})
        a = NormalDist().inv_cdf(PREVALENCE[name]) * np.sqrt(1 + sum(v * v for v in w.values()))
        e = rng.standard_normal()
        if previous_eps is not None:
            rho = 0.3 if name in ACUTE else 0.8
            e = rho * previous_eps[name] + np.sqrt(1 - rho**2) * e
        eps[name] = e
        liability[name] = a + sum(v * latent[k] for k, v in w.items()) + e
        labels[name] = int(liability[name] > 0)
    return labels, eps, liability


def draw_patient(rng):
    """Body shape of one patient, in mm (the same in all their scans)."""
    return dict(
        A=rng.uniform(135, 160), B=rng.uniform(108, 128),      # body half-width, half-depth
        f=rng.uniform(8, 22), m=rng.uniform(8, 14),             # subcutaneous fat, chest-wall muscle
        L=rng.uniform(155, 190),                                # apex-to-diaphragm scale of the chest
        t_apex=rng.uniform(0.93, 1.03), td=rng.uniform(0.2, 0.28),   # lung apex, diaphragm dome (0..1 of L)
        t_c=rng.uniform(0.58, 0.66), t_arch=rng.uniform(0.72, 0.8),  # carina, aortic arch
        heart_w=rng.uniform(0.38, 0.46), heart_shift=rng.uniform(0.1, 0.2),
        ra=rng.uniform(12, 16), vert_h=rng.uniform(0.95, 1.05), vert_off=rng.uniform(-0.4, 0.3),
        rib_drop=rng.uniform(3.0, 4.0),
    )


def make_chest(body, rng, labels, size, dz_max):
    """Scan geometry: the patient's body, placed on the table anew (shift),
    plus the derived positions of every structure. All in mm except t_*."""
    c = dict(body)
    A, B, f, m = c["A"], c["B"], c["f"], c["m"]
    c["s"] = round(rng.uniform(340, 380) / size, 3)     # in-plane spacing: field of view / pixels
    c["dz_max"] = dz_max                                # coarsest z spacing any recon may get
    c["bx"], c["by"] = rng.uniform(-8, 8), rng.uniform(-4, 12)
    c["z_lo"] = rng.uniform(-0.04, 0.0) * c["L"]         # inferior end of the scan
    c["length"] = c["L"] * rng.uniform(1.0, 1.06)        # scanned length
    # Cavity: in front, fat + muscle + ribs; behind, room for the spine and back muscles.
    front, back = -B + f + m + 6, B - f - 55
    c["cy"], c["Ac"], c["Bc"] = (front + back) / 2, A - f - m - 6, (back - front) / 2
    c["yv"], c["rvx"], c["rvy"] = back - 5, 18.0, 15.0  # vertebral body centre and radii
    c["yt"] = c["yv"] - c["rvy"] - 22                   # trachea, in front of the esophagus
    c["ye"] = c["yv"] - c["rvy"] - 8
    scale = rng.uniform(1.3, 1.45) if labels["Cardiomegaly"] else 1.0
    c["hx"], c["hy"] = c["heart_shift"] * c["Ac"], c["cy"] - 0.25 * c["Bc"]
    c["hax"], c["hay"] = c["heart_w"] * c["Ac"] * scale, 0.6 * c["Bc"] * min(scale, 1.2)
    c["haz"] = 0.15 * c["L"] * (1 + (scale - 1) / 2)
    c["hz"] = (c["td"] + 0.16) * c["L"]
    c["xa"], c["ya"] = -0.12 * c["Ac"], c["cy"] - 0.35 * c["Bc"]          # ascending aorta
    c["xd"], c["yd"] = c["rvx"] + c["ra"] - 2, c["yv"] - 6                # descending aorta
    c["xs"], c["ys"] = c["xa"] - c["ra"] - 11, c["ya"] + 4                # superior vena cava
    return {k: float(v) for k, v in c.items()}


def plan_volumes(cfg: PhantomConfig):
    """The volumes to write, each a dict with everything the writer and the CSVs need."""
    seed, size = cfg.seed, cfg.size
    dz_options = [round(k * (170.0 / cfg.slices), 2) for k in (0.8, 1.0, 1.2)]
    scans = []
    for split, n_patients in (("train", cfg.train_patients), ("valid", cfg.valid_patients)):
        for p in range(1, n_patients + 1):
            prng = rng_for(seed, split, p)
            body = draw_patient(prng)
            latent = {k: prng.standard_normal() for k in LATENTS}
            manufacturer = list(MANUFACTURERS)[prng.integers(len(MANUFACTURERS))]
            # Patient 2 always has two scans and patient 1 two reconstructions: even a tiny set has groups.
            n_scans = 2 if p == 2 else 1 + int(prng.random() < 0.12)
            eps = None
            for si in range(n_scans):
                srng = rng_for(seed, split, p, "abc"[si])
                latent["infection"] = srng.standard_normal()
                labels, eps, liability = draw_labels(srng, latent, eps)
                scans.append(dict(split=split, p=p, scan="abc"[si], rng=srng, body=body, labels=labels,
                                  liability=liability, manufacturer=manufacturer))
    # Each class on 8% of a split's scans at least (negatives nearest the threshold flip): per-class AUROC.
    for split in ("train", "valid"):
        group = [s for s in scans if s["split"] == split]
        need = int(np.ceil(0.08 * len(group)))
        for name in LABELS:
            negatives = sorted((s for s in group if not s["labels"][name]), key=lambda s: -s["liability"][name])
            for s in negatives[:max(0, need - sum(s["labels"][name] for s in group))]:
                s["labels"][name] = 1
    plan = []
    for sc in scans:
        split, p, scan, srng, labels = sc["split"], sc["p"], sc["scan"], sc["rng"], sc["labels"]
        chest = make_chest(sc["body"], srng, labels, size, max(dz_options))
        n_recons = 2 if p == 1 else 1 + int(srng.random() < 0.2)
        first_sharp = srng.random() < 0.5
        for r in range(1, n_recons + 1):
            rrng = rng_for(seed, split, p, scan, r)
            sharp = first_sharp == (r == 1)
            dz = dz_options[rrng.integers(3)]
            plan.append(dict(
                name=f"{split}_{p}_{scan}_{r}", split=split, patient=p, scan=scan, recon=r,
                key=f"{seed}|{split}|{p}|{scan}", seed=seed, labels=[labels[k] for k in LABELS],
                size=size, slices=max(4, round(chest["length"] / dz)), dz=dz, xy=chest["s"],
                raw=bool(rrng.random() < 0.5), sharp=sharp,
                noise=float(rrng.uniform(14, 20) if sharp else rrng.uniform(10, 14)),
                manufacturer=sc["manufacturer"],
                series=f"CHEST {dz:g}mm {MANUFACTURERS[sc['manufacturer']][0 if sharp else 1]}",
                chest=chest, anatomy=True, rex=False))
    if len({v["raw"] for v in plan}) == 1 and len(plan) > 1:
        plan[-1]["raw"] = not plan[-1]["raw"]           # always exercise both header kinds
    for split in ("train", "valid"):
        vols = [v for v in plan if v["split"] == split]
        # Masks on an exact share, favouring findings: weighted sampling, Efraimidis-Spirakis keys -log(u)/w.
        n_rex = max(1, round(cfg.rex_frac * len(vols))) if cfg.rex_frac > 0 and vols else 0
        keyed = sorted(vols, key=lambda v: -np.log(rng_for(seed, v["name"], "rex").random())
                       / (1 + sum(v["labels"][i] for i, k in enumerate(LABELS) if k in ctrate.CATEGORY)))
        for v in keyed[:n_rex]:
            v["rex"] = True
        # About 5% of volumes have no TotalSegmentator output, as in CT-RATE.
        keyed = sorted(vols, key=lambda v: rng_for(seed, v["name"], "ts").random())
        for v in keyed[:round(0.05 * len(vols))]:
            v["anatomy"] = False
    return plan


# ----------------------------------------------------------------------------
# Geometry of the normal chest, as functions of (X, Y, Z) in mm that broadcast: the same function
# fills a volume and tests a single point, which is how lesions are placed before any voxel exists.

class Chest:
    def __init__(self, params: dict):
        self.__dict__.update(params)

    def heart(self, X, Y, Z, pad=0.0):
        return (((X - self.hx) / (self.hax + pad)) ** 2 + ((Y - self.hy) / (self.hay + pad)) ** 2
                + ((Z - self.hz) / (self.haz + pad)) ** 2) <= 1

    def aorta(self, X, Y, Z, pad=0.0):
        r = self.ra + pad
        z_arch, z_root = self.t_arch * self.L, self.hz
        asc = ((X - self.xa) ** 2 + (Y - self.ya) ** 2 <= (r + 2) ** 2) & (Z >= z_root) & (Z <= z_arch)
        desc = ((X - self.xd) ** 2 + (Y - self.yd) ** 2 <= r**2) & (Z <= z_arch)
        # The arch: a horizontal tube from the top of the ascending to the top of the descending aorta.
        arch = seg_dist2(X, Y, (self.xa, self.ya), (self.xd, self.yd)) + (Z - z_arch) ** 2 <= r**2
        return asc | desc | arch

    def svc(self, X, Y, Z, pad=0.0):
        return (((X - self.xs) ** 2 + (Y - self.ys) ** 2 <= (9 + pad) ** 2)
                & (Z >= self.hz + 0.3 * self.haz) & (Z <= (self.t_arch + 0.12) * self.L))

    def cavity_depth(self, X, Y):
        """Distance inside the cavity wall along the ray from its centre (mm; < 0 outside)."""
        dy = Y - self.cy
        rho = np.sqrt((X / self.Ac) ** 2 + (dy / self.Bc) ** 2) + 1e-6
        return np.sqrt(X**2 + dy**2) * (1 / rho - 1)

    def lung_field(self, X, Y, Z):
        """0 outside the lungs, 1 right lung, 2 left lung (X > 0 is the patient's left)."""
        t = Z / self.L
        left = X > 0
        g = np.sqrt(np.clip((self.t_apex - t) / 0.3, 0, 1))   # lungs grow from the apex down
        xl = np.where(left, 0.5, -0.5) * self.Ac
        yl = self.cy + (1 - g) * 0.35 * self.Bc               # the apex sits posteriorly
        inside = ((X - xl) / (0.56 * self.Ac * g + 1e-3)) ** 2 + ((Y - yl) / (1.02 * self.Bc * g + 1e-3)) ** 2 <= 1
        inside &= self.cavity_depth(X, Y) > 0
        inside &= np.abs(X) > 15                                  # mediastinum: trachea, esophagus
        inside &= (X / (self.rvx + 10)) ** 2 + ((Y - self.yv) / (self.rvy + 12)) ** 2 > 1
        inside &= t > self.dome(X, Y)
        inside &= ~self.heart(X, Y, Z, pad=6) & ~self.aorta(X, Y, Z, pad=3) & ~self.svc(X, Y, Z, pad=2)
        return np.where(inside, np.where(left, 2, 1), 0).astype(np.uint8)

    def dome(self, X, Y):
        """Height (0..1 of L) of the diaphragm under (X, Y): domes highest mid-hemithorax,
        the right one higher (liver), lowest at the back (costophrenic recesses)."""
        side = np.where(X > 0, 1.0, -1.0)
        top = self.td + np.where(X > 0, 0.0, 0.04)
        return top - 0.35 * (((X - side * 0.45 * self.Ac) / self.Ac) ** 2
                             + ((Y - self.cy + 0.1 * self.Bc) / self.Bc) ** 2)

    def lobe(self, X, Y, Z, side):
        """Lobe label: the oblique fissure puts the lower lobe behind and below,
        the horizontal one cuts the right middle lobe off the front."""
        u = (Z / self.L - self.td) / (self.t_apex - self.td)
        yn = (Y - self.cy) / self.Bc
        lower = yn > 2.6 * u - 1.1
        middle = ~lower & (u < 0.45) & (yn < 0.1)
        right = np.where(lower, 14, np.where(middle, 13, 12))
        left = np.where(lower, 11, 10)
        return np.where(side == 2, left, np.where(side == 1, right, 0)).astype(np.uint8)


def seg_dist2(X, Y, a, b):
    """Squared in-plane distance from (X, Y) to the segment a-b."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    u = np.clip(((X - ax) * dx + (Y - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return (X - ax - u * dx) ** 2 + (Y - ay - u * dy) ** 2


class Grid:
    """Voxel centres of one volume in the chest's mm coordinates, plus the
    volume being drawn: hu (X, Y, Z) float32, lab (X, Y, Z) uint8 anatomy."""

    def __init__(self, v):
        c, n, nz = v["chest"], v["size"], v["slices"]
        ix = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * v["xy"]
        self.X = (ix - c["bx"])[:, None, None]                              # (n, 1, 1)
        self.Y = (ix - c["by"])[None, :, None]                              # (1, n, 1)
        z0 = c["z_lo"] + (c["length"] - nz * v["dz"]) / 2 + v["dz"] / 2
        self.z = (z0 + v["dz"] * np.arange(nz)).astype(np.float32)          # (nz,)
        self.Z = self.z[None, None, :]                                      # (1, 1, nz)
        self.shape = (n, n, nz)
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.lab = np.zeros(self.shape, np.uint8)
        self.lung = np.zeros(self.shape, np.uint8)

    def put(self, mask, hu=None, label=None):
        if hu is not None:
            np.copyto(self.hu, hu, where=mask, casting="unsafe")
        if label is not None:
            np.copyto(self.lab, label, where=mask, casting="unsafe")

    def ellipsoid(self, c, r):
        """Mask of an axis-aligned ellipsoid, computed only over the slices it crosses."""
        m = np.zeros(self.shape, bool)
        k = np.nonzero(np.abs(self.z - c[2]) <= r[2])[0]
        if k.size:
            z = self.z[None, None, k[0]:k[-1] + 1]
            m[:, :, k[0]:k[-1] + 1] = (((self.X - c[0]) / r[0]) ** 2 + ((self.Y - c[1]) / r[1]) ** 2
                                       + ((z - c[2]) / r[2]) ** 2) <= 1
        return m

    def ellipsoids(self, shapes):
        """Union of the ellipsoids [(centre, radii), ...]."""
        m = np.zeros(self.shape, bool)
        for c, r in shapes:
            m |= self.ellipsoid(c, r)
        return m

    def tube(self, p0, p1, r0, r1):
        """A straight tube whose centre moves linearly with z from p0 to p1 (vessels, airways): the
        in-plane distance to the centre (inf outside the tube's z range) and the radius per slice."""
        f = (self.z - p0[2]) / (p1[2] - p0[2])                               # (nz,)
        d = np.full(self.shape, np.inf, np.float32)
        k = np.nonzero((f >= 0) & (f <= 1))[0]
        if k.size:   # only the slices the tube crosses
            fk = f[k[0]:k[-1] + 1]
            cx, cy = p0[0] + fk * (p1[0] - p0[0]), p0[1] + fk * (p1[1] - p0[1])
            d[:, :, k[0]:k[-1] + 1] = np.sqrt((self.X - cx) ** 2 + (self.Y - cy) ** 2)   # (n, n, k)
        return d, (r0 + np.clip(f, 0, 1) * (r1 - r0))[None, None, :]


def smooth_field(rng, X, Y, Z, wavelength, n=4):
    """A smooth random field (sum of plane waves), values roughly in [-1, 1]."""
    out = np.float32(0)
    for _ in range(n):
        k = rng.standard_normal(3)
        k = (k * 2 * np.pi / (wavelength * rng.uniform(0.8, 1.25) * np.linalg.norm(k))).astype(np.float32)
        out = out + np.cos(k[0] * X + k[1] * Y + (k[2] * Z + np.float32(rng.uniform(0, 2 * np.pi))))
    return out / np.float32(np.sqrt(n / 2))


def draw_anatomy(g: Grid, ch: Chest, rng):
    X, Y, Z = g.X, g.Y, g.Z
    t = Z / ch.L
    field = smooth_field(rng, X, Y, Z, 60.0)                              # (n, n, nz)
    # Lung density (inspiration) and texture vary by scan: a finding must stand out from normal variation.
    inspiration, texture = rng.uniform(-30, 30), rng.uniform(5, 20)
    # Body: fat under the skin, muscle inside; a little narrower toward the apex.
    A = ch.A * (1 - 0.08 * t**2)
    g.put((X / A) ** 2 + (Y / ch.B) ** 2 <= 1, -100 + 8 * field)
    g.put((X / (A - ch.f)) ** 2 + (Y / (ch.B - ch.f)) ** 2 <= 1, 40.0)
    yc = ch.yv + ch.rvy + 8                                                 # spinal canal centre
    for side, label in ((1, TS["autochthon_left"]), (-1, TS["autochthon_right"])):
        g.put(((X - side * 24) / 15) ** 2 + ((Y - yc - 14) / 14) ** 2 <= 1, 50.0, label)
    # Thoracic cavity (mediastinal fat where nothing else is drawn).
    cav = ch.cavity_depth(X, Y) > 0                                         # (n, n, 1)
    g.put(cav, -80.0)
    # Under the diaphragm: liver on the right, stomach (with a gas cap in front) and spleen on the left.
    below = cav & (t <= ch.dome(X, Y))
    g.put(below & (X < 0.1 * ch.Ac), 58.0, TS["liver"])
    stomach = below & (X >= 0.1 * ch.Ac) & (Y < ch.cy + 0.1 * ch.Bc)
    g.put(stomach, 22.0, TS["stomach"])
    g.put(stomach & (Y < ch.cy - 0.55 * ch.Bc), -1000.0)
    g.put(below & (X >= 0.4 * ch.Ac) & (Y >= ch.cy + 0.1 * ch.Bc), 48.0, TS["spleen"])
    # Lungs, with a dependent (posterior) density gradient and faint texture.
    g.lung = ch.lung_field(X, Y, Z)                                         # (n, n, nz)
    lung = g.lung > 0
    g.put(lung, -855 + inspiration + 18 * (Y - ch.cy) / ch.Bc + texture * field, ch.lobe(X, Y, Z, g.lung))
    # Mediastinum: pericardial fat, heart, great vessels, esophagus, airways.
    heart = ch.heart(X, Y, Z) & cav
    g.put(ch.heart(X, Y, Z, pad=5) & cav & ~lung, -90.0)
    g.put(heart, 40.0, TS["heart"])
    g.put(ch.aorta(X, Y, Z) & ~heart, 45.0, TS["aorta"])
    g.put(ch.svc(X, Y, Z), 40.0, TS["superior_vena_cava"])
    esophagus = ((X - 6) ** 2 + (Y - ch.ye) ** 2 <= 49) & (t >= ch.td - 0.04)
    g.put(esophagus, 35.0, TS["esophagus"])
    d = np.sqrt(X**2 + (Y - ch.yt) ** 2)
    trachea = t >= ch.t_c
    g.put(trachea & (d <= 10.5), 35.0, TS["trachea"])
    g.put(trachea & (d <= 7.5), -1000.0)
    hila = [(side * 0.33 * ch.Ac, ch.yt + 8, (ch.t_c - 0.08) * ch.L) for side in (1, -1)]
    for hilum in hila:   # main bronchi
        d, r = g.tube(hilum, (0, ch.yt, ch.t_c * ch.L), 5.5, 6.5)
        g.put(d <= r + 2.5, 35.0)
        g.put(d <= r, -1000.0)
    # Vessels and lobar bronchi fan out of each hilum; only their lung part is drawn.
    for hilum in hila:
        side = np.sign(hilum[0])
        for _ in range(7):
            tgt = (side * rng.uniform(0.4, 0.95) * ch.Ac, ch.cy + rng.uniform(-0.8, 0.8) * ch.Bc,
                   rng.choice([rng.uniform(0.0, ch.t_c - 0.2), rng.uniform(ch.t_c, 0.95)]) * ch.L)
            d, r = g.tube((hilum[0], hilum[1] - 6, hilum[2]), tgt, 4.5, 2.5)
            g.put(lung & (d <= r), 40.0)
        for _ in range(3):
            tgt = (side * rng.uniform(0.5, 0.85) * ch.Ac, ch.cy + rng.uniform(-0.6, 0.7) * ch.Bc,
                   rng.choice([rng.uniform(0.05, ch.t_c - 0.2), rng.uniform(ch.t_c, 0.85)]) * ch.L)
            d, r = g.tube(hilum, tgt, 3.5, 2.5)
            g.put(lung & (d <= r + 1.5), -300.0)
            g.put(lung & (d <= r), -950.0)
    # Spine: vertebral bodies T1..T12 (C7 or L1-L2 at the ends) and discs, the canal and cord, the arch.
    level = (ch.t_apex * ch.L + 10 - Z) / (ch.L / 11.5 * ch.vert_h) + ch.vert_off   # (1, 1, nz)
    vlabel = np.clip(TS["vertebra_T1"] - np.floor(level), TS["vertebra_L2"], TS["vertebra_C7"])
    disc = (level - np.floor(level)) > 0.85
    rv = (X / ch.rvx) ** 2 + ((Y - ch.yv) / ch.rvy) ** 2
    g.put(rv <= 1, np.where(disc, 80.0, 700.0), np.where(disc, 0, vlabel))
    g.put((rv <= 0.6) & ~disc, 420.0)
    dc = np.sqrt(X**2 + (Y - yc) ** 2)
    arch = ((dc <= 12) & (Y >= yc - 4)) | ((X / 5) ** 2 + ((Y - yc - 17) / 9) ** 2 <= 1)
    g.put(arch & ~disc, 500.0, vlabel)
    g.put(dc <= 7, 10.0, 0)
    g.put(dc <= 4.5, 30.0, TS["spinal_cord"])
    # Ribs: a band outside the cavity; each runs down toward the front, so a slice cuts several.
    depth = -ch.cavity_depth(X, Y)
    phi = np.arctan2(np.abs(X), Y - ch.cy) / np.pi                          # 0 at the spine, 1 in front
    rib = level - 0.3 + ch.rib_drop * phi                                   # (n, n, nz)
    k = np.floor(rib)
    band = (depth > 1) & (depth < 9) & (rib - k < 0.35) & (k >= 0) & (k <= 11)
    g.put(band & (phi > 0.12) & (phi < 0.82), 450.0,
          np.where(X > 0, TS["rib_left_1"], TS["rib_right_1"]) + k)
    g.put(band & (phi >= 0.82) & (phi < 0.93) & (k <= 9) & (k >= 0), 120.0, TS["costal_cartilages"])
    sternum = ((X / 13) ** 2 + ((Y - ch.cy + ch.Bc + 6) / 6) ** 2 <= 1) & (t > ch.td + 0.05) & (t < 0.93)
    g.put(sternum, 350.0, TS["sternum"])


# ----------------------------------------------------------------------------
# Abnormalities. Each painter draws its finding into the grid and returns (mask of the voxels it
# drew, one line of report text). Its random numbers come first, from a generator keyed by the
# scan, so both reconstructions of a scan get the same lesion. A lung lesion starts at an anchor
# with lung all around it (lung_point), and or_core keeps its mask from ever being empty.

def lung_point(rng, ch, t_lo, t_hi, side=0, where=None):
    """A random point (x, y, z) well inside the lung (right=1, left=2, 0=either): the lung also holds
    the points 0.6 voxel away in every direction, a margin that shrinks where a coarse grid lacks room."""
    for margin in (0.6, 0.3, 0.0):
        o = np.array([-1, 0, 1]) * margin
        ox, oy, oz = np.meshgrid(o * ch.s, o * ch.s, o * ch.dz_max, indexing="ij")
        for _ in range(1000):
            x = rng.uniform(-ch.Ac, ch.Ac)
            y = rng.uniform(ch.cy - ch.Bc, ch.cy + ch.Bc)
            z = rng.uniform(t_lo, t_hi) * ch.L
            sides = ch.lung_field(x + ox, y + oy, z + oz)
            if sides.min() > 0 and sides.max() == sides.min() and side in (0, sides.flat[0]) \
                    and (where is None or where(x, y, z)):
                return (x, y, z), int(sides.flat[0])
    raise RuntimeError("phantom.py: could not place a lesion in the lung; the chest "
                       "geometry is degenerate (report this with the seed and size)")


def or_core(g, ch, m, p):
    """m, or if m missed every voxel centre (a thin lesion on a coarse grid), the
    guaranteed core at anchor p: radii (1.05 px, 1.05 px, 0.95 of the coarsest z step)."""
    if m.any():
        return m
    return g.ellipsoid(p, (1.05 * ch.s, 1.05 * ch.s, 0.95 * ch.dz_max)) & (g.lung > 0)


def lobe_at(ch, p, side):
    return LOBE_NAMES[int(ch.lobe(np.float64(p[0]), np.float64(p[1]), np.float64(p[2]), side))]


def medical_material(g, ch, rng):
    kind = rng.choice(3, p=[0.5, 0.3, 0.2])
    zs = ch.s * 1.05, ch.s * 1.05, 0.95 * ch.dz_max
    if kind == 2:  # sternotomy wires: metal loops along the sternum
        r = (max(3.5, zs[0]), max(3.5, zs[1]), zs[2])
        zw = np.sort(rng.uniform(ch.td + 0.12, 0.85, rng.integers(4, 7))) * ch.L
        m = g.ellipsoids(((side * 12, ch.cy - ch.Bc - 6, z), r) for z in zw for side in (-1, 1))
        g.put(m, 3000.0)
        return m, "Median sternotomy wires."
    # Pacemaker (left) or port (right): a device under the skin, a lead/catheter into the heart.
    side = 1 if kind == 0 else -1
    x = side * rng.uniform(0.45, 0.6) * ch.A
    y = -ch.B * np.sqrt(1 - (x / ch.A) ** 2) + ch.f * 0.5 + 6
    z = rng.uniform(0.78, 0.88) * ch.L
    dev = g.ellipsoid((x, y, z), (22 if kind == 0 else 13, max(5.0, zs[1]), max(15.0, zs[2])))
    d, r = g.tube((x, y + 4, z), (ch.xs, ch.ys, ch.hz + 0.4 * ch.haz), 0.6 * ch.s, 0.6 * ch.s)
    g.put(d <= r, 2200.0)
    g.put(dev, 3000.0)
    return dev | (d <= r), "Cardiac pacemaker with its lead." if kind == 0 else "Venous port catheter."


def arterial_calcification(g, ch, rng):
    n = rng.integers(3, 7)
    r = (max(3.5, 1.05 * ch.s), max(3.5, 1.05 * ch.s), max(4.0, 0.95 * ch.dz_max))
    m = np.zeros(g.shape, bool)
    for _ in range(n):
        th = rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.7:   # on the descending aorta's wall
            p = (ch.xd + ch.ra * np.cos(th), ch.yd + ch.ra * np.sin(th), rng.uniform(0.15, ch.t_arch - 0.02) * ch.L)
        else:                    # on top of the arch
            u = rng.uniform(0.2, 0.8)
            p = (ch.xa + u * (ch.xd - ch.xa), ch.ya + u * (ch.yd - ch.ya), ch.t_arch * ch.L + 0.8 * ch.ra)
        m |= g.ellipsoid(p, r)
    g.put(m, rng.uniform(750, 950))
    return m, f"Atherosclerotic calcified plaques in the thoracic aorta ({n} foci)."


def cardiomegaly(g, ch, rng):
    # The heart was drawn enlarged already (make_chest scales it); the finding is the heart.
    return g.lab == TS["heart"], f"Cardiomegaly, cardiothoracic ratio about {ch.hax / ch.Ac:.2f}."


def pericardial_effusion(g, ch, rng):
    e = max(rng.uniform(8, 15), 1.5 * ch.s)
    X, Y, Z = g.X, g.Y, g.Z
    rim = ch.heart(X, Y, Z, pad=e) & ~ch.heart(X, Y, Z) & (ch.cavity_depth(X, Y) > 0)
    rim &= ~np.isin(g.lab, [TS["aorta"], TS["esophagus"], TS["trachea"], TS["superior_vena_cava"]])
    rim &= (g.lab < TS["vertebra_L2"]) & ~np.isin(g.lab, [TS["liver"], TS["stomach"], TS["spleen"]])
    g.put(rim, 10.0, 0)
    return rim, f"Pericardial effusion up to {e:.0f} mm thick."


def coronary_calcification(g, ch, rng):
    n = rng.integers(2, 6)
    r = (max(3.0, 1.05 * ch.s), max(3.0, 1.05 * ch.s), max(3.0, 0.95 * ch.dz_max))
    # On the upper, front-left surface of the heart, where the arteries run.
    angles = [(rng.uniform(-np.pi / 2 - 0.6, 0.2), rng.uniform(0.0, 0.6)) for _ in range(n)]
    m = g.ellipsoids(((ch.hx + 0.95 * ch.hax * np.cos(psi) * np.cos(th),
                       ch.hy + 0.95 * ch.hay * np.cos(psi) * np.sin(th),
                       ch.hz + 0.95 * ch.haz * np.sin(psi)), r) for th, psi in angles)
    g.put(m, rng.uniform(600, 1000))
    return m, f"Coronary artery calcification ({n} foci)."


def hiatal_hernia(g, ch, rng):
    c = (rng.uniform(0, 12), ch.ye - rng.uniform(0, 8), (ch.td + rng.uniform(0.0, 0.05)) * ch.L)
    r = (rng.uniform(24, 32), rng.uniform(18, 25), max(rng.uniform(0.08, 0.12) * ch.L, 0.95 * ch.dz_max))
    m = g.ellipsoid(c, r) & ~np.isin(g.lab, [TS["aorta"]]) & ((g.lab < TS["vertebra_L2"]) | (g.lab > TS["vertebra_C7"]))
    inner = g.ellipsoid(c, (r[0] - 3, r[1] - 3, r[2])) & m
    g.put(m, 40.0, TS["stomach"])                      # a herniated stomach: wall,
    g.put(inner, 15.0)                                 # fluid in the back (dependent) part,
    g.put(inner & (g.Y < c[1] - 0.15 * r[1]), -1000.0)  # and air in front
    return m, f"Hiatal hernia about {2 * r[0]:.0f} mm wide."


def lymphadenopathy(g, ch, rng):
    sites = [(-10 - 12, ch.yt, (ch.t_c + 0.12) * ch.L),           # right paratracheal
             (0, ch.yt + 18, (ch.t_c - 0.06) * ch.L),            # subcarinal
             (22, ch.yt - 14, (ch.t_arch - 0.05) * ch.L),        # aortopulmonary window
             (0.3 * ch.Ac, ch.yt - 4, (ch.t_c - 0.12) * ch.L),   # left hilar
             (-0.3 * ch.Ac, ch.yt - 4, (ch.t_c - 0.12) * ch.L)]  # right hilar
    pick = rng.choice(len(sites), rng.integers(2, 4), replace=False)
    radii = [max(rng.uniform(9, 14), 1.05 * ch.s) for _ in pick]
    m = g.ellipsoids((sites[i], (r, r, max(r, 0.95 * ch.dz_max))) for i, r in zip(pick, radii))
    m &= ~np.isin(g.lab, [TS["trachea"], TS["aorta"], TS["esophagus"]])
    g.put(m, 45.0, 0)
    return m, f"Enlarged mediastinal and hilar lymph nodes ({len(pick)} stations)."


def emphysema(g, ch, rng):
    holes = [(lung_point(rng, ch, ch.t_c - 0.1, min(ch.t_apex, 1.0) - 0.05)[0], rng.uniform(5, 9))
             for _ in range(rng.integers(12, 30))]
    m = g.ellipsoids((p, (max(r, 1.05 * ch.s), max(r, 1.05 * ch.s), max(r, 0.95 * ch.dz_max))) for p, r in holes)
    m = or_core(g, ch, m & (g.lung > 0), holes[0][0])
    g.put(m, -985.0)
    return m, "Centrilobular emphysema, upper lobe predominant."


def atelectasis(g, ch, rng):
    m = np.zeros(g.shape, bool)
    names = []
    for _ in range(1 + int(rng.random() < 0.3)):
        p, side = lung_point(rng, ch, 0.02, ch.td + 0.15, where=lambda x, y, z: y > ch.cy + 0.3 * ch.Bc)
        r = (rng.uniform(25, 35), rng.uniform(22, 32), max(rng.uniform(0.1, 0.14) * ch.L, ch.dz_max))
        # On the back wall behind a basal lung point, cut by the lung: a wedge of collapsed lung.
        wall = (p[0], max(p[1], ch.cy + ch.Bc - 0.3 * r[1]), p[2])
        m |= or_core(g, ch, g.ellipsoid(wall, r) & (g.lung == side), p)
        names.append(lobe_at(ch, p, side))
    g.put(m, 35.0)
    return m, "Atelectasis in the " + " and ".join(sorted(set(names))) + "."


def lung_nodule(g, ch, rng):
    nodules = [(*lung_point(rng, ch, 0.1, 0.9), max(rng.uniform(5.5, 11), 1.05 * ch.s))
               for _ in range(rng.integers(1, 4))]
    m = g.ellipsoids((p, (r, r, max(r, 0.95 * ch.dz_max))) for p, _, r in nodules)
    m = or_core(g, ch, m & (g.lung > 0), nodules[0][0])
    g.put(m, 30.0)
    p, side, r = max(nodules, key=lambda q: q[2])
    where = f"{2 * r:.0f} mm in the {lobe_at(ch, p, side)}"
    return m, f"A solid nodule of {where}." if len(nodules) == 1 else \
        f"{len(nodules)} solid nodules, the largest {where}."


def lung_opacity(g, ch, rng):
    p, side = lung_point(rng, ch, 0.15, 0.9)
    blobs = [(p, (rng.uniform(14, 25), rng.uniform(14, 25), rng.uniform(0.06, 0.12) * ch.L))]
    for _ in range(rng.integers(2, 5)):
        q = (p[0] + rng.uniform(-20, 20), p[1] + rng.uniform(-20, 20), p[2] + rng.uniform(-0.06, 0.06) * ch.L)
        blobs.append((q, (rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(0.05, 0.1) * ch.L)))
    m = g.ellipsoids(blobs)
    m = or_core(g, ch, m & (g.lung > 0), p)
    np.maximum(g.hu, np.where(m, np.float32(-520), np.float32(-2000)), out=g.hu)   # ground glass keeps the vessels
    return m, f"Ground-glass opacity in the {lobe_at(ch, p, side)}."


def fibrotic_sequela(g, ch, rng):
    p, side = lung_point(rng, ch, 0.5, 0.92)
    streaks = []
    for _ in range(rng.integers(3, 7)):
        a = (p[0] + rng.uniform(-8, 8), p[1] + rng.uniform(-8, 8))
        ang, length = rng.uniform(0, 2 * np.pi), rng.uniform(25, 45)
        z = p[2] + rng.uniform(-0.04, 0.04) * ch.L
        streaks.append((a, (a[0] + length * np.cos(ang), a[1] + length * np.sin(ang)), z,
                        max(0.05 * ch.L, 0.6 * ch.dz_max)))
    w = max(2.0, 0.55 * ch.s)                            # lines at least one pixel wide
    m = np.zeros(g.shape, bool)
    for a, b, z, hz in streaks:
        m |= (seg_dist2(g.X, g.Y, a, b) <= w * w) & (np.abs(g.Z - z) <= hz)
    m = or_core(g, ch, m & (g.lung > 0), p)
    g.put(m, -200.0)   # scar bands, thinner than a pixel: partial volume
    return m, f"Fibrotic sequelae with linear scarring in the {lobe_at(ch, p, side)}."


def pleural_effusion(g, ch, rng):
    m = np.zeros(g.shape, bool)
    sides = [1, 2] if rng.random() < 0.35 else [int(rng.integers(1, 3))]
    back = ch.cy + ch.Bc
    for side in sides:
        p, _ = lung_point(rng, ch, 0.02, ch.td + 0.05, side, where=lambda x, y, z: y > ch.cy + 0.4 * ch.Bc)
        top = p[2] + max(rng.uniform(0.08, 0.18) * ch.L, 2 * ch.dz_max)
        # Supine fluid at the back: y_line rises to the back wall at `top`, deepest below the anchor.
        y0 = p[1] - 1.5 * ch.s - rng.uniform(0, 20)
        y_line = np.where(g.Z <= p[2], y0 - 0.3 * (p[2] - g.Z), y0 + (back - y0) * (g.Z - p[2]) / (top - p[2]))
        m |= or_core(g, ch, (g.lung == side) & (g.Y >= y_line) & (g.Z <= top), p)
    g.put(m, 12.0, 0)
    name = "Bilateral" if len(sides) == 2 else ("Right" if sides[0] == 1 else "Left")
    return m, f"{name} pleural effusion."


def mosaic_attenuation(g, ch, rng):
    t0 = rng.uniform(0.1, 0.45)
    field = smooth_field(rng, g.X, g.Y, g.Z, rng.uniform(45, 70))
    m = (g.lung > 0) & (g.Z >= t0 * ch.L) & (g.Z <= (t0 + 0.35) * ch.L) & (g.hu < -700)
    g.put(m, g.hu + np.where(field > 0, 45.0, -45.0))   # geographic patches: air trapping next to denser lung
    return m, "Mosaic attenuation pattern."


def airways(g, ch, rng, n, t_lo, t_hi, lumen, wall, widen):
    """n short airways through random lung points, lumen radius and wall drawn from the ranges (mm),
    the lumen widening by `widen` along each: (airways in the lung, lumens, [(anchor, side)])."""
    tubes = []
    for _ in range(n):
        p, side = lung_point(rng, ch, t_lo, t_hi)
        v = (np.sign(p[0]) * rng.uniform(8, 25), rng.uniform(-15, 15), rng.uniform(0.08, 0.15) * ch.L)
        lr = max(rng.uniform(*lumen), 0.5 * ch.s)
        tubes.append(((p, side), np.subtract(p, v), np.add(p, v), lr, max(rng.uniform(*wall), 1.05 * ch.s)))
    m, inside = np.zeros(g.shape, bool), np.zeros(g.shape, bool)
    for _, a, b, lr, w in tubes:
        d, r = g.tube(a, b, lr, lr * widen)
        m |= d <= r + w
        inside |= d <= r
    return or_core(g, ch, m & (g.lung > 0), tubes[0][0][0]), inside, [t[0] for t in tubes]


def peribronchial_thickening(g, ch, rng):
    m, lumen, _ = airways(g, ch, rng, rng.integers(4, 8), 0.1, 0.6, (2.5, 3.5), (3.5, 5), 1.0)
    g.put(m, 10.0)
    g.put(m & lumen, -950.0)
    return m, "Peribronchial thickening in both lungs."


def consolidation(g, ch, rng):
    p, side = lung_point(rng, ch, 0.05, 0.7)
    lobe = int(ch.lobe(np.float64(p[0]), np.float64(p[1]), np.float64(p[2]), side))
    r = (rng.uniform(30, 45), rng.uniform(25, 40), max(rng.uniform(0.12, 0.18) * ch.L, ch.dz_max))
    bronchi = [(np.sign(p[0]) * rng.uniform(15, 35), rng.uniform(-20, 20), rng.uniform(0.08, 0.14) * ch.L)
               for _ in range(rng.integers(2, 4))]
    m = or_core(g, ch, g.ellipsoid(p, r) & (g.lab == lobe), p)
    g.put(m, 30.0)
    for v in bronchi:   # air bronchograms: dark airways seen through the dense lung
        d, rr = g.tube(np.subtract(p, v), np.add(p, v), max(2.0, 0.5 * ch.s), max(2.0, 0.5 * ch.s))
        g.put(m & (d <= rr), -900.0)
    return m, f"Consolidation with air bronchograms in the {LOBE_NAMES[lobe]}."


def bronchiectasis(g, ch, rng):
    m, lumen, anchors = airways(g, ch, rng, rng.integers(3, 6), 0.05, 0.5, (5.5, 8), (2, 3), 1.2)
    g.put(m, -60.0)
    g.put(m & lumen, -960.0)
    lobes = sorted({lobe_at(ch, p, side) for p, side in anchors})
    return m, "Bronchiectasis (dilated thick-walled airways) in the " + " and ".join(lobes) + "."


def septal_thickening(g, ch, rng):
    t0 = rng.uniform(0.05, 0.35)
    period = max(rng.uniform(18, 26), 3 * ch.s)
    ang, off = rng.uniform(0, np.pi), rng.uniform(0, period, 2)
    p, side = lung_point(rng, ch, t0 + 0.05, t0 + 0.25, where=lambda x, y, z: ch.cavity_depth(x, y) < 18)
    w = max(1.5, 0.5 * ch.s)
    u = g.X * np.cos(ang) + g.Y * np.sin(ang) + off[0]
    v = -g.X * np.sin(ang) + g.Y * np.cos(ang) + off[1]
    mesh = (np.abs(np.mod(u, period) - period / 2) < w) | (np.abs(np.mod(v, period) - period / 2) < w)
    band = (ch.cavity_depth(g.X, g.Y) < 18) & (g.Z >= t0 * ch.L) & (g.Z <= (t0 + 0.3) * ch.L)
    m = or_core(g, ch, mesh & band & (g.lung > 0), p)
    # Lobule-sized polygons under the pleura; a 1-3 mm septum fills part of a pixel: about -600 HU.
    np.maximum(g.hu, np.where(m, np.float32(-600), np.float32(-2000)), out=g.hu)
    return m, "Interlobular septal thickening in the lung periphery."


# Painting order: diffuse patterns first, then focal ones on top, devices last.
PAINTERS = {
    "Mosaic attenuation pattern": mosaic_attenuation, "Emphysema": emphysema,
    "Lung opacity": lung_opacity, "Consolidation": consolidation, "Atelectasis": atelectasis,
    "Pleural effusion": pleural_effusion, "Pulmonary fibrotic sequela": fibrotic_sequela,
    "Interlobular septal thickening": septal_thickening, "Bronchiectasis": bronchiectasis,
    "Peribronchial thickening": peribronchial_thickening, "Lung nodule": lung_nodule,
    "Cardiomegaly": cardiomegaly, "Pericardial effusion": pericardial_effusion,
    "Lymphadenopathy": lymphadenopathy, "Hiatal hernia": hiatal_hernia,
    "Arterial wall calcification": arterial_calcification,
    "Coronary artery wall calcification": coronary_calcification, "Medical material": medical_material,
}
assert sorted(PAINTERS) == sorted(LABELS)


def render(v):
    """Draw one volume. Returns hu (X, Y, Z) float32, anatomy (X, Y, Z) uint8 and
    {label: (mask, text)} for its positive labels."""
    ch, g = Chest(v["chest"]), Grid(v)
    draw_anatomy(g, ch, rng_for(v["key"], "anatomy"))
    owner = np.zeros(g.shape, np.uint8)                  # which finding drew each voxel last
    positive = list(enumerate((k for k in PAINTERS if v["labels"][LABELS.index(k)]), 1))
    texts, todo = {}, positive
    for _ in range(4):   # a finding painted over by later ones is painted on top again, up to 3 times
        for i, name in todo:
            mask, text = PAINTERS[name](g, ch, rng_for(v["key"], name))
            owner[mask] = i
            texts.setdefault(name, text)
        todo = [(i, name) for i, name in positive if not (owner == i).any()]
    findings = {name: (owner == i, texts[name]) for i, name in positive}
    if any(not m.any() for m, _ in findings.values()):
        raise RuntimeError(f"phantom.py: a finding of {v['name']} could not be drawn (a bug; report the seed)")
    # Soft kernel: [1, 4, 1] / 6 each way in-plane, half a pixel (real kernels differ by less), then noise.
    hu = g.hu
    if not v["sharp"]:
        p = np.pad(hu, ((1, 1), (1, 1), (0, 0)), mode="edge")
        hu = (p[:-2] + 4 * p[1:-1] + p[2:]) / 6
        hu = (hu[:, :-2] + 4 * hu[:, 1:-1] + hu[:, 2:]) / 6
    hu = hu + v["noise"] * rng_for(v["key"], v["recon"], "noise").standard_normal(g.shape, np.float32)
    return hu.astype(np.float32), g.lab, findings


# ----------------------------------------------------------------------------
# Writing: the files through ctrate.py

def write_volume(job):
    """Render and write one volume; returns its ReXGroundingCT entry (or None) and voxels per finding."""
    out, v = job
    hu, anatomy, findings = render(v)
    stored = np.clip(np.rint(hu) + 1024, 0, 32767).astype(np.int16)        # (X, Y, Z)
    entry = ctrate.write_volume(out, v["name"], stored, (v["xy"], v["dz"]), v["raw"],
                                anatomy if v["anatomy"] else None, findings if v["rex"] else None)
    return entry, {k: int(m.sum()) for k, (m, _) in findings.items()}


def write_phantom(out, progress=False, **settings) -> dict:
    """Write the dataset under `out` and return a summary (counts, prevalences, seconds). `settings`
    are PhantomConfig's fields (its defaults for the rest), checked as on the command line."""
    t0 = time.time()
    cfg = PhantomConfig()
    try:
        for key, value in dict(settings, out=os.fspath(out)).items():
            apply(cfg, key, value, "phantom")
    except SettingError as e:
        raise ValueError(str(e)) from None
    out = cfg.out
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(f"{out}/phantom.json"):
            raise FileExistsError(f"phantom: {out} is not empty and holds no phantom.json, so it is not a "
                                  "phantom written earlier; pick another --out or empty it")
        for d in ctrate.FOLDERS:   # replace a previous phantom entirely, so no stale volume survives
            shutil.rmtree(f"{out}/{d}", ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    plan = plan_volumes(cfg)
    jobs = [(out, v) for v in plan]
    bar = dict(total=len(jobs), desc="phantom", unit="vol", disable=not progress)
    results = list(tqdm(in_processes(write_volume, jobs, cfg.workers, ordered=True), **bar))
    ctrate.write_rex(out, {split: [entry for v, (entry, _) in zip(plan, results) if entry and v["split"] == split]
                           for split in ctrate.SPLITS})
    for split in ctrate.SPLITS:
        vols = [v for v in plan if v["split"] == split]
        meta = [[v["name"] + ".nii.gz", v["manufacturer"], v["series"], v["size"], v["size"], v["slices"],
                 f"[{v['xy']}, {v['xy']}]", v["dz"], 1, -1024] for v in vols]
        ctrate.write_tables(out, split, meta, [[v["name"] + ".nii.gz"] + v["labels"] for v in vols])
    labels = np.array([v["labels"] for v in plan])
    summary = dict(
        volumes={s: sum(v["split"] == s for v in plan) for s in ("train", "valid")},
        patients={"train": cfg.train_patients, "valid": cfg.valid_patients},
        raw_headers=sum(v["raw"] for v in plan), with_anatomy=sum(v["anatomy"] for v in plan),
        with_masks=sum(v["rex"] for v in plan),
        prevalence={k: round(float(p), 4) for k, p in zip(LABELS, labels.mean(0))},
        min_finding_voxels=min((n for _, c in results for n in c.values()), default=0),
    )
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    with open(f"{out}/phantom.json", "w") as f:
        json.dump({"config": config, "summary": summary}, f, indent=1)
    return dict(out=out, **summary, seconds=round(time.time() - t0, 2))


def main(argv):
    cfg = parse_config(PhantomConfig, argv, "phantom.py")
    print(describe(cfg))
    s = write_phantom(progress=True, **asdict(cfg))
    print(f"wrote {s['volumes']['train']} train + {s['volumes']['valid']} valid volumes to {cfg.out} "
          f"in {s['seconds']:.1f} s ({s['with_masks']} with finding masks, "
          f"{s['volumes']['train'] + s['volumes']['valid'] - s['with_anatomy']} without anatomy)")
    print("prevalence: " + ", ".join(f"{k} {p:.2f}" for k, p in s["prevalence"].items()))


if __name__ == "__main__":
    main(sys.argv[1:])
