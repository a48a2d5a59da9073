#!/usr/bin/env bash
# The layouts that cannot run on CPU, on the real Megatron-LM pretrain_gpt.py with NCCL, each trained
# with the probe on and off; the iteration lines must agree bitwise (lm loss, grad norm, params norm)
# and the measured ones carry our fields:
#   te-precision-aware  TransformerEngine layers + the precision-aware optimizer (TE FusedAdam keeps the
#                       masters: int16 remainders by default)                                    1 GPU
#   te-moe              MoE on TE's grouped GEMM (experts named linear_fc1.weightK), the default
#                       module breakdown (attention / router / experts per layer)                   1 GPU
#   fp8                 --fp8-format hybrid: refused when the flags are parsed (exit 2, one line), before
#                       the model is built                                                          1 GPU
#   cp2                 context parallel 2 (TE attention, p2p)                  2 GPUs, else skipped
#   megatron-fsdp       --use-megatron-fsdp DP2 with TE layers and the precision-aware optimizer
#                       (Megatron-FSDP keeps the masters, TE FusedAdam steps them)   2 GPUs, else skipped
# Why fp8 is refused (read before changing that): TransformerEngine's delayed-scaling amax history
# advances with every forward, so the probe's forward-only passes would change the scales training
# uses next; and with is_first_microbatch TE caches the fp8 copy of each weight at the first
# micro-batch of a forward_backward_func call and reuses it for the others — a trial write is seen
# only at the next call's first micro-batch (true of our replay, which calls forward_backward_func
# per trial point, but a cached copy must never outlive a write).
#
# Usage (on a machine with CUDA GPUs, megatron-sharpness installed from a source checkout):
#   MEGATRON_LM=/path/to/Megatron-LM bash launch/gpu_layouts.sh
# Env: MEGATRON_LM (required), PYTHON (default python), ITERS (default 6), OUT (default a temp dir),
# CHECKOUT (a patched copy made already, e.g. by gpu_check.sh), LAYOUTS (default all five).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}"
python="${PYTHON:-python}"
iters="${ITERS:-6}"
out="${OUT:-$(mktemp -d -t megatron-sharpness-gpu-layouts-XXXXXX)}"
layouts="${LAYOUTS:-te-precision-aware te-moe fp8 cp2 megatron-fsdp}"
gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
[ "$gpus" -ge 1 ] || { echo "no CUDA GPU visible to torch" >&2; exit 1; }

if [ -z "${CHECKOUT:-}" ]; then
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$MEGATRON_LM" "$out" <<'EOF'
import sys
from pathlib import Path
from megatron_sharpness.testing.megatron_lm_check import patched_copy
path, patch = patched_copy(Path(sys.argv[1]), Path(sys.argv[2]))
print(f"patched {path} with {patch.parent.name}/{patch.name}")
EOF
  CHECKOUT="$out/Megatron-LM"
fi

base=(--bf16 --use-distributed-optimizer --transformer-impl transformer_engine --mock-data
      --tokenizer-type NullTokenizer --vocab-size 1024 --num-layers 2 --hidden-size 256
      --num-attention-heads 8 --seq-length 256 --max-position-embeddings 256 --micro-batch-size 2
      --global-batch-size 8 --lr 3e-4 --train-iters "$iters" --log-interval 1 --log-params-norm
      --eval-iters 0 --eval-interval 100000 --attention-dropout 0.0 --hidden-dropout 0.0 --seed 1234)

run() {  # run NAME NPROC FLAGS...; the log goes to $out/NAME.log, the exit code is returned
  local name="$1" nproc="$2"; shift 2
  (cd "$CHECKOUT" && PYTHONPATH="$CHECKOUT:$here${PYTHONPATH:+:$PYTHONPATH}" \
    torchrun --nproc-per-node "$nproc" --master-port "${MASTER_PORT:-29527}" pretrain_gpt.py "${base[@]}" "$@") \
    > "$out/$name.log" 2>&1
}

