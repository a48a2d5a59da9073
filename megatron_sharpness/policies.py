"""Policies beside the probe: when to measure next, and what to do at a measured step that crossed
the edge. They read a measurement and decide; the probe and the integrations act on the decision.

Both decide from numbers every rank holds bitwise alike (the readings, forward counts and step
numbers; never wall time), so every rank measures at the same steps and takes the same action, and a
resumed run decides as the uninterrupted one (their state is in the probe's state_dict).

Interval. FixedInterval measures every `interval`-th step (today's behaviour). AdaptiveInterval
measures rarely far from the edge and densely near it. Compute is counted in training steps (a
measurement costs its forwards × the share of a training step one probe forward takes, a forward
being a third of a forward + backward). Far from the edge the gap is the calm gap: `interval`, or
longer where half the budget would not pay for a measurement every `interval` steps. After each
measurement the next gap is calm_gap^(1 − u), with u the urgency of the reading (0 at lr/critical lr
≤ warn_ratio/16, 1 at warn_ratio or when the step raised its batch's loss, log-linear between), so
at the edge it measures every step. The budget caps it: a credit grows by `budget` per training step
up to the cost of BURST measurements, and a measurement is due only once the credit covers the last
one's cost. So calm stretches spend half the budget and save the rest for dense stretches, and on
average the probe spends at most `budget` of the training compute.

Guard. At a measured step whose lr/critical lr exceeds guard_ratio (an ascent counts as infinite, an
unresolved reading by its lower bound), act before the next step:
- shorten: the step just taken is replaced by θ_t + s·Δθ with s = guard_target · η_c/η_t (0 on an
  ascent: the step is undone); where the breakdown names a group above the ratio, only that group's
  part of the step is shortened, by its own η_c^G. The optimizer's moments stay as the optimizer left
  them (they saw the whole gradient): only the parameters move less.
- lr: the lr of the following steps is multiplied by f = guard_target · η_c/η_t (of the scheduled
  lr: a factor in force at the measured step multiplies in; at least MIN_LR_FACTOR), and f recovers
  geometrically to 1 over guard_recovery steps; a new crossing while it recovers lowers it again,
  never raises it, and restarts the recovery. Per group as for shorten where the integration can
  scale that group's lr alone (plain PyTorch: the param groups holding it); elsewhere every group.
  The guard acts only where lr/critical lr exceeds guard_target too (below it there is nothing to
  shorten).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from megatron_sharpness.measurement import Measurement, TaskMeasurement, ranked_modules, ratio_of

STATE_VERSION = 1
# The credit of the adaptive interval holds the cost of at most this many measurements: enough for a
# dense stretch near the edge without letting a long calm stretch save up an unbounded burst.
BURST = 16
# lr/critical lr at or below warn_ratio / FAR is far from the edge: the longest gap.
FAR = 16.0
# The lr guard never scales the lr below this: an ascent has no critical lr to aim at.
MIN_LR_FACTOR = 0.05
# A training step is one forward and one backward, about three forwards.
FORWARDS_PER_STEP = 3.0


def urgency(measurement: Measurement, warn_ratio: float) -> float:
    """0 far from the edge … 1 at it (lr/critical lr ≥ warn_ratio, an ascent, or a step that raised
    its batch's loss); 0 where the measurement has no reading (skipped, failed, never rose)."""
    task = measurement.task
    if task is None:
        return 0.0
    if task.search.step_raised_loss:
        return 1.0
    ratio = ratio_of(task)
    if ratio is None or ratio <= warn_ratio / FAR:
        return 0.0
    return min(1.0, math.log(ratio * FAR / warn_ratio) / math.log(FAR))


class FixedInterval:
    """Every interval-th step, counted from 1."""

    def __init__(self, interval: int):
        self.interval = interval

    def is_due(self, step: int) -> bool:
        return step % self.interval == 0

    def observe(self, measurement: Measurement, step_share: float) -> int | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class AdaptiveInterval:
    """The next measurement at calm_gap^(1 − urgency) steps, or later where the budget says so."""

    def __init__(self, interval: int, budget: float, warn_ratio: float):
        self.longest, self.budget, self.warn_ratio = interval, budget, warn_ratio
        self.next_due = interval
        self.last_step = 0
        self.credit = 0.0  # in training steps, at last_step
        self.spent = 0.0   # what the measurements cost so far, in training steps

    def is_due(self, step: int) -> bool:
        return step >= self.next_due

    def observe(self, measurement: Measurement, step_share: float) -> int:
        """After the measurement at measurement.step; step_share: the share of a training step one
        probe forward takes. Returns the gap to the next measurement."""
        step = measurement.step
        cost = measurement.forwards * step_share
        cap = BURST * max(cost, step_share)
        self.credit = min(cap, self.credit + self.budget * (step - self.last_step)) - cost
        self.spent += cost
        self.last_step = step
        calm_gap = max(self.longest, math.ceil(2.0 * cost / self.budget))
        gap = max(1, round(calm_gap ** (1.0 - urgency(measurement, self.warn_ratio))))
        # The credit must cover one more measurement like this one before it is due.
        refill = math.ceil(max(0.0, cost - self.credit) / self.budget)
        gap = max(gap, refill)
        self.next_due = step + gap
        return gap

    def state_dict(self) -> dict[str, Any]:
        return {"next_due": self.next_due, "last_step": self.last_step, "credit": self.credit, "spent": self.spent}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # saved with a fixed interval: start as a fresh run would
            return
        values = (state.get("next_due"), state.get("last_step"), state.get("credit"), state.get("spent"))
        if not (all(isinstance(v, int) and v >= 0 for v in values[:2])
                and all(isinstance(v, float) and math.isfinite(v) for v in values[2:])):
            raise ValueError(f"critical sharpness: bad adaptive-interval state {dict(state)!r:.120}; allowed: "
                             "next_due and last_step integers >= 0, credit and spent finite floats")
        self.next_due, self.last_step, self.credit, self.spent = values


@dataclass(frozen=True)
class GuardAction:
    """What the guard did at a measured step. factor: the step multiple committed (shorten) or the
    lr factor from the next step on (lr); group: the breakdown's group it acted on (None: all)."""

    mode: str
    factor: float
    ratio: float
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "factor": self.factor,
                "ratio": self.ratio if math.isfinite(self.ratio) else "inf", "group": self.group}

    def text(self) -> str:
        where = "" if self.group is None else f" {self.group}"
        return f"{self.mode}{where} ×{self.factor:.3g}"


