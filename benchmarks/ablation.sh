#!/usr/bin/env bash
# The paper's ablation on the demo's data: do depth-aware views earn their keep? DALE-CT-0 with its
# slab (local views from slices up to 6 mm away: at the demo's 5 mm slices, the centre and one slice either
# side) against pure 2D (--slab_mm=0: every view from the centre slice), everything else identical, at each
# pretraining seed; DALE-CT-2S at the same seeds beside them; each probed as demo.sh probes it (MIL and
# world-model probes, config/probe_demo.json), then one probe.py --compare table per seed.
#
#     bash benchmarks/ablation.sh [SEEDS]        # default 3 seeds (README: the ablation, with its timing)
#
# Writes under $OUT (default out/ablation): runs/ (checkpoints and probes), seed_N/comparison.md per seed,
# ablation.md (every seed's rows, then means and seed sd), logs/. Runs one job at a time (one CPU); a run
# cut short continues where it stopped (train.py --resume=auto, probes already written are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
source config/demo.env
PY=${PY:-.venv/bin/python}
OUTD=${OUT:-out/ablation}
DATA=${ABLATION_DATA:-data/demo}        # demo.sh's data (written here if it is not there yet)
STEPS=${ABLATION_STEPS:-}               # pretraining steps (default: the phantom preset's); the tests pass a few
PROBE_ARGS=${ABLATION_PROBE_ARGS:-}     # extra probe.py options (the tests pass fewer seeds)
PHANTOM_ARGS=${ABLATION_PHANTOM_ARGS:-$DEMO_PHANTOM_ARGS}
SEEDS=${1:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
RUNS="$OUTD/runs"; mkdir -p "$RUNS" "$OUTD/logs"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }
[ -n "$STEPS" ] && STEPS_ARG="--max_steps=$STEPS" || STEPS_ARG=""

if [ ! -f "$DATA/prepared/manifest.json" ]; then
    stamp "phantom + prepare (demo.sh's data) into $DATA"
    $PY phantom.py --out="$DATA/phantom" --size=$DEMO_SIZE $PHANTOM_ARGS > "$OUTD/logs/phantom.log" 2>&1
    $PY prepare.py --src="$DATA/phantom" --out="$DATA/prepared" --z_mm=$DEMO_Z_MM --size=$DEMO_SIZE \
        --mask_size=$DEMO_SIZE > "$OUTD/logs/prepare.log" 2>&1
fi
probe() {  # probe NAME ARGS...: once; its results stay for a rerun
    [ -f "$RUNS/probe_$1/results.json" ] && return 0
    stamp "probe.py: $1"
    local name=$1; shift
    $PY probe.py --config=probe_demo --data="$DATA/prepared" --img_size=$DEMO_SIZE --steps=$DEMO_PROBE_STEPS \
        --cache="$OUTD/features" --out="$RUNS/probe_$name" "$@" $PROBE_ARGS > "$OUTD/logs/probe_$name.log" 2>&1 \
        || { tail -3 "$OUTD/logs/probe_$name.log"; exit 1; }
}
LS_INIT=$($PY -c "import json; print(json.load(open('config/phantom.json'))['layerscale_init'])")  # the runs' step 0
probe random --random_init --layerscale_init="$LS_INIT"
for s in $(seq 0 $(( SEEDS - 1 ))); do
    for arm in pure_2d 0 2s; do
        v=$arm; extra=""
        [ $arm = pure_2d ] && { v=0; extra=--slab_mm=0; }
        name="dale_ct_${arm}_s$s"
        if [ ! -f "$RUNS/probe_$name/results.json" ]; then
            stamp "train.py: $name"
            $PY train.py --config=phantom --variant=$v --seed=$s $extra $STEPS_ARG --data="$DATA/prepared" \
                --out_dir="$RUNS/$name" --resume=auto > "$OUTD/logs/train_$name.log" 2>&1 \
                || { tail -3 "$OUTD/logs/train_$name.log"; exit 1; }
        fi
        probe "$name" --ckpt="$RUNS/$name/ckpt.pt"
    done
    $PY probe.py --config=probe_demo --compare="$RUNS/probe_random,$RUNS/probe_dale_ct_pure_2d_s$s,$RUNS/probe_dale_ct_0_s$s,$RUNS/probe_dale_ct_2s_s$s" \
        --out="$OUTD/seed_$s" > "$OUTD/logs/compare_s$s.log" 2>&1 || { tail -3 "$OUTD/logs/compare_s$s.log"; exit 1; }
done

$PY - "$OUTD" "$SEEDS" <<'PYEOF'
# Every seed's rows, then per arm the mean and seed sd of each number, and the paired steps.
import json, sys
from pathlib import Path
import numpy as np
out, seeds = Path(sys.argv[1]), int(sys.argv[2])
arms = ["random init", "pure 2D", "DALE-CT-0", "DALE-CT-2S"]
table = {a: [] for a in arms}
for s in range(seeds):
    for arm, r in zip(arms, json.loads((out / f"seed_{s}" / "comparison.json").read_text())):
        wm = r["worldmodel"]
        num = lambda m: m["value"] if m else None  # noqa: E731
        table[arm].append({"seed": s, "auroc": r["summary"]["auroc"]["mean"], "delta": r["delta_auroc"],
                           "depth_r2": r["depth_r2"], **dict(zip(wm["columns"], map(num, wm["values"]))),
                           "slice order": wm["order"]["value"], "effective rank": wm["effective_rank"]["value"]})
cols = ["auroc", "depth_r2"] + [c for c in table["pure 2D"][0] if c not in ("seed", "auroc", "delta", "depth_r2")]
f = lambda d: f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"  # noqa: E731
lines = ["| arm | seed | macro AUROC | Δ vs row above [paired 95% CI] | " + " | ".join(cols[1:]) + " |",
         "|---" * (len(cols) + 3) + "|"]
for s in range(seeds):
    for a in arms:
        r = table[a][s]  # random init: the same floor in every seed's table
        lines.append(f"| {a} | {s} | {r['auroc']:.3f} | {f(r['delta']) if r['delta'] else ''} | "
                     + " | ".join("n/a" if r[c] is None else f"{r[c]:.3f}" for c in cols[1:]) + " |")
lines += ["", f"Over {seeds} pretraining seeds, mean (seed sd):", "",
          "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
for a in arms[1:]:
    cells = []
    for c in cols:
        v = np.array([r[c] for r in table[a] if r[c] is not None], float)
        cells.append(f"{v.mean():.3f} ({v.std(ddof=1):.3f})" if len(v) > 1 else (f"{v.mean():.3f}" if len(v) else "n/a"))
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
d = np.array([r["delta"][0] for r in table["DALE-CT-0"]])
clear = sum(r["delta"][1] > 0 for r in table["DALE-CT-0"])
lines += ["", f"DALE-CT-0 (slab) - pure 2D, macro AUROC: {', '.join(f'{x:+.3f}' for x in d)}; mean {d.mean():+.3f}"
          f" (sd {d.std(ddof=1) if len(d) > 1 else 0:.3f}); paired interval above 0 at {clear} of {len(d)} seeds."]
md = "\n".join(lines) + "\n"
(out / "ablation.md").write_text(md)
print(md)
PYEOF
stamp "done: $OUTD/ablation.md"
