#!/usr/bin/env bash
# One prepared GPU check (~10 minutes at most on one CUDA machine; every step has its own budget):
#   1. install the package unless it and its dependencies import already (torch present, else torch==2.13.0),
#   2. DARE "counter" masks and TA/TIES/DARE-TIES merges of one tensor on CUDA against the CPU (bit equality
#      is printed, not asserted: CUDA kernels may fuse multiply-adds differently),
#   3. the data-aware methods and the LoRA output path on the device (budget 200 s, benchmarks/device_checks.py
#      then benchmarks/data_aware_cost.py): RegMean (fp64 Cholesky solve) and Fisher merges of one tensor on the
#      device against the CPU, merge_adapters RegMean of 3 LoRA adapters on the device against the CPU, the
#      randomized rank-16 factorisation on the device (error against the exact truncation, same seed -> same
#      factors); RegMean vs TA per Linear at the 542M shapes, the quick start's shape as LoRA and as full experts,
#      and merge_models TA / RegMean / Fisher on the 542M shape cut to DA_LAYERS layers (default 1), with Gram and
#      Fisher sidecars,
#   4. speed benchmark at a 7B-like tensor shape (hidden 4096, intermediate 11008, LAYERS layers (default 2),
#      vocab 32000) with merge_models(device="cuda"): floor + TA/TIES/DARE-TIES, plain and Sens (budget 240 s),
#   5. the quick start (recipes/quickstart.py) on the GPU (budget 120 s),
#   6. optional (SCALE=1): the out-of-core scale test (benchmarks/scale.py) at the 3B shape (hidden 3072,
#      intermediate 8192, 24/8 heads, vocab 32000; SCALE_LAYERS decoder layers, default 28 = 3.02B parameters,
#      6.0 GB per model, 24 GB of inputs for base + 3 experts) with merge_models(device="cuda"), the page cache
#      dropped before every job (drop_caches as root, else posix_fadvise per file): floors + TA/TIES/DARE-TIES.
#      Needs ~31 GB of disk (the inputs are deleted at the end); ~6 cold passes over 24 GB: at 2 GB/s about
#      3 minutes with generation, budget 420 s (SCALE_LAYERS=8 for 1.0B parameters and ~1 minute). On a
#      machine with more RAM than 24 GB this is a cold-cache test, not an out-of-core one,
#   7. a short table.
# Without CUDA it is a dry run on the CPU: steps 2, 4, 5 and 6 are skipped (and say so), step 3 runs at small
# sizes (DA_PARTS=quickstart), so the script itself can be checked on any machine in a few minutes.
# Results go to $OUT (the device tool's output folder) or /tmp/sens_peft_gpu.
# Usage: bash benchmarks/gpu_check.sh            (LAYERS=1 bash ... for a shorter run)
#        SCALE=1 SCALE_LAYERS=28 bash benchmarks/gpu_check.sh     (with the scale step)
#        STEPS=data_aware bash benchmarks/gpu_check.sh   (a subset of: equality,data_aware,speed,quickstart)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also in the benchmarks' child processes
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/sens_peft_gpu}
LAYERS=${LAYERS:-2}
STEPS=${STEPS:-equality,data_aware,speed,quickstart}
DA_LAYERS=${DA_LAYERS:-1}
WORK=${WORK:-/tmp/sens_peft_speed_gpu}
SCALE=${SCALE:-0}
SCALE_LAYERS=${SCALE_LAYERS:-28}
mkdir -p "$OUT"
T0=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
nproc; free -g | head -2

echo "== install"
if python -c "import torch, transformers, peft, safetensors, sens_peft" 2>/dev/null; then
  echo "sens_peft and its dependencies import already: not installing"
else
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0 || exit 1
  fi
  python -m pip install -q -e . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
fi
python - <<'EOF' || exit 1
import torch, transformers, peft, sens_peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "peft", peft.__version__, "sens_peft", sens_peft.__version__,
      sens_peft.__file__)
EOF
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda
  DA_PARTS=${DA_PARTS:-solve,quickstart,full}
else
  DEV=cpu
  DA_PARTS=${DA_PARTS:-quickstart}
  echo "!! no CUDA device: dry run on the CPU (steps 2, 4, 5, 6 skipped; step 3 at small sizes)"
fi
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

if [ "$DEV" = cuda ] && has_step equality; then
echo "== DARE 'counter' masks and streamed merges: CUDA = CPU"
python - <<'EOF' 2>&1 | tee "$OUT/device_equality.log"
import torch
from sens_peft.methods import dare_keep_mask, merge_streamed
for shape, name in (((4096, 4096), "model.layers.0.mlp.up_proj.weight"), ((3, 1 << 23), "big")):
    cpu = dare_keep_mask(shape, 0.3, 7, name, 2)
    gpu = dare_keep_mask(shape, 0.3, 7, name, 2, device="cuda").cpu()
    print("counter mask", shape, "CUDA == CPU:", torch.equal(cpu, gpu), "kept", float(cpu.mean()))
g = torch.Generator().manual_seed(0)
base = torch.randn(1 << 22, generator=g).bfloat16()
experts = [(base.float() + 0.01 * torch.randn(base.shape, generator=g)).bfloat16() for _ in range(3)]
for method in ("task_arithmetic", "ties", "dare_ties"):
    a, _ = merge_streamed(method, base, experts, [0.5, 0.8, 1.1], density=0.4, name="w")
    b, _ = merge_streamed(method, base.cuda(), [e.cuda() for e in experts], [0.5, 0.8, 1.1], density=0.4,
                          name="w", chunk=1 << 24)
    b = b.cpu()
    print(method, "CUDA == CPU:", torch.equal(a, b), "differing entries:", int((a != b).sum()))
