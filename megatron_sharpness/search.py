"""The paper's line search for the critical learning rate (Kalra et al. 2026, appendix A).

Pure Python: it knows nothing of torch, ranks or frameworks. The search runs over the step multiple
s (the trial learning rate is η = s·η_t, so s = 1 is the step the optimizer really took) and only
needs a callable that returns the loss at s. Every rank of a distributed job must feed it the same
floats, so that every rank takes the same branches and issues the same collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

DEFAULT_TOL = 1.0 / 16
DEFAULT_MAX_SEARCH = 40


@dataclass(frozen=True)
class SearchResult:
    """Outcome of one search, in learning-rate units unless the name says step multiple.

    When the exponential phase hits its cap the critical lr is unknown: `converged` is False,
    `critical_lr` is None and `bracket` holds the bound that is known, with None for the open end
    (the loss never rose) or 0.0 as the lower end (the loss rose at every trial point, or at every
    one whose loss differed from the baseline at all).
    """

    lr: float
    baseline_loss: float
    critical_step_multiple: float | None
    bracket_step_multiple: tuple[float, float | None]
    converged: bool
    evaluations: tuple[tuple[float, float], ...]

    @property
    def critical_lr(self) -> float | None:
        if self.critical_step_multiple is None:
            return None
        return self.critical_step_multiple * self.lr

    @property
    def critical_sharpness(self) -> float | None:
        critical_lr = self.critical_lr
        return None if critical_lr is None else 2.0 / critical_lr

    @property
    def bracket(self) -> tuple[float, float | None]:
        lo, hi = self.bracket_step_multiple
        return lo * self.lr, None if hi is None else hi * self.lr

    @property
    def forwards(self) -> int:
        return len(self.evaluations)


def loss_rose(loss: float, baseline: float) -> bool:
    """A non-finite loss counts as a rise: a diverged trial point is past the critical lr."""
    return not math.isfinite(loss) or loss > baseline


def critical_lr_search(
    loss_at: Callable[[float], float],
    baseline_loss: float,
    lr: float = 1.0,
    initial_step_multiple: float = 1.0,
    tol: float = DEFAULT_TOL,
    max_search: int = DEFAULT_MAX_SEARCH,
) -> SearchResult:
    """Smallest step multiple s at which loss_at(s) exceeds baseline_loss, to relative tolerance tol.

    Exponential phase from initial_step_multiple (×2 while the loss falls, ÷2 while it rises, at most
    max_search evaluations) until a bracket [lo, 2·lo] is found, then bisection until
    1 − lo/hi ≤ tol; the result is the midpoint of the final bracket.
    """
    if not math.isfinite(baseline_loss):
        raise ValueError(f"baseline_loss must be finite, got {baseline_loss}")
    if not (math.isfinite(initial_step_multiple) and initial_step_multiple > 0):
        raise ValueError(f"initial_step_multiple must be a finite number > 0, got {initial_step_multiple}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    if max_search < 1:
        raise ValueError(f"max_search must be >= 1, got {max_search}")

    evaluations: list[tuple[float, float]] = []

    def rises(step_multiple: float) -> bool:
        loss = float(loss_at(step_multiple))
        evaluations.append((step_multiple, loss))
        return loss_rose(loss, baseline_loss)

    def result(critical: float | None, lo: float, hi: float | None, converged: bool) -> SearchResult:
        return SearchResult(lr, baseline_loss, critical, (lo, hi), converged, tuple(evaluations))

    step_multiple = initial_step_multiple
    lo: float | None
    hi: float | None
    if rises(step_multiple):
        lo, hi = None, step_multiple
        while lo is None and len(evaluations) < max_search:
            step_multiple /= 2
            if rises(step_multiple):
                hi = step_multiple
            elif evaluations[-1][1] == baseline_loss:
                # The trial point is below the loss's resolution (in fp32/bf16 the lerp rounds back
                # to θ_t): "no rise" here says nothing about η_c. The loss rose at every point that
                # could be told apart from θ_t, so the step goes uphill on this batch.
                break
            else:
                lo = step_multiple
        if lo is None:
            return result(None, 0.0, hi, converged=False)
    else:
        lo, hi = step_multiple, None
        while hi is None and len(evaluations) < max_search:
            step_multiple *= 2
            if rises(step_multiple):
                hi = step_multiple
            else:
                lo = step_multiple
        if hi is None:
            return result(None, lo, None, converged=False)

    while 1.0 - lo / hi > tol:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # float resolution reached before tol: the bracket cannot shrink
            break
        if rises(mid):
            hi = mid
        else:
            lo = mid
    return result(0.5 * (lo + hi), lo, hi, converged=True)
