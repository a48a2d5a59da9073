"""Benchmark of the per-module breakdown on the demo model (not a test).

Trains the CPU demo's tiny GPT (AdamW, warmup + cosine) with the breakdown at every measurement
and prints, per default group, the forwards of its search (median / p90 / max) and its seconds,
beside the step's own search and a training step. A group's seconds run from the backend's
select_group() for it to the next one (the writes of its trial points included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_sharpness.benchmarks import markdown_table
from megatron_sharpness.benchmarks.plain_torch import percentiles
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus
from megatron_sharpness.demo import warmup_cosine
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss


def timed_groups(backend, seconds: dict[str, list[float]], names_of: dict[frozenset, str]):
    """Wraps backend.select_group to time each group's search (benchmark instrumentation)."""
    select = backend.select_group
    current: list = [None, 0.0]

    def select_group(names):
        now = time.perf_counter()
        if current[0] is not None:
            seconds.setdefault(current[0], []).append(now - current[1])
        current[0] = None if names is None else names_of[frozenset(names)]
        current[1] = now
        select(names)

    backend.select_group = select_group


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    batches = ByteBatches(embedded_corpus(), args.batch_size, args.seq_len, seed=0)
    model = TinyGPT(layers=args.layers, max_seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps // 10, args.steps))
    config = SharpnessConfig(interval=args.interval, modules="default", modules_interval=1)
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=[])
    from megatron_sharpness.modules import default_groups

    groups = default_groups([name for name, _ in model.named_parameters()])
    seconds: dict[str, list[float]] = {}
    timed_groups(probe.backend, seconds, {frozenset(members): name for name, members in groups.items()})
    forwards: dict[str, list[int]] = {}
    outcomes: dict[str, list[str]] = {}
    step_forwards, step_seconds, breakdown_seconds, train_seconds = [], [], [], []
    for _ in range(args.steps):
        tokens, targets = next(batches)
        started = time.perf_counter()
        loss = lm_loss(model, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        measurement = probe.step(lambda: lm_loss(model, tokens, targets), training_loss=loss.detach())
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if measurement is None:
            train_seconds.append(time.perf_counter() - started)
            continue
        for name, task in measurement.modules.items():
            forwards.setdefault(name, []).append(task.forwards)
            outcomes.setdefault(name, []).append(task.status)
        group_seconds = sum(seconds[name][-1] for name in measurement.modules)
        step_forwards.append(measurement.task.forwards)
        breakdown_seconds.append(group_seconds)
        step_seconds.append(measurement.probe_seconds - group_seconds)
    rows = [(name, str(len(forwards[name])), percentiles(forwards[name]),
             ", ".join(f"{outcomes[name].count(s)} {s}" for s in dict.fromkeys(outcomes[name])),
             f"{1e3 * statistics.median(seconds[name]):.1f}") for name in groups]
    rows.append(("(step's batch, whole update)", str(len(step_forwards)), percentiles(step_forwards), "",
                 f"{1e3 * statistics.median(step_seconds):.1f}"))
    print(markdown_table(("group", "measurements", "forwards median / p90 / max", "outcomes", "median ms"), rows))
    print()
    print(markdown_table(("metric", "value"), [
        ("breakdown per measurement, all groups (median ms)", f"{1e3 * statistics.median(breakdown_seconds):.1f}"),
        ("breakdown forwards per measurement (median)",
         f"{statistics.median([sum(f[i] for f in forwards.values()) for i in range(len(step_forwards))]):g}"),
        ("training step without probe (median ms)", f"{1e3 * statistics.median(train_seconds):.1f}"),
    ]))


if __name__ == "__main__":
    main()
