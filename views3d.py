"""
views3d.py: views of whole sub-volumes for a native-3D encoder (swin3d.py), cut from the same prepared
slices the 2D views come from, so that 2D and 3D pretraining see the same volumes (README: 2D slices
against native 3D). train.py uses it with --input=3d; probe.py cuts its bags of windows with it.

A 3D sample is a block: a cube of side block_mm (CoralBay's 96 voxels at 1.5 mm: 144 mm) around a random
point of a volume, the 3D counterpart of a 2D slab. Its views are DINO's multi-crop in 3D: 2 global cubes
and n_local local cubes inside the block, each a random fraction of the block's side (the same
global/local_scale settings as the 2D views), resampled trilinearly to an isotropic grid of global_size^3
or local_size^3 voxels, mirrored left-right with p_flip and given the 2D views' random gamma. Intensities
are scaled as CoralBay's model card says: HU [-1000, 1000] -> [0, 1], so air outside the volume is 0.

As in train.py, the CPU draws every random number from (seed, step, slot) and copies the raw slices; the
device resamples the whole micro-batch with affine_grid / grid_sample.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

HU_RANGE = (-1000.0, 1000.0)  # CoralBay (arXiv 2606.03888, model card): HU in [-1000, 1000] -> [0, 1]


def scale_hu(hu):
    """HU (any dtype) -> float32 in [0, 1], CoralBay's input scaling."""
    lo, hi = HU_RANGE
    return ((hu.float() - lo) / (hi - lo)).clamp(0, 1)


def block_half(z_mm, block_mm):
    """Slices either side of a block's centre slice that its cube reaches (the block holds 2 half + 1)."""
    return int(math.ceil(block_mm / 2 / z_mm - 1e-6))


def plan_blocks(ds, cfg, step, slots):
    """Which block of which volume and which views, for each slot (train.py's plan_slabs for 3D).
    Positions are in mm from the corner of the gathered block tensor: x, y in-plane, z along slices."""
    B, L = len(slots), cfg.n_local
    p = dict(vol=np.zeros(B, np.int64), centre=np.zeros(B, np.int64), block_xyz=np.zeros((B, 3)),
             g_scale=np.zeros((B, 2)), g_pos=np.zeros((B, 2, 3)), g_flip=np.zeros((B, 2)), g_gamma=np.ones((B, 2)),
             l_scale=np.zeros((B, L)), l_pos=np.zeros((B, L, 3)), l_flip=np.zeros((B, L)), l_gamma=np.ones((B, L)))
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([cfg.seed, step, slot])
        v = int(rng.integers(len(ds)))
        z_mm, side_mm = float(ds.z_mm[v]), float(ds.mm_per_px[v]) * ds.slices.shape[-1]
        half, n = block_half(z_mm, cfg.block_mm), int(ds.count[v])
        # the centre slice: the whole cube inside the volume where it fits, else the middle slice
        c = int(rng.integers(half, n - half)) if n > 2 * half else n // 2
        p["vol"][i], p["centre"][i] = v, c
        free = max(side_mm - cfg.block_mm, 0.0)  # in-plane room for the cube (none: centred)
        xy = (side_mm - free) / 2 + rng.random(2) * free
        p["block_xyz"][i] = (*xy, (half + 0.5) * z_mm)  # the centre slice's middle, in the gathered tensor
        for kind, n_views, lo, hi in (("g", 2, cfg.global_scale_min, cfg.global_scale_max),
                                      ("l", L, cfg.local_scale_min, cfg.local_scale_max)):
            p[f"{kind}_scale"][i] = rng.uniform(lo, hi, n_views)
            p[f"{kind}_pos"][i] = rng.random((n_views, 3))  # where the cube sits in the block's free room
            p[f"{kind}_flip"][i] = rng.random(n_views) < cfg.p_flip
            p[f"{kind}_gamma"][i] = np.where(rng.random(n_views) < cfg.p_gamma,
                                             rng.uniform(cfg.gamma_min, cfg.gamma_max, n_views), 1.0)
    return p


