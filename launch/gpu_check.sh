#!/usr/bin/env bash
# One-GPU end-to-end check with NCCL, in two parts (PARTS, default both):
#   megatron-lm  the real Megatron-LM pretrain_gpt.py (TP1, bf16, distributed optimizer, mock data),
#                patched with our patch for its release line, trained with the probe on and off; the
#                iteration lines must agree bitwise (lm loss, grad norm, params norm) and the
#                measured ones carry our fields; then the layouts that need a GPU (launch/gpu_layouts.sh)
#                and the plain-PyTorch benchmark on that GPU.
#   benchmarks   the cost table of benchmarks/probe_cost.py on this GPU with NCCL (megatron-core
#                distributed optimizer, DeepSpeed ZeRO-2 and ZeRO-3, each write mode, SIZES), one
#                rank: data parallelism 1, so there is no all-gather to time, but the forwards, the
#                writes, the resolution floor and the memory are the GPU's; then the 7B cost model
#                fed with the counts measured here.
#
# Usage (on a machine with one CUDA GPU, megatron-sharpness installed from a source checkout):
#   MEGATRON_LM=/path/to/Megatron-LM bash launch/gpu_check.sh
#   PARTS=benchmarks bash launch/gpu_check.sh                 # no Megatron-LM checkout needed
#   PARTS=benchmarks DEVICE=cpu SIZES=tiny bash launch/gpu_check.sh   # the same path on CPU/gloo
# Env: MEGATRON_LM (for megatron-lm), PYTHON (default python), ITERS (default 12), OUT (default a
# temp dir), PARTS (default "megatron-lm benchmarks"), DEVICE (cuda; cpu runs the benchmarks part on
# gloo with 2 ranks), SIZES (default "50M 200M").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
iters="${ITERS:-12}"
parts="${PARTS:-megatron-lm benchmarks}"
device="${DEVICE:-cuda}"
sizes="${SIZES:-50M 200M}"
out="${OUT:-$(mktemp -d -t megatron-sharpness-gpu-XXXXXX)}"
mkdir -p "$out"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
for part in $parts; do
  case "$part" in megatron-lm|benchmarks) ;; *) echo "PARTS: unknown part '$part' (megatron-lm, benchmarks)" >&2; exit 2 ;; esac
done
case "$device" in cuda|cpu) ;; *) echo "DEVICE must be cuda or cpu, not '$device'" >&2; exit 2 ;; esac
if [[ "$device" == cuda ]]; then
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
fi

megatron_lm() {
  : "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (or PARTS=benchmarks)}"
  [[ "$device" == cuda ]] || { echo "the megatron-lm part needs DEVICE=cuda" >&2; exit 2; }
  # A patched copy (the checkout itself is left as it is), with the patch of its release line.
  "$python" - "$MEGATRON_LM" "$out" <<'EOF'
import sys
from pathlib import Path
from megatron_sharpness.testing.megatron_lm_check import patched_copy
path, patch = patched_copy(Path(sys.argv[1]), Path(sys.argv[2]))
print(f"patched {path} with {patch.parent.name}/{patch.name}")
EOF
  local checkout="$out/Megatron-LM"
  local flags=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --bf16
         --use-distributed-optimizer --mock-data --tokenizer-type NullTokenizer --vocab-size 1024
         --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256
         --max-position-embeddings 256 --micro-batch-size 4 --global-batch-size 16 --lr 3e-4
         --train-iters "$iters" --log-interval 1 --log-params-norm --eval-iters 0 --eval-interval 100000
         --attention-dropout 0.0 --hidden-dropout 0.0 --seed 1234)
  local probe=(--critical-sharpness-interval 2 --critical-sharpness-log-file "$out/sharpness.jsonl")

  run() {  # run NAME FLAGS...
    local name="$1"; shift
    (cd "$checkout" && PYTHONPATH="$checkout:$PYTHONPATH" \
      torchrun --nproc-per-node 1 --master-port "${MASTER_PORT:-29517}" pretrain_gpt.py "${flags[@]}" "$@") \
      > "$out/$name.log" 2>&1 || { tail -n 40 "$out/$name.log"; echo "run $name failed: $out/$name.log" >&2; exit 1; }
  }
  run probe-on "${probe[@]}"
  run probe-off

  "$python" - "$out" <<'EOF'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
pattern = re.compile(r"iteration\s+(\d+)/.*?lm loss: (\S+) .*?grad norm: (\S+) .*?params norm: (\S+) ")
def lines(name):
    return {int(m.group(1)): m.groups()[1:] for m in map(pattern.search, (out / f"{name}.log").read_text().splitlines()) if m}
on, off = lines("probe-on"), lines("probe-off")
if not on or on != off:
    sys.exit(f"probe on/off differ or no iteration lines: on={on} off={off}")
measured = [l for l in (out / "probe-on.log").read_text().splitlines() if "critical sharpness:" in l]
if not measured:
    sys.exit("no iteration line carries our fields")
print(f"bitwise identical over {len(on)} iterations (lm loss, grad norm, params norm); {len(measured)} measured:")
print("\n".join(measured))
EOF
  megatron-sharpness summary "$out/sharpness.jsonl"
  # The layouts that need a GPU: TransformerEngine + the precision-aware optimizer, MoE on TE's grouped
  # GEMM, fp8 refused at start-up, context parallel 2 (with 2 GPUs).
  CHECKOUT="$checkout" OUT="$out" PYTHON="$python" bash "$here/launch/gpu_layouts.sh"
  "$python" -m megatron_sharpness.benchmarks.plain_torch --steps 100 --device cuda
}

benchmarks() {
  # NCCL allows one rank per GPU: one rank on one GPU; on CPU (gloo) two ranks, as the CPU tables.
  local ranks=1
  [[ "$device" == cpu ]] && ranks=2
  # shellcheck disable=SC2086  # SIZES is a list
  "$python" -m megatron_sharpness.benchmarks.probe_cost --device "$device" --ranks "$ranks" --sizes $sizes \
    --json "$out/probe_cost_$device.json" | tee "$out/probe_cost_$device.txt"
  "$python" -m megatron_sharpness.benchmarks.cost_model --counts "$out/probe_cost_$device.json" \
    | tee "$out/cost_model_$device.txt"
}

for part in $parts; do
  case "$part" in
    megatron-lm) megatron_lm ;;
    benchmarks) benchmarks ;;
  esac
done
echo "logs in $out"
