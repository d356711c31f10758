#!/usr/bin/env bash
# The trainer's GPU check, as ONE command on any CUDA host (a few minutes).
#
# On the machine that has the prepared data (writes bench/out/gpu, <= --budget-mib):
#     python -m bench.gpu_data --data /tmp/utk/parquet --budget-mib 62 --train-quality 75
# or, for step 3 (issue 24: all of train and val at 80 px, test as prepared, 3,000 All-Age-Faces crops):
#     python -m bench.gpu_data --data out/utkface_parquet --budget-mib 59 --side 80 --train-quality 75 \
#         --aaf out/aaf_parquet --aaf-rows 3000 --aaf-side 80 --no-wheels
# Copy the repository with bench/out/gpu to the GPU host, then there, from the repository root:
#     bash bench/gpu_train.sh                  (GPU_TRAIN_MINUTES, GPU_READERS, ... below tune it)
# The host needs Python with torch (CUDA) and pyarrow; pyspark and petastorm are not needed (--reader pyarrow);
# torchvision and Pillow are installed from bench/out/gpu/wheels when missing.
#
# It prints and writes under $OUT (or bench/out/gpu-results):
#   1. img/s fed by the project's loader vs the same loop over device-resident batches (bench.train_bench),
#      128 px, batch 128, bf16, channels_last; 1b. the trainer vs a plain loop (bench.trainer_vs_loop);
#   2. python -m trainer.train with CyclicLR + ReduceLROnPlateau, OneCycle and a constant LR, same split, same
#      wall-clock budget each: val/test MAE, epochs, seconds, img/s (summary.json, metrics.jsonl); then the
#      OneCycle run again with weight averaging (--ema) and progressive resizing (96 px, the last quarter 128 px);
#   3. issue 24's recipe variants (bench.gpu_recipe): make recipe's training with a few flags changed, each for the
#      epochs the 2-core dev VM fits in the recipe's 58 minutes (45 at 64 px, 32 at 80 px), GPU_RECIPE_PARALLEL at
#      once on the one GPU, all ended by GPU_RECIPE_DEADLINE minutes: test MAE with and without the age map,
#      +-1/2 std coverage, bias by age group, and All-Age-Faces MAE when bench.gpu_data took it along (--aaf).
# GPU_STEPS picks steps (default "1 2 3"; "3" alone for issue 24's variants).
set -euo pipefail
DATA=${GPU_DATA:-bench/out/gpu}
RESULTS=${OUT:-bench/out/gpu-results}
MINUTES=${GPU_TRAIN_MINUTES:-2.5}   # per schedule
WORKERS=${GPU_READERS:-$(( $(nproc) - 2 ))}
DEVICE=${GPU_DEVICE:-cuda}          # cpu only for a smoke run of this script
BATCHES=${GPU_BENCH_BATCHES:-60}
WARMUP=${GPU_BENCH_WARMUP:-5}
STEPS=" ${GPU_STEPS:-1 2 3} "
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torchvision, PIL" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$DATA/wheels" torchvision pillow
fi
if [[ $STEPS == *" 3 "* ]] && ! "$PY" -c "import scipy" 2>/dev/null; then  # the age map's fit (a linear programme)
  "$PY" -m pip install -q --no-index --no-deps --find-links "$DATA/wheels" scipy 2>/dev/null || {
    echo "gpu_train.sh: step 3 needs scipy (trainer.calibration fits the age map); none here or in $DATA/wheels" >&2
    exit 2; }
