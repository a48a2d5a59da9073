"""Instability detectors compared with the probe's warning, on the same training traces, and how
they are scored.

A trace holds per step the training loss, the gradient norm (before clipping), the update ratio
‖θ_{t+1} − θ_t‖/‖θ_t‖ and, at measured steps, the probe's reading. Each detector maps a trace and a
threshold to the steps at which it alarms; sweeping the threshold traces its recall against false
alarms. Written from the descriptions of the methods, not from their code:

- ZClip (Kumar et al. 2025, arXiv 2504.02507): an EMA of the gradient norm's mean and variance
  (α = 0.97) after a warm-up of 25 steps that seeds them with the plain mean and variance; a step
  whose norm lies more than z_thres standard deviations above the mean is a spike (and is clipped to
  mean + z_thres·std, which also enters the EMA in place of the raw norm).
- Megatron-LM's spiky loss (rerun_state_machine.is_unexpectedly_large): the largest |loss| of the
  first 100 steps, a loss at or above `threshold` × it is flagged.
- A loss z-score: the same EMA statistics as ZClip on the loss.
- The update-norm ratio ‖Δθ‖/‖θ‖: the same EMA z-score on it.
- Ours: lr/critical lr above a threshold (an ascent counts as infinite, an unresolved reading by
  its lower bound), "step raised loss", both (the live warning), and a trend test (the reading at
  least `jump` × the median of the previous three and above a floor), and ZClip's z-score on the
  logarithm of our readings (a level relative to the run's own recent readings).

Scoring. Spikes are spikes.detect_spikes of the training loss (the `summary` definition). A spike
is caught when an alarm falls in the HORIZON steps before its first step (strictly before: an
alarm at the spike itself is no warning); its lead is the spike step minus the earliest such alarm.
Calm steps are the steps of the calm twins outside [spike − HORIZON, spike peak + RECOVERY] of their
own spikes (a small batch can spike without a cause); an alarm at a calm step is a false alarm. An
alarm in a provoked run that no spike follows within HORIZON is counted apart ("unconfirmed"): a
provoked run can sit at the edge for hundreds of steps, spiking now and then.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from megatron_sharpness.spikes import Spike, detect_spikes

HORIZON = 50
RECOVERY = 30
EMA_ALPHA = 0.97
EMA_WARMUP = 25
MEGATRON_SAMPLES = 100


class ZScore:
    """ZClip's running statistics: plain mean/variance over the first EMA_WARMUP values, then an
    EMA of both. update() returns the z-score of the value against the statistics before it, and
    takes the value clipped to mean + clip·std into the EMA where clip is given (ZClip's rule)."""

    def __init__(self, alpha: float = EMA_ALPHA, warmup: int = EMA_WARMUP):
        self.alpha, self.warmup = alpha, warmup
        self.seen: list[float] = []
        self.mean = self.var = 0.0

    def ready(self) -> bool:
        return len(self.seen) >= self.warmup

    def score(self, value: float) -> float:
        if not self.ready() or not math.isfinite(value):
            return math.inf if self.ready() else 0.0
        return (value - self.mean) / max(math.sqrt(self.var), 1e-12)

    def bound(self, z: float) -> float:
        return self.mean + z * math.sqrt(self.var)

    def update(self, value: float, clip: float | None = None) -> float:
        z = self.score(value)
        if not self.ready():
            if math.isfinite(value):
                self.seen.append(value)
            if self.ready():
                self.mean, self.var = statistics.fmean(self.seen), statistics.pvariance(self.seen)
            return z
        if not math.isfinite(value):
            return z
        if clip is not None and z > clip:
            value = self.bound(clip)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2
        return z


def zscore_alarms(values: Sequence[float], threshold: float) -> list[int]:
    """1-based steps whose value's z-score exceeds threshold (ZClip's detector, clipping the EMA)."""
    stats, alarms = ZScore(), []
    for step, value in enumerate(values, 1):
        if stats.update(value, clip=threshold) > threshold:
            alarms.append(step)
    return alarms


def megatron_spiky_alarms(losses: Sequence[float], threshold: float) -> list[int]:
    largest, alarms = 0.0, []
    for step, loss in enumerate(losses, 1):
        if not math.isfinite(loss):
            continue  # Megatron checks NaN/inf separately
        if step <= MEGATRON_SAMPLES:
            largest = max(largest, abs(loss))
        elif abs(loss) >= threshold * largest:
            alarms.append(step)
    return alarms


def reading(measurement: Mapping[str, Any]) -> float | None:
    ratio = measurement["ratio"]
    return math.inf if ratio == "inf" else ratio


def ours_alarms(trace: Mapping[str, Any], threshold: float, raised: bool = True, ratio: bool = True) -> list[int]:
    alarms = []
    for m in trace["measurements"]:
        value = reading(m)
        if (ratio and value is not None and value > threshold) or (raised and m["raised"]):
            alarms.append(m["step"])
    return alarms


def trend_alarms(trace: Mapping[str, Any], jump: float, floor: float = 0.1) -> list[int]:
    """A reading above floor that is at least `jump` × the median of the three readings before it
    (an ascent always counts): the edge approaching fast, wherever it starts from."""
    history: list[float] = []
    alarms = []
    for m in trace["measurements"]:
        value = reading(m)
        if value is None:
            continue
        if value > floor and (math.isinf(value) or (len(history) >= 3 and value >= jump * statistics.median(history[-3:]))):
            alarms.append(m["step"])
        history.append(value if math.isfinite(value) else 1e6)
    return alarms


def reading_zscore_alarms(trace: Mapping[str, Any], threshold: float) -> list[int]:
    """ZClip's statistic on our own readings: the z-score of log(lr/critical lr) against an EMA of
    the earlier measurements (α = 0.9, seeded by the first 5); an ascent always alarms."""
    stats, alarms = ZScore(alpha=0.9, warmup=5), []
    for m in trace["measurements"]:
        value = reading(m)
        if value is None or value <= 0.0:
            continue
        if math.isinf(value):
            alarms.append(m["step"])
            continue
        if stats.update(math.log(value), clip=threshold) > threshold:
            alarms.append(m["step"])
    return alarms


@dataclass(frozen=True)
class Detector:
    name: str
    thresholds: tuple[float, ...]
    default: float
    alarms: Callable[[Mapping[str, Any], float], list[int]]
    cost_key: str  # which of the trace's timings the detector needs


DETECTORS = (
    Detector("ours: lr/critical lr or raised loss", (0.25, 0.35, 0.5, 0.75, 1.0, 2.0, 4.0), 0.5,
             lambda t, x: ours_alarms(t, x), "probe"),
    Detector("ours: lr/critical lr", (0.1, 0.25, 0.35, 0.5, 0.75, 1.0, 2.0, 4.0), 0.5,
             lambda t, x: ours_alarms(t, x, raised=False), "probe"),
    Detector("ours: trend", (1.5, 2.0, 3.0, 5.0, 10.0), 3.0, lambda t, x: trend_alarms(t, x), "probe"),
    Detector("ours: reading z-score", (1.5, 2.0, 2.5, 3.0, 4.0, 6.0), 3.0, reading_zscore_alarms, "probe"),
    Detector("grad-norm z-score (ZClip)", (1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 10.0), 2.5,
             lambda t, x: zscore_alarms(t["grad_norm"], x), "grad_norm"),
    Detector("loss z-score", (1.5, 2.0, 2.5, 3.0, 4.0, 6.0), 3.0, lambda t, x: zscore_alarms(t["loss"], x), "none"),
    Detector("Megatron spiky loss", (1.2, 1.5, 2.0, 10.0), 10.0, lambda t, x: megatron_spiky_alarms(t["loss"], x), "none"),
    Detector("update ratio z-score", (1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0), 3.0,
             lambda t, x: zscore_alarms(t["update_ratio"], x), "update_ratio"),
)


def spikes_of(trace: Mapping[str, Any]) -> list[Spike]:
    return detect_spikes(dict(enumerate(trace["loss"], 1)))


@dataclass
class Score:
    spikes: int = 0
    caught: int = 0
    caught_2: int = 0      # caught at least 2 steps ahead
    leads: list[int] | None = None
    false_alarms: int = 0
    calm_steps: int = 0
    unconfirmed: int = 0     # alarms in provoked runs that no spike followed
    provoked_steps: int = 0

    @property
    def recall(self) -> float:
        return self.caught / self.spikes if self.spikes else math.nan

    @property
    def recall_2(self) -> float:
        return self.caught_2 / self.spikes if self.spikes else math.nan

    @property
    def false_per_1000(self) -> float:
        return 1000.0 * self.false_alarms / self.calm_steps if self.calm_steps else math.nan

    @property
    def unconfirmed_per_1000(self) -> float:
        return 1000.0 * self.unconfirmed / self.provoked_steps if self.provoked_steps else math.nan

    @property
    def median_lead(self) -> float:
        return statistics.median(self.leads) if self.leads else math.nan

    def add(self, other: Score) -> None:
        self.spikes += other.spikes
        self.caught += other.caught
        self.caught_2 += other.caught_2
        self.leads = (self.leads or []) + (other.leads or [])
        self.false_alarms += other.false_alarms
        self.calm_steps += other.calm_steps
        self.unconfirmed += other.unconfirmed
        self.provoked_steps += other.provoked_steps


def score(trace: Mapping[str, Any], alarms: Iterable[int], spikes: Sequence[Spike] | None = None) -> Score:
    """A trace without a "variant" counts as a calm twin."""
    steps = len(trace["loss"])
    spikes = spikes_of(trace) if spikes is None else spikes
    alarms = sorted(set(alarms))
    result = Score(spikes=len(spikes), leads=[])
    excluded = set()
    for spike in spikes:
        ahead = [a for a in alarms if spike.step - HORIZON <= a < spike.step]
        if ahead:
            lead = spike.step - ahead[0]
            result.caught += 1
            result.caught_2 += lead >= 2
            result.leads.append(lead)
        excluded.update(range(spike.step - HORIZON, spike.peak_step + RECOVERY + 1))
    outside = {step for step in range(1, steps + 1) if step not in excluded}
    if trace.get("variant", "calm") == "calm":
        result.calm_steps = len(outside)
        result.false_alarms = sum(1 for a in alarms if a in outside)
    else:
        result.provoked_steps = steps
        result.unconfirmed = sum(1 for a in alarms if not any(0 < s.step - a <= HORIZON for s in spikes))
    return result
