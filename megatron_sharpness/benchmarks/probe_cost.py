"""What a probe costs, per backend, write mode and model size (CPU, 2 ranks; or GPUs with NCCL).
Not a test.

Runs the workers of benchmarks/megatron_layouts.py (megatron-core, DP2 bf16 distributed optimizer)
and benchmarks/deepspeed_zero.py (ZeRO-2 and ZeRO-3 bf16), each write mode the backend has, at
each model size, and prints one table (columns: benchmarks/megatron_layouts.py; what is measured
and how: benchmarks/instruments.py). --json keeps the rows for benchmarks/cost_model.py.

    python -m megatron_sharpness.benchmarks.probe_cost [--sizes 50M 200M] [--json probe_cost.json]

One GPU (launch/gpu_check.sh): --device cuda --ranks 1 (data parallelism 1: no all-gathers to
time; the forwards, writes and the resolution floor on the GPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_sharpness.benchmarks import run_setups
from megatron_sharpness.benchmarks.megatron_layouts import cost_table

# Model sizes: a GPT of `layers` blocks of width `width` (about 12·layers·width² parameters).
SIZES = {"50M": (512, 16, 8), "200M": (1024, 16, 16), "tiny": (128, 4, 4)}
# (name, worker module, worker arguments, write modes it has)
SETUPS = (
    ("megatron-core DP bf16 dist-opt", "megatron_sharpness.benchmarks.megatron_layouts",
     ["--bf16", "--dist-opt"], ("local", "sharded")),
    ("DeepSpeed ZeRO-2 bf16", "megatron_sharpness.benchmarks.deepspeed_zero", ["--stage", "2"], ("local", "sharded")),
    ("DeepSpeed ZeRO-3 bf16", "megatron_sharpness.benchmarks.deepspeed_zero", ["--stage", "3"], ("sharded",)),
)


def worker_args(module: str, size: str, a: argparse.Namespace) -> list[str]:
    width, layers, heads = SIZES[size]
    common = ["--steps", str(a.steps), "--interval", str(a.interval), "--micro-batch-size", str(a.micro_batch_size),
              "--heads", str(heads), "--layers", str(layers), "--device", a.device]
    if module.endswith("megatron_layouts"):
        return common + ["--hidden", str(width), "--seq-length", str(a.seq_length), "--micro-batches", "1"]
    return common + ["--width", str(width), "--seq-len", str(a.seq_length), "--accumulation", "1",
                     "--micro-batches", "1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["50M", "200M"], choices=list(SIZES))
    parser.add_argument("--setups", nargs="+", default=[name for name, *_ in SETUPS],
                        choices=[name for name, *_ in SETUPS], metavar="SETUP")
    parser.add_argument("--writes", nargs="+", default=["local", "sharded"], choices=["local", "sharded"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", type=int, default=2, help="ranks per job (data parallelism)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows here (cost_model.py reads them)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one job may run (default 3600)")
    a = parser.parse_args(argv)

    from megatron_sharpness.testing.launch import LaunchError

    rows, failed = [], []
    for size in a.sizes:
        for name, module, args, writes in SETUPS:
            if name not in a.setups:
                continue
            for write in (w for w in a.writes if w in writes):
                label = f"{name.replace('DP', f'DP{a.ranks}')} {size}"
                setups = {label: (a.ranks, [*args, *worker_args(module, size, a), "--write", write])}
                env = {"PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": a.device}
                try:
                    [(label, result)] = run_setups(module, setups, [], env, a.timeout)
                except LaunchError as error:  # the other rows still count
                    failed.append(f"{label}, write {write}: {str(error).splitlines()[0]}")
                    continue
                rows.append((label, {**result, "setup": name, "size": size}))
                if a.json:  # after every row: a run cut short keeps what it measured
                    with open(a.json, "w") as out:
                        json.dump({"device": a.device, "ranks": a.ranks, "rows": [row for _, row in rows]}, out,
                                  indent=1)
    print(f"{a.ranks} ranks ({a.device}), one micro-batch of {a.micro_batch_size}×{a.seq_length} per step and per "
          f"probe forward, probe every {a.interval} steps; medians over the probes after the first")
    print(cost_table(rows))
    for line in failed:
        print(f"failed: {line}")
    if a.json:
        print(f"rows written to {a.json}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
