"""Tables, per-phase statistics and plots of parsed sharpness records (the CLI's parse, summary
and plot)."""

from __future__ import annotations

import csv
import io
import json
import statistics

from megatron_sharpness.logs import STATUSES, StepRecord, is_finite, legs_of, relative_names
from megatron_sharpness.spikes import THRESHOLD, WINDOW, Spike


class ReportError(ValueError):
    pass


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(records: list[StepRecord], fmt: str) -> str:
    names = relative_names(records)
    legs = len(legs_of(records)) > 1  # a `leg` column only where a log's steps went backwards
    rows = [record.as_row(names, legs) | {"skipped": record.skipped, "error": record.error} for record in records]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
        return out.getvalue().rstrip("\n")
    header = list(rows[0])
    table = [header] + [[_text(row[key]) for key in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table)


def _edge_ratio(record: StepRecord) -> float | None:
    """η_t·λ_c/2 = η_t/η_c: above 1 the step is past the edge of stability."""
    if is_finite(record.lr_over_critical_lr):
        return record.lr_over_critical_lr
    if is_finite(record.lr) and is_finite(record.critical_sharpness):
        return record.lr * record.critical_sharpness / 2
    return None


def _slope(steps: list[int], values: list[float]) -> float | None:
    if len(steps) < 2 or len(set(steps)) < 2:
        return None
    mean_step, mean_value = statistics.fmean(steps), statistics.fmean(values)
    covariance = sum((s - mean_step) * (v - mean_value) for s, v in zip(steps, values))
    variance = sum((s - mean_step) ** 2 for s in steps)
    return covariance / variance


def summary(records: list[StepRecord], phases: int) -> str:
    """Outcome counts and, per phase, the median λ_c, its slope and the share past the edge of
    stability; where a log's steps went backwards, for each leg apart (a phase never mixes legs)."""
    legs = legs_of(records)
    if not any(is_finite(r.critical_sharpness) for r in records):
        raise ReportError("no converged measurement to summarise (every step was skipped or capped)")
    if len(legs) == 1:
        return _leg_summary(records, phases)
    return "\n".join(f"leg {leg[0].leg} of {len(legs)}" + (" (the log's steps went backwards before it)"
                                                           if leg[0].leg > 1 else "") + ":\n" + _leg_summary(leg, phases)
                     for leg in legs)


def _leg_summary(records: list[StepRecord], phases: int) -> str:
    measured = [r for r in records if is_finite(r.critical_sharpness)]
    header = ["phase", "steps", "measured", "median λ_c", "λ_c slope /1k steps", "share η·λ_c/2 > 1"]
    lines = [header]
    phases = min(phases, len(measured))
    bounds = [round(i * len(measured) / phases) for i in range(phases + 1)]
    for index in range(phases):
        part = measured[bounds[index]:bounds[index + 1]]
        steps = [r.step for r in part]
        values = [r.critical_sharpness for r in part]
        slope = _slope(steps, values)
        ratios = [ratio for ratio in (_edge_ratio(r) for r in part) if ratio is not None]
        share = f"{100 * sum(ratio > 1 for ratio in ratios) / len(ratios):.0f}%" if ratios else "-"
        lines.append([str(index + 1), f"{steps[0]}-{steps[-1]}", str(len(part)), f"{statistics.median(values):.4g}",
                      "-" if slope is None else f"{1000 * slope:+.4g}", share])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
    outcomes = [f"{len(records)} measured steps, steps {records[0].step}-{records[-1].step}",
                f"  step's batch: {_outcome_counts([r.status for r in records])}"]
    raised = [r.step_raised_loss for r in records if r.step_raised_loss is not None]
    if raised:
        outcomes.append(f"  the step raised its batch's loss at {sum(raised)} of {len(raised)} measured steps")
    guarded = [r for r in records if r.guard is not None]
    if guarded:
        shown = ", ".join(f"{r.step} ({r.guard})" for r in guarded[:8]) + (", ..." if len(guarded) > 8 else "")
        outcomes.append(f"  the guard acted at {len(guarded)} of {len(records)} measured steps: {shown}")
    for name in relative_names(records):
        statuses = [r.relative_status[name] for r in records if name in r.relative_status]
        values = [r.relative[name] for r in records if is_finite(r.relative.get(name))]
        median = f", median relative λ_c {statistics.median(values):.4g}" if values else ""
        outcomes.append(f"  relative task {name}: {_outcome_counts(statuses)}{median}")
    return "\n".join(outcomes) + ("\n" + table if measured else "\n  no converged measurement in this leg")


def spike_report(records: list[StepRecord], spikes: list[Spike], losses_found: bool, lookback: int = WINDOW,
                 shown: int = 4) -> str:
    """Each loss spike with the measurements of the `lookback` iterations before it: lead time,
    lr/critical lr, whether the step raised its batch's loss, the warning, the module readings."""
    if not losses_found:
        return "loss spikes: no training loss in the logs (iteration lines with 'lm loss: ...', or JSONL records)"
    title = (f"loss spikes (a loss > {THRESHOLD:g} robust spreads above the trend of the {WINDOW} iterations "
             f"before it): {len(spikes)}")
    lines = [title]
    for spike in spikes:
        peak = "" if spike.peak_step == spike.step else f"; peak {spike.peak_loss:.4g} at iteration {spike.peak_step}"
        lines.append(f"  iteration {spike.step}: loss {spike.loss:.4g} (trend {spike.trend:.4g}, "
                     f"+{spike.sigmas:.1f} spreads{peak})")
        before = [r for r in records if spike.step - lookback <= r.step < spike.step]
        warned = [r for r in before if r.warning]
        if not before:
            lines.append(f"    no measurement in the {lookback} iterations before it")
            continue
        lines.append(f"    first warning {spike.step - warned[0].step} iterations before it (iteration {warned[0].step})"
                     if warned else f"    no warning in the {lookback} iterations before it")
        # The warnings first, then the latest measurements, in step order.
        picked = sorted({r.step: r for r in (warned[:shown] + before[-shown:])}.values(), key=lambda r: r.step)
        for record in picked[-2 * shown:]:
            lines.append("    " + _reading(record, spike.step))
    return "\n".join(lines)


def _reading(record: StepRecord, spike_step: int) -> str:
    ratio = _edge_ratio(record)
    parts = [f"iteration {record.step} (lead {spike_step - record.step})",
             f"lr/critical lr {'-' if ratio is None else f'{ratio:.3g}'}" + ("" if record.status == "converged" else f" ({record.status})")]
    if record.step_raised_loss is not None:
        parts.append(f"step raised loss: {'yes' if record.step_raised_loss else 'no'}")
    if record.warning:
        parts.append("WARNING")
    if record.guard is not None:
        parts.append(f"guard: {record.guard}")
    if record.modules:
        ranked = [(name, r) for name, r in record.modules.items() if r is not None]  # worst first already
        parts.append("modules: " + (", ".join(f"{name} {_ratio(r)}" for name, r in ranked[:3]) or
                                    f"{len(record.modules)} without a number"))
    elif record.worst_module is not None:
        parts.append(f"worst module: {record.worst_module[0]} {_ratio(record.worst_module[1])}")
    return " | ".join(parts)


def _ratio(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # a bound as the log line wrote it, e.g. ">1.00"
        return value
    return "ascent" if value == float("inf") else f"{value:.3g}"


def _outcome_counts(statuses: list[str]) -> str:
    """'12 converged, 3 ascent, ...' in the order of STATUSES, outcomes that occur only."""
    return ", ".join(f"{statuses.count(status)} {status}" for status in STATUSES if status in statuses) or "none"


def plot(records: list[StepRecord], output: str, spikes: list[Spike] = ()) -> None:
    """Writes figure(records, spikes) to output."""
    built = figure(records, spikes)
    import matplotlib.pyplot as plt

    try:
        built.savefig(output, dpi=120)
    except OSError as error:
        raise ReportError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        plt.close(built)


# Line styles of the legs of a log whose steps went backwards (StepRecord.leg).
LEG_STYLES = ("o-", "s:", "^--", "D-.")


def _draw_series(axis, top_edge, label: str, color: str, style: str, points: list) -> None:
    """One λ_c series: converged values as a line (broken where a step has no number), bounds as
    triangles, ascents, noisy readings and unresolved ones without a bound on the top edge."""
    steps = [step for step, _, _, _ in points]
    values = [value if is_finite(value) else float("nan") for _, value, _, _ in points]
    axis.plot(steps, values, style, ms=3, lw=1, color=color, label=label)
    for marker, status, text in (("^", "unresolved", "λ_c > bound (unresolved)"),
                                 ("v", "capped", "λ_c < bound (never rose)")):
        bounded = [(step, bound[1]) for step, _, state, bound in points if state == status and bound]
        if bounded:
            axis.plot(*zip(*bounded), marker, ls="none", ms=6, color=color, mfc="none", label=f"{label}: {text}")
    # An unresolved reading without a bound (the loss never moved beyond its noise) has no λ_c either.
    for marker, status, text in (("x", "ascent", "ascent (no λ_c)"), ("d", "noisy", "noisy (no λ_c)"),
                                 ("+", "unresolved", "unresolved (no λ_c)")):
        steps = [step for step, _, state, bound in points if state == status and not (status == "unresolved" and bound)]
        if steps:
            axis.plot(steps, [0.98] * len(steps), marker, ms=5, color=color, mfc="none", transform=top_edge,
                      label=f"{label}: {text}")


def figure(records: list[StepRecord], spikes: list[Spike] = ()):
    """λ_c per step on a log scale, relative tasks beside it, the lr in a panel of its own; loss
    spikes as red vertical lines, measurements that warned as red dots on the top edge.

    Only converged values are drawn as lines, broken where a step has no number. Bounds are
    triangles pointing where λ_c lies (unresolved: λ_c above the marker; never rose: below); an
    ascent (×), a crossing placed by the loss's rounding (◇, noisy) and a step the loss did not resolve
    (+, unresolved without a bound) have no λ_c at all and are marked on the top edge.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        raise ReportError("plot needs matplotlib: pip install 'megatron-sharpness[plot]'") from None
    if all(r.status in ("skipped", "failed") for r in records):
        raise ReportError("nothing to plot: every measured step was skipped or failed")
    with_lr = [r for r in records if is_finite(r.lr) and r.lr > 0]
    built, axes = plt.subplots(2 if with_lr else 1, 1, figsize=(9, 6.5 if with_lr else 5), sharex=True,
                                squeeze=False, gridspec_kw={"height_ratios": [3, 1]} if with_lr else None)
    axis = axes[0][0]
    top_edge = blended_transform_factory(axis.transData, axis.transAxes)
    legs = legs_of(records)
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for leg in legs:
        # Legs of a log whose steps went backwards overlap in step: each is drawn apart, in its own style.
        suffix, style = "", "o-"
        if len(legs) > 1:
            suffix, style = f" (leg {leg[0].leg})", LEG_STYLES[(leg[0].leg - 1) % len(LEG_STYLES)]
        series = [(f"critical sharpness λ_c{suffix}", "tab:blue",
                   [(r.step, r.critical_sharpness, r.status, r.bound) for r in leg])]
        for index, name in enumerate(relative_names(records)):
            points = [(r.step, r.relative.get(name), r.relative_status.get(name), r.relative_bound.get(name)) for r in leg
                      if name in r.relative_status or name in r.relative]
            series.append((f"relative λ_c: {name}{suffix}", colors[index % len(colors)], points))
        for label, color, points in series:
            _draw_series(axis, top_edge, label, color, style, points)
    warned = [r.step for r in records if r.warning]
    if warned:
        axis.plot(warned, [0.94] * len(warned), "o", ms=4, color="tab:red", transform=top_edge, label="warning")
    for index, spike in enumerate(spikes):
        for row, panel in enumerate(axes):
            panel[0].axvline(spike.step, color="tab:red", lw=1, alpha=0.6,
                             label="loss spike" if index == 0 and row == 0 else None)
    if with_lr:
        lr_axis = axes[1][0]
        for index, leg in enumerate(legs_of(with_lr)):
            steps = [r.step for r in leg]
            axis.plot(steps, [2 / r.lr for r in leg], "k--", lw=1, label="2/η (edge of stability)" if index == 0 else None)
            lr_axis.plot(steps, [r.lr for r in leg], color="tab:gray", lw=1)
        lr_axis.set_ylabel("learning rate η")
        lr_axis.set_xlabel("step")
    else:
        axis.set_xlabel("step")
    axis.set_yscale("log")
    axis.set_ylabel("sharpness")
    # Below the band of the top edge, where ascents and noisy readings are marked.
    axis.legend(loc="upper right", bbox_to_anchor=(1.0, 0.95), fontsize=7)
    axis.set_title("critical sharpness along the optimizer's update")
    built.tight_layout()
    return built
