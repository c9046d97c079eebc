"""backbones.load reads every backbone of the comparison: transformers' DINOv2 (with and without registers)
gives transformers' own outputs, timm-format DALE-CT weights (patch 16 and 14) give a written-out timm
forward, at the native grid and at others; every misfit is named; our own checkpoints load bitwise."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbones  # noqa: E402
import probe  # noqa: E402
from model import ViT, build_vit  # noqa: E402

# float64 on both sides: what is left is summation order (~1e-15 here); a wrong rename, rule or layout is >1e-4
TOL = 1e-10

# The transformers side runs in a process of its own (-I: no repository on its path). transformers imports the
# `kernels` distribution at start-up, and the repository's kernels/ package would shadow it in this process.
HF_SIDE = r"""
import sys
from pathlib import Path
import torch
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersForImageClassification, Dinov2WithRegistersModel)

out = Path(sys.argv[1])
torch.manual_seed(0)
for name, registers, patch, chans, other in [("dinov2_p14_c1", False, 14, 1, 6), ("dinov2_p16_c3", False, 16, 3, 3),
                                             ("reg_p16_c3", True, 16, 3, 3), ("reg_p14_c1", True, 14, 1, 6)]:
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=patch, num_channels=chans,
              image_size=4 * patch)  # a 4x4 native grid
    if registers:  # saved as a classifier: a `dinov2_with_registers.` prefix, plus classifier.*
        model = Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
        base = model.dinov2_with_registers
    else:
        model = base = Dinov2Model(Dinov2Config(**kw))
    with torch.no_grad():  # layer scales and norms far from 1 and 0; positions large enough to matter
        for key, p in base.named_parameters():
            if key.endswith(("lambda1", "norm1.weight", "norm2.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
            elif key.endswith(("norm1.bias", "norm2.bias", "layernorm.bias")) or "register" in key:
                p.normal_(0, 0.5)
        emb = base.embeddings
        emb.position_embeddings.normal_()
        # CLS and its position on a 2**-10 grid: their sum, folded into cls_token at load, is exact in float32
        emb.cls_token.copy_((torch.randn_like(emb.cls_token) * 1024).round() / 1024)
        emb.position_embeddings[:, 0] = (emb.position_embeddings[:, 0] * 1024).round() / 1024
    model.eval().save_pretrained(out / name)  # model.safetensors (transformers' pre-v5 key names) + config.json
    torch.save(base.state_dict(), out / name / "pytorch_model.bin")  # the names of transformers >= 5
    (out / name / "bare").mkdir()  # prefixed, and no config.json beside it
    torch.save({f"dinov2.{k}": v for k, v in base.state_dict().items()}, out / name / "bare" / "pytorch_model.bin")
    base.double()
    ref = {}
    for side in (4 * patch, other * patch):  # native, and another grid (3x3 down, 6x6 up)
        x = torch.randn(2, chans, side, side, dtype=torch.float64)
        with torch.no_grad():
            ref[side] = (x, base(pixel_values=x).last_hidden_state)  # CLS, registers, patches
    torch.save(ref, out / name / "reference.pt")
"""
HF_CASES = {"dinov2_p14_c1": (14, 1, 0), "dinov2_p16_c3": (16, 3, 0), "reg_p16_c3": (16, 3, 4), "reg_p14_c1": (14, 1, 4)}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("transformers")
    run = subprocess.run([sys.executable, "-I", "-c", HF_SIDE, str(out)], cwd=out, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def max_err(vit, x, want, reg):
    cls, patches = vit(x)
    return max((cls - want[:, 0]).abs().max().item(), (patches - want[:, 1 + reg:]).abs().max().item())


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_dinov2_gives_transformers_outputs(hf, case):
    patch, chans, reg = HF_CASES[case]
    ref = torch.load(hf / case / "reference.pt")
    files = [("model.safetensors", {}, "config.json"), ("pytorch_model.bin", {}, "config.json"),
             ("bare/pytorch_model.bin", {"num_heads": 2}, "num_heads=")]
    for file, kw, heads_from in files:
        vit, info = backbones.load(hf / case / file, **kw)
        assert (info["format"], info["class"]) == ("transformers", "Dinov2WithRegistersModel" if reg else "Dinov2Model")
        assert (info["patch_size"], info["in_chans"], info["reg_tokens"], info["native_grid"]) == (patch, chans, reg, 4)
        assert info["heads_from"] == heads_from and json.loads(json.dumps(info)) == info
        vit.double()
        with torch.no_grad():
            for x, want in ref.values():
                assert max_err(vit, x, want, reg) < TOL, (file, x.shape)
            # the resampling rule is the model's own: the other one is visibly off at the non-native size
            x, want = ref[max(ref)] if patch == 14 else ref[min(ref)]
            vit.pos_antialias = not vit.pos_antialias
            assert max_err(vit, x, want, reg) > 1e-4
    # without config.json and num_heads, heads are width/64: one 64-wide head, not transformers' two
    assert backbones.load(hf / case / "bare" / "pytorch_model.bin")[1]["num_heads"] == 1


def test_rgb_sum_is_repeat(hf):
    x, _ = torch.load(hf / "reg_p16_c3" / "reference.pt")[64]  # (2, 3, 64, 64)
    repeat, info = backbones.load(hf / "reg_p16_c3" / "model.safetensors")
    summed, info_sum = backbones.load(hf / "reg_p16_c3" / "model.safetensors", rgb="sum")
    assert (repeat.in_chans, summed.in_chans, info["rgb"], info_sum["rgb"]) == (3, 1, "repeat", "sum")
    one = x[:, :1]  # (B, 1, H, W): a CT slice
    with torch.no_grad():
        for a, b in zip(repeat.double()(one.expand(-1, 3, -1, -1)), summed.double()(one)):
            # the same sum in another order, the summed kernel rounded once to the checkpoint's float32 (6e-8 rel.)
            assert (a - b).abs().max() < 1e-6
    # the probe feeds an RGB stem the slice on every channel; its features equal the summed stem's
    slices = np.random.default_rng(0).integers(-1000, 1000, (5, 64, 64)).astype(np.int16)
    f3 = probe.extract_features(repeat.float(), slices, 64, batch_size=2)
    f1 = probe.extract_features(summed.float(), slices, 64, batch_size=2)
    assert f3.shape == (5, 64) and np.allclose(f3, f1, atol=1e-5)


def test_transformers_misfits_are_named(hf, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(hf / "reg_p16_c3", case)
    sd = torch.load(case / "pytorch_model.bin")
    sd["encoder.layer.1.mlp.weights_in.weight"] = torch.zeros(8, 64)  # a SwiGLU weight (DINOv2 ViT-g)
    del sd["encoder.layer.0.layer_scale2.lambda1"]
    torch.save(sd, case / "odd.bin")
    with pytest.raises(ValueError) as e:
        backbones.load(case / "odd.bin")
    msg = str(e.value)
    assert "odd.bin" in msg and "1 missing (e.g. blocks.0.ls2.gamma)" in msg and "\n" not in msg
    assert "1 unexpected (e.g. encoder.layer.1.mlp.weights_in.weight)" in msg and "SwiGLU" in msg
    config = json.loads((case / "config.json").read_text())
    (case / "config.json").write_text(json.dumps(dict(config, hidden_act="silu")))
    with pytest.raises(ValueError, match=r"config.json: hidden_act='silu'"):
        backbones.load(case / "model.safetensors")


# ----------------------------------------------------------------------------------------
# timm format: written out independently of model.py

def timm_forward(sd, x, heads, p, reg=0, grid_only=False, antialias=True, eps=1e-6):
    """timm's VisionTransformer forward on a state dict: CLS, then registers, then patches; the position table
    covers all of them (timm's default) or the patches only (no_embed_class), resampled bicubically in float32."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)  # (B, D, h, w)
    B, D, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)  # (B, T, D)
    pos, P = sd["pos_embed"], 0 if grid_only else 1 + reg
    n = math.isqrt(pos.shape[1] - P)
    grid = pos[:, P:].reshape(1, n, n, D).permute(0, 3, 1, 2)  # (1, D, n, n)
    if (h, w) != (n, n):
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", antialias=antialias).to(pos.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)
    prefix = [sd["cls_token"].expand(B, 1, D)] + ([sd["reg_token"].expand(B, reg, D)] if reg else [])
    t = torch.cat(prefix + [t + grid], 1) if grid_only else torch.cat(prefix + [t], 1) + torch.cat([pos[:, :P], grid], 1)
    N, d = t.shape[1], D // heads
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        b = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(t, (D,), b["norm1.weight"], b["norm1.bias"], eps)
        q, k, v = ((y @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]).reshape(B, N, 3, heads, d)
                   .permute(2, 0, 3, 1, 4))  # each (B, h, N, d)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v  # (B, h, N, d)
        t = t + b["ls1.gamma"] * (a.transpose(1, 2).reshape(B, N, D) @ b["attn.proj.weight"].T + b["attn.proj.bias"])
        y = F.layer_norm(t, (D,), b["norm2.weight"], b["norm2.bias"], eps)
        y = F.gelu(y @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"]) @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"]
        t = t + b["ls2.gamma"] * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps)
    return t[:, 0], t[:, 1 + reg:]


