#!/usr/bin/env bash
# Builds (once per machine) the Python 3.11 venv that the Megatron-DeepSpeed end-to-end tests run
# the real pretrain_gpt.py in. It is separate from the project's environment because
# Megatron-DeepSpeed imports deepspeed.compression.compress, which deepspeed 0.19.7 removed, and
# because its own `megatron` package must not meet megatron-core's.
# Usage: .ci/megatron-deepspeed-venv.sh [VENV]   (default ~/.cache/megatron-sharpness/ds0196-venv)
# Prints the venv's python; does nothing but print it when the venv is already complete.
set -euo pipefail
venv="${1:-${MEGATRON_SHARPNESS_DS_VENV:-$HOME/.cache/megatron-sharpness/ds0196-venv}}"
python="${PYTHON:-python3.11}"
stamp="$venv/.megatron-sharpness-complete"
# The exact set the tests were written against; a change here reinstalls it.
requirements=(
  "torch==2.13.0"          # the CPU wheel where one is on the find-links path (our machines)
  "deepspeed==0.19.6"      # newest release that still has deepspeed.compression.compress
  # What Megatron-DeepSpeed imports on the way to pretrain_gpt.py's training loop (transformers:
  # its tokenizer module; pybind11: its dataset helpers), at the versions the tests passed with.
  "numpy==2.4.6" "einops==0.8.2" "regex==2026.11.19" "six==1.17.0" "packaging==26.4" "pybind11==3.1.0"
  "tensorboard==2.21.0" "transformers==5.24.0"
)
want="${requirements[*]} +shm_comm_op"  # what this script leaves behind
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$venv/bin/python"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
"$venv/bin/python" -m pip install -q "${requirements[@]}" >&2
# The tests put the work tree on PYTHONPATH: megatron_sharpness itself is not installed here.
"$venv/bin/python" -c 'import torch, deepspeed.compression.compress' >&2
# DeepSpeed JIT-compiles its CPU shared-memory comm op at the first init_distributed (minutes on
# 2 cores). Its cache must be this venv's own: the default ~/.cache/torch_extensions is shared
# with the main environment's deepspeed, whose op has other symbols, and each would rebuild over
# the other's (a process that loads the other version's .so fails).
TORCH_EXTENSIONS_DIR="$venv/torch_extensions" DS_ACCELERATOR=cpu \
  "$venv/bin/python" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
