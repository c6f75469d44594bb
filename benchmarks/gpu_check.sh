#!/usr/bin/env bash
# One prepared GPU check (≤ 10 minutes on one CUDA machine):
#   1. install the package (torch already present, else torch==2.13.0),
#   2. DARE "counter" masks and TA/TIES/DARE-TIES merges of one tensor on CUDA against the CPU (bit equality
#      is printed, not asserted: CUDA kernels may fuse multiply-adds differently),
#   3. speed benchmark at a 7B-like tensor shape (hidden 4096, intermediate 11008, 4 layers, vocab 32000:
#      1.07B parameters, 2.1 GB per model in bf16) with merge_models(device="cuda"): floor + TA/TIES/DARE-TIES,
#      plain and Sens,
#   4. the quick start (recipes/quickstart.py) on the GPU,
#   5. optional (SCALE=1): the out-of-core scale test (benchmarks/scale.py) at the 3B shape (hidden 3072,
#      intermediate 8192, 24/8 heads, vocab 32000; SCALE_LAYERS decoder layers, default 28 = 3.02B parameters,
#      6.0 GB per model, 24 GB of inputs for base + 3 experts) with merge_models(device="cuda"), the page cache
#      dropped before every job (drop_caches as root, else posix_fadvise per file): floors + TA/TIES/DARE-TIES.
#      Needs ~31 GB of disk (the inputs are deleted at the end); ~6 cold passes over 24 GB: at 2 GB/s about
#      3 minutes with generation, budget 420 s (SCALE_LAYERS=8 for 1.0B parameters and ~1 minute). On a
#      machine with more RAM than 24 GB this is a cold-cache test, not an out-of-core one,
#   6. a short table.
# Results go to $OUT (the device tool's output folder) or /tmp/sens_peft_gpu.
# Usage: bash benchmarks/gpu_check.sh            (LAYERS=2 bash ... for a shorter run)
#        SCALE=1 SCALE_LAYERS=28 bash benchmarks/gpu_check.sh     (with the scale step)
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/sens_peft_gpu}
LAYERS=${LAYERS:-4}
WORK=${WORK:-/tmp/sens_peft_speed_gpu}
SCALE=${SCALE:-0}
SCALE_LAYERS=${SCALE_LAYERS:-28}
mkdir -p "$OUT"
T0=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
nproc; free -g | head -2

echo "== install"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0 || exit 1
fi
python -m pip install -q -e . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
python - <<'EOF' || exit 1
import torch, transformers, peft, sens_peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "peft", peft.__version__, "sens_peft", sens_peft.__version__)
assert torch.cuda.is_available(), "CUDA not available"
EOF

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

echo "== speed benchmark, 7B-like tensors, device=cuda (budget 420 s)"
timeout 420 python benchmarks/speed.py --only floor,sens --device cuda \
  --shape "4096,11008,${LAYERS},32000" --shard-size 2GB --workdir "$WORK" \
  --out "$OUT/speed_gpu.json" 2>&1 | tee "$OUT/speed_gpu.log"
SPEED_RC=${PIPESTATUS[0]}
cp "$WORK"/logs/*.log "$OUT/" 2>/dev/null || true

echo "== quick start on the GPU (budget 120 s)"
QS_T0=$(date +%s.%N)
if [ -f recipes/quickstart.py ]; then
  timeout 120 python recipes/quickstart.py >"$OUT/quickstart.log" 2>&1
  QS_RC=$?
else
  echo "recipes/quickstart.py not found" >"$OUT/quickstart.log"
  QS_RC=127
fi
QS_S=$(python -c "import time; print(f'{time.time() - $QS_T0:.1f}')")
tail -15 "$OUT/quickstart.log"

SCALE_RC=skipped
if [ "$SCALE" = "1" ]; then
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
python - "$OUT/speed_gpu.json" "$SPEED_RC" "$QS_RC" "$QS_S" <<'EOF'
import json, sys
path, speed_rc, qs_rc, qs_s = sys.argv[1:5]
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
