"""Benchmark of the megatron-core probe per parallel layout: a GPTModel on 2 or 4 ranks (CPU, gloo,
CPU shims; or one GPU per rank with NCCL). Not a test.

Prints one table: training step, one forward-only pass of the probed micro-batches, the probe per
measurement (the θ_t snapshot before the optimizer step and everything after it), forwards per
measurement, probe / (forwards × forward), the share of the probe that is not forwards and the
resolution floor's share, collectives per probe, and the extra peak memory per rank against the
fp32 shard 4·P/(TP·PP·DP) (what is measured and how: benchmarks/instruments.py).

    python -m megatron_sharpness.benchmarks.megatron_layouts [--steps 20] [--interval 4] [--write local]
"""

from __future__ import annotations

import argparse
import json
import statistics

from megatron_sharpness.benchmarks import argv_of, markdown_table, run_setups

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
    from megatron_sharpness.benchmarks.instruments import (CollectiveCounter, PhaseTimer, ProbeStats, clock,
                                                           count_inside, instrument_backend, peak_allocated, since)

    counter = CollectiveCounter()  # before megatron-core binds torch.distributed's functions
    import torch

    if a.device == "cpu":
        from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

        install_cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sharpness.config import SharpnessConfig
    from megatron_sharpness.integrations.megatron_core import MegatronSharpness
    from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,
                                                          init_gloo_model_parallel, init_nccl_model_parallel,
                                                          shutdown_model_parallel, synthetic_batch)

    if a.device == "cpu":
        init_gloo_model_parallel(a.tp, a.pp, a.vpp)
    else:
        init_nccl_model_parallel(a.tp, a.pp, a.vpp)
    setup = TinyGPTSetup(tensor_parallel=a.tp, pipeline_parallel=a.pp, virtual_pipeline=a.vpp,
                         distributed_optimizer=a.dist_opt, bf16=a.bf16, overlap_param_gather=a.overlap,
                         layers=a.layers, hidden=a.hidden, heads=a.heads, vocab=a.vocab, seq_length=a.seq_length,
                         micro_batch_size=a.micro_batch_size, device=a.device)
    chunks, optimizer = build_model_and_optimizer(setup)
    sharpness = MegatronSharpness(chunks, optimizer, forward_step, SharpnessConfig(interval=a.interval, write=a.write),
                                  seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size, loggers=[])
    timer = PhaseTimer()
    instrument_backend(timer, sharpness.probe, sharpness.backend, (sharpness.backend, "_sync_params"))
    count_inside(counter, sharpness.backend, "snapshot")
    count_inside(counter, sharpness.probe, "measure")
    count_inside(counter, sharpness.backend, "loss", "in_loss")
    stats = ProbeStats(timer, counter)
    forward_backward = get_forward_backward_func()
    dp_rank = parallel_state.get_data_parallel_rank()
    device = torch.device(a.device, torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")

    def step_batches(step):
        return [synthetic_batch(setup, 1000 * step + 10 * dp_rank + micro) for micro in range(a.micro_batches)]

    def iterators(batches):
        return [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)

    def run(batches, forward_only, data=None):
        return forward_backward(forward_step_func=forward_step, data_iterator=data or iterators(batches),
                                model=chunks, num_microbatches=len(batches), seq_length=setup.seq_length,
                                micro_batch_size=setup.micro_batch_size, forward_only=forward_only)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        torch.distributed.barrier()

    def timed(fn):
        synchronize()
        started = clock()
        fn()
        synchronize()
        return since(started)

    def train(step, window=None):
        batches = step_batches(step)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        run(batches, False, sharpness.record(iterators(batches), len(batches)))
        if window is None:
            sharpness.step()
            return
        with peak_allocated(device, window):
            sharpness.step()

    step_seconds = []
    for step in range(a.steps):
        due = sharpness.probe.is_due(sharpness.iteration + 1)
        if due:
            stats.start()
        elapsed = timed(lambda: train(step))
        measurement, sharpness.last_measurement = sharpness.last_measurement, None
        if due and step >= a.interval:  # the first measurement starts cold: not counted
            stats.stop(measurement)
        elif not due:
            step_seconds.append(elapsed)
    timer.active = False

    # One forward-only pass of the probed micro-batches, right after an (unprobed) optimizer step:
    # where the probe's forwards start from.
    batches = step_batches(a.steps)
    due, sharpness.probe.is_due = sharpness.probe.is_due, lambda step: False
    forward_seconds = []
    for _ in range(2):
        train(a.steps)
        with torch.no_grad():
            forward_seconds.append(timed(lambda: run(batches, True)))
    sharpness.probe.is_due = due
    # Memory, on steps of their own (the profiler slows them): a probed step's window against an
    # unprobed one's (both from before the optimizer step to after the probe), and one forward.
    plain, probed, forward = {}, {}, {}
    while sharpness.probe.is_due(sharpness.iteration + 1):
        train(a.steps + 1)
    train(a.steps + 2, plain)
    while not sharpness.probe.is_due(sharpness.iteration + 1):
        train(a.steps + 3)
    train(a.steps + 4, probed)
    with torch.no_grad(), peak_allocated(device, forward):
        run(batches, True)
    local = sharpness.backend.writes_locally
    extra = torch.tensor([float(probed["peak"] - plain["peak"]), float(probed["peak_outside"] - plain["peak"]),
                          float(probed["peak_writes"] - plain["peak"]), float(forward["peak"])],
                         dtype=torch.float64, device=device)
    torch.distributed.all_reduce(extra, op=torch.distributed.ReduceOp.MAX)
    local_parameters = sum(p.numel() for c in chunks for p in c.parameters())
    summed = torch.tensor([float(local_parameters)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)  # every data-parallel replica counts the model once
    tp, pp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    parameters = summed.item() / dp
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({
            "optimizers": sorted({type(o).__name__ for o in sharpness.backend.leaves}),
            "write": a.write, "local": local, "tp": tp, "pp": pp, "dp": dp, "parameters": int(parameters),
            **stats.summary(medians(forward_seconds), medians(step_seconds)),
            "extra_peak_bytes": int(extra[0].item()), "extra_peak_outside_forwards_bytes": int(extra[1].item()),
            "extra_peak_writes_bytes": int(extra[2].item()), "forward_peak_bytes": int(extra[3].item()),
            "shard_bytes": 4 * parameters / (tp * pp * dp),
            "slice_model_bytes": (2 if a.bf16 else 4) * parameters / (tp * pp),
        }), flush=True)
    shutdown_model_parallel()


def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--write", default="auto", choices=["auto", "local", "sharded"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: gloo and the CPU shims; cuda: NCCL, one GPU per rank")


