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
  in s and crosses zero at the critical step multiple, so a secant on q (a parabola through three
  points where it has them) predicts the crossing; each point is placed either a third of a tolerance
  short of the prediction or one tolerance from a bracket end, so that a right model certifies with
  the next forward. Typical: s = 1, the warm start, two points. Arithmetic bisection takes over
  where the model misses twice in a row.

Both never place a trial point below `resolution_floor`, the step multiple under which the
compute-dtype parameters do not move (there the loss differs from L(θ_t) by rounding alone). Where
the loss rises at every resolvable point, the sign of the slope decides: a symmetric difference
(L(h) − L(−h))/2h, whose curvature term cancels, > 0 is an *ascent* (the update raises this loss at
any small step: no finite η_c); otherwise the crossing lies below the floor (*unresolved*).

`loss_noise` ν is how far rounding alone can move the loss of a trial point (the loss change when
every parameter the step changed moves one compute-dtype ulp; 0 for exact losses). No outcome rests
on a smaller difference: a bracket counts only where ν moves its crossing by less than half a
tolerance (else *noisy*, or *unresolved* where the loss never fell by more than ν), an ascent only
where L(h) − L(−h) exceeds 1.5·ν, a bound only where its rise exceeds ν.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

DEFAULT_TOL = 1.0 / 16
DEFAULT_MAX_SEARCH = 40
SEARCH_METHODS = ("fast", "paper")

# The fast search pairs a point with a bracket end at this fraction of tol (a margin for rounding),
# and tries the pair only where the model puts the crossing this fraction of tol from that end;
# otherwise it aims this fraction of tol short of the crossing. Tuned on 400 searches of a
# training run (fp32, every step, warm starts five steps old): 5.75 forwards on average.
_PAIR = 0.9
_WINDOW = 0.75
_AIM = 0.3
# Cap on how far the model may extrapolate upwards from the largest point in one evaluation.
_MAX_GROWTH = 64.0
# A certified bracket whose slope across it is off its neighbourhood's trend by more than this
# factor was placed by the loss's rounding (see _bracket_slope_ratio).
TRUSTED_SLOPE_RATIO = (1.0 / 3.0, 3.0)
# A loss difference counts as real where it exceeds these multiples of the loss noise ν. ν is about
# twice the spread of the difference of two trial losses (measured: the rms loss change of a
# one-ulp move is 2.8× the spread of one trial loss's rounding error around the fp64 loss), so an
# ascent needs three spreads of L(h) − L(−h), and a crossing may move by ν/slope ≤ tol/2.
_ASCENT_NOISE = 1.5
_CROSSING_NOISE = 0.5


class Outcome(str, Enum):
    """How a search ended. Only CONVERGED carries a critical lr."""

    CONVERGED = "converged"    # bracket certified: L(lo) ≤ L(θ_t) < L(hi), 1 − lo/hi ≤ tol
    ASCENT = "ascent"          # slope > 0: the update raises this loss at any small step
    UNRESOLVED = "unresolved"  # rose already at the resolution floor, slope not positive: η_c < hi
    CAPPED = "capped"          # never rose within max_search evaluations: η_c > lo
    NON_FINITE = "non_finite"  # a non-finite loss that did not repeat: a fault, not divergence
    NOISY = "noisy"            # bracket certified, but the loss's rounding, not its trend, placed it


