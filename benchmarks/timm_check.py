"""
benchmarks/timm_check.py: our ViT's state dict loads into timm's VisionTransformer with strict key
checks and gives the same features, and timm's loads back into ours (model.py's claim).

    pip install timm && python benchmarks/timm_check.py --vit=large      # CPU or GPU; float32, tf32 off

timm is not a dependency of this repo (tests/test_model.py checks the key format from timm's naming
rules without it); this script is where the claim meets timm itself. It exits non-zero on a
mismatch.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import POSITIVE, at_least, one_of, parse_config, setting  # noqa: E402
from model import VIT_SIZES, build_vit, load_backbone  # noqa: E402

TIMM_NAMES = {"tiny": None, "small": "vit_small_patch16_224", "base": "vit_base_patch16_224",
              "large": "vit_large_patch16_224"}


@dataclass
class Check:
    vit: str = setting("large", one_of("small", "base", "large"))  # a size timm has a model of
    img_size: int = setting(256, at_least(16))  # the stored position grid
    tol: float = setting(1e-4, POSITIVE)        # worst relative token difference allowed


def main(size="large", img_size=256, tol=1e-4):
    import timm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    # LayerScale at 0.1, not 1e-5, so that every block moves the output and a wrong block would show
    ours = build_vit(size, img_size=img_size, init_values=0.1).to(device).eval()
    s = VIT_SIZES[size]
    theirs = timm.create_model(TIMM_NAMES[size], pretrained=False, img_size=img_size, in_chans=1, num_classes=0,
                               init_values=0.1, dynamic_img_size=True).to(device).eval()
    assert (theirs.embed_dim, len(theirs.blocks)) == (s.embed_dim, s.depth)
    # every tensor of ours, randomised (biases and norms too), into timm with strict key checks
    state = {k: torch.randn_like(v) * (0.02 if v.dim() > 1 else 0.1) + (1.0 if k.endswith("norm.weight") or
             ".norm1.weight" in k or ".norm2.weight" in k else 0.0) for k, v in ours.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    theirs.load_state_dict(state, strict=True)
    worst = 0.0
    for side in (img_size, 144, 512):  # native grid, then two resampled position embeddings
        x = torch.randn(2, 1, side, side, device=device)
        with torch.no_grad():
            cls, patches = ours(x)
            ref = theirs.forward_features(x)  # (B, 1+T, D), final norm applied
        err = max(((cls - ref[:, 0]).norm() / ref[:, 0].norm()).item(),
                  ((patches - ref[:, 1:]).norm() / ref[:, 1:].norm()).item())
        worst = max(worst, err)
        print(f"ViT-{size} {side:3d} px: tokens {tuple(ref.shape)}, relative difference ours vs timm {err:.1e}")
    # and back: timm's own state dict through our strict loader
    path = Path("/tmp/timm_vit.pth")
    torch.save(theirs.state_dict(), path)
    back = load_backbone(build_vit(size, img_size=img_size), path)
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(back.state_dict().values(), theirs.state_dict().values()))
    print(f"timm -> ours through load_backbone: {'identical' if same else 'DIFFERENT'} tensors")
    ok = worst < tol and same
    print("timm check:", "ok" if ok else "FAILED", f"(worst {worst:.1e}, tolerance {tol:.0e}; timm {timm.__version__})")
    return ok


if __name__ == "__main__":
    argv = [a if a.startswith("--") else f"--vit={a}" for a in sys.argv[1:]]  # `timm_check.py large` still works
    cfg = parse_config(Check, argv, "timm_check.py")
    sys.exit(0 if main(cfg.vit, cfg.img_size, cfg.tol) else 1)
