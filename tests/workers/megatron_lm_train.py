"""One rank of a megatron-core training loop shaped like Megatron-LM's train() / train_step() /
training_log(), with the three calls patches/megatron-lm/ adds. Prints Megatron's iteration line
from the last rank and writes OUT/rank{R}.json with the TensorBoard / W&B scalars it was given."""

import argparse
import json
import os

import torch

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

install_cpu_shims()

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_sharpness.backends.megatron import leaf_optimizers, master_pairs  # noqa: E402
from megatron_sharpness.integrations import megatron_lm  # noqa: E402
from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer,  # noqa: E402
                                                      init_gloo_model_parallel, megatron_lm_train_step,
                                                      shutdown_model_parallel, synthetic_batch)


class Recorder:
    """Stands in for the TensorBoard SummaryWriter and the W&B run."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append(["tb", tag, value, step])

    def log(self, values, step):
        self.scalars += [["wandb", tag, value, step] for tag, value in values.items()]


def main():
    parser = megatron_lm.add_critical_sharpness_args(argparse.ArgumentParser())
    parser.add_argument("--out", required=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--train-iters", type=int, default=6)
    parser.add_argument("--num-microbatches", type=int, default=4)
    args = parser.parse_args()
    args.seq_length, args.micro_batch_size, args.decoder_seq_length = 16, 2, None

    init_gloo_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, timeout_seconds=120)
    setup = TinyGPTSetup(tensor_parallel=args.tensor_model_parallel_size,
                         pipeline_parallel=args.pipeline_model_parallel_size, distributed_optimizer=True, bf16=True,
                         vocab=256, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size)
    model, optimizer = build_model_and_optimizer(setup)
    dp_rank = ps.get_data_parallel_rank()
    train_data = iter([synthetic_batch(setup, 100 * step + micro + 7 * dp_rank)
                       for step in range(args.train_iters) for micro in range(args.num_microbatches)])
    writer, wandb_writer = Recorder(), Recorder()
    last_rank = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    consumed_samples = 0
    for iteration in range(args.train_iters):  # Megatron's iteration is 0-based inside train_step
        loss, grad_norm = megatron_lm_train_step(model, optimizer, train_data, args, iteration)
        iteration += 1
        consumed_samples += args.micro_batch_size * args.num_microbatches * ps.get_data_parallel_world_size()
        log_string = (f" [2026-11-24 10:00:00] iteration {iteration:8d}/{args.train_iters:8d} | "
                      f"consumed samples: {consumed_samples:12d} | learning rate: {optimizer.param_groups[0]['lr']:.6E} | "
                      f"lm loss: {loss:.6E} | grad norm: {grad_norm:.3f} |")
        log_string += megatron_lm.log_fields(iteration)
        if last_rank:
            megatron_lm.write_scalars(writer, wandb_writer, iteration, consumed_samples)
            print(log_string, flush=True)
    rank = torch.distributed.get_rank()
    for chunk in model:  # the last step's param all-gather, before comparing shards
        chunk.start_param_sync(force_sync=True)
    consistent = all(torch.equal(target, main.to(target.dtype))
                     for leaf in leaf_optimizers(optimizer) for main, target in master_pairs(leaf))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as out:
        json.dump({"scalars": writer.scalars + wandb_writer.scalars, "left": sum(1 for _ in train_data),
                   "masters_match_model": consistent}, out)
    shutdown_model_parallel()


if __name__ == "__main__":
    main()
