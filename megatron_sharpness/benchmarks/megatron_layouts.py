"""Benchmark of the megatron-core probe per parallel layout: a tiny GPTModel on 2 or 4 ranks (CPU,
gloo, CPU shims). Not a test.

Prints one table: training step, one forward-only pass of the step's micro-batches, one write
(lerp + param all-gather), the probe per measurement, forwards per measurement, probe / (forwards ×
forward-only pass), and the extra bytes the probe holds per rank next to the parameter bytes per
data-parallel rank.

    python -m megatron_sharpness.benchmarks.megatron_layouts [--steps 20] [--interval 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from megatron_sharpness.benchmarks import markdown_table, run_setups

LAYOUTS = {
    "DP2 bf16 dist-opt": (2, ["--bf16", "--dist-opt"]),
    "DP2 bf16 dist-opt overlap": (2, ["--bf16", "--dist-opt", "--overlap"]),
    "DP2 fp32": (2, []),
    "TP2 bf16": (2, ["--tp", "2", "--bf16"]),
    "PP2 bf16 dist-opt": (2, ["--pp", "2", "--bf16", "--dist-opt"]),
    "PP2 VPP2 fp32": (2, ["--pp", "2", "--vpp", "2"]),
    "TP2xPP2 bf16 dist-opt": (4, ["--tp", "2", "--pp", "2", "--bf16", "--dist-opt"]),
    "TP2xDP2 bf16 dist-opt": (4, ["--tp", "2", "--bf16", "--dist-opt"]),
}


def worker(a: argparse.Namespace) -> None:
    import torch

    from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

    install_cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sharpness.backends.lerp import LERP_CHUNK_ELEMENTS
    from megatron_sharpness.config import SharpnessConfig
    from megatron_sharpness.integrations.megatron_core import MegatronSharpness
    from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,
                                                          init_gloo_model_parallel, shutdown_model_parallel,
                                                          synthetic_batch)

    init_gloo_model_parallel(a.tp, a.pp, a.vpp)
    setup = TinyGPTSetup(tensor_parallel=a.tp, pipeline_parallel=a.pp, virtual_pipeline=a.vpp,
                         distributed_optimizer=a.dist_opt, bf16=a.bf16, overlap_param_gather=a.overlap,
                         layers=4, hidden=128, heads=4, vocab=256, seq_length=64, micro_batch_size=4)
    chunks, optimizer = build_model_and_optimizer(setup)
    sharpness = MegatronSharpness(chunks, optimizer, forward_step, SharpnessConfig(interval=a.interval),
                                  seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size, loggers=[])
    forward_backward = get_forward_backward_func()
    dp_rank = parallel_state.get_data_parallel_rank()

    def step_batches(step):
        return [synthetic_batch(setup, 1000 * step + 10 * dp_rank + micro) for micro in range(a.micro_batches)]

    def iterators(batches):
        return [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)

    def run(batches, forward_only, data=None):
        return forward_backward(forward_step_func=forward_step, data_iterator=data or iterators(batches),
                                model=chunks, num_microbatches=len(batches), seq_length=setup.seq_length,
                                micro_batch_size=setup.micro_batch_size, forward_only=forward_only)

    def timed(fn):
        torch.distributed.barrier()
        started = time.perf_counter()
        fn()
        torch.distributed.barrier()
        return time.perf_counter() - started

    step_seconds, probe_seconds, forwards = [], [], []
    for step in range(a.steps):
        batches = step_batches(step)

        def train():
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            run(batches, False, sharpness.record(iterators(batches), len(batches)))
            sharpness.step()

        elapsed = timed(train)
        measurement, sharpness.last_measurement = sharpness.last_measurement, None
        if measurement is None:
            step_seconds.append(elapsed)
        elif measurement.task is not None:
            probe_seconds.append(measurement.probe_seconds)
            forwards.append(measurement.task.forwards)

    batches = step_batches(a.steps)
    with torch.no_grad():
        forward_seconds = [timed(lambda: run(batches, True)) for _ in range(5)]
    backend = sharpness.backend
    backend.step_applied = True
    backend.snapshot()
    backend.after_step()
    write_seconds = [timed(lambda: backend.write(0.5)) for _ in range(5)]
    pairs = backend._pairs
    backend.restore()

    snapshot_bytes = sum(main.numel() * main.element_size() for main, _ in pairs)
    aliased_bytes = sum(main.numel() * main.element_size() for main, target in pairs
                        if main.data_ptr() == target.data_ptr())
    extra_bytes = snapshot_bytes + aliased_bytes + 4 * min(max(m.numel() for m, _ in pairs), LERP_CHUNK_ELEMENTS)
    local_parameters = sum(p.numel() for c in chunks for p in c.parameters())
    largest_extra = torch.tensor([float(extra_bytes)])
    torch.distributed.all_reduce(largest_extra, op=torch.distributed.ReduceOp.MAX)
    summed = torch.tensor([float(local_parameters)])
    torch.distributed.all_reduce(summed)  # every data-parallel replica counts the model once
    dp_size = parallel_state.get_data_parallel_world_size()
    model_parameters = summed.item() / dp_size
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({
            "optimizers": sorted({type(o).__name__ for o in backend.leaves}),
            "train_step_ms": 1e3 * statistics.median(step_seconds),
            "forward_ms": 1e3 * statistics.median(forward_seconds),
            "write_ms": 1e3 * statistics.median(write_seconds),
            "probe_ms": 1e3 * statistics.median(probe_seconds),
            "forwards_median": statistics.median(forwards), "forwards_max": max(forwards),
            "probe_over_forwards": statistics.median(probe_seconds)
            / (statistics.median(forwards) * statistics.median(forward_seconds)),
            "extra_bytes": int(largest_extra.item()),
            # fp32 bytes of this rank's share of the model once split over TP, PP and DP
            "params_bytes_per_dp_rank": 4 * model_parameters / torch.distributed.get_world_size(),
            "parameters": int(model_parameters),
        }), flush=True)
    shutdown_model_parallel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    a = parser.parse_args(argv)
    if a.worker:
        worker(a)
        return

    common = ["--steps", str(a.steps), "--interval", str(a.interval), "--micro-batches", str(a.micro_batches)]
    rows = run_setups("megatron_sharpness.benchmarks.megatron_layouts", LAYOUTS, common, {"PYTHONWARNINGS": "ignore"})
    print(f"tiny GPTModel, {rows[0][1]['parameters']:,} parameters, CPU/gloo, {a.micro_batches} micro-batches "
          f"per step, probe every {a.interval} steps")
    print(markdown_table(
        ("layout", "optimizer", "train step ms", "fwd-only ms", "write ms", "probe ms", "forwards med/max",
         "probe/(fw×fwd)", "extra bytes/rank", "params/DP bytes"),
        [(name, ",".join(r["optimizers"]), f"{r['train_step_ms']:.1f}", f"{r['forward_ms']:.1f}",
          f"{r['write_ms']:.2f}", f"{r['probe_ms']:.1f}", f"{r['forwards_median']:.0f}/{r['forwards_max']}",
          f"{r['probe_over_forwards']:.2f}", f"{r['extra_bytes']:,}", f"{r['params_bytes_per_dp_rank']:,.0f}")
         for name, r in rows]))


if __name__ == "__main__":
    main()
