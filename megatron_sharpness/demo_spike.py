"""CPU demo of the live instability warning: a tiny GPT trained with AdamW where, at a known step,
the embedding group's learning rate is multiplied (a provoked instability in the shallow layers).
The probe measures every step; the WARNING fires at the provoked step, before the loss spikes,
and the per-module breakdown names the embedding. Without the provocation neither happens.

Every iteration prints a Megatron-style line (`iteration N/ M | lm loss: ... |`), so that
`megatron-sharpness summary` can find the spike in the printed log and tie it to the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.loggers import JsonlLogger, WarningLogger
from megatron_sharpness.measurement import Measurement
from megatron_sharpness.modules import default_groups
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss



@dataclass
class SpikeRun:
    losses: list[float]                 # training loss of iterations 1..steps
    measurements: list[Measurement]     # one per iteration (interval 1)


def run_spike_demo(steps: int = 40, provoke_at: int | None = 30, factor: float = 100.0, group: str = "layer_0",
                   lr: float = 2e-3, batch_size: int = 8, seq_len: int = 32, seed: int = 0,
                   log_file: str | None = None, print_fn: Callable[[str], None] = print,
                   guard: str = "off") -> SpikeRun:
    """provoke_at: the iteration whose step first runs with the lr of `group` (a default group:
    embedding, layer_N, output) × factor (None: never). Base lr constant, so that any change in
    lr/critical lr is the provocation's. guard: the probe's guard (off, shorten, lr) at its defaults."""
    torch.manual_seed(seed)
    batches = ByteBatches(embedded_corpus(), batch_size, seq_len, seed)
    model = TinyGPT(width=48, layers=2, heads=4, max_seq_len=seq_len)
    named = dict(model.named_parameters())
    provoked = set(default_groups(list(named))[group])
    # The rest first: the probe reads η_t from param_groups[0], the base lr.
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named.items() if n not in provoked]},
                                   {"params": [p for n, p in named.items() if n in provoked]}],
                                  lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    config = SharpnessConfig(interval=1, modules="default", modules_interval=10, guard=guard)
    loggers = [WarningLogger(print_fn)] + ([JsonlLogger(log_file)] if log_file else [])
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=loggers)
    losses, measurements = [], []
    for iteration in range(1, steps + 1):
        if iteration == provoke_at:
            optimizer.param_groups[1]["lr"] = lr * factor
        tokens, targets = next(batches)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        measurement = probe.step(lambda: lm_loss(model, tokens, targets), training_loss=loss.detach())
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        measurements.append(measurement)
        print_fn(f" iteration {iteration:8d}/{steps:8d} | lm loss: {loss.item():.6E} | learning rate: "
                 f"{optimizer.param_groups[0]['lr']:.6E} | {measurement.log_fields()}")
    probe.close()
    return SpikeRun(losses, measurements)
