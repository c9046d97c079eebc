#!/usr/bin/env bash
# The demo's comparison over many pretraining seeds, on a GPU: the demo's phantom and prepared data,
# then DALE-CT-0 and DALE-CT-2S at the phantom preset for each seed (and 2S candidates: other
# train.py settings), each probed as demo.sh probes it, several jobs at once on one GPU. It answers
# what one CPU demo run cannot: how far each step of the table moves with the pretraining seed.
#
#     bash benchmarks/seed_sweep.sh [SEEDS] [PARALLEL] [CANDIDATES]
#     bash benchmarks/seed_sweep.sh 8 8 "aux0.15:--aux_weight=0.15 lr5e-4:--lr=5e-4,--warmup_steps=30"
#
# A candidate is NAME:ARGS, ARGS being train.py overrides joined by commas, applied to 2S on top of
# the preset and compared with the preset's DALE-CT-0 at the same seed. Default: dense-head weights
# 0.15 and 0.6. A phantom change is a sweep of its own: SWEEP_PHANTOM_ARGS and another SWEEP_DATA.
#
# Writes under $OUT (or out/seed_sweep): sweep.md (one row per seed: the three AUROCs and the two
# paired steps with their intervals, then means), sweep.json, and each job's log. On a GPU train.py
# runs under bf16 autocast (the CPU demo runs float32), so its numbers also show what bf16 does.
set -uo pipefail
cd "$(dirname "$0")/.."
source config/demo.env   # demo.sh's data and probe settings
PY=${PY:-python3}
OUTD=${OUT:-out/seed_sweep}
DATA=${SWEEP_DATA:-/tmp/sweep_data}
RUNS=${SWEEP_RUNS:-/tmp/sweep_runs}
SIZE=$DEMO_SIZE
STEPS=${SWEEP_STEPS:-$($PY -c "import json; print(json.load(open('config/phantom.json'))['max_steps'])")}   # the preset's; the tests pass a few
PROBE_STEPS=${SWEEP_PROBE_STEPS:-$DEMO_PROBE_STEPS}
PROBE_ARGS=${SWEEP_PROBE_ARGS:-}    # extra probe.py options (the tests pass fewer seeds)
PHANTOM_ARGS=${SWEEP_PHANTOM_ARGS:-$DEMO_PHANTOM_ARGS}
WORKERS=${SWEEP_WORKERS:-16}

if [ "${1:-}" = job ]; then   # one pretraining and its probe: job VARIANT SEED CANDIDATE ARGS (ARGS: a,b,c or -)
    v=$2; s=$3; c=$4; name="dale_ct_${v}_s${s}_${c}"
    args=(); [ "$5" = - ] || IFS=, read -ra args <<< "$5"
    log="$OUTD/logs/$name.log"; mkdir -p "$OUTD/logs"   # a job can be run on its own (one at a time on a CPU)
    { $PY train.py --config=phantom --variant="$v" --seed="$s" --data="$DATA/prepared" \
          --out_dir="$RUNS/$name" --max_steps=$STEPS --log_every=100 "${args[@]}" \
      && $PY probe.py --config=probe_demo --ckpt="$RUNS/$name/ckpt.pt" --data="$DATA/prepared" --img_size=$SIZE --steps=$PROBE_STEPS \
          --out="$RUNS/probe_$name" $PROBE_ARGS; } > "$log" 2>&1
    rc=$?
    echo "$name rc=$rc $(grep -E "^step $STEPS/" "$log" | tail -1 | grep -oE '[0-9.]+ slabs/s') $(grep -E '^\| AUROC' "$log" | head -1)"
    exit 0
fi

SEEDS=${1:-8}; PAR=${2:-8}; CANDIDATES=${3:-"aux0.15:--aux_weight=0.15 aux0.6:--aux_weight=0.6"}
mkdir -p "$OUTD/logs" "$RUNS"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "phantom + prepare (demo.sh's data)"
if [ ! -f "$DATA/prepared/manifest.json" ]; then
    $PY phantom.py --out="$DATA/phantom" --size=$SIZE $PHANTOM_ARGS \
        --workers=$WORKERS > "$OUTD/logs/phantom.log" 2>&1 || { tail "$OUTD/logs/phantom.log"; exit 1; }
    $PY prepare.py --src="$DATA/phantom" --out="$DATA/prepared" --z_mm=$DEMO_Z_MM --size=$SIZE --mask_size=$SIZE \
        --workers=$WORKERS > "$OUTD/logs/prepare.log" 2>&1 || { tail "$OUTD/logs/prepare.log"; exit 1; }
fi

