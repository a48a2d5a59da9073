"""Benchmark of the DeepSpeed probe per ZeRO stage: a GPT on 2 ranks (CPU, gloo; or one GPU per rank
with NCCL). Not a test.

Launches one job per setup and prints the table of benchmarks/megatron_layouts.py: training step,
one forward pass of the probed micro-batches, the probe per measurement, forwards, probe /
(forwards × forward), the non-forward and resolution-floor shares, collectives per probe, and the
extra peak memory per rank against the fp32 partition 4·P/DP (benchmarks/instruments.py).

    python -m megatron_sharpness.benchmarks.deepspeed_zero [--steps 40] [--interval 5] [--write local]
"""

from __future__ import annotations

import argparse
import json
import os

from megatron_sharpness.benchmarks import argv_of, run_setups
from megatron_sharpness.benchmarks.megatron_layouts import cost_table, medians

SETUPS = {
    "ZeRO-0 fp32": (2, ["--stage", "0", "--dtype", "fp32"]),
    "ZeRO-1 bf16": (2, ["--stage", "1", "--dtype", "bf16"]),
    "ZeRO-2 bf16": (2, ["--stage", "2", "--dtype", "bf16"]),
    "ZeRO-2 bf16 offload": (2, ["--stage", "2", "--dtype", "bf16", "--offload"]),
    "ZeRO-3 bf16": (2, ["--stage", "3", "--dtype", "bf16"]),
    "ZeRO-3 bf16 offload": (2, ["--stage", "3", "--dtype", "bf16", "--offload"]),
}


def worker(a: argparse.Namespace) -> None:
    from megatron_sharpness.benchmarks.instruments import (CollectiveCounter, PhaseTimer, ProbeStats, clock,
                                                           count_inside, instrument_backend, peak_allocated, since)

    counter = CollectiveCounter()  # before DeepSpeed binds torch.distributed's functions
    import deepspeed
    import torch
    from deepspeed import comm as ds_comm

    from megatron_sharpness.config import SharpnessConfig
    from megatron_sharpness.data import ByteBatches, embedded_corpus
    from megatron_sharpness.integrations.deepspeed import attach
    from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss

    class GPTWithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = TinyGPT(width=a.width, layers=a.layers, heads=a.heads, max_seq_len=a.seq_len)

        def forward(self, tokens, targets):
            return lm_loss(self.gpt, tokens, targets)

    if a.device == "cpu":
        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    model = GPTWithLoss()
    config = {
        "train_micro_batch_size_per_gpu": a.micro_batch_size,
        "gradient_accumulation_steps": a.accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": a.stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    if a.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if a.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    write = "sharded" if a.stage == 3 and a.write == "local" else a.write  # ZeRO-3 partitions the params
    sharpness = attach(engine, SharpnessConfig(interval=a.interval, micro_batches=a.micro_batches, write=write),
                       loggers=[])
    timer = PhaseTimer()
    instrument_backend(timer, sharpness.probe, sharpness.backend, (sharpness.backend.layout, "after_write"))
    count_inside(counter, sharpness.backend, "snapshot")
    count_inside(counter, sharpness.probe, "measure")
    count_inside(counter, sharpness.backend, "loss", "in_loss")
    stats = ProbeStats(timer, counter)
    device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
    data = ByteBatches(embedded_corpus(), a.micro_batch_size, a.seq_len, seed=ds_comm.get_rank())
    data = ((tokens.to(device), targets.to(device)) for tokens, targets in data)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ds_comm.barrier()

    def train(window=None):
        for micro in range(a.accumulation):
            engine.backward(engine(*next(data)))
            if micro < a.accumulation - 1 or window is None:
                engine.step()
                continue
            with peak_allocated(device, window):  # the boundary step: the optimizer's and the probe's
                engine.step()

    step_seconds = []
    for step in range(a.steps):
        due = sharpness.probe.is_due(engine.global_steps + 1)
        if due:
            stats.start()
        synchronize()
        started = clock()
        train()
        synchronize()
        elapsed = since(started)
        measurement, sharpness.last_measurement = sharpness.last_measurement, None
        if due and step >= a.interval:  # the first measurement starts cold: not counted
            stats.stop(measurement)
        elif not due:
            step_seconds.append(elapsed)
    timer.active = False

    # One forward pass of a probed micro-batch, right after an (unprobed) optimizer step: where the
    # probe's forwards start from (ZeRO-3: every param partitioned, fetched by the forward; a
    # second no_grad forward would find them still gathered).
    batch = next(data)
    due, sharpness.probe.is_due = sharpness.probe.is_due, lambda step: False
    forward_seconds = []
    for _ in range(2):
        train()
        synchronize()
        started = clock()
        with torch.no_grad():
            engine(*batch)
        synchronize()
        forward_seconds.append(since(started))
    sharpness.probe.is_due = due
    # Memory, on steps of their own (the profiler slows them): a probed step's boundary step
    # against an unprobed one's, and one forward.
    plain, probed, forward = {}, {}, {}
    while sharpness.probe.is_due(engine.global_steps + 1):
        train()
    train(plain)
    while not sharpness.probe.is_due(engine.global_steps + 1):
        train()
    train(probed)
    with torch.no_grad(), peak_allocated(device, forward):
        engine(*batch)

    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    extra = torch.tensor([float(probed["peak"] - plain["peak"]), float(probed["peak_outside"] - plain["peak"]),
                          float(probed["peak_writes"] - plain["peak"]), float(forward["peak"])],
                         dtype=torch.float64, device=device)
    ds_comm.all_reduce(extra, op=ds_comm.ReduceOp.MAX)
    dp = ds_comm.get_world_size()
    if ds_comm.get_rank() == 0:
        micro_batches = min(a.micro_batches or a.accumulation, a.accumulation)
        print("RESULT " + json.dumps({
            "optimizers": [type(engine.optimizer).__name__], "write": write, "local": sharpness.backend.writes_locally,
            "tp": 1, "pp": 1, "dp": dp, "parameters": parameters,
            **stats.summary(tuple(micro_batches * t for t in medians(forward_seconds)), medians(step_seconds)),
            "extra_peak_bytes": int(extra[0].item()), "extra_peak_outside_forwards_bytes": int(extra[1].item()),
            "extra_peak_writes_bytes": int(extra[2].item()), "forward_peak_bytes": int(extra[3].item()),
            "shard_bytes": 4 * parameters / dp,
            "slice_model_bytes": (2 if a.dtype != "fp32" else 4) * parameters,
        }), flush=True)
    sharpness.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="SETUP",
                        help=f"which setups (default all): {', '.join(SETUPS)}")
    add_model_args(parser)
    a = parser.parse_args(argv)
    if a.worker:
        worker(a)
        return

    rows = run_setups("megatron_sharpness.benchmarks.deepspeed_zero", {name: SETUPS[name] for name in a.setups},
                      argv_of(a, MODEL_ARGS), {"DS_ACCELERATOR": a.device})
    print(f"GPT, {rows[0][1]['parameters']:,} parameters, {a.device}, {a.accumulation} micro-batches of "
          f"{a.micro_batch_size}×{a.seq_len} per step, probe on the first {a.micro_batches}, every {a.interval} "
          f"steps, write {a.write}")
    print(cost_table(rows))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--write", default="auto", choices=["auto", "local", "sharded"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: gloo; cuda: NCCL, one GPU per rank")


MODEL_ARGS = ("steps", "interval", "accumulation", "micro_batches", "micro_batch_size", "seq_len", "width", "layers",
              "heads", "write", "device")


if __name__ == "__main__":
    main()
