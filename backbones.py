"""
backbones.py: a checkpoint file -> a ready ViT (model.py), its shape read from the weights themselves, so that
`probe.py --ckpt=model.safetensors` needs no size flags. Every backbone of the DALE-CT comparison loads
(RECIPE.md 9):

    vit, info = backbones.load("dale_ct_2s/model.safetensors")         # timm keys, patch 16, 32x32 grid
    vit, info = backbones.load("dale_ct_1s_v2/model.safetensors")      # timm keys, patch 14, 37x37 grid
    vit, info = backbones.load("dinov2_chest_ct/model.safetensors")    # transformers DINOv2, 4 registers, RGB

Formats, told apart by their keys:
- ours / timm (train.py's ckpt.pt, released DALE-CT weights): model.py's names, used as they are;
- Hugging Face transformers DINOv2 (Dinov2Model, Dinov2WithRegistersModel; bare, or under the `dinov2.` or
  `dinov2_with_registers.` prefix of their ForImageClassification; model.safetensors or pytorch_model.bin):
  renamed to ours, in both namings transformers has used (attention.attention.query/key/value in the files
  save_pretrained writes, q_proj/k_proj/v_proj in the modules of transformers >= 5).

Read from the weights: width D and input channels and patch size (the stem's shape), depth (blocks.N), register
tokens, MLP width, native position grid (pos_embed's length). Heads: num_heads= if given, else the
`num_attention_heads` of a transformers config.json beside the file, else D/64 (64-wide heads: every size in
model.py, DINOv2 and the DALE-CT release).

Loading is strict: every tensor is used. Dropped, by name only: a classifier (timm's head.*, transformers'
classifier.*) and DINOv2's mask_token (its masked-image pretraining). Anything else missing, extra or of another
shape is one error naming them, with the likely fix.
"""
import json
import math
import re
from pathlib import Path

import torch

from common import read_state_dict
from model import ViT, resample_pos_embed, size_name

IGNORED_KEYS = ("head.weight", "head.bias")  # a timm classifier: not part of the backbone
HF_IGNORED = ("classifier.weight", "classifier.bias", "embeddings.mask_token")
HF_PREFIXES = ("dinov2.", "dinov2_with_registers.")  # the base model inside a ForImageClassification
RGB_MODES = ("repeat", "sum")

# transformers DINOv2 name -> ours (modeling_dinov2.py); q, k and v land apart and are stacked below
HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.query|q_proj)\.", r"blocks.\1.attn.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.key|k_proj)\.", r"blocks.\1.attn.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.value|v_proj)\.", r"blocks.\1.attn.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\.", r"blocks.\1.\2."),
    (r"^layernorm\.", "norm."),
]
# what model.py's ViT computes; a transformers config.json that says otherwise is refused, not half-loaded
HF_EXPECTED = {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "use_swiglu_ffn": False, "qkv_bias": True}


def is_transformers(sd):
    return any(k.removeprefix(p).startswith(("embeddings.", "encoder.layer.")) for k in sd for p in HF_PREFIXES)


def read_hf_config(path):
    """The DINOv2 config.json that save_pretrained writes beside the weights, or None."""
    cfg_path = Path(path).parent / "config.json"
    if not cfg_path.is_file():
        return None
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        return None  # some other model's config in the same folder: not ours to read
    for key, want in HF_EXPECTED.items():
        if key in config and config[key] != want:
            raise ValueError(f"{cfg_path}: {key}={config[key]!r}, but model.py's ViT has {want!r} (GELU MLP, "
                             "LayerNorm eps 1e-6, qkv bias): this DINOv2 variant cannot load here")
    return config


def from_transformers(sd, registers):
    """transformers DINOv2 keys -> ours. With registers, the CLS position is folded into cls_token and the table
    keeps the grid only (timm's _convert_dinov2): transformers adds CLS's position, then inserts the registers
    with none, so this is exact. Keys no rule knows keep their name, for the strict check to report."""
    out = {}
    for key, v in sd.items():
        key = next((key[len(p):] for p in HF_PREFIXES if key.startswith(p)), key)
        if key in HF_IGNORED:
            continue
        new = next((re.sub(p, r, key) for p, r in HF_RENAMES if re.match(p, key)), key)
        out[new] = v
    for q in [k for k in out if ".attn.q." in k]:
        parts = [q.replace(".attn.q.", f".attn.{c}.") for c in "qkv"]
        if all(p in out for p in parts):  # rows [q; k; v], each head-major: model.Attention's split
            out[q.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(p) for p in parts])  # (3D, ...)
    if out.get("reg_token") is not None and out["reg_token"].shape[1] == 0:
        del out["reg_token"]  # a registers model built with none
    if registers and out.get("pos_embed") is not None and out.get("cls_token") is not None:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]  # (1, 1, D)
        out["pos_embed"] = out["pos_embed"][:, 1:]  # (1, h*w, D)
    return out


