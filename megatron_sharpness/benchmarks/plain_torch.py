"""Benchmark of the plain-PyTorch probe over a training run of the demo model (not a test).

Runs the same training twice, with the fast and with the paper search (the probe does not change
training, so both see identical states), on the step's batch and a held-out relative task. Prints
forward passes per measurement per outcome (median, p90, max), agreement of converged values with
a dense scan of L(θ_t − η·Δθ), and the probe's wall time against (forwards × one forward pass).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from megatron_sharpness.benchmarks import markdown_table
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import ByteBatches, embedded_corpus, train_heldout_split
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


def percentiles(values: list[int]) -> str:
    ordered = sorted(values)
    p90 = ordered[math.ceil(0.9 * len(ordered)) - 1]  # nearest rank
    return f"{statistics.median(ordered):g} / {p90} / {ordered[-1]}"


def run(args, method: str, reuse_training_loss: bool = False) -> dict:
    torch.manual_seed(0)
    train_text, heldout_text = train_heldout_split(embedded_corpus())
    batches = ByteBatches(train_text, args.batch_size, args.seq_len, seed=0)
    heldout = next(ByteBatches(heldout_text, args.batch_size, args.seq_len, seed=1))
    device = torch.device(args.device)
    heldout = tuple(t.to(device) for t in heldout)
    model = TinyGPT(max_seq_len=args.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps // 10, args.steps))
    probe = TorchSharpnessProbe(model, optimizer, SharpnessConfig(interval=args.interval, search=method))
    equal_baselines = 0
    probe.add_relative_task("heldout", lambda: lm_loss(model, *heldout))

    stats = {"forwards": {}, "in_bracket": [], "errors": [], "ratios": [], "probe_seconds": [], "train_seconds": []}
    for _ in range(args.steps):
        batch = tuple(t.to(device) for t in next(batches))
        started = time.perf_counter()
        training_loss = lm_loss(model, *batch)
        training_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        theta_t = [p.detach().clone() for p in model.parameters()]
        lr = optimizer.param_groups[0]["lr"]
        measurement = probe.step(lambda: lm_loss(model, *batch),
                                 training_loss=training_loss.detach() if reuse_training_loss else None)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if measurement is None:
            stats["train_seconds"].append(time.perf_counter() - started)
            continue
        for task_name, task in (("own batch", measurement.task), ("heldout", measurement.relative["heldout"])):
            stats["forwards"].setdefault((task_name, task.status), []).append(task.forwards)
        stats["probe_seconds"].append(measurement.probe_seconds)
        stats["ratios"].append(measurement.probe_seconds /
                               (measurement.forwards * median_forward_seconds(model, batch)))
        if reuse_training_loss:  # the reuse is only valid where the numbers are bitwise equal: check
            with torch.no_grad():
                scanned = copy.deepcopy(model)
                for param, old in zip(scanned.parameters(), theta_t):
                    param.copy_(old)
                equal_baselines += lm_loss(scanned, *batch).item() == training_loss.item()
            stats["equal_baselines"] = f"{equal_baselines}/{sum(map(len, stats['forwards'].values())) // 2}"
        if measurement.critical_lr is None:
            continue
        theta_next = [p.detach().clone() for p in model.parameters()]
        etas = [measurement.critical_lr * 3 * k / args.scan_points for k in range(1, args.scan_points + 1)]
        scan = first_rise(model, theta_t, theta_next, lr, batch, measurement.task.search.baseline_loss, etas)
        lo, hi = measurement.task.search.bracket
        stats["in_bracket"].append(scan is not None and lo <= scan[1] and scan[0] <= hi)
        if scan is not None:
            stats["errors"].append(abs(measurement.critical_lr / scan[1] - 1))
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--scan-points", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)

    results = {"fast": run(args, "fast"), "paper": run(args, "paper"),
               "fast, training loss reused": run(args, "fast", reuse_training_loss=True)}
    rows = []
    for method, stats in results.items():
        for (task, status), counts in sorted(stats["forwards"].items()):
            rows.append((method, task, status, str(len(counts)), percentiles(counts)))
    print(markdown_table(("search", "task", "outcome", "measurements", "forwards median / p90 / max"), rows))
    print()
    summary = []
    for method, stats in results.items():
        in_bracket, errors = stats["in_bracket"], stats["errors"]
        summary += [
            (f"{method}: dense-scan first rise inside the bracket (own batch, converged)",
             f"{sum(in_bracket)}/{len(in_bracket)}"),
            (f"{method}: |η_c / scan η − 1| (median, max)",
             f"{statistics.median(errors):.3f}, {max(errors):.3f}" if errors else "n/a"),
            (f"{method}: probe time / (forwards × forward) (median)", f"{statistics.median(stats['ratios']):.2f}"),
            (f"{method}: probe per measurement, both tasks (median ms)",
             f"{1e3 * statistics.median(stats['probe_seconds']):.1f}"),
        ]
        if "equal_baselines" in stats:
            summary.append((f"{method}: training loss bitwise equal to a probe forward at θ_t",
                            stats["equal_baselines"]))
    summary.append(("training step without probe (median ms)",
                    f"{1e3 * statistics.median(results['fast']['train_seconds']):.1f}"))
    print(markdown_table(("metric", "value"), summary))


if __name__ == "__main__":
    main()
