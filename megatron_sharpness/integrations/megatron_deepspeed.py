"""Wiring for deepspeedai/Megatron-DeepSpeed; patches/megatron-deepspeed/ calls these three:

    add_critical_sharpness_args(parser)                 in megatron/arguments.py parse_args
    attach(model, forward_step_func, args, get_forward_backward_func)   in pretrain(), after setup
    data_iterator = record(data_iterator)               in train_step(), before forward_backward_func

With --deepspeed and pipeline parallelism the DeepSpeed PipelineEngine's train_batch is hooked;
without pipeline parallelism engine.step() is hooked and the step's micro-batches are replayed
through Megatron's own forward_backward_func(forward_only=True) with the script's forward_step_func.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterator, Sequence

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine

from megatron_sharpness.integrations.deepspeed import DeepSpeedSharpness
from megatron_sharpness.integrations.deepspeed import attach as attach_to_engine
from megatron_sharpness.integrations.deepspeed import config_from_engine
from megatron_sharpness.integrations.flags import add_critical_sharpness_args, config_from_args

__all__ = ["add_critical_sharpness_args", "attach", "record"]

_attached: DeepSpeedSharpness | None = None


def mean_reported_loss(losses_reduced: Sequence[dict], key: str = "lm loss") -> torch.Tensor:
    """Megatron's loss_func reports each micro-batch's loss already averaged over data parallelism."""
    if not losses_reduced or key not in losses_reduced[0]:
        raise KeyError(f"critical sharpness: forward_step_func's loss_func reported no {key!r}; "
                       f"got {sorted(losses_reduced[0]) if losses_reduced else 'nothing'}")
    return torch.stack([torch.as_tensor(d[key]).double().reshape(()) for d in losses_reduced]).mean()


def megatron_schedule_loss(model: list, forward_step_func: Callable, args: argparse.Namespace,
                           get_forward_backward_func: Callable) -> Callable[[Sequence[Any], int], torch.Tensor]:
    def evaluate(batches: Sequence[Any], count: int) -> torch.Tensor:
        losses_reduced = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=iter(batches), model=model,
            num_microbatches=count, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.decoder_seq_length, forward_only=True)
        return mean_reported_loss(losses_reduced)

    return evaluate


def attach(model: list, forward_step_func: Callable, args: argparse.Namespace,
           get_forward_backward_func: Callable) -> DeepSpeedSharpness | None:
    global _attached
    config = config_from_args(args)
    if not config.enabled and getattr(args, "deepspeed", False) and len(model) == 1:
        config = config_from_engine(model[0])  # no flag given: the ds_config section, if any
    if not config.enabled:
        return None
    if not getattr(args, "deepspeed", False):
        raise ValueError("--critical-sharpness-interval needs --deepspeed in Megatron-DeepSpeed; "
                         "for Megatron's own optimizers use the Megatron-LM integration")
    if len(model) != 1:
        raise ValueError(f"critical sharpness: expected one DeepSpeed engine, got {len(model)} model chunks")
    engine = model[0]
    evaluate = None
    if not isinstance(engine, PipelineEngine):
        evaluate = megatron_schedule_loss(model, forward_step_func, args, get_forward_backward_func)
    _attached = attach_to_engine(engine, config, evaluate=evaluate)
    return _attached


def record(data_iterator: Iterator) -> Iterator:
    """The step's data iterator, recording the micro-batches of a measured step as they are read."""
    if _attached is None or _attached.is_pipeline:
        return data_iterator
    return _attached.record_batches(data_iterator)
