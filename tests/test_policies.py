"""The policies beside the probe (policies.py): the adaptive interval's gaps and budget, the guard's
decisions and lr factor, and the guard on a plain-PyTorch run — exact where it shortens, bitwise
invisible where it never fires."""

import math

import pytest
import torch

from megatron_sharpness.config import ConfigError, SharpnessConfig
from megatron_sharpness.demo_spike import run_spike_demo
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.logs import read_logs
from megatron_sharpness.measurement import Measurement, TaskMeasurement
from megatron_sharpness.policies import (BURST, MIN_LR_FACTOR, AdaptiveInterval, Guard, lr_scaled, urgency)
from megatron_sharpness.report import summary
from megatron_sharpness.search import Outcome, SearchResult


def task(ratio=None, raised=False, outcome=Outcome.CONVERGED, lr=1e-3, forwards=5):
    """A search result with lr/critical lr = ratio (an ascent where ratio is inf) and `forwards`
    forwards counting the baseline."""
    critical = None if ratio is None or math.isinf(ratio) else 1.0 / ratio
    if math.isinf(ratio or 0.0):
        outcome = Outcome.ASCENT
    evaluations = tuple((0.5 * (i + 1), 1.0) for i in range(forwards - 1))
    search = SearchResult(lr=lr, baseline_loss=1.0, outcome=outcome, critical_step_multiple=critical,
                          bracket_step_multiple=(0.0, None), evaluations=evaluations, step_raised_loss=raised)
    return TaskMeasurement(search)


def measurement(step, ratio=None, raised=False, forwards=5):
    return Measurement(step=step, lr=1e-3, task=task(ratio, raised, forwards=forwards))


def test_urgency_is_zero_far_from_the_edge_one_at_it_and_log_linear_between():
    assert urgency(measurement(1, 1 / 16), 1.0) == 0.0 and urgency(measurement(1, 0.01), 1.0) == 0.0
    assert urgency(measurement(1, 0.25), 1.0) == pytest.approx(0.5)
    assert urgency(measurement(1, 1.0), 1.0) == 1.0 and urgency(measurement(1, 3.0), 1.0) == 1.0
    assert urgency(measurement(1, 0.01, raised=True), 1.0) == 1.0
    assert urgency(measurement(1, math.inf), 1.0) == 1.0
    assert urgency(Measurement(step=1, lr=1e-3, task=None, skipped="lr is 0"), 1.0) == 0.0


def test_the_adaptive_interval_is_rare_when_calm_dense_at_the_edge_and_within_its_budget():
    # A measurement of 6 forwards costs 2 training steps; 2 % of training pays one every 100 steps,
    # half of it one every 200: the calm gap.
    policy = AdaptiveInterval(interval=10, budget=0.02, warn_ratio=1.0)
    assert not policy.is_due(9) and policy.is_due(10)
    gaps, step = [], 10
    for _ in range(20):
        gap = policy.observe(measurement(step, 0.01, forwards=6), 1 / 3)
        gaps.append(gap)
        step += gap
    assert gaps[3:] == [200] * 17
    assert policy.spent / step <= 0.02 / 2 + 1e-9
    # At the edge: every step while the saved credit lasts (BURST measurements at most), then paced
    # by the budget; on average never more than the budget.
    edge = []
    for _ in range(60):
        gap = policy.observe(measurement(step, 2.0, forwards=6), 1 / 3)
        edge.append(gap)
        step += gap
    assert edge[0] == 1 and edge.count(1) <= BURST and max(edge) == 100
    assert policy.spent / step <= 0.02


def test_the_adaptive_interval_state_round_trips_and_bad_state_is_refused():
    policy = AdaptiveInterval(10, 0.05, 1.0)
    policy.observe(measurement(10, 0.5), 1 / 3)
    other = AdaptiveInterval(10, 0.05, 1.0)
    other.load_state_dict(policy.state_dict())
    assert other.state_dict() == policy.state_dict()
    with pytest.raises(ValueError, match="bad adaptive-interval state"):
        other.load_state_dict({"next_due": -1, "last_step": 0, "credit": 0.0, "spent": 0.0})


def test_the_guard_acts_past_its_ratio_aims_at_the_target_and_undoes_an_ascent():
    guard = Guard("shorten", ratio=1.0, target=0.5, recovery=100)
    assert guard.decide(5, task(0.9), {}) is None
    action = guard.decide(6, task(4.0), {})
    assert (action.mode, action.factor, action.group) == ("shorten", 0.125, None)
    assert guard.decide(7, task(math.inf), {}).factor == 0.0
    # Past the ratio but under the target: nothing to shorten.
    assert Guard("shorten", ratio=0.1, target=0.5, recovery=100).decide(1, task(0.3), {}) is None
    assert guard.actions == 2


