import math
import random

import pytest

from megatron_sharpness.search import Outcome, critical_lr_search, loss_rose


def parabola(critical_step_multiple: float):
    """L(s) = s·(s − s*): falls, then rises above L(0) = 0 exactly after s*."""
    calls = []

    def loss_at(step_multiple):
        calls.append(step_multiple)
        return step_multiple * (step_multiple - critical_step_multiple)

    return loss_at, calls


def paper_reference(loss_at, baseline, guess=1.0, tol=1 / 16, max_search=40):
    """Appendix A of the paper, written out independently of the package: the trial sequence."""
    calls, s = [], guess

    def rises(x):
        calls.append(x)
        value = loss_at(x)
        return not math.isfinite(value) or value > baseline

    if rises(s):
        lo, hi, n = None, s, 0
        while lo is None and n < max_search:
            n += 1
            s /= 2
            if rises(s):
                hi = s
            else:
                lo = s
    else:
        lo, hi, n = s, None, 0
        while hi is None and n < max_search:
            n += 1
            s *= 2
            if rises(s):
                hi = s
            else:
                lo = s
    if lo is None or hi is None:
        return calls, None
    while 1 - lo / hi > tol:
        mid = (lo + hi) / 2
        if rises(mid):
            hi = mid
        else:
            lo = mid
    return calls, (lo + hi) / 2


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("critical", [1e-4, 0.3, 1.0, 1.7, 5.0, 1234.5])
@pytest.mark.parametrize("tol", [1 / 16, 1 / 4, 1e-3])
def test_brackets_the_crossing_to_tolerance(method, critical, tol):
    loss_at, calls = parabola(critical)
    result = critical_lr_search(loss_at, 0.0, lr=0.01, tol=tol, method=method)
    lo, hi = result.bracket_step_multiple
    assert result.outcome is Outcome.CONVERGED and result.converged
    assert lo <= critical <= hi
    assert 1 - lo / hi <= tol
    assert result.critical_step_multiple == pytest.approx((lo + hi) / 2, rel=0, abs=0)
    assert abs(result.critical_step_multiple / critical - 1) <= tol
    assert result.critical_lr == pytest.approx(0.01 * result.critical_step_multiple, rel=1e-15)
    assert result.critical_sharpness == pytest.approx(2 / result.critical_lr, rel=1e-15)
    assert result.bracket == pytest.approx((0.01 * lo, 0.01 * hi), rel=1e-15)
    assert [s for s, _ in result.evaluations] == calls  # each point evaluated once
    assert result.forwards == len(calls)
    assert result.step_raised_loss is (critical < 1.0)
    # a quadratic's secant slope is its slope at the midpoint: the trend check sees a ratio of 1
    assert result.bracket_slope_ratio is None or result.bracket_slope_ratio == pytest.approx(1.0, rel=1e-6)


def smooth_losses(seed: int, count: int):
    """Non-quadratic losses along a line: L(s) = a·s + b·s² + c·s³ + d·s⁴ with a < 0 (descent),
    the first crossing found by a dense scan."""
    rng = random.Random(seed)
    for _ in range(count):
        scale = 10 ** rng.uniform(-2, 2)
        a, b = -rng.uniform(0.1, 2.0), rng.uniform(0.1, 2.0) / scale
        c, d = rng.uniform(-0.3, 0.3) * b / scale, rng.uniform(0, 0.3) * b / scale**2
        yield (lambda s, a=a, b=b, c=c, d=d: a * s + b * s**2 + c * s**3 + d * s**4)


def first_crossing(loss, upper=1e6):
    lo, s = 0.0, 1e-6
    while s < upper and loss(s) <= 0:
        lo, s = s, s * 1.01
    for _ in range(60):  # refine [lo, s]
        mid = (lo + s) / 2
        lo, s = (lo, mid) if loss(mid) > 0 else (mid, s)
    return s


