"""Megatron-FSDP (Megatron-LM's --use-megatron-fsdp, megatron-core's FullyShardedDataParallel v1)
behind the megatron-core backend.

Megatron-FSDP keeps, per parameter group (one per FSDP unit module, one for the rest), a main
weight buffer (fp32, sharded over the data-parallel ranks: the optimizer steps its shards, as
DTensor parameters) and a model weight buffer (bf16 shards). After the step it copies the main
shards into the model shards (copy_main_weights_to_model_weights) and its all-gather pipeline
gathers the model shards into buckets, per unit module in the forward (released after it) or kept
(the parameters outside the unit modules, embedding and output layer). So θ_t and θ_{t+1} are the
main shards, trial points are written into the model shards, and after each write the pipeline's
gathered buckets are invalidated with its own reset() — unit buckets freed, the others marked
preserved — so that the next forward gathers the new shards instead of serving old values. The
restore ends as the optimizer's step does: start_param_sync() gathers every bucket.

Supported: data_parallel_sharding_strategy "optim_grads_params" (FSDP, the default), without an
outer (hybrid) sharding strategy; other layouts keep their weights in other buffers and are refused.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from megatron_sharpness.backends.megatron_support import Refusal

LAYOUT = Refusal(
    "Megatron-FSDP other than v1 with data_parallel_sharding_strategy optim_grads_params and no outer (hybrid) "
    "sharding",
    "the other layouts keep their weights in buffers the probe does not write (tested: v1, optim_grads_params)")


OLD_PIPELINE = Refusal(
    "Megatron-FSDP of this Megatron-LM line",
    "its all-gather pipeline has no reset(preserve_non_fsdp_units), which the probe invalidates the gathered "
    "weights with after a trial write (core_v0.18 and later have it; tested on main)")


def pipeline_refusal() -> Refusal | None:
    """Why the importable Megatron-FSDP cannot be driven (None: it can)."""
    try:
        from megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer import AllGatherPipeline
    except ImportError:
        return OLD_PIPELINE
    parameters = inspect.signature(AllGatherPipeline.reset).parameters
    return None if "preserve_non_fsdp_units" in parameters else OLD_PIPELINE


def is_megatron_fsdp(chunk: torch.nn.Module) -> bool:
    return bool(getattr(getattr(chunk, "ddp_config", None), "use_megatron_fsdp", False))


def check_megatron_fsdp(chunk: torch.nn.Module) -> None:
    config = chunk.ddp_config
    if (getattr(config, "megatron_fsdp_version", 1) != 1
            or config.data_parallel_sharding_strategy != "optim_grads_params"
            or getattr(config, "outer_dp_sharding_strategy", "no_shard") != "no_shard"
            or not hasattr(getattr(chunk, "module", None), "all_gather_pipeline")):
        raise LAYOUT.error()
    refusal = pipeline_refusal()
    if refusal is not None:
        raise refusal.error()


def _fsdp(chunk: torch.nn.Module):
    return chunk.module  # MegatronFSDP inside megatron-core's adapter


def master_triples(optimizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(this rank's fp32 main shard of a parameter, its bf16 model shard, the parameter), as
    copy_main_weights_to_model_weights pairs them."""
    triples = []
    for chunk in optimizer.model_chunks:
        for group in _fsdp(chunk).param_and_grad_buffer.parameter_groups:
            main, model = group.main_weight_buffer, group.model_weight_buffer
            if main is None:  # a group without trainable parameters
                continue
            for param in group.params:
                item = main.param_idx[param]
                target = model.get_item(item, only_shard=True) if model is not None else main.get_item(item, only_shard=True)
                triples.append((main.get_item(item, only_shard=True), target, param))
    return triples


def parameter_names(model_chunks: Sequence[torch.nn.Module]) -> dict[int, str]:
    """id(parameter as the buffers hold it) -> its name without wrapper prefixes."""
    names = {}
    for chunk in model_chunks:
        for param, name in _fsdp(chunk).param_and_grad_buffer.param_to_name.items():
            while name.startswith("module."):
                name = name[len("module."):]
            names[id(param)] = name
    return names


def invalidate_gathered(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Every gathered bucket is dropped (unit modules) or marked stale (the rest): the next
    forward gathers the model shards as they are now."""
    for chunk in model_chunks:
        fsdp = _fsdp(chunk)
        fsdp.synchronize_param_gather()  # an all-gather still in flight (overlap_param_gather) lands first
        fsdp.all_gather_pipeline.reset()


def gather_as_after_step(model_chunks: Sequence[torch.nn.Module]) -> None:
    """What the distributed optimizer's step ends with under Megatron-FSDP."""
    for chunk in model_chunks:
        chunk.start_param_sync()
