"""train.py's other arms (README: 2D slices against native 3D): DINO on either backbone, the 3D Swin on cubes.
The same loop as DALE-CT: DDP equals one process, resume is exact, the teacher does not collapse."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import prepare
import train
from test_train import _main_worker, load_ckpt, one_line_error, prepared, tiny_args  # noqa: F401 (fixture)

ARM_3D = dict(input="3d", swin="tiny", block_mm=24.0, global_size=16, local_size=16, n_local=2, variant="0",
              local_scale_min=0.4, local_scale_max=0.6)  # 8^3 and 8^3 tokens of the tiny Swin; 12 slices of 2 mm
# K=64 prototypes need a bottleneck below K: in 256 dims the head can sit orthogonal to all 64 (uniform collapse)
DINO = dict(objective="dino", dino_prototypes=64, dino_bottleneck=16, dino_teacher_temp_steps=2,
            dino_freeze_last_steps=1, variant="0")


def arm_args(prepared, out_dir, arm, **kw):
    return tiny_args(prepared, out_dir, **{**arm, **kw})


def max_diff(a, b, part):
    return max(float((a[part][k].float() - b[part][k].float()).abs().max()) for k in a[part])


def test_dino_teacher_stays_away_from_both_collapses(prepared, tmp_path):
    """40 steps of DINO on the tiny ViT: the teacher's per-sample entropy stays between a tenth and nine
    tenths of log K at every logged step (0 = each sample on one prototype, log K = uniform); "model" is the
    teacher's backbone. At this scale the teacher must follow fast (EMA 0.9) and stay sharp (0.04): at DINO's
    0.996 and 0.07 it drifted to uniform within 30 steps, and at 0.9 / 0.04 it reached 0.9 log K at step 60
    (measured, README: 2D slices against native 3D)."""
    record = train.main(arm_args(prepared, tmp_path, DINO, max_steps=40, lr=1e-3, log_every=10, layerscale_init=0.1,
                                 dino_ema=0.9, dino_teacher_temp=0.04))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    K = DINO["dino_prototypes"]
    for row in log:
        assert 0.1 * math.log(K) < row["entropy"] < 0.9 * math.log(K), (row["step"], row["entropy"], math.log(K))
    assert set(record) >= {"dino", "entropy"} and "sigreg" not in record
    ckpt = load_ckpt(tmp_path)
    assert ckpt["student"] is not None and ckpt["teacher"]["center"].abs().sum() > 0
    # "model" (what probe.py evaluates) is the teacher's backbone, not the student's
    t = {k[len("backbone."):]: v for k, v in ckpt["teacher"]["net"].items() if k.startswith("backbone.")}
    assert all(torch.equal(ckpt["model"][k], t[k]) for k in t) and t.keys() == ckpt["model"].keys()
    assert max_diff(ckpt, {"student": {k: t[k] for k in ckpt["student"]}}, "student") > 0


@pytest.mark.parametrize("arm", [DINO, ARM_3D, {**ARM_3D, **DINO}], ids=["dino_2d", "lejepa_3d", "dino_3d"])
def test_resume_is_exact(prepared, tmp_path, arm):
    a, b = tmp_path / "straight", tmp_path / "split"
    train.main(arm_args(prepared, a, arm, max_steps=4))
    train.main(arm_args(prepared, b, arm, max_steps=4, stop_at=2))
    train.main(arm_args(prepared, b, arm, max_steps=4, resume="auto"))
    ca, cb = load_ckpt(a), load_ckpt(b)
    for part in ("model", "projector") + (("student",) if "objective" in arm else ()):
        assert max_diff(ca, cb, part) == 0, part
    if "objective" in arm:  # the teacher's weights and centre resume too
        assert torch.equal(ca["teacher"]["center"], cb["teacher"]["center"])
        assert max_diff(ca["teacher"], cb["teacher"], "net") == 0


def test_dino_3d_under_two_ranks_equals_one_process(prepared, tmp_path):
    """2 gloo ranks x 2 blocks x 2 accumulation micro-steps == 1 process x 4 blocks x 2 micro-steps: the same
    cubes, the centre all-reduced over ranks and summed over micro-steps, the teacher's EMA on every rank."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(batch_size=8, max_steps=2, device="cpu", **{**ARM_3D, **DINO})
    train.main(tiny_args(prepared, one, micro_batch=4, **common))
    port = 29500 + (os.getpid() + 11) % 1000
    mp.spawn(_main_worker, args=(2, port, tiny_args(prepared, two, micro_batch=2, **common)), nprocs=2)
    a, b = load_ckpt(one), load_ckpt(two)
    for part in ("student", "projector", "model"):
        assert max_diff(a, b, part) < 1e-5, part
    torch.testing.assert_close(a["teacher"]["center"], b["teacher"]["center"], rtol=1e-4, atol=1e-6)


def test_3d_settings_that_do_not_apply_are_named(prepared, tmp_path, capsys):
    one_line_error(arm_args(prepared, tmp_path / "a", {**ARM_3D, "variant": "2s"}), "--variant=2s")
    one_line_error(arm_args(prepared, tmp_path / "b", ARM_3D, picture=str(tmp_path / "p.png")), "--picture")
    train.main(arm_args(prepared, tmp_path / "c", ARM_3D, max_steps=1, slab_mm=4.0))
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if "does not use" in line)
    assert "--slab_mm" in note and "--layerscale_init" in note and "--lam" not in note
    train.main(arm_args(prepared, tmp_path / "d", DINO, max_steps=1))  # tiny_args sets --lam: DINO says so
    note = next(line for line in capsys.readouterr().out.splitlines() if "does not use" in line)
    assert "--lam" in note and "--num_slices" in note and "--slab_mm" not in note


def test_3d_run_draws_cubes_of_the_volume(prepared):
    """What the 3D arm's steps see: blocks of 2 half + 1 slices around a centre slice, in [0, 1]."""
    cfg = train.parse_args(arm_args(prepared, "unused", ARM_3D))
    ds = prepare.open_split(prepared, "train")
    import views3d
    batch = views3d.gather_blocks(ds, views3d.plan_blocks(ds, cfg, 0, range(5)), cfg.block_mm)
    v = views3d.make_views3d(batch, cfg, torch.device("cpu"))
    assert v["xg"].shape == (10, 1, 16, 16, 16) and v["xl"].shape == (10, 1, 16, 16, 16)
    assert 0 <= float(v["xg"].min()) and float(v["xg"].max()) <= 1 and float(v["xg"].std()) > 0.05
