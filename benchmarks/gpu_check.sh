#!/usr/bin/env bash
# The GPU measurements behind the README's efficiency notes, in one script (about 6 minutes on one
# H200; every part has its own time limit, and a failing part does not stop the others):
#   1. kernels/sigreg.py: the fused SIGReg against lejepa.py on the GPU, then its benchmark table
#   2. benchmarks/timm_check.py: our ViT-L state dict in timm's VisionTransformer, same features
#   3. train.py at the DALE-CT-2S shapes (ViT-L, 2 x 256 px + 8 x 144 px views, 64 slabs a step, bf16
#      autocast, one GPU): slabs/s, MFU and peak memory, eager and torch.compile'd
#
#     bash benchmarks/gpu_check.sh          # logs under $OUT, or out/gpu_check
#
# Needs torch with CUDA, triton, numpy, nibabel, scikit-learn, tqdm; timm for part 2 only.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUTD=${OUT:-out/gpu_check}
L=${GPU_CHECK_TMP:-/tmp/gpu_check}        # the 512 px phantom and the throughput runs (~2 GB)
mkdir -p "$OUTD" "$L"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUTD/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$OUTD/gpu.txt"

# The 512 px data for part 3 is written in the background while parts 1 and 2 run: 6 + 1 patients
# (about 9 volumes) resampled to 1 mm slices, as prepare.py stores CT-RATE at --size=512.
( $PY phantom.py --out="$L/phantom" --size=512 --train_patients=6 --valid_patients=1 --rex_frac=1.0 --workers=8 \
  && $PY prepare.py --src="$L/phantom" --out="$L/prepared" --size=512 --mask_size=128 --workers=8 ) \
  > "$OUTD/data512.log" 2>&1 &
data=$!

stamp "1. fused SIGReg: check and benchmark"
timeout "${SIGREG_LIMIT:-200}" $PY kernels/sigreg.py 2>&1 | tee "$OUTD/sigreg.txt"

stamp "2. timm: our ViT-L state dict in timm's VisionTransformer"
timeout 120 $PY benchmarks/timm_check.py --vit=large 2>&1 | tee "$OUTD/timm.txt"

stamp "3. train.py throughput at the DALE-CT-2S shapes"
wait $data || { echo "512 px data failed:"; tail -5 "$OUTD/data512.log"; }
tail -2 "$OUTD/data512.log"
common=(--config=dale_ct_2s --data="$L/prepared" --batch_size=64 --micro_batch=64 --log_every=5 --ckpt_every=100000)
# stop_at ends the run early; warmup stays the preset's, so the learning rate is tiny: a speed test
timeout 120 $PY train.py "${common[@]}" --compile=false --stop_at=20 --out_dir="$L/eager" 2>&1 \
    | grep -v "^config:" | tee "$OUTD/train_eager.txt"
timeout "${COMPILE_LIMIT:-200}" $PY train.py "${common[@]}" --compile=true --stop_at=40 --out_dir="$L/compiled" 2>&1 \
    | grep -v "^config:" | tee "$OUTD/train_compiled.txt"
stamp "done"