class Guard:
    """mode: "shorten" or "lr"; ratio: lr/critical lr above which it acts; target: κ, the fraction
    of the critical lr to land on; recovery: steps over which an lr factor returns to 1."""

    def __init__(self, mode: str, ratio: float, target: float, recovery: int):
        self.mode, self.ratio, self.target, self.recovery = mode, ratio, target, recovery
        self.actions = 0
        # lr mode: the factor set at `fired` (1.0: none), and the group it holds for (None: all).
        self.lr_start, self.fired, self.lr_group = 1.0, 0, None

    def decide(self, step: int, task: TaskMeasurement, modules: Mapping[str, TaskMeasurement]) -> GuardAction | None:
        ratio = ratio_of(task)
        if ratio is None or ratio <= self.ratio:
            return None
        group = None
        ranked = ranked_modules(dict(modules))
        if ranked and ranked[0][1] > self.ratio:
            group, ratio = ranked[0]
        factor = self.target / ratio
        if factor >= 1.0:  # already below the target (guard_ratio under guard_target): nothing to do
            return None
        if self.mode == "lr":
            # The reading is of the lr in force: the factor for the scheduled lr is the product.
            in_force, in_group = self.lr_factor(step)
            factor = max(MIN_LR_FACTOR, factor * (in_force if in_group == group else 1.0))
            upcoming, upcoming_group = self.lr_factor(step + 1)
            if upcoming_group == group:
                factor = min(factor, upcoming)  # never raised by a new crossing; its recovery restarts
            self.lr_start, self.fired, self.lr_group = factor, step, group
        self.actions += 1
        return GuardAction(self.mode, factor, ratio, group)

    def lr_factor(self, step: int) -> tuple[float, str | None]:
        """(the factor for the lr of optimizer step `step`, the group it applies to; None: all)."""
        if self.lr_start == 1.0 or step <= self.fired:
            return 1.0, None
        left = 1.0 - (step - self.fired) / self.recovery
        if left <= 0.0:
            return 1.0, None
        return self.lr_start ** left, self.lr_group

    def state_dict(self) -> dict[str, Any]:
        return {"actions": self.actions, "lr_start": self.lr_start, "fired": self.fired, "lr_group": self.lr_group}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        actions, start, fired, group = (state.get(k) for k in ("actions", "lr_start", "fired", "lr_group"))
        if not (isinstance(actions, int) and actions >= 0 and isinstance(start, float) and 0.0 < start <= 1.0
                and isinstance(fired, int) and fired >= 0 and (group is None or isinstance(group, str))):
            raise ValueError(f"critical sharpness: bad guard state {dict(state)!r:.120}; allowed: actions and fired "
                             "integers >= 0, lr_start in (0, 1], lr_group a group name or null")
        self.actions, self.lr_start, self.fired, self.lr_group = actions, start, fired, group


def interval_policy(config) -> FixedInterval | AdaptiveInterval:
    if config.budget is None:
        return FixedInterval(config.interval)
    return AdaptiveInterval(config.interval, config.budget, config.warn_ratio)


def guard_policy(config) -> Guard | None:
    if config.guard == "off":
        return None
    return Guard(config.guard, config.guard_ratio, config.guard_target, config.guard_recovery)


@contextlib.contextmanager
def lr_scaled(param_groups: Sequence[dict], factor: float) -> Iterator[None]:
    """The optimizer's param groups with their lr × factor for one optimizer step, then each lr
    exactly as it was: whichever scheduler sets the lr (Megatron's, DeepSpeed's, torch's) keeps its
    own schedule, and the guard's factor applies on top of it. factor 1 touches nothing."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in param_groups]
    for group, lr in zip(param_groups, saved):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(param_groups, saved):
            group["lr"] = lr
