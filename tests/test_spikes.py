"""Loss spikes tied to curvature: the detector, the log fields it reads, and the proof on a small
run where an instability is provoked in a known group."""

import math
import random

import pytest

from megatron_sharpness.cli import main
from megatron_sharpness.demo_spike import run_spike_demo
from megatron_sharpness.logs import parse_losses, read_logs
from megatron_sharpness.spikes import THRESHOLD, detect_spikes, excursions


def noisy_curve(seed, steps=300, noise=0.05):
    rng = random.Random(seed)
    return {step: 2.5 + 3.0 * math.exp(-step / 40) + rng.gauss(0, noise) for step in range(1, steps + 1)}


@pytest.mark.parametrize("seed", range(5))
def test_a_jump_on_a_falling_noisy_curve_is_one_spike_and_noise_alone_none(seed):
    losses = noisy_curve(seed)
    assert detect_spikes(losses) == []  # the fast early descent is no spike, nor is the noise
    for step, extra in ((150, 0.8), (151, 1.5), (152, 0.6)):
        losses[step] += extra
    spikes = detect_spikes(losses)
    assert [(s.step, s.peak_step) for s in spikes] == [(150, 151)]
    assert spikes[0].sigmas > 10 and spikes[0].trend == pytest.approx(2.5 + 3.0 * math.exp(-150 / 40), abs=0.06)


def test_a_nan_loss_is_a_spike_and_a_plateau_turns_no_rounding_into_spikes():
    losses = {step: 3.0 for step in range(1, 40)} | {40: 3.0000001, 41: float("nan")}
    assert [s.step for s in detect_spikes(losses)] == [41]


def test_log_lines_give_losses_of_every_iteration_the_worst_module_and_the_warnings(tmp_path):
    lines = [f" iteration {i:8d}/     100 | lm loss: {3.0 + 0.01 * (i % 3):.6E} | learning rate: 1.0E-03 |"
             for i in range(1, 10)]
    lines[4] += (" critical sharpness: 5.0E+03 | critical lr: 4.0E-04 | lr/critical lr: 2.500 | step raised loss: yes |"
                 " sharpness forwards: 40 | modules: 4 (worst output >1.00) | sharpness warnings: 1 |")
    lines[7] += (" critical sharpness: 5.0E+01 | critical lr: 4.0E-02 | lr/critical lr: 0.025 | step raised loss: no |"
                 " sharpness forwards: 5 | sharpness warnings: 1 |")
    assert parse_losses(lines) == {i: pytest.approx(3.0 + 0.01 * (i % 3)) for i in range(1, 10)}
    log = tmp_path / "train.log"
    log.write_text("\n".join(lines))
    first, second = read_logs([str(log)])
    assert (first.step, first.warning, first.warnings, first.worst_module) == (5, True, 1, ("output", ">1.00"))
    assert (second.step, second.warning, second.worst_module) == (8, False, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The provoked run (output layer's lr × 30 from iteration 16) and its unprovoked twin."""
    folder = tmp_path_factory.mktemp("spike")
    result = {}
    for name, provoke_at in (("provoked", 16), ("calm", None)):
        lines = []
        log_file = folder / f"{name}.jsonl"
        run = run_spike_demo(steps=30, provoke_at=provoke_at, factor=30.0, group="output",
                             log_file=str(log_file), print_fn=lines.append)
        (folder / f"{name}.log").write_text("\n".join(lines) + "\n")
        result[name] = (run, folder / f"{name}.log", log_file)
    return result


def test_the_warning_fires_before_the_spike_and_names_the_provoked_group(runs):
    run, _, _ = runs["provoked"]
    spikes = detect_spikes(dict(enumerate(run.losses, 1)))
    assert len(spikes) == 1 and 16 < spikes[0].step <= 24
    warned = [m for m in run.measurements if m.warning is not None]
    assert warned and 16 <= warned[0].step < spikes[0].step  # a lead time of at least one iteration
    first = warned[0]
    assert first.modules_trigger in ("step_raised_loss", "warn_ratio")
    assert first.worst_module()[0] == "output"
    assert "highest lr/critical lr by module: output" in first.warning
    assert all(m.warning is None for m in run.measurements[:15])  # nothing before the provocation


def test_the_unprovoked_run_has_neither_warning_nor_spike(runs):
    run, _, _ = runs["calm"]
    losses = dict(enumerate(run.losses, 1))
    assert detect_spikes(losses) == []
    assert all(m.warning is None and m.lr_over_critical_lr < 0.2 for m in run.measurements)
    # The detector's margin on this run: its largest excursion above the trend.
    worst = max((losses[step] - trend) / spread for step, (trend, spread) in excursions(losses).items())
    assert 3 < worst < THRESHOLD  # noise reaches ~5 spreads here; the provoked spike stands at 19
    provoked = runs["provoked"][0].measurements
    assert [m.modules_trigger for m in run.measurements if m.modules] == ["interval"] * 3
    assert [m.step for m in provoked[:15] if m.modules] == [10]


@pytest.mark.parametrize("which", ["log", "jsonl"])
def test_summary_ties_the_spike_to_the_warning_with_its_lead_time(runs, which, capsys):
    _, log, jsonl = runs["provoked"]
    assert main(["summary", str(log if which == "log" else jsonl)]) == 0
    out = capsys.readouterr().out
    spike = detect_spikes(dict(enumerate(runs["provoked"][0].losses, 1)))[0]
    first = next(m for m in runs["provoked"][0].measurements if m.warning)
    assert "loss spikes (a loss > 6 robust spreads above the trend of the 20 iterations before it): 1" in out
    assert f"  iteration {spike.step}: loss " in out
    assert f"first warning {spike.step - first.step} iterations before it (iteration {first.step})" in out
    assert f"iteration {first.step} (lead {spike.step - first.step}) | lr/critical lr" in out
    assert "WARNING | " + ("worst module: output" if which == "log" else "modules: output") in out
    _, calm_log, _ = runs["calm"]
    assert main(["summary", str(calm_log)]) == 0
    assert "before it): 0" in capsys.readouterr().out


def test_plot_marks_the_spike_and_the_warnings(runs):
    pytest.importorskip("matplotlib")
    from megatron_sharpness.report import figure

    _, log, _ = runs["provoked"]
    records = read_logs([str(log)])
    spikes = detect_spikes(parse_losses(log.read_text().splitlines()))
    built = figure(records, spikes)
    import matplotlib.pyplot as plt

    labels = [line.get_label() for line in built.axes[0].get_lines()]
    assert "loss spike" in labels and "warning" in labels
    vertical = [line for line in built.axes[0].get_lines() if line.get_label() == "loss spike"]
    assert list(vertical[0].get_xdata()) == [spikes[0].step, spikes[0].step]
    plt.close(built)


def test_demo_spike_command_writes_the_log_the_jsonl_and_the_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo-spike", "--steps", "5", "--provoke-at", "9", "--output-dir", str(tmp_path)]) == 2
    assert "--provoke-at 9 is after the last iteration (5); allowed: <= --steps" in capsys.readouterr().err
    assert main(["demo-spike", "--steps", "24", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: critical sharpness at iteration" in out and "first warning" in out
    assert {p.name for p in tmp_path.iterdir()} == {"train.log", "critical_sharpness.jsonl", "critical_sharpness.png"}
