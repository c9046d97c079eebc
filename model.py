"""
The DALE-CT networks (RECIPE.md 4): a ViT backbone for single-channel CT slices, the LeJEPA
projector on its CLS token, the dense heads on CLS and patch tokens, and the three as one module.

The backbone is timm's VisionTransformer written out plainly (patch 16 by default, CLS token, optional
register tokens, learned position embeddings resampled to any size, pre-norm blocks with LayerScale, final
LayerNorm), with timm's parameter names and shapes, so weights move both ways without a converter; by
default our state dict is that of

    timm.create_model("vit_large_patch16_224", img_size=512, in_chans=1, num_classes=0,
                      init_values=1e-5, dynamic_img_size=True)

Reading checkpoints (ours, timm's, Hugging Face DINOv2) is backbones.py's job; load_backbone is its strict
loader for a ViT you built yourself.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ABNORMALITY_CODES, N_ANATOMY

PATCH = 16  # the default pixels per patch side (ours, DALE-CT-2S/0); every input side must be a multiple of it


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


def resample_pos_embed(pos_embed, new_grid, old_grid, prefix=1, antialias=True):
    """(1, P+h*w, D) -> (1, P+H*W, D): the P prefix positions (CLS, registers) stay, the grid is resampled
    bicubically in float32 to the new size, as timm's resample_abs_pos_embed (antialiased) and transformers'
    Dinov2Model (antialias=False: its PyTorch kernel then uses a=-0.75, not -0.5) do; identity at the native grid."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    head, grid = pos_embed[:, :prefix], pos_embed[:, prefix:]  # (1, P, D), (1, h*w, D)
    D = grid.shape[-1]
    grid = grid.float().reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias)  # (1, D, H, W)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)  # (1, H*W, D)
    return torch.cat([head, grid], dim=1)  # (1, P+H*W, D)


# ----------------------------------------------------------------------------------------
# The backbone. Module and attribute names below are the state-dict keys: keep them timm's.

