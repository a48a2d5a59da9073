#!/usr/bin/env bash
# Builds, once per machine, the Python 3.12 venv that runs Megatron-LM core_v0.17 and later
# (they declare Python >= 3.12; core_v0.19 and main import typing.override) for the end-to-end
# tests in tests/test_upstream_megatron_lm.py. It lives outside the work tree because torch's only
# 3.12 wheel of our pinned release is the CUDA build (about 4.5 GB with its nvidia-* packages; it
# runs on CPU), far too big to rebuild per clone or to commit.
#
# Idempotent: a venv that exists and imports everything is left as it is.
# Usage: bash .ci/py312-venv.sh            (prints the venv's python on its last line)
# Env:   MEGATRON_SHARPNESS_PY312_VENV     where the venv lives (default below)
#        MEGATRON_SHARPNESS_PY312          the Python 3.12 to build it from (default: pyenv's 3.12.1)
set -euo pipefail
venv="${MEGATRON_SHARPNESS_PY312_VENV:-$HOME/.cache/megatron-sharpness/py312-venv}"
# What Megatron-LM's pretrain_gpt.py imports on the CPU path our tests take, plus pybind11 for the
# dataset index helpers Megatron compiles at start-up and tensorboard for --tensorboard-dir (the
# CUDA torch wheel brings triton). Our package comes from the tests' PYTHONPATH, not from here.
deps=(torch==2.13.0 numpy packaging einops pyyaml regex six tensorboard pybind11)
check='import torch, triton, numpy, einops, yaml, regex, tensorboard, pybind11'

if [ -x "$venv/bin/python" ] && (cd / && "$venv/bin/python" -c "$check") 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
py="${MEGATRON_SHARPNESS_PY312:-}"
if [ -z "$py" ]; then
  if ! command -v pyenv >/dev/null; then
    echo "no Python 3.12 to build $venv from: pyenv is not installed and MEGATRON_SHARPNESS_PY312 is unset" >&2
    exit 1
  fi
  py="$(pyenv root)/versions/3.12.1/bin/python"
fi
if ! "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "$py is not a Python 3.12 (set MEGATRON_SHARPNESS_PY312 to one)" >&2
  exit 1
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${deps[@]}"
(cd / && "$venv/bin/python" -c "$check")
echo "$venv/bin/python"