def test_fast_and_paper_certify_the_dense_scan_crossing_and_fast_needs_fewer_forwards():
    # Quartic losses along the line and warm starts up to 40 % off: harder than a warm start one
    # measurement interval old on a nearly quadratic loss.
    fast_forwards, paper_forwards = [], []
    guesses = random.Random(1)
    for loss in smooth_losses(0, 200):
        truth = first_crossing(loss)
        guess = truth * guesses.uniform(0.7, 1.4)
        for method, counts in (("fast", fast_forwards), ("paper", paper_forwards)):
            result = critical_lr_search(loss, 0.0, initial_step_multiple=guess, method=method)
            lo, hi = result.bracket_step_multiple
            assert result.converged and loss(lo) <= 0 < loss(hi) and 1 - lo / hi <= 1 / 16
            assert abs(result.critical_step_multiple / truth - 1) <= 1 / 16 + 1e-9
            counts.append(result.forwards)
    fast_forwards.sort(), paper_forwards.sort()
    assert fast_forwards[len(fast_forwards) // 2] <= 5, fast_forwards
    assert fast_forwards[len(fast_forwards) // 2] <= paper_forwards[len(paper_forwards) // 2] - 2


@pytest.mark.parametrize("critical", [1e-4, 0.01, 0.3, 1.0, 3.0, 1234.5])
@pytest.mark.parametrize("guess", [1.0, 0.5, 2.0, 1e-3, 7.0])
def test_paper_method_reproduces_the_papers_trial_sequence(critical, guess):
    loss_at, calls = parabola(critical)
    reference, reference_critical = paper_reference(lambda s: s * (s - critical), 0.0, guess=guess)
    result = critical_lr_search(loss_at, 0.0, initial_step_multiple=guess, method="paper")
    # s = 1 comes first for step_raised_loss; the paper's own points follow, each evaluated once.
    expected = [1.0] + [s for s in reference if s != 1.0]
    assert calls == expected
    assert result.critical_step_multiple == reference_critical


def test_paper_exponential_phase_doubles_then_bisects_four_times():
    loss_at, calls = parabola(3.0)
    result = critical_lr_search(loss_at, 0.0, method="paper")
    assert calls == [1.0, 2.0, 4.0, 3.0, 3.5, 3.25, 3.125]
    assert result.bracket_step_multiple == (3.0, 3.125)
    assert result.critical_step_multiple == 3.0625


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_counts_as_a_rise(method, bad):
    def loss_at(step_multiple):
        return -step_multiple if step_multiple < 0.7 else bad

    result = critical_lr_search(loss_at, 0.0, method=method)
    lo, hi = result.bracket_step_multiple
    assert result.converged and lo < 0.7 <= hi
    assert loss_rose(bad, 0.0)


def test_equal_loss_is_not_a_rise():
    assert not loss_rose(1.0, 1.0)
    assert loss_rose(1.0 + 2**-52, 1.0)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_capped_when_the_loss_never_rises(method):
    result = critical_lr_search(lambda s: -s, 0.0, lr=0.5, max_search=7, method=method)
    assert result.outcome is Outcome.CAPPED and not result.converged
    assert result.critical_lr is None and result.critical_sharpness is None
    lo, hi = result.bracket_step_multiple
    assert lo > 1.0 and hi is None
    assert result.sharpness_bound() == ("<", 2.0 / (0.5 * lo))
    assert result.step_raised_loss is False


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("floor", [0.0, 1e-3, 2.0])
def test_ascent_is_decided_by_the_slope_within_four_forwards(method, floor):
    # L = 0.2·s + s²: uphill at any step; no finite critical lr exists.
    calls = []

    def loss_at(s):
        calls.append(s)
        return 0.2 * s + s * s

    result = critical_lr_search(loss_at, 0.0, lr=0.1, resolution_floor=floor, method=method)
    assert result.outcome is Outcome.ASCENT
    assert result.critical_lr is None and result.sharpness_bound() is None
    assert result.slope == pytest.approx(0.2 / 0.1)  # symmetric difference: curvature cancels
    assert result.step_raised_loss is True
    assert all(s >= floor for s in calls if s > 0 and s != 1.0)  # s = 1 only for step_raised_loss
    if method == "fast":  # the baseline, L(1) and L(-1); where 1 is below the floor, L(±floor) too
        assert 1 + len(calls) <= (3 if floor <= 1.0 else 4), calls


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_crossing_below_the_floor_is_unresolved_with_a_bound(method):
    # Descent, but the crossing (s* = 1e-3) lies below the resolution floor 0.01.
    calls = []

    def loss_at(s):
        calls.append(s)
        return s * (s - 1e-3)

    result = critical_lr_search(loss_at, 0.0, lr=0.5, resolution_floor=0.01, method=method)
    assert result.outcome is Outcome.UNRESOLVED
    assert result.critical_lr is None
    assert result.bracket_step_multiple == (0.0, 0.01)
    assert result.sharpness_bound() == (">", 2.0 / (0.5 * 0.01))
    assert result.slope is not None and result.slope < 0
    assert min(s for s in calls if s > 0) == 0.01  # never below the floor


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_noise_below_the_floor_is_never_read(method):
    # Below the floor the loss is rounding noise that "falls"; the real crossing is at 0.3.
    def loss_at(s):
        if abs(s) < 0.05:
            return -1e-9
        return s * (s - 0.3)

    result = critical_lr_search(loss_at, 0.0, initial_step_multiple=1e-6, resolution_floor=0.05, method=method)
    lo, hi = result.bracket_step_multiple
    assert result.converged and lo <= 0.3 <= hi
    assert all(abs(s) >= 0.05 for s, _ in result.evaluations)


def test_poisoned_warm_start_still_finds_the_crossing():
    for critical in (0.3, 3.0):
        loss_at, calls = parabola(critical)
        result = critical_lr_search(loss_at, 0.0, initial_step_multiple=critical * 1e-6, resolution_floor=1e-3)
        lo, hi = result.bracket_step_multiple
        assert result.converged and lo <= critical <= hi
        assert len(calls) <= 6, calls


def test_tiny_tolerance_stops_at_float_resolution():
    for method in ("fast", "paper"):
        loss_at, calls = parabola(1.0 / 3.0)
        result = critical_lr_search(loss_at, 0.0, tol=1e-300, method=method)
        assert result.converged
        assert len(calls) < 200
        assert result.critical_step_multiple == pytest.approx(1 / 3, rel=1e-15)


@pytest.mark.parametrize("kwargs", [{"tol": 0.0}, {"tol": 1.0}, {"initial_step_multiple": -1.0},
                                    {"initial_step_multiple": math.inf}, {"max_search": 0},
                                    {"resolution_floor": -1.0}, {"method": "golden"}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        critical_lr_search(lambda s: s, 0.0, **kwargs)


def test_rejects_non_finite_baseline():
    with pytest.raises(ValueError, match="baseline_loss"):
        critical_lr_search(lambda s: s, math.nan)


def test_equal_loss_while_doubling_is_still_not_a_rise():
    result = critical_lr_search(lambda s: 0.0 if s < 5 else 1.0, 0.0)
    assert result.converged
    lo, hi = result.bracket_step_multiple
    assert lo < 5 <= hi


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_a_transient_nan_below_a_finite_point_is_its_own_outcome_not_a_rise(method):
    # One faulty forward at the second trial point; the loss is a parabola with s* = 5.8.
    calls = []

    def loss_at(s):
        calls.append(s)
        return math.nan if len(calls) == 2 else s * (s - 5.8)

    result = critical_lr_search(loss_at, 0.0, lr=0.1, method=method)
    assert result.outcome is Outcome.NON_FINITE
    assert result.critical_lr is None and result.critical_sharpness is None
    assert result.non_finite_at == pytest.approx(0.1 * calls[1])
    assert math.isnan(result.evaluations[1][1]) and result.evaluations[2][0] == calls[1]  # the retry


def test_divergence_at_large_steps_is_still_a_rise():
    result = critical_lr_search(lambda s: -s if s < 3.0 else math.inf, 0.0)
    assert result.converged and result.bracket_step_multiple[0] < 3.0 <= result.bracket_step_multiple[1]
    non_finite = [s for s, loss in result.evaluations if not math.isfinite(loss)]
    assert len(non_finite) == 2 * len(set(non_finite))  # each diverged point checked once more


def test_a_crossing_placed_by_rounding_is_noisy_not_a_number():
    # A flat-bottomed parabola (smooth crossing at 1.7) under a jagged term as deep as the parabola
    # itself, like a bf16 loss late in training on a held-out batch: the certified bracket is where
    # the jagged term happened to cross, 16 % below the smooth one.
    def loss_at(s):
        return 1e-3 * s * (s - 1.7) + 3e-4 * (math.sin(977 * s + 4.81) - math.sin(4.81))

    result = critical_lr_search(loss_at, 0.0, initial_step_multiple=0.8)
    lo, hi = result.bracket_step_multiple
    assert 1 - lo / hi <= 1 / 16 and not lo <= 1.7 <= hi
    assert result.outcome is Outcome.NOISY
    assert result.critical_lr is None and result.critical_sharpness is None and result.sharpness_bound() is None
    assert not 1 / 3 <= result.bracket_slope_ratio <= 3
    assert result.forwards <= 5  # the check costs no forward


@pytest.mark.parametrize("loss", [lambda s: -s / (1 + s), lambda s: -0.1 * (1 - math.exp(-s)), lambda s: -math.log1p(s)],
                         ids=["saturating", "exponential", "logarithmic"])
def test_a_loss_that_never_rises_is_capped_however_long_the_search(loss):
    # The model keeps predicting a crossing that is not there: every miss escalates the step,
    # which must stay a finite float and end as a bound, not an OverflowError inside training.
    for max_search in (40, 300, 2000):
        result = critical_lr_search(loss, 0.0, lr=1e-3, max_search=max_search)
        assert result.outcome is Outcome.CAPPED and result.critical_lr is None
        assert math.isfinite(result.bracket_step_multiple[0]) and result.bracket_step_multiple[0] > 1
        assert result.forwards <= max_search


def jagged(amplitude: float, seed: int):
    """A deterministic stand-in for a bf16 loss's rounding error: a fixed draw per trial point."""
    def error(s: float) -> float:
        return amplitude * (random.Random(hash((seed, s))).random() * 2 - 1)
    return error


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_a_loss_flat_to_its_noise_gives_no_wrong_number_and_no_wrong_bound(method):
    # A step that moved a few elements: the smooth loss falls by 1e-9 per step multiple and
    # crosses at 1e7; the rounding error is up to 1e-5 per trial point. A "rise" below 1e4 is
    # rounding's: no number and no bound from it. Where the baseline's own error happens to be
    # high, nothing rises before the real crossing, which is then found.
    numbers = 0
    for seed in range(20):
        noise = jagged(1e-5, seed)
        result = critical_lr_search(lambda s: -1e-9 * s + 1e-16 * s * s + noise(s), noise(0.0),
                                    method=method, loss_noise=2e-5)
        if result.converged:
            numbers += 1
            assert abs(result.critical_step_multiple / 1e7 - 1) <= 1 / 16, result
        else:
            assert result.outcome in (Outcome.UNRESOLVED, Outcome.NOISY), result
            assert result.sharpness_bound() is None or result.bracket_step_multiple[1] >= 1e7
    assert numbers < 20


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_a_bowl_as_shallow_as_the_noise_is_noisy_never_a_wrong_number(method):
    # Crossing at 2.0, bowl depth 1e-4, rounding error up to 5e-5 per trial point (the baseline's
    # own included): a bracket certified there is placed by the rounding.
    numbers = 0
    for seed in range(40):
        noise = jagged(5e-5, seed)
        result = critical_lr_search(lambda s: 1e-4 * s * (s - 2.0) + noise(s), noise(0.0), method=method,
                                    loss_noise=1e-4)
        if result.converged:
            numbers += 1
            assert abs(result.critical_step_multiple / 2.0 - 1) <= 1 / 16, result
        else:
            assert result.outcome in (Outcome.NOISY, Outcome.UNRESOLVED), result
    # the same bowl ten times deeper resolves every time
    for seed in range(40):
        noise = jagged(5e-5, seed)
        result = critical_lr_search(lambda s: 1e-2 * s * (s - 2.0) + noise(s), noise(0.0), method=method,
                                    loss_noise=1e-4)
        assert result.converged and abs(result.critical_step_multiple / 2.0 - 1) <= 1 / 16, result
        assert result.crossing_uncertainty <= 1 / 32


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_an_ascent_must_rise_beyond_the_noise(method):
    # Uphill at slope 1e-6 per step multiple: L(1) − L(−1) = 2e-6, within a noise of 1e-5.
    weak = critical_lr_search(lambda s: 1e-6 * s + 1e-7 * s * s, 0.0, method=method, loss_noise=1e-5)
    assert weak.outcome is Outcome.UNRESOLVED and weak.sharpness_bound() is None
    strong = critical_lr_search(lambda s: 1e-4 * s + 1e-7 * s * s, 0.0, method=method, loss_noise=1e-5)
    assert strong.outcome is Outcome.ASCENT


def test_a_stale_warm_start_does_not_set_the_slopes_step():
    # Crossing at 10, but the warm start is 100× off and the floor (2) hides L(1): the smallest
    # resolvable rise is the warm start itself. A symmetric difference there is the cubic term's
    # (+100), not the slope (−1).
    result = critical_lr_search(lambda s: -s + 0.1 * s * s + 1e-4 * s ** 3, 0.0, initial_step_multiple=1000.0,
                                resolution_floor=2.0)
    assert result.converged, result
    assert abs(result.critical_step_multiple / first_crossing(lambda s: -s + 0.1 * s * s + 1e-4 * s ** 3) - 1) <= 1 / 16
    assert all(abs(s) <= 2.0 or s > 0 for s, _ in result.evaluations)  # the slope at ±2, not ±1000


def test_the_gradients_slope_places_the_first_point():
    # With dL/ds(0) known, L(1) and the slope give the crossing of a quadratic exactly: the
    # baseline, L(1) and two points certify, whatever the warm start (up to the 64× that one
    # extrapolation may reach).
    for critical in (3.0, 17.0, 60.0):
        for guess in (1.0, critical * 0.3, critical * 3):
            loss_at, calls = parabola(critical)
            result = critical_lr_search(loss_at, 0.0, initial_step_multiple=guess, slope_hint=-critical)
            assert result.converged and result.bracket_step_multiple[0] <= critical <= result.bracket_step_multiple[1]
            assert 1 + len(calls) <= 4, (critical, guess, calls)
