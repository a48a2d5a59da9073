import math

import pytest

from megatron_sharpness.search import critical_lr_search, loss_rose


def parabola(critical_step_multiple: float):
    """L(s) = s·(s − s*): falls, then rises above L(0) = 0 exactly after s*."""
    calls = []

    def loss_at(step_multiple):
        calls.append(step_multiple)
        return step_multiple * (step_multiple - critical_step_multiple)

    return loss_at, calls


@pytest.mark.parametrize("critical", [1e-4, 0.3, 1.0, 1.7, 5.0, 1234.5])
@pytest.mark.parametrize("tol", [1 / 16, 1 / 4, 1e-3])
def test_brackets_the_crossing_to_tolerance(critical, tol):
    loss_at, calls = parabola(critical)
    result = critical_lr_search(loss_at, 0.0, lr=0.01, tol=tol)
    lo, hi = result.bracket_step_multiple
    assert result.converged
    assert lo <= critical <= hi
    assert 1 - lo / hi <= tol
    assert result.critical_step_multiple == pytest.approx((lo + hi) / 2, rel=0, abs=0)
    assert abs(result.critical_step_multiple / critical - 1) <= tol
    assert result.critical_lr == pytest.approx(0.01 * result.critical_step_multiple, rel=1e-15)
    assert result.critical_sharpness == pytest.approx(2 / result.critical_lr, rel=1e-15)
    assert result.bracket == pytest.approx((0.01 * lo, 0.01 * hi), rel=1e-15)
    assert [s for s, _ in result.evaluations] == calls
    assert result.forwards == len(calls)


def test_exponential_phase_doubles_then_bisects_four_times_at_default_tol():
    # s* = 3: 1 falls, 2 falls, 4 rises -> [2, 4]; bisect 3 (rises? no: 3·0 = 0 is not a rise).
    loss_at, calls = parabola(3.0)
    result = critical_lr_search(loss_at, 0.0)
    assert calls[:3] == [1.0, 2.0, 4.0]
    assert calls[3:] == [3.0, 3.5, 3.25, 3.125]
    assert result.bracket_step_multiple == (3.0, 3.125)
    assert result.critical_step_multiple == 3.0625


def test_exponential_phase_halves_while_the_loss_rises():
    loss_at, calls = parabola(0.3)
    critical_lr_search(loss_at, 0.0)
    assert calls[:3] == [1.0, 0.5, 0.25]


def test_warm_start_at_the_answer_costs_one_plus_bisection():
    loss_at, calls = parabola(1.0)
    result = critical_lr_search(loss_at, 0.0, initial_step_multiple=0.99)
    assert result.converged
    assert len(calls) == 6  # 0.99 falls, 1.98 rises, four bisections


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_counts_as_a_rise(bad):
    def loss_at(step_multiple):
        return -step_multiple if step_multiple < 0.7 else bad

    result = critical_lr_search(loss_at, 0.0)
    lo, hi = result.bracket_step_multiple
    assert result.converged and lo < 0.7 <= hi
    assert loss_rose(bad, 0.0)


def test_equal_loss_is_not_a_rise():
    assert not loss_rose(1.0, 1.0)
    assert loss_rose(1.0 + 2**-52, 1.0)


def test_cap_when_the_loss_never_rises():
    result = critical_lr_search(lambda s: -s, 0.0, lr=0.5, max_search=7)
    assert not result.converged
    assert result.forwards == 7
    assert result.critical_lr is None and result.critical_sharpness is None
    assert result.bracket_step_multiple == (64.0, None)
    assert result.bracket == (32.0, None)


def test_cap_when_the_loss_rises_at_every_trial_point():
    result = critical_lr_search(lambda s: 1.0 + s, 0.0, max_search=5)
    assert not result.converged
    assert result.forwards == 5
    assert result.bracket_step_multiple == (0.0, 1.0 / 16)
    assert result.critical_lr is None


def test_tiny_tolerance_stops_at_float_resolution():
    loss_at, calls = parabola(1.0 / 3.0)
    result = critical_lr_search(loss_at, 0.0, tol=1e-300)
    assert result.converged
    assert len(calls) < 120
    assert result.critical_step_multiple == pytest.approx(1 / 3, rel=1e-15)


@pytest.mark.parametrize("kwargs", [{"tol": 0.0}, {"tol": 1.0}, {"initial_step_multiple": -1.0},
                                    {"initial_step_multiple": math.inf}, {"max_search": 0}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        critical_lr_search(lambda s: s, 0.0, **kwargs)


def test_rejects_non_finite_baseline():
    with pytest.raises(ValueError, match="baseline_loss"):
        critical_lr_search(lambda s: s, math.nan)


def test_shrinking_to_a_point_that_equals_the_baseline_is_unresolved_not_a_fall():
    # Uphill direction in finite precision: tiny steps round back to θ_t and give the baseline
    # exactly, which must not be read as "the loss fell there".
    baseline = 0.75
    result = critical_lr_search(lambda s: baseline if s < 1e-3 else baseline + s, baseline)
    assert not result.converged and result.critical_lr is None
    assert result.bracket_step_multiple == (0.0, 2.0**-9)
    assert result.forwards == 11


def test_equal_loss_while_doubling_is_still_not_a_rise():
    result = critical_lr_search(lambda s: 0.0 if s < 5 else 1.0, 0.0)
    assert result.converged
    lo, hi = result.bracket_step_multiple
    assert lo < 5 <= hi