def gather_blocks(ds, plan, block_mm):
    """Copy each block's slices out of the memmap: (B, 2 half + 1, S, S) int16 HU, air (-1000 HU) where
    the block reaches past the volume's ends; and the gathered tensor's extent in mm (B, 3) (x, y, z)."""
    S = ds.slices.shape[-1]
    z_mm = float(ds.z_mm[plan["vol"][0]])  # one slice spacing per prepared dataset (prepare.py --z_mm)
    half = block_half(z_mm, block_mm)
    blocks = np.full((len(plan["vol"]), 2 * half + 1, S, S), HU_RANGE[0], np.int16)
    for i, (v, c) in enumerate(zip(plan["vol"], plan["centre"])):
        lo, hi = max(0, c - half), min(int(ds.count[v]), c + half + 1)
        blocks[i, lo - (c - half):hi - (c - half)] = ds.slices[ds.start[v] + lo:ds.start[v] + hi]
    px = ds.mm_per_px[plan["vol"]].astype(np.float64) * S
    extent = np.stack([px, px, np.full_like(px, (2 * half + 1) * z_mm)], 1)  # (B, 3)
    batch = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in plan.items() if k[:2] in ("g_", "l_")}
    batch.update(blocks=torch.from_numpy(blocks), extent=torch.from_numpy(extent.astype(np.float32)),
                 block_xyz=torch.from_numpy(plan["block_xyz"].astype(np.float32)),
                 # what train.py's loss reads off any batch: its size, and that no masks apply in 3D
                 has_anatomy=torch.zeros(len(blocks), dtype=torch.bool),
                 has_abnormality=torch.zeros(len(blocks), dtype=torch.bool))
    return batch


def box_theta(centre_mm, side_mm, extent_mm, flip):
    """affine_grid thetas (N, 3, 4) for boxes of sides side_mm (N, 3) (a cube: (N,)) centred at centre_mm
    (N, 3) (x, y, z, from the tensor's corner) in a tensor whose extent is extent_mm (N, 3); flip (N,) mirrors x."""
    side_mm = side_mm[:, None].expand(-1, 3) if side_mm.ndim == 1 else side_mm
    theta = torch.zeros(len(side_mm), 3, 4, device=side_mm.device)
    for a in range(3):  # grid axis a: x -> width, y -> height, z -> depth (slices)
        theta[:, a, a] = side_mm[:, a] / extent_mm[:, a] * (1 - 2 * flip if a == 0 else 1)
        theta[:, a, 3] = 2 * centre_mm[:, a] / extent_mm[:, a] - 1
    return theta


def resample(vol, theta, size):
    """(B, 1, Z, S, S) [0,1] volumes, thetas (B, 3, 4) -> (B, 1, size, size, size); 0 (air) outside."""
    grid = F.affine_grid(theta, (len(theta), 1, size, size, size), align_corners=False)
    return F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # trilinear