stamp "random-init floor (in the background)"
LS_INIT=$($PY -c "import json; print(json.load(open('config/phantom.json'))['layerscale_init'])")  # the runs' step 0
$PY probe.py --config=probe_demo --random_init --layerscale_init="$LS_INIT" --data="$DATA/prepared" --img_size=$SIZE --steps=$PROBE_STEPS \
    --out="$RUNS/probe_random" $PROBE_ARGS > "$OUTD/logs/probe_random.log" 2>&1 &
floor=$!

# Job order: the preset's pairs for the first half of the seeds, the candidates, then the rest, so a
# run cut short still holds matched pairs.
half=$(( (SEEDS + 1) / 2 ))
{
    for s in $(seq 0 $(( half - 1 ))); do echo "0 $s preset -"; echo "2s $s preset -"; done
    for cand in $CANDIDATES; do for s in $(seq 0 $(( half - 1 ))); do echo "2s $s ${cand%%:*} ${cand#*:}"; done; done
    for s in $(seq $half $(( SEEDS - 1 ))); do echo "0 $s preset -"; echo "2s $s preset -"; done
} > "$OUTD/jobs.txt"
stamp "$(wc -l < "$OUTD/jobs.txt") jobs, $PAR at a time"
timeout "${SWEEP_DEADLINE:-100000}" xargs -P "$PAR" -L 1 bash "$0" job < "$OUTD/jobs.txt"
stamp "jobs done (or deadline reached)"
wait $floor || { tail "$OUTD/logs/probe_random.log"; exit 1; }

$PY - "$RUNS" "$OUTD" <<'EOF'
# One row per seed and 2S candidate: AUROC of the floor, DALE-CT-0 and 2S, and the paired
# bootstrap interval of each step (report.compare, as demo.sh's table computes it).
import json, sys, re
from pathlib import Path
import numpy as np
import probe
import report
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = probe.ProbeConfig(n_boot=1000)
rows = []
for p2 in sorted(runs.glob("probe_dale_ct_2s_s*_*")):
    s, c = re.match(r"probe_dale_ct_2s_s(\d+)_(.+)", p2.name).groups()
    p0 = runs / f"probe_dale_ct_0_s{s}_preset"
    if not (p0 / "results.json").exists() or not (p2 / "results.json").exists():
        continue
    cfg.out = str(out / f"cmp_s{s}_{c}")
    r = report.compare([str(runs / "probe_random"), str(p0), str(p2)], cfg)
    rows.append({"seed": int(s), "candidate": c, "random": r[0]["summary"]["auroc"]["mean"],
                 "dale_ct_0": r[1]["summary"]["auroc"]["mean"], "dale_ct_2s": r[2]["summary"]["auroc"]["mean"],
                 "step1": r[1]["delta_auroc"], "step2": r[2]["delta_auroc"],
                 "train_s": [r[1]["train_s"], r[2]["train_s"]]})
rows.sort(key=lambda r: (r["candidate"] != "preset", r["candidate"], r["seed"]))
f = lambda d: f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" + (" *" if d[1] > 0 else "")
lines = ["| 2S | seed | random | DALE-CT-0 | 2S | 0 vs random | 2S vs 0 |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['candidate']} | {r['seed']} | {r['random']:.3f} | {r['dale_ct_0']:.3f} | {r['dale_ct_2s']:.3f} | "
          f"{f(r['step1'])} | {f(r['step2'])} |" for r in rows]
lines += ["", "(* = the paired 95% interval excludes 0)", ""]
for c in dict.fromkeys(r["candidate"] for r in rows):
    g = [r for r in rows if r["candidate"] == c]
    d1 = np.array([r["step1"][0] for r in g]); d2 = np.array([r["step2"][0] for r in g])
    lines.append(f"{c}: {len(g)} seeds; DALE-CT-0 {np.mean([r['dale_ct_0'] for r in g]):.3f}, "
                 f"2S {np.mean([r['dale_ct_2s'] for r in g]):.3f}; step 1 {d1.mean():+.3f} (sd {d1.std(ddof=1) if len(g) > 1 else 0:.3f}, "
                 f"{sum(r['step1'][1] > 0 for r in g)}/{len(g)} clear), step 2 {d2.mean():+.3f} "
                 f"(sd {d2.std(ddof=1) if len(g) > 1 else 0:.3f}, {sum(r['step2'][1] > 0 for r in g)}/{len(g)} clear)")
md = "\n".join(lines) + "\n"
(out / "sweep.md").write_text(md)
(out / "sweep.json").write_text(json.dumps(rows, indent=1))
print(md)
EOF
stamp "done"