def test_the_guard_acts_on_the_group_the_breakdown_names():
    modules = {"embedding": task(0.2), "output": task(8.0), "layer_0": task(None, outcome=Outcome.CAPPED)}
    action = Guard("shorten", 1.0, 0.5, 100).decide(3, task(2.0), modules)
    assert (action.group, action.factor, action.ratio) == ("output", 0.0625, 8.0)
    # No group past the ratio: the whole step.
    assert Guard("shorten", 1.0, 0.5, 100).decide(3, task(2.0), {"output": task(0.5)}).group is None


def test_the_lr_factor_recovers_geometrically_and_a_new_crossing_never_raises_it():
    guard = Guard("lr", 1.0, 0.5, recovery=10)
    assert guard.decide(20, task(5.0), {}).factor == pytest.approx(0.1)
    assert guard.lr_factor(20) == (1.0, None)  # the measured step itself ran at the full lr
    assert guard.lr_factor(21)[0] == pytest.approx(0.1 ** 0.9) and guard.lr_factor(25)[0] == pytest.approx(0.1 ** 0.5)
    assert guard.lr_factor(30) == (1.0, None)
    # Measured at step 25 under a factor 0.1 ** 0.5: lr/critical lr 2.5 of that lr; the scheduled lr
    # needs 0.5 / 2.5 × 0.1 ** 0.5, below what is in force, so it goes down.
    assert guard.decide(25, task(2.5), {}).factor == pytest.approx(0.2 * 0.1 ** 0.5)
    # Once more at 26: 0.5 / 1.1 of the 0.063 ** 0.9 in force would be 0.038, floored.
    assert guard.decide(26, task(1.1), {}).factor == MIN_LR_FACTOR
    assert Guard("lr", 1.0, 0.5, 10).decide(1, task(math.inf), {}).factor == MIN_LR_FACTOR


def test_lr_scaled_scales_for_the_step_and_puts_each_lr_back_exactly():
    groups = [{"lr": 3e-3}, {"lr": 0.1}]
    with lr_scaled(groups, 0.37):
        assert [g["lr"] for g in groups] == [3e-3 * 0.37, 0.1 * 0.37]
    assert groups == [{"lr": 3e-3}, {"lr": 0.1}]
    with lr_scaled(groups, 1.0):
        assert groups == [{"lr": 3e-3}, {"lr": 0.1}]


@pytest.mark.parametrize("field, value, allowed", [
    ("guard", "clip", "off or shorten or lr"), ("guard_ratio", 0.0, "finite number > 0"),
    ("guard_target", 1.5, "(0, 1]"), ("guard_recovery", 0, "integer >= 1"), ("budget", 1.0, "(0, 1)")])
def test_bad_guard_and_budget_values_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"{field}=.*allowed: .*{allowed.replace('(', '.').replace(')', '.')}"):
        SharpnessConfig(**{field: value})