def read_weights(path):
    """(state dict in our names, where it came from: format, class, config, position layout and resampling)."""
    sd = read_state_dict(path)
    if not is_transformers(sd):  # timm's resample_abs_pos_embed is antialiased; the layout is read from the table
        return sd, {"format": "timm", "class": "VisionTransformer", "config": None,
                    "no_embed_class": None, "antialias": True}
    config = read_hf_config(path)
    registers = (config["model_type"] == "dinov2_with_registers" if config
                 else any(k.endswith("embeddings.register_tokens") for k in sd))
    # transformers' Dinov2WithRegisters resamples positions antialiased, its Dinov2Model not (modeling_dinov2*.py)
    return from_transformers(sd, registers), {
        "format": "transformers", "class": "Dinov2WithRegistersModel" if registers else "Dinov2Model",
        "config": config, "no_embed_class": registers, "antialias": registers}


def read_shape(path, sd, no_embed_class=None):
    """(D, C, p, depth, registers, MLP width, native grid side, no_embed_class) from our-named weights.
    no_embed_class=None (timm weights): the table covers CLS and registers if that leaves a square grid
    (timm's default), else it holds the grid alone (timm's DINOv2-with-registers layout)."""
    stem = sd.get("patch_embed.proj.weight")
    if stem is None or stem.ndim != 4 or stem.shape[2] != stem.shape[3]:
        raise ValueError(f"{path}: found no square patch_embed.proj.weight (D, C, p, p): not a ViT backbone "
                         f"(first keys: {', '.join(list(sd)[:4])}); expected timm or transformers DINOv2 weights")
    D, C, p = stem.shape[0], stem.shape[1], stem.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    hidden = fc1.shape[0] if fc1 is not None else 4 * D
    L = sd["pos_embed"].shape[1] if sd.get("pos_embed") is not None else 0
    square = lambda n: n > 0 and math.isqrt(n) ** 2 == n
    if no_embed_class is None:
        no_embed_class = not square(L - 1 - reg) and square(L)
    n = L if no_embed_class else L - 1 - reg
    if not square(n):
        raise ValueError(f"{path}: pos_embed holds {L} positions, not a square grid "
                         f"{'alone' if no_embed_class else f'after CLS and {reg} registers'}: not a ViT backbone")
    return D, C, p, depth, reg, hidden, math.isqrt(n), no_embed_class


