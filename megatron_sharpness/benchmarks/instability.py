"""The instability suite: provoked loss spikes of several mechanisms on small GPTs (plain PyTorch and
megatron-core through the Megatron-LM-style path), each with a calm twin, several seeds; the probe's
warning against other detectors on the same runs; the guard against no guard and ZClip-style
clipping. CPU-sized, seeded, reproducible; one command re-runs everything and rewrites the tables and
the picture:

    python -m megatron_sharpness.benchmarks.instability --out bench-instability [--seeds 3] [--quick]

Writes OUT/traces.json (every run's per-step loss, gradient norm, update ratio and the probe's
readings), OUT/tables.md (the tables below) and OUT/instability-detectors.png; `--report-only`
redoes the tables and the picture from OUT/traces.json.

Mechanisms (provoked | calm twin), AdamW on a 2-layer GPT (width 48, batch 8 × 32 bytes) unless said:
- lr-warmup: linear warm-up over 400 steps to a peak lr of 0.3 | to 3e-3;
- group-lr: the output layer's lr × 100 from step 303 (demo-spike) | unchanged;
- adam-collapse: the output layer's gradient × 1e-3 for steps 1–300 (a group whose gradient is near
  zero, e.g. the output rows of tokens that do not appear yet), β₂ = 0.999, ε = 1e-12, lr 1e-2: at
  full size again, Adam's second moment still holds the small gradients ("A Theory on Adam
  Instability in Large-Scale Machine Learning") | the same without the quiet stretch;
- corrupt-data: 5 batches of uniformly random tokens from step 303 | none;
- attention-logits: no QK-norm, bf16 autocast, lr 0.1, one head of width 128: the attention logits
  grow until the softmax saturates (Dehghani et al. 2023) | the same with QK-LayerNorm;
- small-embedding (from the literature, not in the list above): token and position embeddings
  initialised with std 0.02 (Megatron's init_method_std) under pre-LayerNorm, lr 2e-2 — the spikes
  "Spike No More" (Takase et al., arXiv 2312.16903) trace to a small shortcut | PyTorch's std 1;
- megatron-lr-warmup, megatron-corrupt-data: the first and fourth on megatron-core's GPTModel
  through the Megatron-LM-style train step (one rank, gloo, CPU shims, distributed optimizer, Adam
  β₂ 0.999, weight decay 0.01, clipping at 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from megatron_sharpness.benchmarks.detectors import DETECTORS, Score, ZScore, score, spikes_of
from megatron_sharpness.config import SharpnessConfig
from megatron_sharpness.data import VOCAB_SIZE, ByteBatches, embedded_corpus, train_heldout_split
from megatron_sharpness.measurement import Measurement, ratio_of

GUARDS = ("off", "shorten", "lr", "zclip")
ZCLIP_Z = 2.5


@dataclass(frozen=True)
class RunSpec:
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 30
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    bf16: bool = False
    qk_norm: bool = False
    z_loss: float = 0.0
    group: str | None = None           # a default group (embedding, layer_N, output) whose lr is raised
    group_factor: float = 1.0
    group_at: int = 0
    quiet: tuple[str, int, int, float] | None = None   # (group, first step, end step, gradient scale)
    corrupt: tuple[int, int] | None = None             # random-token batches at steps [first, end)
    embed_std: float | None = None                     # init std of the token and position embeddings
    width: int = 48
    layers: int = 2
    heads: int = 4
    batch_size: int = 8
    seq_len: int = 32


@dataclass(frozen=True)
class Mechanism:
    name: str
    provoked: RunSpec
    calm: RunSpec
    backend: str = "torch"


MECHANISMS = (
    Mechanism("lr-warmup", RunSpec(lr=0.3, warmup=400), RunSpec(lr=3e-3, warmup=400)),
    Mechanism("group-lr", RunSpec(group="output", group_factor=100.0, group_at=303), RunSpec(group="output")),
    Mechanism("adam-collapse", RunSpec(lr=1e-2, betas=(0.9, 0.999), eps=1e-12, quiet=("output", 1, 300, 1e-3)),
              RunSpec(lr=1e-2, betas=(0.9, 0.999), eps=1e-12)),
    Mechanism("corrupt-data", RunSpec(corrupt=(303, 308)), RunSpec()),
    Mechanism("attention-logits", RunSpec(steps=400, lr=0.1, bf16=True, width=128, heads=1),
              RunSpec(steps=400, lr=0.1, bf16=True, width=128, heads=1, qk_norm=True)),
    Mechanism("small-embedding", RunSpec(lr=2e-2, embed_std=0.02), RunSpec(lr=2e-2)),
    Mechanism("megatron-lr-warmup", RunSpec(lr=0.3, warmup=400, steps=500), RunSpec(lr=3e-3, warmup=400, steps=500),
              backend="megatron"),
    Mechanism("megatron-corrupt-data", RunSpec(corrupt=(303, 308), steps=500), RunSpec(steps=500), backend="megatron"),
)


def lr_at(spec: RunSpec, step: int) -> float:
    return spec.lr * min(1.0, step / spec.warmup)


def probe_config(interval: int, budget: float | None, guard: str) -> SharpnessConfig:
    # The breakdown runs at warnings only (it names the group the guard acts on).
    return SharpnessConfig(interval=interval, budget=budget, modules="default", modules_interval=0,
                           guard="off" if guard == "zclip" else guard)


def measurement_entry(m: Measurement, seconds: float) -> dict[str, Any]:
    ratio = None if m.task is None else ratio_of(m.task)
    worst = m.worst_module()
    return {"step": m.step, "status": m.status, "ratio": "inf" if ratio == math.inf else ratio,
            "raised": bool(m.task is not None and m.task.search.step_raised_loss),
            "warning": m.warning is not None, "forwards": m.forwards, "seconds": seconds,
            "worst": None if worst is None else [worst[0], "inf" if math.isinf(worst[1]) else worst[1]],
            "guard": None if m.guard is None else m.guard.to_dict(), "next_interval": m.next_interval}


class StepStats:
    """Per step: the gradient norm before clipping, ZClip's clipping, and the update ratio, with
    the time each detector's own arithmetic takes."""

    def __init__(self, params: list[torch.Tensor], zclip: bool):
        self.params, self.zclip = params, ZScore() if zclip else None
        self.trace: dict[str, list[float]] = {"grad_norm": [], "update_ratio": []}
        self.seconds = {"grad_norm": 0.0, "update_ratio": 0.0}
        self._before: torch.Tensor | None = None

    @torch.no_grad()
    def before_step(self) -> None:
        started = time.perf_counter()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        if self.zclip is not None:
            z = self.zclip.update(norm, clip=ZCLIP_Z)
            if z > ZCLIP_Z and math.isfinite(norm):
                scale = self.zclip.bound(ZCLIP_Z) / norm
                for g in grads:
                    g.mul_(scale)
        self.trace["grad_norm"].append(norm)
        middle = time.perf_counter()
        self._before = torch.cat([p.detach().float().reshape(-1) for p in self.params])
        self.seconds["grad_norm"] += middle - started
        self.seconds["update_ratio"] += time.perf_counter() - middle

    @torch.no_grad()
    def after_step(self) -> None:
        started = time.perf_counter()
        after = torch.cat([p.detach().float().reshape(-1) for p in self.params])
        ratio = (torch.linalg.vector_norm(after - self._before) / torch.linalg.vector_norm(self._before)).item()
        self.trace["update_ratio"].append(ratio)
        self.seconds["update_ratio"] += time.perf_counter() - started


