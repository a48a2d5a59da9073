"""One rank of a megatron-core run on CPU/gloo, for tests/test_megatron.py.

Trains a tiny GPTModel twice from the same seed with Megatron's own schedules: without the probe
(then one more step where the backend is driven by hand to check s = 0, s = 1 and restore), and
with MegatronSharpness measuring every step. Writes OUT/rank{R}.json with what the test asserts.
"""

import argparse
import datetime
import json
import os
from functools import partial

import torch

from megatron_sharpness.testing.megatron_cpu import install_cpu_shims

install_cpu_shims()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_sharpness.backends.megatron import MegatronBackend, leaf_optimizers, master_pairs, reduce_lm_loss  # noqa: E402,E501
from megatron_sharpness.config import SharpnessConfig  # noqa: E402
from megatron_sharpness.integrations.megatron_core import MegatronSharpness  # noqa: E402

VOCAB, SEQ, MICRO_BATCH = 128, 16, 2


def build(a):
    # On CPU the tracker's states are taken from the CPU generator: seed it first so that both runs
    # of this process start from the same tracker states.
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=a.layers, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        pipeline_dtype=dtype, params_dtype=dtype, bf16=a.bf16, hidden_dropout=a.dropout, attention_dropout=0.0,
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
        virtual_pipeline_model_parallel_size=a.vpp, batch_p2p_comm=a.vpp is None)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=a.dist_opt, overlap_grad_reduce=a.overlap,
                                               overlap_param_gather=a.overlap, grad_reduce_in_fp32=True)
    chunks = []
    for virtual in range(a.vpp or 1):
        stage = virtual if a.vpp else None
        chunk = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                         max_sequence_length=SEQ, vp_stage=stage,
                         pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage))
        if a.bf16:
            chunk = Float16Module(config, chunk)
        chunk = DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=virtual > 0)
        chunk.broadcast_params()
        chunks.append(chunk)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, bf16=a.bf16, params_dtype=dtype,
                        use_distributed_optimizer=a.dist_opt, clip_grad=1.0), chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if a.overlap:
        config.no_sync_func = [c.no_sync for c in chunks] if a.vpp else chunks[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in chunks] if a.vpp else chunks[0].start_grad_sync
    return chunks, optimizer


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(MICRO_BATCH, SEQ),
            "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1).contiguous(),
            "attention_mask": torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5}


def data_iterators(a, seed_base, steps):
    """One long-lived iterator per model chunk over all steps: a probe that consumed a micro-batch
    would shift every later step."""
    dp_rank = ps.get_data_parallel_rank()
    items = [batch(seed_base + 1000 * step + 10 * dp_rank + micro) for step in range(steps) for micro in range(a.nmb)]
    return [iter(items) for _ in range(a.vpp or 1)]


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), tokens.view(1).float()])}


def forward_step(data_iterator, model):
    item = next(data_iterator)
    output = model(item["tokens"], item["position_ids"], item["attention_mask"], labels=item["labels"])
    return output, partial(loss_func, item["loss_mask"])


def train_step(a, chunks, optimizer, iterators, sharpness=None):
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    data = iterators if a.vpp else iterators[0]
    if sharpness is not None:
        data = sharpness.record(data, a.nmb)
    store = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=chunks,
                                        num_microbatches=a.nmb, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                                        forward_only=False)
    result = optimizer.step() if sharpness is None else sharpness.step()
    return store, result


def state(chunks, optimizer):
    # With overlap_param_gather the all-gather of θ_{t+1} waits for the next forward; compare the
    # gathered params (the probe's after_step() has already forced that gather).
    leaves = leaf_optimizers(optimizer)
    if any(type(leaf).__name__ == "DistributedOptimizer" for leaf in leaves):
        for chunk in chunks:
            chunk.start_param_sync(force_sync=True)
    return {
        "params": [p.detach().clone() for c in chunks for p in c.parameters()],
        "main_params": [main.detach().clone() for leaf in leaves for main, _ in master_pairs(leaf)],
        "optimizer": [t.clone() for leaf in leaves for s in leaf.optimizer.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor)],
        "rng": [torch.get_rng_state()] + [s.clone() for _, s in sorted(get_cuda_rng_tracker().get_states().items())],
    }


def reference_run(a):
    chunks, optimizer = build(a)
    iterators = data_iterators(a, 0, a.steps + 1)
    losses = [reduce_lm_loss(train_step(a, chunks, optimizer, iterators)[0]).item() for _ in range(a.steps)]
    reference = state(chunks, optimizer)

    # One more step with the backend driven by hand.
    def params():
        return [p.detach().clone() for c in chunks for p in c.parameters()]

    backend = MegatronBackend(optimizer, chunks, evaluate=None)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterators if a.vpp else iterators[0],
                                model=chunks, num_microbatches=a.nmb, seq_length=SEQ,
                                micro_batch_size=MICRO_BATCH, forward_only=False)
    before = params()
    backend.snapshot()
    optimizer.step()
    checks = {"after_step": backend.after_step()}
    after = params()
    backend.write(1.0)
    checks["s1_is_step"] = all(torch.equal(p, q) for p, q in zip(params(), after))
    backend.write(0.0)
    checks["s0_is_before"] = all(torch.equal(p, q) for p, q in zip(params(), before))
    backend.write(0.5)
    checks["s_half_moves"] = not all(torch.equal(p, q) for p, q in zip(params(), after))
    backend.restore()
    checks["restored"] = all(torch.equal(p, q) for p, q in zip(params(), after))
    return reference, checks, losses


def probe_run(a):
    chunks, optimizer = build(a)
    iterators = data_iterators(a, 0, a.steps + 1)
    held_out = data_iterators(a, 777_000, 64)
    sharpness = MegatronSharpness(chunks, optimizer, forward_step, SharpnessConfig(interval=1, micro_batches=a.micro_batches),
                                  seq_length=SEQ, micro_batch_size=MICRO_BATCH, loggers=[],
                                  relative_data_iterators={"held-out": held_out if a.vpp else held_out[0]})
    records, training_losses, optimizer_names = [], [], [type(o).__name__ for o in leaf_optimizers(optimizer)]
    all_batch_losses = []
    for _ in range(a.steps):
        store, _ = train_step(a, chunks, optimizer, iterators, sharpness)
        count = min(a.micro_batches or a.nmb, a.nmb)
        training_losses.append(reduce_lm_loss(store[:count]).item())
        all_batch_losses.append(reduce_lm_loss(store).item())
        records.append(sharpness.last_measurement.to_dict())
    probed = state(chunks, optimizer)
    left = [sum(1 for _ in it) for it in iterators]
    return probed, records, training_losses, all_batch_losses, optimizer_names, left


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--overlap", action="store_true", help="overlap_grad_reduce and overlap_param_gather")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nmb", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3)
    a = parser.parse_args()

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    ps.initialize_model_parallel(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                 virtual_pipeline_model_parallel_size=a.vpp)
    reference, checks, reference_losses = reference_run(a)
    probed, records, training_losses, probed_losses, optimizers, left = probe_run(a)
    equal = {key: len(reference[key]) == len(probed[key]) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(reference[key], probed[key])) for key in reference}
    rank = torch.distributed.get_rank()
    result = {"rank": rank, "optimizers": optimizers, "bitwise_equal": equal, "checks": checks, "records": records,
              "training_losses": training_losses, "micro_batches_left": left,
              "same_training_losses": reference_losses == probed_losses}
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
