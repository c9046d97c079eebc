"""
The DALE-CT networks (RECIPE.md 4): a ViT backbone for single-channel CT slices, the LeJEPA
projector on its CLS token, the dense heads on CLS and patch tokens, and the three as one module.

The backbone is timm's VisionTransformer written out plainly (patch 16, CLS token, learned position
embeddings resampled to any size, pre-norm blocks with LayerScale, final LayerNorm, no registers), with
timm's parameter names and shapes, so weights move both ways without a converter; our state dict is that of

    timm.create_model("vit_large_patch16_224", img_size=512, in_chans=1, num_classes=0,
                      init_values=1e-5, dynamic_img_size=True)

load_backbone is strict: every backbone key present with its shape; only a timm classifier head is ignored.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ABNORMALITY_CODES, N_ANATOMY, read_state_dict

PATCH = 16  # pixels per patch side; every input side must be a multiple of it


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int  # token width D
    depth: int  # number of blocks
    num_heads: int  # attention heads, 64 wide in every size


VIT_SIZES = {
    "tiny": ViTSize(192, 6, 3),  # CPU tests and the demo: DeiT-Ti's width and heads at half its depth
    "small": ViTSize(384, 12, 6),  # ViT-S/16
    "base": ViTSize(768, 12, 12),  # ViT-B/16
    "large": ViTSize(1024, 24, 16),  # ViT-L/16, the DALE-CT backbone
}


def size_name(embed_dim, depth):
    """The VIT_SIZES name of a backbone this wide and deep, or None."""
    return next((n for n, s in VIT_SIZES.items() if (s.embed_dim, s.depth) == (embed_dim, depth)), None)


def resample_pos_embed(pos_embed, new_grid, old_grid):
    """(1, 1+h*w, D) -> (1, 1+H*W, D): the CLS position stays, the grid is resampled as timm's
    resample_abs_pos_embed does (bicubic, antialiased, float32); the identity at the native grid."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, h*w, D)
    D = grid.shape[-1]
    grid = grid.float().reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)  # (1, D, H, W)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)  # (1, H*W, D)
    return torch.cat([cls_pos, grid], dim=1)  # (1, 1+H*W, D)


# ----------------------------------------------------------------------------------------
# The backbone. Module and attribute names below are the state-dict keys: keep them timm's.

class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):  # x (B, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D), row-major over the grid


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x (B, N, D)
        B, N, D = x.shape
        # rows of qkv.weight are [q; k; v], each split into heads: timm's layout, which checkpoints depend on
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d); flash / memory-efficient on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class LayerScale(nn.Module):
    # per-channel gain on each residual branch; at 1e-5 every block starts near the identity (CaiT, 2103.17239)
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):  # x (B, N, D)
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, init_values):
        super().__init__()
        # eps 1e-6 is timm's; torch's default 1e-5 would shift every activation of its checkpoints
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x):  # x (B, N, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, N, D)


