"""One rank of a torch FSDP2 (fully_shard) run on gloo, for tests/test_fsdp2.py.

For each layout given (NAME:PRECISION:RESHARD:DROPOUT, e.g. `bf16-keep:bf16:0:0`): trains a tiny
GPT, each block and the root fully_shard-ed (PRECISION bf16: MixedPrecisionPolicy with bf16
compute and fp32 shards), without the probe and again with it measuring every step, and writes
OUT/rank{R}.json: whether the shards, the optimizer state and the RNG came out bitwise the same,
the records, and — without dropout — the loss an fp64 copy of the whole model computes at each
trial point of each record (θ_t and θ_{t+1} gathered whole, every rank's batch, their mean).
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_sharpness import SharpnessConfig, TorchSharpnessProbe
from megatron_sharpness.data import ByteBatches, embedded_corpus
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss

STEPS = 5


def build(precision, reshard, dropout):
    torch.manual_seed(0)
    model = TinyGPT(width=32, layers=2, heads=2, max_seq_len=16, dropout=dropout)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def whole(model):
    return [param.full_tensor().detach().double() for param in model.parameters()]


def train(layout, probe_on, rank):
    _, precision, reshard, dropout = layout
    model, optimizer = build(precision, reshard, dropout)
    batches = ByteBatches(embedded_corpus(), batch_size=4, seq_len=16, seed=100 + rank)
    probe = None
    if probe_on:
        probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=1, modules="default", modules_interval=2))
    torch.manual_seed(1 + rank)  # dropout masks differ per rank
    records, lines = [], []
    for step in range(STEPS):
        tokens, targets = next(batches)
        optimizer.zero_grad()
        lm_loss(model, tokens, targets).backward()
        if probe is None:
            optimizer.step()
            continue
        before = whole(model) if dropout == 0 else None
        measurement = probe.step(lambda: lm_loss(model, tokens, targets))
        records.append(measurement.to_dict())
        if before is not None:
            batch = [None] * dist.get_world_size()
            dist.all_gather_object(batch, (tokens, targets))
            lines.append((before, whole(model), batch))
    if probe is not None:
        probe.close()
    state = [param.to_local().detach().clone() for param in model.parameters()]
    state += [t.to_local() if hasattr(t, "to_local") else t
              for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return state, torch.get_rng_state(), records, lines


def fp64_losses(record, line):
    """The mean over the ranks' batches of the fp64 loss at θ_t, then at each trial point of the record."""
    before, after, batch = line
    model = TinyGPT(width=32, layers=2, heads=2, max_seq_len=16).double()
    losses = []
    for s in [0.0] + [lr / record["lr"] for lr, _ in record["evaluations"]]:
        with torch.no_grad():
            for param, old, new in zip(model.parameters(), before, after):
                param.copy_(old + s * (new - old))
            losses.append(sum(lm_loss(model, tokens, targets).item() for tokens, targets in batch) / len(batch))
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("layouts", nargs="+", metavar="NAME:PRECISION:RESHARD:DROPOUT")
    a = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    results = {}
    for text in a.layouts:
        name, precision, reshard, dropout = text.split(":")
        layout = (name, precision, reshard == "1", float(dropout))
        reference, reference_rng, _, _ = train(layout, False, rank)
        probed, probed_rng, records, lines = train(layout, True, rank)
        results[name] = {
            "bitwise_equal": len(reference) == len(probed) and all(
                x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(reference, probed)),
            "rng_equal": torch.equal(reference_rng, probed_rng),
            "records": records,
            "fp64": [fp64_losses(record, line) for record, line in zip(records, lines)] if rank == 0 else [],
        }
    with open(os.path.join(a.out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