fi
"$PY" - <<'EOF'
import torch, torchvision, pyarrow, platform
print(f"python {platform.python_version()} torch {torch.__version__} torchvision {torchvision.__version__} "
      f"pyarrow {pyarrow.__version__} cuda {torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
EOF

if [[ $STEPS == *" 1 "* ]]; then
echo "== 1. loader-fed vs device-resident training throughput"
"$PY" -m bench.train_bench --data "$DATA/data" --reader pyarrow --workers "$WORKERS" --batches "$BATCHES" --warmup "$WARMUP" \
  --batch-size 128 --image-size 128 --device "$DEVICE" | tee "$RESULTS/throughput.json"

echo "== 1b. the trainer (loader + batched augmentation on the GPU) vs a plain device-resident loop, 64 and 128 px"
"$PY" -m bench.trainer_vs_loop --data "$DATA/data" --reader pyarrow --workers "$WORKERS" --device "$DEVICE" \
  --rows 4096 --sizes 64 128 --repeats 2 | tee "$RESULTS/trainer_vs_loop.json"
fi

if [[ $STEPS == *" 2 "* ]]; then
echo "== 2. CyclicLR + ReduceLROnPlateau vs OneCycle vs constant LR, ${MINUTES} min each"
EPOCHS=${GPU_TRAIN_EPOCHS:-12}   # OneCycle needs an epoch count: the budget stops a run that is slower
for run in "cyclic_plateau cyclic_plateau --lr 3e-3" "onecycle onecycle --lr 3e-3" "constant constant --lr 1e-3" \
           "onecycle_ema_progressive onecycle --lr 3e-3 --ema 0.998 --start-size 96"; do
  set -- $run
  name=$1; shift
  "$PY" -m trainer.train --data "$DATA/data" --reader pyarrow --workers "$WORKERS" --device "$DEVICE" \
    --image-size 128 --batch-size 128 --epochs "$EPOCHS" --early-stop 1000 --max-minutes "$MINUTES" \
    --head regression --schedule "$@" --output "$RESULTS/$name" --no-progress | tail -3
done

"$PY" - "$RESULTS" <<'EOF'
import json, sys, os
results = sys.argv[1]
for name in ("cyclic_plateau", "onecycle", "constant", "onecycle_ema_progressive"):
    s = json.load(open(os.path.join(results, name, "summary.json")))
    hist = [json.loads(l) for l in open(os.path.join(results, name, "metrics.jsonl"))]
    print(f"{name}: epochs {s['epochs_run']}, best val MAE {s['best_val_mae']:.2f}, test MAE {s['test_mae']:.2f}, "
          f"CS@5 {s['test_cs5']:.3f}, {hist[-1]['elapsed_seconds']:.0f} s, "
          f"{sum(h['img_per_s'] for h in hist) / len(hist):.0f} img/s; rows {s['rows']}")
const = [json.loads(l) for l in open(os.path.join(results, "constant", "metrics.jsonl"))]
target = min(h["val_mae"] for h in const)
reach = lambda hist: next(((h["epoch"], h["elapsed_seconds"]) for h in hist if h["val_mae"] <= target), None)
others = {n: [json.loads(l) for l in open(os.path.join(results, n, "metrics.jsonl"))]
          for n in ("cyclic_plateau", "onecycle")}
print(f"constant LR best val MAE {target:.2f}: reached by constant at {reach(const)}, "
      + ", ".join(f"by {n} at {reach(h)}" for n, h in others.items()) + " (epoch, seconds)")
EOF

fi

if [[ $STEPS == *" 3 "* ]]; then
echo "== 3. issue 24's recipe variants at the dev VM's epoch budget"
AAF_FLAG=(); [ -d "$DATA/aaf" ] && AAF_FLAG=(--aaf "$DATA/aaf")
"$PY" -m bench.gpu_recipe --data "$DATA/data" "${AAF_FLAG[@]}" --out "$RESULTS" --work "${GPU_RECIPE_WORK:-bench/out/gpu-recipe-runs}" \
  --device "$DEVICE" --parallel "${GPU_RECIPE_PARALLEL:-4}" --workers "${GPU_RECIPE_READERS:-3}" \
  --deadline-minutes "${GPU_RECIPE_DEADLINE:-8}" ${GPU_RECIPE_VARIANTS:+--only $GPU_RECIPE_VARIANTS} \
  ${GPU_RECIPE_EXTRA:+--extra $GPU_RECIPE_EXTRA}   # e.g. "--epochs 1" for a smoke run
fi
