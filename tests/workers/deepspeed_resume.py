"""One rank of the DeepSpeed resume test (tests/test_deepspeed.py): trains a tiny GPT for STEPS
steps uninterrupted, then for STEPS/2 steps, engine.save_checkpoint(), a new engine,
engine.load_checkpoint() and the remaining steps; the probe (attached, measuring every 2nd step
with a held-out task) records both. --cold loads with DeepSpeed's own load_checkpoint, bypassing
the probe's: the state is then lost, which the test sees. Writes OUT/rank{R}.json."""

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed import comm as ds_comm  # noqa: E402

from deepspeed_train import SEQ, batches, build, full_params, train_step  # noqa: E402  (this folder)
from megatron_sharpness.backends.deepspeed import master_layout  # noqa: E402
from megatron_sharpness.data import ByteBatches, embedded_corpus  # noqa: E402
from megatron_sharpness.integrations.deepspeed import attach  # noqa: E402


def run(a, rank, steps, save=None, load=None, cold=False):
    engine = build(a)
    held_out = next(ByteBatches(embedded_corpus(), batch_size=4, seq_len=SEQ, seed=7))
    sharpness = attach(engine, loggers=[], relative_batches={"held-out": [held_out]})
    client_state = None
    if load is not None:
        _, client_state = type(engine).load_checkpoint(engine, load) if cold else engine.load_checkpoint(load)
    data = batches(a, rank)
    for _ in range(engine.global_steps * a.gas):  # the micro-batches the first part trained on
        next(data)
    records = []
    while engine.global_steps < steps:
        train_step(engine, a, data)
        measurement, sharpness.last_measurement = sharpness.last_measurement, None
        if measurement is not None:
            records.append({k: v for k, v in measurement.to_dict().items() if k != "probe_seconds"})
    if save is not None:
        engine.save_checkpoint(save, client_state={"mine": 7})
    weights = full_params(engine) + [m.detach().clone() for m, _ in master_layout(engine).pairs()]
    sharpness.detach()
    engine.destroy()
    return records, weights, client_state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cold", action="store_true")
    parser.set_defaults(guard=None)  # deepspeed_train.ds_config reads it
    a = parser.parse_args()
    # What deepspeed_train.build() reads: bf16, ZeRO-`stage`, torch AdamW, measured every 2nd step.
    a.dtype, a.gas, a.fused, a.pipeline, a.dropout, a.interval, a.micro_batches = "bf16", 1, False, False, 0.0, 2, None
    a.log_file = a.csv_dir = a.persist = None
    a.offload = a.bf16_optimizer = a.reuse_training_loss = a.modules = a.frozen_block = False

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = ds_comm.get_rank()
    checkpoint = os.path.join(a.out, "checkpoint")
    whole, whole_weights, _ = run(a, rank, a.steps)
    run(a, rank, a.steps // 2, save=checkpoint)
    resumed, resumed_weights, client_state = run(a, rank, a.steps, load=checkpoint, cold=a.cold)
    result = {"rank": rank, "whole": whole, "resumed": resumed,
              "weights_equal": all(torch.equal(x, y) for x, y in zip(whole_weights, resumed_weights)),
              "client_state_keys": sorted(client_state)}
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    ds_comm.barrier()


if __name__ == "__main__":
    main()
