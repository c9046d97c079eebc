"""
swin3d.py: a native-3D hierarchical Swin Transformer encoder for CT volumes, the `swinViT` of MONAI's SwinUNETR
written out plainly with MONAI's parameter and buffer names, so that weights move both ways strictly:

    enc = SwinEncoder()                        # feature_size 48: the SwinUNETR paper's and CoralBay's size
    load_state_dict_any(enc, "swin_unetr.pt")  # a SwinUNETR (swinViT.*) or bare SwinTransformer checkpoint
    states = enc(x)                            # x (B, 1, D, H, W) -> 5 maps (B, 48*2^i, D/2^(i+1), H/.., W/..)
    z = enc.embed(x)                           # (B, 48*31): CoralBay's multi-scale embedding

A strided Conv3d patch embedding, then four stages of Swin blocks (window attention with a relative position bias,
every second block on windows shifted by half a window), each ending in a patch merging that halves every side and
doubles the width; every hidden state gets a LayerNorm without weights. Our state dict is that of
`SwinUNETR(in_channels=1, out_channels=any, feature_size=48).swinViT` (MONAI 1.6; its defaults otherwise: v1,
downsample="merging", no patch norm, no dropout; MONAI's own default feature_size is 24). tests/test_swin3d.py holds
the two equal in float64, with padding, shift masks and clamped windows.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import read_state_dict, strip_wrappers

# "merging" (MONAI v0.9.0, SwinUNETR's default) takes the 8 voxels of a 2x2x2 cell in this (d, h, w) order;
# "mergingv2" takes them in itertools.product order: a checkpoint of one gives wrong features in the other
MERGE_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
MASKED = -100.0  # Swin's additive mask across the parts a shifted window joins: weight e^-100, about 4e-44


def triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def window_and_shift(size, window, shift):
    """MONAI's get_window_size: a side no longer than the window is one window and is never shifted."""
    win = tuple(min(n, w) for n, w in zip(size, window))
    return win, tuple(0 if n <= w else s for n, w, s in zip(size, window, shift))


