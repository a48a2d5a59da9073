"""A tiny megatron-core GPTModel with its optimizer, in any TP/PP/VPP/DP layout, plus the
forward_step_func and synthetic micro-batches Megatron's schedules expect. For tests, benchmarks
and the demo; call parallel_state.initialize_model_parallel (and, on CPU, install_cpu_shims) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sharpness.integrations.megatron_lm import gpt_micro_batch


@dataclass(frozen=True)
class TinyGPTSetup:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    distributed_optimizer: bool = False
    bf16: bool = False
    overlap_param_gather: bool = False
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    vocab: int = 128
    seq_length: int = 16
    micro_batch_size: int = 2
    dropout: float = 0.0
    lr: float = 1e-3
    seed: int = 1234
    # "cuda": the model on this rank's GPU (torch.cuda.set_device first; init_nccl_model_parallel)
    device: str = "cpu"
    # The precision-aware optimizer on testing.precision_aware's CPU stand-in for TransformerEngine's
    # FusedAdam: None (off), "fp32" (fp32 masters in its state) or "remainders" (int16 low halves).
    precision_aware: str | None = None


def build_model_and_optimizer(setup: TinyGPTSetup):
    """Model chunks (one per virtual stage), wrapped as Megatron-LM wraps them, and the optimizer."""
    # On CPU the RNG tracker's states come from the CPU generator: seed that first so that every
    # build in a process starts from the same states.
    torch.manual_seed(setup.seed)
    model_parallel_cuda_manual_seed(setup.seed)
    dtype = torch.bfloat16 if setup.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=setup.layers, hidden_size=setup.hidden, num_attention_heads=setup.heads,
        use_cpu_initialization=True, pipeline_dtype=dtype, params_dtype=dtype, bf16=setup.bf16,
        hidden_dropout=setup.dropout, attention_dropout=0.0,
        tensor_model_parallel_size=setup.tensor_parallel, pipeline_model_parallel_size=setup.pipeline_parallel,
        virtual_pipeline_model_parallel_size=setup.virtual_pipeline,
        # Batched p2p pairs up messages wrongly on gloo with interleaved (virtual) pipelines.
        batch_p2p_comm=setup.virtual_pipeline is None)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=setup.distributed_optimizer, overlap_grad_reduce=setup.overlap_param_gather,
        overlap_param_gather=setup.overlap_param_gather, grad_reduce_in_fp32=True)
    chunks = []
    for virtual in range(setup.virtual_pipeline or 1):
        stage = virtual if setup.virtual_pipeline else None
        chunk = GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=setup.vocab,
            max_sequence_length=setup.seq_length, vp_stage=stage,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage))
        if setup.device == "cuda":
            chunk = chunk.cuda(torch.cuda.current_device())  # as Megatron-LM's get_model does
        if setup.bf16:
            chunk = Float16Module(config, chunk)
        chunk = DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=virtual > 0)
        chunk.broadcast_params()
        chunks.append(chunk)
    optimizer_config = OptimizerConfig(optimizer="adam", lr=setup.lr, weight_decay=0.01, bf16=setup.bf16,
                                       params_dtype=dtype, use_distributed_optimizer=setup.distributed_optimizer,
                                       clip_grad=1.0)
    if setup.precision_aware is not None:
        from megatron_sharpness.testing.precision_aware import install_stand_in_fused_adam, precision_aware_config

        install_stand_in_fused_adam()
        precision_aware_config(optimizer_config, remainders=setup.precision_aware == "remainders")
    optimizer = get_megatron_optimizer(optimizer_config, chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if setup.overlap_param_gather:
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync
    return chunks, optimizer


def synthetic_batch(setup: TinyGPTSetup, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, setup.vocab, (setup.micro_batch_size, setup.seq_length + 1), generator=generator)
    batch = gpt_micro_batch(tokens)
    if setup.device == "cuda":
        batch = {key: value.cuda(torch.cuda.current_device()) for key, value in batch.items()}
    return batch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron-core's convention: (loss sum, token count, {"lm loss": [sum, count]})."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), tokens.view(1).float()])}


def forward_step(data_iterator, model):
    item = next(data_iterator)
    output = model(item["tokens"], item["position_ids"], item["attention_mask"], labels=item["labels"])
    return output, partial(loss_func, item["loss_mask"])


def megatron_lm_train_step(model: list, optimizer, data_iterator, args, iteration: int):
    """One iteration shaped like Megatron-LM's train_step with patches/megatron-lm applied: the
    step's data iterator goes through record(), optimizer.step() through optimizer_step().
    iteration is 0-based, as inside Megatron-LM's train_step. Returns (lm loss, grad norm)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sharpness.backends.megatron import reduce_lm_loss
    from megatron_sharpness.integrations import megatron_lm

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    data_iterator = megatron_lm.record(data_iterator, model, optimizer, forward_step, args, iteration + 1,
                                       args.num_microbatches)
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=model,
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False)
    _, grad_norm, _ = megatron_lm.optimizer_step(optimizer, iteration + 1)
    return reduce_lm_loss(losses_reduced).item(), grad_norm


def init_gloo_model_parallel(tensor_parallel: int, pipeline_parallel: int, virtual_pipeline: int | None = None,
                             timeout_seconds: float = 300) -> None:
    """torch.distributed on gloo from the launcher's environment, then Megatron's parallel groups.
    The timeout turns a rank that never arrives into an error instead of a hang."""
    import datetime

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel,
                                             virtual_pipeline_model_parallel_size=virtual_pipeline)


def init_nccl_model_parallel(tensor_parallel: int, pipeline_parallel: int, virtual_pipeline: int | None = None,
                             timeout_seconds: float = 300) -> None:
    """As init_gloo_model_parallel, on NCCL with one GPU per rank (LOCAL_RANK's)."""
    import datetime
    import os

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl", timeout=datetime.timedelta(seconds=timeout_seconds))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel,
                                             virtual_pipeline_model_parallel_size=virtual_pipeline)


def shutdown_model_parallel() -> None:
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
