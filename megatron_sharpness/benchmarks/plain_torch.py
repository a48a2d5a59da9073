"""Benchmark of the plain-PyTorch probe over a training run of the demo model (not a test).

Prints one table: forward passes per measurement, agreement of the search with a dense scan of
L(θ_t − η·Δθ), and the probe's wall time against (forwards × one forward pass).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from megatron_sharpness.benchmarks import markdown_table
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus
from megatron_sharpness.demo import warmup_cosine
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.testing.tiny_gpt import TinyGPT, lm_loss


def first_rise(model, theta_t, theta_next, lr, batch, baseline, etas):
    """(η_k, η_{k+1}) around the first grid point whose loss exceeds the baseline, or None."""
    scanned = copy.deepcopy(model)
    previous = 0.0
    with torch.no_grad():
        for eta in etas:
            for param, old, new in zip(scanned.parameters(), theta_t, theta_next):
                param.copy_(old - (eta / lr) * (old - new))
            if lm_loss(scanned, *batch).item() > baseline:
                return previous, eta
            previous = eta
    return None


def median_forward_seconds(model, batch, repeats=5):
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            lm_loss(model, *batch)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--scan-points", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    batches = ByteBatches(embedded_corpus(), args.batch_size, args.seq_len, seed=0)
    model = TinyGPT(max_seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps // 10, args.steps))
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=args.interval))

    forwards, ratios, probe_seconds, in_bracket, errors, capped = [], [], [], [], [], 0
    train_seconds = []
    for _ in range(args.steps):
        batch = next(batches)
        started = time.perf_counter()
        lm_loss(model, *batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        theta_t = [p.detach().clone() for p in model.parameters()]
        lr = optimizer.param_groups[0]["lr"]
        measurement = probe.step(lambda: lm_loss(model, *batch))
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if measurement is None:
            train_seconds.append(time.perf_counter() - started)
            continue
        forwards.append(measurement.task.forwards)
        probe_seconds.append(measurement.probe_seconds)
        ratios.append(measurement.probe_seconds /
                      (measurement.task.forwards * median_forward_seconds(model, batch)))
        if measurement.critical_lr is None:
            capped += 1
            continue
        theta_next = [p.detach().clone() for p in model.parameters()]
        etas = [measurement.critical_lr * 3 * k / args.scan_points for k in range(1, args.scan_points + 1)]
        scan = first_rise(model, theta_t, theta_next, lr, batch, measurement.task.search.baseline_loss, etas)
        lo, hi = measurement.task.search.bracket
        in_bracket.append(scan is not None and lo <= scan[1] and scan[0] <= hi)
        if scan is not None:
            errors.append(abs(measurement.critical_lr / scan[1] - 1))

    rows = [
        ("training steps / measurements", f"{args.steps} / {len(forwards)}"),
        ("forwards per measurement (median, max)", f"{statistics.median(forwards):.0f}, {max(forwards)}"),
        ("capped searches (not converged)", f"{capped}"),
        ("search bracket holds the dense-scan first rise",
         f"{sum(in_bracket)}/{len(in_bracket)} ({100 * sum(in_bracket) / max(1, len(in_bracket)):.0f}%)"),
        ("|η_c / scan η − 1| (median, max)",
         f"{statistics.median(errors):.3f}, {max(errors):.3f}" if errors else "n/a"),
        ("probe time / (forwards × forward) (median, max)",
         f"{statistics.median(ratios):.2f}, {max(ratios):.2f}"),
        ("training step without probe (median ms)", f"{1e3 * statistics.median(train_seconds):.1f}"),
        ("probe per measurement (median ms)", f"{1e3 * statistics.median(probe_seconds):.1f}"),
        ("extra bytes while measuring (θ_t + θ_{t+1} clones)",
         f"{2 * sum(p.numel() * p.element_size() for p in model.parameters()):,}"),
    ]
    print(markdown_table(("metric", "value"), rows))


if __name__ == "__main__":
    main()