def to_windows(x, win):  # x (B, D, H, W, C), sides multiples of win
    B, D, H, W, C = x.shape
    x = x.view(B, D // win[0], win[0], H // win[1], win[1], W // win[2], win[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, -1, win[0] * win[1] * win[2], C)  # (B, nW, N, C), raster


def from_windows(x, win, size):  # x (B, nW, N, C), the inverse of to_windows
    (B, _, _, C), (D, H, W) = x.shape, size
    x = x.view(B, D // win[0], H // win[1], W // win[2], win[0], win[1], win[2], C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, C)  # (B, D, H, W, C)


def shift_mask(size, win, shift, device, dtype):
    """(nW, N, N) additive mask for the rolled, padded volume: a window that the roll assembled from distant parts
    attends only within each part. Along each axis the parts are [0, n-win), [n-win, n-shift), [n-shift, n)."""
    bands = [(torch.arange(n, device=device) >= n - w).long() + (torch.arange(n, device=device) >= n - s).long()
             for n, w, s in zip(size, win, shift)]  # per axis, (n,) in {0, 1, 2}; with s = 0 the last band is empty
    region = (bands[0][:, None, None] * 3 + bands[1][None, :, None]) * 3 + bands[2][None, None, :]  # (D, H, W)
    region = to_windows(region[None, ..., None], win)[0, ..., 0]  # (nW, N)
    return (region[:, :, None] != region[:, None, :]).to(dtype) * MASKED  # (nW, N, N): 0 within a part


def relative_position_index(win):
    """(N, N): the row of the bias table (B in Swin's eq. 4, Liu et al. 2021) for each query-key pair of a window:
    the pair's offset along each axis, made non-negative (0..2w-2), read as one number in mixed radix."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in win], indexing="ij")).flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor(win)[:, None, None] - 1  # (3, N, N)
    return (rel[0] * (2 * win[1] - 1) + rel[1]) * (2 * win[2] - 1) + rel[2]  # (N, N)


# ----------------------------------------------------------------------------------------
# The modules. Module and attribute names below are the state-dict keys: keep them MONAI's.

class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # x (B, C, D, H, W)
        pad = [(-n) % p for n, p in zip(x.shape[2:], self.patch_size)]  # MONAI pads sides up to the patch
        return self.proj(F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0])))  # (B, dim, D/p, H/p, W/p), rounded up


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.num_heads = num_heads
        n_offsets = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_offsets, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))  # in MONAI's files
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B, nW, N, C); mask (nW, N, N) for shifted windows
        B, nW, N, C = x.shape
        qkv = self.qkv(x).reshape(B, nW, N, 3, self.num_heads, C // self.num_heads)  # rows of qkv: [q; k; v]
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, h, N, d)
        # a clamped (smaller) window reads the full window's index at [:N, :N], as MONAI and Video Swin do: not its
        # tokens' true offsets, but what weights trained in MONAI expect
        idx = self.relative_position_index[:N, :N].reshape(-1)  # (N*N,)
        bias = self.relative_position_bias_table[idx].view(N, N, -1).permute(2, 0, 1)  # (h, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, h, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nW, h, N, d)
        return self.proj(x.transpose(2, 3).reshape(B, nW, N, C))  # (B, nW, N, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x):  # x (..., C)
        return self.linear2(F.gelu(self.linear1(x)))  # (..., C); exact (erf) GELU, as nn.GELU()


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, shift_size, mlp_ratio=4.0):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, torch's default and MONAI's
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask):  # x (B, D, H, W, C); mask (nW, N, N) or None, used only if this block shifts
        size = x.shape[1:4]
        win, shift = window_and_shift(size, self.window_size, self.shift_size)
        pad = [(-n) % w for n, w in zip(size, win)]
        # zeros after the norm, unmasked: padded tokens are keys too (MONAI, Video Swin), so the pad changes outputs
        h = F.pad(self.norm1(x), (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))  # (B, Dp, Hp, Wp, C)
        padded = h.shape[1:4]
        h = torch.roll(h, shifts=[-s for s in shift], dims=(1, 2, 3))  # a copy, no more, in unshifted blocks
        h = from_windows(self.attn(to_windows(h, win), mask if any(shift) else None), win, padded)  # (B, Dp, ..., C)
        h = torch.roll(h, shifts=list(shift), dims=(1, 2, 3))
        x = x + h[:, :size[0], :size[1], :size[2]]
        return x + self.mlp(self.norm2(x))  # (B, D, H, W, C)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x):  # x (B, D, H, W, C)
        D, H, W = x.shape[1:4]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2, 0, D % 2))  # odd sides get one zero plane
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in MERGE_OFFSETS], dim=-1)  # (B, D/2, H/2, W/2, 8C)
        return self.reduction(self.norm(x))  # (B, D/2, H/2, W/2, 2C)


class SwinStage(nn.Module):  # MONAI's BasicLayer
    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio=4.0):
        super().__init__()
        self.window_size, self.shift_size = window_size, tuple(w // 2 for w in window_size)
        self.blocks = nn.ModuleList([SwinBlock(dim, num_heads, window_size, self.shift_size if i % 2 else (0, 0, 0),
                                               mlp_ratio) for i in range(depth)])
        self.downsample = PatchMerging(dim)

    def forward(self, x):  # x (B, C, D, H, W)
        x = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        win, shift = window_and_shift(x.shape[1:4], self.window_size, self.shift_size)
        padded = [-(-n // w) * w for n, w in zip(x.shape[1:4], win)]
        mask = shift_mask(padded, win, shift, x.device, x.dtype) if any(shift) else None  # (nW, N, N)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.downsample(x).permute(0, 4, 1, 2, 3)  # (B, 2C, D/2, H/2, W/2)


class SwinEncoder(nn.Module):
    """The five hidden states of SwinUNETR's encoder. Default sizes: SwinUNETR, Hatamizadeh et al. 2022; CoralBay,
    arXiv 2606.03888. window_size and patch_size: an int or a (d, h, w) triple."""

    def __init__(self, in_chans=1, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
                 patch_size=2, mlp_ratio=4.0):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4 or any(feature_size * 2 ** i % h for i, h in enumerate(num_heads)):
            raise ValueError(f"depths={depths}, num_heads={num_heads}, feature_size={feature_size}: MONAI's layout has "
                             "4 stages, stage i is feature_size*2^i wide, and that width must split evenly into heads")
        self.feature_size, self.window_size, self.patch_size = feature_size, triple(window_size), triple(patch_size)
        self.embed_dim = feature_size * (1 + 2 + 4 + 8 + 16)  # embed(): one mean per channel of every state
        self.patch_embed = PatchEmbed(in_chans, feature_size, self.patch_size)
        for i in range(4):  # MONAI's names: layersN, a one-element list holding stage N
            self.add_module(f"layers{i + 1}", nn.ModuleList([
                SwinStage(feature_size * 2 ** i, depths[i], num_heads[i], self.window_size, mlp_ratio)]))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # Swin's (Liu et al. 2021): truncated normal (std .02) linear weights and bias table, zero biases, unit
        # LayerNorms (torch's default); the Conv3d stem keeps torch's default init, as Swin's does
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def forward(self, x, normalize=True):  # x (B, C, D, H, W)
        states = [self.patch_embed(x)]  # (B, F, D/2, H/2, W/2) with the default patch 2
        for stage in (self.layers1[0], self.layers2[0], self.layers3[0], self.layers4[0]):
            states.append(stage(states[-1]))  # stage i: (B, F*2^i, D/2^(i+1), ...); the next one reads it unnormed
        if normalize:  # MONAI's proj_out: a LayerNorm over channels without weights
            states = [F.layer_norm(s.movedim(1, -1), s.shape[1:2]).movedim(-1, 1) for s in states]
        return states  # 5 x (B, C_i, D_i, H_i, W_i)

    def embed(self, x, normalize=True):  # x (B, C, D, H, W)
        """CoralBay's multi-scale embedding: the global average of every hidden state, concatenated."""
        return torch.cat([s.mean(dim=(2, 3, 4)) for s in self(x, normalize)], dim=1)  # (B, embed_dim)


# ----------------------------------------------------------------------------------------
# Sizes, FLOPs, and a model built from weights alone

SWIN_SIZES = {
    # CPU tests and the phantom comparison: half SwinUNETR's width, 24-wide heads, window 4 for 32^3 views
    # (16^3 tokens); 2.0M parameters, beside ViT-tiny's 2.7M
    "tiny": dict(feature_size=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4),
    "base": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),  # SwinUNETR, CoralBay
}


def build(name, in_chans=1):
    return SwinEncoder(in_chans=in_chans, **SWIN_SIZES[name])


def flops(model, size):
    """Matmul FLOPs of one forward on a size^3 input (padding ignored): per block 24 t C^2 (qkv, projection,
    MLP of 4C) + 4 t N C (scores and weighted sum over a window of N tokens), per merge 4 t C^2, t tokens."""
    p = model.patch_size
    side = [size / q for q in p]
    total = 2 * side[0] * side[1] * side[2] * model.feature_size * model.patch_embed.proj.weight[0].numel()
    for i in range(4):
        stage = getattr(model, f"layers{i + 1}")[0]
        C, t = model.feature_size * 2 ** i, side[0] * side[1] * side[2]
        N = 1
        for n, w in zip(side, model.window_size):
            N *= min(max(n, 1), w)
        total += len(stage.blocks) * (24 * t * C * C + 4 * t * N * C) + 4 * t * C * C
        side = [max(n / 2, 1) for n in side]
    return total


def shape_of(sd):
    """SwinEncoder arguments read off a state dict in MONAI's names (stem, blocks per stage, heads from
    each bias table, window from its rows: (2w - 1)^3)."""
    stem = sd["patch_embed.proj.weight"]  # (F, in_chans, p, p, p)
    depths = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"layers{i}.0.blocks.")}) for i in range(1, 5))
    tables = [sd[f"layers{i}.0.blocks.0.attn.relative_position_bias_table"] for i in range(1, 5)]
    window = (round(tables[0].shape[0] ** (1 / 3)) + 1) // 2
    return dict(in_chans=stem.shape[1], feature_size=stem.shape[0], depths=depths, window_size=window,
                num_heads=tuple(t.shape[1] for t in tables), patch_size=tuple(stem.shape[2:]))


