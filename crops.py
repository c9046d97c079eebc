"""
crops.py: the batched image operations behind train.py's views, on the device (RECIPE.md 3-4).

A view is a square crop of a slice, resized to the view's side, given a random gamma, z-scored and
perhaps blurred; its soft targets are the class fractions of the same crop in the slice's anatomy and
abnormality masks, per 16x16 patch and per crop. Every operation works on a whole micro-batch of crops
at once (affine_grid / grid_sample with one box per row), so there is no per-sample loop on the device.
"""
import math

import torch
import torch.nn.functional as F

import prepare
from common import ABNORMALITY_CODES, N_ANATOMY
from model import PATCH


def crop_boxes(scale, pos, flip):
    """affine_grid thetas for square crops: side `scale` (fraction of the slice side), top-left free
    position `pos` in [0,1]^2 of the room left, horizontal flip folded in. (N,), (N,2), (N,) -> (N,2,3)"""
    centre = scale[:, None] / 2 + pos * (1 - scale[:, None])  # (N, 2) in [0, 1] image coordinates
    return boxes_to_theta(scale, centre, flip)


def boxes_to_theta(scale, centre, flip):
    theta = torch.zeros(len(scale), 2, 3, device=scale.device)
    theta[:, 0, 0] = scale * (1 - 2 * flip)  # output x in [-1,1] -> input x; negative = mirrored
    theta[:, 1, 1] = scale
    theta[:, :, 2] = 2 * centre - 1
    return theta  # (N, 2, 3)


def mask_centres(abnormal, anatomy, pick):
    """The centre (N, 2) in [0,1] (x, y) of the k-th foreground pixel per row, k = floor(pick * count),
    abnormality mask first, else anatomy (a cumsum + searchsorted), and whether there was one (N,)."""
    m = anatomy.shape[-1]
    fg_abn, fg_anat = abnormal != 0, anatomy != 0  # (N, m, m)
    fg = torch.where(fg_abn.flatten(1).any(1)[:, None], fg_abn.flatten(1), fg_anat.flatten(1))  # (N, m*m)
    csum = fg.cumsum(1, dtype=torch.int32)  # (N, m*m)
    count = csum[:, -1]  # (N,)
    k = torch.minimum((pick * count).long(), (count - 1).clamp(min=0)).int() + 1  # (N,) 1-based
    pos = torch.searchsorted(csum, k[:, None].contiguous()).squeeze(1).clamp(max=m * m - 1)  # (N,)
    centre = torch.stack([(pos % m).float() + 0.5, (pos // m).float() + 0.5], 1) / m  # (N, 2)
    return centre, count > 0


def crop_resize(hu, theta, size, max_scale):
    """Crop + resize HU slices: (N, S, S) -> (N, 1, size, size). Bilinear at `ss` points per output pixel
    side, averaged: a cheap antialias when a crop is larger than the view (512 px into 256 px: ss = 2)."""
    ss = max(1, math.ceil(max_scale * hu.shape[-1] / size - 1e-6))
    grid = F.affine_grid(theta, (len(hu), 1, size * ss, size * ss), align_corners=False)
    x = F.grid_sample(hu.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(x, ss) if ss > 1 else x  # (N, 1, size, size)


def soft_targets(anatomy, abnormal, theta, size, r, families):
    """Class fractions per 16x16 patch (r x r nearest-neighbour mask samples each) and per crop (their
    mean: every patch is the same area), from the SAME crop boxes as the images."""
    N, g = len(theta), size // PATCH  # g x g patches
    n = g * r  # sample points per side
    grid = F.affine_grid(theta, (N, 1, n, n), align_corners=False)
    out = {}
    if "anat" in families:
        lab = F.grid_sample(anatomy.unsqueeze(1).float(), grid, mode="nearest", align_corners=False)
        lab = lab.view(N, n, n).long()  # (N, n, n) label per sample point
        patch = (torch.arange(n, device=lab.device) // r)  # (n,) patch row/column of each sample
        cell = (patch[:, None] * g + patch[None, :]) * N_ANATOMY  # (n, n)
        counts = torch.zeros(N, g * g * N_ANATOMY, device=lab.device)
        counts.scatter_add_(1, (cell + lab).view(N, -1), torch.ones(N, n * n, device=lab.device))
        out["anat_patch"] = counts.view(N, g * g, N_ANATOMY) / (r * r)  # (N, T, 118)
        out["anat_cls"] = out["anat_patch"].mean(1)  # (N, 118)
    if "abn" in families:
        bits = F.grid_sample(abnormal.unsqueeze(1).float(), grid, mode="nearest", align_corners=False).int()
        codes = torch.arange(len(ABNORMALITY_CODES), device=bits.device).view(1, -1, 1, 1)
        bits = ((bits >> codes) & 1).float()  # (N, 14, n, n)
        out["abn_patch"] = F.avg_pool2d(bits, r).flatten(2).transpose(1, 2)  # (N, T, 14)
        out["abn_cls"] = out["abn_patch"].mean(1)  # (N, 14)
    return out


def intensity(hu, gamma, sigma):
    """u -> u^gamma on u = clip(HU) scaled to [0,1] by prepare.HU_CLIP, back to HU, z-scored, then a
    per-row 3x3 Gaussian blur. (N,1,H,W), (N,), (N,) -> (N,1,H,W); sigma 0 = no blur."""
    lo, hi = prepare.HU_CLIP
    u = ((hu - lo) / (hi - lo)).clamp(0, 1) ** gamma.view(-1, 1, 1, 1)
    x = prepare.normalize_hu(lo + u * (hi - lo))  # (N, 1, H, W)
    if sigma is None:
        return x
    w = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (N, 3)
    w = w / w.sum(1, keepdim=True)
    kernel = (w[:, :, None] * w[:, None, :]).unsqueeze(1)  # (N, 1, 3, 3); sigma 0 -> the identity
    N, _, H, W = x.shape
    x = F.conv2d(F.pad(x.view(1, N, H, W), (1, 1, 1, 1), mode="replicate"), kernel, groups=N)
    return x.view(N, 1, H, W)
