"""Line searches for the critical learning rate (Kalra et al. 2026), with an explicit outcome.

Pure Python: it knows nothing of torch, ranks or frameworks. A search runs over the step multiple
s (the trial learning rate is η = s·η_t, so s = 1 is the step the optimizer really took) and only
needs a callable that returns the loss at s. Every rank of a distributed job must feed it the same
floats, so that every rank takes the same branches and issues the same collectives.

Two placements of trial points certify the same thing, a bracket [lo, hi] with L(lo) ≤ L(θ_t) <
L(hi) and 1 − lo/hi ≤ tol:

- "paper": the paper's appendix A, exponential phase (×2 while the loss falls, ÷2 while it rises)
  from the initial guess, then bisection on the midpoint;
- "fast" (default): the quadratic model. For a quadratic loss q(s) = (L(s) − L(θ_t))/s is linear
  in s and crosses zero at the critical step multiple, so a secant on q through the points at hand
  predicts the crossing; the next point is placed just on the far side of the prediction from a
  bracket end, so that one forward can complete a certified bracket. Log-space bisection takes
  over when the model stops shrinking the bracket.

Both never place a trial point below `resolution_floor`, the step multiple under which the
compute-dtype parameters do not move (there the loss differs from L(θ_t) by rounding alone). Where
the loss rises at every resolvable point, the sign of the slope decides: a symmetric difference
(L(h) − L(−h))/2h, whose curvature term cancels, > 0 is an *ascent* (the update raises this loss at
any small step: no finite η_c); otherwise the crossing lies below the floor (*unresolved*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

DEFAULT_TOL = 1.0 / 16
DEFAULT_MAX_SEARCH = 40
SEARCH_METHODS = ("fast", "paper")

# The fast search aims for brackets this fraction of tol wide, so that a model error of a few
# percent still certifies.
_AIM = 0.75
# Cap on how far the model may extrapolate upwards from the largest point in one evaluation.
_MAX_GROWTH = 64.0


class Outcome(str, Enum):
    """How a search ended. Only CONVERGED carries a critical lr."""

    CONVERGED = "converged"    # bracket certified: L(lo) ≤ L(θ_t) < L(hi), 1 − lo/hi ≤ tol
    ASCENT = "ascent"          # slope > 0: the update raises this loss at any small step
    UNRESOLVED = "unresolved"  # rose already at the resolution floor, slope not positive: η_c < hi
    CAPPED = "capped"          # never rose within max_search evaluations: η_c > lo
    NON_FINITE = "non_finite"  # a non-finite loss that did not repeat: a fault, not divergence


@dataclass(frozen=True)
class SearchResult:
    """Outcome of one search, in learning-rate units unless the name says step multiple.

    bracket_step_multiple (lo, hi) is certified: the loss did not rise at lo (0.0: no such point)
    and rose at hi (None: no such point). slope is dL(θ_t − η·Δθ)/dη at η = 0 in loss per step
    multiple, measured only where the search needed it (None otherwise).
    """

    lr: float
    baseline_loss: float
    outcome: Outcome
    critical_step_multiple: float | None
    bracket_step_multiple: tuple[float, float | None]
    evaluations: tuple[tuple[float, float], ...]
    resolution_floor: float = 0.0
    step_raised_loss: bool | None = None
    slope_per_step_multiple: float | None = None

    @property
    def converged(self) -> bool:
        return self.outcome is Outcome.CONVERGED

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
    def resolution_floor_lr(self) -> float:
        return self.resolution_floor * self.lr

    @property
    def slope(self) -> float | None:
        """dL(θ_t − η·Δθ)/dη at η = 0, in loss per unit of learning rate."""
        if self.slope_per_step_multiple is None:
            return None
        return self.slope_per_step_multiple / self.lr

    @property
    def forwards(self) -> int:
        return len(self.evaluations)

    @property
    def non_finite_at(self) -> float | None:
        """For a NON_FINITE outcome, the lr whose loss was non-finite once and finite again."""
        if self.outcome is not Outcome.NON_FINITE:
            return None
        return next(s for s, loss in self.evaluations if not math.isfinite(loss)) * self.lr

    def sharpness_bound(self) -> tuple[str, float] | None:
        """For a search without a finite λ_c, what is known of λ_c = 2/η_c: ('>', b) or ('<', b)."""
        lo, hi = self.bracket
        if self.outcome is Outcome.UNRESOLVED and hi:
            return ">", 2.0 / hi
        if self.outcome is Outcome.CAPPED and lo > 0:
            return "<", 2.0 / lo
        return None


def loss_rose(loss: float, baseline: float) -> bool:
    """A non-finite loss counts as a rise: a diverged trial point is past the critical lr."""
    return not math.isfinite(loss) or loss > baseline


class _Trials:
    """The losses evaluated so far, each step multiple at most once (s = 1 is shared between the
    step_raised_loss answer and the search)."""

    def __init__(self, loss_at: Callable[[float], float], baseline: float, floor: float):
        self.loss_at, self.baseline, self.floor = loss_at, baseline, floor
        self.losses: dict[float, float] = {}
        self.order: list[tuple[float, float]] = []

    def loss(self, step_multiple: float) -> float:
        if step_multiple not in self.losses:
            loss = self._evaluate(step_multiple)
            if not math.isfinite(loss):
                # Divergence repeats; a fault of the forward (a transient NaN on one rank) does
                # not, and reading it as a rise would report a λ_c made of it.
                again = self._evaluate(step_multiple)
                if math.isfinite(again):
                    raise _TransientNonFinite(step_multiple)
            self.losses[step_multiple] = loss
        return self.losses[step_multiple]

    def _evaluate(self, step_multiple: float) -> float:
        loss = float(self.loss_at(step_multiple))
        self.order.append((step_multiple, loss))
        return loss

    def rises(self, step_multiple: float) -> bool:
        return loss_rose(self.loss(step_multiple), self.baseline)

    def q(self, step_multiple: float) -> float:
        """(L(s) − L(θ_t))/s: linear in s for a quadratic loss, zero at the crossing."""
        loss = self.losses[step_multiple]
        return (loss - self.baseline) / step_multiple if math.isfinite(loss) else math.inf

    def resolvable(self) -> list[float]:
        return sorted(s for s in self.losses if s > 0 and s >= self.floor)

    def bracket(self) -> tuple[float | None, float | None]:
        """(largest no-rise point below hi, smallest rise point), over resolvable points."""
        points = self.resolvable()
        rises = [s for s in points if loss_rose(self.losses[s], self.baseline)]
        hi = rises[0] if rises else None
        below = [s for s in points if (hi is None or s < hi) and s not in rises]
        return (below[-1] if below else None), hi

    def evaluations(self) -> tuple[tuple[float, float], ...]:
        return tuple(self.order)


class _TransientNonFinite(Exception):
    """A non-finite trial loss that a second evaluation of the same point did not repeat."""


def critical_lr_search(
    loss_at: Callable[[float], float],
    baseline_loss: float,
    lr: float = 1.0,
    initial_step_multiple: float = 1.0,
    tol: float = DEFAULT_TOL,
    max_search: int = DEFAULT_MAX_SEARCH,
    resolution_floor: float = 0.0,
    method: str = "fast",
) -> SearchResult:
    """Smallest step multiple s at which loss_at(s) exceeds baseline_loss, to relative tolerance tol.

    L(s = 1) is always evaluated: whether the real step raised the loss is answered exactly.
    max_search caps the evaluations spent before a bracket exists. The reported critical step
    multiple is the midpoint of the final bracket.
    """
    if not math.isfinite(baseline_loss):
        raise ValueError(f"baseline_loss must be finite, got {baseline_loss}")
    if not (math.isfinite(initial_step_multiple) and initial_step_multiple > 0):
        raise ValueError(f"initial_step_multiple must be a finite number > 0, got {initial_step_multiple}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    if max_search < 1:
        raise ValueError(f"max_search must be >= 1, got {max_search}")
    if not (math.isfinite(resolution_floor) and resolution_floor >= 0.0):
        raise ValueError(f"resolution_floor must be a finite number >= 0, got {resolution_floor}")
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {', '.join(SEARCH_METHODS)}, got {method!r}")

    trials = _Trials(loss_at, baseline_loss, resolution_floor)
    search = (_FastSearch if method == "fast" else _PaperSearch)(
        trials, max(initial_step_multiple, resolution_floor), tol, max_search)
    step_raised_loss = None
    try:
        step_raised_loss = trials.rises(1.0)
        outcome = search.run()
    except _TransientNonFinite:
        outcome = Outcome.NON_FINITE
    lo, hi = search.bracket() if outcome is Outcome.CONVERGED else trials.bracket()
    critical = 0.5 * (lo + hi) if outcome is Outcome.CONVERGED else None
    if outcome in (Outcome.ASCENT, Outcome.UNRESOLVED, Outcome.NON_FINITE):
        lo = None  # the loss rose at every resolvable point
    return SearchResult(lr, baseline_loss, outcome, critical, (lo or 0.0, hi), trials.evaluations(),
                        resolution_floor, step_raised_loss, search.slope)


class _Search:
    def __init__(self, trials: _Trials, guess: float, tol: float, max_search: int):
        self.trials, self.guess, self.tol, self.max_search = trials, guess, tol, max_search
        self.slope: float | None = None

    def run(self) -> Outcome:
        raise NotImplementedError

    def bracket(self) -> tuple[float | None, float | None]:
        """The certified bracket of a converged search."""
        return self.trials.bracket()

    def at_floor(self) -> Outcome | None:
        """The loss rose at the lowest point the search wanted: look at the floor itself. None if
        the loss did not rise there (the search goes on with lo = floor)."""
        floor = self.trials.floor
        if floor > 0 and not self.trials.rises(floor):
            return None
        return self.by_slope()

    def by_slope(self) -> Outcome:
        """The loss rose at every resolvable point: an ascent if the slope at θ_t is positive,
        else the crossing lies below what the search could resolve."""
        return Outcome.ASCENT if self.measure_slope() > 0 else Outcome.UNRESOLVED

    def measure_slope(self) -> float:
        """Symmetric difference at ±h, h = max(1, floor): the curvature term cancels, and L(1) is
        at hand already. In loss per step multiple; a non-finite side counts as ascent."""
        if self.slope is None:
            h = max(1.0, self.trials.floor)
            upper, lower = self.trials.loss(h), self.trials.loss(-h)
            self.slope = (upper - lower) / (2 * h) if math.isfinite(upper) and math.isfinite(lower) else math.inf
        return self.slope


class _PaperSearch(_Search):
    """Appendix A: exponential phase from the guess, then bisection on the midpoint. Its own
    bracket is reported, so that L(1), evaluated first for step_raised_loss, changes nothing."""

    def run(self) -> Outcome:
        trials, step_multiple = self.trials, self.guess
        count = 1  # evaluations of the exponential phase, its first point included
        self.lo: float | None
        self.hi: float | None
        if trials.rises(step_multiple):
            self.lo, self.hi = None, step_multiple
            while self.lo is None and count < self.max_search:
                count += 1
                step_multiple /= 2
                if step_multiple < trials.floor:
                    outcome = self.at_floor()
                    if outcome is not None:
                        return outcome
                    self.lo = trials.floor
                elif trials.rises(step_multiple):
                    self.hi = step_multiple
                else:
                    self.lo = step_multiple
            if self.lo is None:
                return self.by_slope()
        else:
            self.lo, self.hi = step_multiple, None
            while self.hi is None and count < self.max_search:
                count += 1
                step_multiple *= 2
                if trials.rises(step_multiple):
                    self.hi = step_multiple
                else:
                    self.lo = step_multiple
            if self.hi is None:
                return Outcome.CAPPED
        while 1.0 - self.lo / self.hi > self.tol:
            mid = 0.5 * (self.lo + self.hi)
            if not self.lo < mid < self.hi:  # float resolution reached before tol
                break
            if trials.rises(mid):
                self.hi = mid
            else:
                self.lo = mid
        return Outcome.CONVERGED

    def bracket(self) -> tuple[float | None, float | None]:
        return self.lo, self.hi


class _FastSearch(_Search):
    """Steps toward the predicted crossing from the nearer side, then completes a bracket.

    Far from the crossing (no bracket yet, or a bracket wider than ×4) the search walks from the
    end nearest the guess: aim at the guess, or extrapolate q's crossing from the two nearest
    points of that side. Each point that misses (no rise when one was predicted, or the other way
    round) escalates the least step, so a loss far from quadratic costs little more than doubling
    would. Inside
    a narrow bracket the secant on q through its ends places the next point just on the far side
    of the predicted crossing from one end, so that one forward can certify; log-space bisection
    takes over when the bracket stops shrinking.
    """

    def run(self) -> Outcome:
        trials = self.trials
        aim = _AIM * self.tol
        widths: list[float] = []
        misses_up = misses_down = 0

        def least_factor(misses: int) -> float:
            # 1, then ~1.15, ~1.5, ~3.7, ~50 at tol = 1/16: a gallop that escalates per miss
            return (1.0 / (1.0 - aim)) ** (3 ** misses) if misses else 1.0

        while True:
            lo, hi = trials.bracket()
            if lo is not None and hi is not None and 1.0 - lo / hi <= self.tol:
                return Outcome.CONVERGED
            if lo is None or hi is None:
                if len(trials.losses) >= self.max_search:
                    return Outcome.CAPPED if hi is None else self.by_slope()
            if lo is not None and hi is not None and hi / lo <= 4.0:
                widths.append(math.log(hi / lo))
                following = self._inside(lo, hi, aim, widths)
                if not lo < following < hi:  # float resolution reached before tol
                    return Outcome.CONVERGED
                trials.loss(following)
            elif hi is None or (lo is not None and abs(math.log(lo / self.guess)) < abs(math.log(hi / self.guess))):
                following = self._upwards(lo, hi, aim, least_factor(misses_up))
                misses_up += not trials.rises(following)
            else:
                following = self._downwards(lo, hi, aim, least_factor(misses_down))
                if isinstance(following, Outcome):
                    return following
                misses_down += trials.rises(following)

    def _inside(self, lo: float, hi: float, aim: float, widths: list[float]) -> float:
        """Next point inside a narrow bracket: next to the secant's crossing, on the side that
        completes a certified bracket with an existing end; log-space bisection when the model
        stalls (the bracket did not halve over two points) or has no finite secant."""
        if len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]:
            return math.sqrt(lo * hi)
        q_lo, q_hi = self.trials.q(lo), self.trials.q(hi)
        if not math.isfinite(q_hi) or q_hi <= q_lo:
            return math.sqrt(lo * hi)
        crossing = lo + (hi - lo) * (-q_lo) / (q_hi - q_lo)
        completes_with_lo = lo / (1.0 - aim)   # a rise here certifies [lo, it]
        completes_with_hi = hi * (1.0 - aim)   # no rise here certifies [it, hi]
        if crossing < completes_with_lo < hi:
            return completes_with_lo
        if lo < completes_with_hi < crossing:
            return completes_with_hi
        # Neither end is close: land just below the crossing, so that the next point pairs with it.
        return min(max(crossing * (1.0 - 0.5 * aim), lo * (hi / lo) ** 0.05), lo * (hi / lo) ** 0.95)

    def _upwards(self, lo: float | None, hi: float | None, aim: float, least_growth: float) -> float:
        """From the largest point without a rise (lo): aim at the guess, or extrapolate q's
        crossing from the two largest such points; else double. At least least_growth × lo,
        inside the bracket if there is one."""
        if lo is None:
            return self.guess
        falls = [s for s in self.trials.resolvable() if s <= lo]
        target = None
        if self.guess > lo and len(falls) == 1:
            target = self.guess
        elif len(falls) >= 2:
            q_lo, q_below = self.trials.q(lo), self.trials.q(falls[-2])
            if q_lo > q_below:
                target = min(lo + (lo - falls[-2]) * (-q_lo) / (q_lo - q_below), _MAX_GROWTH * lo)
        following = 2.0 * lo if target is None else max(target * (1.0 + 0.5 * aim), lo / (1.0 - aim))
        following = max(following, least_growth * lo)
        return following if hi is None or following < hi else math.sqrt(lo * hi)

    def _downwards(self, lo: float | None, hi: float, aim: float, least_shrink: float) -> float | Outcome:
        """From the smallest rise (hi): aim at the guess, or extrapolate q's crossing from the two
        smallest rises; else halve. At most hi / least_shrink, never below the floor (where the
        slope decides), inside the bracket if there is one."""
        trials = self.trials
        floor = trials.floor
        if lo is None and floor > 0 and hi == floor:
            return self.at_floor()
        rises = [s for s in trials.resolvable() if s >= hi and loss_rose(trials.losses[s], trials.baseline)]
        target: float | None = None
        if self.guess < hi and len(rises) == 1:
            target = self.guess
        elif len(rises) >= 2:
            q_hi, q_next = trials.q(rises[0]), trials.q(rises[1])
            if math.isfinite(q_next) and q_next > q_hi:
                target = rises[0] - q_hi * (rises[1] - rises[0]) / (q_next - q_hi)
                if target <= 0:
                    target = None
                    # q heads for a positive value at s = 0: likely an ascent. Measuring the slope
                    # costs one forward; walking down to the floor first would cost more.
                    if lo is None and self.by_slope() is Outcome.ASCENT:
                        return Outcome.ASCENT
        following = 0.5 * hi if target is None else min(target * (1.0 - 0.5 * aim), hi * (1.0 - aim))
        following = min(following, hi / least_shrink)
        if lo is not None:
            return following if following > lo else math.sqrt(lo * hi)
        return max(following, floor)