MODEL_ARGS = ("steps", "interval", "micro_batches", "micro_batch_size", "seq_length", "hidden", "layers", "heads",
              "vocab", "write", "device")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="LAYOUT",
                        help=f"which layouts (default all): {', '.join(LAYOUTS)}")
    add_model_args(parser)
    a = parser.parse_args(argv)
    if a.worker:
        worker(a)
        return

    rows = run_setups("megatron_sharpness.benchmarks.megatron_layouts", {name: LAYOUTS[name] for name in a.layouts},
                      argv_of(a, MODEL_ARGS), {"PYTHONWARNINGS": "ignore"})
    print(f"GPTModel, {rows[0][1]['parameters']:,} parameters, {a.device}, {a.micro_batches} micro-batches of "
          f"{a.micro_batch_size}×{a.seq_length} per step, probe every {a.interval} steps, write {a.write}")
    print(cost_table(rows))


def cost_table(rows: list[tuple[str, dict]]) -> str:
    """The table both benchmarks print; rows: (setup name, a worker's RESULT). Times are CPU
    seconds of the rank (the work done; the wall time of a shared machine also holds the waiting
    for a core), the wall-time ratio beside the CPU-time one."""
    def mib(value):
        return f"{value / 2**20:.1f}"

    return markdown_table(
        ("setup", "params", "write", "train step ms", "fwd ms", "probe ms", "forwards", "probe/(fw×fwd) cpu (wall)",
         "w/o floor", "non-fwd share", "floor share", "collectives (+ per fwd)", "extra peak MiB", "outside fwds MiB",
         "snapshot+writes MiB", "4P/(TP·PP·DP) MiB", "probe/train step"),
        [(name, f"{r['parameters'] / 1e6:.0f}M", "local" if r["local"] else "sharded", f"{r['cpu']['train_step_ms']:.0f}",
          f"{r['cpu']['forward_ms']:.0f}", f"{r['cpu']['probe_ms']:.0f}", f"{r['forwards']:g}/{r['forwards_max']}",
          f"{r['cpu']['probe_over_forwards']:.2f} ({r['wall']['probe_over_forwards']:.2f})",
          f"{r['cpu']['probe_over_forwards_without_floor']:.2f}", f"{r['cpu']['non_forward_share']:.0%}",
          f"{r['cpu']['floor_share']:.0%}", f"{r['collectives']:g} (+{r['collectives_per_forward']:g})",
          mib(r["extra_peak_bytes"]), mib(r["extra_peak_outside_forwards_bytes"]), mib(r["extra_peak_writes_bytes"]),
          mib(r["shard_bytes"]), f"{r['cpu']['probe_over_train_step']:.2f}") for name, r in rows])


if __name__ == "__main__":
    main()
