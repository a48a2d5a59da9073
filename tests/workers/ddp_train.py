"""One rank of a DDP run: train a tiny GPT with dropout for N steps without the probe, then again
with the probe on every step, and write what the test compares to OUT/rank{R}.json.

    ddp_train.py OUT STEPS [--fail-at RANK:STEP:CALL[@GROUP],...] [--snapshot-oom RANK:STEP] [--on-error raise]
                 [--modules] [--log-file PATH]
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe
from megatron_sharpness.data import ByteBatches, embedded_corpus
from megatron_sharpness.modules import default_groups
from megatron_sharpness.testing.faults import InjectedFault, snapshot_runs_out_of_memory
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss


def train(probe_on, steps, rank, a=None):
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyGPT(width=32, layers=1, heads=2, max_seq_len=16, dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    batches = ByteBatches(embedded_corpus(), batch_size=4, seq_len=16, seed=100 + rank)
    held_out = next(ByteBatches(embedded_corpus(), batch_size=4, seq_len=16, seed=7 + rank))
    probe = None
    if probe_on:
        modules = {"modules": "default", "modules_interval": 1} if a.modules else {}
        probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, on_error=a.on_error,
                                                                      log_file=a.log_file, **modules))
        probe.add_relative_task("held-out", lambda: lm_loss(model, *held_out))
        fault = InjectedFault(a.fail_at)
        fault.follow_groups(probe.backend, default_groups)
        snapshot_runs_out_of_memory(probe.backend, a.snapshot_oom, lambda: probe.iteration)
    torch.manual_seed(1 + rank)  # dropout masks differ per rank, as in real data parallelism
    records, local_baselines = [], []
    for step in range(steps):
        tokens, targets = next(batches)
        optimizer.zero_grad()
        lm_loss(model, tokens, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if probe is None:
            optimizer.step()
            continue

        def step_loss():
            value = lm_loss(model, tokens, targets)
            local_baselines.append(value.item())
            return value

        local_baselines.clear()
        fault.at_step(step + 1)
        try:
            measurement = probe.step(fault.wrap(step_loss))
        except RuntimeError as error:  # on_error="raise": every rank gets it, then trains on
            records.append({"raised": str(error)})
            continue
        records.append(measurement.to_dict() | {"local_baseline": local_baselines[0] if local_baselines else None})
    if probe is not None:
        probe.close()
    state = [p.detach().clone() for p in model.parameters()]
    state += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return state, torch.get_rng_state(), records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--fail-at", default=None, metavar="RANK:STEP:CALL[@GROUP],...")
    parser.add_argument("--snapshot-oom", default=None, metavar="RANK:STEP")
    parser.add_argument("--on-error", default="skip")
    parser.add_argument("--modules", action="store_true", help="the per-module breakdown at every measurement")
    parser.add_argument("--log-file", default=None, help="the probe's JSONL file (written by rank 0)")
    a = parser.parse_args()
    out_dir, steps = a.out_dir, a.steps
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    reference, reference_rng, _ = train(False, steps, rank)
    probed, probed_rng, records = train(True, steps, rank, a)
    result = {
        "rank": rank,
        "bitwise_equal": len(reference) == len(probed) and all(
            a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(reference, probed)),
        "rng_equal": torch.equal(reference_rng, probed_rng),
        "records": records,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
