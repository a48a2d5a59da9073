"""The masters of megatron-core's precision-aware optimizer (--use-precision-aware-optimizer).

There the DistributedOptimizer keeps no fp32 main params of its own: its inner optimizer
(TransformerEngine's FusedAdam with master_weights=True) steps this rank's bf16 shard of the param
buffer directly and keeps the fp32 master in its state, `state[shard]["master_param"]`, either as
an fp32 tensor or — store_param_remainders, the default with TransformerEngine >= 2.1 — as the
int16 low halves of the fp32 bits, the high halves being the bf16 param itself, rounded up where
the low half's top bit is set:

    master bits = ((bf16 bits − (remainder < 0)) << 16) | (remainder & 0xFFFF)
    bf16 bits   = (master bits >> 16) + (low half ≥ 0x8000),   remainder = low half

So θ_t and θ_{t+1} are read from the state (composed where remainders are kept), trial points are
written into the bf16 shard — where remainders are kept, rounded as the optimizer rounds, so that
s = 0 and s = 1 give the bf16 values it gives — and spread by the same param all-gather as with
the plain distributed optimizer. A trial write never touches the state: with remainders the bf16
shard is half of the master, and restoring the shard's bits restores the master. Only the guard's
commit writes it, since the committed point is the new master: an fp32 master in place, a
remainder's low half beside the shard the restore rounds as the optimizer does.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_sharpness.backends.megatron_support import Refusal

FP16_MASTERS = Refusal(
    "the precision-aware optimizer with fp16 master weights (--main-params-dtype fp16)",
    "its masters are scaled fp16 whose scale it recomputes whenever they are set")
NO_MASTERS = Refusal(
    "the precision-aware optimizer without master weights in its state (fp8 params)",
    "the masters are not the optimizer's state")

Cast = Callable[[torch.Tensor], torch.Tensor]


def holds_masters(optimizer) -> bool:
    """Whether the optimizer's inner optimizer, not megatron-core, keeps this rank's fp32 masters."""
    config = getattr(optimizer, "config", None)
    if not getattr(config, "use_precision_aware_optimizer", False):
        return False
    if getattr(getattr(optimizer, "ddp_config", None), "use_megatron_fsdp", False):
        return False  # Megatron-FSDP keeps the masters itself (it turns the fused optimizer's off)
    # With fp32 main params and an fp8 recipe other than delayed scaling, megatron-core keeps the
    # masters itself even with the precision-aware optimizer (its own _no_fp8_or_ds_fp8 flag).
    return getattr(config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", True)


def check_masters(optimizer) -> None:
    inner = optimizer.optimizer
    if not getattr(inner, "master_weights", False):
        raise NO_MASTERS.error()
    if getattr(inner, "master_weight_dtype", torch.float32) != torch.float32:
        raise FP16_MASTERS.error()


def master_triples(optimizer) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(fp32 master now, the bf16 or fp32 shard the forward reads through the param all-gather,
    the model parameter): the live fp32 state tensor where the optimizer keeps one, else a tensor
    composed from its state (remainders), or the shard itself as fp32 before the optimizer's first
    step (the optimizer initialises its masters from the shard then). fp32 params are their own
    master, as with the plain distributed optimizer."""
    check_masters(optimizer)
    inner = optimizer.optimizer
    triples = []
    for models, shards in zip(optimizer.model_float16_groups, optimizer.shard_float16_groups):
        for model, shard in zip(models, shards):
            triples.append((_master(shard, inner.state.get(shard, {}).get("master_param")), shard, model))
    for models, shards in zip(optimizer.model_fp32_groups, optimizer.shard_fp32_groups):
        triples += [(shard, shard, model) for model, shard in zip(models, shards)]
    return triples


def model_casts(optimizer) -> list[Cast | None]:
    """Per pair of master_triples(optimizer): how an fp32 value becomes the shard's value the way
    the optimizer rounds it (None: a plain cast, round to nearest even)."""
    remainders = getattr(optimizer.optimizer, "store_param_remainders", False)
    casts: list[Cast | None] = [round_half_up_bf16 if remainders and shard.dtype == torch.bfloat16 else None
                                for shards in optimizer.shard_float16_groups for shard in shards]
    return casts + [None for shards in optimizer.shard_fp32_groups for _ in shards]


def remainder_states(optimizer) -> list[torch.Tensor | None]:
    """Per pair of master_triples(optimizer): the int16 state that holds the low half of its master
    (None: an fp32 master, which is the pair's master tensor itself, or an fp32 param)."""
    inner = optimizer.optimizer
    states = [inner.state.get(shard, {}).get("master_param") for shards in optimizer.shard_float16_groups
              for shard in shards]
    return ([state if state is not None and state.dtype == torch.int16 else None for state in states]
            + [None for shards in optimizer.shard_fp32_groups for _ in shards])


def _master(shard: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    if state is None:
        return shard.detach().float()
    if state.dtype == torch.int16:
        return compose_master(shard, state)
    return state


def compose_master(bf16: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master whose high half (rounded up where the low half's top bit is set) is `bf16`
    and whose low half is `remainder`."""
    high = bf16.detach().reshape(-1).view(torch.int16).to(torch.int32)
    low = remainder.reshape(-1).to(torch.int32)
    high = high - (low < 0).to(torch.int32)
    return ((high << 16) | (low & 0xFFFF)).view(torch.float32).view(bf16.shape)


def round_half_up_bf16(values: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 as the remainder-keeping optimizer rounds: the high half of the bits, plus one
    where the low half is 0x8000 or more (ties go away from zero, not to even)."""
    bits = values.contiguous().view(torch.int32)
    high = ((bits >> 16) & 0xFFFF) + ((bits & 0x8000) != 0).to(torch.int32)
    high = high & 0xFFFF
    return torch.where(high >= 0x8000, high - 0x10000, high).to(torch.int16).view(torch.bfloat16)


def low_half(values: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of fp32 values, as the int16 remainders TransformerEngine keeps."""
    low = values.contiguous().view(torch.int32) & 0xFFFF
    return torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16)