@dataclass(frozen=True)
class SearchResult:
    """Outcome of one search, in learning-rate units unless the name says step multiple.

    bracket_step_multiple (lo, hi) is certified: the loss did not rise at lo (0.0: no such point)
    and rose at hi (None: no such point). slope is dL(θ_t − η·Δθ)/dη at η = 0 in loss per step
    multiple, measured only where the search needed it (None otherwise). bracket_slope_ratio: the
    loss's slope across a certified bracket over its trend's slope there (~1 where curvature placed
    the crossing; outside 1/3…3 the outcome is NOISY); None where too few points were near.
    loss_noise: the ν the search was given. crossing_uncertainty: for a certified bracket, how far
    ν moves the crossing, relative to it (ν / (slope there × crossing)); above tol/2 the outcome is
    NOISY or UNRESOLVED. slope_hint: the gradient's gᵀΔθ the search was given (per step multiple).
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
    bracket_slope_ratio: float | None = None
    loss_noise: float = 0.0
    crossing_uncertainty: float | None = None
    slope_hint: float | None = None

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
    def gradient_slope(self) -> float | None:
        """The gradient's dL(θ_t − η·Δθ)/dη at η = 0, in loss per unit of learning rate, where given."""
        return None if self.slope_hint is None else self.slope_hint / self.lr

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
    def step_raised_loss_beyond_noise(self) -> bool:
        """The real step raised the loss by more than the loss noise: a rise rounding cannot make."""
        if not self.step_raised_loss:
            return False
        loss = next(loss for s, loss in self.evaluations if s == 1.0)
        return not math.isfinite(loss) or loss - self.baseline_loss > self.loss_noise

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

    def __init__(self, loss_at: Callable[[float], float], baseline: float, floor: float, noise: float,
                 slope_hint: float | None):
        self.loss_at, self.baseline, self.floor, self.noise = loss_at, baseline, floor, noise
        self.slope_hint = slope_hint
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
        """(L(s) − L(θ_t))/s: linear in s for a quadratic loss, zero at the crossing; at s = 0 the
        slope, where a hint gives it."""
        if step_multiple == 0.0:
            assert self.slope_hint is not None
            return self.slope_hint
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

    def rise_beyond_noise(self, step_multiple: float) -> bool:
        loss = self.losses[step_multiple]
        return not math.isfinite(loss) or loss - self.baseline > self.noise

    def fell_beyond_noise(self, below: float) -> bool:
        """Whether the loss fell by more than the noise at some resolvable point up to `below`."""
        return any(self.baseline - self.losses[s] > self.noise for s in self.resolvable() if s <= below)


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
    loss_noise: float = 0.0,
    slope_hint: float | None = None,
) -> SearchResult:
    """Smallest step multiple s at which loss_at(s) exceeds baseline_loss, to relative tolerance tol.

    L(s = 1) is always evaluated: whether the real step raised the loss is answered exactly.
    max_search caps the evaluations spent before a bracket exists. The reported critical step
    multiple is the midpoint of the final bracket. loss_noise: see the module's docstring.
    slope_hint: dL/ds at s = 0 where the step's gradient gives it (gᵀΔθ), a prior that places the
    fast search's points; no outcome rests on it.
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
    if not (math.isfinite(loss_noise) and loss_noise >= 0.0):
        raise ValueError(f"loss_noise must be a finite number >= 0, got {loss_noise}")

    if slope_hint is not None and not math.isfinite(slope_hint):
        slope_hint = None
    trials = _Trials(loss_at, baseline_loss, resolution_floor, loss_noise, slope_hint)
    search = (_FastSearch if method == "fast" else _PaperSearch)(
        trials, max(initial_step_multiple, resolution_floor), tol, max_search)
    step_raised_loss = None
    try:
        step_raised_loss = trials.rises(1.0)
        outcome = search.run()
    except _TransientNonFinite:
        outcome = Outcome.NON_FINITE
    lo, hi = search.bracket() if outcome is Outcome.CONVERGED else trials.bracket()
    slope_ratio = uncertainty = None
    if outcome is Outcome.CONVERGED:
        slope_ratio = _bracket_slope_ratio(trials, lo, hi)
        uncertainty = _crossing_uncertainty(trials, lo, hi, slope_ratio)
        if slope_ratio is not None and not TRUSTED_SLOPE_RATIO[0] <= slope_ratio <= TRUSTED_SLOPE_RATIO[1]:
            outcome = Outcome.NOISY
        elif uncertainty > _CROSSING_NOISE * tol:
            # Where the loss never fell by more than the noise either, it did not resolve the
            # update at all (a step that moved a few elements): nothing is known of the crossing.
            outcome = Outcome.NOISY if trials.fell_beyond_noise(lo) else Outcome.UNRESOLVED
    critical = 0.5 * (lo + hi) if outcome is Outcome.CONVERGED else None
    if outcome in (Outcome.ASCENT, Outcome.UNRESOLVED, Outcome.NON_FINITE):
        lo = None  # the loss rose at every resolvable point, or by no more than its noise
    if outcome is Outcome.UNRESOLVED and hi is not None and not trials.rise_beyond_noise(hi):
        hi = None  # a rise within the noise bounds nothing
    return SearchResult(lr, baseline_loss, outcome, critical, (lo or 0.0, hi), trials.evaluations(),
                        resolution_floor, step_raised_loss, search.slope, slope_ratio, loss_noise, uncertainty,
                        slope_hint)


def _crossing_uncertainty(trials: _Trials, lo: float, hi: float, slope_ratio: float | None) -> float:
    """How far the loss noise moves the crossing, relative to it: ν over the loss's slope there
    times the crossing. The slope is the lesser of the slope across the bracket and its trend's
    (the bracket's own slope is as noisy as its two ends)."""
    if trials.noise == 0.0:
        return 0.0
    if lo <= 0 or not math.isfinite(trials.losses[hi]):
        return math.inf if lo <= 0 else 0.0  # no fall to measure a slope from / a diverged end
    slope = (trials.losses[hi] - trials.losses[lo]) / (hi - lo)
    if slope_ratio is not None and slope_ratio > 1.0:
        slope /= slope_ratio
    return trials.noise / (slope * 0.5 * (lo + hi)) if slope > 0 else math.inf


def _bracket_slope_ratio(trials: _Trials, lo: float, hi: float) -> float | None:
    """The slope of the loss across the bracket over the slope that the loss's trend has there.

    The trend is the quadratic L(θ_t) + a·s + b·s² through the two other points nearest the
    bracket (within ×4 of it, where the loss is close to quadratic). Rounding of a low-precision
    loss adds a jagged term that a bracket one tolerance wide sees as a steep slope of either sign,
    while the trend over the wider span averages it out: measured on smooth losses (fp32 training,
    quartics) the ratio stays within 0.5–2, on bf16 crossings decided by rounding it is far off.
    None where fewer than two such points exist (no forwards are spent on it)."""
    if lo <= 0 or not math.isfinite(trials.losses[hi]):
        return None
    near = [s for s in trials.losses if s not in (0.0, lo, hi) and (s < 0 or s >= trials.floor)
            and math.isfinite(trials.losses[s]) and lo / 4 <= abs(s) <= 4 * hi]
    if len(near) < 2:
        return None
    first, second = sorted(near, key=lambda s: min(abs(s - lo), abs(s - hi)))[:2]
    rise_first, rise_second = (trials.losses[x] - trials.baseline for x in (first, second))
    if rise_first == rise_second == 0.0:
        return None  # exactly flat: no trend to compare with
    # L − L(θ_t) = a·s + b·s² through both points
    determinant = first * second * (second - first)
    a = (rise_first * second ** 2 - rise_second * first ** 2) / determinant
    b = (first * rise_second - second * rise_first) / determinant
    trend = a + b * (lo + hi)  # the quadratic's slope at the bracket's midpoint
    across = (trials.losses[hi] - trials.losses[lo]) / (hi - lo)
    return across / trend if trend != 0 else math.inf


class _Search:
    def __init__(self, trials: _Trials, guess: float, tol: float, max_search: int):
        self.trials, self.guess, self.tol, self.max_search = trials, guess, tol, max_search
        self.slope: float | None = None
        self.slope_step = 1.0  # the h of the slope's symmetric difference

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

    def by_slope(self, h: float = 1.0) -> Outcome:
        """The loss rose at every resolvable point: an ascent if the slope at θ_t is positive by
        more than the noise, else the crossing lies below what the search could resolve."""
        slope = self.measure_slope(h)
        return Outcome.ASCENT if slope > 0 and 2 * self.slope_step * slope > _ASCENT_NOISE * self.trials.noise \
            else Outcome.UNRESOLVED

    def measure_slope(self, h: float = 1.0) -> float:
        """Symmetric difference at ±h, h at most 1 (L(1) is at hand already) and at least the
        floor: the curvature term cancels; a larger step (a stale warm start) would let the cubic
        term decide the sign. In loss per step multiple; a non-finite side counts as ascent."""
        if self.slope is None:
            self.slope_step = h = max(min(h, 1.0), self.trials.floor)
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
    """The model of q places every point after the warm start: either a third of a tolerance
    short of the predicted crossing (expected: no rise) or a tolerance from a bracket end on the
    crossing's side (expected to certify with that end). The secant through s = 1 and the warm
    start is usually within a few percent, so a typical search is s = 1, the warm start and two
    points. While every resolvable point rises the slope is measured first: an ascent ends the
    search, and otherwise L(±h) is the quadratic through θ_t that places the next point. Points
    that land on the wrong side escalate: the step away from the known end grows (×1.19, ×1.7,
    ×4.7, then ×108 at tol = 1/16), and inside a bracket two misses in a row bisect.
    """

    def run(self) -> Outcome:
        trials = self.trials
        misses = 0
        while True:
            lo, hi = trials.bracket()
            if lo is not None and hi is not None and 1.0 - lo / hi <= self.tol:
                return Outcome.CONVERGED
            if (lo is None or hi is None) and len(trials.losses) >= self.max_search:
                return Outcome.CAPPED if hi is None else self.by_slope()
            if lo is None and hi is not None:
                if hi <= trials.floor:
                    outcome = self.at_floor()
                    if outcome is not None:
                        return outcome
                    continue
                if self.guess < hi and self.guess not in trials.losses:
                    trials.rises(self.guess)  # a warm start below the rise may find a fall at once
                    continue
                # The slope across the smallest rise (up to 1): one forward, an ascent ends the search.
                finite = math.isfinite(trials.losses[hi])  # a diverged point says nothing of the slope
                if finite and self.slope is None and self.by_slope(hi) is Outcome.ASCENT:
                    return Outcome.ASCENT
            crossing = self._crossing(lo, hi)
            following, expect_rise, kind = self._place(lo, hi, crossing, misses)
            if not math.isfinite(following):
                return Outcome.CAPPED  # no rise up to the float range
            if lo is not None and hi is not None and not lo < following < hi:
                following, expect_rise, kind = 0.5 * (lo + hi), False, "bisect"  # tol below float steps
                if not lo < following < hi:
                    return Outcome.CONVERGED  # float resolution reached before tol
            rose = trials.rises(following)
            if kind == "bisect":
                misses = 0
            elif kind != "guess":  # the warm start is a prior, not the model: no miss
                misses = misses + 1 if rose is not expect_rise else 0

    def _crossing(self, lo: float | None, hi: float | None) -> float | None:
        """Where the model of q meets zero: inside a bracket the parabola through its ends and the
        nearest third point (the secant of the ends without one); on one side the parabola or
        secant through the known end and its nearest finite neighbours (L(−h) included). None
        where there is no such model or q does not increase (no quadratic bowl)."""
        trials = self.trials
        others = [s for s in trials.losses if s != 0.0 and s not in (lo, hi) and (s < 0 or s >= trials.floor)
                  and math.isfinite(trials.losses[s])]
        if trials.slope_hint is not None and trials.slope_hint < 0 and lo is not None:
            others.append(0.0)  # q(0) is the slope: a point of the model below every other
        if lo is not None and hi is not None:
            if math.isfinite(trials.q(hi)) and others:
                third = min(others, key=lambda s: min(abs(s - lo), abs(s - hi)))
                return _bracketed_root(_parabola((lo, hi, third), trials.q), lo, hi)
            pair = (lo, hi)
        else:
            end = lo if lo is not None else hi
            if end is None or not others:
                return None
            nearest = sorted(others, key=lambda s: abs(s - end))
            if hi is None and len(nearest) >= 2 and nearest[1] >= 0:
                # Three points below the crossing: q's curvature bends the extrapolation.
                model = _parabola(tuple(sorted((end, *nearest[:2]))), trials.q)
                if model(end) <= 0.0 < model(_MAX_GROWTH * end):
                    return _bracketed_root(model, end, _MAX_GROWTH * end)
            pair = tuple(sorted((end, nearest[0])))
        (left, right), (q_left, q_right) = pair, (trials.q(pair[0]), trials.q(pair[1]))
        if not (math.isfinite(q_left) and math.isfinite(q_right)) or q_right <= q_left:
            return None
        crossing = left - q_left * (right - left) / (q_right - q_left)
        return crossing if crossing > 0 else None

    def _place(self, lo: float | None, hi: float | None, crossing: float | None,
               misses: int) -> tuple[float, bool, str]:
        """The next point, whether the model expects the loss to rise there, and how it was
        placed: "pair" (certifies with a bracket end if the model is right), "aim" (a third of a
        tolerance short of the crossing), "guess" (the warm start, before there is a model),
        "grow" or "bisect" (no model to trust)."""
        tol, floor, guess = self.tol, self.trials.floor, self.guess
        pair, window = _PAIR * tol, _WINDOW * tol
        if lo is not None and hi is not None:
            if crossing is None or misses >= 2:
                return 0.5 * (lo + hi), False, "bisect"
            if crossing <= lo / (1.0 - window):
                return lo / (1.0 - pair), True, "pair"
            if crossing >= hi * (1.0 - window):
                return hi * (1.0 - pair), False, "pair"
            span = hi / lo
            return min(max(crossing * (1.0 - _AIM * tol), lo * span ** 0.05), lo * span ** 0.95), False, "aim"
        if lo is None and hi is None:
            return max(guess, floor), False, "guess"
        # Escalation per miss: 1, then ~1.19, ~1.7, ~4.7, ~108 (from the 4th miss on) at tol = 1/16.
        least = (1.0 / (1.0 - pair)) ** (3 ** min(misses, 4)) if misses else 1.0
        if hi is None:
            if crossing is None:
                if guess > lo and guess not in self.trials.losses:
                    return guess, False, "guess"
                return max(2.0, least) * lo, True, "grow"
            if crossing <= lo / (1.0 - window):
                return max(lo / (1.0 - pair), least * lo), True, "pair"
            # An extrapolated crossing is trusted only so far.
            target = min(crossing, _MAX_GROWTH * lo) * (1.0 - _AIM * tol)
            return max(target, lo / (1.0 - pair), least * lo), False, "aim"
        if crossing is None:
            following, expect_rise, kind = 0.5 * hi, False, "grow"
        elif crossing >= hi * (1.0 - window):
            following, expect_rise, kind = hi * (1.0 - pair), False, "pair"
        else:
            following, expect_rise, kind = crossing * (1.0 - _AIM * tol), False, "aim"
        return max(min(following, hi / least), floor), expect_rise, kind

def _parabola(points, q):
    """The quadratic through (s, q(s)) for three step multiples, in Newton form."""
    (x0, x1, x2), (y0, y1, y2) = points, tuple(q(x) for x in points)
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    d012 = (d12 - d01) / (x2 - x0)
    return lambda x: y0 + d01 * (x - x0) + d012 * (x - x0) * (x - x1)


def _bracketed_root(model, lo: float, hi: float) -> float:
    """A zero of model in [lo, hi], where model(lo) <= 0 < model(hi) (by bisection: no forwards)."""
    if not model(lo) <= 0.0 < model(hi):
        return 0.5 * (lo + hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if model(mid) > 0.0 else (mid, hi)
    return 0.5 * (lo + hi)
