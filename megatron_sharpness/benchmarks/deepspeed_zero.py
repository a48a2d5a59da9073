"""Benchmark of the DeepSpeed probe per ZeRO stage: a tiny GPT on 2 ranks (CPU, gloo). Not a test.

Launches one 2-rank job per setup and prints a table: training step, one forward pass, the probe's
total per measurement, forwards per measurement, probe / (forwards × micro-batches × forward), and
the extra bytes the probe holds per rank next to the parameter bytes per data-parallel rank.

    python -m megatron_sharpness.benchmarks.deepspeed_zero [--steps 40] [--interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from megatron_sharpness.benchmarks import markdown_table, run_setups

SETUPS = {
    "ZeRO-0 fp32": (2, ["--stage", "0", "--dtype", "fp32"]),
    "ZeRO-1 bf16": (2, ["--stage", "1", "--dtype", "bf16"]),
    "ZeRO-2 bf16": (2, ["--stage", "2", "--dtype", "bf16"]),
    "ZeRO-2 bf16 offload": (2, ["--stage", "2", "--dtype", "bf16", "--offload"]),
    "ZeRO-3 bf16": (2, ["--stage", "3", "--dtype", "bf16"]),
    "ZeRO-3 bf16 offload": (2, ["--stage", "3", "--dtype", "bf16", "--offload"]),
}


def worker(a: argparse.Namespace) -> None:
    import deepspeed
    import torch
    from deepspeed import comm as ds_comm

    from megatron_sharpness.backends.lerp import LERP_CHUNK_ELEMENTS
    from megatron_sharpness.config import SharpnessConfig
    from megatron_sharpness.data import ByteBatches, embedded_corpus
    from megatron_sharpness.integrations.deepspeed import attach
    from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss

    class GPTWithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = TinyGPT(width=a.width, layers=a.layers, heads=4, max_seq_len=a.seq_len)

        def forward(self, tokens, targets):
            return lm_loss(self.gpt, tokens, targets)

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
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
    sharpness = attach(engine, SharpnessConfig(interval=a.interval, micro_batches=a.micro_batches), loggers=[])
    data = ByteBatches(embedded_corpus(), a.micro_batch_size, a.seq_len, seed=ds_comm.get_rank())

    step_seconds, probe_seconds, forwards = [], [], []
    for _ in range(a.steps):
        ds_comm.barrier()
        started = time.perf_counter()
        for _ in range(a.accumulation):
            engine.backward(engine(*next(data)))
            engine.step()
        elapsed = time.perf_counter() - started
        measurement, sharpness.last_measurement = sharpness.last_measurement, None
        if measurement is None:
            step_seconds.append(elapsed)
        elif measurement.task is not None:
            probe_seconds.append(measurement.probe_seconds)
            forwards.append(measurement.task.forwards)

    batch = next(data)
    forward_seconds = []
    with torch.no_grad():
        for _ in range(10):
            ds_comm.barrier()
            started = time.perf_counter()
            engine(*batch)
            forward_seconds.append(time.perf_counter() - started)

    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    layout = sharpness.backend.layout
    snapshot_bytes = sum(master.numel() * master.element_size() for master, _ in layout.pairs())
    # θ_t always; θ_{t+1} too where the master is the model param; one lerp slice at a time.
    largest = max(master.numel() for master, _ in layout.pairs())
    extra_bytes = snapshot_bytes * (2 if layout.master_is_model else 1) + 4 * min(largest, LERP_CHUNK_ELEMENTS)
    if ds_comm.get_rank() == 0:
        micro_batches = min(a.micro_batches or a.accumulation, a.accumulation)
        print("RESULT " + json.dumps({
            "optimizer": type(engine.optimizer).__name__,
            "train_step_ms": 1e3 * statistics.median(step_seconds),
            "forward_ms": 1e3 * statistics.median(forward_seconds),
            "probe_ms": 1e3 * statistics.median(probe_seconds),
            "forwards_median": statistics.median(forwards),
            "forwards_max": max(forwards),
            "probe_over_forwards": statistics.median(probe_seconds)
            / (statistics.median(forwards) * micro_batches * statistics.median(forward_seconds)),
            "extra_bytes": extra_bytes,
            "params_bytes_per_dp": 4 * parameters / ds_comm.get_world_size(),
            "parameters": parameters,
        }), flush=True)
    sharpness.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    a = parser.parse_args(argv)
    if a.worker:
        worker(a)
        return

    common = ["--steps", str(a.steps), "--interval", str(a.interval), "--accumulation", str(a.accumulation),
              "--micro-batches", str(a.micro_batches), "--micro-batch-size", str(a.micro_batch_size),
              "--seq-len", str(a.seq_len), "--width", str(a.width), "--layers", str(a.layers)]
    rows = run_setups("megatron_sharpness.benchmarks.deepspeed_zero", SETUPS, common, {"DS_ACCELERATOR": "cpu"})
    print(f"tiny GPT, {rows[0][1]['parameters']:,} parameters, 2 ranks (CPU, gloo), {a.accumulation} micro-batches "
          f"per step, probe on the first {a.micro_batches}, every {a.interval} steps")
    print(markdown_table(
        ("setup", "optimizer", "train step ms", "forward ms", "probe ms", "forwards med/max", "probe/(fw×fwd)",
         "extra bytes/rank", "params/DP bytes"),
        [(name, r["optimizer"], f"{r['train_step_ms']:.1f}", f"{r['forward_ms']:.1f}", f"{r['probe_ms']:.1f}",
          f"{r['forwards_median']:.0f}/{r['forwards_max']}", f"{r['probe_over_forwards']:.2f}",
          f"{r['extra_bytes']:,}", f"{r['params_bytes_per_dp']:,.0f}") for name, r in rows]))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