def make_views3d(batch, cfg, device):
    """CPU micro-batch from gather_blocks() -> xg (2B, 1, G, G, G), xl (L*B, 1, l, l, l), view-major
    (row v*B + b is view v of sample b), as train.make_views returns for 2D; no soft targets."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    vol = scale_hu(b["blocks"])[:, None]  # (B, 1, Z, S, S)
    out = {}
    for kind, size in (("g", cfg.global_size), ("l", cfg.local_size)):
        views = []
        for j in range(b[f"{kind}_scale"].shape[1]):
            r = b[f"{kind}_scale"][:, j]  # (B,) the cube's side as a fraction of the block's
            centre = b["block_xyz"] + (b[f"{kind}_pos"][:, j] - 0.5) * ((1 - r) * cfg.block_mm)[:, None]  # (B, 3)
            x = resample(vol, box_theta(centre, r * cfg.block_mm, b["extent"], b[f"{kind}_flip"][:, j]), size)
            views.append(x ** b[f"{kind}_gamma"][:, j].view(-1, 1, 1, 1, 1))  # gamma on [0, 1], as the 2D views
        out[kind] = torch.cat(views)  # (n * B, 1, size, size, size)
    return dict(xg=out["g"], xl=out["l"], targets=None,
                has_anatomy=b["has_anatomy"], has_abnormality=b["has_abnormality"])


# -----------------------------------------------------------------------------
# Probing: a volume becomes a bag of overlapping windows (probe.py), as a 2D encoder's bag is its slices

def window_centres(extent, side):
    """Centres (mm) along z: windows `side` deep tiling [0, extent] with at least half a window of
    overlap; one centred window where the volume is shorter than a window."""
    if extent <= side:
        return np.array([extent / 2])
    n = int(math.ceil((extent - side) / (side / 2) - 1e-9)) + 1
    return np.linspace(side / 2, extent - side / 2, n)


def volume_windows(hu, z_mm, mm_per_px, block_mm, size):
    """One volume's int16 HU slices (Z, S, S) -> its windows (W, 1, size, n, n) in [0, 1], in slice order,
    and each window's centre slice (W,). A window is block_mm deep and spans the whole slice, at the voxel
    spacing of a pretraining block (block_mm / size): like a slice for the 2D encoder, it sees the whole
    field of view, and a volume's windows differ only in depth."""
    Z, S = hu.shape[0], hu.shape[-1]
    spacing = block_mm / size
    n = max(1, round(S * mm_per_px / spacing))  # in-plane voxels at that spacing
    extent = torch.tensor([S * mm_per_px, S * mm_per_px, Z * z_mm], dtype=torch.float32)
    zs = window_centres(Z * z_mm, block_mm)
    W = len(zs)
    centres = torch.tensor([(extent[0] / 2, extent[1] / 2, z) for z in zs], dtype=torch.float32)  # (W, 3)
    sides = torch.tensor([n * spacing, n * spacing, block_mm], dtype=torch.float32).expand(W, 3)
    theta = box_theta(centres, sides, extent.expand(W, 3), torch.zeros(W)).to(hu.device)
    grid = F.affine_grid(theta, (W, 1, size, n, n), align_corners=False)  # (W, size, n, n, 3)
    # every window samples the one volume: their grids stacked along depth, so the volume is never copied
    out = F.grid_sample(scale_hu(hu)[None, None], grid.reshape(1, W * size, n, n, 3), mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # (1, 1, W * size, n, n)
    slice_of = torch.clamp(torch.from_numpy(zs / z_mm).long(), 0, Z - 1)  # (W,) the slice at each centre
    return out.view(W, 1, size, n, n), slice_of


class WindowSplit:
    """A prepared split seen as bags of windows: the same volumes, labels and names, with start / count /
    depth per window instead of per slice, so probe.py's bags, depth and slice-order probes apply as they are."""

    def __init__(self, ds, block_mm):
        self.base, self.block_mm = ds, block_mm
        self.names, self.labels, self.manifest, self.has_labels = ds.names, ds.labels, ds.manifest, ds.has_labels
        centres = [window_centres(int(ds.count[v]) * float(ds.z_mm[v]), block_mm) for v in range(len(ds))]
        self.count = np.array([len(c) for c in centres], np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int64)
        rows = np.concatenate([ds.start[v] + np.clip((c / ds.z_mm[v]).astype(np.int64), 0, ds.count[v] - 1)
                               for v, c in enumerate(centres)]) if len(ds) else np.zeros(0, np.int64)
        self.depth_pos, self.depth_mm = ds.depth_pos[rows], ds.depth_mm[rows]  # at each window's centre slice
        self.z_mm = np.array([c[1] - c[0] if len(c) > 1 else block_mm / 2 for c in centres], np.float32)  # stride

    def __len__(self):
        return len(self.count)


@torch.no_grad()
def window_features(encoder, split, size, device, out, bar=None):
    """Every window of every volume of a WindowSplit -> the encoder's embedding (W_total, D), into `out`."""
    ds = split.base
    encoder.eval().to(device)
    for v in range(len(ds)):
        hu = torch.from_numpy(np.array(ds.slices[ds.volume(v)], np.int16)).to(device)  # (Z, S, S)
        wins, _ = volume_windows(hu, float(ds.z_mm[v]), float(ds.mm_per_px[v]), split.block_mm, size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            emb = encoder.embed(wins)  # (W, D)
        out[split.start[v]:split.start[v] + split.count[v]] = emb.float().cpu().numpy()
        if bar is not None:
            bar.update(1)
    return out