def run_torch(spec: RunSpec, seed: int, interval: int, budget: float | None = None,
              guard: str = "off") -> dict[str, Any]:
    from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
    from megatron_sharpness.modules import default_groups
    from megatron_sharpness.testing.tiny_gpt import TinyGPT

    torch.manual_seed(seed)
    train, heldout = train_heldout_split(embedded_corpus())
    batches = ByteBatches(train, spec.batch_size, spec.seq_len, seed)
    evaluation = ByteBatches(heldout, spec.batch_size, spec.seq_len, 10_000)
    eval_batches = [next(evaluation) for _ in range(8)]
    noise = torch.Generator().manual_seed(seed + 77)
    model = TinyGPT(width=spec.width, layers=spec.layers, heads=spec.heads, max_seq_len=spec.seq_len,
                    qk_norm=spec.qk_norm)
    if spec.embed_std is not None:
        with torch.no_grad():
            for embedding in (model.token_embedding, model.position_embedding):
                embedding.weight.normal_(0.0, spec.embed_std)
    named = dict(model.named_parameters())
    groups = default_groups(list(named))
    special = set(groups[spec.group]) if spec.group else set()
    param_groups = [{"params": [p for n, p in named.items() if n not in special]}]
    if special:
        param_groups.append({"params": [p for n, p in named.items() if n in special]})
    optimizer = torch.optim.AdamW(param_groups, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                  weight_decay=spec.weight_decay)
    # Under bf16 autocast the forward computes in bf16: that sets the probe's resolution floor.
    probe = TorchSharpnessProbe(model, optimizer, probe_config(interval, budget, guard), loggers=[],
                                compute_dtype=torch.bfloat16 if spec.bf16 else None)
    quiet = [named[n] for n in (named if spec.quiet[0] == "all" else groups[spec.quiet[0]])] if spec.quiet else []
    stats = StepStats(list(named.values()), zclip=guard == "zclip")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if spec.bf16 else contextlib.nullcontext

    def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(tokens).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if spec.z_loss:
            loss = loss + spec.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss

    trace: dict[str, Any] = {"loss": [], "lr": [], "measurements": []}
    train_seconds = 0.0
    for step in range(1, spec.steps + 1):
        started = time.perf_counter()
        base = lr_at(spec, step)
        optimizer.param_groups[0]["lr"] = base
        if special:
            optimizer.param_groups[1]["lr"] = base * (spec.group_factor if step >= spec.group_at else 1.0)
        tokens, targets = next(batches)
        if spec.corrupt and spec.corrupt[0] <= step < spec.corrupt[1]:
            tokens = torch.randint(0, VOCAB_SIZE, tokens.shape, generator=noise)
            targets = torch.randint(0, VOCAB_SIZE, targets.shape, generator=noise)
        loss = loss_of(tokens, targets)
        loss.backward()
        if spec.quiet and spec.quiet[1] <= step < spec.quiet[2]:
            for param in quiet:
                param.grad.mul_(spec.quiet[3])
        stats.before_step()
        measurement = probe.step(lambda: loss_of(tokens, targets), training_loss=loss.detach())
        stats.after_step()
        optimizer.zero_grad(set_to_none=True)
        trace["loss"].append(loss.item())
        trace["lr"].append(base)
        if measurement is not None:
            trace["measurements"].append(measurement_entry(measurement, measurement.probe_seconds))
        train_seconds += time.perf_counter() - started - (0.0 if measurement is None else measurement.probe_seconds)
        if not math.isfinite(trace["loss"][-1]):
            break
    with torch.no_grad():
        final = sum(loss_of(x, y).item() for x, y in eval_batches) / len(eval_batches)
    trace.update(stats.trace)
    trace.update(final_loss=final if math.isfinite(final) else None, train_seconds=train_seconds,
                 detector_seconds=stats.seconds, guard_actions=0 if probe.probe.guard is None else probe.probe.guard.actions)
    return trace


