#!/usr/bin/env bash
# The newcomer demo, on a CPU: phantom chest CTs -> prepare -> pretrain DALE-CT-0 and DALE-CT-2S
# -> frozen MIL linear probe of both and of a random-init backbone -> one comparison table, and pictures.
#
#     bash demo.sh            # about 12 minutes on a 2-core CPU (README: the demo, with its measured table)
#
# Everything it writes lives under data/demo/ and out/demo/ (both git-ignored); running it again
# starts over. Sizes can be overridden from the environment, e.g. STEPS=50 bash demo.sh for a
# quick look; the data settings are in config/demo.env.
set -euo pipefail
# The body sits in one { ... } block: bash reads a script as it runs it, so without the braces an
# edit to this file during a run would change (or break) the steps still to come.
{
cd "$(dirname "$0")"

source config/demo.env
PY=${PY:-.venv/bin/python}          # the interpreter (the tests pass their own)
DATA=${DATA:-data/demo}             # phantom/ (CT-RATE layout) and prepared/ (memmaps) go here
OUT=${OUT:-out/demo}                # one folder per run and per probe
STEPS=${STEPS:-}                    # pretraining steps of 32 slabs, per variant (default: the phantom preset's)
PROBE_STEPS=${PROBE_STEPS:-$DEMO_PROBE_STEPS}
SIZE=$DEMO_SIZE
PHANTOM_ARGS=${PHANTOM_ARGS:-$DEMO_PHANTOM_ARGS}  # the tests pass a tiny set
TRAIN_ARGS=${TRAIN_ARGS:-}          # extra train.py overrides, on top of config/phantom.json
PROBE_ARGS=${PROBE_ARGS:-}          # extra probe.py options (e.g. --seeds=2)
# Both cores for one job at a time: the steps below run one after the other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONUNBUFFERED=1           # progress lines appear as they happen, through the filters below

# 0. Packages: a virtual environment with the CPU build of torch (requirements.txt pins it), and
#    matplotlib for the pictures (the demo's own; the tests do not need it).
if [ "$PY" = .venv/bin/python ]; then
    [ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; }
    $PY -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib \
        || echo "matplotlib did not install: the demo carries on without pictures"
fi
STEPS=${STEPS:-$($PY -c "import json; print(json.load(open('config/phantom.json'))['max_steps'])")}

start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }
show() { grep --line-buffered -E "$1" || true; }    # keep the lines worth reading; a failing step still stops the demo
rm -rf "$DATA/prepared" "$OUT"/dale_ct_0 "$OUT"/dale_ct_2s "$OUT"/probe_* "$OUT"/sample.png  # a fresh start

# 1. A synthetic chest-CT dataset in the CT-RATE layout: volumes, CSVs, anatomy and finding masks.
stamp "phantom.py: writing the phantom dataset to $DATA/phantom"
$PY phantom.py --out="$DATA/phantom" --size=$SIZE $PHANTOM_ARGS

# 2. HU, orientation, body crop, 5 mm slices at 64 px, memory-mapped; train/val/test splits.
stamp "prepare.py: $DATA/phantom -> $DATA/prepared"
$PY prepare.py --src="$DATA/phantom" --out="$DATA/prepared" --z_mm=$DEMO_Z_MM --size=$SIZE --mask_size=$SIZE

# 3. One training sample as the model sees it: the slab, its masks, the 2 global and 8 local views.
stamp "train.py --picture: one training sample"
mkdir -p "$OUT"
$PY train.py --config=phantom --data="$DATA/prepared" --picture="$OUT/sample.png" $TRAIN_ARGS | show "^wrote|matplotlib"

# 4. Pretraining: DALE-CT-0 (LeJEPA on depth-aware views only) and DALE-CT-2S (plus the dense
#    anatomy and abnormality heads), same preset, same seed, same number of steps.
for v in 0 2s; do
    stamp "train.py: DALE-CT-$v, $STEPS steps"
    $PY train.py --config=phantom --variant=$v --data="$DATA/prepared" --max_steps=$STEPS \
        --out_dir="$OUT/dale_ct_$v" $TRAIN_ARGS | show "^(data|model):|^step [0-9]*00/"
done

# 5. Frozen-backbone probes: the MIL linear probe on the 18 findings and the world-model probes (finding
#    and organ masks, slice order, effective rank), for the random-init floor, then both models.
#    The floor is the pretraining runs' own step 0: same ViT, same LayerScale start (read from the
#    run's config.json, so a TRAIN_ARGS override of it reaches the floor too).
LS_INIT=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['layerscale_init'])" "$OUT/dale_ct_0/config.json")
stamp "probe.py: random init"
$PY probe.py --config=probe_demo --random_init --layerscale_init="$LS_INIT" --data="$DATA/prepared" --img_size=$SIZE --steps=$PROBE_STEPS \
    --out="$OUT/probe_random" $PROBE_ARGS | show "^\| (AUROC|AUPRC) |^Depth"
for v in 0 2s; do
    stamp "probe.py: DALE-CT-$v"
    $PY probe.py --config=probe_demo --ckpt="$OUT/dale_ct_$v/ckpt.pt" --data="$DATA/prepared" --img_size=$SIZE \
        --steps=$PROBE_STEPS --out="$OUT/probe_$v" $PROBE_ARGS | show "^\| (AUROC|AUPRC) |^Depth"
done

# 6. One table: each row with its seed spread and bootstrap interval, and the paired bootstrap
#    interval of its AUROC gain over the row above (an interval that excludes 0 is a real gain).
stamp "probe.py --compare"
$PY probe.py --config=probe_demo --compare="$OUT/probe_random,$OUT/probe_0,$OUT/probe_2s" --out="$OUT" | { grep -v "^config:" || true; }
stamp "done"
echo "table:            $OUT/comparison.md (and comparison.json); per model: $OUT/probe_{random,0,2s}/results.md"
for f in "$OUT/sample.png" "$OUT"/dale_ct_{0,2s}/loss.png "$OUT"/probe_{random,0,2s}/{roc,worldmodel}.png "$OUT"/{comparison,distance_vs_gap}.png; do
    [ -f "$f" ] && echo "picture:          $f"
done
[ -f "$OUT/comparison.png" ] || echo "pictures:         none (matplotlib is not installed for $PY)"
exit
}