EOF
else
  echo "== step 2 (CUDA = CPU equality) skipped: device $DEV, STEPS=$STEPS"
fi

DA_RC=skipped
if has_step data_aware; then
  echo "== data-aware merges and the randomized factorisation on $DEV (budget 200 s)"
  DA_T0=$(date +%s)
  timeout 100 python benchmarks/device_checks.py "$DEV" 2>&1 | tee "$OUT/device_checks.log"
  DA_RC=${PIPESTATUS[0]}
  LEFT=$(( 200 - ($(date +%s) - DA_T0) ))
  if [ "$LEFT" -gt 20 ]; then
    timeout "$LEFT" python benchmarks/data_aware_cost.py --part "$DA_PARTS" --device "$DEV" --fisher --repeats 1 \
      --layers "$DA_LAYERS" --workdir "$WORK/data_aware" --out "$OUT/data_aware_cost_$DEV.json" 2>&1 \
      | tee "$OUT/data_aware_cost.log"
    DA_RC="$DA_RC/${PIPESTATUS[0]}"
  else
    DA_RC="$DA_RC/no time left"
  fi
  rm -rf "$WORK/data_aware"
else
  echo "== step 3 (data-aware merges) skipped: STEPS=$STEPS"
fi

SPEED_RC=skipped
if [ "$DEV" = cuda ] && has_step speed; then

echo "== speed benchmark, 7B-like tensors, device=cuda (budget 240 s)"
timeout 240 python benchmarks/speed.py --only floor,sens --device cuda \
  --shape "4096,11008,${LAYERS},32000" --shard-size 2GB --workdir "$WORK" \
  --out "$OUT/speed_gpu.json" 2>&1 | tee "$OUT/speed_gpu.log"
SPEED_RC=${PIPESTATUS[0]}
cp "$WORK"/logs/*.log "$OUT/" 2>/dev/null || true
else
  echo "== step 4 (speed benchmark on CUDA) skipped: device $DEV, STEPS=$STEPS"
fi

QS_T0=$(date +%s.%N)
if [ "$DEV" != cuda ] || ! has_step quickstart; then
  echo "== step 5 (quick start on the GPU) skipped: device $DEV, STEPS=$STEPS"
  echo "skipped" >"$OUT/quickstart.log"
  QS_RC=skipped
elif [ -f recipes/quickstart.py ]; then
  echo "== quick start on the GPU (budget 120 s)"
  timeout 120 python recipes/quickstart.py >"$OUT/quickstart.log" 2>&1
  QS_RC=$?
else
  echo "recipes/quickstart.py not found" >"$OUT/quickstart.log"
  QS_RC=127
fi
QS_S=$(python -c "import time; print(f'{time.time() - $QS_T0:.1f}')")
tail -15 "$OUT/quickstart.log"

SCALE_RC=skipped
if [ "$SCALE" = "1" ] && [ "$DEV" = cuda ]; then
  echo "== scale test: 3B shape, ${SCALE_LAYERS} layers, cold page cache, device=cuda (budget 420 s)"
  rm -rf "$WORK"/full_*  # step 3's inputs: free the disk for the 30 GB of this step
  df -h "$WORK" | tail -1
  timeout 420 python benchmarks/scale.py --device cuda --layers "$SCALE_LAYERS" --workdir "$WORK/scale" \
    --out "$OUT/scale_gpu.json" 2>&1 | tee "$OUT/scale_gpu.log"
  SCALE_RC=${PIPESTATUS[0]}
  rm -rf "$WORK/scale"  # (scale.py deletes its inputs itself, also on errors; this covers a timeout)
fi

echo "== summary"
echo "scale step: rc=$SCALE_RC (table above, JSON in $OUT/scale_gpu.json)"
echo "data-aware step: rc=$DA_RC (device_checks.py / data_aware_cost.py; JSON in $OUT/data_aware_cost_$DEV.json)"
python - "$OUT/speed_gpu.json" "$SPEED_RC" "$QS_RC" "$QS_S" "$OUT/data_aware_cost_$DEV.json" <<'EOF'
import json, sys
path, speed_rc, qs_rc, qs_s, da_path = sys.argv[1:6]
try:
    for part in json.load(open(da_path))["parts"].values():
        if "ta_min_s" in part:
            rest = ", ".join(f"{m} {min(t):.2f} s" for m, t in part["seconds"].items() if m != "task_arithmetic")
            print(f"{part['label']}: TA {part['ta_min_s']:.2f} s, {rest} (RegMean/TA {part['ratio_of_mins']:.1f}x)")
        else:
            print(part["label"], part["seconds_min"])
except (OSError, ValueError, KeyError) as err:
    print(f"data-aware costs: no results ({type(err).__name__}: {err})")
try:
    res = json.load(open(path))
except Exception as err:
    print(f"speed benchmark: no results ({err}), rc={speed_rc}")
    res = None
if res:
    inp = res["inputs"]
    print(f"inputs: base + {inp['num_experts']} experts, {inp['params_m']:.0f}M params, "
          f"{inp['gb_per_model']:.2f} GB each; device {res.get('device')}")
    print(res.get("table_markdown", ""))
print(f"\n| check | rc | seconds |\n|---|---:|---:|\n| speed.py (cuda) | {speed_rc} | – |\n"
      f"| recipes/quickstart.py | {qs_rc} | {qs_s} |")
EOF
echo "total $(( $(date +%s) - T0 )) s"