_megatron_ready = False


def _megatron_world() -> None:
    """One gloo rank with megatron-core's parallel groups, once per process."""
    global _megatron_ready
    if _megatron_ready:
        return
    from megatron_sharpness.testing.megatron_cpu import install_cpu_shims
    from megatron_sharpness.testing.megatron_gpt import init_gloo_model_parallel

    install_cpu_shims()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_gloo_model_parallel(1, 1)
    _megatron_ready = True


def megatron_flags(interval: int, budget: float | None, guard: str) -> list[str]:
    flags = ["--critical-sharpness-interval", str(interval), "--critical-sharpness-modules", "default",
             "--critical-sharpness-modules-interval", "0"]
    if budget is not None:
        flags += ["--critical-sharpness-budget", str(budget)]
    if guard in ("shorten", "lr"):
        flags += ["--critical-sharpness-guard", guard]
    return flags


def run_megatron(spec: RunSpec, seed: int, interval: int, budget: float | None = None,
                 guard: str = "off") -> dict[str, Any]:
    """The same run on megatron-core's GPTModel (distributed optimizer, fp32, one rank) through the
    Megatron-LM-style train step that patches/megatron-lm/ gives Megatron-LM (flags included)."""
    _megatron_world()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sharpness.backends.megatron import reduce_lm_loss
    from megatron_sharpness.integrations import megatron_lm
    from megatron_sharpness.integrations.megatron_lm import gpt_micro_batch
    from megatron_sharpness.testing.megatron_gpt import (TinyGPTSetup, build_model_and_optimizer, forward_step,
                                                          megatron_lm_train_step)

    megatron_lm.reset()
    args = megatron_lm.add_critical_sharpness_args(argparse.ArgumentParser()).parse_args(
        megatron_flags(interval, budget, guard))
    args.seq_length, args.micro_batch_size, args.decoder_seq_length, args.num_microbatches = (
        spec.seq_len, spec.batch_size, None, 1)
    setup = TinyGPTSetup(distributed_optimizer=True, vocab=VOCAB_SIZE, seq_length=spec.seq_len,
                         micro_batch_size=spec.batch_size, hidden=spec.width, heads=spec.heads, layers=spec.layers,
                         lr=spec.lr, seed=seed)
    model, optimizer = build_model_and_optimizer(setup)
    train, heldout = train_heldout_split(embedded_corpus())
    batches = ByteBatches(train, spec.batch_size, spec.seq_len, seed)
    evaluation = ByteBatches(heldout, spec.batch_size, spec.seq_len, 10_000)
    noise = torch.Generator().manual_seed(seed + 77)

    def micro_batch(pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, targets = pair
        return gpt_micro_batch(torch.cat([tokens, targets[:, -1:]], dim=1))

    params = [p for chunk in model for p in chunk.parameters()]
    zclip = ZScore() if guard == "zclip" else None
    trace: dict[str, Any] = {"loss": [], "lr": [], "measurements": [], "grad_norm": [], "update_ratio": []}
    train_seconds = 0.0
    for step in range(1, spec.steps + 1):
        started = time.perf_counter()
        base = lr_at(spec, step)
        for group in optimizer.param_groups:
            group["lr"] = base
        if spec.corrupt and spec.corrupt[0] <= step < spec.corrupt[1]:
            shape = (spec.batch_size, spec.seq_len + 1)
            item = gpt_micro_batch(torch.randint(0, VOCAB_SIZE, shape, generator=noise))
        else:
            item = micro_batch(next(batches))
        if zclip is not None:
            # ZClip's threshold as Megatron's own clip: the norm above mean + z·std is clipped to it.
            bound = zclip.bound(ZCLIP_Z) if zclip.ready() else 1.0
            for leaf in optimizer.chained_optimizers:
                leaf.config.clip_grad = max(bound, 1e-6)
        before = torch.cat([p.detach().float().reshape(-1) for p in params])
        loss, grad_norm = megatron_lm_train_step(model, optimizer, iter([item]), args, step - 1)
        after = torch.cat([p.detach().float().reshape(-1) for p in params])
        if zclip is not None:
            zclip.update(grad_norm, clip=ZCLIP_Z)
        trace["loss"].append(loss)
        trace["lr"].append(base)
        trace["grad_norm"].append(grad_norm)
        trace["update_ratio"].append((torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)).item())
        measurement = megatron_lm._measurement_at(step)
        elapsed = time.perf_counter() - started
        if measurement is not None:
            trace["measurements"].append(measurement_entry(measurement, measurement.probe_seconds))
            elapsed -= measurement.probe_seconds
        train_seconds += elapsed
        if not math.isfinite(loss):
            break
    eval_items = [micro_batch(next(evaluation)) for _ in range(8)]
    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(eval_items), model=model,
                                            num_microbatches=len(eval_items), seq_length=spec.seq_len,
                                            micro_batch_size=spec.batch_size, forward_only=True)
    final = reduce_lm_loss(store).item()
    guard_policy = None if megatron_lm._sharpness is None else megatron_lm._sharpness.probe.guard
    trace.update(final_loss=final if math.isfinite(final) else None, train_seconds=train_seconds,
                 detector_seconds={"grad_norm": 0.0, "update_ratio": 0.0},
                 guard_actions=0 if guard_policy is None else guard_policy.actions)
    megatron_lm.reset()
    return trace