on_off() {  # on_off NAME NPROC FLAGS...: trains with the probe on and off and compares
  local name="$1" nproc="$2"; shift 2
  local probe=(--critical-sharpness-interval 2 --critical-sharpness-log-file "$out/$name.jsonl")
  run "$name-on" "$nproc" "$@" "${probe[@]}" || { tail -n 40 "$out/$name-on.log"; echo "$name: probe-on run failed" >&2; exit 1; }
  run "$name-off" "$nproc" "$@" || { tail -n 40 "$out/$name-off.log"; echo "$name: probe-off run failed" >&2; exit 1; }
  "$python" - "$out" "$name" <<'EOF'
import json, re, sys
from pathlib import Path
out, name = Path(sys.argv[1]), sys.argv[2]
pattern = re.compile(r"iteration\s+(\d+)/.*?lm loss: (\S+) .*?grad norm: (\S+) .*?params norm: (\S+) ")
def lines(run):
    text = (out / f"{name}-{run}.log").read_text().splitlines()
    return {int(m.group(1)): m.groups()[1:] for m in map(pattern.search, text) if m}
on, off = lines("on"), lines("off")
if not on or on != off:
    sys.exit(f"{name}: probe on/off differ or no iteration lines: on={on} off={off}")
records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
if not records or any(r["skipped"] for r in records):
    sys.exit(f"{name}: no measurement, or a skipped one: {records}")
print(f"{name}: bitwise identical over {len(on)} iterations; measured {[(r['step'], r['status'], r['critical_sharpness']) for r in records]}")
for record in records:
    if record["modules"]:
        print(f"{name}: step {record['step']} groups {[(g, m['status']) for g, m in record['modules'].items()]}")
EOF
}

for layout in $layouts; do
  case "$layout" in
    te-precision-aware)
      on_off te-precision-aware 1 --use-precision-aware-optimizer ;;
    te-moe)
      on_off te-moe 1 --num-experts 4 --moe-router-topk 2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall \
        --disable-bias-linear --critical-sharpness-modules default --critical-sharpness-modules-interval 1
      "$python" - "$out/te-moe.jsonl" <<'EOF'
import json, sys
groups = [list(json.loads(line)["modules"]) for line in open(sys.argv[1])]
expected = ["embedding", "layer_0.attention", "layer_0.router", "layer_0.experts", "layer_1.attention",
            "layer_1.router", "layer_1.experts", "output"]
if any(g != expected for g in groups):
    sys.exit(f"te-moe: module groups {groups}, expected {expected}")
EOF
      ;;
    fp8)
      code=0; run fp8 1 --fp8-format hybrid --critical-sharpness-interval 2 || code=$?
      if [ "$code" -ne 2 ] || ! grep -q "error: critical sharpness: --fp8-format hybrid" "$out/fp8.log" \
         || grep -q "building GPT model" "$out/fp8.log"; then
        tail -n 20 "$out/fp8.log"; echo "fp8: expected the refusal at start-up (exit 2), got exit $code" >&2; exit 1
      fi
      echo "fp8: refused when the flags were parsed (exit 2), before the model was built" ;;
    cp2)
      if [ "$gpus" -lt 2 ]; then echo "cp2: skipped, needs 2 GPUs ($gpus visible)"; continue; fi
      CUDA_DEVICE_MAX_CONNECTIONS=1 on_off cp2 2 --context-parallel-size 2 --cp-comm-type p2p ;;  # as Megatron wants with CP > 1
    megatron-fsdp)
      if [ "$gpus" -lt 2 ]; then echo "megatron-fsdp: skipped, needs 2 GPUs ($gpus visible)"; continue; fi
      # Megatron-FSDP wants more than one CUDA connection; its checkpoints are fsdp_dtensor.
      CUDA_DEVICE_MAX_CONNECTIONS=8 on_off megatron-fsdp 2 --use-megatron-fsdp --ckpt-format fsdp_dtensor \
        --use-precision-aware-optimizer ;;
    *) echo "unknown layout $layout (known: te-precision-aware te-moe fp8 cp2 megatron-fsdp)" >&2; exit 1 ;;
  esac
done
echo "logs in $out"
