"""Loss spikes in a training log: an iteration whose loss jumps well above the recent trend.

The trend at iteration t is a robust straight line through the losses of the WINDOW iterations
before it (Theil-Sen: the median of the pairwise slopes, the median intercept), extrapolated to t;
its spread is the median absolute residual of that window (× 1.4826, a standard deviation for
Gaussian noise). A line follows a falling loss, where a plain median would lag behind it and
widen the spread; medians keep an earlier spike inside the window from moving either much. A
spike is a loss more than THRESHOLD spreads above the trend; the spread is floored at REL_FLOOR of
the trend (a spike is a jump of at least 12% of the loss), so that a quiet stretch of 20 small
batches, whose residuals happen to understate the batch noise, does not turn a common bump into a
spike, and a plateau of near-identical losses does not turn rounding into spikes.
Consecutive iterations above the threshold are one spike (its first iteration, and its peak).

THRESHOLD 6: under Gaussian noise a 6-spread excursion is about one in 10^9 iterations; the
provoked spike of the CPU demo stands 19 spreads above its trend, its unprovoked twin's largest
bump 4.9 (tests/test_spikes.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

WINDOW = 20
THRESHOLD = 6.0
MIN_HISTORY = 8
REL_FLOOR = 0.02


@dataclass(frozen=True)
class Spike:
    step: int          # first iteration above the threshold
    loss: float
    trend: float       # median of the window before it
    spread: float      # robust standard deviation of that window (floored)
    peak_step: int
    peak_loss: float

    @property
    def sigmas(self) -> float:
        return (self.loss - self.trend) / self.spread


def excursions(losses: Mapping[int, float], window: int = WINDOW, min_history: int = MIN_HISTORY,
               rel_floor: float = REL_FLOOR) -> dict[int, tuple[float, float]]:
    """iteration -> (trend, floored spread) for every iteration with min_history finite losses in
    the `window` logged iterations before it (gaps allowed)."""
    steps = sorted(losses)
    result = {}
    for index, step in enumerate(steps):
        history = [(s, losses[s]) for s in steps[max(0, index - window):index] if _finite(losses[s])]
        if len(history) >= min_history:
            trend, spread = _trend(history, step)
            result[step] = trend, max(spread, rel_floor * abs(trend), 1e-12)
    return result


def detect_spikes(losses: Mapping[int, float], window: int = WINDOW, threshold: float = THRESHOLD,
                  min_history: int = MIN_HISTORY, rel_floor: float = REL_FLOOR) -> list[Spike]:
    """losses: iteration -> training loss. Non-finite losses count as spikes (a NaN loss is the
    worst one)."""
    spikes: list[Spike] = []
    current: Spike | None = None
    for step, (trend, spread) in excursions(losses, window, min_history, rel_floor).items():
        loss = losses[step]
        if _finite(loss) and loss - trend <= threshold * spread:
            current = None
            continue
        if current is None:
            current = Spike(step, loss, trend, spread, step, loss)
            spikes.append(current)
        elif not _finite(loss) or loss > current.peak_loss:
            current = Spike(current.step, current.loss, current.trend, current.spread, step, loss)
            spikes[-1] = current
    return spikes


def _trend(history: list[tuple[int, float]], step: int) -> tuple[float, float]:
    """Theil-Sen line through history, evaluated at step, and the robust spread of its residuals."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(history) for x2, y2 in history[i + 1:]]
    slope = statistics.median(slopes)
    intercept = statistics.median(y - slope * x for x, y in history)
    spread = 1.4826 * statistics.median(abs(y - intercept - slope * x) for x, y in history)
    return intercept + slope * step, spread


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
