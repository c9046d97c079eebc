"""demo.sh, scaled down: the same commands (phantom -> prepare -> pretrain 0 and 2S -> three probes ->
--compare) on a tiny phantom with a few steps, through bash. What it checks is the plumbing: every step
runs, the comparison table has its three rows in order with sane numbers. Whether pretraining wins
needs the full demo's sizes (README); a handful of steps on 20 volumes cannot show it."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="demo.sh needs bash")
def test_demo_end_to_end_small(tmp_path):
    env = dict(os.environ, PY=sys.executable, DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"),
               PHANTOM_ARGS="--train_patients=12 --valid_patients=6 --slices=20 --workers=1",
               STEPS="6", PROBE_STEPS="20", PROBE_ARGS="--seeds=2 --n_boot=100 --evals=2",
               TRAIN_ARGS="--warmup_steps=2 --batch_size=8 --micro_batch=8 --pos_weight_slices=32",
               OMP_NUM_THREADS="1")
    run = run_out = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in rows] == ["random init", "dale_ct_0", "dale_ct_2s"]
    for r in rows:
        auroc = r["summary"]["auroc"]
        assert 0.0 <= auroc["ci95"][0] <= auroc["mean"] <= auroc["ci95"][1] <= 1.0
        assert 0.0 <= r["summary"]["auprc"]["mean"] <= 1.0
        assert r["depth_r2"] <= 1.0
    assert rows[0]["delta_auroc"] is None and rows[0]["train_s"] is None       # the floor: no training
    for above, r in zip(rows, rows[1:]):
        d, lo, hi = r["delta_auroc"]
        assert d == pytest.approx(r["summary"]["auroc"]["mean"] - above["summary"]["auroc"]["mean"])
        assert -1.0 <= lo <= hi <= 1.0
        assert r["train_s"] > 0                                                 # read from the run's log.jsonl
    # the tables demo.sh prints are the ones written to comparison.md: the MIL probe's, a header, a rule,
    # three rows; then the world-model probes' (worldmodel.py) for the same three, each value with its interval
    blocks = [[ln for ln in b.splitlines() if ln.startswith("|")] for b in (out / "comparison.md").read_text().split("\n\n")]
    table, wm = [b for b in blocks if b]
    models = ["random init", "dale_ct_0", "dale_ct_2s"]
    assert len(table) == 5 and [t.split("|")[1].strip() for t in table[2:]] == models
    assert len(wm) == 5 and [t.split("|")[1].strip() for t in wm[2:]] == models
    assert "findings: 3D Dice" in wm[0] and "organs: slice AUROC" in wm[0] and "effective rank" in wm[0]
    for line, r in zip(wm[2:], rows):
        rank = r["worldmodel"]["effective_rank"]["value"]
        assert 1.0 <= rank <= 192 and f"{rank:.1f} of 192" in line
    assert "| dale_ct_2s |" in run.stdout and "findings: 3D Dice" in run.stdout
    assert (out / "distance_vs_gap.png").exists() == (out / "comparison.png").exists()
    # AUPRC and F1 carry their bootstrap intervals too, the numbers of each run's results.json
    for line, r in zip(table[2:], rows):
        for cell, m in zip(line.split("|")[4:6], ("auprc", "f1")):
            got = [float(x) for x in re.fullmatch(r" (\d\.\d+) \[(\d\.\d+), (\d\.\d+)\] ", cell).groups()]
            want = [r["summary"][m]["mean"], *r["summary"][m]["ci95"]]
            assert got == pytest.approx(want, abs=5e-4) and got[1] <= got[2], (m, cell)
    # each probe really scored its own backbone
    kinds = [json.loads((out / f"probe_{n}" / "results.json").read_text())["backbone"]["kind"]
             for n in ("random", "0", "2s")]
    assert kinds == ["random_init", "checkpoint", "checkpoint"]
    # the floor starts where the pretraining runs started: their LayerScale gain, here the preset's
    preset = json.loads((ROOT / "config" / "phantom.json").read_text())
    run = json.loads((out / "dale_ct_0" / "config.json").read_text())
    floor = json.loads((out / "probe_random" / "results.json").read_text())["backbone"]
    assert floor["layerscale_init"] == run["layerscale_init"] == preset["layerscale_init"]
    # the last lines say where the table and every picture are (pictures only with matplotlib)
    tail = run_out.stdout.strip().splitlines()[-12:]  # the table, then up to 10 pictures
    assert any(line.startswith("table:") and "comparison.md" in line for line in tail), tail
    pictures = [line.split()[-1] for line in tail if line.startswith("picture:")]
    try:
        import matplotlib  # noqa: F401
        names = ["sample.png", "loss.png", "loss.png", "roc.png", "roc.png", "roc.png", "comparison.png"]
        assert [Path(p).name for p in pictures] == names and all(Path(p).is_file() for p in pictures), tail
    except ImportError:
        assert pictures == [] and any(line.startswith("pictures:") for line in tail), tail


def test_readme_file_table_lists_every_file():
    """The README's file table names every tracked code file and config, and only files that exist."""
    cells = re.findall(r"^\| (`[^|]+)\|", (ROOT / "README.md").read_text(), re.M)  # a row's first cell
    listed = {name for cell in cells for name in re.findall(r"`([\w/.]+)`", cell)}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    wanted = {f for f in tracked if f.endswith((".py", ".sh", ".json", ".env", ".md")) and f != "README.md"}
    assert not wanted - listed, f"files the README's table does not list: {sorted(wanted - listed)}"
    assert all((ROOT / f).exists() for f in listed), [f for f in listed if not (ROOT / f).exists()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="seed_sweep.sh needs bash")