def run(mechanism: Mechanism, variant: str, seed: int, interval: int, budget: float | None = None,
        guard: str = "off", steps: int | None = None) -> dict[str, Any]:
    spec = getattr(mechanism, variant)
    if steps is not None:
        spec = replace(spec, steps=steps)
    runner = run_megatron if mechanism.backend == "megatron" else run_torch
    started = time.perf_counter()
    trace = runner(spec, seed, interval, budget, guard)
    trace.update(mechanism=mechanism.name, variant=variant, seed=seed, interval=interval, budget=budget, guard=guard,
                 wall_seconds=time.perf_counter() - started)
    return trace


def subsampled(trace: dict[str, Any], interval: int) -> dict[str, Any]:
    """The trace as a probe measuring every `interval` steps would have read it (training is
    bitwise the same with and without the probe, so a coarser interval is a subset of the readings)."""
    return {**trace, "measurements": [m for m in trace["measurements"] if m["step"] % interval == 0]}


def probe_share(trace: dict[str, Any]) -> float:
    return sum(m["seconds"] for m in trace["measurements"]) / trace["train_seconds"]


def detector_cost(trace: dict[str, Any], key: str) -> float:
    if key == "probe":
        return probe_share(trace)
    if key == "none":
        return 0.0
    return trace["detector_seconds"][key] / trace["train_seconds"]