def load(path, *, img_size=None, rgb="repeat", num_heads=None):
    """A checkpoint file -> (ViT in eval mode, info: a JSON-able description for results.json).
    img_size: the grid the position table is stored at (default: the checkpoint's own, so nothing is
    resampled; the forward resamples for other inputs, as timm's dynamic_img_size does).
    rgb: an RGB stem is fed the slice on every channel ("repeat", in_chans stays 3) or has its weights
    summed over channels at load ("sum", in_chans 1): the same output, conv being linear in its input."""
    if rgb not in RGB_MODES:
        raise ValueError(f"rgb={rgb!r}: expected one of {', '.join(RGB_MODES)}")
    sd, src = read_weights(path)
    if any(k.endswith("patch_embed.proj.weight") and v.ndim == 5 for k, v in sd.items()):  # a Conv3d stem
        import swin3d  # a 3D Swin (ours or MONAI's SwinUNETR family): swin3d.py reads it
        return swin3d.load(sd, where=str(path))
    D, C, p, depth, reg, hidden, side, no_embed_class = read_shape(path, sd, src["no_embed_class"])
    config = src["config"]
    heads, heads_from = ((num_heads, "num_heads=") if num_heads else
                         (config["num_attention_heads"], "config.json") if config and "num_attention_heads" in config
                         else (D // 64, "width/64"))
    if heads < 1 or D % heads:
        raise ValueError(f"{path}: a {D}-wide ViT cannot have {heads} heads of equal width ({heads_from}): "
                         "give num_heads= (D must be a multiple of it)")
    if int(D * (hidden / D)) != hidden:  # the ViT takes a ratio; refuse one that would not give this width back
        raise ValueError(f"{path}: MLP width {hidden} is no whole-number ratio of the width {D}")
    if rgb == "sum" and C > 1:  # conv(x repeated C times, W) = conv(x, W summed over channels)
        sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].float().sum(1, keepdim=True)  # (D, 1, p, p)
    vit = ViT(D, depth, heads, img_size=img_size or side * p, in_chans=1 if rgb == "sum" else C,
              mlp_ratio=hidden / D, patch_size=p, reg_tokens=reg, no_embed_class=no_embed_class,
              pos_antialias=src["antialias"])
    fit(vit, sd, path, src["format"])
    info = {"format": src["format"], "class": src["class"], "vit": size_name(D, depth), "embed_dim": D, "depth": depth,
            "num_heads": heads, "heads_from": heads_from, "mlp_hidden": hidden, "patch_size": p,
            "reg_tokens": reg, "ckpt_in_chans": C, "in_chans": vit.in_chans, "rgb": rgb if C > 1 else None,
            "native_grid": side, "img_size": vit.img_size,
            "pos_embed": "grid only" if no_embed_class else "CLS, registers, grid",
            "pos_resample": f"bicubic, {'antialiased' if src['antialias'] else 'not antialiased'}, float32"}
    return vit.eval(), info


def load_into(vit, path):
    """Load a checkpoint (any format above) into a ViT you built, strictly."""
    sd, src = read_weights(path)
    return fit(vit, sd, path, src["format"])


def fit(vit, sd, path, fmt="timm"):
    """Copy our-named weights into vit: resample pos_embed if stored at another grid (vit's rule), drop only
    IGNORED_KEYS, refuse anything else that differs, every missing or extra key named."""
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    want = vit.state_dict()
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != want["pos_embed"].shape and pos.shape[-1] == vit.embed_dim:
        n = pos.shape[1] - vit.pos_prefix
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:  # a square grid after the prefix rows: resample it
            sd["pos_embed"] = resample_pos_embed(pos, vit.grid, (side, side), vit.pos_prefix, vit.pos_antialias)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    reshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}"
                for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or reshaped:
        what, todo = explain_mismatch(vit, sd, fmt)
        summary = "; ".join(f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in
                            (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if items)
        raise ValueError(f"{path}: {what}: {summary}. What to do: {todo}")
    vit.load_state_dict(sd, strict=True)
    return vit


def explain_mismatch(vit, sd, fmt="timm"):
    """(what is wrong, what to do) for a state dict that does not fit vit, most likely cause first."""
    def describe(width, depth):
        name = size_name(width, depth)
        return f"ViT-{name} ({width} wide, {depth} deep)" if name else f"a ViT {width} wide, {depth} deep"

    model = describe(vit.embed_dim, vit.depth)
    stem = sd.get("patch_embed.proj.weight")  # (D, C, p, p)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if stem is not None and depth and (stem.shape[0], depth) != (vit.embed_dim, vit.depth):
        name = size_name(stem.shape[0], depth)
        todo = f"build the model with build_vit({name!r})" if name else "build a ViT of the checkpoint's size"
        return (f"checkpoint is {describe(stem.shape[0], depth)} but the model is {model}",
                f"{todo}, or let backbones.load(path) build it")
    if stem is not None and stem.ndim == 4 and stem.shape[1] != vit.in_chans:
        return (f"checkpoint takes {stem.shape[1]} input channels, the model {vit.in_chans}",
                "load it with backbones.load(path), which builds the stem it needs (rgb='sum' for one channel)")
    if stem is not None and stem.ndim == 4 and stem.shape[-1] != vit.patch_size:
        return (f"checkpoint has {stem.shape[-1]} px patches, the model {vit.patch_size}",
                "load it with backbones.load(path), which reads the patch size from the weights")
    if fmt == "transformers":
        return (f"transformers DINOv2 weights do not match {model}",
                "expected a Dinov2Model or Dinov2WithRegistersModel (GELU MLP; SwiGLU, as in ViT-g, is not "
                "supported); only classifier.* and embeddings.mask_token may be extra")
    return (f"checkpoint does not match {model}",
            f"expected a timm-format VisionTransformer backbone (class token, LayerScale, {vit.in_chans} "
            f"input channel(s)); only {', '.join(IGNORED_KEYS)} may be extra")