def test_seed_sweep_small(tmp_path):
    """benchmarks/seed_sweep.sh, scaled down: one seed, the preset pair and one 2S candidate. Its
    table pairs each 2S run with the same seed's DALE-CT-0, and a candidate's overrides reach train.py."""
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"), SWEEP_DATA=str(tmp_path / "data"),
               SWEEP_RUNS=str(tmp_path / "runs"), SWEEP_STEPS="4", SWEEP_PROBE_STEPS="10", SWEEP_WORKERS="1",
               SWEEP_PHANTOM_ARGS="--train_patients=12 --valid_patients=6 --slices=20 --rex_frac=1.0",
               SWEEP_PROBE_ARGS="--seeds=2 --n_boot=100 --evals=2")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "seed_sweep.sh"), "1", "2",
                          "aux0.6:--aux_weight=0.6,--lr=5e-4"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(r["candidate"], r["seed"]) for r in rows] == [("preset", 0), ("aux0.6", 0)]
    for r in rows:  # each step is the difference of the AUROCs beside it
        assert r["step1"][0] == pytest.approx(r["dale_ct_0"] - r["random"])
        assert r["step2"][0] == pytest.approx(r["dale_ct_2s"] - r["dale_ct_0"])
        assert r["step2"][1] <= r["step2"][0] <= r["step2"][2]
    assert rows[0]["dale_ct_0"] == rows[1]["dale_ct_0"]  # both 2S runs against the same DALE-CT-0
    runs = tmp_path / "runs"
    preset = json.loads((ROOT / "config" / "phantom.json").read_text())
    cand = json.loads((runs / "dale_ct_2s_s0_aux0.6" / "config.json").read_text())
    base = json.loads((runs / "dale_ct_2s_s0_preset" / "config.json").read_text())
    assert (cand["aux_weight"], cand["lr"]) == (0.6, 5e-4)
    assert (base["aux_weight"], base["lr"]) == (preset["aux_weight"], preset["lr"])
    assert json.loads((runs / "dale_ct_0_s0_preset" / "config.json").read_text())["variant"] == "0"
    floor = json.loads((runs / "probe_random" / "results.json").read_text())["backbone"]
    assert floor["layerscale_init"] == preset["layerscale_init"]
    assert "| aux0.6 | 0 |" in (tmp_path / "out" / "sweep.md").read_text()