def aggregate(traces: list[dict[str, Any]], alarms: Callable[[dict[str, Any]], list[int]]) -> Score:
    total = Score(leads=[])
    for trace in traces:
        total.add(score(trace, alarms(trace)))
    return total


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def detector_table(traces: list[dict[str, Any]], coarse: int) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """Markdown rows per detector at its default threshold (and ours at a coarser interval and
    adaptive), and per detector the (false alarms per 1000, recall) curve of its thresholds."""
    fixed = [t for t in traces if t["guard"] == "off" and t["budget"] is None]
    adaptive = [t for t in traces if t["guard"] == "off" and t["budget"] is not None]
    rows = ["| detector | threshold | spikes | recall | recall ≥ 2 steps ahead | median lead (steps) | "
            "false alarms / 1000 calm steps | unconfirmed alarms / 1000 provoked steps | cost (share of training time) |",
            "|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, list[tuple[float, float]]] = {}

    def row(name: str, threshold: float, group: list[dict[str, Any]], detector) -> None:
        total = aggregate(group, lambda t: detector.alarms(t, threshold))
        cost = statistics_mean([detector_cost(t, detector.cost_key) for t in group])
        rows.append(f"| {name} | {threshold:g} | {total.spikes} | {_fmt(total.recall)} | {_fmt(total.recall_2)} | "
                    f"{_fmt(total.median_lead, 1)} | {_fmt(total.false_per_1000)} | {_fmt(total.unconfirmed_per_1000)} | "
                    f"{100 * cost:.2f} % |")

    for detector in DETECTORS:
        curves[detector.name] = [(s.false_per_1000, s.recall) for s in
                                 (aggregate(fixed, lambda t, x=x: detector.alarms(t, x)) for x in detector.thresholds)]
        row(detector.name + f" (every {fixed[0]['interval']})" if detector.cost_key == "probe" else detector.name,
            detector.default, fixed, detector)
    ours = DETECTORS[0]
    coarse_traces = [subsampled(t, coarse) for t in fixed]
    curves[f"{ours.name} (every {coarse})"] = [
        (s.false_per_1000, s.recall) for s in (aggregate(coarse_traces, lambda t, x=x: ours.alarms(t, x))
                                              for x in ours.thresholds)]
    row(f"{ours.name} (every {coarse})", ours.default, coarse_traces, ours)
    if adaptive:
        row(f"{ours.name} (adaptive, budget {adaptive[0]['budget']:g})", ours.default, adaptive, ours)
    return "\n".join(rows), curves


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def per_mechanism_table(traces: list[dict[str, Any]]) -> str:
    fixed = [t for t in traces if t["guard"] == "off" and t["budget"] is None]
    names = list(dict.fromkeys(t["mechanism"] for t in fixed))
    chosen = [d for d in DETECTORS if d.name in ("ours: lr/critical lr or raised loss", "ours: trend",
                                                  "grad-norm z-score (ZClip)", "update ratio z-score")]
    rows = ["| mechanism | spikes (provoked / calm runs) | " + " | ".join(f"{d.name}: recall, false/1000" for d in chosen)
            + " |", "|---|---|" + "---|" * len(chosen)]
    for name in names:
        group = [t for t in fixed if t["mechanism"] == name]
        provoked = sum(len(spikes_of(t)) for t in group if t["variant"] == "provoked")
        calm = sum(len(spikes_of(t)) for t in group if t["variant"] == "calm")
        cells = []
        for detector in chosen:
            total = aggregate(group, lambda t, d=detector: d.alarms(t, d.default))
            cells.append(f"{_fmt(total.recall)}, {_fmt(total.false_per_1000, 1)}")
        rows.append(f"| {name} | {provoked} / {calm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def interval_table(traces: list[dict[str, Any]]) -> str:
    """The fixed interval against the adaptive one, on calm twins and provoked runs: measurements per
    1000 steps, the share of a training step's forwards the policy counts, the share of training
    time measured, and the warning's recall."""
    rows = ["| interval | runs | measurements / 1000 steps | modelled share (forwards / 3 per step) | "
            "measured share of training time | recall of the warning |", "|---|---|---|---|---|---|"]
    for budget in sorted({t["budget"] for t in traces if t["guard"] == "off"}, key=lambda b: (b is not None, b)):
        for variant in ("calm", "provoked"):
            group = [t for t in traces if t["guard"] == "off" and t["budget"] == budget and t["variant"] == variant]
            if not group:
                continue
            steps = sum(len(t["loss"]) for t in group)
            measured = sum(len(t["measurements"]) for t in group)
            forwards = sum(m["forwards"] for t in group for m in t["measurements"])
            seconds = sum(m["seconds"] for t in group for m in t["measurements"])
            train = sum(t["train_seconds"] for t in group)
            recall = aggregate(group, lambda t: DETECTORS[0].alarms(t, DETECTORS[0].default)).recall
            name = f"every {group[0]['interval']}" if budget is None else f"adaptive, budget {budget:g}"
            rows.append(f"| {name} | {variant} | {1000 * measured / steps:.1f} | {100 * forwards / 3 / steps:.2f} % | "
                        f"{100 * seconds / train:.2f} % | {_fmt(recall)} |")
    return "\n".join(rows)


def guard_table(traces: list[dict[str, Any]]) -> str:
    """Spikes per 1000 steps and the final held-out loss per guard, mechanism and seed; the calm
    runs' final losses (guard off) give the spread to compare with."""
    guarded = [t for t in traces if t["budget"] is None and t["variant"] == "provoked"]
    calm = [t for t in traces if t["budget"] is None and t["variant"] == "calm" and t["guard"] == "off"]
    rows = ["| mechanism | seed | " + " | ".join(f"{g}: spikes/1000, final loss" for g in GUARDS)
            + " | guard actions (shorten, lr) | calm run's final loss |", "|---|---|" + "---|" * (len(GUARDS) + 2)]
    keys = list(dict.fromkeys((t["mechanism"], t["seed"]) for t in guarded))
    for name, seed in keys:
        cells, actions = [], []
        for guard in GUARDS:
            found = [t for t in guarded if (t["mechanism"], t["seed"], t["guard"]) == (name, seed, guard)]
            if not found:
                cells.append("–")
                continue
            trace = found[0]
            rate = 1000.0 * len(spikes_of(trace)) / len(trace["loss"])
            cells.append(f"{rate:.1f}, {_fmt(trace['final_loss'], 3)}")
            if guard in ("shorten", "lr"):
                actions.append(str(trace["guard_actions"]))
        twin = [t for t in calm if (t["mechanism"], t["seed"]) == (name, seed)]
        rows.append(f"| {name} | {seed} | " + " | ".join(cells) + f" | {', '.join(actions)} | "
                    f"{_fmt(twin[0]['final_loss'], 3) if twin else '–'} |")
    return "\n".join(rows)


def guard_summary(traces: list[dict[str, Any]]) -> str:
    provoked = [t for t in traces if t["budget"] is None and t["variant"] == "provoked"]
    calm = [t for t in traces if t["budget"] is None and t["variant"] == "calm" and t["guard"] == "off"]
    rows = ["| guard | spikes (all provoked runs) | prevented vs off | final loss − calm twin's (median) | "
            "runs within the calm runs' spread |", "|---|---|---|---|---|"]
    spread = {}
    for name in {t["mechanism"] for t in calm}:
        finals = [t["final_loss"] for t in calm if t["mechanism"] == name and t["final_loss"] is not None]
        spread[name] = (min(finals), max(finals)) if finals else None
    off = sum(len(spikes_of(t)) for t in provoked if t["guard"] == "off")
    for guard in GUARDS:
        group = [t for t in provoked if t["guard"] == guard]
        if not group:
            continue
        spikes = sum(len(spikes_of(t)) for t in group)
        gaps, within = [], 0
        for trace in group:
            twin = [t for t in calm if (t["mechanism"], t["seed"]) == (trace["mechanism"], trace["seed"])]
            final = trace["final_loss"]
            if twin and final is not None and twin[0]["final_loss"] is not None:
                gaps.append(final - twin[0]["final_loss"])
            low_high = spread.get(trace["mechanism"])
            within += bool(low_high and final is not None and final <= low_high[1])
        prevented = (off - spikes) / off if off else math.nan
        gaps.sort()
        rows.append(f"| {guard} | {spikes} | {_fmt(100 * prevented, 0)} % | "
                    f"{_fmt(gaps[len(gaps) // 2], 3) if gaps else '–'} | {within}/{len(group)} |")
    return "\n".join(rows)


def picture(curves: dict[str, list[tuple[float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for name, points in curves.items():
        points = sorted((x, y) for x, y in points if not math.isnan(x) and not math.isnan(y))
        if points:
            axes.plot([max(x, 0.1) for x, _ in points], [y for _, y in points], marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("false alarms per 1000 calm steps (0 drawn at 0.1)")
    axes.set_ylabel("recall (spikes warned 1–50 steps ahead)")
    axes.set_ylim(-0.02, 1.02)
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    axes.set_title("Instability suite: each detector over its thresholds")
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(traces: list[dict[str, Any]], out: str, coarse: int, picture_path: str | None) -> str:
    detectors, curves = detector_table(traces, coarse)
    text = "\n\n".join(["## Detectors (guard off, all mechanisms and seeds)", detectors,
                        "## Per mechanism (default thresholds)", per_mechanism_table(traces),
                        "## Interval", interval_table(traces),
                        "## Guard", guard_summary(traces), guard_table(traces)]) + "\n"
    with open(os.path.join(out, "tables.md"), "w") as file:
        file.write(text)
    picture(curves, picture_path or os.path.join(out, "instability-detectors.png"))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-instability", help="folder for traces.json, tables.md and the picture")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--interval", type=int, default=10, help="the probe's fixed interval (default 10)")
    parser.add_argument("--coarse", type=int, default=50, help="also score our warning at this interval (a multiple of --interval)")
    parser.add_argument("--budget", type=float, default=0.1, help="the adaptive interval's budget for its own runs")
    parser.add_argument("--mechanisms", nargs="+", default=[m.name for m in MECHANISMS],
                        choices=[m.name for m in MECHANISMS])
    parser.add_argument("--guards", nargs="+", default=list(GUARDS), choices=GUARDS)
    parser.add_argument("--steps", type=int, default=None, help="shorten every run (a quick look)")
    parser.add_argument("--picture", default=None, help="where the picture goes (default OUT/instability-detectors.png)")
    parser.add_argument("--report-only", action="store_true", help="tables and picture from OUT/traces.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "traces.json")
    if args.report_only:
        with open(path) as file:
            traces = json.load(file)
    else:
        traces = []
        for mechanism in (m for m in MECHANISMS if m.name in args.mechanisms):
            started = time.perf_counter()
            for seed in range(args.seeds):
                for variant in ("provoked", "calm"):
                    guards = args.guards if variant == "provoked" else ["off"]
                    for guard in guards:
                        traces.append(run(mechanism, variant, seed, args.interval, None, guard, args.steps))
                    traces.append(run(mechanism, variant, seed, args.interval, args.budget, "off", args.steps))
            print(f"{mechanism.name}: {time.perf_counter() - started:.0f} s", flush=True)
            with open(path, "w") as file:
                json.dump(traces, file)
    print(report(traces, args.out, args.coarse, args.picture))


if __name__ == "__main__":
    main()
