"""Wiring for deepspeedai/Megatron-DeepSpeed; patches/megatron-deepspeed/ calls these four:

    add_critical_sharpness_args(parser)                 in megatron/arguments.py parse_args
    attach(model, forward_step_func, args, get_forward_backward_func)   in pretrain(), after setup
    data_iterator = record(data_iterator)               in train_step(), before forward_backward_func
    log_string += log_fields(iteration)                 in training_log(), Megatron's iteration line

Megatron-DeepSpeed builds a PipelineEngine unless --no-pipeline-parallel is given (also at
pipeline size 1): then its train_batch is hooked. With --no-pipeline-parallel it is a plain
DeepSpeedEngine: engine.step() is hooked and the step's micro-batches are replayed through
Megatron's own forward_backward_func(forward_only=True) with the script's forward_step_func.
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from typing import Any, Callable, Iterator, Sequence

import deepspeed
import torch
from deepspeed.runtime.pipe.engine import PipelineEngine

from megatron_sharpness.faults import UsageError
from megatron_sharpness.integrations.deepspeed import DeepSpeedSharpness, _default_loggers
from megatron_sharpness.integrations.deepspeed import attach as attach_to_engine
from megatron_sharpness.integrations.deepspeed import config_from_engine
from megatron_sharpness.integrations.flags import add_critical_sharpness_args, config_from_args
from megatron_sharpness.loggers import LogLineLogger

__all__ = ["add_critical_sharpness_args", "attach", "log_fields", "record"]

_attached: DeepSpeedSharpness | None = None

# Megatron-DeepSpeed's training.py (4efb479d, main in July 2025) imports this module, which
# deepspeed 0.19.7 removed; 0.19.6 is the newest release that has it (and the one we test with).
MEGATRON_DEEPSPEED_IMPORTS = "deepspeed.compression.compress"
DEEPSPEED_FOR_MEGATRON_DEEPSPEED = "0.19.6"


def deepspeed_problem(version: str, has_compression: bool) -> str | None:
    """Why Megatron-DeepSpeed cannot run with the installed deepspeed, or None."""
    if has_compression:
        return None
    return (f"critical sharpness: deepspeed {version} is installed, which has no {MEGATRON_DEEPSPEED_IMPORTS}: "
            f"Megatron-DeepSpeed imports it in megatron/training.py and stops with ModuleNotFoundError; "
            f"install deepspeed=={DEEPSPEED_FOR_MEGATRON_DEEPSPEED} "
            f"(pip install 'deepspeed=={DEEPSPEED_FOR_MEGATRON_DEEPSPEED}')")


def _has_compression() -> bool:
    try:
        return importlib.util.find_spec(MEGATRON_DEEPSPEED_IMPORTS) is not None
    except ImportError:  # deepspeed.compression itself is gone
        return False


# Said at import, which Megatron-DeepSpeed's training.py does a few lines before its own import
# of deepspeed.compression.compress fails.
_problem = deepspeed_problem(deepspeed.__version__, _has_compression())
if _problem is not None:
    warnings.warn(_problem, RuntimeWarning, stacklevel=2)


class LossReportError(UsageError, KeyError):
    """forward_step_func's loss_func reports no loss under the key the probe reads."""


def mean_reported_loss(losses_reduced: Sequence[dict], key: str = "lm loss") -> torch.Tensor:
    """Megatron's loss_func reports each micro-batch's loss already averaged over data parallelism."""
    if not losses_reduced or key not in losses_reduced[0]:
        raise LossReportError(f"critical sharpness: forward_step_func's loss_func reported no {key!r}; "
                              f"got {sorted(losses_reduced[0]) if losses_reduced else 'nothing'}")
    return torch.stack([torch.as_tensor(d[key]).double().reshape(()) for d in losses_reduced]).mean()


def megatron_schedule_loss(model: list, forward_step_func: Callable, args: argparse.Namespace,
                           get_forward_backward_func: Callable) -> Callable[[Sequence[Any], int], torch.Tensor]:
    def evaluate(batches: Sequence[Any], count: int) -> torch.Tensor:
        # No batches: a rank that reads no data (TP rank > 0) and gets its batch by broadcast.
        losses_reduced = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=iter(batches) if batches else None, model=model,
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
    # The fields go into Megatron's own iteration line (log_fields), not a line of their own.
    loggers = [logger for logger in _default_loggers(engine, config) if not isinstance(logger, LogLineLogger)]
    _attached = attach_to_engine(engine, config, evaluate=evaluate, loggers=loggers)
    return _attached


def record(data_iterator: Iterator | None) -> Iterator | None:
    """The step's data iterator, recording the micro-batches of a measured step as they are read;
    None (TP ranks > 0 read no data) stays None."""
    if _attached is None or _attached.is_pipeline:
        return data_iterator
    return _attached.record_batches(data_iterator)


def log_fields(iteration: int) -> str:
    """Our fields for Megatron's iteration line when this iteration was measured, else ''."""
    measurement = None if _attached is None else _attached.last_measurement
    if measurement is None or measurement.step != iteration:
        return ""
    return " " + measurement.log_fields()