def random_timm(path, img_size, patch_size=16, reg_tokens=0, no_embed_class=False, dim=64):
    """A timm-format checkpoint of a narrow ViT with every parameter random; returns its state dict."""
    torch.manual_seed(0)
    vit = ViT(dim, 2, dim // 64, img_size=img_size, patch_size=patch_size, reg_tokens=reg_tokens,
              no_embed_class=no_embed_class)
    sd = {k: torch.randn_like(v) * (0.3 if v.ndim > 1 else 1.0) for k, v in vit.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd


def check_timm(path, sd, sides, **rule):
    vit, info = backbones.load(path)
    vit.double()
    sd64 = {k: v.double() for k, v in sd.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for side in sides:
            x = torch.randn(1, 1, side, side, dtype=torch.float64)
            for got, want in zip(vit(x), timm_forward(sd64, x, info["num_heads"], info["patch_size"], **rule)):
                assert (got - want).abs().max() < TOL, side
    return info


def test_dale_ct_release_format_runs_at_256(tmp_path):
    # DALE-CT-2S / 0: bare timm keys, patch 16, a 32x32 grid (512 px), here 64 wide
    path = tmp_path / "model.safetensors"
    info = check_timm(path, random_timm(path, 512), [256, 512])  # 16x16: resampled positions
    assert (info["format"], info["patch_size"], info["native_grid"], info["reg_tokens"]) == ("timm", 16, 32, 0)
    assert (info["num_heads"], info["heads_from"], info["pos_embed"]) == (1, "width/64", "CLS, registers, grid")
    # stored at 256 instead: resampled once at load, the same numbers as resampling in every forward
    x = torch.randn(2, 1, 256, 256)
    a, _ = backbones.load(path)
    b, info = backbones.load(path, img_size=256)
    assert info["img_size"] == 256 and b.pos_embed.shape == (1, 1 + 256, 64)
    assert torch.equal(a(x)[0], b(x)[0])


def test_patch_14_release_format_at_518_and_266(tmp_path):
    # DALE-CT-1S(-v2): patch 14, a 37x37 grid (518 px)
    path = tmp_path / "model.safetensors"
    info = check_timm(path, random_timm(path, 518, patch_size=14), [518, 266])  # 37x37 and 19x19
    assert (info["patch_size"], info["native_grid"], info["img_size"]) == (14, 37, 518)
    with pytest.raises(ValueError, match="100x100 px.*multiples of 14"):
        backbones.load(path)[0](torch.randn(1, 1, 100, 100))

def test_patch_14_probes_at_256_as_the_release_does(tmp_path, capsys):
    # the release probes every backbone at 256 px: a stride-14 patch convolution sees 18x18 patches, 252 px
    path = tmp_path / "model.safetensors"
    random_timm(path, 518, patch_size=14)
    vit, _ = probe.load_model(probe.ProbeConfig(ckpt=str(path), img_size=256))
    assert "18x18 patches cover 252 px" in capsys.readouterr().out
    x = torch.randn(2, 1, 256, 256)
    torch.testing.assert_close(vit.patch_embed(x), vit.patch_embed(x[..., :252, :252]), rtol=0, atol=0)
    slices = torch.randint(-1000, 1000, (3, 300, 300), dtype=torch.int16).numpy()
    feats = probe.extract_features(vit, slices, 256, norm=probe.NORMS["dale_ct"])
    assert feats.shape == (3, vit.embed_dim) and np.isfinite(feats).all()


@pytest.mark.parametrize("grid_only", [False, True])
def test_timm_registers_either_layout(tmp_path, grid_only):
    # timm's default table covers CLS and registers; its DINOv2-with-registers models hold the grid only
    path = tmp_path / "reg.pt"
    info = check_timm(path, random_timm(path, 64, reg_tokens=4, no_embed_class=grid_only), [64, 48],
                      reg=4, grid_only=grid_only)
    assert info["reg_tokens"] == 4 and info["pos_embed"] == ("grid only" if grid_only else "CLS, registers, grid")


def test_our_checkpoints_load_bitwise(tmp_path):
    torch.manual_seed(0)
    src = build_vit("tiny", img_size=64)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, "step": 3}, tmp_path / "ckpt.pt")
    vit, info = backbones.load(tmp_path / "ckpt.pt")
    assert info["vit"] == "tiny" and info["num_heads"] == 3 and list(vit.state_dict()) == list(src.state_dict())
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in vit.state_dict().items())
    x = torch.randn(2, 1, 48, 64)
    assert all(torch.equal(a, b) for a, b in zip(vit(x), src.eval()(x)))


def test_timm_misfits_are_named(tmp_path):
    sd = random_timm(tmp_path / "ok.pt", 64)
    del sd["blocks.1.ls2.gamma"]
    sd["fc_norm.weight"] = torch.ones(64)
    sd["blocks.0.mlp.fc2.bias"] = torch.zeros(65)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        backbones.load(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "\n" not in msg and "What to do" in msg
    assert "1 missing (e.g. blocks.1.ls2.gamma)" in msg and "1 unexpected (e.g. fc_norm.weight)" in msg
    assert "1 of another shape (e.g. blocks.0.mlp.fc2.bias (65,) vs (64,))" in msg
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: found no square patch_embed.proj.weight.*not a ViT"):
        backbones.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="rgb='mean': expected one of repeat, sum"):
        backbones.load(tmp_path / "ok.pt", rgb="mean")
    with pytest.raises(ValueError, match="64-wide ViT cannot have 5 heads"):
        backbones.load(tmp_path / "ok.pt", num_heads=5)
