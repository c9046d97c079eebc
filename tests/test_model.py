"""The ViT speaks timm's key format, takes any size divisible by 16, loads strictly, and trains."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import (VIT_SIZES, DenseHeads, Projector, ViT, build_vit, load_backbone,  # noqa: E402
                   resample_pos_embed, vit_flops_per_image)


def small_vit(img_size=64, depth=2):
    torch.manual_seed(0)
    return ViT(embed_dim=64, depth=depth, num_heads=2, img_size=img_size)


def timm_keys(dim, depth, grid, in_chans=1, mlp_ratio=4):
    """timm VisionTransformer(class_token=True, init_values set, num_classes=0) keys and shapes,
    written from timm's naming rules: the model's own parameters first, then its modules in
    the order they are built (patch_embed, blocks: norm1 attn ls1 norm2 mlp ls2, then norm)."""
    hidden = dim * mlp_ratio
    keys = [("cls_token", (1, 1, dim)), ("pos_embed", (1, 1 + grid * grid, dim)),
            ("patch_embed.proj.weight", (dim, in_chans, 16, 16)), ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
                 (b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.qkv.bias", (3 * dim,)),
                 (b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
                 (b + "ls1.gamma", (dim,)),
                 (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
                 (b + "mlp.fc1.weight", (hidden, dim)), (b + "mlp.fc1.bias", (hidden,)),
                 (b + "mlp.fc2.weight", (dim, hidden)), (b + "mlp.fc2.bias", (dim,)),
                 (b + "ls2.gamma", (dim,))]
    return keys + [("norm.weight", (dim,)), ("norm.bias", (dim,))]


def test_keys_and_shapes_are_timms():
    vit = build_vit("tiny", img_size=64)
    got = [(k, tuple(v.shape)) for k, v in vit.state_dict().items()]
    assert got == timm_keys(192, 6, grid=4)
    assert all(v.requires_grad for v in vit.parameters())


def reference_forward(sd, x, num_heads, eps=1e-6):
    """timm's ViT forward spelled out on a state dict (native input size only)."""
    D = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)  # (B, D, h, w)
    B = t.shape[0]
    t = torch.cat([sd["cls_token"].expand(B, 1, D), t.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    N, d = t.shape[1], D // num_heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(t, (D,), p["norm1.weight"], p["norm1.bias"], eps)
        q, k, v = (y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).split(D, dim=-1)  # q rows, k rows, v rows
        q, k, v = (z.reshape(B, N, num_heads, d).transpose(1, 2) for z in (q, k, v))  # heads are column blocks
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v  # (B, h, N, d)
        a = a.transpose(1, 2).reshape(B, N, D) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        t = t + p["ls1.gamma"] * a
        y = F.layer_norm(t, (D,), p["norm2.weight"], p["norm2.bias"], eps)
        y = F.gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
        t = t + p["ls2.gamma"] * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)
    return t[:, 0], t[:, 1:]


def test_forward_matches_reference():
    vit = small_vit(img_size=48)
    with torch.no_grad():  # LayerScale at 1e-5 would hide the blocks: make every parameter count
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 1, 48, 48)
    for got, want in zip(vit(x), reference_forward(vit.state_dict(), x, num_heads=2)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_sizes_and_init():
    # parameter counts of timm's vit_base_patch16_224 / vit_large_patch16_224 (3 channels, 224 px) without
    # their 1000-class head (86,567,656 - 769,000 and 304,326,632 - 1,025,000), plus LayerScale's 2 x D per block
    for size, count in (("base", 85_798_656 + 12 * 2 * 768), ("large", 303_301_632 + 24 * 2 * 1024)):
        assert sum(p.numel() for p in build_vit(size, img_size=224, in_chans=3).parameters()) == count, size
    assert all(s.embed_dim // s.num_heads == 64 for s in VIT_SIZES.values())  # 64-wide heads in every size
    vit = build_vit("tiny", img_size=64)
    assert vit.embed_dim == 192
    assert vit.cls_token.abs().max() < 1e-4  # std 1e-6
    assert 0.015 < vit.pos_embed.std() < 0.025 and vit.pos_embed.abs().max() <= 2.0
    blk = vit.blocks[0]
    assert 0.015 < blk.attn.qkv.weight.std() < 0.025 and blk.mlp.fc2.bias.abs().max() == 0
    assert torch.all(blk.ls1.gamma == 1e-5) and torch.all(blk.ls2.gamma == 1e-5)
    assert blk.norm1.eps == 1e-6 and vit.norm.eps == 1e-6
    with pytest.raises(ValueError, match="huge"):
        build_vit("huge")
    with pytest.raises(ValueError, match="multiple"):
        build_vit("tiny", img_size=100)


def test_layerscale_init_is_a_training_choice_not_a_weight():
    """init_values sets every block's starting gain (RECIPE.md 4 keeps 1e-5; the phantom preset starts
    at CaiT's 0.1 for shallow models) and loading a checkpoint overwrites it."""
    shallow = build_vit("tiny", img_size=32, init_values=0.1)
    assert all(torch.all(b.ls1.gamma == 0.1) and torch.all(b.ls2.gamma == 0.1) for b in shallow.blocks)
    x = torch.randn(3, 1, 32, 32)
    default = build_vit("tiny", img_size=32)
    # with 1e-5 the blocks barely touch the CLS token, so it hardly depends on the image; with 0.1 it does
    spread = lambda vit: (vit(x)[0] - vit(x[:1])[0]).abs().max()
    assert spread(default) < 0.1 < spread(shallow)
    default.load_state_dict(shallow.state_dict())
    assert torch.equal(default(x)[0], shallow(x)[0])


def test_any_size_divisible_by_16():
    vit = small_vit(img_size=256).eval()
    for H, W in [(64, 64), (144, 144), (256, 256), (64, 128), (16, 16)]:
        cls, patches = vit(torch.randn(2, 1, H, W))
        assert cls.shape == (2, 64) and patches.shape == (2, (H // 16) * (W // 16), 64)
        assert torch.isfinite(patches).all()
    with pytest.raises(ValueError, match="100x64"):
        vit(torch.randn(1, 1, 100, 64))


def test_pos_embed_resampling():
    vit = small_vit(img_size=256)
    pos = vit.pos_embed.detach()
    assert resample_pos_embed(pos, (16, 16), (16, 16)) is pos  # identity at the native grid
    small = resample_pos_embed(pos, (9, 9), (16, 16))
    assert small.shape == (1, 82, 64)
    assert torch.equal(small[:, 0], pos[:, 0])  # the CLS position is never resampled
    # a smooth grid survives down- and upsampling; a wrong reshape order would scramble it
    ramp = torch.linspace(-1, 1, 16)
    grid = (ramp[:, None, None] + 0.5 * ramp[None, :, None]).expand(16, 16, 64).reshape(1, 256, 64)
    smooth = torch.cat([torch.zeros(1, 1, 64), grid], dim=1)
    back = resample_pos_embed(resample_pos_embed(smooth, (8, 8), (16, 16)), (16, 16), (8, 8))
    inner = (back - smooth)[0, 1:].reshape(16, 16, 64)[3:-3, 3:-3]
    assert inner.abs().max() < 0.02
    # bicubic, as timm: on an edge it over- and undershoots, where bilinear would stay in [0, 1]
    step = torch.cat([torch.zeros(1, 1, 1), (torch.arange(16) % 4 >= 2).float().reshape(1, 16, 1)], dim=1)
    up = resample_pos_embed(step, (8, 8), (4, 4))[0, 1:]
    assert up.min() < -0.01 and up.max() > 1.01
    # non-square grids keep rows as rows: a value that depends on the row only stays so
    rows = torch.arange(4.0).repeat_interleave(8).reshape(1, 32, 1)  # 4 rows of 8
    wide = resample_pos_embed(torch.cat([torch.zeros(1, 1, 1), rows], dim=1), (6, 12), (4, 8))[0, 1:, 0]
    wide = wide.reshape(6, 12)
    assert torch.allclose(wide, wide[:, :1].expand(6, 12), atol=1e-5) and torch.all(wide[1:, 0] > wide[:-1, 0])


def test_final_norm_and_heads():
    vit = small_vit()
    with torch.no_grad():  # a random affine, so "normed" is checked before it
        vit.norm.weight.uniform_(0.5, 2.0)
        vit.norm.bias.normal_()
    cls, patches = vit(torch.randn(3, 1, 64, 48))
    tokens = torch.cat([cls[:, None], patches], dim=1)  # (B, 1+T, D)
    raw = (tokens - vit.norm.bias) / vit.norm.weight
    assert raw.mean(-1).abs().max() < 1e-4
    # 1e-2, not 1e-6: at init the CLS token's variance is only ~4e-4 (pos_embed std .02), so
    # LayerNorm's eps=1e-6 visibly shrinks it; patch tokens come out within 1e-5
    assert (raw.std(-1, unbiased=False) - 1).abs().max() < 1e-2
    assert (raw[:, 1:].std(-1, unbiased=False) - 1).abs().max() < 1e-4
    z = Projector(64)(cls)
    assert z.shape == (3, 124)
    out = DenseHeads(64)(cls, patches)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "anat_cls": (3, 118), "anat_patch": (3, 12, 118), "abn_cls": (3, 14), "abn_patch": (3, 12, 14)}
    heads = DenseHeads(64)
    # the same linear map on every token; a batched matmul and a single one may round differently
    # (seen: 1e-5 apart in the 4th digit on one CPU), hence the float32-sized tolerance
    assert torch.allclose(heads(cls, patches)["anat_patch"][:, 5], heads.anatomy(patches[:, 5]), rtol=1e-4, atol=1e-5)


def test_gradient_reaches_every_parameter():
    vit, proj, heads = small_vit(), Projector(64, hidden=32, out=8), DenseHeads(64)
    torch.manual_seed(1)
    cls, patches = vit(torch.randn(4, 1, 48, 64))
    out = heads(cls, patches)
    # random weights: a plain sum of LayerNorm outputs has no gradient at all
    loss = sum((t * torch.randn_like(t)).sum() for t in [cls, patches, proj(cls), *out.values()])
    loss.backward()
    for module in (vit, proj, heads):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast():
    vit = small_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, patches = vit(torch.randn(2, 1, 64, 64))
        DenseHeads(64)(cls, patches)["abn_patch"].float().sum().backward()
    assert torch.isfinite(cls.float()).all() and vit.pos_embed.grad is not None


def test_flops():
    vit = small_vit(depth=3)
    N, D = 17, 64  # 64 px: 16 patches + CLS
    assert vit_flops_per_image(vit, 64) == 2 * 16 * 256 * D + 3 * (24 * N * D * D + 4 * N * N * D)
    assert vit_flops_per_image(vit, (64, 128)) > vit_flops_per_image(vit, 64)
    # ViT-B/16 at 224 px is about 17.6 GMACs with 3 channels; one channel removes 2/3 of the stem
    with torch.device("meta"):  # shapes only: no 86M-parameter init
        base = build_vit("base", img_size=224)
    assert abs(vit_flops_per_image(base, 224) / 1e9 - 34.97) < 0.05


def test_load_roundtrip_nested_and_prefixed(tmp_path):
    src, dst = small_vit(), small_vit()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    x = torch.randn(2, 1, 64, 64)
    wrapped = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "step": 7, "config": {"lr": 3e-4}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    load_backbone(dst, tmp_path / "ckpt.pt")
    for a, b in zip(src.eval()(x), dst.eval()(x)):
        assert torch.equal(a, b)
    # raw state dict, compiled-model prefix, .pth
    torch.save({f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, tmp_path / "raw.pth")
    assert torch.equal(load_backbone(small_vit(), tmp_path / "raw.pth").pos_embed, src.pos_embed)
    # a timm classifier head is the only thing ignored
    with_head = dict(src.state_dict(), **{"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    torch.save(with_head, tmp_path / "timm.pth")
    load_backbone(small_vit(), tmp_path / "timm.pth")
    torch.save(dict(src.state_dict(), **{"fc_norm.weight": torch.ones(64)}), tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="1 unexpected.*fc_norm.weight"):
        load_backbone(small_vit(), tmp_path / "extra.pth")


def test_load_whole_pretraining_model(tmp_path):
    vit, proj = small_vit(), Projector(64)
    whole = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    whole.update({f"projector.{k}": v for k, v in proj.state_dict().items()})
    torch.save({"model": whole}, tmp_path / "train.pt")
    loaded = load_backbone(small_vit(depth=2), tmp_path / "train.pt")
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


def test_load_other_grid_resamples_pos_embed(tmp_path):
    src = small_vit(img_size=64)
    torch.save(src.state_dict(), tmp_path / "64.pt")
    dst = load_backbone(small_vit(img_size=128), tmp_path / "64.pt")
    assert dst.pos_embed.shape == (1, 65, 64)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_load_mismatch_errors(tmp_path):
    torch.save(build_vit("small", img_size=32).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError) as err:
        load_backbone(build_vit("tiny", img_size=32), tmp_path / "small.pt")
    msg = str(err.value)
    assert "small.pt" in msg and "ViT-small (384 wide, 12 deep)" in msg and "ViT-tiny (192 wide, 6 deep)" in msg
    assert "build_vit('small')" in msg and "\n" not in msg

    sd = small_vit().state_dict()
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="1 missing.*blocks.1.ls2.gamma"):
        load_backbone(small_vit(), tmp_path / "missing.pt")

    rgb = dict(small_vit().state_dict(), **{"patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)})
    torch.save(rgb, tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match="3 input channels"):
        load_backbone(small_vit(), tmp_path / "rgb.pt")

    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_backbone(small_vit(), tmp_path / "nowhere.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors, .pt or .pth"):
        load_backbone(small_vit(), tmp_path / "w.npz")
    torch.save({"model": Path("not/a/tensor")}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt.*weights_only.*Unsupported global"):
        load_backbone(small_vit(), tmp_path / "pickled.pt")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_backbone(small_vit(), tmp_path / "opt.pt")


def test_safetensors(tmp_path):
    src = small_vit()
    path = tmp_path / "w.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"\0")
        with pytest.raises(ImportError, match="pip install safetensors"):
            load_backbone(small_vit(), path)
        return
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert torch.equal(load_backbone(small_vit(), path).norm.weight, src.norm.weight)


def test_patch_size_and_registers_follow_timm():
    """timm's VisionTransformer(patch_size=p, reg_tokens=R): reg_token (1, R, D) right after cls_token (init std
    1e-6), a pos_embed row for CLS and each register unless no_embed_class; registers leave the output."""
    torch.manual_seed(0)
    vit = ViT(64, 2, 2, img_size=56, patch_size=14, reg_tokens=4)
    keys = [(k, tuple(v.shape)) for k, v in vit.state_dict().items()]
    assert keys[:4] == [("cls_token", (1, 1, 64)), ("reg_token", (1, 4, 64)), ("pos_embed", (1, 1 + 4 + 16, 64)),
                        ("patch_embed.proj.weight", (64, 1, 14, 14))]
    assert ViT(64, 2, 2, img_size=56, patch_size=14, reg_tokens=4, no_embed_class=True).pos_embed.shape == (1, 16, 64)
    assert 0 < vit.reg_token.abs().max() < 1e-4 and "reg_token" not in build_vit("tiny", img_size=32).state_dict()
    x = torch.randn(2, 1, 70, 42)
    with torch.no_grad():  # LayerScale at 1 so attention shows: the registers take part in it
        for blk in vit.blocks:
            blk.ls1.gamma.fill_(1.0)
    cls, patches = vit(x)
    assert cls.shape == (2, 64) and patches.shape == (2, 5 * 3, 64)
    with torch.no_grad():  # other registers, another CLS
        vit.reg_token.normal_()
    assert not torch.allclose(vit(x)[0], cls, atol=1e-3)
    with pytest.raises(ValueError, match="64x64 px.*multiples of 14"):
        vit(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="img_size=64 is not a multiple of the patch size 14: pick e.g. 70"):
        ViT(64, 2, 2, img_size=64, patch_size=14)
    T, N, D = 16, 21, 64  # 56 px: 4x4 patches of 14 px, plus CLS and 4 registers
    assert vit_flops_per_image(vit, 56) == 2 * T * 14 * 14 * D + 2 * (24 * N * D * D + 4 * N * N * D)


def test_resampling_keeps_every_prefix_row_and_follows_the_rule():
    pos = torch.randn(1, 5 + 16, 8)  # CLS, 4 registers, a 4x4 grid
    up = resample_pos_embed(pos, (6, 6), (4, 4), prefix=5)
    assert up.shape == (1, 5 + 36, 8) and torch.equal(up[:, :5], pos[:, :5])
    # antialiased (timm) and plain (transformers' Dinov2Model) bicubic differ even when upsampling
    plain = resample_pos_embed(pos, (6, 6), (4, 4), prefix=5, antialias=False)
    assert (plain - up).abs().max() > 1e-3
    assert torch.allclose(plain[:, 5:], F.interpolate(pos[:, 5:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 6),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 8))