def load(path_or_sd, where=None):
    """A checkpoint (ours, a SwinUNETR's or a bare SwinTransformer's; a file or its state dict) -> (SwinEncoder
    in eval mode, info); its sizes come from the weights."""
    from_file = isinstance(path_or_sd, (str, os.PathLike))
    where = str(path_or_sd) if from_file else (where or "state dict")
    sd = strip_prefixes(read_state_dict(path_or_sd) if from_file else path_or_sd)
    try:
        shape = shape_of(sd)
    except KeyError as e:
        raise ValueError(f"{where}: no {e.args[0]}: not a 3D Swin in MONAI's names "
                         f"(first keys: {', '.join(list(sd)[:4])})") from None
    model = load_state_dict_any(SwinEncoder(**shape), sd)
    name = next((n for n, v in SWIN_SIZES.items() if all(shape[k] == v[k] or shape[k] == triple(v[k]) for k in v)), None)
    return model.eval(), {"format": "monai", "class": "SwinTransformer", "input": "3d", "vit": f"swin3d-{name or 'custom'}",
                          "embed_dim": model.embed_dim, **{k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}}


# ----------------------------------------------------------------------------------------
# Loading: a bare SwinTransformer's keys, a SwinUNETR's (under swinViT.), either under DDP's or compile's prefix.

