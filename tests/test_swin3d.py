"""swin3d.SwinEncoder is MONAI's SwinUNETR encoder (monai.networks.nets.swin_unetr.SwinTransformer): the same
weights, copied either way strictly, give the same five hidden states in float64 on sides that need padding, shift
masks and clamped windows; whole SwinUNETR checkpoints load, misfits are named; embed() and gradients."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swin3d import SwinEncoder, load_state_dict_any, triple  # noqa: E402

# MONAI imports in this process: it does not pull in the `kernels` distribution that the repository's kernels/
# would shadow (transformers does; see test_backbones.py)
swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
pytest.importorskip("einops")  # MONAI imports without it, but its SwinTransformer.forward needs it

# float64 on both sides: what is left is summation order (~4e-15 here); a wrong merge order, shift, mask, pad, clamp
# or bias index is > 7e-2, even the tanh GELU > 2e-4 (each was broken on purpose once, to see)
TOL = 1e-10
SMALL = dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))  # CPU-sized; depth 2: a shifted block per stage


def monai_swin(feature_size, depths, num_heads, window_size=7, patch_size=2, in_chans=1):
    """MONAI's encoder as SwinUNETR builds it (window and patch as triples, every other argument its default)."""
    return swin_unetr.SwinTransformer(in_chans=in_chans, embed_dim=feature_size, window_size=triple(window_size),
                                      patch_size=triple(patch_size), depths=depths, num_heads=num_heads)


@torch.no_grad()
def scramble(model, seed):
    """Weights far from their init: unit norms and near-zero bias tables would hide a swapped norm or index."""
    g = torch.Generator().manual_seed(seed)
    for key, p in model.named_parameters():
        if "norm" in key and key.endswith("weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
        elif "norm" in key or "relative_position_bias_table" in key or key.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p[0].numel() ** 0.5)
    return model


CASES = {  # window, input (B, C, D, H, W); the windows each stage gets are in the comments
    # 20x12x9 padded to 21x14x14 and shifted; 10x6x5: D shifted, H and W clamped to one window; then all clamped
    "w7": (7, (1, 1, 40, 24, 18)),
    # 10x12x9 and 5x6x5 padded and shifted; 3x3x3 as large as the window (unshifted), 2x2x2 clamped below it
    "w3_b2": (3, (2, 1, 20, 24, 18)),
    # an anisotropic window, odd input sides (the patch embedding pads) and odd sides at every merge
    "w534_odd": ((5, 3, 4), (1, 1, 19, 23, 17)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_monai_both_ways(case):
    window, shape = CASES[case]
    ref = scramble(monai_swin(window_size=window, **SMALL), seed=0).double().eval()
    ours = SwinEncoder(window_size=window, **SMALL).double().eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    for key, buf in ours.named_buffers():  # our own relative position index, before any load, is MONAI's
        assert torch.equal(buf, ref.get_buffer(key)), key
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    ours.load_state_dict(ref.state_dict(), strict=True)  # MONAI -> ours
    with torch.no_grad():
        for normalize in (True, False):
            want, got = ref(x, normalize), ours(x, normalize)
            assert len(got) == 5
            for i, (w, g) in enumerate(zip(want, got)):
                assert g.shape == w.shape, (i, g.shape, w.shape)
                err = (g - w).abs().max().item()
                assert err < TOL, f"{case}, normalize={normalize}, hidden state {i}: max error {err:.2e}"

    scramble(ours, seed=2)  # ours -> MONAI: different weights, copied the other way
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        for i, (w, g) in enumerate(zip(ref(x), ours(x))):
            assert (g - w).abs().max().item() < TOL, f"{case}, ours -> MONAI, hidden state {i}"


def test_default_sizes_are_swinunetr():
    unetr = swin_unetr.SwinUNETR(in_channels=1, out_channels=2, feature_size=48)  # CoralBay's / the paper's size
    ours = SwinEncoder()
    want = unetr.swinViT.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in want.items()}
    load_state_dict_any(ours, unetr.state_dict())
    assert all(torch.equal(v, want[k]) for k, v in ours.state_dict().items())


def test_loads_swinunetr_checkpoints_and_names_misfits(tmp_path):
    unetr = swin_unetr.SwinUNETR(in_channels=1, out_channels=2, window_size=3, **SMALL)
    sd = unetr.state_dict()  # swinViT.* plus the convolutional encoder1..10, decoder1..5 and out.*
    want = unetr.swinViT.state_dict()

    def same(model):
        return all(torch.equal(v, want[k]) for k, v in model.state_dict().items())

    assert same(load_state_dict_any(SwinEncoder(window_size=3, **SMALL), sd))
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}  # DDP around torch.compile
    assert same(load_state_dict_any(SwinEncoder(window_size=3, **SMALL), wrapped))
    torch.save({"state_dict": wrapped}, tmp_path / "swin_unetr.pt")  # a file, nested as training scripts save it
    assert same(load_state_dict_any(SwinEncoder(window_size=3, **SMALL), tmp_path / "swin_unetr.pt"))
    assert same(load_state_dict_any(SwinEncoder(window_size=3, **SMALL), want))  # a bare SwinTransformer's

    missing = {k: v for k, v in sd.items() if k != "swinViT.layers2.0.blocks.1.attn.qkv.bias"}
    with pytest.raises(ValueError, match=r"1 missing \(layers2\.0\.blocks\.1\.attn\.qkv\.bias\)"):
        load_state_dict_any(SwinEncoder(window_size=3, **SMALL), missing)
    extra = {**sd, "swinViT.layers1.0.blocks.0.attn.gate": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 extra \(layers1\.0\.blocks\.0\.attn\.gate\)"):
        load_state_dict_any(SwinEncoder(window_size=3, **SMALL), extra)
    with pytest.raises(ValueError, match=r"of another shape .*relative_position_bias_table.*What to do: build"):
        load_state_dict_any(SwinEncoder(window_size=7, **SMALL), sd)  # trained with window 3
    deeper = SwinEncoder(window_size=3, feature_size=12, depths=(2, 2, 4, 2), num_heads=(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"missing \(layers3\.0\.blocks\.2\..*set depths"):
        load_state_dict_any(deeper, sd)
    ssl = {k.replace("mlp.linear", "mlp.fc"): v for k, v in want.items()}  # the SSL pretraining file's MLP names
    with pytest.raises(ValueError, match=r"model_swinvit\.pt"):
        load_state_dict_any(SwinEncoder(window_size=3, **SMALL), ssl)


def test_embed_is_the_mean_of_every_hidden_state():
    enc = SwinEncoder(window_size=4, **SMALL).eval()
    assert enc.embed_dim == 12 * (1 + 2 + 4 + 8 + 16) == 372
    x = torch.randn(2, 1, 24, 20, 16)
    with torch.no_grad():
        z, states = enc.embed(x), enc(x)
    assert z.shape == (2, enc.embed_dim)
    assert torch.allclose(z, torch.cat([s.mean(dim=(2, 3, 4)) for s in states], 1), atol=1e-6)
    assert [s.shape[1] for s in states] == [12, 24, 48, 96, 192]


def test_gradients_reach_every_parameter():
    enc = SwinEncoder(window_size=4, **SMALL)
    x = torch.randn(1, 1, 24, 20, 16)
    # a random direction: the sum of a LayerNormed vector is 0 whatever the weights, so it would carry no gradient
    z = enc.embed(x)  # (1, embed_dim)
    (z * torch.randn_like(z)).sum().backward()
    for key, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