class ViT(nn.Module):
    def __init__(self, embed_dim, depth, num_heads, img_size=256, in_chans=1, mlp_ratio=4.0, init_values=1e-5):
        super().__init__()
        if img_size % PATCH:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {PATCH}: "
                             f"pick e.g. {max(1, round(img_size / PATCH)) * PATCH}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.img_size, self.in_chans = img_size, in_chans
        self.grid = (img_size // PATCH, img_size // PATCH)  # the grid pos_embed is stored at
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # timm's: tiny CLS token, truncated normal (std .02) positions and linear weights, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # x (B, C, H, W), normalised HU
        B, _, H, W = x.shape
        if H % PATCH or W % PATCH:
            raise ValueError(f"input is {H}x{W} px but the ViT needs sides that are multiples of {PATCH}: "
                             "crop or resize it")
        x = self.patch_embed(x)  # (B, T, D), T = H/16 * W/16
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+T, D)
        x = x + resample_pos_embed(self.pos_embed, (H // PATCH, W // PATCH), self.grid)  # (B, 1+T, D)
        for block in self.blocks:
            x = block(x)  # (B, 1+T, D)
        x = self.norm(x)  # (B, 1+T, D)
        return x[:, 0], x[:, 1:]  # (B, D), (B, T, D)


def build_vit(size, img_size=256, in_chans=1, init_values=1e-5):
    """init_values: LayerScale's starting gain (RECIPE.md 4: 1e-5); loading weights overwrites it."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}: choose one of {', '.join(VIT_SIZES)}")
    s = VIT_SIZES[size]
    return ViT(s.embed_dim, s.depth, s.num_heads, img_size=img_size, in_chans=in_chans, init_values=init_values)


def vit_flops_per_image(vit, img_size):
    """Matmul FLOPs of one forward pass on one img_size (int or (H, W)) image: 2 per weight per token
    plus attention's 4*N^2*D per block (T patches, N = T+1 tokens, width D); norms and softmax left out.
    A training step costs about 3x this (backward = 2x forward)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    T = (H // PATCH) * (W // PATCH)
    N, D = T + 1, vit.embed_dim
    hidden = vit.blocks[0].mlp.fc1.out_features
    per_block = 2 * N * D * 3 * D + 4 * N * N * D + 2 * N * D * D + 4 * N * D * hidden
    return 2 * T * vit.in_chans * PATCH * PATCH * D + vit.depth * per_block


# ----------------------------------------------------------------------------------------
# What sits on the backbone during pretraining.

class Projector(nn.Module):
    """The LeJEPA projector on the final-normed CLS token, (B, d) -> (B, out): the loss acts on its output."""

    def __init__(self, d, hidden=2048, out=124):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, out),
        )

    def forward(self, cls):  # cls (B, d)
        return self.net(cls)  # (B, out)


class DenseHeads(nn.Module):
    """One linear head per mask family, shared by the CLS token (class fractions in the crop) and every
    patch token (in its patch): linear, so the spatial knowledge stays in the backbone for the probe."""

    def __init__(self, d, n_anatomy=118, n_abnormal=14):
        super().__init__()
        self.anatomy = nn.Linear(d, n_anatomy)  # TotalSegmentator total, 0 = background
        self.abnormal = nn.Linear(d, n_abnormal)  # ReXGroundingCT categories 1a..2h

    def forward(self, cls, patches):  # cls (B, d), patches (B, T, d)
        return dict(
            anat_cls=self.anatomy(cls),  # (B, n_anatomy)
            anat_patch=self.anatomy(patches),  # (B, T, n_anatomy)
            abn_cls=self.abnormal(cls),  # (B, n_abnormal)
            abn_patch=self.abnormal(patches),  # (B, T, n_abnormal)
        )


class DaleCT(nn.Module):
    """What train.py optimises: backbone + projector (+ dense heads for 1S/2S), built from its Config;
    one module, so DDP sees one forward per micro-step."""

    def __init__(self, cfg):
        super().__init__()
        self.vit = build_vit(cfg.vit, img_size=cfg.global_size, init_values=cfg.layerscale_init)
        self.projector = Projector(self.vit.embed_dim, hidden=cfg.proj_hidden, out=cfg.proj_dim)
        self.heads = None
        if cfg.variant != "0":
            self.heads = DenseHeads(self.vit.embed_dim, N_ANATOMY, len(ABNORMALITY_CODES))
        if cfg.variant == "1s":  # no abnormality head at all: a head outside the loss would
            del self.heads.abnormal  # leave DDP waiting for its gradients (and be saved untrained)

    def embed(self, xg, xl):
        """Projector outputs only (V*B, K): what SIGReg's statistics need."""
        return self.projector(torch.cat([self.vit(xg)[0], self.vit(xl)[0]]))

    def forward(self, xg, xl):  # (2B, 1, G, G), (L*B, 1, l, l)
        cls_g, patch_g = self.vit(xg)  # (2B, D), (2B, Tg, D)
        cls_l, patch_l = self.vit(xl)  # (L*B, D), (L*B, Tl, D)
        z = self.projector(torch.cat([cls_g, cls_l]))  # (V*B, K)
        if self.heads is None:
            return z, None, None
        return z, self.dense(cls_g, patch_g), self.dense(cls_l, patch_l)

    def dense(self, cls, patches):
        if hasattr(self.heads, "abnormal"):
            return self.heads(cls, patches)  # anat_cls, anat_patch, abn_cls, abn_patch
        return dict(anat_cls=self.heads.anatomy(cls), anat_patch=self.heads.anatomy(patches))  # 1S


# ----------------------------------------------------------------------------------------
# Loading weights: ours, or any timm-format ViT (released DALE-CT weights are in that format);
# common.read_state_dict reads the file (.safetensors, .pt, nested or wrapped), this checks the fit.

IGNORED_KEYS = ("head.weight", "head.bias")  # a timm classifier: not part of the backbone


def load_backbone(vit, path):
    """Load backbone weights into vit, strictly: resample pos_embed if the checkpoint was
    stored at another grid, ignore only IGNORED_KEYS, and refuse anything else that differs."""
    sd = {k: v for k, v in read_state_dict(path).items() if k not in IGNORED_KEYS}
    want = vit.state_dict()
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != want["pos_embed"].shape and pos.shape[-1] == vit.embed_dim:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:  # square grid plus the CLS position: resample it
            sd["pos_embed"] = resample_pos_embed(pos, vit.grid, (side, side))
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    reshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}"
                for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or reshaped:
        what, todo = explain_mismatch(vit, sd)
        summary = "; ".join(f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in
                            (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if items)
        raise ValueError(f"{path}: {what}: {summary}. What to do: {todo}")
    vit.load_state_dict(sd, strict=True)
    return vit


def explain_mismatch(vit, sd):
    """(what is wrong, what to do) for a state dict that does not fit vit, most likely cause first."""
    def describe(width, depth):
        name = size_name(width, depth)
        return f"ViT-{name} ({width} wide, {depth} deep)" if name else f"a ViT {width} wide, {depth} deep"

    model = describe(vit.embed_dim, vit.depth)
    stem = sd.get("patch_embed.proj.weight")  # (D, C, 16, 16)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if stem is not None and depth and (stem.shape[0], depth) != (vit.embed_dim, vit.depth):
        name = size_name(stem.shape[0], depth)
        todo = f"build the model with build_vit({name!r})" if name else "build a ViT of the checkpoint's size"
        return f"checkpoint is {describe(stem.shape[0], depth)} but the model is {model}", todo
    if stem is not None and stem.ndim == 4 and stem.shape[1] != vit.in_chans:
        return (f"checkpoint takes {stem.shape[1]} input channels, the model {vit.in_chans}",
                "for an RGB checkpoint, sum patch_embed.proj.weight over dim 1 and save it again")
    return (f"checkpoint does not match {model}",
            f"expected a timm-format VisionTransformer backbone (class token, LayerScale, {vit.in_chans} "
            f"input channel(s)); only {', '.join(IGNORED_KEYS)} may be extra")