def strip_prefixes(sd):
    """module. (DDP) and _orig_mod. (torch.compile) off every key; of a whole SwinUNETR, only swinViT.* is kept."""
    sd = {strip_wrappers(k): v for k, v in sd.items()}
    if any(k.startswith("swinViT.") for k in sd):  # its convolutional encoder1..10, decoder1..5, out: not ours
        sd = {strip_wrappers(k[len("swinViT."):]): v for k, v in sd.items() if k.startswith("swinViT.")}
    return sd


def load_state_dict_any(model, sd):
    """Load a state dict, or a .pt/.pth/.safetensors file of one, into a SwinEncoder, strictly; a misfit is one
    error naming the missing, extra and reshaped keys and the likely fix."""
    from_file = isinstance(sd, (str, os.PathLike))
    where = str(sd) if from_file else "state dict"
    sd = strip_prefixes(read_state_dict(sd) if from_file else sd)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    reshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
                if k in sd and sd[k].shape != want[k].shape]
    if missing or extra or reshaped:
        if any(".mlp.fc1." in k for k in extra):
            todo = ("mlp.fc1/fc2 are the names of the SSL pretraining file (model_swinvit.pt, Tang et al. 2022): load "
                    "it into MONAI's SwinUNETR with load_from(), then pass that model's state_dict() here")
        elif reshaped:
            todo = ("build SwinEncoder with the checkpoint's feature_size, num_heads, window_size, patch_size and "
                    "in_chans (the shapes above say which)")
        else:
            todo = "set depths to the checkpoint's blocks per stage; a v2 SwinUNETR (layersNc.*) cannot load here"
        summary = "; ".join(f"{len(items)} {label} ({', '.join(items[:4])})" for label, items in
                            (("missing", missing), ("extra", extra), ("of another shape", reshaped)) if items)
        raise ValueError(f"{where}: does not fit this SwinEncoder: {summary}. What to do: {todo}")
    model.load_state_dict(sd, strict=True)
    return model
