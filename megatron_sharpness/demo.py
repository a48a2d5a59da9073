"""CPU demo: a tiny GPT learns bytes of CPython's help text with AdamW, and the plain-PyTorch probe
measures critical sharpness on the training batch and relative sharpness on a held-out batch."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus, train_heldout_split
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.measurement import Measurement
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def run_demo(steps: int = 200, interval: int = 10, log_file: str | None = "critical_sharpness.jsonl",
             lr: float = 3e-3, batch_size: int = 16, seq_len: int = 64, seed: int = 0,
             print_fn: Callable[[str], None] = print) -> list[Measurement]:
    torch.manual_seed(seed)
    train_text, heldout_text = train_heldout_split(embedded_corpus())
    batches = ByteBatches(train_text, batch_size, seq_len, seed)
    heldout_tokens, heldout_targets = next(ByteBatches(heldout_text, batch_size, seq_len, seed + 1))

    model = TinyGPT(max_seq_len=seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, steps // 10), steps))
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=interval, log_file=log_file))
    probe.add_relative_task("heldout", lambda: lm_loss(model, heldout_tokens, heldout_targets))

    measurements = []
    for iteration in range(1, steps + 1):
        tokens, targets = next(batches)
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_lr = optimizer.param_groups[0]["lr"]
        measurement = probe.step(lambda: lm_loss(model, tokens, targets))
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if measurement is not None:
            measurements.append(measurement)
            print_fn(f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{steps:8d} | "
                     f"lm loss: {loss.item():.6E} | learning rate: {step_lr:.6E} | "
                     f"grad norm: {grad_norm.item():.3f} | {measurement.log_fields()}")
    probe.close()
    if log_file is not None:
        print_fn(f"wrote {len(measurements)} measurements to {log_file}")
    return measurements
