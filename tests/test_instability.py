"""The instability suite (benchmarks/instability.py) and its detectors: scoring on a synthetic
trace with known answers, and one short provoked run and its calm twin."""

import json
import math
import statistics

import pytest

from megatron_sharpness.benchmarks import instability
from megatron_sharpness.benchmarks.detectors import (HORIZON, ZScore, megatron_spiky_alarms, ours_alarms, reading, score,
                                                     spikes_of, trend_alarms, zscore_alarms)


def synthetic(steps=300, spike_at=200):
    losses = [3.0 + 0.01 * ((7 * step) % 5) for step in range(1, steps + 1)]
    losses[spike_at - 1] = 6.0
    return {"loss": losses, "measurements": []}


def test_scoring_counts_a_warning_ahead_its_lead_and_calm_false_alarms():
    trace = synthetic()
    assert [s.step for s in spikes_of(trace)] == [200]
    # 190 and 197 are ahead (lead 10, the earliest), 200 is the spike itself (no warning),
    # 120 and 260 fall in calm stretches, 140 is just outside the horizon before the spike.
    result = score(trace, [120, 140, 190, 197, 200, 260])
    assert (result.spikes, result.caught, result.caught_2, result.leads) == (1, 1, 1, [10])
    calm = 300 - len(range(200 - HORIZON, 200 + 30 + 1))
    assert result.calm_steps == calm and result.false_alarms == 3
    assert result.false_per_1000 == pytest.approx(3000 / calm)
    assert score(trace, [199]).caught_2 == 0 and score(trace, [200, 201]).caught == 0
    # In a provoked run an alarm that no spike follows is unconfirmed, not false.
    provoked = score({**trace, "variant": "provoked"}, [120, 190, 260])
    assert (provoked.false_alarms, provoked.calm_steps, provoked.unconfirmed, provoked.provoked_steps) == (0, 0, 2, 300)


def test_zclip_statistics_follow_the_papers_warmup_then_ema():
    values = [1.0, 2.0, 3.0] * 9  # 27 values; the first 25 seed the mean and variance
    stats = ZScore(warmup=25)
    for value in values[:25]:
        assert stats.update(value) == 0.0
    mean, var = statistics.fmean(values[:25]), statistics.pvariance(values[:25])
    assert (stats.mean, stats.var) == pytest.approx((mean, var))
    z = stats.update(10.0, clip=2.5)
    assert z == pytest.approx((10.0 - mean) / math.sqrt(var))
    clipped = mean + 2.5 * math.sqrt(var)  # ZClip feeds the clipped value into the EMA
    assert stats.mean == pytest.approx(0.97 * mean + 0.03 * clipped)
    assert zscore_alarms([1.0, 1.1] * 20 + [5.0] + [1.0, 1.1] * 5, 3.0) == [41]


def test_megatron_spiky_loss_flags_ten_times_the_largest_of_the_first_hundred():
    losses = [3.0] * 100 + [29.0, 30.0, float("nan"), 31.0]
    assert megatron_spiky_alarms(losses, 10.0) == [102, 104]


def test_our_alarms_read_the_ratio_the_raised_loss_and_the_trend():
    trace = {"measurements": [{"step": 10 * i, "ratio": r, "raised": i == 5}
                              for i, r in enumerate([0.1, 0.1, 0.1, 0.1, 0.4, 0.2, "inf", None], 1)]}
    assert ours_alarms(trace, 1.0) == [50, 70]
    assert ours_alarms(trace, 0.3, raised=False) == [50, 70]
    assert trend_alarms(trace, 3.0) == [50, 70]  # 0.4 ≥ 3 × the median 0.1 of the three before it


@pytest.fixture(scope="module")
def runs():
    """group-lr: the output layer's lr × 100 from step 303, 340 steps, measured every 10; and its
    calm twin."""
    mechanism = next(m for m in instability.MECHANISMS if m.name == "group-lr")
    return {variant: instability.run(mechanism, variant, 0, 10, steps=340) for variant in ("provoked", "calm")}


def test_a_provoked_run_spikes_where_provoked_and_its_calm_twin_does_not(runs):
    provoked, calm = runs["provoked"], runs["calm"]
    assert [s.step for s in spikes_of(provoked)] == [304]
    assert spikes_of(calm) == []
    assert provoked["loss"][:302] == calm["loss"][:302]  # the same run until the provocation acts
    # The step with the raised lr is the one before the spike: the update ratio jumps at 303 and
    # warns a step ahead; the probe measures at 300 (before the raise) and at 310, after the spike,
    # reads lr/critical lr over 4 × the calm twin's highest (0.62 against 0.11).
    assert score(provoked, zscore_alarms(provoked["update_ratio"], 3.0)).leads == [1]
    assert score(provoked, ours_alarms(provoked, 1.0)).caught == 0
    after = next(m for m in provoked["measurements"] if m["step"] == 310)
    assert reading(after) > 4 * max(reading(m)
                                        for m in calm["measurements"] if m["step"] >= 100)
    assert [m["step"] for m in provoked["measurements"]] == list(range(10, 341, 10))


def test_the_report_is_rebuilt_from_the_saved_traces(runs, tmp_path):
    (tmp_path / "traces.json").write_text(json.dumps([{**t, "guard": "off", "budget": None} for t in runs.values()]))
    instability.main(["--out", str(tmp_path), "--report-only"])
    tables = (tmp_path / "tables.md").read_text()
    assert "| update ratio z-score | 3 | 1 | 1.00 | 0.00 | 1.0 |" in tables
    assert (tmp_path / "instability-detectors.png").stat().st_size > 10_000
