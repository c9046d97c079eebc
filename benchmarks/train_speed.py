"""
benchmarks/train_speed.py: slabs/s of train.py's data path and of its model, each measured alone, on
the data and settings a training run would use (the same --key=value settings and presets as train.py).

    python benchmarks/train_speed.py --config=phantom --data=data/demo/prepared --steps=20
    python benchmarks/train_speed.py --config=dale_ct_2s --data=/data/dalect_512 --micro_batch=64

Data path: CPU plan + gather (memmap reads), then the device-side views; model: forward + backward of
one micro-batch, repeated. The data path keeps up when its rate is well above the model's.
"""
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import prepare  # noqa: E402
import train  # noqa: E402
from common import at_least, parse_config, pick_device, setting  # noqa: E402
from train import compute_loss, gather, make_views, plan_slabs, slots_for  # noqa: E402


def measure(ds, cfg, model, pos_weight, device, n):
    """Slabs/s of the data path (CPU plan + gather, then device views) and of the model
    (forward + backward on one micro-batch, repeated), each measured alone."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    cpu = [gather(ds, plan_slabs(ds, cfg, s, slots_for(s, 0, 0, cfg, 1))) for s in range(n)]
    t_gather = time.time() - t0
    views = make_views(cpu[0], cfg, device)  # warm-up
    sync()
    t1 = time.time()
    for b in cpu:
        views = make_views(b, cfg, device)
    sync()
    t2 = time.time()
    ctx = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype)) if device.type == "cuda" else nullcontext()
    for i in range(n + 1):
        if i == 1:  # the first step warms up (allocator, kernels, compile)
            sync()
            t3 = time.time()
        with ctx:
            loss, _ = compute_loss(model, views, pos_weight, cfg, i)
        loss.backward()
    sync()
    t4 = time.time()
    slabs = n * cfg.micro_batch
    return {"gather_slabs_per_s": slabs / t_gather, "views_slabs_per_s": slabs / (t2 - t1),
            "data_slabs_per_s": slabs / (t_gather + t2 - t1), "model_slabs_per_s": slabs / (t4 - t3)}


@dataclass
class BenchConfig(train.Config):
    steps: int = setting(20, at_least(1))  # micro-batches timed, each for the data path and for the model


def main(argv):
    cfg = parse_config(BenchConfig, argv, "train_speed.py", presets=True)
    steps = cfg.steps
    device = pick_device(cfg.device)
    ds = prepare.open_split(cfg.data, cfg.split)
    torch.manual_seed(cfg.seed)
    model = train.DaleCT(cfg).to(device)
    pos_anat = train.anatomy_pos_weight(ds, cfg).to(device)
    n_abn = len(prepare.ABNORMALITY_CODES)
    pos_weight = {"anat": pos_anat, "abn": torch.full((n_abn,), cfg.abn_pos_weight, device=device)}
    r = measure(ds, cfg, model, pos_weight, device, steps)
    print(f"ViT-{cfg.vit}, {cfg.micro_batch} slabs per micro-batch on {device}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