class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size=PATCH):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

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
    """reg_tokens: register tokens after CLS (Darcet et al., 2309.16588), dropped from the output.
    Positions follow timm's VisionTransformer._pos_embed: the table holds one row per prefix token (CLS,
    then registers) ahead of the grid, never resampled; with no_embed_class it holds the grid alone and
    CLS and registers get none (how timm stores DINOv2 with registers: CLS position folded into cls_token).
    pos_antialias: the resampling rule of the weights' origin (timm: True; transformers' Dinov2Model: False)."""

    def __init__(self, embed_dim, depth, num_heads, img_size=256, in_chans=1, mlp_ratio=4.0, init_values=1e-5,
                 patch_size=PATCH, reg_tokens=0, no_embed_class=False, pos_antialias=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {patch_size}: "
                             f"pick e.g. {max(1, round(img_size / patch_size)) * patch_size}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.img_size, self.in_chans, self.patch_size, self.reg_tokens = img_size, in_chans, patch_size, reg_tokens
        self.no_embed_class, self.pos_antialias = no_embed_class, pos_antialias
        self.pos_prefix = 0 if no_embed_class else 1 + reg_tokens  # rows of pos_embed ahead of the grid
        self.grid = (img_size // patch_size, img_size // patch_size)  # the grid pos_embed is stored at
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if reg_tokens:  # absent, not empty, without registers: the default state dict stays timm's
            self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_prefix + self.grid[0] * self.grid[1], embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # timm's: tiny CLS token, truncated normal (std .02) positions and linear weights, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_tokens:  # after CLS, as timm: a model without registers draws the same numbers as before
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # x (B, C, H, W), normalised HU
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input is {H}x{W} px but the ViT needs sides that are multiples of {p}: "
                             "crop or resize it")
        x = self.patch_embed(x)  # (B, T, D), T = H/p * W/p
        pos = resample_pos_embed(self.pos_embed, (H // p, W // p), self.grid, self.pos_prefix, self.pos_antialias)
        prefix = [self.cls_token.expand(B, -1, -1)] + ([self.reg_token.expand(B, -1, -1)] if self.reg_tokens else [])
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)  # (B, 1+R+T, D): positions on the grid only
        else:
            x = torch.cat(prefix + [x], dim=1) + pos  # (B, 1+R+T, D)
        for block in self.blocks:
            x = block(x)  # (B, 1+R+T, D)
        x = self.norm(x)  # (B, 1+R+T, D)
        return x[:, 0], x[:, 1 + self.reg_tokens:]  # (B, D), (B, T, D): registers dropped


def build_vit(size, img_size=256, in_chans=1, init_values=1e-5):
    """init_values: LayerScale's starting gain (RECIPE.md 4: 1e-5); loading weights overwrites it."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}: choose one of {', '.join(VIT_SIZES)}")
    s = VIT_SIZES[size]
    return ViT(s.embed_dim, s.depth, s.num_heads, img_size=img_size, in_chans=in_chans, init_values=init_values)


def vit_flops_per_image(vit, img_size):
    """Matmul FLOPs of one forward pass on one img_size (int or (H, W)) image: 2 per weight per token
    plus attention's 4*N^2*D per block (T patches, N = T+1+registers tokens, width D); norms and softmax
    left out. A training step costs about 3x this (backward = 2x forward)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = vit.patch_size
    T = (H // p) * (W // p)
    N, D = T + 1 + vit.reg_tokens, vit.embed_dim
    hidden = vit.blocks[0].mlp.fc1.out_features
    per_block = 2 * N * D * 3 * D + 4 * N * N * D + 2 * N * D * D + 4 * N * D * hidden
    return 2 * T * vit.in_chans * p * p * D + vit.depth * per_block


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
    one module, so DDP sees one forward per micro-step. The backbone is the ViT, or with --input=3d the
    3D Swin (swin3d.py), whose pooled stages stand in for the CLS token; the projector is LeJEPA's, or
    with --objective=dino DINO's head (dino.py)."""

    def __init__(self, cfg):
        super().__init__()
        self.is_3d = getattr(cfg, "input", "2d") == "3d"
        if self.is_3d:
            import swin3d  # here: a reader who only wants DALE-CT never needs the 3D file
            self.backbone = swin3d.build(cfg.swin)
        else:
            self.backbone = build_vit(cfg.vit, img_size=cfg.global_size, init_values=cfg.layerscale_init)
        dim = self.backbone.embed_dim
        if getattr(cfg, "objective", "lejepa") == "dino":
            import dino
            self.projector = dino.DINOHead(dim, hidden=cfg.proj_hidden, bottleneck=cfg.dino_bottleneck,
                                           prototypes=cfg.dino_prototypes)
        else:
            self.projector = Projector(dim, hidden=cfg.proj_hidden, out=cfg.proj_dim)
        self.heads = None
        if cfg.variant != "0":
            self.heads = DenseHeads(dim, N_ANATOMY, len(ABNORMALITY_CODES))
        if cfg.variant == "1s":  # no abnormality head at all: a head outside the loss would
            del self.heads.abnormal  # leave DDP waiting for its gradients (and be saved untrained)

    def features(self, x):
        """(the CLS token or the 3D Swin's pooled stages (N, D), the patch tokens (N, T, D) or None)."""
        return (self.backbone.embed(x), None) if self.is_3d else self.backbone(x)

    def project(self, x):
        """Projector outputs of one kind of view (N, K): DINO's teacher sees the global views only."""
        return self.projector(self.features(x)[0])

    def embed(self, xg, xl):
        """Projector outputs only (V*B, K): what SIGReg's statistics need."""
        return self.projector(torch.cat([self.features(xg)[0], self.features(xl)[0]]))

    def forward(self, xg, xl):  # (2B, 1, G, G), (L*B, 1, l, l); 3D: (2B, 1, G, G, G), (L*B, 1, l, l, l)
        cls_g, patch_g = self.features(xg)  # (2B, D), (2B, Tg, D)
        cls_l, patch_l = self.features(xl)  # (L*B, D), (L*B, Tl, D)
        z = self.projector(torch.cat([cls_g, cls_l]))  # (V*B, K)
        if self.heads is None:
            return z, None, None
        return z, self.dense(cls_g, patch_g), self.dense(cls_l, patch_l)

    def dense(self, cls, patches):
        if hasattr(self.heads, "abnormal"):
            return self.heads(cls, patches)  # anat_cls, anat_patch, abn_cls, abn_patch
        return dict(anat_cls=self.heads.anatomy(cls), anat_patch=self.heads.anatomy(patches))  # 1S


# ----------------------------------------------------------------------------------------
# Loading weights lives in backbones.py (checkpoint formats, conversion, strict fit); this keeps old imports.

def load_backbone(vit, path):
    """Load a checkpoint into a ViT you built, strictly (backbones.load_into); backbones.load builds it for you."""
    import backbones  # here, not at the top: backbones.py builds on this file
    return backbones.load_into(vit, path)