def tiny_training(config, steps=12, seed=0):
    """A small regression model with AdamW and a probe; returns its params, optimizer state and probe."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    probe = TorchSharpnessProbe(model, optimizer, config, loggers=[])
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    records = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        records.append(probe.step(lambda: torch.nn.functional.mse_loss(model(x), y)))
        optimizer.zero_grad()
    return model, optimizer, probe, records


def test_shorten_commits_theta_t_plus_s_delta_exactly_and_leaves_the_moments_alone():
    """At step 3 the guard fires (it aims at a hundredth of the critical lr): the params are exactly
    lerp(θ_t, θ_{t+1}, s), the AdamW moments exactly those of the unguarded step."""
    reference_model, reference_opt, _, _ = tiny_training(SharpnessConfig(interval=3), steps=2)
    theta_t = [p.detach().clone() for p in reference_model.parameters()]
    reference_model_next, reference_opt_next, _, records = tiny_training(SharpnessConfig(interval=3), steps=3)
    theta_next = [p.detach().clone() for p in reference_model_next.parameters()]
    guarded, guarded_opt, probe, guarded_records = tiny_training(
        SharpnessConfig(interval=3, guard="shorten", guard_ratio=1e-9, guard_target=0.01), steps=3)
    action = guarded_records[2].guard
    assert action is not None and action.factor == pytest.approx(0.01 / records[2].lr_over_critical_lr)
    assert "sharpness guard: shorten ×" in guarded_records[2].log_fields()
    assert guarded_records[2].to_dict()["guard"]["factor"] == action.factor
    for param, old, new in zip(guarded.parameters(), theta_t, theta_next):
        assert torch.equal(param, torch.lerp(old, new, action.factor))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert all(torch.equal(guarded_opt.state[p][key], reference_opt_next.state[q][key])
                   for p, q in zip(guarded.parameters(), reference_model_next.parameters()))


def test_the_lr_guard_scales_the_next_steps_and_the_schedule_keeps_its_own_lr():
    _, optimizer, probe, records = tiny_training(
        SharpnessConfig(interval=3, guard="lr", guard_ratio=1e-9, guard_target=0.01, guard_recovery=10), steps=4)
    factor = records[2].guard.factor
    assert 0 < factor < 1 and optimizer.param_groups[0]["lr"] == 0.05
    assert probe.probe.guard.lr_factor(4)[0] == pytest.approx(factor ** 0.9)


@pytest.mark.parametrize("mode", ["shorten", "lr"])
def test_an_armed_guard_that_never_fires_is_bitwise_the_guard_off(mode):
    """The calm spike demo (lr/critical lr below 0.2 throughout) with the guard armed at its default
    ratio: no action, and the run is the unguarded one bitwise (losses and every measurement)."""
    off = run_spike_demo(steps=20, provoke_at=None, group="output", print_fn=lambda line: None)
    armed = run_spike_demo(steps=20, provoke_at=None, group="output", print_fn=lambda line: None, guard=mode)
    assert all(m.guard is None for m in armed.measurements)
    assert armed.losses == off.losses
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k != "probe_seconds"}  # noqa: E731
    assert [strip(m) for m in armed.measurements] == [strip(m) for m in off.measurements]


def test_the_guard_shortens_the_provoked_spike_demo(tmp_path):
    """The demo's output layer at 30 × the lr from iteration 16: the guard fires at the first
    crossing (iteration 16, lr/critical lr 0.64 > 0.5), where the breakdown names the output layer,
    shortens that group's part of the step alone, and the run's loss stays below the unguarded spike."""
    off = run_spike_demo(steps=24, provoke_at=16, factor=30.0, group="output", print_fn=lambda line: None)
    lines = []
    guarded = run_spike_demo(steps=24, provoke_at=16, factor=30.0, group="output", print_fn=lines.append,
                             guard="shorten", log_file=str(tmp_path / "guarded.jsonl"))
    actions = [m for m in guarded.measurements if m.guard is not None]
    first = actions[0]
    assert first.step == 16 and first.guard.group == "output" and first.worst_module()[0] == "output"
    assert first.guard.ratio == first.worst_module()[1] > 0.5
    assert first.guard.factor == pytest.approx(0.5 / first.guard.ratio)
    assert max(guarded.losses[16:]) < max(off.losses[16:])
    # The actions in the log line and the JSONL alike, and in `summary`.
    (tmp_path / "guarded.log").write_text("\n".join(lines) + "\n")
    from_line, from_json = (read_logs([str(tmp_path / name)]) for name in ("guarded.log", "guarded.jsonl"))
    expected = [(m.step, m.guard.text()) for m in actions]
    assert [(r.step, r.guard) for r in from_line if r.guard] == expected
    assert [(r.step, r.guard) for r in from_json if r.guard] == expected
    assert f"the guard acted at {len(actions)} of 24 measured steps: 16 (shorten output ×" in summary(from_json, 2)


def test_the_adaptive_interval_measures_where_it_said_logs_its_gap_and_keeps_its_budget():
    _, _, probe, records = tiny_training(SharpnessConfig(interval=4, budget=0.5), steps=40)
    measured = [r for r in records if r is not None]
    assert len(measured) >= 3 and measured[0].step == 4
    assert all(b.step - a.step == a.next_interval for a, b in zip(measured, measured[1:]))
    assert f"| sharpness interval: {measured[0].next_interval} |" in " | " + measured[0].log_fields()
    assert measured[0].to_dict()["next_interval"] == measured[0].next_interval
    spent = sum(m.forwards for m in measured) / 3
    assert spent == pytest.approx(probe.probe.schedule.spent) and spent <= 0.5 * 40


def test_the_policies_state_travels_with_the_probes_state_dict():
    config = SharpnessConfig(interval=4, budget=0.5, guard="lr", guard_ratio=1e-9, guard_target=0.01)
    _, _, probe, records = tiny_training(config, steps=10)
    assert any(r is not None and r.guard is not None for r in records)
    state = probe.state_dict()
    fresh = tiny_training(config, steps=0)[2]
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.probe.guard.lr_factor(11) == probe.probe.guard.lr_factor(11) != (1.0, None)
    assert fresh.probe.is_due(probe.probe.schedule.next_due) and not fresh.probe.is_due(probe.probe.schedule.next_due - 1)
    with pytest.raises(ValueError, match="bad guard state"):
        fresh.probe.load_state_dict({**state["probe"], "guard": {"actions": -1, "lr_start": 0.5, "fired": 3,
                                                                  "lr_group": None}})
